"""What evaluate.py writes: the printed table, eval.json-safe values and the PNG plots (loss curves, code histogram)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..fsutil import atomic_write_bytes


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_loss_curves(runs: dict, path: Path) -> Path:
    """Logged losses of each stage (``runs``: "vqvae"/"prior" -> :class:`~vqgen.run_dir.RunDir`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = {"vqvae": ["loss", "recon_loss", "vq_loss", "val/mse"], "prior": ["loss", "bpt", "val/bits_per_token", "masked_bpt",
                                                                             "val/masked_bits_per_token"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stage in zip(axes, ("vqvae", "prior")):
        rows = runs[stage].read_metrics() if stage in runs else []
        drawn = 0
        for key in wanted[stage]:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, ms=3, label=key)
                drawn += 1
        ax.set_title(f"{stage} ({runs[stage].metrics_file if stage in runs else '-'})", fontsize=8)
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
    # one filled step polygon, not one bar per code: ax.bar takes minutes at 2^18 codes
    ax.fill_between(range(len(c) + 1), [*c, c[-1]], step="post", color="tab:blue", linewidth=0)  # code i: [i, i+1)
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
                     ("bits_per_token", "bits/token"),
                     ("masked_bits_per_token", "masked-token bits (MaskGIT; not bits/token)")):
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


def json_safe(obj):
    """inf/nan -> strings so eval.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
