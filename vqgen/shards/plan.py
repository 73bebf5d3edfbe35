"""Which samples of a token split each rank reads in an epoch, and in which batches: a pure function, no I/O.

Every rank reads ~1/W of the data in the same number of batches (DDP never waits at an epoch end, no rank starves
with few shards): the shards in an order shuffled by (seed, epoch), rank r takes the positions ``[r*P, (r+1)*P)``,
its batches come from ``streams`` sub-ranges shuffled by a jittered sort computed before any read, and DataLoader
workers take batches round robin (a batch never depends on ``num_workers``). ``skip_batches`` resumes bitwise on the
same spec; another world size continues the epoch with the samples not yet seen (:func:`resume_history`). The rules
one by one, per-sample draws and ``resampled``: docs/NOTES.md.
Adapted from: webdataset's shuffle buffer and ``ResampledShards``/``with_epoch``; open-muse ``distribute_shards``
(assignment as a pure, tested function of (rank, world_size, worker)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..hashing import mix64

_ORDER, _DRAW, _JITTER, _FLIP, _VIEW = 1, 2, 3, 4, 5  # purposes of the seeded generators


@dataclass(frozen=True)
class PlanSpec:
    """Everything besides (epoch, rank) that decides a rank's batches; stored in checkpoints via ``asdict``."""

    batch_size: int
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 2000
    streams: int = 8
    drop_last: bool = False
    resampled: bool = False
    epoch_samples: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "world_size", "shuffle_buffer", "streams"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epoch_samples is not None and (self.epoch_samples < 1 or not self.resampled):
            raise ValueError(f"epoch_samples (got {self.epoch_samples}) must be >= 1 and needs resampled=True: "
                             f"without resampling an epoch is one pass over the split")

    @property
    def num_streams(self) -> int:
        return self.streams if self.shuffle else 1  # unshuffled: batches in file order

    def num_batches(self, total: int) -> int:
        """Batches per rank in a full epoch of a split of ``total`` samples (what :func:`plan_epoch` gives)."""
        per_rank = self.epoch_samples or total // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    @classmethod
    def from_dict(cls, d: dict) -> "PlanSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class ResumePoint:
    """An interrupted run of an epoch: its spec and the batches each of its ranks had finished."""

    spec: PlanSpec
    batches_done: int

    def to_dict(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "batches_done": self.batches_done}

    @classmethod
    def from_dict(cls, d: dict) -> "ResumePoint":
        return cls(PlanSpec.from_dict(d["spec"]), int(d["batches_done"]))


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


class RankPlan:
    """One rank's epoch. ``order``: shard index of each slot (a slot is one pass over a shard; slots repeat shards
    only when resampled); ``cum``: sample offset of each slot, ``len(order) + 1`` entries; ``positions``: the
    rank's positions (sorted, int64) in that coordinate system."""

    def __init__(self, spec: PlanSpec, epoch: int, rank: int, order: np.ndarray, cum: np.ndarray,
                 positions: np.ndarray, salt: int, flip_salt: int):
        self.spec, self.epoch, self.rank, self.salt, self._flip_salt = spec, int(epoch), int(rank), salt, flip_salt
        self.order, self.cum = order, cum
        B, P = spec.batch_size, len(positions)
        self.num_batches = P // B if spec.drop_last else -(-P // B)
        self.samples = min(P, self.num_batches * B)
        self.positions = positions[: self.samples]
        self.num_streams = S = spec.num_streams
        sizes = np.full(self.num_batches, B, dtype=np.int64)
        if self.num_batches:
            sizes[-1] = self.samples - (self.num_batches - 1) * B  # only the rank's last batch may be short
        per_stream = np.bincount(np.arange(self.num_batches) % S, weights=sizes, minlength=S).astype(np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(per_stream)])  # stream s: positions[bounds[s]:bounds[s+1]]
        self._orders: dict[int, np.ndarray] = {}
        self._keys: dict[int, np.uint64] = {}

    def stream_positions(self, s: int) -> np.ndarray:
        return self.positions[self.bounds[s]: self.bounds[s + 1]]

    def stream_order(self, s: int) -> np.ndarray:
        """Emission order of stream s as indices into :meth:`stream_positions` (the jittered sort, see module)."""
        if s not in self._orders:
            n = int(self.bounds[s + 1] - self.bounds[s])
            if self.spec.shuffle and n > 1:
                u = _rng(self.spec.seed, self.epoch, self.rank, s, self.salt, _JITTER).random(n)
                self._orders[s] = np.argsort(np.arange(n) + self.spec.shuffle_buffer * u, kind="stable")
            else:
                self._orders[s] = np.arange(n)
        return self._orders[s]

    def batch(self, b: int) -> tuple[int, np.ndarray]:
        """(stream, indices into that stream's positions) of batch ``b``, in batch order."""
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} of {self.num_batches}")
        B, S = self.spec.batch_size, self.num_streams
        size = B if b < self.num_batches - 1 else self.samples - (self.num_batches - 1) * B
        return b % S, self.stream_order(b % S)[(b // S) * B: (b // S) * B + size]

    def batch_positions(self, b: int) -> np.ndarray:
        s, local = self.batch(b)
        return self.stream_positions(s)[local]

    def consumed(self, k: int) -> np.ndarray:
        """Positions of the rank's first ``k`` batches (unsorted)."""
        B, S, out = self.spec.batch_size, self.num_streams, []
        for s in range(S):
            n_before = max(0, -(-(min(k, self.num_batches) - s) // S))  # batches s, s+S, ... below k
            out.append(self.stream_positions(s)[self.stream_order(s)[: n_before * B]])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, sample index inside that slot's shard) of each position."""
        slot = np.searchsorted(self.cum, positions, side="right") - 1
        return slot, positions - self.cum[slot]

    def _hash(self, positions: np.ndarray, purpose: int) -> np.ndarray:
        """A uint64 hash of (seed, epoch, position) per sample: independent of W and workers. For a given (seed,
        epoch) a position is one sample of the split, so this is a per-(seed, epoch, sample) draw."""
        if purpose not in self._keys:
            rng = _rng(self.spec.seed, self.epoch, self._flip_salt, purpose)
            self._keys[purpose] = np.uint64(int(rng.integers(1 << 63)))
        with np.errstate(over="ignore"):
            return mix64(positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + self._keys[purpose])

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """Mirror coin per sample (see :meth:`_hash`)."""
        return (self._hash(positions, _FLIP) >> np.uint64(63)).astype(bool)

    def views(self, positions: np.ndarray, n: int) -> np.ndarray:
        """Which of a sample's ``n`` views it gives this epoch (int64 in [0, n); see :meth:`_hash`)."""
        return ((self._hash(positions, _VIEW) >> np.uint64(32)) % np.uint64(n)).astype(np.int64)


def _shard_order(counts: np.ndarray, spec: PlanSpec, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.arange(len(counts))
    if spec.shuffle:
        order = _rng(spec.seed, epoch, _ORDER).permutation(len(counts))
    return order, np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)


def _drawn_order(counts: np.ndarray, need: int, seed_parts: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Shards drawn with replacement until they hold ``need`` samples (ResampledShards)."""
    rng, drawn, have = _rng(*seed_parts), [], 0
    nonempty = np.flatnonzero(counts > 0)
    while have < need:
        k = nonempty[rng.integers(len(nonempty), size=max(1, -(-(need - have) // max(1, int(counts.mean())))))]
        drawn.append(k)
        have += int(counts[k].sum())
    order = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
    cum = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)
    last = int(np.searchsorted(cum, need, side="left"))  # drop draws past the one that reaches `need`
    return order[:last], cum[: last + 1]


def plan_epoch(counts: Sequence[int], spec: PlanSpec, epoch: int, rank: int,
               history: Sequence[ResumePoint] = ()) -> RankPlan:
    """Rank ``rank``'s plan of ``epoch``. ``history``: earlier interrupted runs of this epoch under other specs
    (oldest first, see :func:`resume_history`); the samples they consumed are left out of this plan."""
    counts = np.asarray(counts, dtype=np.int64)
    if not 0 <= rank < spec.world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={spec.world_size}")
    if spec.resampled:
        return _plan_resampled(counts, spec, epoch, rank, history)
    pool: np.ndarray | None = None  # positions still to give out; None: all of them
    for i, point in enumerate(history):
        ps = point.spec
        if ps.resampled or ps.shuffle != spec.shuffle or ps.seed != spec.seed:
            raise ValueError("a resume history must keep seed, shuffle and resampled")
        used = [_plan_pool(counts, ps, epoch, r, pool, i).consumed(point.batches_done) for r in range(ps.world_size)]
        base = np.arange(int(counts.sum()), dtype=np.int64) if pool is None else pool
        pool = np.setdiff1d(base, np.concatenate(used), assume_unique=True)
    return _plan_pool(counts, spec, epoch, rank, pool, len(history))


def _plan_pool(counts, spec: PlanSpec, epoch: int, rank: int, pool: np.ndarray | None, salt: int) -> RankPlan:
    order, cum = _shard_order(counts, spec, epoch)
    n = int(cum[-1]) if pool is None else len(pool)
    per_rank = n // spec.world_size
    if pool is None:
        positions = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)
    else:
        positions = pool[rank * per_rank: (rank + 1) * per_rank]
    return RankPlan(spec, epoch, rank, order, cum, positions, salt, flip_salt=0)


def _plan_resampled(counts, spec: PlanSpec, epoch: int, rank: int, history: Sequence[ResumePoint]) -> RankPlan:
    total = None  # samples still owed to the epoch, over all ranks
    for point in history:
        ps = point.spec
        per = (ps.epoch_samples or int(counts.sum()) // ps.world_size) if total is None else total // ps.world_size
        used = min(per, point.batches_done * ps.batch_size)
        total = ps.world_size * (per - used)
    need = (spec.epoch_samples or int(counts.sum()) // spec.world_size) if total is None else total // spec.world_size
    salt = len(history)
    order, cum = _drawn_order(counts, need, (spec.seed, epoch, rank, salt, _DRAW))
    positions = np.arange(need, dtype=np.int64)
    return RankPlan(spec, epoch, rank, order, cum, positions, salt, flip_salt=1 + rank)


def resume_history(history: Sequence[ResumePoint], saved: PlanSpec, batches_done: int,
                   spec: PlanSpec) -> tuple[list[ResumePoint], int, str | None]:
    """How to continue an epoch saved under ``saved`` after ``batches_done`` batches, now running ``spec``.

    Returns (history for :func:`plan_epoch`, skip_batches, a warning line or None). Same spec: the same plan,
    ``batches_done`` skipped (bitwise exact). Otherwise the saved run becomes a history point and the new plan
    covers the samples it had not consumed; the warning says so.
    """
    if saved == spec:
        return list(history), batches_done, None
    if batches_done == 0:
        return list(history), 0, None
    fixed = [f for f in ("seed", "shuffle", "resampled") if getattr(saved, f) != getattr(spec, f)]
    if fixed:  # the samples consumed are positions in the epoch's shard order, which these decide
        raise ValueError(f"cannot continue an epoch mid-way with another {', '.join(fixed)} ({_diff(saved, spec)}): "
                         f"resume with the saved values, or from an epoch-end checkpoint")
    warning = (f"warning: resuming mid-epoch with another reader setup ({_diff(saved, spec)}): the epoch continues "
               f"with the {'remaining share of samples' if spec.resampled else 'samples it had not yet seen'}, "
               f"not with the batches an uninterrupted run would have drawn")
    return [*history, ResumePoint(saved, batches_done)], 0, warning


def _diff(a: PlanSpec, b: PlanSpec) -> str:
    return ", ".join(f"{f.name} {getattr(a, f.name)} -> {getattr(b, f.name)}" for f in dataclasses.fields(a)
                     if getattr(a, f.name) != getattr(b, f.name))
