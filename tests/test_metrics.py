"""vqgen.metrics (+ the feature classifier): known answers for reconstruction, codebook and sample metrics."""

from __future__ import annotations

import math

import pytest
import torch

from vqgen import metrics as M
from vqgen.data import build_dataset
from vqgen.eval.classifier import accuracy, load_or_train


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    # one cache for the whole session (test_evaluate.py uses the same root): trained once, ~10-20 s
    return load_or_train("digits", "data", 16, 1, root=tmp_path_factory.getbasetemp() / "clf_cache")


@pytest.fixture(scope="module")
def test_digits():
    ds, _ = build_dataset("digits", "test")
    return ds.images, torch.as_tensor(ds.labels)


def unit_images(n=6, size=16, seed=0):
    """Images in [-1, 1] whose [0, 1] values stay within [0.1, 0.8] (so a +0.1 shift is never clamped)."""
    g = torch.Generator().manual_seed(seed)
    u = 0.1 + 0.7 * torch.rand(n, 1, size, size, generator=g)
    return u * 2 - 1


# ------------------------------------------------------------------------------------------ reconstruction
def test_identical_images_psnr_inf_ssim_one_and_meter_cap():
    x = unit_images()
    assert torch.isinf(M.psnr(x, x)).all()
    assert float(M.ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    meter = M.ReconstructionMeter(4)
    meter.update(x, x, torch.zeros(6, 2, 2, dtype=torch.long))
    out = meter.compute()
    assert out["psnr"] == M.PSNR_CAP_DB and out["mse"] == 0 and out["l1"] == 0
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_brightness_shift_gives_exactly_20db():
    x = unit_images()
    y = x + 0.2                      # +0.1 in [0, 1] units -> MSE 0.01 -> PSNR 20 dB
    assert torch.allclose(M.psnr(x, y), torch.full((6,), 20.0), atol=1e-4)
    meter = M.ReconstructionMeter(4)
    meter.update(x, y, torch.zeros(6, 2, 2, dtype=torch.long))
    out = meter.compute()
    assert out["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert out["l1"] == pytest.approx(0.1, abs=1e-6) and out["mse"] == pytest.approx(0.01, abs=1e-6)


# ------------------------------------------------------------------------------------------------ codebook
def test_perplexity_and_usage_on_known_histograms():
    assert M.perplexity(torch.full((256,), 7)) == pytest.approx(256.0)
    assert M.perplexity(torch.tensor([5, 0, 0, 0])) == pytest.approx(1.0)
    assert M.perplexity(torch.tensor([1, 1, 0, 0])) == pytest.approx(2.0)
    assert M.codebook_usage(torch.tensor([3, 0, 1, 0])) == 0.5
    assert M.codebook_usage(torch.ones(10)) == 1.0
    assert M.codebook_usage(torch.zeros(8)) == 0.0
    counts = M.code_histogram(torch.tensor([[0, 1], [1, 3]]), 5)
    assert counts.tolist() == [1, 2, 0, 1, 0]
    assert M.bits_per_token(math.log(256)) == pytest.approx(8.0)


# ------------------------------------------------------------------------------------------ sample quality
def test_fid_zero_for_identical_and_exact_for_a_mean_shift():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 16, generator=g)
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean moved by 0.5 in each of 16 dims: FID = 16 * 0.25
    assert M.frechet_distance(f, f + 0.5) == pytest.approx(4.0, abs=1e-6)


def test_precision_recall_identical_disjoint_and_partial():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g)
    assert M.precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    assert M.precision_recall(a, a + 100) == {"precision": 0.0, "recall": 0.0}
    # fakes covering only half the real modes: high precision, recall about one half
    real = torch.cat([a[:100], a[100:] + 50])
    fake = a[:100] + 0.01
    pr = M.precision_recall(real, fake)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.6


def test_inception_score_extremes():
    assert M.inception_score(torch.zeros(100, 10), splits=5)[0] == pytest.approx(1.0)
    confident = torch.eye(10).repeat(20, 1) * 50          # every class equally often, each sample certain
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-4)


def test_classifier_stats_known_inputs():
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 10.0, 0], [0.1, 0, 0]])
    s = M.classifier_stats(logits, 3, threshold=0.9, labels=torch.tensor([0, 1, 2, -1]))
    assert s["class_counts"] == [2, 2, 0]
    assert s["class_coverage"] == pytest.approx(2 / 3)
    assert s["confident_fraction"] == pytest.approx(0.75)
    assert s["label_accuracy"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ feature classifier
def test_classifier_accuracy_and_real_digits_coverage(digits_classifier, test_digits):
    x, y = test_digits
    assert digits_classifier.export_meta.metrics["test_accuracy"] > 0.95
    assert accuracy(digits_classifier, x, y) > 0.95
    with torch.no_grad():
        feats, logits = digits_classifier.features_and_logits(x)
    s = M.classifier_stats(logits, 10, labels=y)
    assert s["class_coverage"] == 1.0
    assert s["confident_fraction"] > 0.9 and s["label_accuracy"] > 0.95
    assert feats.shape == (len(x), digits_classifier.config.feature_dim)


def test_fid_in_classifier_space_identical_and_monotone_in_noise(digits_classifier, test_digits):
    x, _ = test_digits
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = lambda imgs: digits_classifier.features_and_logits(imgs)[0]  # noqa: E731
        real = feats(x)
        assert M.frechet_distance(real, feats(x.clone())) == pytest.approx(0.0, abs=1e-3)
        fids = [M.frechet_distance(real, feats((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)))
                for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] > 0
