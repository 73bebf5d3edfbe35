"""Stage 2: encode a dataset into VQ token shards (``python extract_codes.py`` or ``accelerate launch``).

Each rank encodes ``shards.rank_indices(n, rank, world_size)`` (strided) in batches that never straddle a shard
boundary (so a resumed run batches, and therefore encodes, exactly like an uninterrupted one) and writes its own
shards through :class:`vqgen.shards.RankShardWriter`; the main process merges the per-rank parts into
``manifest.json`` once every rank is done. ``--hflip`` stores the tokens of the mirrored image in the same sample
as ``tokens_flip.npy`` (one sample per source image, so "every sample exactly once" keeps its meaning).
Adapted from: LlamaGen ``extract_codes_c2i.py`` and open-muse ``pre_encode.py`` (plus resume and a manifest).
"""

from __future__ import annotations

import json
import queue
import re
import threading
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import shards
from .config import ExtractConfig
from .flags import validate
from .errors import ConfigError
from .hub import is_hub_ref
from .launch import start_processes

AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _json(obj):
    """JSON-normalised copy (tuples -> lists) so stored and fresh settings compare equal."""
    return json.loads(json.dumps(obj))


class ShardAlignedBatches(torch.utils.data.Sampler):
    """Batches of source indices cut at every ``shard_size`` boundary of ``indices`` (lazy: constant memory)."""

    def __init__(self, indices: range, shard_size: int, batch_size: int):
        self.indices, self.shard_size, self.batch_size = indices, shard_size, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(0, len(self.indices), self.shard_size):
            shard = self.indices[s: s + self.shard_size]
            for b in range(0, len(shard), self.batch_size):
                yield list(shard[b: b + self.batch_size])

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.shard_size)
        return full * -(-self.shard_size // self.batch_size) + -(-rest // self.batch_size)


def _labels(y, n: int) -> list[int]:
    if y is None:
        return [-1] * n
    return [int(v) for v in (y.tolist() if torch.is_tensor(y) else y)]


def iter_batches(dataset, rank: int, world_size: int, done: int, shard_size: int, batch_size: int,
                 num_workers: int = 0) -> Iterator[tuple[list[int], torch.Tensor, list[int]]]:
    """``(source indices, images [B,C,H,W], labels)`` for this rank's samples after the first ``done``."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # Streamed input (no len): keep i % world_size == rank, batch by hand, same shard-aligned cuts.
        keys, imgs, labels, own = [], [], [], 0
        for i, (x, y) in enumerate(dataset):
            if i % world_size != rank:
                continue
            own += 1
            if own <= done:
                continue
            keys.append(i), imgs.append(x), labels.append(int(y))
            if len(keys) == batch_size or (own % shard_size == 0):
                yield keys, torch.stack(imgs), labels
                keys, imgs, labels = [], [], []
        if keys:
            yield keys, torch.stack(imgs), labels
        return
    sampler = ShardAlignedBatches(shards.rank_indices(len(dataset), rank, world_size)[done:], shard_size, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    for keys, (x, y) in zip(sampler, loader):
        yield keys, x, _labels(y, len(keys))


@torch.no_grad()
def encode(model, x: torch.Tensor, device: torch.device, mixed_precision: str = "no", hflip: bool = False):
    """Token maps ``[B, h, w]`` (and of the mirrored images, or None) as CPU int64."""
    x = x.to(device, non_blocking=True)
    if hflip:
        x = torch.cat([x, x.flip(-1)])  # one encoder call for both: (2B, C, H, W)
    dtype = AUTOCAST_DTYPES[mixed_precision]
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        codes = model.encode_to_indices(x)
    codes = codes.to("cpu", torch.int64)
    if hflip:
        b = codes.shape[0] // 2
        return codes[:b], codes[b:]
    return codes, None


class BackgroundWriter:
    """Serialises batches into shards on a thread, so tar writing (~50 us/sample of Python) overlaps the next
    encoder call (which releases the GIL). A bounded queue keeps memory constant; errors surface in the caller."""

    def __init__(self, writer: shards.RankShardWriter, max_batches: int = 4, threaded: bool = True):
        self.writer, self.error = writer, None
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _write(self, keys, codes, labels, flips) -> None:
        codes = codes.numpy().astype(self.writer.dtype)  # (B, h, w)
        flips = flips.numpy().astype(self.writer.dtype) if flips is not None else None
        for j, key in enumerate(keys):
            self.writer.write(key, codes[j], labels[j], flips[j] if flips is not None else None)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
                self.error = e

    def put(self, keys, codes, labels, flips) -> None:
        if self.thread is None:
            return self._write(keys, codes, labels, flips)
        if self.error is not None:
            raise self.error
        self.queue.put((keys, codes, labels, flips))

    def finish(self, raise_error: bool = True) -> None:
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


def tokenizer_header(model, sha256: str, config: dict, path, num_classes: int, dataset: str) -> shards.Manifest:
    """The format-level manifest fields (everything that ties the shards to their tokenizer and dataset); the
    splits are added by :func:`vqgen.shards.merge_manifest`."""
    h, w = (int(v) for v in model.config.latent_size)
    k = int(model.config.num_embeddings)
    return shards.Manifest(tokenizer=_json({"sha256": sha256, "config": config, "path": str(path) if path else None}),
                           codebook_size=k, latent_h=h, latent_w=w, dtype=shards.token_dtype(k).name,
                           num_classes=int(num_classes), dataset=dataset)


def extract_split(model, dataset, out_dir, *, split: str, tokenizer_sha256: str, dataset_name: str,
                  transforms: dict | None = None, rank: int = 0, world_size: int = 1, batch_size: int = 256,
                  num_workers: int = 0, shard_size: int = 1000, hflip: bool = False, mixed_precision: str = "no",
                  device: torch.device | str | None = None, progress: bool = True,
                  writer_thread: bool = True) -> dict:
    """Encode this rank's part of ``dataset`` into ``out_dir`` (resuming a killed run); returns the part record.

    ``model``: eval-mode tokenizer with ``encode_to_indices`` and ``config.num_embeddings/latent_size``.
    ``writer_thread``: serialise shards on a background thread (overlaps the encoder; see BackgroundWriter).
    Call on every rank, then :func:`vqgen.shards.merge_manifest` on the main process after a barrier.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = None if isinstance(dataset, torch.utils.data.IterableDataset) else len(dataset)
    k = int(model.config.num_embeddings)
    settings = _json({"tokenizer_sha256": tokenizer_sha256, "dataset": dataset_name, "split": split,
                      "num_samples": n, "world_size": world_size, "shard_size": shard_size, "hflip": bool(hflip),
                      "dtype": shards.token_dtype(k).name, "mixed_precision": mixed_precision,
                      "transforms": transforms or {}})
    writer = shards.RankShardWriter(out_dir, split, rank, settings, shard_size, tuple(model.config.latent_size),
                                    shards.token_dtype(k))
    done = writer.resume()
    if writer.complete:
        return writer.close()
    own = len(shards.rank_indices(n, rank, world_size)) if n is not None else None
    bar = tqdm(total=own, initial=done, unit="img", desc=f"extract {split}", disable=not progress, dynamic_ncols=True)
    sink = BackgroundWriter(writer, threaded=writer_thread)
    try:
        for keys, x, labels in iter_batches(dataset, rank, world_size, done, shard_size, batch_size, num_workers):
            codes, flips = encode(model, x, device, mixed_precision, hflip)
            sink.put(keys, codes, labels, flips)
            bar.update(len(keys))
        sink.finish()
        part = writer.close()
    except BaseException:
        sink.finish(raise_error=False)
        writer.abort()
        raise
    finally:
        bar.close()
    return part


def run(cfg: ExtractConfig) -> shards.Manifest | None:
    """Extract every split of ``cfg.split``; returns the manifest on the main process (None elsewhere)."""
    from .data import build_dataset
    from .models.tokenizer import load_tokenizer

    validate(cfg)
    data, sharding = cfg.data, cfg.sharding
    state = start_processes()
    model, export = load_tokenizer(cfg.checkpoint)  # a vqgen export or a diffusers VQModel (hf: refs too)
    model = model.to(state.device).eval()
    # the manifest records where the tokenizer is: an hf: ref as given (the cache folder differs per machine)
    tok_path = cfg.checkpoint if is_hub_ref(cfg.checkpoint) else export.path
    tok = model.config
    if data.image_size not in (None, tok.image_size):
        raise ConfigError(f"--image_size {data.image_size} differs from the tokenizer's image size {tok.image_size}; "
                          f"leave it out to use the tokenizer's")
    out = Path(cfg.output_dir or Path("shards") / re.sub(r"[^A-Za-z0-9_.-]+", "_", data.dataset).strip("._"))
    if cfg.overwrite:
        if state.is_main_process:
            shards.clear_output(out)
    else:
        shards.check_output(out, export.sha256, data.dataset)  # every rank: a failure must not leave others waiting
    state.wait_for_everyone()

    manifest = None
    for split in cfg.split:
        with state.main_process_first():  # one process downloads; the others then find the files on disk
            dataset, info = build_dataset(data.dataset, split, data.data_dir, image_size=tok.image_size,
                                          channels=tok.in_channels)
        if info.channels != tok.in_channels or info.image_size != tok.image_size:
            raise ConfigError(f"dataset {data.dataset} gives {info.channels}x{info.image_size}px images, the tokenizer "
                              f"expects {tok.in_channels}x{tok.image_size}px")
        if state.is_main_process:
            print(f"extracting {data.dataset}/{split} with tokenizer {export.sha256[:12]} on {state.num_processes} "
                  f"process(es) -> {out}", flush=True)
        extract_split(model, dataset, out, split=split, tokenizer_sha256=export.sha256, dataset_name=data.dataset,
                      transforms=info.transforms, rank=state.process_index, world_size=state.num_processes,
                      batch_size=cfg.batch_size, num_workers=data.num_workers, shard_size=sharding.shard_size,
                      hflip=sharding.hflip, mixed_precision=cfg.mixed_precision, device=state.device,
                      progress=state.is_local_main_process and not cfg.no_progress)
        state.wait_for_everyone()
        if state.is_main_process:
            header = tokenizer_header(model, export.sha256, export.config, tok_path, info.num_classes, data.dataset)
            n = None if isinstance(dataset, torch.utils.data.IterableDataset) else len(dataset)
            manifest = shards.merge_manifest(out, split, state.num_processes, header,
                                             transforms=_json(info.transforms), hflip=sharding.hflip, expected_total=n)
            entry = manifest.split(split)
            sizes = [s.bytes for s in entry.shards]
            print(f"{split}: {entry.total} samples in {len(sizes)} shards "
                  f"({sum(sizes) / 1e6:.2f} MB) -> {out / shards.MANIFEST_NAME}", flush=True)
        state.wait_for_everyone()
    return manifest
