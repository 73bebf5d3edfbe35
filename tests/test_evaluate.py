"""evaluate.py end to end on a tiny run built in a tmp dir (untrained exports + real digits shards)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from vqgen import extract
from vqgen.cli import run_cli
from vqgen.errors import CheckpointError, ConfigError
from vqgen.config import EvalConfig, ExtractConfig
from vqgen.flags import load_config
from vqgen.eval.evaluate import run as evaluate
from vqgen.export import ExportMeta
from vqgen.models.prior import Prior, PriorConfig
from vqgen.models.vqvae import VQVAE, VQVAEConfig


def tiny_vqvae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(in_channels=1, image_size=16, num_channels=(8, 8), num_res_channels=(8, 8),
                             num_res_layers=1, num_embeddings=16, embedding_dim=8))


@pytest.fixture(scope="module")
def clf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "clf_cache"   # shared with test_metrics.py: trained once a session


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/<x>/{vqvae,prior}/export + shards (train, test) + metrics.jsonl, as VQVAE_T.py --train lays them out."""
    root = tmp_path_factory.mktemp("run")
    sha = tiny_vqvae().export_to(root / "vqvae" / "export", meta=ExportMeta(dataset={"name": "digits"}))
    extract.run(load_config(ExtractConfig,
        ["--dataset", "digits", "--checkpoint", str(root / "vqvae" / "export"), "--split", "train", "test",
         "--output", str(root / "shards"), "--no_progress"]))
    torch.manual_seed(0)
    prior = Prior(PriorConfig(vocab_size=16, latent_h=4, latent_w=4, dim=16, depth=1, heads=2, num_classes=10))
    prior.export_to(root / "prior" / "export", meta=ExportMeta(tokenizer_sha256=sha))
    for stage, key in (("vqvae", "recon_loss"), ("prior", "bpt")):
        rows = [{"step": s, "epoch": 0, "loss": 2.0 / s, key: 1.0 / s} for s in range(1, 40, 10)]
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cli(*argv) -> int:
    return run_cli(evaluate, EvalConfig, [str(a) for a in argv])


def test_run_dir_writes_eval_json_and_plots(run, clf_root, capsys):
    assert cli("--run_dir", run, "--num_samples", 64, "--classifier_dir", clf_root) == 0
    out = capsys.readouterr().out
    assert "codebook usage" in out and "gFID" in out and "bits/token" in out
    res = json.loads((run / "eval.json").read_text())
    t, p = res["tokenizer"], res["prior"]
    assert res["feature_space"]["name"] == "classifier" and res["feature_space"]["test_accuracy"] > 0.95
    assert t["num_images"] == 297 and len(t["code_counts"]) == 16 and sum(t["code_counts"]) == 297 * 16
    assert 0 < t["codebook_usage"] <= 1 and 1 <= t["perplexity"] <= 16 and t["rfid"] > 0
    assert 0 <= t["ssim"] <= 1 and t["psnr"] > 0 and t["mse"] > 0
    for k in ("fid", "inception_score", "precision", "recall", "bits_per_token"):
        assert math.isfinite(p[k]), k
    assert p["tokens"] == 297 * 16 and 0 < p["bits_per_token"] < 8       # untrained prior: about log2(16) = 4
    assert abs(p["bits_per_token"] - 4) < 0.5
    c = p["classifier"]
    assert sum(c["class_counts"]) == 64 and 0 < c["class_coverage"] <= 1 and "label_accuracy" in c
    ref = res["reference"]
    assert ref["fid"] < p["fid"] and ref["precision"] > 0.5            # real train digits vs real test digits
    for name in ("loss_curves", "codebook_usage", "samples"):
        png = Path(res["plots"][name])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent == run / "eval"


def test_explicit_paths_and_no_sampling(run, clf_root, tmp_path):
    out = tmp_path / "e.json"
    res = evaluate(load_config(EvalConfig,
        ["--checkpoint", str(run / "vqvae" / "export"), "--checkpoint_t", str(run / "prior" / "export"),
         "--shards", str(run / "shards"), "--dataset", "digits", "--num_samples", "0", "--max_images", "100",
         "--output", str(out), "--classifier_dir", str(clf_root), "--no_plots"]))
    assert json.loads(out.read_text())["tokenizer"]["num_images"] == 100
    assert "fid" not in res["prior"] and res["prior"]["bits_per_token"] > 0 and "plots" not in res


def test_identical_reconstruction_metrics_reference_is_perfect(run, clf_root, tmp_path):
    """The train-vs-split reference of the same split against itself: FID 0, precision = recall = 1."""
    from vqgen.eval.evaluate import FeatureSpace, load_split, sample_quality
    from vqgen.eval.classifier import load_or_train
    clf = load_or_train("digits", "data", 16, 1, root=clf_root)
    space = FeatureSpace("classifier", clf, torch.device("cpu"), {}, clf)
    x, _ = load_split("digits", "test", "data", 16, 1)
    f = space(x)
    q = sample_quality(space, f, f, EvalConfig())
    assert q["fid"] == pytest.approx(0, abs=1e-3) and q["precision"] == 1 and q["recall"] == 1


def test_missing_inception_weights_fail_fast(run, tmp_path, capsys, monkeypatch):
    t0 = time.perf_counter()
    assert cli("--run_dir", run, "--inception_weights", tmp_path / "nope.pth") == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "nope.pth does not exist" in err and "never downloads" in err and "Traceback" not in err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))        # an empty hub cache
    t0 = time.perf_counter()
    assert cli("--run_dir", run, "--features", "inception") == 2
    assert time.perf_counter() - t0 < 5
    assert "no Inception-v3 weights on disk" in capsys.readouterr().err


def test_inception_path_with_local_weights_file(run, clf_root, tmp_path):
    """A torchvision-layout weights file (random weights here: nothing can be downloaded) drives the
    Inception feature space: 2048-d features, logits for IS, no classifier training needed."""
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    w = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), w)
    res = evaluate(load_config(EvalConfig,
        ["--run_dir", str(run), "--inception_weights", str(w), "--max_images", "6", "--num_samples", "6",
         "--batch_size", "6", "--output", str(tmp_path / "eval.json"), "--no_plots", "--classifier_dir",
         str(tmp_path / "no_cache")]))
    assert res["feature_space"]["name"] == "inception" and res["feature_space"]["weights"] == str(w)
    assert math.isfinite(res["tokenizer"]["rfid"]) and math.isfinite(res["prior"]["fid"])
    assert "classifier" not in res["prior"]                               # none cached under that root


def test_prior_of_another_tokenizer_is_refused(run, tmp_path):
    other = tmp_path / "vqvae" / "export"
    tiny_vqvae(seed=1).export_to(other, meta=ExportMeta(dataset={"name": "digits"}))
    with pytest.raises(CheckpointError, match="matching --checkpoint"):
        evaluate(load_config(EvalConfig, ["--checkpoint", str(other), "--checkpoint_t", str(run / "prior" / "export"),
                                        "--num_samples", "0", "--no_plots"]))


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="--run_dir"):
        evaluate(load_config(EvalConfig, ["--run_dir", str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match="pass --run_dir"):
        evaluate(load_config(EvalConfig, []))
