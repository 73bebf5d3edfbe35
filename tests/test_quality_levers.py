"""Issue-15 levers, all opt-in (defaults unchanged until an equal-time ablation): the GroupNorm/attention tokenizer
blocks, the l2-normalised codebook, the prior's LLaMA blocks (RMSNorm, SwiGLU, 2D RoPE)."""

import json

import pytest
import torch

from factories import TINY_VQVAE_FLAGS
from vqgen.config import VQVAEStageConfig, load_config
from vqgen.errors import ConfigError
from vqgen.models.blocks import AttnBlock, ResnetBlock, group_norm
from vqgen.models.quantizers.vq import VectorQuantizerEMA
from vqgen.models.vqvae import VQVAE, VQVAEConfig
from vqgen.train import vqvae_task

TINY = TINY_VQVAE_FLAGS  # constant lr (tests cut runs with --max_steps, the cosine schedule's horizon)


def small(**kw) -> VQVAEConfig:
    return VQVAEConfig(num_channels=(8, 16), num_res_channels=(8, 16), num_res_layers=1, num_embeddings=16,
                       embedding_dim=4, **kw)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_resnet_blocks_keep_shapes_and_norm_groups_fit_the_channels():
    assert group_norm(12, 32).num_groups == 12 and group_norm(64, 32).num_groups == 32
    assert group_norm(24, 16).num_groups == 12  # largest divisor of 24 that is <= 16
    x = torch.randn(2, 8, 4, 4)
    assert ResnetBlock(8, 16, 4)(x).shape == x.shape
    attn = AttnBlock(8, 4)
    torch.nn.init.zeros_(attn.proj.weight), torch.nn.init.zeros_(attn.proj.bias)
    assert torch.equal(attn(x), x)  # a zero output projection: the residual path alone


def test_attention_mixes_positions_and_resnet_vqvae_round_trips():
    torch.manual_seed(0)
    attn = AttnBlock(8, 4)
    x = torch.randn(1, 8, 4, 4)
    y = x.clone()
    y[..., 3, 3] += 1.0  # change one position: every output position changes (global attention)
    assert ((attn(x) - attn(y)).abs().amax(dim=1) > 0).all()
    model = VQVAE(small(vq_arch="resnet", vq_attention=True, norm_groups=4))
    assert any(isinstance(m, AttnBlock) for m in model.encoder) and any(isinstance(m, AttnBlock) for m in model.decoder)
    out = model(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert out.recon.shape == (2, 1, 32, 32) and out.indices.shape == (2, 8, 8)
    assert model.last_layer is model.decoder[-1].weight
    again = VQVAE(VQVAEConfig.from_dict(model.config.to_dict()))  # the export's config rebuilds the same model
    again.load_state_dict(model.state_dict())


def test_bad_lever_configs_are_refused():
    with pytest.raises(ConfigError, match="attention"):
        small(vq_attention=True).validate()
    with pytest.raises(ConfigError, match="arch"):
        small(vq_arch="vit").validate()


def test_l2_codebook_lives_on_the_unit_sphere():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(16, 4, l2_norm=True, init_kmeans_iters=2).train()
    z = torch.randn(4, 4, 6, 6) * 5  # (B, D, H, W), far from unit length
    for _ in range(3):
        out = q(z)
    assert torch.allclose(q.embedding.norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(4, 6, 6), atol=1e-5)  # straight-through of unit z
    # the nearest code is the one of highest cosine similarity, whatever the input's scale
    cos = torch.einsum("bdhw,kd->bkhw", torch.nn.functional.normalize(z, dim=1), q.embedding)
    assert torch.equal(q.indices_of(z), cos.argmax(1)) and torch.equal(q.indices_of(z), q.indices_of(z * 0.01))


def test_tokenizer_levers_train_export_and_resume_bitwise(tmp_path):
    levers = ["--vq_arch", "resnet", "--vq_attention", "--norm_groups", "8", "--codebook_l2", "--n_epochs", "2",
              "--sample_and_save_freq", "2"]

    def run(out, *extra):
        return vqvae_task.run(load_config(VQVAEStageConfig, [*TINY, *levers, "--output_dir", str(tmp_path / out),
                                                             *extra]))
    run("full", "--max_steps", "8")
    run("cut", "--max_steps", "5")
    run("cut", "--max_steps", "8", "--resume", "latest")
    model = VQVAE.from_export(tmp_path / "full/export")
    cfg = model.config
    assert cfg.vq_arch == "resnet" and cfg.vq_attention and cfg.norm_groups == 8 and cfg.codebook_l2
    assert torch.allclose(model.quantizer.embedding.norm(dim=1), torch.ones(32), atol=1e-5)
    a, b = (VQVAE.from_export(tmp_path / n / "export").state_dict() for n in ("full", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------------------------------------ prior
def tiny_prior(num_classes=3, **kw):
    from vqgen.config import PriorConfig
    from vqgen.models.prior import build_prior

    torch.manual_seed(0)
    return build_prior(PriorConfig(vocab_size=16, latent_h=3, latent_w=4, attn_layers_dim=32, attn_layers_depth=2,
                                   attn_layers_heads=2,
                             num_classes=num_classes, **kw)).eval()


def test_llama_prior_blocks_decode_with_the_cache_as_the_full_forward():
    p = tiny_prior(prior_norm="rms", prior_mlp="swiglu", rope=True)
    assert isinstance(p.ln_f, torch.nn.RMSNorm) and p.rope_angles.shape == (13, 8)  # (1 + h*w, head_dim // 2)
    torch.manual_seed(1)
    toks, lab = torch.randint(0, 16, (3, 12)), torch.tensor([0, 1, -1])
    with torch.no_grad():
        full = p(toks, lab).logits                                  # (3, 12, 16)
        labels = p.resolve_labels(lab, 3, toks.device)
        p.setup_caches(4, 12, torch.float32)
        steps = [p.prefill(toks[:, :5], labels)] + [p.decode_one_token(toks[:, i], i + 1) for i in range(5, 11)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], atol=1e-5, rtol=0)
        torch.testing.assert_close(p.logits_for_prefix(toks[:, :6], labels), full[:, 6], atol=1e-5, rtol=0)
        plain = tiny_prior(prior_norm="rms", prior_mlp="swiglu")
        plain.load_state_dict(p.state_dict())  # same weights (the angles are not saved): RoPE changes the logits
        assert not torch.allclose(plain(toks, lab).logits, full)


def test_swiglu_keeps_the_parameter_count_and_rope_needs_head_dim_divisible_by_4():
    from vqgen.config import PriorConfig
    from vqgen.models.prior import build_prior
    from vqgen.models.priors.blocks import rope_2d_table

    gelu, swiglu = (sum(q.numel() for q in tiny_prior(prior_mlp=m).parameters()) for m in ("gelu", "swiglu"))
    assert abs(swiglu - gelu) / gelu < 0.05
    assert torch.equal(rope_2d_table(3, 4, 8)[0], torch.zeros(4))  # the class token is not rotated
    with pytest.raises(ConfigError, match="rope"):
        build_prior(PriorConfig(vocab_size=16, latent_h=3, latent_w=4, attn_layers_dim=24, attn_layers_depth=1,
                                attn_layers_heads=4, rope=True))


def test_prior_weights_ema_is_exported_and_resumed_bitwise(stage2, tmp_path):
    from safetensors.torch import load_file

    from vqgen.config import PriorStageConfig
    from vqgen.export import load_export
    from vqgen.train import prior_task
    from vqgen.train.ema import FILE

    flags = ["--shards", str(stage2 / "shards"), "--attn_layers_dim", "32", "--attn_layers_depth", "2",
             "--attn_layers_heads", "2", "--no_wandb", "--num_samples", "4", "--val_batches", "2", "--n_epochs_t", "1",
             "--batch_size", "64", "--prior_ema_decay", "0.9", "--prior_norm", "rms", "--prior_mlp", "swiglu", "--rope",
             "--tune_sampling", "none"]

    def run(out, *extra):
        return prior_task.run(load_config(PriorStageConfig, [*flags, "--output_dir", str(tmp_path / out), *extra]))
    loop = run("full")  # one epoch (23 steps), then validation and a sample grid from the EMA weights
    assert list((tmp_path / "full/samples").glob("samples_epoch*.png"))
    run("cut", "--max_steps", "5")
    assert (tmp_path / "cut/checkpoints/checkpoint-5" / FILE).exists()
    run("cut", "--resume", "latest")
    exp = load_export(tmp_path / "full/export")
    assert exp.config["rope"] and exp.config["prior_norm"] == "rms" and exp.config["prior_mlp"] == "swiglu"
    raw, ema = loop.unwrapped_model.state_dict(), loop.task.ema.model.state_dict()
    assert all(torch.equal(exp.state_dict[k], ema[k]) for k in exp.state_dict)  # the export is the average ...
    assert any(not torch.equal(raw[k], ema[k]) for k in exp.state_dict)        # ... not the last weights
    a, b = (load_file(str(tmp_path / n / "export/model.safetensors")) for n in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # resumed EMA = uninterrupted EMA


def test_max_minutes_stops_like_max_steps_and_exports(tmp_path):
    """The benchmark's hard time stop: decided in the step's all-reduce, ends with a checkpoint and an export."""
    loop = vqvae_task.run(load_config(VQVAEStageConfig, [*TINY, "--n_epochs", "50", "--max_minutes", "0.0001",
                                                         "--output_dir", str(tmp_path / "run")]))
    assert loop.state.global_step == 1 and loop.state.finished
    assert (tmp_path / "run/checkpoints/checkpoint-1").is_dir() and (tmp_path / "run/export").is_dir()
