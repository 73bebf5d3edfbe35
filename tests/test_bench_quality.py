"""The quality benchmark's bookkeeping (bench/quality.py, bench/ablation_table.py): how an ablation row's flags set its
step budget and how run folders become the ablation table. The benchmark itself trains for hours; not run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ablation_table  # noqa: E402
import quality  # noqa: E402


def test_batch_size_is_what_the_script_reads(tmp_path):
    flags = ["--batch_size", "128", "--lr", "1e-3", "--batch_size", "32"]   # the row's flags come after the common ones
    assert quality.batch_size_of(quality.STAGE1, flags) == 32
    assert quality.batch_size_of(quality.PRIOR, ["--shards", "s", "--batch_size=48"]) == 48
    cfg = tmp_path / "prior.yaml"
    cfg.write_text("train:\n  batch_size: 24\n")
    assert quality.batch_size_of(quality.PRIOR, ["--config", str(cfg)]) == 24


def test_step_seconds_from_the_last_two_logged_steps(tmp_path):
    # samples/s counts from the epoch's start: step 10 took 10 x 32 / 64 = 5 s, step 20 took 20 x 32 / 40 = 16 s
    rows = [{"step": 10, "samples_per_s": 64.0}, {"step": 15, "loss": 1.0}, {"step": 20, "samples_per_s": 40.0}]
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert quality.step_seconds(f, 32) == pytest.approx((16 - 5) / 10)
    assert quality.step_seconds(f, 128) == pytest.approx(4 * (16 - 5) / 10)   # the batch the row really used matters


def _results(folder: Path, vqvae_flags: str, prior_flags: str, psnr: float, **more) -> Path:
    tok = {"psnr": psnr, "ssim": 0.8, "codebook_usage": 0.97, "floor_fid": 5.0, **more.pop("tok", {})}
    samples = {m: {"fid": 10.0 + i, "precision": 0.8, "recall": 0.5, "confident": 0.9} for i, m in
               enumerate(("null", "cond"))}
    res = {"config": {"vqvae_flags": vqvae_flags, "prior_flags": prior_flags, **more},
           "vqgen": {"tokenizer": tok, "samples": samples,
                     "timings": {"stage1": {"steps": 300}, "stage3": {"steps": 400}}}}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def test_ablation_table_one_row_per_folder(tmp_path):
    a = _results(tmp_path / "base", "", "", 21.5)
    b = _results(tmp_path / "lr", "--lr 1e-3", "--lr 1e-3", 22.75)
    lines = ablation_table.main([str(a), str(b)]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == lines[3].count("|")
    assert lines[2].startswith("| base | `(defaults)` | 300 / 400 | 21.50 |")
    assert "`--lr 1e-3 / prior: --lr 1e-3`" in lines[3] and "| 22.75 |" in lines[3]
    assert "| 10.00 | 0.80 / 0.50 | 11.00 |" in lines[3]


def test_quantizer_rows_are_named_and_show_codes_usage_perplexity(tmp_path):
    """The quantizer ablation: a row per --out folder, named by --row_name, with its codebook's size, usage and
    perplexity (results of earlier runs, without them, still fit the table)."""
    old = _results(tmp_path / "old", "", "", 26.7)
    fsq = _results(tmp_path / "f", "--quantizer fsq --fsq_levels 8 8 8 8", "", 27.5, row_name="fsq4096",
                   tok={"codebook_size": 4096, "codebook_usage": 0.9951, "perplexity": 3803.4})
    lines = ablation_table.main([str(old), str(fsq)]).splitlines()
    assert len({line.count("|") for line in lines}) == 1
    assert lines[2].startswith("| old | `(defaults)` |") and "| 0.800 |  | 97.0% |  | 5.00 |" in lines[2]
    assert lines[3].startswith("| fsq4096 | `--quantizer fsq --fsq_levels 8 8 8 8` |")
    assert "| 0.800 | 4096 | 99.5% | 3803 | 5.00 |" in lines[3]


def test_tokenizer_only_rows_leave_the_prior_columns_blank(tmp_path):
    """A quantizer ablation's first pass (``--tokenizer_only``) has a tokenizer and no prior: same columns, blank."""
    full = _results(tmp_path / "vq", "", "", 27.0)
    tok = {"psnr": 27.6, "ssim": 0.94, "codebook_usage": 1.0, "floor_fid": 0.8, "codebook_size": 1000,
           "perplexity": 812.4}
    res = {"config": {"vqvae_flags": "--quantizer fsq --fsq_levels 8 5 5 5", "prior_flags": "", "row_name": "fsq1000"},
           "tokenizer_only": {"tokenizer": tok, "timings": {"stage1": {"steps": 8493}, "stage1_s": 600.0}}}
    (tmp_path / "fsq").mkdir()
    (tmp_path / "fsq" / "results.json").write_text(json.dumps(res))
    lines = ablation_table.main([str(full), str(tmp_path / "fsq")]).splitlines()
    assert len({line.count("|") for line in lines}) == 1
    assert lines[3] == ("| fsq1000 | `--quantizer fsq --fsq_levels 8 5 5 5` | 8493 / - | 27.60 | 0.940 | 1000 | "
                        "100.0% | 812 | 0.80 |  |  |  |  |  |")


def test_ablation_table_refuses_a_folder_without_results(tmp_path):
    a = _results(tmp_path / "base", "", "", 21.5)
    r = subprocess.run([sys.executable, str(ROOT / "bench/ablation_table.py"), str(a), str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: no results.json in" in r.stderr and r.stdout == ""


def test_resample_refuses_a_folder_without_a_trained_row(tmp_path):
    """--resample only rescores models that exist: an empty folder is refused before anything loads or is written."""
    out = tmp_path / "row"
    r = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--out", str(out), "--rows", "vqgen",
                        "--resample"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --resample needs a trained vqgen row") and not out.exists()


@pytest.mark.parametrize("flags,codes", [("", 256), ("--batch_size 32", 256),
                                         ("--quantizer fsq --fsq_levels 8 5 5 5", 1000),
                                         ("--quantizer lfq --lfq_bits 12", 4096)])
def test_stage1_sizes_give_the_codebook_size_to_vq_rows_only(flags, codes):
    """--num_embeddings is a --quantizer vq setting: an FSQ / LFQ row would be refused by train_vqvae.py with it."""
    from vqgen.config import VQVAEStageConfig, load_config
    sizes = quality.stage1_sizes(quality.parse_args(["--vqvae_flags", flags]))
    assert ("--num_embeddings" in sizes) == ("fsq" not in flags and "lfq" not in flags)
    cfg = load_config(VQVAEStageConfig, ["--dataset", "digits", *sizes, *flags.split()])  # what the row runs
    assert cfg.model.codebook_size == codes and cfg.model.num_channels == [64, 64]
def test_prior_rows_grids_fit_their_kind():
    """Every validation-grid entry of every vqgen row is a valid sampling setting for the row's prior kind, and a
    MaskGIT row's decoding steps are fixed in all of them."""
    from vqgen.config import PriorStageConfig, SamplingConfig, check_kind_sampling, load_config
    for row, spec in quality.VQGEN_ROWS.items():
        kind = load_config(PriorStageConfig, ["--shards", "s", *spec.prior_flags]).model.prior_kind
        for mode in quality.MODES:
            grid = spec.grid(mode)
            assert grid, (row, mode)
            for setting in grid:
                sc = SamplingConfig(**setting)
                sc.check()
                check_kind_sampling(kind, sc.draw_kwargs())
                assert setting.get("decode_steps") == spec.fixed.get("decode_steps"), (row, setting)
    assert quality.VQGEN_ROWS["maskgit8"].trained == quality.VQGEN_ROWS["maskgit16"].trained   # one training
    assert {(r, m) for r in quality.VQGEN_ROWS for m in quality.MODES} <= set(quality.LABELS)


def test_reuse_tokenizer_needs_a_row_folder(tmp_path):
    out = tmp_path / "row"
    r = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--out", str(out), "--rows", "rar",
                        "--reuse_tokenizer", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "--reuse_tokenizer" in r.stderr and "stage12.json" in r.stderr and not out.exists()
