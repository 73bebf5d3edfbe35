"""The factorised token head (--token_factors): sizes, an exact joint likelihood, sampling consistent with training,
and a prior trained on a synthetic 2^18-code token set end to end (shards written with vqgen.shards' writer)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vqgen import shards
from vqgen.config import PriorConfig, PriorStageConfig, load_config
from vqgen.errors import ConfigError
from vqgen.models.prior import Prior, build_prior, token_cross_entropy, token_nll
from vqgen.models.priors.heads import FactorHead, LinearHead, split_ids
from vqgen.models.sampling import generate
from vqgen.train import prior_task

SHA = "b" * 64
BIG = 1 << 18


def tiny(vocab, factors=2, num_classes=3, h=1, w=2, **kw) -> Prior:
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=vocab, latent_h=h, latent_w=w, attn_layers_dim=32, attn_layers_depth=2,
                      attn_layers_heads=4, num_classes=num_classes, token_factors=factors, **kw)
    return build_prior(cfg).eval()


def test_factor_bits_flags_and_refusals():
    bits = {(BIG, 2): (9, 9), (BIG, 3): (6, 6, 6), (1000, 3): (4, 3, 3), (1024, 1): (10,), (2, 1): (1,)}
    for (v, k), want in bits.items():
        assert PriorConfig(vocab_size=v, latent_h=1, latent_w=1, token_factors=k).factor_bits == want
    flags = load_config(PriorConfig, ["--token_factors", "2", "--factor_layers", "2"])
    assert (flags.token_factors, flags.factor_layers) == (2, 2)
    assert flags.build(BIG, 4, 4, 0).factor_bits == (9, 9)
    with pytest.raises(ConfigError, match="more than the 2 bits"):
        PriorConfig(vocab_size=4, latent_h=1, latent_w=1, token_factors=3).validate()
    with pytest.raises(ConfigError, match="token_factors"):
        load_config(PriorConfig, ["--token_factors", "0"]).check()
    with pytest.raises(ConfigError, match="factor_layers"):
        load_config(PriorConfig, ["--factor_layers", "0"]).check()
    # an export written before the setting existed is a plain prior
    old = PriorConfig(vocab_size=16, latent_h=2, latent_w=2).to_dict()
    del old["token_factors"], old["factor_layers"]
    assert PriorConfig.from_dict(old).token_factors == 1


def test_split_ids_most_significant_first():
    ids = torch.tensor([0, 1, 37, BIG - 1])
    subs = split_ids(ids, (9, 9))
    assert subs.tolist() == [[0, 0], [0, 1], [0, 37], [511, 511]]
    assert torch.equal(subs[:, 0] * 512 + subs[:, 1], ids)
    assert split_ids(torch.tensor(999), (4, 3, 3)).tolist() == [999 >> 6, (999 >> 3) & 7, 999 & 7]


def test_plain_prior_keeps_its_modules():
    p = tiny(16, factors=1)
    assert type(p.tok_emb) is nn.Embedding and isinstance(p.head, LinearHead) and isinstance(p.head, nn.Linear)
    assert {k for k in p.state_dict() if k.startswith(("head", "tok_emb"))} == {"head.weight", "tok_emb.weight"}


def _params(vocab, factors):
    cfg = PriorConfig(vocab_size=vocab, latent_h=16, latent_w=16, attn_layers_dim=96, attn_layers_depth=12,
                      attn_layers_heads=8, num_classes=10, token_factors=factors)
    with torch.device("meta"):                                          # count without allocating
        p = build_prior(cfg)
    io = sum(x.numel() for n, x in p.named_parameters() if n.startswith(("tok_emb", "head")))
    return sum(x.numel() for x in p.parameters()), io


def test_parameter_counts_at_2_18_codes():
    plain, plain_io = _params(BIG, 1)
    fact, fact_io = _params(BIG, 2)
    assert plain_io == 2 * BIG * 96 and plain_io > 0.9 * plain          # the two V x D tables dominate the prior
    body = plain - plain_io                                             # the same Transformer in both
    assert fact - fact_io == body
    assert fact_io < body / 2 and fact < plain / 20


@pytest.mark.parametrize("vocab,factors", [(600, 2), (1000, 2), (1024, 3)])
def test_joint_distribution_is_normalised_over_the_vocabulary(vocab, factors):
    """exp(-NLL) summed over every id is 1: sub-token values beyond the vocabulary get no probability, and the
    summed factor cross-entropies are the token's exact NLL (bits/token stay comparable with the plain head)."""
    p = tiny(vocab, factors)
    ids = torch.arange(vocab)
    with torch.no_grad():
        out = p(torch.stack([ids, torch.zeros_like(ids)], 1), torch.ones(vocab, dtype=torch.long))
        nll = token_cross_entropy(out.logits, out.targets, "none").view(vocab, 2)[:, 0].double()
        assert isinstance(out.logits, tuple) and len(out.logits) == factors
        assert float(torch.exp(-nll).sum()) == pytest.approx(1.0, abs=1e-5)
        # reduction="mean" is the mean of the per-token sums; IGNORE targets are skipped
        targets = out.targets.clone()
        targets[:, 1] = -100
        mean = token_cross_entropy(out.logits, targets)
        assert float(mean) == pytest.approx(float(nll.mean()), rel=1e-5)


def test_sub_token_j_sees_only_the_sub_tokens_before_it():
    p = tiny(BIG, 2, h=2, w=4)
    toks = torch.randint(0, BIG, (2, 8))
    lab = torch.tensor([0, 2])
    with torch.no_grad():
        hi, lo = p(toks, lab).logits
        low_changed = toks.clone()
        low_changed[:, 5] ^= 1                                          # the last bit of token 5
        hi2, lo2 = p(low_changed, lab).logits
        high_changed = toks.clone()
        high_changed[:, 5] ^= 1 << 17                                   # the first bit of token 5
        hi3, lo3 = p(high_changed, lab).logits
    torch.testing.assert_close(hi2[:, :6], hi[:, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(lo2[:, :6], lo[:, :6], atol=1e-6, rtol=0)  # token 5's low bits: predicted, not seen
    assert (hi2[:, 6:] - hi[:, 6:]).abs().max() > 1e-4                    # later tokens see them
    torch.testing.assert_close(hi3[:, :6], hi[:, :6], atol=1e-6, rtol=0)  # the high sub-token is predicted first
    assert (lo3[:, 5] - lo[:, 5]).abs().max() > 1e-4                   # the low one is conditioned on it


@pytest.mark.parametrize("use_cfg", [False, True])
def test_drawing_reads_the_logits_training_scores(use_cfg):
    """The sampling path (KV cache + one factor at a time) gives the teacher-forced logits of each sub-token."""
    p = tiny(1000, 2, h=2, w=3)
    toks = torch.randint(0, 1000, (2, 6))
    lab = torch.tensor([1, 2])
    rows = torch.cat([lab, torch.full_like(lab, 3)]) if use_cfg else lab
    with torch.no_grad():
        want = p(toks.repeat(2, 1) if use_cfg else toks, rows).logits
        p.setup_caches(rows.shape[0], 6, torch.float32)
        subs = split_ids(toks, p.head.bits)
        state = p.prefill(toks[:, :0].repeat(2 if use_cfg else 1, 1), rows)
        for i in range(6):
            seen = []

            def pick(logits, i=i):
                seen.append(logits)
                return subs[:, i, len(seen) - 1]
            assert torch.equal(p.head.draw(state, pick), toks[:, i])
            for j in range(2):
                torch.testing.assert_close(seen[j], want[j][:, i], atol=1e-5, rtol=0)
            if i < 5:
                state = p.decode_one_token(toks[:, i].repeat(2) if use_cfg else toks[:, i], i + 1)
    p.release_caches()


@pytest.mark.parametrize("vocab,factors", [(1000, 2), (600, 3), (BIG, 2)])
def test_sampling_stays_in_range_and_cache_equals_recompute(vocab, factors):
    p = tiny(vocab, factors, h=2, w=3)
    kw = dict(labels=[0, 1, 2, 0, 1, 2, 0, 1], cfg_scale=3.0, cfg_schedule="linear", top_k=50, temperature=1.5)
    a = generate(p, 8, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(p, 8, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (8, 2, 3)
    assert int(a.min()) >= 0 and int(a.max()) < vocab
    greedy = generate(p, 4, temperature=0.0)
    assert int(greedy.max()) < vocab


def test_export_round_trip(tmp_path):
    p = tiny(BIG, 2, factor_layers=2)
    p.export_to(tmp_path / "export")
    q = Prior.from_export(tmp_path / "export")
    assert q.config == p.config and isinstance(q.head, FactorHead) and len(q.head.blocks) == 2
    toks = torch.randint(0, BIG, (2, 2))
    with torch.no_grad():
        for a, b in zip(p(toks, None).logits, q(toks, None).logits):
            assert torch.equal(a, b)
    assert json.loads((tmp_path / "export/config.json").read_text())["config"]["token_factors"] == 2


# ---- a prior trained on a synthetic 2^18-code token set ---------------------------------------------------------
def _big_tokens(key: int) -> np.ndarray:
    """Class ``key % 4``: 16 tokens spread over the whole 2^18 range (both sub-tokens vary), two variants."""
    c, v = key % 4, (key // 4) % 2
    return ((c * 65000 + np.arange(16) * 16411 + v * 513) % BIG).astype(np.int32).reshape(4, 4)


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards18")
    for split, n in (("train", 96), ("test", 16)):
        settings = {"tokenizer_sha256": SHA, "dataset": "synthetic", "split": split, "num_samples": n}
        w = shards.RankShardWriter(out, split, 0, settings, 40, (4, 4), shards.token_dtype(BIG))
        w.resume()
        for key in range(n):
            w.write(key, _big_tokens(key), key % 4)
        w.close()
        header = shards.Manifest(tokenizer={"sha256": SHA, "config": {}, "path": None}, codebook_size=BIG,
                                 latent_h=4, latent_w=4, dtype="int32", num_classes=4, dataset="synthetic")
        shards.merge_manifest(out, split, 1, header, transforms={}, hflip=False, expected_total=n)
    return out


FLAGS = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "16",
         "--no_wandb", "--num_samples", "4", "--val_batches", "1", "--warmup_steps", "2", "--lr", "3e-3",
         "--lr_schedule", "constant", "--token_factors", "2"]


def _train(shards_dir, out, *extra):
    return prior_task.run(load_config(PriorStageConfig, ["--shards", str(shards_dir), *FLAGS, *extra,
                                                         "--output_dir", str(out)]))


def test_prior_trains_on_2_18_codes_samples_in_range_and_resumes_exactly(big_shards, tmp_path):
    _train(big_shards, tmp_path / "full", "--n_epochs_t", "6")           # 6 steps per epoch
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    bpt = [r["bpt"] for r in rows if "bpt" in r]
    assert bpt[0] == pytest.approx(18, abs=1.5) and bpt[-1] < 0.5 * bpt[0]  # starts near uniform over 2^18 ids
    val = [r["val/bits_per_token"] for r in rows if "val/bits_per_token" in r]
    assert val and val[-1] < 0.5 * 18
    prior = Prior.from_export(tmp_path / "full")
    assert prior.config.vocab_size == BIG and prior.config.token_factors == 2
    nparams = sum(x.numel() for x in prior.parameters())
    assert nparams < 2 * BIG * 32 / 10                                   # far below the plain head's tables
    toks = generate(prior, 8, labels=[0, 1, 2, 3] * 2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert toks.shape == (8, 4, 4) and int(toks.min()) >= 0 and int(toks.max()) < BIG
    # the held-out NLL the evaluation reports is the same function
    loader = shards.make_token_loader(big_shards, "test", batch_size=8, shuffle=False, hflip=False)
    total, count = token_nll(prior, loader, torch.device("cpu"))
    assert count == 16 * 16 and math.isfinite(total)
    # killed mid-run (cut by --max_steps) and resumed: bitwise the uninterrupted run's weights
    _train(big_shards, tmp_path / "cut", "--n_epochs_t", "6", "--max_steps", "10", "--checkpointing_steps", "5")
    _train(big_shards, tmp_path / "cut", "--n_epochs_t", "6", "--resume", "latest")
    a, b = (load_file(str(tmp_path / run / "export/model.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_benchmark_tiny_mode_reports_both_heads(tmp_path):
    """bench/factor_head.py --tiny (the integrator runs the full sizes): one row per (vocabulary, head)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench/factor_head.py"), "--tiny", "--vocabs", "4096", "--json",
                        str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(x["vocab"], x["token_factors"]) for x in rows] == [(4096, 1), (4096, 2)]
    assert rows[1]["embed_head_params"] < rows[0]["embed_head_params"] and all(x["step_ms"] > 0 for x in rows)
    assert "| 4,096 | 2 factors (6+6 bits) |" in r.stdout


@pytest.mark.parametrize("flags,message", [(["--token_factors", "9"], "--token_factors must be in [1, 8]"),
                                           (["--token_factors", "6"], "more than the 5 bits of a 32-code token"),
                                           (["--factor_layers", "0"], "--factor_layers >= 1")])
def test_bad_factor_flags_are_one_line_errors(flags, message, stage2, tmp_path, capsys):
    from vqgen.cli import run_cli
    out = tmp_path / "run"
    argv = ["--shards", str(stage2 / "shards"), *FLAGS[:-2], *flags, "--output_dir", str(out)]
    assert run_cli(prior_task.run, PriorStageConfig, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and message in err[0] and not out.exists()
