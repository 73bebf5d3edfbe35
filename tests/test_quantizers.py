"""Implicit-codebook quantizers (vqgen.models.quantizers): FSQ and LFQ with VectorQuantizerEMA's interface."""

import math
import os
import socket

import pytest
import torch

from vqgen.errors import ConfigError
from vqgen.models.quantizers.fsq import FSQ
from vqgen.models.quantizers.lfq import LFQ

MAKERS = {"fsq": lambda: FSQ([8, 5, 5, 5]), "lfq": lambda: LFQ(10, entropy_group_bits=5)}


def rand_z(q, b=2, h=5, w=5, seed=0):
    return torch.randn(b, q.code_dim, h, w, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_sizes_and_refusals():
    f, l18 = FSQ([8, 5, 5, 5]), LFQ(18)
    assert (f.codebook_size, f.code_dim) == (1000, 4)
    assert (l18.codebook_size, l18.code_dim, l18.group_sizes) == (1 << 18, 18, (9, 9))
    assert LFQ(17).group_sizes == (9, 8) and LFQ(8).group_sizes == (8,)
    assert f.state_dict() == {} and l18.state_dict() == {}   # no state: the config rebuilds the module exactly
    for bad in (lambda: FSQ([2, 5]), lambda: FSQ([]), lambda: FSQ([16] * 6), lambda: LFQ(0), lambda: LFQ(21),
                lambda: LFQ(8, temperature=0.0), lambda: LFQ(8, entropy_group_bits=13)):
        with pytest.raises(ConfigError):
            bad()


@pytest.mark.parametrize("kind", MAKERS)
def test_forward_shapes_and_straight_through(kind):
    q = MAKERS[kind]().train()
    z = rand_z(q).requires_grad_()
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == (2, 5, 5) and out.indices.dtype == torch.long
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert out.counts.shape == (q.codebook_size,) and int(out.counts.sum()) == 50
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=q.codebook_size))
    out.quantized.sum().backward()
    if kind == "lfq":  # sign with the identity gradient
        assert torch.equal(z.grad, torch.ones_like(z))
    else:              # rounding passed straight through to the tanh bound: positive, below 1
        assert (z.grad > 0).all() and (z.grad < 4).all()


def test_lfq_loss_gradient_reaches_z():
    q = LFQ(6, temperature=0.5).train()
    z = rand_z(q).requires_grad_()
    q(z).loss.backward()
    assert z.grad.isfinite().all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", MAKERS)
def test_indices_embed_round_trip(kind):
    q = MAKERS[kind]().eval()
    z = rand_z(q, seed=1)
    out = q(z)
    idx = q.indices_of(z)
    assert torch.equal(idx, out.indices)
    emb = q.embed(idx)
    assert emb.dtype == torch.float32 and torch.equal(emb, out.quantized)  # bitwise the decoder's input
    every = torch.arange(q.codebook_size).view(1, 1, -1)
    codes = q.embed(every)                                                   # (1, D, 1, K)
    assert codes.abs().max() <= 1 and torch.unique(codes[0, :, 0].t(), dim=0).shape[0] == q.codebook_size
    if kind == "lfq":
        assert torch.equal(q.indices_of(codes), every)


def test_fsq_grid_values():
    q = FSQ([3, 4])                                   # odd: {-1, 0, 1}; even: {-1, -1/2, 0, 1/2}
    codes = q.embed(torch.arange(12).view(1, 1, 12))[0, :, 0]
    assert sorted(set(codes[0].tolist())) == [-1.0, 0.0, 1.0]
    assert sorted(set(codes[1].tolist())) == [-1.0, -0.5, 0.0, 0.5]
    assert q.indices_of(torch.zeros(1, 2, 1, 1)).item() == 1 + 3 * 2   # z = 0: the centre levels (1, 2)
    big = q(torch.full((1, 2, 1, 1), 50.0)).quantized.flatten().tolist()
    assert big == [1.0, 0.5]                          # saturates at the top level of each channel


def test_usage_and_perplexity():
    q = LFQ(4, entropy_weight=0.0)
    every = q.embed(torch.arange(16).view(1, 4, 4))   # each code once
    out = q.eval()(every)
    assert out.perplexity.item() == pytest.approx(16, rel=1e-5) and int(q.usage.sum()) == 0  # eval: no usage
    q.train()(every[:, :, :2])
    assert q.usage_fraction() == pytest.approx(0.5) and q.usage.dtype == torch.long
    q.reset_usage()
    assert q.usage_fraction() == 0.0 and "usage" not in q.state_dict()
    assert LFQ.perplexity_from_counts(torch.tensor([5, 0, 0, 0])).item() == pytest.approx(1.0)
    f = FSQ([5, 5]).train()
    out = f(rand_z(f))
    assert out.perplexity.item() == pytest.approx(FSQ.perplexity_from_counts(out.counts).item())
    assert torch.equal(f.usage, out.counts)


@pytest.mark.parametrize("kind", MAKERS)
def test_fp32_under_bf16_autocast(kind):
    q = MAKERS[kind]().train()
    z = rand_z(q, seed=2)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(z)
        low = q(z.bfloat16())
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.quantized, ref.quantized)
    assert got.loss.dtype == torch.float32 and torch.equal(got.loss, ref.loss)
    assert low.quantized.dtype == torch.bfloat16 and low.loss.dtype == torch.float32
    q.bfloat16()                                       # a bf16 model: same codes for the same (fp32) input
    emb = q.embed(ref.indices)
    assert torch.equal(q.indices_of(z), ref.indices) and emb.dtype == torch.float32 and torch.equal(emb, ref.quantized)


def test_lfq_entropy_penalty_low_for_spread_codes_high_for_collapse():
    q = LFQ(4).train()
    spread = q.embed(torch.arange(16).repeat(8).view(2, 8, 8))            # every code equally often
    collapsed = torch.ones(2, 4, 8, 8)                                      # one code everywhere
    ps_s, cb_s = q.entropy_terms(spread)
    ps_c, cb_c = q.entropy_terms(collapsed)
    assert ps_s.item() == pytest.approx(0.0, abs=1e-6) and cb_s.item() == pytest.approx(4 * math.log(2), rel=1e-5)
    assert ps_c.item() == pytest.approx(0.0, abs=1e-6) and cb_c.item() == pytest.approx(0.0, abs=1e-6)
    penalty = [(ps - cb).item() for ps, cb in ((ps_s, cb_s), (ps_c, cb_c))]
    assert penalty[0] < penalty[1] - 2.5
    # unsure codes (z near 0) cost per-sample entropy
    assert q.entropy_terms(torch.full((1, 4, 2, 2), 1e-4))[0].item() > 2.0


def test_lfq_factorised_entropy_matches_the_explicit_codebook():
    """One group = MAGVIT-v2's softmax over all K codes (exact); several groups: same per-sample entropy, codebook
    entropy an upper bound."""
    z = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    one, two = LFQ(6, temperature=1.0, entropy_group_bits=6), LFQ(6, temperature=1.0, entropy_group_bits=3)
    c = one.embed(torch.arange(64).view(1, 1, 64))[0, :, 0].t()           # (K, D) in {-1, 1}
    p = torch.softmax(2 * z.permute(0, 2, 3, 1).reshape(-1, 6) @ c.t() / 1.0, dim=1)   # (N, K)
    ps_ref, cb_ref = torch.special.entr(p).sum(1).mean(), torch.special.entr(p.mean(0)).sum()
    ps1, cb1 = one.entropy_terms(z)
    ps2, cb2 = two.entropy_terms(z)
    torch.testing.assert_close((ps1, cb1), (ps_ref, cb_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ps2, ps_ref, rtol=1e-5, atol=1e-5)
    assert cb2 >= cb_ref - 1e-5


@pytest.mark.parametrize("kind", MAKERS)
def test_deterministic_and_state_dict_round_trip(kind):
    a = MAKERS[kind]().train()
    z = rand_z(a, seed=4)
    x, y = a(z), a(z)
    assert all(torch.equal(u, v) for u, v in zip(x, y))
    b = MAKERS[kind]().train()
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(torch.equal(u, v) for u, v in zip(x, b(z)))


@pytest.mark.parametrize("kind", MAKERS)
def test_compiles_without_graph_breaks(kind):
    """No host syncs in the forward: dynamo traces the training forward as one graph."""
    q = MAKERS[kind]().train()
    z = rand_z(q, seed=5)
    ref = q(z)
    got = torch.compile(q, fullgraph=True, backend="eager")(z)
    assert torch.equal(got.indices, ref.indices) and torch.allclose(got.loss, ref.loss)


@pytest.mark.parametrize("kind,k", [("fsq", 1000), ("lfq", 16)])
def test_vqvae_holds_an_implicit_quantizer(kind, k):
    from factories import tiny_vqvae
    model = tiny_vqvae(k=k)                            # embedding_dim 4 = FSQ([8, 5, 5, 5]).code_dim = LFQ(4).code_dim
    model.quantizer = FSQ([8, 5, 5, 5]) if kind == "fsq" else LFQ(4)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = model.train()(x)
    (out.recon.square().mean() + out.vq_loss).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
    model.eval()
    idx = model.encode_to_indices(x)
    assert idx.shape == (3, 4, 4) and torch.equal(idx, model(x).indices)
    assert model.decode_indices(idx).shape == x.shape


# ---- distributed: the codebook entropy of LFQ uses the probabilities of all ranks --------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lfq_worker(rank, world, port, batches, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q = LFQ(5, temperature=0.5, entropy_group_bits=3).train()
        z = batches[rank].clone().requires_grad_()
        out = q(z)
        out.loss.backward()
        _, codebook = q.entropy_terms(z.detach())
        torch.save({"loss": out.loss.detach(), "codebook": codebook, "grad": z.grad},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_lfq_two_processes_share_the_codebook_entropy(tmp_path):
    import torch.multiprocessing as mp
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen) + 0.7]
    mp.spawn(_lfq_worker, args=(2, _free_port(), batches, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt") for i in (0, 1)]
    single = LFQ(5, temperature=0.5, entropy_group_bits=3).train()
    z = torch.cat(batches).requires_grad_()
    out = single(z)
    out.loss.backward()
    _, cb = single.entropy_terms(z.detach())
    assert torch.equal(r[0]["codebook"], r[1]["codebook"])                     # every rank sees the same term
    torch.testing.assert_close(r[0]["codebook"], cb, rtol=1e-5, atol=1e-6)      # = one process on the whole batch
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, out.loss.detach(), rtol=1e-5, atol=1e-6)
    # DDP averages the ranks' gradients: that average is the whole batch's gradient
    torch.testing.assert_close(torch.cat([r[0]["grad"], r[1]["grad"]]) / 2, z.grad, rtol=1e-4, atol=1e-7)
