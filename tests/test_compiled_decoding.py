"""Compiled decoding (``generate(..., compile=True)``, ``--compile``): the static-cache step under torch.compile
draws the same tokens as eager decoding from the same generator (greedy and sampled, CFG rows and schedules
included), compiles once per (batch, dtype), and the exponential-race sampler draws from the softmax.

The graphs are checked with the ``aot_eager`` backend (the same capture, no code generation: seconds); the Inductor
test, the default backend, compiles C++ kernels and is marked slow."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from vqgen.cli import run_cli
from vqgen.config import PriorConfig, SampleConfig
from vqgen.export import ExportMeta
from vqgen.models.prior import build_prior
from vqgen.models.priors.ar import ARPrior
from vqgen.models.sampling import generate, sample_logits


def tiny(num_classes=3, rope=False) -> ARPrior:
    torch.manual_seed(0)
    p = build_prior(PriorConfig(vocab_size=16, latent_h=3, latent_w=3, attn_layers_dim=32, attn_layers_depth=2,
                                attn_layers_heads=4, num_classes=num_classes, rope=rope))
    with torch.no_grad():  # peaked distributions: greedy / top-k / top-p matter
        p.head.weight.mul_(20)
        p.cls_emb.weight.mul_(20)
    return p.eval()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(ARPrior, "compile_backend", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def both(p, n=5, **kw):
    """(eager, compiled) tokens of the same call with generators of the same seed."""
    return [generate(p, n, generator=torch.Generator().manual_seed(7), compile=c, **kw) for c in (False, True)]


CASES = [
    dict(temperature=0.0, labels=[0, 1, 2, -1, 1], cfg_scale=3.0),                      # greedy, CFG rows
    dict(temperature=1.0, labels=[0, 1, 2, -1, 1], cfg_scale=3.0, cfg_schedule="linear"),
    dict(temperature=0.8, top_k=5, top_p=0.9, labels=[2, 1, 0, 0, 1], batch_size=2),     # 2 + 2 + 1 rows
]


@pytest.mark.parametrize("kw", CASES, ids=["greedy_cfg", "sample_cfg_linear", "topk_topp_batches"])
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_compiled_equals_eager_token_for_token(aot_eager, kw, rope):
    eager, compiled = both(tiny(rope=rope), **kw)
    assert compiled.shape == (5, 3, 3) and torch.equal(eager, compiled)


def test_compiled_equals_eager_for_random_order_priors_and_the_power_schedule(aot_eager):
    """RAR: the target-aware position table reaches the compiled steps too; the power schedule's scales are tensors."""
    torch.manual_seed(0)
    p = build_prior(PriorConfig(vocab_size=16, latent_h=3, latent_w=3, attn_layers_dim=32, attn_layers_depth=2,
                                attn_layers_heads=4, num_classes=3, order="random")).eval()
    with torch.no_grad():
        p.head.weight.mul_(20)
        p.target_pos_emb.mul_(50)   # a table that matters: decoding without it would draw other tokens
    eager, compiled = both(p, temperature=1.0, labels=[0, 1, 2, -1, 1], cfg_scale=3.0, cfg_schedule="power")
    assert torch.equal(eager, compiled)


def test_unconditional_and_bf16_autocast(aot_eager):
    eager, compiled = both(tiny(num_classes=0), temperature=1.0)
    assert torch.equal(eager, compiled)
    eager, compiled = both(tiny(), labels=[0, 1, 2, 0, 1], cfg_scale=2.0, autocast_dtype=torch.bfloat16)
    assert torch.equal(eager, compiled)


def test_compiled_once_per_batch_and_dtype_and_caches_kept(aot_eager):
    p = tiny()
    kw = dict(labels=[0, 1, 2, 0], cfg_scale=2.0, compile=True)
    generate(p, 4, generator=torch.Generator().manual_seed(0), **kw)
    graphs = counters["stats"]["unique_graphs"]
    assert p.blocks[0].attn.kv_cache is not None  # kept for the next call (eager decoding frees them)
    generate(p, 4, generator=torch.Generator().manual_seed(1), cfg_schedule="linear", **{**kw, "cfg_scale": 5.0})
    assert counters["stats"]["unique_graphs"] == graphs  # another scale / schedule: the same graphs
    p.release_caches()
    generate(p, 4, generator=torch.Generator().manual_seed(2), **kw)
    assert counters["stats"]["unique_graphs"] == graphs and p.blocks[0].attn.kv_cache is not None
    generate(p, 4, generator=torch.Generator().manual_seed(0), batch_size=3, **kw)  # batches of 3 and 1
    assert counters["stats"]["unique_graphs"] == graphs + 4  # (first, step) for each new batch size
    generate(p, 4, generator=torch.Generator().manual_seed(0), **kw)
    assert counters["stats"]["unique_graphs"] == graphs + 4


def test_kinds_without_compiled_decoding_decode_eagerly(aot_eager, monkeypatch):
    monkeypatch.setattr(ARPrior, "compiled_decoding", False)
    p = tiny()
    out = generate(p, 2, labels=[0, 1], generator=torch.Generator().manual_seed(0), compile=True)
    assert out.shape == (2, 3, 3) and counters["stats"]["unique_graphs"] == 0
    assert p.blocks[0].attn.kv_cache is None  # the eager path's release


def test_exponential_race_draws_from_the_softmax():
    """argmax(p / E), E ~ Exp(1), wins token i with probability p_i: 40k draws within 4 standard errors, the
    same frequencies as torch.multinomial; filtered tokens are never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    probs = logits.softmax(-1)
    drawn = sample_logits(logits.repeat(n, 1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=6).double() / n
    multi = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(1))
    freq_multi = torch.bincount(multi, minlength=6).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() < 4 * se + 1e-9).all(), (freq, probs)
    assert ((freq - freq_multi).abs() < 6 * se + 1e-9).all()
    top2 = sample_logits(logits.repeat(n, 1), top_k=2, generator=torch.Generator().manual_seed(2))
    assert set(top2.tolist()) == {0, 1}
    freq2 = (top2 == 0).double().mean()
    assert abs(freq2 - torch.sigmoid(torch.tensor(1.0))) < 0.01  # p(0 | top-2) = e^2 / (e^2 + e^1)


def test_sample_py_compile_writes_the_eager_tokens(aot_eager, tmp_path):
    from test_evaluate import tiny_vqvae

    sha = tiny_vqvae().export_to(tmp_path / "tok", meta=ExportMeta(dataset={"name": "digits"}))
    torch.manual_seed(0)
    build_prior(PriorConfig(vocab_size=16, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                            attn_layers_heads=2, num_classes=10)).export_to(tmp_path / "prior",
                                                                            meta=ExportMeta(tokenizer_sha256=sha))
    from vqgen import sample

    argv = ["--checkpoint", str(tmp_path / "tok"), "--checkpoint_t", str(tmp_path / "prior"), "--num_samples", "6",
            "--batch_size", "4", "--cfg_scale", "2", "--no_png"]
    assert run_cli(sample.run, SampleConfig, [*argv, "--output_dir", str(tmp_path / "eager")]) == 0
    assert run_cli(sample.run, SampleConfig, [*argv, "--compile", "--output_dir", str(tmp_path / "compiled")]) == 0
    a, b = (np.load(tmp_path / name / "tokens.npy") for name in ("eager", "compiled"))
    assert a.shape == (6, 4, 4) and np.array_equal(a, b)


@pytest.mark.slow
def test_inductor_compiled_equals_eager():
    """The default backend (Inductor's C++ kernels on CPU): greedy and sampled tokens as eager decoding draws them."""
    torch._dynamo.reset()
    p = tiny(rope=True)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, labels=[0, 1, 2, -1, 1], cfg_scale=3.0,
                                             cfg_schedule="linear")):
        eager, compiled = both(p, **kw)
        assert torch.equal(eager, compiled), kw
