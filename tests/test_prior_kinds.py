"""Priors beyond raster order: the AR prior trained in random orders (RAR), the MaskGIT prior, the power CFG schedule.

What is checked: the schedules' values (order annealing, cosine masking, CFG power), KV-cache decoding equals the full
forward of a model trained in random orders, MaskGIT decoding keeps every token it unmasked and decodes in
``decode_steps`` forward passes, a MaskGIT export round trip through ``load_prior``, ``--decode_steps`` refused for an
AR prior and bad values refused with one error line. Training runs (resume, processes) are in test_reliability.py and
test_distributed.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqgen.cli import run_cli
from vqgen.config import PipelineConfig, PriorConfig, PriorStageConfig, SampleConfig, load_config
from vqgen.errors import ConfigError
from vqgen.export import ExportMeta
from vqgen.models.prior import IGNORE, build_prior, load_prior, token_cross_entropy
from vqgen.models.sampling import generate, guidance_at
from vqgen.shards import Manifest


def tiny(kind="ar", num_classes=3, **kw):
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=16, latent_h=3, latent_w=4, attn_layers_dim=32, attn_layers_depth=2,
                      attn_layers_heads=4, num_classes=num_classes, prior_kind=kind, **kw)
    return build_prior(cfg)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, 12), generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------------------------------------- schedules
def test_order_annealing_schedule():
    cfg = PriorConfig(order="random", order_anneal_start=0.5, order_anneal_end=0.75)
    values = [cfg.random_order_share(p) for p in (None, 0.0, 0.25, 0.5, 0.5625, 0.625, 0.6875, 0.75, 0.9, 1.0)]
    assert values == [1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert PriorConfig(order="raster").random_order_share(0.0) == 0.0
    step = PriorConfig(order="random", order_anneal_start=0.3, order_anneal_end=0.3)   # a step from 1 to 0
    assert (step.random_order_share(0.29), step.random_order_share(0.3)) == (1.0, 0.0)


def test_power_cfg_schedule_is_rars():
    n, scale = 64, 4.0
    for power in (0.5, 1.0, 2.75):
        for i in (0, 1, 17, 63):
            rar = (1 - math.cos(((i / n) ** power) * math.pi)) / 2 * (scale - 1) + 1   # RAR generate()
            assert guidance_at(scale, "power", i, n, power) == pytest.approx(rar)
    assert guidance_at(scale, "power", 0, n, 2.75) == 1.0
    assert [guidance_at(scale, "power", i, n, 0.0) for i in (0, 5, 63)] == [scale] * 3   # power 0: constant
    ramp = [guidance_at(scale, "power", i, n, 2.75) for i in range(n)]
    assert ramp == sorted(ramp) and ramp[n // 2] < 1 + (scale - 1) / 2   # a higher power guides later


def test_maskgit_training_masks_follow_the_cosine_schedule():
    p = tiny("maskgit").train()
    torch.manual_seed(0)
    masks = p.mask_positions(4000, torch.device("cpu"))                     # (B, T) bool
    counts = masks.sum(1).double()
    assert int(counts.min()) >= 1 and int(counts.max()) <= 12
    # count = ceil(cos(pi/2 r) T), r ~ U[0, 1): P(count <= k) = 1 - 2/pi * acos(k / T)
    for k in (3, 6, 9, 11):
        expected = 1 - 2 / math.pi * math.acos(k / 12)
        assert float((counts <= k).double().mean()) == pytest.approx(expected, abs=0.03)
    # every position equally likely to be masked
    share = masks.double().mean(0)
    assert float(share.max() - share.min()) < 0.06
    # scored targets are the masked tokens only
    toks, lab = batch()
    out = p(toks, lab)
    scored = out.targets != IGNORE
    assert torch.equal(out.targets[scored], toks[scored]) and bool(scored.any(1).all())


def test_maskgit_decoding_schedule():
    p = tiny("maskgit")
    for steps in (1, 4, 8, 12, 30):
        left, unknown = [], 12
        for s in range(steps):
            unknown = p.masked_after(s, steps, unknown)
            left.append(unknown)
        assert left[-1] == 0 and all(a > b for a, b in zip([12] + left, left) if a > 1), (steps, left)
    # 8 steps over 12 tokens: floor(12 cos(pi/2 k/8)) = 11, 11 -> 10 (one fewer each step), 9, 8, 6, 4, 2, then 0
    left, unknown = [], 12
    for s in range(8):
        unknown = p.masked_after(s, 8, unknown)
        left.append(unknown)
    assert left == [11, 10, 9, 8, 6, 4, 2, 0]


# ----------------------------------------------------------------------------------------------- AR, random order
def test_random_order_training_permutes_rows_and_scores_every_token():
    p = tiny("ar", order="random").train()
    toks, lab = batch()
    torch.manual_seed(3)
    out = p(toks, lab, progress=0.0)                        # before the annealing window: every row permuted
    assert not torch.equal(out.targets, toks)
    assert torch.equal(out.targets.sort(1).values, toks.sort(1).values)   # each row: a permutation of its tokens
    torch.manual_seed(3)
    assert torch.equal(p(toks, lab, progress=0.0).logits, out.logits)    # torch's RNG decides: reproducible
    assert torch.equal(p(toks, lab, progress=0.8).targets, toks)         # after it: raster
    assert torch.equal(p.eval()(toks, lab, progress=0.0).targets, toks)  # validation: raster


@pytest.mark.parametrize("rope", [False, True])
def test_random_order_trained_prior_cache_equals_full_forward(rope):
    """After training in random orders, raster-order decoding with the KV cache (target positions added at every
    step) gives the logits of the full forward pass, and sampling with and without the cache the same tokens."""
    p = tiny("ar", order="random", rope=rope).train()
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    for step in range(5):
        toks, lab = batch(seed=step)
        out = p(toks, lab, progress=step / 10)
        loss = token_cross_entropy(out.logits, out.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.eval()
    toks, lab = batch(3, seed=9)
    with torch.no_grad():
        full = p(toks, lab).logits                                         # (3, 12, 16)
        labels = p.resolve_labels(lab, 3, toks.device)
        p.setup_caches(3, 12, torch.float32)
        steps = [p.prefill(toks[:, :0], labels)]
        for i in range(11):
            steps.append(p.decode_one_token(toks[:, i], i + 1))
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    outs = [generate(p, 4, labels=[0, 1, 2, -1], cfg_scale=2.0, cfg_schedule="power", cfg_power=1.5,
                     generator=torch.Generator().manual_seed(5), use_cache=c) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_raster_prior_unchanged_by_the_order_settings():
    """A raster-order prior has no target-aware table and loads exports that predate --order."""
    p = tiny("ar")
    assert p.target_pos_emb is None and p.pos_emb.shape[1] == 12
    q = tiny("ar", order="random")
    assert q.target_pos_emb.shape[1] == 12 and q.pos_emb.shape[1] == 13
    old = {k: v for k, v in p.config.to_dict().items() if k not in ("order", "order_anneal_start",
                                                                     "order_anneal_end")}
    assert PriorConfig.from_dict(old).order == "raster"


# ------------------------------------------------------------------------------------------------------ MaskGIT
class Recorder:
    """Wraps ``MaskGITPrior.logits`` to record the input of every decoding step."""

    def __init__(self, prior):
        self.inputs, self._logits = [], prior.logits
        prior.logits = self

    def __call__(self, tokens, labels):
        self.inputs.append(tokens.clone())
        return self._logits(tokens, labels)


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, top_k=3,
                                                                                     top_p=0.9)])
def test_maskgit_decoding_keeps_every_unmasked_token(steps, kw):
    p = tiny("maskgit").eval()
    rec = Recorder(p)
    out = generate(p, 5, labels=[0, 1, 2, -1, 1], cfg_scale=3.0, cfg_schedule="linear", decode_steps=steps,
                   generator=torch.Generator().manual_seed(2), **kw).reshape(5, 12)
    assert len(rec.inputs) == steps                                     # one forward pass (cond ‖ null) per step
    mask = p.mask_id
    assert bool((out != mask).all()) and int(out.max()) < 16
    seen = [x[:5] for x in rec.inputs] + [out]                           # the cond half of each step's input, then out
    assert bool((seen[0] == mask).all())
    for a, b in zip(seen, seen[1:]):
        known = a != mask
        assert torch.equal(b[known], a[known])                         # a kept token never changes
        assert int((b != mask).sum(1).min()) > int(known.sum(1).max()) or int(known.sum(1).max()) == 11
    counts = [int((x != mask).sum(1)[0]) for x in seen]
    assert counts == sorted(counts) and counts[-1] == 12


def test_maskgit_sampling_is_reproducible_and_the_options_matter():
    p = tiny("maskgit").eval()
    a = generate(p, 4, labels=[0, 1, 2, 0], generator=torch.Generator().manual_seed(1))
    b = generate(p, 4, labels=[0, 1, 2, 0], generator=torch.Generator().manual_seed(1))
    c = generate(p, 4, labels=[0, 1, 2, 0], generator=torch.Generator().manual_seed(1), decode_steps=3,
                 choice_temperature=0.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 3, 4)


def test_maskgit_validation_score_is_repeatable_and_named_as_masked(tmp_path):
    p = tiny("maskgit").eval()
    toks, lab = batch()
    with torch.no_grad():
        a, b = p(toks, lab), p(toks, lab)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.targets, b.targets)
    assert not p.exact_likelihood and p.nll_name == "masked_bits_per_token"
    assert tiny("ar").nll_name == "bits_per_token"


def test_maskgit_export_round_trip_through_load_prior(tmp_path):
    p = tiny("maskgit", rope=True, prior_norm="rms", prior_mlp="swiglu").eval()
    p.export_to(tmp_path / "export", meta=ExportMeta(tokenizer_sha256="abc"))
    q = load_prior(tmp_path / "export")
    assert type(q).__name__ == "MaskGITPrior" and q.config == p.config and q.config.prior_kind == "maskgit"
    assert "order" not in q.config.to_dict()                             # the AR kind's settings are not recorded
    toks, lab = batch()
    with torch.no_grad():
        torch.testing.assert_close(q(toks, lab).logits, p(toks, lab).logits, atol=0, rtol=0)
    g = [torch.Generator().manual_seed(4) for _ in range(2)]
    assert torch.equal(generate(p, 3, labels=[0, 1, 2], cfg_scale=2.0, generator=g[0]),
                       generate(q, 3, labels=[0, 1, 2], cfg_scale=2.0, generator=g[1]))


def test_unconditional_priors_spend_nothing_on_classes():
    for kind in ("ar", "maskgit"):
        p = tiny(kind, num_classes=0, class_dropout=0.5).train()
        assert p.cls_emb.num_embeddings == 1                             # the start token only
        toks, _ = batch()
        torch.manual_seed(0)
        a = p(toks, None).logits
        torch.manual_seed(0)
        assert torch.equal(p(toks, torch.full((8,), -1)).logits, a)     # no class dropout draws


# ----------------------------------------------------------------------------------------------- refused settings
def test_decode_steps_refused_for_ar_priors(stage2, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--decode_steps is a sampling setting of --prior_kind maskgit"):
        generate(tiny("ar").eval(), 2, decode_steps=4)
    with pytest.raises(ConfigError, match="--choice_temperature"):
        generate(tiny("ar").eval(), 2, choice_temperature=1.0)
    with pytest.raises(ConfigError, match="--decode_steps"):
        load_config(PriorStageConfig, ["--shards", "s", "--output_dir", "o", "--decode_steps", "4"]).check()
    load_config(PriorStageConfig, ["--shards", "s", "--output_dir", "o", "--decode_steps", "4",
                                   "--prior_kind", "maskgit"]).check()
    with pytest.raises(ConfigError, match="--decode_steps"):
        load_config(PipelineConfig, ["--train", "--decode_steps", "4"]).check()
    # sample.py with an AR export: one error line, exit 2, nothing written
    build_prior(PriorConfig(vocab_size=32, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                            attn_layers_heads=2)).export_to(tmp_path / "ar")   # fits the stage2 tokenizer
    from vqgen import sample
    out = tmp_path / "s"
    capsys.readouterr()
    code = run_cli(sample.run, SampleConfig, ["--checkpoint", str(stage2 / "tok"), "--checkpoint_t",
                                              str(tmp_path / "ar"), "--output_dir", str(out), "--decode_steps", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "--decode_steps" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv,msg", [
    (["--order", "random", "--order_anneal_start", "0.8", "--order_anneal_end", "0.5"], "order_anneal_start"),
    (["--order_anneal_end", "1.5"], "order_anneal"),
    (["--prior_kind", "maskgit", "--order", "random"], "--order is a setting of --prior_kind ar"),
    (["--decode_steps", "0", "--prior_kind", "maskgit"], "decode_steps must be >= 1"),
    (["--choice_temperature", "-1", "--prior_kind", "maskgit"], "choice_temperature must be >= 0"),
    (["--cfg_schedule", "power", "--cfg_power", "-1"], "cfg_power must be >= 0"),
])
def test_bad_values_refused_with_one_error_line(tmp_path, capsys, argv, msg):
    from vqgen.train import prior_task
    out = tmp_path / "p"
    code = run_cli(prior_task.run, PriorStageConfig, ["--shards", str(tmp_path / "none"), "--output_dir", str(out),
                                                      *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and msg in err and "Traceback" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ unconditional samples
def test_label_modes():
    from vqgen.models.sampling import class_labels
    p = tiny("ar").eval()
    assert class_labels(p, 5, None).tolist() == [0, 1, 2, 0, 1]
    assert class_labels(p, 3, None, unconditional=True) is None               # the null class
    assert class_labels(p, 3, 2, "frequencies", class_counts=[1] * 3).tolist() == [2, 2, 2]   # --class_label wins
    with pytest.raises(ConfigError, match="records no class frequencies"):
        class_labels(p, 4, None, "frequencies")
    p.export_meta = ExportMeta(shards={"class_counts": [0, 9, 1]})
    a = class_labels(p, 2000, None, "frequencies", seed=3)
    assert torch.equal(a, class_labels(p, 2000, None, "frequencies", seed=3))   # seeded
    assert not torch.equal(a, class_labels(p, 2000, None, "frequencies", seed=4))
    assert int((a == 0).sum()) == 0 and 0.85 < float((a == 1).double().mean()) < 0.95
    assert class_labels(tiny("ar", num_classes=0), 3, None, "frequencies") is None   # unconditional: no labels
    # only null rows: guidance changes nothing and is skipped (the same tokens as scale 1)
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert torch.equal(generate(p, 3, labels=[-1] * 3, cfg_scale=4.0, generator=g[0]),
                       generate(p, 3, labels=None, generator=g[1]))


def test_trained_prior_records_class_frequencies_and_ignore_labels(stage2, tmp_path):
    from vqgen import sample
    from vqgen.train import prior_task
    man_counts = Manifest.read(stage2 / "shards").splits["train"].class_counts
    assert sum(man_counts) == 1500 and len(man_counts) == 10
    flags = ["--shards", str(stage2 / "shards"), "--checkpoint", str(stage2 / "tok"), "--attn_layers_dim", "16",
             "--attn_layers_depth", "1", "--attn_layers_heads", "2", "--no_wandb", "--max_steps", "2",
             "--batch_size", "64", "--num_samples", "4", "--label_mode", "frequencies"]
    for kind in ("ar", "maskgit"):
        out = tmp_path / kind
        prior_task.run(load_config(PriorStageConfig, [*flags, "--prior_kind", kind, "--output_dir", str(out)]))
        p = load_prior(out / "export")
        assert p.config.num_classes == 10 and p.export_meta.shards["class_counts"] == man_counts
        smp = tmp_path / f"s_{kind}"
        assert run_cli(sample.run, SampleConfig, ["--checkpoint", str(stage2 / "tok"), "--checkpoint_t",
                                                  str(out / "export"), "--output_dir", str(smp), "--num_samples", "6",
                                                  "--label_mode", "frequencies", "--cfg_scale", "2", "--no_png"]) == 0
        labels = np.load(smp / "labels.npy")
        assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 10
    out = tmp_path / "unlabelled"
    prior_task.run(load_config(PriorStageConfig, [*flags[:-2], "--ignore_labels", "--output_dir", str(out)]))
    p = load_prior(out / "export")
    assert p.config.num_classes == 0 and p.cls_emb.num_embeddings == 1 and p.export_meta.shards["class_counts"] is None


def test_pipeline_passes_the_kind_and_its_sampling_on():
    """VQVAE_T.py --train --sample: the prior stage trains the kind asked for, sampling and grids get its settings."""
    from vqgen.pipeline import stage_configs
    cfg = load_config(PipelineConfig, ["--train", "--sample", "--prior_kind", "maskgit", "--decode_steps", "4",
                                       "--choice_temperature", "2", "--cfg_schedule", "power", "--cfg_power", "1.5",
                                       "--label_mode", "frequencies"])
    cfg.check()
    st = stage_configs(cfg)
    assert st["prior"].model.prior_kind == "maskgit"
    for sc in (st["prior"].sampling, st["sample"].sampling):
        assert (sc.decode_steps, sc.choice_temperature, sc.cfg_schedule, sc.cfg_power, sc.label_mode) == \
            (4, 2.0, "power", 1.5, "frequencies")
    ar = stage_configs(load_config(PipelineConfig, ["--train", "--order", "random", "--order_anneal_end", "0.9"]))
    assert (ar["prior"].model.order, ar["prior"].model.order_anneal_end) == ("random", 0.9)



def test_training_passes_the_run_progress_to_the_prior(stage2, tmp_path, monkeypatch):
    """train_prior.py hands each step's progress (steps done / the run's steps) to forward, resumed runs included."""
    from vqgen.models.priors.ar import ARPrior
    from vqgen.train import prior_task
    seen = []
    original = ARPrior._training_orders

    def record(self, batch, progress, device):
        seen.append(progress)
        return original(self, batch, progress, device)
    monkeypatch.setattr(ARPrior, "_training_orders", record)
    flags = ["--shards", str(stage2 / "shards"), "--attn_layers_dim", "16", "--attn_layers_depth", "1",
             "--attn_layers_heads", "2", "--no_wandb", "--batch_size", "64", "--order", "random",
             "--sample_and_save_freq", "100", "--output_dir", str(tmp_path / "p"), "--max_steps", "4",
             "--checkpointing_steps", "2"]
    prior_task.run(load_config(PriorStageConfig, flags))
    assert seen == [0.0, 0.25, 0.5, 0.75]
    seen.clear()
    (tmp_path / "p/checkpoints/checkpoint-4").rename(tmp_path / "p/checkpoints/.gone")   # resume from step 2
    prior_task.run(load_config(PriorStageConfig, [*flags, "--resume", "latest"]))
    assert seen == [0.5, 0.75]
