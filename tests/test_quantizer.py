"""VectorQuantizerEMA: EMA update, eval purity, dead-code restart, fp32 under autocast, perplexity, DDP sync."""

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from vqgen.models.quantizers.vq import VectorQuantizerEMA


def make_q(K=4, D=2, codebook=None, **kw):
    kw.setdefault("dead_code_threshold", 0.0)
    q = VectorQuantizerEMA(K, D, **kw)
    if codebook is not None:  # a known, already-initialised codebook with one "virtual" vector per code
        q.embedding.copy_(codebook)
        q.embed_sum.copy_(codebook)
        q.cluster_size.fill_(1.0)
        q.initialized.fill_(True)
    return q


def as_z(flat, h=1):
    """(N, D) rows → z (1, D, h, N/h) whose flattened (row-major over h, w) positions are the rows in order."""
    N, D = flat.shape
    return flat.t().reshape(1, D, h, N // h).contiguous()


CODES = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])


def test_ema_update_moves_codes_toward_assigned_inputs():
    q = make_q(codebook=CODES).train()
    gen = torch.Generator().manual_seed(0)
    target = CODES + torch.tensor([0.5, -0.3])          # every cluster is shifted by the same offset
    flat = (target.repeat_interleave(8, 0) + 0.05 * torch.randn(32, 2, generator=gen))
    out = q(as_z(flat))
    assert out.counts.tolist() == [8, 8, 8, 8]
    before = (CODES - target).norm(dim=1)
    after = (q.embedding - target).norm(dim=1)
    assert torch.all(after < before)
    # Exact EMA arithmetic (Laplace smoothing included).
    sums = torch.zeros(4, 2).index_add_(0, out.indices.flatten(), flat)
    cs = 0.99 * 1 + 0.01 * 8
    es = 0.99 * CODES + 0.01 * sums
    n = 4 * cs
    smoothed = (cs + 1e-5) / (n + 4 * 1e-5) * n
    torch.testing.assert_close(q.embedding, es / smoothed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.cluster_size, torch.full((4,), cs))
    assert int(q.step) == 1 and q.usage.tolist() == [8.0] * 4


def test_eval_mode_and_encode_path_do_not_change_buffers():
    q = make_q(codebook=CODES, dead_code_threshold=1.0, restart_every=1)
    z = torch.randn(2, 2, 3, 3) * 3
    before = {k: v.clone() for k, v in q.named_buffers()}
    q.eval()
    q(z)
    q.train()
    q.indices_of(z)  # the tokenizer path never touches the EMA, even in training mode
    for k, v in q.named_buffers():
        assert torch.equal(v, before[k]), k


def test_uninitialised_codebook_is_set_from_first_batch():
    q = VectorQuantizerEMA(8, 3, init_kmeans_iters=0).train()
    flat = torch.randn(64, 3) * 5 + 10
    q(as_z(flat, h=8))
    assert bool(q.initialized)
    # Every code sits on (or, after this step's small EMA move, next to) an encoder output.
    d = torch.cdist(q.embedding, flat).min(1).values
    assert d.max() < 1.0, d
    # With k-means-lite the codes are cluster centres of the data; no code is stuck far away.
    q2 = VectorQuantizerEMA(8, 3, init_kmeans_iters=5).train()
    q2(as_z(flat, h=8))
    assert (q2.embedding.mean(0) - flat.mean(0)).abs().max() < 3.0
    assert q2.cluster_size.min() > 0


def test_dead_codes_are_restarted_to_encoder_outputs():
    cb = CODES.clone()
    cb[3] = torch.tensor([100.0, 100.0])                 # never the nearest code
    q = make_q(codebook=cb, dead_code_threshold=1.0, restart_every=1).train()
    flat = CODES[:3].repeat_interleave(5, 0) + 0.1 * torch.randn(15, 2)
    q(as_z(flat, h=3))                                    # cluster_size[3] = 0.99 < 1 -> restarted
    row_dist = (flat - q.embedding[3]).norm(dim=1).min()
    assert row_dist < 1e-6, "dead code 3 must be moved onto an encoder output of this batch"
    assert q.cluster_size[3].item() == pytest.approx(1.0)
    torch.testing.assert_close(q.embed_sum[3], q.embedding[3] * 1.0)
    # Live codes were not restarted.
    assert q.cluster_size[:3].min() > 1.0
    assert int(q.restarts) == 1


def test_dead_codes_checked_only_every_restart_every_steps():
    cb = CODES.clone()
    cb[3] = torch.tensor([100.0, 100.0])
    q = make_q(codebook=cb, dead_code_threshold=1.0, restart_every=2).train()
    flat = CODES[:3].repeat_interleave(5, 0)
    q(as_z(flat, h=3))
    assert q.embedding[3].min() > 90 and int(q.restarts) == 0   # step 1: not due (still far away)
    q(as_z(flat, h=3))
    assert (flat - q.embedding[3]).norm(dim=1).min() < 1e-6 and int(q.restarts) == 1


def test_fp32_under_bf16_autocast():
    q = make_q(K=16, D=8, codebook=torch.randn(16, 8))
    z = torch.randn(4, 8, 5, 5)
    q.eval()
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(z)
        got_low = q(z.bfloat16())
    assert torch.equal(ref.indices, got.indices)
    assert got.loss.dtype == torch.float32 and q.embedding.dtype == torch.float32
    assert got_low.quantized.dtype == torch.bfloat16   # output follows the input dtype
    # Training under autocast gives bit-identical EMA state to training in fp32.
    q32, qbf = copy.deepcopy(q).train(), copy.deepcopy(q).train()
    q32(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qbf(z)
    for (k, a), (_, b) in zip(q32.named_buffers(), qbf.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    # Casting the module keeps the codebook fp32.
    qbf.bfloat16()
    assert all(getattr(qbf, n).dtype == torch.float32 for n in ("embedding", "cluster_size", "embed_sum"))


def test_perplexity_equals_num_codes_for_uniform_assignment():
    K = 8
    cb = torch.randn(K, 4) * 10
    q = make_q(K=K, D=4, codebook=cb).eval()
    z = as_z(cb.repeat(3, 1), h=3)                         # each code exactly 3 times
    out = q(z)
    assert out.counts.tolist() == [3] * K
    assert out.perplexity.item() == pytest.approx(K, rel=1e-5)
    assert VectorQuantizerEMA.perplexity_from_counts(torch.tensor([5, 0, 0, 0])).item() == pytest.approx(1.0)


def test_straight_through_and_commitment_loss():
    q = make_q(codebook=CODES).eval()
    z = (torch.randn(1, 2, 2, 2) + 2).requires_grad_()
    out = q(z)
    codes = CODES[out.indices.flatten()].view(1, 2, 2, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, codes)
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(z, codes))
    (out.quantized.sum() + out.loss).backward()
    expected = torch.ones_like(z) + 0.25 * 2 * (z - codes) / z.numel()
    torch.testing.assert_close(z.grad, expected)


def test_usage_tracking():
    q = make_q(codebook=CODES).train()
    q(as_z(CODES[:2].repeat(2, 1), h=2))
    assert q.usage_fraction() == pytest.approx(0.5)
    q.reset_usage()
    assert q.usage_fraction() == 0.0
    assert "usage" not in q.state_dict()  # a run-time statistic, not part of exports


# ---- distributed: all_reduce keeps codebooks identical and equal to one process on the whole batch ----------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, batches, init_cb, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # 1) EMA update from different local batches.
        q = make_q(K=init_cb.shape[0], D=init_cb.shape[1], codebook=init_cb).train()
        q(batches[rank])
        # 2) First-batch initialisation (rank 0 draws, broadcast) + dead-code restart (rank 0 draws, broadcast).
        torch.manual_seed(1234 + rank)  # deliberately different RNG per rank
        q2 = VectorQuantizerEMA(init_cb.shape[0], init_cb.shape[1], dead_code_threshold=50.0, restart_every=1).train()
        q2(batches[rank])
        q2(batches[1 - rank])
        torch.save({"ema": {k: v for k, v in q.state_dict().items()},
                    "restart": {k: v for k, v in q2.state_dict().items()}}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_codebooks_identical_and_match_single_process(tmp_path):
    import torch.multiprocessing as mp
    gen = torch.Generator().manual_seed(0)
    K, D = 6, 3
    init_cb = torch.randn(K, D, generator=gen)
    batches = [torch.randn(2, D, 3, 3, generator=gen), torch.randn(2, D, 3, 3, generator=gen) + 0.5]
    mp.spawn(_dist_worker, args=(2, _free_port(), batches, init_cb, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    for part in ("ema", "restart"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}: buffer {k} differs between ranks"
    single = make_q(K=K, D=D, codebook=init_cb).train()
    single(torch.cat(batches))
    for k in ("embedding", "cluster_size", "embed_sum"):
        torch.testing.assert_close(r0["ema"][k], getattr(single, k), rtol=0, atol=1e-6)
    assert int(r0["restart"]["step"]) == 2
