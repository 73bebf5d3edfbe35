"""One markdown table from several ``bench/quality.py`` runs: one row per run folder (an ablation lever each).

    python bench/ablation_table.py runs/bq10/base runs/bq10/sched runs/bq10/plr ...

Each folder's results.json holds a vqgen row run with its own ``--vqvae_flags`` / ``--prior_flags`` (recorded in
its config) and named by its ``--row_name`` (else the folder's name); the table shows those flags, the steps each
stage got in the budget, the tokenizer metrics (codebook size, usage and perplexity on the test split) and the
unconditional / class-conditional sample metrics, so levers compare at equal wall-clock time. A ``--tokenizer_only``
run (a quantizer ablation's first pass) fills the tokenizer columns and leaves the prior's blank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    res = json.loads((folder / "results.json").read_text())
    r = res.get("vqgen") or res.get("tokenizer_only")
    if r is None:
        sys.exit(f"error: {folder}/results.json holds no vqgen row")
    cfg, tk, tm = res["config"], r["tokenizer"], r["timings"]
    flags = cfg.get("vqvae_flags") or "(defaults)"
    if cfg.get("prior_flags"):
        flags += f" / prior: {cfg['prior_flags']}"
    name = cfg.get("row_name") or folder.name
    codes = tk.get("codebook_size", "")                     # results of earlier runs: no size, no perplexity
    ppl = f"{tk['perplexity']:.0f}" if "perplexity" in tk else ""
    prior_steps = tm["stage3"]["steps"] if "stage3" in tm else "-"
    return (f"| {name} | `{flags}` | {tm['stage1']['steps']} / {prior_steps} | {tk['psnr']:.2f} | "
            f"{tk['ssim']:.3f} | {codes} | {100 * tk['codebook_usage']:.1f}% | {ppl} | {tk['floor_fid']:.2f} | "
            f"{samples_cells(r.get('samples', {}))} |")


def samples_cells(s: dict) -> str:
    """The five sample columns; blank for a mode the run did not score (a tokenizer-only run: all five)."""
    u, c = s.get("null"), s.get("cond")
    cells = [f"{u['fid']:.2f}", f"{u['precision']:.2f} / {u['recall']:.2f}"] if u else ["", ""]
    cells += [f"{c['fid']:.2f}", f"{c['precision']:.2f} / {c['recall']:.2f}", f"{100 * c['confident']:.0f}%"] \
        if c else ["", "", ""]
    return " | ".join(cells)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="bench/quality.py --out folders, one per row")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "results.json").is_file()]
    if missing:
        p.error(f"no results.json in {', '.join(missing)}")
    lines = ["| row | flags (stage 1 / prior) | steps (stage 1 / 3) | PSNR | SSIM | codes | usage | perplexity | "
             "tokenizer floor | uncond gFID | uncond P / R | cond gFID | cond P / R | cond confident |",
             "|" + "---|" * 14]
    lines += [row(f) for f in args.folders]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
