"""Speed at default flags (vqgen/perf.py): the allocator setting stops per-step page faults in the trainers, the
device-dependent precision defaults, the exact lookup-table image transform, and the default-flag speed benchmark.
No timing is asserted: page-fault counts and chosen settings are."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vqgen import launch, perf
from vqgen.config import PriorStageConfig, VQVAEStageConfig, load_config
from vqgen.data.transforms import ImageTransform, convert_mode
from vqgen.train import vqvae_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--num_channels", "8", "8", "--num_res_channels", "8", "8", "--num_res_layers", "1",
        "--num_embeddings", "16", "--embedding_dim", "4", "--no_wandb", "--val_images", "16", "--max_steps", "2"]

# A training step's pattern: a 48 MB buffer allocated, written, freed, again. Faults per buffer after a warm-up
# (glibc reuses a freed chunk once its free neighbours have coalesced). "train": after a real vqgen training run,
# which must have applied the setting; "keep": perf.keep_freed_memory() alone; "default": glibc as it comes.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from vqgen import perf
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "keep":
        perf.keep_freed_memory()
    elif mode == "train":
        from vqgen.config import VQVAEStageConfig
        from vqgen.config import load_config
        from vqgen.train import vqvae_task
        vqvae_task.run(load_config(VQVAEStageConfig, sys.argv[3:] + ["--output_dir", out]))
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(48 * 2**20 // 4)
    before = faults()
    for _ in range(10):
        torch.ones(48 * 2**20 // 4)
    print((faults() - before) / 10)
""")


def _faults_per_buffer(mode: str, tmp_path, *argv) -> float:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, str(tmp_path / mode), *argv], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(perf._glibc() is None, reason="glibc only")
def test_trainer_keeps_freed_memory_instead_of_refaulting_it(tmp_path):
    """glibc as it comes page-faults each freed 48 MB buffer in again (12288 4-KB pages); after keep_freed_memory,
    and in a process that ran a vqgen trainer, the freed memory is reused (steady state: ~no faults)."""
    assert _faults_per_buffer("default", tmp_path) > 10_000
    assert _faults_per_buffer("keep", tmp_path) < 100
    assert _faults_per_buffer("train", tmp_path, *TINY, "--data_dir", str(tmp_path / "data")) < 100


def test_keep_freed_memory_leaves_user_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert perf.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert perf.keep_freed_memory() is False


def test_amx_detection_matches_the_cpu_flags():
    """torch's cpuinfo and the kernel's flags agree on AMX-BF16 (this development box, AMD Zen 3, has none)."""
    flags = next((ln.split() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), [])
    assert perf.cpu_has_amx_bf16() == ("amx_bf16" in flags)


@pytest.mark.parametrize("amx, cuda, stage, device, expected", [
    (True, False, "vqvae", "cpu", "bf16"),   # AMX: bf16 + channels_last VQ-VAE step measured 4.0x fp32
    (True, False, "prior", "cpu", "no"),     # the small prior is overhead-bound: bf16 ~2x slower even on AMX
    (False, False, "vqvae", "cpu", "no"),    # AVX2 only (AMD Zen 3 here): bf16 is emulated, 10-15x slower
    (False, False, "prior", "cpu", "no"),
    (False, True, "prior", "cuda", "bf16"),
    (False, True, "vqvae", "cuda", "bf16"),
    (False, False, "vqvae", "cuda", "no"),   # a pre-Ampere GPU: no bf16 tensor cores
    (True, False, "vqvae", "other", "no"),   # MPS/XPU...: not measured
])
def test_default_mixed_precision(monkeypatch, amx, cuda, stage, device, expected):
    monkeypatch.setattr(perf, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(perf, "cuda_has_native_bf16", lambda: cuda)
    assert perf.default_mixed_precision(stage, device) == expected
    assert perf.default_channels_last(expected) == (expected == "bf16")


def test_resolve_mixed_precision_respects_flag_and_launcher(monkeypatch):
    monkeypatch.setattr(perf, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    base = ["--output_dir", "x"]
    train = load_config(VQVAEStageConfig, base).train
    assert train.mixed_precision is None
    assert launch.resolve_mixed_precision(train, "vqvae") == "bf16" and train.mixed_precision == "bf16"
    prior = load_config(PriorStageConfig, ["--shards", "s", *base]).train
    assert launch.resolve_mixed_precision(prior, "prior") == "no"  # the prior stays fp32 on CPU, even with AMX
    train = load_config(VQVAEStageConfig, [*base, "--mixed_precision", "no"]).train
    assert launch.resolve_mixed_precision(train, "vqvae") == "no"  # an explicit flag wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no` / its config
    train = load_config(VQVAEStageConfig, base).train
    assert launch.resolve_mixed_precision(train, "vqvae") == "no" and train.mixed_precision is None


def test_channels_last_flag_is_tristate():
    base = ["--output_dir", "x"]
    assert load_config(VQVAEStageConfig, base).channels_last is None  # decided at run time
    assert load_config(VQVAEStageConfig, [*base, "--channels_last"]).channels_last is True
    assert load_config(VQVAEStageConfig, [*base, "--no_channels_last"]).channels_last is False


def test_cpu_without_amx_trains_in_fp32_by_default(tmp_path, monkeypatch):
    """On a CPU without AMX the defaults are fp32 and NCHW (bf16 would be emulated, 10-15x slower), with the fused
    AdamW; the resolved values are recorded in the run's config.yaml."""
    monkeypatch.setattr(perf, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = load_config(VQVAEStageConfig, [*TINY, "--output_dir", str(tmp_path / "run")])
    loop = vqvae_task.run(cfg)
    assert loop.accelerator.mixed_precision == "no" and cfg.channels_last is False
    conv = next(p for p in loop.unwrapped_model.parameters() if p.dim() == 4 and p.shape[1] > 1)  # (out, in, k, k)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert loop.optimizers[0].optimizer.defaults["fused"] is True
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "mixed_precision: 'no'" in saved
    assert "channels_last: false" in saved


def _reference(size: int, channels: int):
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "1"])
@pytest.mark.parametrize("size_in, size_out", [((28, 28), 32), ((32, 32), 32), ((40, 31), 16), ((17, 64), 24)])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_transform_is_bitwise_torchvisions(mode, size_in, size_out, channels):
    """The lookup-table ToTensor + Normalize (and the skipped no-op resize) give exactly torchvision's items."""
    rng = np.random.default_rng(sum(size_in) + size_out)
    img = Image.fromarray(rng.integers(0, 256, (size_in[1], size_in[0], 3), dtype=np.uint8), "RGB")
    img = Image.fromarray(rng.integers(0, 65535, size_in[::-1]).astype(np.uint16)) if mode == "I;16" else \
        img.convert(mode)
    want = _reference(size_out, channels)(convert_mode(img, channels).convert("L" if channels == 1 else "RGB"))
    got = ImageTransform(size_out, channels)(img)
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, want)


@pytest.mark.slow
def test_default_speed_benchmark_prints_ratios(tmp_path):
    """bench/default_speed.py runs the real trainer, the original recipe and a plain loop and prints the ratios."""
    out = subprocess.run([sys.executable, "bench/default_speed.py", "--cases", "vq32s", "--steps", "1", "--warmup",
                          "1", "--data_dir", str(tmp_path), "--threads", "1", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR" not in out.stdout, out.stdout
    ratio_lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| vq32s |") and ln.count("x |") == 4]
    assert len(ratio_lines) == 1, out.stdout
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]["vq32s"]
    assert all(summary[impl]["cpu_ms"] > 0 for impl in ("vqgen", "original", "plain"))
