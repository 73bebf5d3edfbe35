"""Evaluate a run: tokenizer reconstruction over a split, prior samples vs the split, bits/token on held-out shards.

``python evaluate.py --run_dir runs/demo`` finds ``runs/demo/{vqvae,prior}/export`` and ``runs/demo/shards`` (the
layout of ``VQVAE_T.py --train``, see :func:`vqgen.pipeline.stage_dirs`); ``--checkpoint/--checkpoint_t/--shards``
name them one by one. Writes ``<run>/eval.json`` (atomically) and ``<run>/eval/{loss_curves,codebook_usage,
samples}.png`` and prints a table.

Metrics
  tokenizer  L1 / MSE (in [0, 1] units), PSNR (dB, per image, capped at 100), SSIM, codebook usage (share of the K
             codes used on the split), perplexity (exp entropy of the code histogram), rFID (split vs its
             reconstructions).
  prior      gFID and Inception Score of ``--num_samples`` samples against the split, k-NN manifold precision/recall
             (Kynkäänniemi et al. 2019) in the same feature space, the feature classifier's confidence and class
             coverage, and bits per token of the prior on the held-out token shards (``--split``).
  reference  the same FID/IS/precision/recall of the *train* split against the split: the floor a perfect
             generator would reach with this many images in this feature space.

Feature spaces (``--features``)
  inception   Inception-v3 pool features (2048-d) / logits: the standard FID, when weights are on disk:
              ``--inception_weights PATH`` or a known file in the torch hub cache (nothing is ever downloaded).
              With torch-fidelity installed its exact TF-ported graph is used (torchmetrics' ``NoTrainInceptionV3``);
              otherwise torchvision's Inception-v3 graph loads the file (close to, not identical with, TF-FID).
  classifier  a small CNN trained on the dataset itself (:mod:`vqgen.classifier`, cached): the usual practice for
              MNIST-like data, and the offline default. Values are comparable only under the same classifier
              export (its sha256 is in eval.json), never with published Inception FIDs.
  auto        inception when weights are found, else classifier.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics as M
from . import shards
from .checkpoint import load_export
from .errors import CheckpointError, ConfigError, VQGenError
from .fsutil import atomic_write_bytes, atomic_write_json
from .sample import class_labels, resolve_device

INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth",   # torch-fidelity / torchmetrics (TF-FID port)
                   "pt_inception-2015-12-05-6726825d.pth",        # pytorch-fid (same weights)
                   "inception_v3_google-0cc3c7bd.pth")            # torchvision ImageNet weights
EVAL_FORMAT_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--run_dir", default=None, help="run folder of VQVAE_T.py --train (holds vqvae/, prior/, shards/)")
    a("--checkpoint", default=None, help="tokenizer export (default: <run_dir>/vqvae/export)")
    a("--checkpoint_t", default=None, help="prior export (default: <run_dir>/prior/export; none: skip the prior)")
    a("--shards", default=None, help="token shard folder for bits/token (default: <run_dir>/shards)")
    a("--dataset", default=None, help="dataset to compare against (default: the one in the tokenizer export)")
    a("--data_dir", default="data", help="where datasets live (see vqgen/data.py)")
    a("--split", default="test", help="split for reconstruction, FID reference and bits/token")
    a("--max_images", type=int, default=None, help="use at most this many split images (default: all)")
    a("--num_samples", type=int, default=1000, help="images to generate for gFID/IS/precision/recall (0: skip)")
    a("--batch_size", type=int, default=256, help="images per batch (tokenizer, features, decoding)")
    a("--features", choices=["auto", "inception", "classifier"], default="auto",
      help="feature space of FID/IS/precision/recall (see the module docstring)")
    a("--inception_weights", default=None,
      help="Inception-v3 weights file (implies --features inception; an error if it does not exist)")
    a("--classifier_dir", default=None,
      help="root of the feature-classifier cache (default: --data_dir): <root>/classifier/<dataset>")
    a("--retrain_classifier", action="store_true", help="retrain the feature classifier even when cached")
    a("--classifier_epochs", type=int, default=15, help="epochs when the feature classifier is trained")
    a("--confidence_threshold", type=float, default=0.9, help="max softmax counted as a confident classification")
    a("--pr_k", type=int, default=3, help="k of the k-NN manifold precision/recall")
    a("--is_splits", type=int, default=10, help="splits of the Inception Score")
    a("--temperature", type=float, default=1.0, help="sampling temperature")
    a("--top_k", type=int, default=None, help="top-k sampling")
    a("--top_p", type=float, default=None, help="top-p (nucleus) sampling")
    a("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (conditional priors)")
    a("--seed", type=int, default=0, help="seed for sampling and the classifier")
    a("--output", default=None, help="eval JSON path (default: <run>/eval.json)")
    a("--no_plots", action="store_true", help="skip the PNG plots")
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


# ------------------------------------------------------------------------------------------------ inputs
def _stage_root(export_path: Path) -> Path:
    """``runs/x/vqvae/export`` -> ``runs/x/vqvae`` (the folder holding metrics.jsonl)."""
    export_path = Path(export_path)
    return export_path.parent if export_path.name == "export" else export_path


def resolve_paths(args) -> dict:
    run = Path(args.run_dir) if args.run_dir else None
    if run is not None and not run.is_dir():
        raise ConfigError(f"--run_dir {run} does not exist (train first: python VQVAE_T.py --train --output_dir {run})")
    tok = Path(args.checkpoint) if args.checkpoint else (run / "vqvae" / "export" if run else None)
    if tok is None:
        raise ConfigError("pass --run_dir, or --checkpoint (tokenizer export) [--checkpoint_t --shards]")
    if not tok.exists():
        raise CheckpointError(f"tokenizer export {tok} not found (stage 1: python train_vqvae.py --output_dir ...)")
    prior = Path(args.checkpoint_t) if args.checkpoint_t else (run / "prior" / "export" if run else None)
    if args.checkpoint_t and not prior.exists():
        raise CheckpointError(f"prior export {prior} not found")
    if prior is not None and not prior.exists():
        prior = None  # a run without stage 3 yet: evaluate the tokenizer only
    shard_dir = Path(args.shards) if args.shards else (run / "shards" if run else None)
    if args.shards and not (shard_dir / shards.MANIFEST_NAME).exists():
        raise ConfigError(f"--shards {shard_dir} has no manifest.json (stage 2 not run or not finished)")
    root = run or _stage_root(tok).parent
    out = Path(args.output) if args.output else root / "eval.json"
    return {"run": run, "tokenizer": tok, "prior": prior, "shards": shard_dir, "root": root, "output": out,
            "plots": out.parent / (out.stem if out.stem != "eval" else "eval"),
            "stages": {"vqvae": _stage_root(tok), **({"prior": _stage_root(prior)} if prior else {})}}


# ------------------------------------------------------------------------------------------ feature spaces
def find_inception_weights(path: str | None) -> Path | None:
    """``--inception_weights`` (must exist: ConfigError otherwise) or a known file in the torch hub cache."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--inception_weights {p} does not exist. vqgen never downloads weights; copy the "
                              f"file there (one of {', '.join(INCEPTION_FILES)}), or use --features classifier "
                              f"(offline feature space)")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (hub / name).is_file():
            return hub / name
    return None


class InceptionFeatures(torch.nn.Module):
    """Images in [-1, 1] (any size, 1 or 3 channels) -> (pool features (B, 2048), logits (B, 1000|1008))."""

    def __init__(self, weights: Path):
        super().__init__()
        self.weights = Path(weights)
        self.fidelity = None
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.fidelity = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
            self.graph = "torch-fidelity inception-v3-compat (TF-FID)"
        except ModuleNotFoundError:  # torch-fidelity absent: torchvision's graph with the file's weights
            self._load_torchvision(weights)
            self.graph = "torchvision inception_v3"
        self.eval()

    def _load_torchvision(self, weights: Path) -> None:
        from torchvision.models import inception_v3
        try:
            sd = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's problem to fix
            raise CheckpointError(f"cannot read Inception weights {weights}: {str(e).splitlines()[0]}") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        if "fc.weight" not in sd:
            raise CheckpointError(f"{weights} does not hold Inception-v3 weights (no fc.weight)")
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=sd["fc.weight"].shape[0],
                           transform_input=False)
        own = net.state_dict()
        usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(usable) < 0.95 * len(own):
            raise CheckpointError(f"{weights}: only {len(usable)} of {len(own)} Inception-v3 tensors match "
                                  f"torchvision's graph (install torch-fidelity for the TF-FID file layout)")
        net.load_state_dict(usable, strict=False)
        net.fc_ = net.fc
        net.fc = torch.nn.Identity()
        self.net = net

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.fidelity is not None:
            feats, logits = self.fidelity(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
            return feats.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1)
        # Google's Inception takes [-1, 1] at 299x299 (torchvision's transform_input maps ImageNet-normalised
        # inputs to exactly that range, so it is off here)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        feats = self.net(x)
        return feats, self.net.fc_(feats)


class FeatureSpace:
    """One forward pass per image -> (features, logits); ``info`` is what eval.json records about the space."""

    def __init__(self, name: str, net: torch.nn.Module, device: torch.device, info: dict,
                 classifier: torch.nn.Module | None = None):
        self.name, self.net, self.device, self.info, self.classifier = name, net.to(device).eval(), device, info, classifier

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for s in range(0, images.shape[0], batch_size):
            f, lg = self.net.features_and_logits(images[s:s + batch_size].to(self.device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)


def build_feature_space(args, dataset: str, image_size: int, channels: int, device: torch.device,
                        log=print) -> FeatureSpace:
    from . import classifier as C

    weights = find_inception_weights(args.inception_weights)   # raises at once for a bad explicit path
    mode = "inception" if args.inception_weights else args.features
    if mode == "inception" and weights is None:
        raise ConfigError(f"--features inception: no Inception-v3 weights on disk (looked for "
                          f"{', '.join(INCEPTION_FILES)} in {Path(torch.hub.get_dir()) / 'checkpoints'}); vqgen never "
                          f"downloads them. Pass --inception_weights PATH or use --features classifier")
    if mode == "auto":
        mode = "inception" if weights is not None else "classifier"
    root = args.classifier_dir or args.data_dir
    if mode == "inception":
        net = InceptionFeatures(weights)
        clf = None
        if (C.cache_dir(root, dataset) / "config.json").exists():  # classifier stats when one is already cached
            clf = C.Classifier.from_export(C.cache_dir(root, dataset)).to(device)
        return FeatureSpace("inception", net, device, {"name": "inception", "weights": str(weights),
                                                       "graph": net.graph}, clf)
    clf = C.load_or_train(dataset, args.data_dir, image_size, channels, root=root, retrain=args.retrain_classifier,
                          epochs=args.classifier_epochs, seed=args.seed, log=log)
    info = {"name": "classifier", "export": str(C.cache_dir(root, dataset)), "sha256": clf.sha256,
            "feature_dim": clf.config.feature_dim, "test_accuracy": clf.export_meta.get("test_accuracy")}
    return FeatureSpace("classifier", clf, device, info, clf)


# ------------------------------------------------------------------------------------------------ stages
def load_split(dataset: str, split: str, data_dir: str, image_size: int, channels: int,
               max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, C, H, W)`` in [-1, 1] and labels ``(N,)`` of a split (small demo splits fit in memory)."""
    from .data import build_dataset

    ds, info = build_dataset(dataset, split, data_dir, image_size=image_size, channels=channels)
    if (info.image_size, info.channels) != (image_size, channels):
        raise ConfigError(f"dataset {dataset} gives {info.channels}x{info.image_size}px images, the tokenizer "
                          f"expects {channels}x{image_size}px")
    if isinstance(ds, torch.utils.data.IterableDataset):
        xs, ys, n = [], [], 0
        for x, y in ds:
            xs.append(x)
            ys.append(int(y))
            n += 1
            if max_images and n >= max_images:
                break
        return torch.stack(xs), torch.tensor(ys)
    if max_images:
        ds = torch.utils.data.Subset(ds, range(min(max_images, len(ds))))
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False))
    return torch.cat(xs), torch.cat(ys).long()


@torch.no_grad()
def eval_tokenizer(model, images: torch.Tensor, batch_size: int, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Reconstruct every image through codes (encode_to_indices -> decode_indices, never updating the codebook).
    Returns (metrics, code counts (K,), reconstructions (N, C, H, W) on the CPU)."""
    meter = M.ReconstructionMeter(model.config.num_embeddings)
    recons = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device)
        idx = model.encode_to_indices(x)
        r = model.decode_indices(idx).float().clamp(-1, 1)
        meter.update(x, r, idx)
        recons.append(r.cpu())
    out = meter.compute()
    out.update(num_images=int(images.shape[0]), codebook_size=int(model.config.num_embeddings),
               codes_used=int((meter.counts > 0).sum()))
    return out, meter.counts, torch.cat(recons)


def generate_images(prior, tokenizer, n: int, args, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    from .sampling import decode_to_images, generate

    labels = class_labels(prior, n, None)  # balanced: 0, 1, ..., C-1, 0, ...
    g = torch.Generator(device=device).manual_seed(args.seed)
    tokens = generate(prior, n, labels=labels.to(device) if labels is not None else None,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                      generator=g, batch_size=min(n, 512))
    return decode_to_images(tokenizer, tokens, batch_size=args.batch_size), labels


def sample_quality(space: FeatureSpace, real: tuple[torch.Tensor, torch.Tensor],
                   fake: tuple[torch.Tensor, torch.Tensor], args) -> dict:
    """FID / IS / precision-recall of fake (features, logits) against real, in one feature space."""
    (rf, _), (ff, fl) = real, fake
    out = {"fid": M.frechet_distance(rf, ff)}
    out["inception_score"], out["inception_score_std"] = M.inception_score(fl, args.is_splits, args.seed)
    out.update(M.precision_recall(rf, ff, k=args.pr_k))
    return out


@torch.no_grad()
def bits_per_token(prior, shard_dir: Path, split: str, batch_size: int, device) -> dict:
    """Mean cross-entropy of the prior on every token of ``split`` in the shards, in bits."""
    loader = shards.make_token_loader(shard_dir, split, batch_size=batch_size, shuffle=False, num_workers=0,
                                      hflip=False)
    total, count = M.token_nll(prior, loader, device)
    return {"bits_per_token": M.bits_per_token(total / max(1, count)), "tokens": count,
            "sequences": count // max(1, prior.config.seq_len), "split": split}


def check_prior_matches(prior, tok_export, manifest: dict | None) -> None:
    want = prior.export_meta.get("tokenizer_sha256")
    if want and want != tok_export.sha256:
        raise CheckpointError(f"the prior was trained on tokens of tokenizer {want[:12]}, but the tokenizer given is "
                              f"{tok_export.sha256[:12]} ({tok_export.path}); pass the matching --checkpoint")
    if manifest is not None:
        shards.check_tokenizer(manifest, tok_export)


# -------------------------------------------------------------------------------------------------- output
def read_metrics_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return rows


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_loss_curves(stage_dirs: dict[str, Path], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = {"vqvae": ["loss", "recon_loss", "vq_loss", "val/mse"], "prior": ["loss", "bpt", "val/bits_per_token"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stage in zip(axes, ("vqvae", "prior")):
        rows = read_metrics_jsonl(stage_dirs[stage] / "metrics.jsonl") if stage in stage_dirs else []
        drawn = 0
        for key in wanted[stage]:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, ms=3, label=key)
                drawn += 1
        ax.set_title(f"{stage} ({stage_dirs.get(stage, '-')}/metrics.jsonl)", fontsize=8)
        ax.set_xlabel("optimizer step")
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:
        return _save_fig(fig, path)
    finally:
        plt.close(fig)


def plot_code_histogram(counts: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts.sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(c)), c, width=1.0, color="tab:blue")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("code rank (sorted by count)")
    ax.set_ylabel("assignments on the split")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save_fig(fig, path)
    finally:
        plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def format_table(results: dict) -> str:
    rows = []
    t = results.get("tokenizer") or {}
    for k, label in (("l1", "L1"), ("mse", "MSE"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                     ("codebook_usage", "codebook usage"), ("perplexity", "perplexity"), ("rfid", "rFID")):
        if k in t:
            v = f"{100 * t[k]:.1f}% ({t['codes_used']}/{t['codebook_size']})" if k == "codebook_usage" else _fmt(t[k])
            rows.append(("tokenizer", label, v))
    p = results.get("prior") or {}
    for k, label in (("fid", "gFID"), ("inception_score", "IS"), ("precision", "precision"), ("recall", "recall"),
                     ("bits_per_token", "bits/token")):
        if k in p:
            v = _fmt(p[k]) + (f" ± {p['inception_score_std']:.2g}" if k == "inception_score" else "")
            rows.append(("prior", label, v))
    c = p.get("classifier") or {}
    if c:
        rows.append(("prior", f"confident (p>={c['confidence_threshold']})", f"{100 * c['confident_fraction']:.1f}%"))
        rows.append(("prior", "class coverage", f"{100 * c['class_coverage']:.0f}%  {c['class_counts']}"))
        if "label_accuracy" in c:
            rows.append(("prior", "label accuracy", f"{100 * c['label_accuracy']:.1f}%"))
    r = results.get("reference") or {}
    for k, label in (("fid", "FID train vs split"), ("inception_score", "IS of split"),
                     ("precision", "precision train"), ("recall", "recall train")):
        if k in r:
            rows.append(("reference", label, _fmt(r[k])))
    if not rows:
        return "(no metrics)"
    w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    head = f"split={results['split']}  features={results['feature_space']['name']}"
    return "\n".join([head] + [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows])


# ---------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    from .prior import Prior
    from .vqvae import VQVAE

    t_start = time.perf_counter()
    if args.num_samples < 0 or args.batch_size < 1 or args.pr_k < 1:
        raise ConfigError("need --num_samples >= 0, --batch_size >= 1, --pr_k >= 1")
    if args.num_samples == 1:
        raise ConfigError("--num_samples 1: FID/precision/recall need at least 2 samples (or 0 to skip the prior)")
    find_inception_weights(args.inception_weights)                   # fail fast, before loading anything
    paths = resolve_paths(args)
    device = resolve_device(args.device)
    tok_export = load_export(paths["tokenizer"], expected_kind="vqvae")
    tokenizer = VQVAE.from_export(tok_export).to(device).eval()
    cfg = tokenizer.config
    dataset = args.dataset or (tok_export.meta.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError(f"{paths['tokenizer']} does not record its dataset; pass --dataset")
    prior = Prior.from_export(paths["prior"]).to(device).eval() if paths["prior"] else None
    manifest = None
    if paths["shards"] is not None and (paths["shards"] / shards.MANIFEST_NAME).exists():
        manifest = shards.read_manifest(paths["shards"])
    if prior is not None:
        check_prior_matches(prior, tok_export, manifest)

    seconds = {}
    t = time.perf_counter()
    images, labels = load_split(dataset, args.split, args.data_dir, cfg.image_size, cfg.in_channels, args.max_images)
    if images.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} of {dataset} has {images.shape[0]} image(s); need at least 2")
    space = build_feature_space(args, dataset, cfg.image_size, cfg.in_channels, device)
    seconds["data_and_features"] = time.perf_counter() - t

    results: dict = {"format": "vqgen-eval", "format_version": EVAL_FORMAT_VERSION, "dataset": dataset,
                     "split": args.split, "feature_space": space.info,
                     "inputs": {"tokenizer": str(paths["tokenizer"]), "tokenizer_sha256": tok_export.sha256,
                                "prior": str(paths["prior"]) if paths["prior"] else None,
                                "shards": str(paths["shards"]) if manifest else None}}
    t = time.perf_counter()
    tok_metrics, counts, recons = eval_tokenizer(tokenizer, images, args.batch_size, device)
    real = space(images, args.batch_size)
    tok_metrics["rfid"] = M.frechet_distance(real[0], space(recons, args.batch_size)[0])
    tok_metrics["code_counts"] = [int(c) for c in counts]
    results["tokenizer"] = tok_metrics
    seconds["tokenizer"] = time.perf_counter() - t

    if prior is not None:
        pm: dict = {}
        if args.num_samples:
            t = time.perf_counter()
            fake_images, fake_labels = generate_images(prior, tokenizer, args.num_samples, args, device)
            seconds["sampling"] = time.perf_counter() - t
            t = time.perf_counter()
            fake = space(fake_images, args.batch_size)
            pm.update(num_samples=args.num_samples, pr_k=args.pr_k, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, cfg_scale=args.cfg_scale, **sample_quality(space, real, fake, args))
            if space.classifier is not None:
                logits = fake[1] if space.name == "classifier" else space.classifier(fake_images.to(device)).cpu()
                pm["classifier"] = M.classifier_stats(logits, space.classifier.config.num_classes,
                                                      args.confidence_threshold, fake_labels)
            results["reference"] = reference_scores(space, real, dataset, args, cfg, len(fake_images))
            seconds["sample_metrics"] = time.perf_counter() - t
            if not args.no_plots:
                from .sampling import save_image_grid
                grid = fake_images[:64]
                results.setdefault("plots", {})["samples"] = str(save_image_grid(
                    grid, paths["plots"] / "samples.png", nrow=int(math.ceil(math.sqrt(len(grid))))))
        if manifest is not None and args.split in manifest.get("splits", {}):
            t = time.perf_counter()
            pm.update(bits_per_token(prior, paths["shards"], args.split, args.batch_size, device))
            seconds["bits_per_token"] = time.perf_counter() - t
        elif manifest is not None:
            print(f"note: no {args.split!r} split in {paths['shards']}: bits/token skipped", flush=True)
        results["prior"] = pm

    if not args.no_plots:
        plots = results.setdefault("plots", {})
        plots["loss_curves"] = str(plot_loss_curves(paths["stages"], paths["plots"] / "loss_curves.png"))
        plots["codebook_usage"] = str(plot_code_histogram(
            counts, paths["plots"] / "codebook_usage.png",
            f"{dataset}/{args.split}: {tok_metrics['codes_used']}/{tok_metrics['codebook_size']} codes used, "
            f"perplexity {tok_metrics['perplexity']:.1f}"))
    seconds["total"] = time.perf_counter() - t_start
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    atomic_write_json(paths["output"], _json_safe(results))
    print(format_table(results), flush=True)
    print(f"wrote {paths['output']}", flush=True)
    return results


def reference_scores(space: FeatureSpace, real, dataset: str, args, cfg, n: int) -> dict:
    """The same scores for up to ``n`` *train* images vs the split: what a perfect generator would get."""
    try:
        train_images, _ = load_split(dataset, "train", args.data_dir, cfg.image_size, cfg.in_channels, n)
    except VQGenError as e:
        return {"skipped": str(e)}
    out = sample_quality(space, real, space(train_images, args.batch_size), args)
    out["num_images"] = int(train_images.shape[0])
    return out


def _json_safe(obj):
    """inf/nan -> strings so eval.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
