"""The VQGAN recipe of stage 1 (opt-in --disc_weight / --perceptual_weight): loss terms, disc_start gating, exact
resume with two optimizers, the refusals (DeepSpeed, fp16, missing LPIPS weights). The 2-process run is in
test_distributed.py. LPIPS runs here with RANDOM weights only (no VGG-16 file on this machine): a test of the
plumbing, not of perceptual quality."""

import importlib.util
import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from factories import TINY_VQVAE_FLAGS, tiny_vqvae
from vqgen.cli import run_cli
from vqgen.config import VQVAEStageConfig, load_config
from vqgen.errors import ConfigError
from vqgen.launch import check_extra_models
from vqgen.models import losses as L
from vqgen.models.discriminator import PatchDiscriminator
from vqgen.train import vqvae_task

TINY = [*TINY_VQVAE_FLAGS, "--n_epochs", "2", "--sample_and_save_freq", "2"]
GAN = ["--disc_weight", "0.5", "--disc_channels", "16"]
needs_lpips = pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="lpips not installed")


def train(tmp_path, *extra, out="run"):
    return vqvae_task.run(load_config(VQVAEStageConfig, [*TINY, "--output_dir", str(tmp_path / out), *extra]))


def weights(path):
    return load_file(str(path))


def assert_equal_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ loss terms
def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + .5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert L.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert L.hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    assert L.hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0  # margins met: no loss


def test_disc_factor_switches_on_at_disc_start():
    assert [L.disc_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert L.disc_factor(0, 0) == 1.0


def test_adaptive_weight_on_a_tiny_decoder_matches_autograd():
    model = tiny_vqvae().train()
    disc = PatchDiscriminator(1, 8, 2)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = model(x)
    rec = (out.recon - x).pow(2).mean()
    g = L.hinge_g_loss(disc(out.recon))
    w = L.adaptive_weight(L.last_layer_grads(rec, g, model.last_layer))
    # reference: the two gradients of the decoder's last layer through ordinary backward passes
    last = model.decoder[-1].weight
    rec.backward(retain_graph=True)
    g_rec, last.grad = last.grad.clone(), None
    g.backward(retain_graph=True)
    g_gan = last.grad.clone()
    assert w.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-5)
    assert not w.requires_grad and w.item() > 0
    # scaling the adversarial loss by 10 divides the weight by ~10 (up to the 1e-4): the product stays balanced
    w10 = L.adaptive_weight(L.last_layer_grads(rec, 10 * g, model.last_layer))
    assert w10.item() == pytest.approx((g_rec.norm() / (10 * g_gan.norm() + 1e-4)).item(), rel=1e-5)
    assert w10.item() == pytest.approx(w.item() / 10, rel=1e-2)


@pytest.mark.parametrize("n_layers,size,patches", [(2, 32, 6), (3, 32, 2), (2, 16, 2)])
def test_patchgan_logit_grid(n_layers, size, patches):
    for norm in ("batch", "group"):
        d = PatchDiscriminator(1, 8, n_layers, norm)
        assert d(torch.randn(2, 1, size, size)).shape == (2, 1, patches, patches)
    with pytest.raises(ConfigError):
        PatchDiscriminator(1, 8, 2, norm="instance")


# ------------------------------------------------------------------------------------------------ training
def test_before_disc_start_no_gan_term_no_disc_step(tmp_path):
    """Steps 0 and 1 precede --disc_start 2: the run is bitwise the plain VQ-VAE's and the discriminator and its
    optimizer are untouched; step 2 trains both."""
    train(tmp_path, "--max_steps", "2", "--checkpointing_steps", "1", out="plain")
    train(tmp_path, *GAN, "--disc_start", "2", "--max_steps", "3", "--checkpointing_steps", "1", out="gan")
    ck = tmp_path / "gan/checkpoints"
    assert_equal_state(weights(tmp_path / "plain/checkpoints/checkpoint-2/model.safetensors"),
                       weights(ck / "checkpoint-2/model.safetensors"))
    assert_equal_state(weights(ck / "checkpoint-1/model_1.safetensors"),
                       weights(ck / "checkpoint-2/model_1.safetensors"))
    assert torch.load(ck / "checkpoint-2/optimizer_1.bin", weights_only=True)["state"] == {}
    d2, d3 = weights(ck / "checkpoint-2/model_1.safetensors"), weights(ck / "checkpoint-3/model_1.safetensors")
    assert any(not torch.equal(d2[k], d3[k]) for k in d2 if d2[k].is_floating_point())
    assert torch.load(ck / "checkpoint-3/optimizer_1.bin", weights_only=True)["state"] != {}
    first = json.loads((tmp_path / "gan/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and "d_loss" not in first and "g_loss" not in first


def test_vqgan_resume_after_max_steps_is_bitwise_exact(tmp_path):
    # 1500 digits / 128 -> 12 steps per epoch; the disc starts at step 3; cut at step 7 (mid-epoch), resume to 16
    gan = [*GAN, "--disc_start", "3", "--checkpointing_steps", "4"]
    train(tmp_path, *gan, "--max_steps", "16", out="full")
    train(tmp_path, *gan, "--max_steps", "7", out="cut")
    train(tmp_path, *gan, "--max_steps", "16", "--resume", "latest", out="cut")
    a, b = tmp_path / "full", tmp_path / "cut"
    assert_equal_state(weights(a / "export/model.safetensors"), weights(b / "export/model.safetensors"))
    ca, cb = a / "checkpoints/checkpoint-16", b / "checkpoints/checkpoint-16"
    assert_equal_state(weights(ca / "model_1.safetensors"), weights(cb / "model_1.safetensors"))  # discriminator
    oa, ob = (torch.load(c / "optimizer_1.bin", weights_only=True)["state"] for c in (ca, cb))
    assert oa.keys() == ob.keys() and oa
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][name], ob[k][name]), (k, name)
    state = json.loads((cb / "vqgen_state.json").read_text())
    assert len(state["other_schedulers"]) == 1  # the discriminator's learning-rate schedule


def test_refusals_leave_nothing_written(tmp_path, capsys):
    for bad, message in ((["--disc_weight", "-1"], "--disc_weight must be >= 0"),
                         (["--disc_weight", "0.5", "--disc_layers", "0"], "--disc_layers must be > 0"),
                         (["--disc_lr", "0"], "--disc_lr must be > 0")):
        out = tmp_path / "bad"
        argv = [*TINY, "--output_dir", str(out), *bad]
        assert run_cli(vqvae_task.run, VQVAEStageConfig, argv) == 2
        assert message in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse's own choice check
        load_config(VQVAEStageConfig, [*TINY, "--output_dir", str(tmp_path / "bad"), "--disc_loss", "vanilla"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_deepspeed_and_fp16_are_refused_with_a_second_model():
    from accelerate.utils import DistributedType

    disc = [PatchDiscriminator(1, 8, 2)]
    with pytest.raises(ConfigError, match="DeepSpeed"):
        check_extra_models(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision="bf16"), disc)
    with pytest.raises(ConfigError, match="fp16"):
        check_extra_models(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, mixed_precision="fp16"), disc)
    check_extra_models(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, mixed_precision="bf16"), disc)
    check_extra_models(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision="fp16"), [])


# ------------------------------------------------------------------------------------------------ LPIPS
def test_perceptual_weight_without_vgg_weights_fails_fast(tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert run_cli(vqvae_task.run, VQVAEStageConfig, [*TINY, "--output_dir", str(out), "--perceptual_weight", "1",
                                                      "--lpips_weights", str(tmp_path / "missing.pth")]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "VGG-16" in err and "never downloads" in err and not out.exists()


@needs_lpips
def test_perceptual_loss_code_path_with_random_weights():
    torch.manual_seed(0)
    p = L.PerceptualLoss(random_backbone=True)
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    assert p(x, x.detach()).item() == pytest.approx(0.0, abs=1e-6)
    other = p(x, torch.rand(2, 1, 32, 32))
    assert other.item() > 0
    other.backward()
    assert x.grad is not None and not any(q.requires_grad for q in p.parameters())


@needs_lpips
def test_perceptual_loss_loads_a_vgg_file_and_trains(tmp_path):
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)  # random weights in torchvision's file format
    torch.save(vgg.state_dict(), tmp_path / L.VGG16_FILE)
    p = L.PerceptualLoss(backbone=tmp_path / L.VGG16_FILE)
    assert torch.equal(next(p.net.net.slice1.parameters()), vgg.features[0].weight)
    train(tmp_path, "--perceptual_weight", "0.1", "--lpips_weights", str(tmp_path / L.VGG16_FILE), "--max_steps", "2")
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert first["lpips"] > 0
