"""Every bad input is answered clearly (issue 8): a specific message, exit status 2, no traceback, nothing written
or overwritten. In-process through ``vqgen.cli.run_cli`` (the scripts' own error boundary) to stay fast.

Covered elsewhere, not repeated here: mismatched VQ-VAE list flags / --batch_size 0 through the real script
(test_train_vqvae.py::test_bad_flags_give_clear_error), stage-1 output dir refusal and resume with another model
(test_train_vqvae.py), unreadable files skipped with a counted warning (test_data.py), offline datasets for every
source (test_data.py), extraction into a folder of another tokenizer (test_extract.py), disk full
(test_reliability.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import tiny_vqvae
from vqgen import extract, pipeline, sample
from vqgen.cli import run_cli
from vqgen.config import (
    EvalConfig,
    ExtractConfig,
    PipelineConfig,
    PriorConfig,
    PriorStageConfig,
    SampleConfig,
    VQVAEStageConfig,
    build_parser,
)
from vqgen.eval import evaluate
from vqgen.export import ExportMeta
from vqgen.models.prior import build_prior
from vqgen.train import prior_task as train_prior
from vqgen.train import vqvae_task as train_vqvae

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = ["--num_channels", "8", "16", "--num_res_channels", "8", "16", "--num_res_layers", "1",
           "--num_embeddings", "32", "--embedding_dim", "8", "--no_wandb", "--val_images", "8"]
TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "64",
              "--no_wandb", "--num_samples", "4", "--val_batches", "1", "--sample_and_save_freq", "100",
              "--tune_sampling", "none"]


CONFIG = {train_vqvae: VQVAEStageConfig, extract: ExtractConfig, train_prior: PriorStageConfig, sample: SampleConfig,
          pipeline: PipelineConfig, evaluate: EvalConfig}


def cli(mod, argv, capsys) -> tuple[int, str]:
    code = run_cli(mod.run, CONFIG[mod], [str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file below d with (size, mtime_ns): 'nothing written or overwritten' is tree(d) unchanged."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()} if d.exists() else {}


def refused(mod, argv, capsys, *needles, untouched: Path | None = None) -> str:
    before = tree(untouched) if untouched else None
    code, err = cli(mod, argv, capsys)
    assert code == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert len(err.strip().splitlines()) <= 3, err  # one clear message, not a wall
    if untouched is not None:
        assert tree(untouched) == before
    return err


# ---------------------------------------------------------------------------------------------------- datasets
def test_unknown_dataset_and_offline_dataset(tmp_path, capsys):
    out = tmp_path / "run"
    refused(train_vqvae, ["--dataset", "mnsit", *TINY_VQ, "--output_dir", out], capsys,
            "unknown dataset 'mnsit'", "Did you mean 'mnist'")
    t0 = time.monotonic()
    err = refused(train_vqvae, ["--dataset", "mnist", "--data_dir", tmp_path / "empty", *TINY_VQ,
                                "--output_dir", out], capsys, "mnist", str(tmp_path / "empty"))
    assert time.monotonic() - t0 < 5, "offline + missing must fail fast"
    assert not out.exists() and not (tmp_path / "empty" / "MNIST").exists(), err


def _image_folder(root: Path) -> Path:
    from PIL import Image
    rng = np.random.RandomState(0)
    for i, (size, mode) in enumerate([((20, 30), "RGB"), ((16, 16), "L"), ((40, 12), "RGBA"), ((9, 9), "P"),
                                      ((64, 64), "I;16"), ((16, 16), "RGB"), ((25, 25), "L"), ((33, 17), "RGB")]):
        a = rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)
        img = Image.fromarray(a, "RGB")
        img = img.convert("I").convert("I;16") if mode == "I;16" else img.convert(mode)
        img.save(root / f"img{i}.png")
    return root


def test_mixed_sizes_and_modes_train(tmp_path, capsys):
    """Images of mixed sizes and modes are converted and resized (vqgen/data/ docstring): training runs."""
    (tmp_path / "imgs").mkdir()
    folder = _image_folder(tmp_path / "imgs")
    code, err = cli(train_vqvae, ["--dataset", folder, "--image_size", "16", *TINY_VQ, "--batch_size", "4",
                                  "--max_steps", "1", "--output_dir", tmp_path / "run"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run_config.json").read_text())["dataset"]
    assert (info["channels"], info["image_size"], info["transforms"]["num_files"]) == (3, 16, 8)


def test_corrupt_images_are_skipped_and_counted_not_fatal(tmp_path, capsys, stage2):
    """A truncated JPEG and a non-image: no rank verifies files up front; each is found when read and skipped with
    a count (one bad file never stops a long run). Training drops them from their batch; extraction records their
    keys in the manifest instead of writing tokens, also from a DataLoader worker process."""
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16), i * 40, np.uint8), "L").save(folder / f"ok{i}.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3)).astype(np.uint8)).save(folder / "t.jpg")
    data = (folder / "t.jpg").read_bytes()
    (folder / "t.jpg").write_bytes(data[: len(data) // 2])
    (folder / "junk.png").write_bytes(b"not an image")           # sorted: junk.png = item 0, t.jpg = item 7
    with pytest.warns(UserWarning, match="unreadable image file"):
        code, err = cli(train_vqvae, ["--dataset", folder, "--image_size", "16", *TINY_VQ, "--batch_size", "8",
                                      "--max_steps", "1", "--output_dir", tmp_path / "run"], capsys)
    assert code == 0, err
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_images"] == 2                          # the one batch held all 8 items
    out = tmp_path / "shards"
    code, err = cli(extract, ["--checkpoint", stage2 / "tok", "--dataset", folder, "--output", out, "--num_workers",
                              "1", "--no_progress"], capsys)
    assert code == 0, err
    entry = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert entry["total"] == 6 and entry["skipped_unreadable"] == [0, 7]


def test_mismatched_list_flags_in_the_pipeline(tmp_path, capsys):
    out = tmp_path / "run"
    refused(pipeline, ["--train", "--dataset", "digits", "--num_channels", "8", "16", "--num_res_channels", "8",
                       "--output_dir", out, "--no_wandb"], capsys, "num_res_channels")
    refused(pipeline, ["--train", "--dataset", "digits", "--num_channels", "8", "16", "--num_res_channels", "8", "8",
                       "--downsample_parameters", "2 4 1 1", "2 4 1", "--output_dir", out, "--no_wandb"], capsys,
            "downsample_parameters")
    assert not out.exists() or not any(out.rglob("*.safetensors"))


# -------------------------------------------------------------------------------------- checkpoints and shards
def test_tokenizer_export_edited_to_another_config(tmp_path, capsys, stage2):
    import shutil
    tok = tmp_path / "tok"
    shutil.copytree(stage2 / "tok", tok)
    cfg = json.loads((tok / "config.json").read_text())
    cfg["config"]["num_channels"] = [16, 16]
    (tok / "config.json").write_text(json.dumps(cfg))
    refused(extract, ["--checkpoint", tok, "--dataset", "digits", "--output", tmp_path / "sh", "--no_progress"],
            capsys, str(tok), "do not match")
    del cfg["sha256"]  # without the fingerprint: the weights' shapes give it away
    (tok / "config.json").write_text(json.dumps(cfg))
    refused(extract, ["--checkpoint", tok, "--dataset", "digits", "--output", tmp_path / "sh", "--no_progress"],
            capsys, "weights do not match the VQ-VAE config")
    assert not (tmp_path / "sh").exists()


def test_shards_of_another_tokenizer_and_corrupt_shards(tmp_path, capsys, stage2):
    import shutil
    other = tmp_path / "other"
    tiny_vqvae(seed=1).export_to(other)
    refused(train_prior, ["--shards", stage2 / "shards", "--checkpoint", other, "--output_dir", tmp_path / "p",
                          *TINY_PRIOR], capsys, "were made with tokenizer", untouched=stage2)
    assert not (tmp_path / "p").exists()
    sh = tmp_path / "shards"
    shutil.copytree(stage2 / "shards", sh)
    man = json.loads((sh / "manifest.json").read_text())
    first = sh / man["splits"]["train"]["shards"][1]["name"]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a token array: same size, tar still parses
    first.write_bytes(bytes(data))
    # Same size: the start-up check (one stat per shard) passes; the rank reading the shard from its first byte
    # hashes it as it reads and names it (issue 12: no rank hashes every shard at start-up), so training had begun.
    refused(train_prior, ["--shards", sh, "--output_dir", tmp_path / "hashed", *TINY_PRIOR], capsys, first.name,
            "sha256")
    assert not (tmp_path / "hashed/checkpoints").exists() and not (tmp_path / "hashed/export").exists()
    first.write_bytes(bytes(data[: len(data) // 3]))
    refused(train_prior, ["--shards", sh, "--output_dir", tmp_path / "p", *TINY_PRIOR], capsys, first.name,
            "truncated")
    (sh / "manifest.json").write_text("{not json")
    refused(train_prior, ["--shards", sh, "--output_dir", tmp_path / "p", *TINY_PRIOR], capsys, "manifest.json")
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def prior_pair(tmp_path_factory, stage2):
    """A conditional prior export (10 classes) for the stage-2 tokenizer, and one with another vocabulary."""
    from vqgen.export import load_export
    d = tmp_path_factory.mktemp("priors")
    sha = load_export(stage2 / "tok").sha256
    torch.manual_seed(0)
    build_prior(PriorConfig(vocab_size=32, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                            attn_layers_heads=2, num_classes=10)).export_to(
        d / "ok", meta=ExportMeta(tokenizer_sha256=sha))
    build_prior(PriorConfig(vocab_size=64, latent_h=4, latent_w=4, attn_layers_dim=16, attn_layers_depth=1,
                            attn_layers_heads=2)).export_to(d / "vocab64")
    return d


def test_sample_refusals(tmp_path, capsys, stage2, prior_pair):
    out = tmp_path / "samples"
    base = ["--checkpoint", stage2 / "tok", "--num_samples", "2", "--output_dir", out]
    refused(sample, [*base, "--checkpoint_t", prior_pair / "vocab64"], capsys, "prior vocabulary 64",
            "codebook 32")
    refused(sample, [*base, "--checkpoint_t", prior_pair / "ok", "--class_label", "99"], capsys,
            "--class_label 99 is out of range", "0..9")
    refused(sample, [*base, "--checkpoint_t", prior_pair / "ok", "--class_label", "-1"], capsys, "out of range")
    refused(sample, [*base, "--checkpoint_t", stage2 / "tok"], capsys, "'vqvae' export", "'prior'")
    refused(sample, [*base, "--checkpoint_t", tmp_path / "nowhere"], capsys, "checkpoint not found")
    other = tmp_path / "other"
    tiny_vqvae(seed=1).export_to(other)
    refused(sample, ["--checkpoint", other, "--checkpoint_t", prior_pair / "ok", "--output_dir", out], capsys,
            "trained on codes of tokenizer")
    assert not out.exists()
    code, err = cli(sample, [*base, "--checkpoint_t", prior_pair / "ok", "--class_label", "3"], capsys)
    assert code == 0 and (out / "grid.png").exists() and (np.load(out / "labels.npy") == 3).all()


def test_prior_output_dir_with_another_run(tmp_path, capsys, stage2):
    out = tmp_path / "p"
    argv = ["--shards", stage2 / "shards", "--output_dir", out, *TINY_PRIOR, "--max_steps", "1"]
    code, err = cli(train_prior, argv, capsys)
    assert code == 0, err
    refused(train_prior, argv, capsys, "already holds a run", "--resume latest", "--overwrite", untouched=out)
    refused(train_prior, [*argv, "--resume", tmp_path / "nope"], capsys, "not a complete vqgen checkpoint",
            untouched=out)
    refused(train_prior, [*argv[:-6], "--attn_layers_dim", "16", *argv[-4:], "--resume", "latest"], capsys,
            "another model config", untouched=out)


# ------------------------------------------------------------------------------------------------------- --help
SCRIPTS = {"train_vqvae.py": VQVAEStageConfig, "extract_codes.py": ExtractConfig, "train_prior.py": PriorStageConfig,
           "sample.py": SampleConfig, "VQVAE_T.py": PipelineConfig, "evaluate.py": EvalConfig}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_has_help(script):
    parser = build_parser(SCRIPTS[script])
    assert parser.prog == script
    text = parser.format_help()  # also catches a bad %-format in a help string
    assert text.startswith(f"usage: {script}")
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and (not a.help or not a.help.strip() or a.help == "==SUPPRESS==")]
    assert not missing, f"{script}: flags without help text: {missing}"


def test_scripts_help_runs():
    """The real entry points print --help and exit 0 (one interpreter for all six: imports cost ~3 s)."""
    code = ("import runpy, sys, io, contextlib\n"
            f"for s in {sorted(SCRIPTS)!r}:\n"
            "    sys.argv = [s, '--help']; buf = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(buf): runpy.run_path(s, run_name='__main__')\n"
            "    except SystemExit as e: assert e.code == 0, (s, e.code)\n"
            "    assert buf.getvalue().startswith('usage: ' + s), s\n"
            "    print(s, len(buf.getvalue().splitlines()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == len(SCRIPTS)


def test_error_line_is_one_write(monkeypatch, tmp_path):
    """Ranks of a job share an unbuffered stderr: the error line and its newline go out in one write, so two ranks'
    lines cannot interleave into one (print() writes them separately)."""
    from vqgen.errors import VQGenError

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    def fail(cfg):
        raise VQGenError("the run's own error")

    monkeypatch.setattr(sys, "stderr", Recorder())
    argv = ["--dataset", "digits", "--output_dir", str(tmp_path / "run")]   # passes the preflight: fail() is reached
    assert run_cli(fail, VQVAEStageConfig, argv) == 2
    assert writes == ["train_vqvae.py: error: the run's own error\n"]
