"""Vector quantiser with an EMA codebook, made robust for training (the ``vq`` kind of ``--quantizer``).

fp32 always (even under autocast or ``model.half()``), codebook initialised from the first batch (k-means-lite),
statistics all-reduced so every rank keeps the same codebook, dead codes restarted at error-weighted encoder
outputs, no host sync in the training step. Why each of these: docs/ARCHITECTURE.md ("Quantizers").
Adapted from: Sonnet v2 / MONAI ``EMAQuantizer`` (EMA with Laplace smoothing), OpenAI Jukebox (restarts at encoder
outputs), EnCodec ``core_vq.py`` (k-means initialisation), LlamaGen (l2-normalised codes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from .base import Quantizer, QuantizerOutput, broadcast_, dist_world, is_rank0


class VectorQuantizerEMA(Quantizer):
    """EMA vector quantiser. Input ``z`` (B, D, H, W) → :class:`QuantizerOutput`.

    Buffers (all fp32 unless noted; persistent ones are part of exports):
        ``embedding`` (K, D) the codebook; ``cluster_size`` (K,) EMA of assignments per step; ``embed_sum`` (K, D)
        EMA of summed assigned vectors; ``initialized`` (bool); ``step`` (long, training forwards so far);
        ``usage`` (K,) non-persistent assignment counts since :meth:`reset_usage`; ``restarts`` (long,
        non-persistent) total dead-code restarts, for logging.
    """

    _FP32_BUFFERS = ("embedding", "cluster_size", "embed_sum", "window_counts", "usage")

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, decay: float = 0.99,
                 epsilon: float = 1e-5, dead_code_threshold: float = 1.0, restart_every: int = 10,
                 init_kmeans_iters: int = 10, l2_norm: bool = False):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_every = int(restart_every)
        self.init_kmeans_iters = int(init_kmeans_iters)
        # l2-normalised codebook: codes and encoder outputs on the unit sphere, so the nearest code is the most
        # cosine-similar one and the codebook's scale cannot drift from the encoder's.
        self.l2_norm = bool(l2_norm)
        K, D = self.num_embeddings, self.embedding_dim
        # Placeholder codebook until the first training batch initialises it (also what an untrained model uses).
        self.register_buffer("embedding", torch.randn(K, D))
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", self.embedding.clone())
        # (1,)-shaped rather than 0-dim: export_fingerprint views every tensor as bytes, which 0-dim tensors refuse.
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.bool))
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        # Assignments since the last dead-code check: dead = fewer than threshold x restart_every in the window.
        self.register_buffer("window_counts", torch.zeros(K))
        self.register_buffer("usage", torch.zeros(K), persistent=False)
        self.register_buffer("restarts", torch.zeros(1, dtype=torch.long), persistent=False)  # total, for logging
        # Host-side mirror of `initialized` so the hot path never syncs with the device (re-read after loading).
        self._host_initialized: bool | None = None

    @classmethod
    def from_config(cls, cfg) -> "VectorQuantizerEMA":
        """From a :class:`~vqgen.config.VQVAEConfig` (``--quantizer vq``)."""
        return cls(cfg.num_embeddings, cfg.embedding_dim, cfg.commitment_cost, cfg.ema_decay, cfg.ema_epsilon,
                   cfg.dead_code_threshold, cfg.restart_every, cfg.init_kmeans_iters, cfg.codebook_l2)

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    @property
    def code_dim(self) -> int:
        return self.embedding_dim

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, decay={self.decay}, "
                f"dead_code_threshold={self.dead_code_threshold}, restart_every={self.restart_every}, "
                f"l2_norm={self.l2_norm}")

    # ---- keep the codebook fp32 whatever the module is cast to ------------------------------------------------
    def _apply(self, fn, recurse=True):
        before = {n: self._buffers[n] for n in self._FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:  # e.g. model.half(): keep the fp32 values, follow only the device
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initialized = None

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        """Unit length along dim 1 (codes of (K, D), vectors of (B, D, H, W)) with ``l2_norm``, else unchanged."""
        return F.normalize(v, dim=1) if self.l2_norm else v

    # ---- lookups (no state change) ---------------------------------------------------------------------------
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (N, D), in fp32. Ties → lowest index."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return self._nearest_to(flat.float(), self.embedding)

    def indices_of(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) → (B, H, W) long code indices. Never touches the EMA state."""
        B, _, H, _ = z.shape
        flat = rearrange(self._norm(z.detach().float()), "b d h w -> (b h w) d")
        return rearrange(self.nearest(flat), "(b h w) -> b h w", b=B, h=H)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) long → (B, D, H, W) fp32 codes (a channels-last view: no copy)."""
        return rearrange(F.embedding(indices, self.embedding), "b h w d -> b d h w")

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"quantizer expects (B, {self.embedding_dim}, H, W), got {tuple(z.shape)}")
        B, _, H, W = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = self._norm(z.float())                              # unit vectors with l2_norm
            flat = rearrange(zf.detach(), "b d h w -> (b h w) d")  # (N, D); a view when z is channels-last
            if self.training and not self._is_initialized():
                self.init_codebook(flat)
            idx = self.nearest(flat)                               # (N,)
            # (K,) local counts; index_add_ rather than bincount, which syncs with the GPU to size its output.
            counts = torch.zeros(self.num_embeddings, dtype=torch.long, device=idx.device).index_add_(
                0, idx, torch.ones_like(idx))
            q = rearrange(F.embedding(idx, self.embedding), "(b h w) d -> b d h w", b=B, h=H)  # pre-update codes
            if self.training:
                self._train_update(flat, idx, counts)
            loss = self.commitment_cost * F.mse_loss(zf, q)        # q carries no grad: sg(q)
            q_st = zf + (q - zf).detach()                           # straight-through estimator
            perplexity = self.perplexity_from_counts(counts)
        return QuantizerOutput(q_st.to(z.dtype), loss, idx.view(B, H, W), perplexity, counts)

    # ---- training-only state updates -------------------------------------------------------------------------
    def _store_codes(self, codes: torch.Tensor) -> None:
        """The EMA means (K, D) become the codebook (on the unit sphere with ``l2_norm``)."""
        if self.l2_norm:
            self._store_unit_codes(codes)
        else:
            self.embedding.copy_(codes)

    @torch.compiler.disable  # Inductor (torch 2.14) fails to generate code for the l2 normalise + copy_ into the
    def _store_unit_codes(self, codes: torch.Tensor) -> None:  # buffer (KeyError 'buf11'): a graph break, eager;
        self.embedding.copy_(self._norm(codes))                 # the plain codebook stays in the compiled graph

    @torch.compiler.disable
    def _read_initialized(self) -> bool:
        return bool(self.initialized)

    def _is_initialized(self) -> bool:
        if self._host_initialized is None:
            self._host_initialized = self._read_initialized()
        return self._host_initialized

    @torch.compiler.disable  # one-off, data-dependent (k-means loop); runs eagerly under torch.compile
    @torch.no_grad()
    def init_codebook(self, flat: torch.Tensor) -> None:
        """Set the codebook from encoder outputs ``flat`` (N, D): K random rows + k-means-lite (rank 0, broadcast)."""
        K = self.num_embeddings
        emb = torch.empty_like(self.embedding)
        size = torch.empty_like(self.cluster_size)
        if is_rank0():
            flat = flat.float()
            emb.copy_(self._sample_rows(flat, K))
            for _ in range(self.init_kmeans_iters):
                idx = self._nearest_to(flat, emb)
                n = torch.bincount(idx, minlength=K).float()
                sums = torch.zeros_like(emb).index_add_(0, idx, flat)
                keep = n > 0  # empty clusters keep their previous centre
                emb[keep] = self._norm(sums[keep] / n[keep, None])
            idx = self._nearest_to(flat, emb)
            size.copy_(torch.bincount(idx, minlength=K).float().clamp_min(1.0))
        broadcast_(emb)
        broadcast_(size)
        self.embedding.copy_(self._norm(emb))
        self.cluster_size.copy_(size)
        self.embed_sum.copy_(emb * size[:, None])
        self.initialized.fill_(True)
        self._host_initialized = True

    @staticmethod
    def _nearest_to(flat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # argmin ||x - e||^2 = argmin (||e||^2 - 2 x.e): ||x||^2 is constant per row.   (N, K) -> (N,)
        return torch.addmm((emb * emb).sum(1), flat, emb.t(), beta=1.0, alpha=-2.0).argmin(1)

    @staticmethod
    def _sample_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``flat``: distinct when possible, else with replacement plus tiny noise."""
        N, D = flat.shape
        if N >= n:
            return flat[torch.randperm(N, device=flat.device)[:n]].clone()
        rows = flat[torch.randint(N, (n,), device=flat.device)]
        std = flat.std().clamp_min(1e-3) * 0.01 if N > 1 else torch.tensor(0.01, device=flat.device)
        return rows + torch.randn_like(rows) * std

    def _restart_candidates(self, flat: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` encoder outputs drawn with probability proportional to their squared quantisation error.

        Uniform draws mostly land in the densest region (e.g. the background of digit images), right next to a
        code that already wins there, so the restarted code dies again; error-weighted draws (k-means++ seeding)
        put dead codes where the codebook represents the data worst. No host sync (multinomial on device).
        """
        err = (flat - self.embedding[idx]).pow(2).sum(1) + 1e-12    # (N,)
        return flat[torch.multinomial(err, n, replacement=True)]

    @torch.no_grad()
    def _train_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA update from this step's (all-reduced) statistics, then the periodic dead-code restart.

        No host syncs and no data-dependent shapes (torch.compile / CUDA-graph friendly): the restart decision
        is a device-side mask, and the candidate vectors (K random encoder outputs, drawn on rank 0) ride in the
        same all_reduce as the statistics (other ranks contribute zeros), so every rank gets rank 0's draw.
        """
        K, D = self.num_embeddings, self.embedding_dim
        restarts = self.dead_code_threshold > 0
        # (K, D | 1 | D): summed vectors, counts, restart candidates — one collective per step.
        stats = torch.zeros(K, 2 * D + 1 if restarts else D + 1, device=flat.device, dtype=torch.float32)
        stats[:, :D].index_add_(0, idx, flat)
        stats[:, D] = counts.float()
        if restarts and is_rank0():
            stats[:, D + 1:] = self._restart_candidates(flat, idx, K)
        if dist_world() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        batch_sum, batch_counts = stats[:, :D], stats[:, D]

        self.cluster_size.mul_(self.decay).add_(batch_counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(batch_sum, alpha=1 - self.decay)
        # Laplace smoothing keeps the division finite for (nearly) unused codes.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + K * self.epsilon) * n
        self._store_codes(self.embed_sum / smoothed[:, None])
        self.usage.add_(batch_counts)
        self.window_counts.add_(batch_counts)
        self.step.add_(1)

        if restarts:
            # Dead = fewer than `threshold` assignments per step over the last `restart_every` steps (the window
            # counts), checked at the end of each window. The window reacts within `restart_every` steps; the EMA
            # usage alone (decay 0.99) takes hundreds of steps to fall below the threshold, far too slow for short
            # runs. A restarted code sits on an error-weighted encoder output with a light cluster (size =
            # threshold) so it moves fast; it survives the next check only if it wins about `threshold` vectors per
            # step.
            due = (self.step % self.restart_every) == 0                         # (1,) bool
            dead = (self.window_counts < self.dead_code_threshold * self.restart_every) & due  # (K,)
            self.window_counts.mul_((~due).float())
            new = stats[:, D + 1:]
            c = max(self.dead_code_threshold, self.epsilon)
            self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, c), self.cluster_size))
            self.embed_sum.copy_(torch.where(dead[:, None], new * c, self.embed_sum))
            self.embedding.copy_(torch.where(dead[:, None], new, self.embedding))
            self.restarts.add_(dead.sum())
