"""Test-wide settings: offline, CPU, no wandb network, small thread pools (CI has 2 cores)."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import sys
from pathlib import Path

import pytest

from factories import tiny_vqvae  # noqa: E402  (shared builder; re-exported for old imports)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def stage2(tmp_path_factory):
    """``d/tok``: a tiny tokenizer export; ``d/shards``: its digits token shards (train 3 shards, test 1)."""
    from vqgen import extract
    from vqgen.cli import run_cli
    from vqgen.config import ExtractConfig

    d = tmp_path_factory.mktemp("stage2")
    tiny_vqvae().export_to(d / "tok")
    argv = ["--checkpoint", str(d / "tok"), "--dataset", "digits", "--data_dir", str(d / "data"), "--output",
            str(d / "shards"), "--split", "train", "test", "--batch_size", "512", "--shard_size", "500",
            "--no_progress"]
    assert run_cli(extract.run, ExtractConfig, argv) == 0
    return d
