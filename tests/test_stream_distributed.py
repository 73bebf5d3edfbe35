"""Streamed stage-1 input and extraction from streams, on 2 CPU processes through the real `accelerate launch`.

Checked: both ranks train from WebDataset shards (one series of checkpoint RNG files per rank), a run stopped
mid-epoch and resumed with --resume latest ends with bitwise the same weights as the uninterrupted run, and the
stream extraction writes disjoint per-rank shards that cover the split exactly once (also after a resume).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import ACCELERATE, ROOT, cpu2, run
from test_streaming import make_tars
from vqgen import shards

TINY = ["--num_channels", "8", "16", "--num_res_channels", "8", "16", "--num_res_layers", "1",
        "--num_embeddings", "16", "--embedding_dim", "4", "--no_wandb", "--val_images", "16", "--lr", "1e-3",
        "--restart_every", "1000", "--image_size", "16", "--batch_size", "4", "--num_workers", "1",
        "--shuffle_buffer", "8", "--random_crop", "--hflip", "--sample_and_save_freq", "100",
        "--lr_schedule", "constant"]  # constant: the runs are cut with --max_steps, the default cosine's horizon too

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not installed")


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "export/model.safetensors"))


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_process_streamed_training_and_exact_resume(tmp_path):
    spec = make_tars(tmp_path / "wds", [13, 9, 11], size=16)   # 33 samples, unequal shards
    common = [str(ROOT / "train_vqvae.py"), "--dataset", spec, *TINY, "--n_epochs", "2"]
    # 2 ranks x 1 worker: 16 samples per reader per epoch -> 4 batches per rank per epoch, 8 steps in all
    full = run([*cpu2(), *common, "--output_dir", str(tmp_path / "full")], timeout=300)
    log = full.stdout + full.stderr
    assert "processes = 2" in log and "batches/epoch/process = 4" in log
    ck = tmp_path / "full/checkpoints/checkpoint-8"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ck.iterdir()}
    state = json.loads((ck / "vqgen_state.json").read_text())
    assert state["extra"]["data"] == {"input": "stream", "world_size": 2, "num_workers": 1, "batch_size": 4,
                                      "batches_per_epoch": 4}
    # stopped mid-epoch 2 (step 6 = 2 batches into the second epoch), then resumed
    run([*cpu2(), *common, "--max_steps", "6", "--output_dir", str(tmp_path / "cut")], timeout=300)
    cut_state = json.loads((tmp_path / "cut/checkpoints/checkpoint-6/vqgen_state.json").read_text())
    assert (cut_state["epoch"], cut_state["batches_done"]) == (1, 2)
    resumed = run([*cpu2(), *common, "--resume", "latest", "--output_dir", str(tmp_path / "cut")], timeout=300)
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bitwise exact"


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_process_extraction_from_a_stream_is_disjoint_complete_and_resumable(tmp_path):
    from factories import shard_samples, tiny_vqvae
    spec = make_tars(tmp_path / "wds", [7, 6, 8], size=16)     # 21 samples
    tiny_vqvae().export_to(tmp_path / "tok")  # 1 channel, 16 px: the stream is converted to it
    out = tmp_path / "shards"
    args = [str(ROOT / "extract_codes.py"), "--checkpoint", str(tmp_path / "tok"), "--dataset", spec,
            "--split", "val", "--output", str(out), "--batch_size", "3", "--shard_size", "4",
            "--num_workers", "2", "--no_progress"]
    run([*cpu2(), *args], timeout=300)
    entry = shards.Manifest.read(out).splits["val"]
    assert entry.total == 21 and entry.order_seed is None                   # streams keep their order
    keys = {}
    for s in entry.shards:
        rank = int(s.name.split("-r")[1][:3])
        for sample in shard_samples(out / s.name):
            keys.setdefault(rank, []).append(int(sample["__key__"]))
            assert int(sample["cls"]) == int(sample["__key__"])       # the label of the source image
    assert set(keys) == {0, 1} and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == list(range(21))
    # a rerun finds everything done; after removing rank 1's last shard + record it redoes only that part
    first = {s.name: s.sha256 for s in entry.shards}
    part = out / ".parts" / "val-r001.json"
    rec = json.loads(part.read_text())
    gone = rec["shards"].pop()
    rec["complete"] = False
    part.write_text(json.dumps(rec))
    (out / gone["name"]).unlink()
    run([*cpu2(), *args], timeout=300)
    again = shards.Manifest.read(out).splits["val"]
    assert again.total == 21
    assert {s.name: s.sha256 for s in again.shards}.keys() == first.keys()


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_evaluate_two_processes_gathers_the_same_statistics(tmp_path):
    """accelerate launch evaluate.py: each process takes half of the split and of the samples; the reduced
    tokenizer metrics equal the one-process run's, and the sample statistics count every sample once."""
    from factories import tiny_vqvae
    from vqgen.config import EvalConfig, PriorConfig, load_config
    from vqgen.eval import evaluate
    from vqgen.export import ExportMeta
    from vqgen.models.prior import build_prior
    sha = tiny_vqvae().export_to(tmp_path / "vqvae/export", meta=ExportMeta(dataset={"name": "digits"}))
    torch.manual_seed(0)
    build_prior(PriorConfig(vocab_size=32, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                            attn_layers_heads=2, num_classes=10)).export_to(
        tmp_path / "prior/export", meta=ExportMeta(tokenizer_sha256=sha))
    common = ["--run_dir", str(tmp_path), "--num_samples", "90", "--batch_size", "32", "--classifier_dir",
              str(tmp_path / "clf"), "--classifier_epochs", "2", "--no_plots", "--max_images", "150"]
    one = evaluate.run(load_config(EvalConfig, [*common, "--output", str(tmp_path / "one.json")]))
    run([*cpu2(), str(ROOT / "evaluate.py"), *common, "--output", str(tmp_path / "two.json")], timeout=600)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for k in ("num_images", "code_counts", "codes_used"):
        assert two["tokenizer"][k] == one["tokenizer"][k], k
    for k in ("mse", "psnr", "rfid", "perplexity"):
        assert two["tokenizer"][k] == pytest.approx(one["tokenizer"][k], rel=1e-6), k
    assert sum(two["prior"]["classifier"]["class_counts"]) == 90 and two["reference"]["num_images"] == 90
