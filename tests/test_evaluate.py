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
from vqgen.config import EvalConfig, ExtractConfig, PriorConfig, load_config
from vqgen.errors import CheckpointError, ConfigError
from vqgen.eval.evaluate import run as evaluate
from vqgen.export import ExportMeta
from vqgen.models.prior import build_prior, load_prior
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
    prior = build_prior(PriorConfig(vocab_size=16, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                                    attn_layers_heads=2, num_classes=10))
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


def test_maskgit_prior_scored_under_its_own_name(run, clf_root, tmp_path, capsys):
    """A MaskGIT prior: samples scored like any prior, null-class labels ask for no class, and its held-out score is
    masked-token bits, never reported as bits/token."""
    torch.manual_seed(0)
    mg = build_prior(PriorConfig(vocab_size=16, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                                 attn_layers_heads=2, num_classes=10, prior_kind="maskgit"))
    sha = load_prior(run / "prior" / "export").export_meta.tokenizer_sha256
    mg.export_to(tmp_path / "mg", meta=ExportMeta(tokenizer_sha256=sha))
    out = tmp_path / "e.json"
    assert cli("--checkpoint", run / "vqvae" / "export", "--checkpoint_t", tmp_path / "mg", "--shards", run / "shards",
               "--dataset", "digits", "--num_samples", 16, "--max_images", 100, "--output", out, "--classifier_dir",
               clf_root, "--no_plots", "--decode_steps", 3, "--unconditional") == 0
    text = capsys.readouterr().out
    p = json.loads(out.read_text())["prior"]
    assert "bits_per_token" not in p and 0 < p["masked_bits_per_token"] < 8 and "sequences" not in p
    assert p["decode_steps"] == 3 and not p["conditional"] and "label_accuracy" not in p["classifier"]
    assert "masked-token bits" in text and "bits/token " not in text


def test_identical_reconstruction_metrics_reference_is_perfect(run, clf_root, tmp_path):
    """The split against itself, accumulated batch by batch: FID 0, precision = recall = 1."""
    from vqgen.eval.batches import open_split, split_batches
    from vqgen.eval.classifier import load_or_train
    from vqgen.eval.evaluate import FeatureSpace
    from vqgen.eval.stream_stats import FeatureSet, quality
    clf = load_or_train("digits", "data", 16, 1, root=clf_root)
    space = FeatureSpace("classifier", clf, torch.device("cpu"), {}, clf)
    ds = open_split("digits", "test", "data", 16, 1)
    a, b = FeatureSet(len(ds)), FeatureSet(len(ds))
    for idx, x, _ in split_batches(ds, None, 50):
        f, lg = space.batch(x)
        a.update(f, lg, idx)
        b.update(f, lg, idx)
    q = quality(a, b, k=3)
    assert q["fid"] == pytest.approx(0, abs=1e-3) and q["precision"] == 1 and q["recall"] == 1


def test_streamed_statistics_match_the_all_in_memory_ones():
    """FID, IS and precision/recall accumulated in batches equal the torchmetrics values on all features."""
    from vqgen import metrics as M
    from vqgen.eval.stream_stats import FeatureSet, quality
    g = torch.Generator().manual_seed(0)
    fr, ff = torch.randn(300, 12, generator=g), torch.randn(200, 12, generator=g) * 1.3 + 0.2
    lg = torch.randn(200, 7, generator=g) * 3
    real, fake = FeatureSet(300, is_splits=1), FeatureSet(200, is_splits=1)
    for s in range(0, 300, 64):
        real.update(fr[s:s + 64])
    for s in range(0, 200, 64):
        fake.update(ff[s:s + 64], lg[s:s + 64])
    q = quality(real, fake, k=3)
    assert q["fid"] == pytest.approx(M.frechet_distance(fr.double(), ff.double()), rel=1e-6)
    assert q["inception_score"] == pytest.approx(M.inception_score(lg.double(), splits=1)[0], rel=1e-9)
    pr = M.precision_recall(fr, ff, k=3)
    assert (q["precision"], q["recall"]) == (pr["precision"], pr["recall"])
    small = FeatureSet(300, pr_keep=50)
    small.update(fr)
    assert small.features().shape == (50, 12)     # bounded: only the first pr_keep features are kept


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


def test_evaluation_never_holds_more_than_a_batch_of_images(run, clf_root, tmp_path, monkeypatch):
    """Constant memory: every feature pass and every decode sees at most --batch_size images, and the kept
    precision/recall features are capped by --pr_images, whatever --num_samples is."""
    from vqgen.eval import batches
    seen = []
    orig_batch, orig_decode = batches.FeatureSpace.batch, batches.decode_to_images
    monkeypatch.setattr(batches.FeatureSpace, "batch", lambda self, x: seen.append(len(x)) or orig_batch(self, x))
    monkeypatch.setattr(batches, "decode_to_images", lambda tok, t, batch_size=64: seen.append(len(t)) or orig_decode(
        tok, t, batch_size))
    res = evaluate(load_config(EvalConfig,
        ["--run_dir", str(run), "--num_samples", "300", "--batch_size", "40", "--pr_images", "50",
         "--output", str(tmp_path / "eval.json"), "--classifier_dir", str(clf_root), "--no_plots"]))
    assert max(seen) <= 40 and sum(seen) > 300
    p = res["prior"]
    assert p["num_samples"] == 300 and p["pr_images"] == [50, 50] and sum(p["classifier"]["class_counts"]) == 300
    assert res["reference"]["num_images"] == 300


def test_sample_npz_in_evaluator_layout_and_capped_grid(run, tmp_path):
    import numpy as np
    from PIL import Image

    from vqgen import sample
    from vqgen.config import SampleConfig
    from vqgen.models.sampling import class_labels, generate
    out = tmp_path / "s"
    argv = ["--checkpoint", str(run / "vqvae" / "export"), "--checkpoint_t", str(run / "prior" / "export"),
            "--num_samples", "10", "--batch_size", "3", "--npz", "--grid_images", "4", "--output_dir", str(out)]
    assert run_cli(sample.run, SampleConfig, argv) == 0
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (10, 16, 16, 3) and arr.dtype == np.uint8       # ADM / LlamaGen evaluator input
    png = np.asarray(Image.open(out / "images" / "00007.png").convert("RGB"))
    assert np.array_equal(png, arr[7])                                    # the same pixels as the PNG
    assert Image.open(out / "grid.png").size[0] < 5 * 48                  # 4 cells (2 x 2), not 10
    # chunked generation draws the same tokens as one generate call with the same batch size
    tok, prior = sample.load_pair(str(run / "vqvae" / "export"), str(run / "prior" / "export"))
    g = torch.Generator().manual_seed(0)
    ref = generate(prior, 10, labels=class_labels(prior, 10, None), generator=g, batch_size=3)
    assert np.array_equal(np.load(out / "tokens.npy"), ref.numpy())
    assert run_cli(sample.run, SampleConfig, [*argv[:-2], "--no_png", "--output_dir", str(tmp_path / "n")]) == 0
    assert not list((tmp_path / "n" / "images").glob("*.png")) and (tmp_path / "n" / "samples.npz").is_file()
