"""Stage 2: encode a dataset into VQ token shards (``python extract_codes.py`` or ``accelerate launch``).

Each rank encodes its share (map-style sources: strided positions of a seeded permutation,
:func:`vqgen.shards.rank_indices`; streams: split by rank and worker, :class:`vqgen.data.streaming.StreamedImages`)
and writes its own shards (:class:`vqgen.shards.RankShardWriter`); the main process merges the parts into
``manifest.json`` once every rank is done. Batches never straddle a shard, so a resumed run encodes exactly like an
uninterrupted one. ``--hflip`` / ``--views N`` store the tokens of augmented views in the same sample
(:mod:`vqgen.data.views`), so every source image is still one sample; unreadable images are recorded as skipped.
Adapted from: LlamaGen ``extract_codes_c2i.py`` and open-muse ``pre_encode.py`` (plus resume and a manifest).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import shards
from .config import ExtractConfig, validate
from .data.views import MultiView
from .errors import ConfigError, ShardError
from .generation import peek_export
from .hub import is_hub_ref
from .launch import prepare_first, start_processes
from .lock import hold_folder
from .preflight import tokenizer_data

AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _json(obj):
    """JSON-normalised copy (tuples -> lists) so stored and fresh settings compare equal."""
    return json.loads(json.dumps(obj))


class ShardAlignedBatches(torch.utils.data.Sampler):
    """Batches of source indices cut at every ``shard_size`` boundary of ``indices`` (lazy: constant memory)."""

    def __init__(self, indices, shard_size: int, batch_size: int):
        self.indices, self.shard_size, self.batch_size = indices, shard_size, batch_size  # a range or an int array

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(0, len(self.indices), self.shard_size):
            shard = self.indices[s: s + self.shard_size]
            for b in range(0, len(shard), self.batch_size):
                yield [int(i) for i in shard[b: b + self.batch_size]]

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.shard_size)
        return full * -(-self.shard_size // self.batch_size) + -(-rest // self.batch_size)


def _labels(y, n: int) -> list[int]:
    if y is None:
        return [-1] * n
    return [int(v) for v in (y.tolist() if torch.is_tensor(y) else y)]


def iter_batches(dataset, rank: int, world_size: int, done: int, shard_size: int, batch_size: int,
                 num_workers: int = 0, order_seed: int | None = None) -> Iterator[tuple[list[int], torch.Tensor,
                                                                                      list[int]]]:
    """``(source indices, images [B,C,H,W], labels)`` for this rank's samples after the first ``done`` (map-style
    datasets; streams go through :func:`stream_batches`)."""
    own = shards.rank_indices(len(dataset), rank, world_size, order_seed)
    sampler = ShardAlignedBatches(own[done:], shard_size, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    for keys, (x, y) in zip(sampler, loader):
        yield keys, x, _labels(y, len(keys))


def stream_batches(stream, writer: shards.RankShardWriter, rank: int, num_workers: int):
    """``(keys, images, labels)`` of a :class:`~vqgen.data.streaming.StreamedImages` job after what ``writer`` holds.

    Each reader (rank, worker) reads its keys in increasing order, so everything up to the largest key it already
    stored (or recorded as unreadable) is done: the readers skip those samples before decoding them."""
    after: dict[int, int] = {}
    for key in writer.done_keys():
        for j in range(rank * stream.k, (rank + 1) * stream.k):
            if stream.owns(j, key):
                after[j] = max(after.get(j, -1), key)
                break
    stream.after_key = after
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    yield from loader


@torch.no_grad()
def encode(model, x: torch.Tensor, device: torch.device, mixed_precision: str = "no", hflip: bool = False,
           views: MultiView | None = None, keys=None):
    """Token maps ``[B, h, w]`` (``[B, N, h, w]`` with ``views``; and of the mirrored images, or None) as CPU
    int64."""
    B = x.shape[0]
    x = x.to(device, non_blocking=True)
    if hflip:
        x = torch.cat([x, x.flip(-1)])  # one encoder call for both: (2B, C, H, W)
    elif views is not None:
        x = views(x, keys)              # (B * N, C, H, W), image-major
    dtype = AUTOCAST_DTYPES[mixed_precision]
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        codes = model.encode_to_indices(x)
    codes = codes.to("cpu", torch.int64)
    if hflip:
        return codes[:B], codes[B:]
    if views is not None:
        return codes.view(B, views.count, *codes.shape[1:]), None
    return codes, None


class BackgroundWriter:
    """Serialises batches into shards on a thread, so tar writing (pure Python) overlaps the next
    encoder call (which releases the GIL). A bounded queue keeps memory constant; errors surface in the caller."""

    def __init__(self, writer: shards.RankShardWriter, max_batches: int = 4, threaded: bool = True,
                 codebook_size: int | None = None):
        self.writer, self.error, self.codebook_size = writer, None, codebook_size
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _write(self, keys, codes, labels, flips) -> None:
        if codes is None:  # a skip record, kept in order with the writes
            for key in keys:
                self.writer.skip(key)
            return
        self._check_range(codes)
        codes = codes.numpy().astype(self.writer.dtype)  # (B, [views,] h, w)
        flips = flips.numpy().astype(self.writer.dtype) if flips is not None else None
        for j, key in enumerate(keys):
            self.writer.write(key, codes[j], labels[j], flips[j] if flips is not None else None)

    def _check_range(self, codes: torch.Tensor) -> None:
        """Codes outside [0, K) (or the dtype's range) would be stored wrapped around: refuse the batch."""
        top = int(np.iinfo(self.writer.dtype).max) + 1
        if self.codebook_size:
            top = min(top, self.codebook_size)
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= top:
            raise ShardError(f"the tokenizer returned codes in [{lo}, {hi}], outside [0, {top}) (codebook size "
                             f"{self.codebook_size}, shard dtype {self.writer.dtype.name}): a tokenizer whose "
                             f"num_embeddings does not match its quantizer?")

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

    def put_skips(self, keys) -> None:
        self.put(keys, None, None, None)

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
    k = int(model.config.codebook_size)
    return shards.Manifest(tokenizer=_json({"sha256": sha256, "config": config, "path": str(path) if path else None}),
                           codebook_size=k, latent_h=h, latent_w=w, dtype=shards.token_dtype(k).name,
                           num_classes=int(num_classes), dataset=dataset)


def extract_split(model, dataset, out_dir, *, split: str, tokenizer_sha256: str, dataset_name: str,
                  transforms: dict | None = None, rank: int = 0, world_size: int = 1, batch_size: int = 256,
                  num_workers: int = 0, shard_size: int = 1000, hflip: bool = False, mixed_precision: str = "no",
                  device: torch.device | str | None = None, progress: bool = True,
                  writer_thread: bool = True, order_seed: int | None = 0, views: MultiView | None = None) -> dict:
    """Encode this rank's part of ``dataset`` into ``out_dir`` (resuming a killed run); returns the part record.

    ``model``: eval-mode tokenizer with ``encode_to_indices`` and ``config.codebook_size/latent_size``.
    ``dataset``: map-style (encoded in the permutation seeded by ``order_seed``; None: source order) or a
    :class:`~vqgen.data.streaming.StreamedImages` planned for this rank.
    ``writer_thread``: serialise shards on a background thread (overlaps the encoder; see BackgroundWriter).
    ``views``: encode these augmented views of every image into one sample (not with ``hflip``).
    Call on every rank, then :func:`vqgen.shards.merge_manifest` on the main process after a barrier.
    """
    from .data.streaming import StreamedImages

    if views is not None and hflip:
        raise ConfigError("hflip and views together: the views already include mirrored crops")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    streamed = isinstance(dataset, StreamedImages)
    n = source_size(dataset)
    k = int(model.config.codebook_size)
    order = {"stream_readers": dataset.k} if streamed else {"order_seed": order_seed}
    multi = {"views": views.describe()} if views is not None else {}  # absent when single-view: old parts resume
    settings = _json({"tokenizer_sha256": tokenizer_sha256, "dataset": dataset_name, "split": split,
                      "num_samples": n, "world_size": world_size, "shard_size": shard_size, "hflip": bool(hflip),
                      "dtype": shards.token_dtype(k).name, "mixed_precision": mixed_precision,
                      "transforms": transforms or {}, **order, **multi})
    writer = shards.RankShardWriter(out_dir, split, rank, settings, shard_size, tuple(model.config.latent_size),
                                    shards.token_dtype(k), views=views.count if views is not None else 1)
    done = writer.resume()
    if writer.complete:
        return writer.close()
    if streamed:
        own = sum(p[1] for p in dataset.plans) if n is not None else None
        batches = stream_batches(dataset, writer, rank, num_workers)
    else:
        own = len(shards.rank_indices(n, rank, world_size))
        done += len(writer.skipped)  # the position in the rank's index sequence
        batches = iter_batches(dataset, rank, world_size, done, shard_size, batch_size, num_workers, order_seed)
    bar = tqdm(total=own, initial=done, unit="img", desc=f"extract {split}", disable=not progress, dynamic_ncols=True)
    sink = BackgroundWriter(writer, threaded=writer_thread, codebook_size=k)
    try:
        for keys, x, labels in batches:
            bar.update(len(keys))
            keys, x, labels = _drop_unreadable(sink, keys, x, labels)
            if keys:
                codes, flips = encode(model, x, device, mixed_precision, hflip, views, keys)
                sink.put(keys, codes, labels, flips)
        sink.finish()
        part = writer.close()
    except BaseException:
        sink.finish(raise_error=False)
        writer.abort()
        raise
    finally:
        bar.close()
    return part


def _drop_unreadable(sink: BackgroundWriter, keys: list[int], x: torch.Tensor, labels: list[int]):
    """Record the batch's unreadable source images (label UNREADABLE) as skipped; the rest is encoded."""
    from .data.streaming import UNREADABLE

    bad = {i for i, y in enumerate(labels) if y == UNREADABLE}
    if not bad:
        return keys, x, labels
    sink.put_skips([keys[i] for i in sorted(bad)])
    good = [i for i in range(len(keys)) if i not in bad]
    return [keys[i] for i in good], x[good], [labels[i] for i in good]


def source_size(dataset) -> int | None:
    """Samples in the source: ``len`` of a map-style dataset, the counted total of a stream (None: unknown)."""
    from .data.streaming import StreamedImages

    if isinstance(dataset, StreamedImages):
        return sum(dataset.source.counts) if dataset.source.counts is not None else None
    return len(dataset)


def open_input(cfg: ExtractConfig, split: str, tok, state):
    """(dataset or this rank's StreamedImages, DatasetInfo) of one split, checked against the tokenizer's input."""
    from .data import build_dataset
    from .data.stream_input import is_streamed, open_stream
    from .data.streaming import StreamedImages

    data = cfg.data
    with prepare_first(state, once=data.prepare_data_once, data_dir=data.data_dir):  # one per node, then all
        if is_streamed(data.dataset, data.streaming):
            source, decoder, info = open_stream(data.dataset, split, data.data_dir, tok.image_size, tok.in_channels,
                                                streaming_hf=data.streaming)
            dataset = StreamedImages(source, decoder, rank=state.process_index, world_size=state.num_processes,
                                     num_workers=data.num_workers, shuffle=False, equal=False,
                                     batch_size=cfg.batch_size)
        else:
            dataset, info = build_dataset(data.dataset, split, data.data_dir, image_size=tok.image_size,
                                          channels=tok.in_channels)
    if info.channels != tok.in_channels or info.image_size != tok.image_size:
        raise ConfigError(f"dataset {data.dataset} gives {info.channels}x{info.image_size}px images, the tokenizer "
                          f"expects {tok.in_channels}x{tok.image_size}px")
    return dataset, info


def _claim_output(cfg: ExtractConfig, dataset: str, tokenizer_sha256: str, state):
    """(the shard folder, its lock): one writer per shard folder until the manifest is written; ``--overwrite``
    clears it, otherwise what it holds must come from this tokenizer and dataset (checked on every rank)."""
    out = Path(cfg.output_dir or Path("shards") / re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("._"))
    folder_lock = hold_folder(out)
    if cfg.overwrite:
        if state.is_main_process:
            shards.clear_output(out)
    else:
        shards.check_output(out, tokenizer_sha256, dataset)  # every rank: a failure must not leave others waiting
    state.wait_for_everyone()
    return out, folder_lock


def run(cfg: ExtractConfig) -> shards.Manifest | None:
    """Extract every split of ``cfg.split``; returns the manifest on the main process (None elsewhere)."""
    from .data.streaming import StreamedImages
    from .models.tokenizer import load_tokenizer

    validate(cfg)
    data, inherited = tokenizer_data(cfg.data, peek_export(cfg.checkpoint, "--checkpoint"))
    if data.dataset is None:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} does not record the data it was trained on: pass --dataset")
    cfg = dataclasses.replace(cfg, data=data)
    sharding = cfg.sharding
    state = start_processes()
    if inherited and state.is_main_process:
        print(inherited, flush=True)
    model, export = load_tokenizer(cfg.checkpoint)  # a vqgen export or a diffusers VQModel (hf: refs too)
    model = model.to(state.device).eval()
    # the manifest records where the tokenizer is: an hf: ref as given (the cache folder differs per machine)
    tok_path = cfg.checkpoint if is_hub_ref(cfg.checkpoint) else export.path
    tok = model.config
    if data.image_size not in (None, tok.image_size):
        raise ConfigError(f"--image_size {data.image_size} differs from the tokenizer's image size {tok.image_size}; "
                          f"leave it out to use the tokenizer's")
    out, folder_lock = _claim_output(cfg, data.dataset, export.sha256, state)

    manifest = None
    views = MultiView(sharding.views, sharding.view_mode, tok.image_size, sharding.order_seed) \
        if sharding.views > 1 else None
    for split in cfg.split:
        dataset, info = open_input(cfg, split, tok, state)
        streamed = isinstance(dataset, StreamedImages)
        order_seed = None if streamed else sharding.order_seed
        transforms = _json({**info.transforms, **({"views": views.describe()} if views is not None else {})})
        if state.is_main_process:
            print(f"extracting {data.dataset}/{split} with tokenizer {export.sha256[:12]} on {state.num_processes} "
                  f"process(es) -> {out}", flush=True)
        extract_split(model, dataset, out, split=split, tokenizer_sha256=export.sha256, dataset_name=data.dataset,
                      transforms=info.transforms, rank=state.process_index, world_size=state.num_processes,
                      batch_size=cfg.batch_size, num_workers=data.num_workers, shard_size=sharding.shard_size,
                      hflip=sharding.hflip, mixed_precision=cfg.mixed_precision, device=state.device,
                      progress=state.is_local_main_process and not cfg.no_progress, order_seed=order_seed,
                      views=views)
        state.wait_for_everyone()
        if state.is_main_process:
            header = tokenizer_header(model, export.sha256, export.config, tok_path, info.num_classes, data.dataset)
            manifest = shards.merge_manifest(out, split, state.num_processes, header, transforms=transforms,
                                             hflip=sharding.hflip, expected_total=source_size(dataset),
                                             order_seed=order_seed, views=sharding.views)
            entry = manifest.split(split)
            sizes = [s.bytes for s in entry.shards]
            print(f"{split}: {entry.total} samples in {len(sizes)} shards "
                  f"({sum(sizes) / 1e6:.2f} MB) -> {out / shards.MANIFEST_NAME}", flush=True)
        state.wait_for_everyone()
    folder_lock.release()
    return manifest
