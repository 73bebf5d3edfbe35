"""Sampling settings stored with the prior (generation_config.json): chosen at the end of training, used by every
sampler when a flag is not given, overridden by flags, ignored with --sampling_defaults builtin, absent in older
exports; unconditional sampling from each script; stage 2 and evaluate.py taking their data from the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import tiny_vqvae
from vqgen import extract, pipeline, sample
from vqgen.cli import run_cli
from vqgen.config import EvalConfig, ExtractConfig, PipelineConfig, PriorStageConfig, SampleConfig, TuneConfig
from vqgen.eval.evaluate import run as evaluate
from vqgen.export import ExportMeta, load_export
from vqgen.generation import GENERATION_CONFIG, read_generation_config, write_generation_config
from vqgen.models.prior import Prior
from vqgen.models.sampling import generate
from vqgen.train import prior_task

TINY_PRIOR = ["--attn_layers_dim", "32", "--attn_layers_depth", "2", "--attn_layers_heads", "2", "--batch_size", "64",
              "--n_epochs_t", "1", "--warmup_steps", "2", "--no_wandb", "--num_samples", "4", "--val_batches", "1"]
STORED = {"conditional": {"cfg_scale": 3.0, "cfg_schedule": "linear", "temperature": 0.5, "top_k": 5, "top_p": 1.0},
          "unconditional": {"temperature": 0.7, "top_k": 4, "top_p": 1.0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A digits tokenizer export that records its data (``data_dir`` in the run), its shards extracted with no data
    flags, a cached feature classifier (1 epoch: quick), and a prior trained with the default --tune_sampling."""
    from vqgen.eval.classifier import load_or_train

    d = tmp_path_factory.mktemp("gen")
    tiny_vqvae().export_to(d / "tok", meta=ExportMeta(stage="vqvae", dataset={
        "name": "digits", "split": "train", "image_size": 16, "channels": 1, "num_classes": 10,
        "data_dir": str(d / "data")}))
    assert run_cli(extract.run, ExtractConfig, ["--checkpoint", str(d / "tok"), "--output", str(d / "shards"),
                                                "--split", "train", "test", "--no_progress"]) == 0
    load_or_train("digits", str(d / "data"), 16, 1, epochs=1, log=lambda *a: None)
    assert run_cli(prior_task.run, PriorStageConfig, ["--shards", str(d / "shards"), "--output_dir", str(d / "prior"),
                                                      *TINY_PRIOR, "--tune_samples", "40"]) == 0
    return d


def sample_tokens(prior: Path, tok: Path, out: Path, *flags, capsys=None) -> tuple[np.ndarray, str]:
    argv = ["--checkpoint", tok, "--checkpoint_t", prior, "--num_samples", "6", "--seed", "3", "--output_dir", out,
            *flags]
    assert run_cli(sample.run, SampleConfig, [str(a) for a in argv]) == 0
    printed = capsys.readouterr().out if capsys is not None else ""
    note = next((line for line in printed.splitlines() if line.startswith("sampling, ")), "")
    return np.load(out / "tokens.npy"), note.split(" (/")[0]   # the note without the file's path


# ---------------------------------------------------------------------------------------------------- written
def test_training_stores_the_chosen_settings_outside_the_fingerprint(trained):
    export = trained / "prior" / "export"
    gc = json.loads((export / GENERATION_CONFIG).read_text())
    assert gc["format"] == "vqgen-generation-config" and {"conditional", "unconditional"} <= set(gc)
    how = gc["chosen_by"]
    assert how["reference"]["split"] == "train" and how["reference"]["images"] == 1500   # never the test split
    assert how["samples_per_setting"] == 40 and how["seconds"] > 0 and how["feature_space"]["name"] == "classifier"
    for mode in ("conditional", "unconditional"):
        trials = how["trials"][mode]
        assert len(trials) >= 1 and all(np.isfinite(t["fid"]) for t in trials)
        best = min(trials, key=lambda t: t["fid"])
        assert gc[mode] == {k: v for k, v in best.items() if k not in ("fid", "seconds")}
    # the built-in setting is the first candidate, so the stored one is never worse on the reference
    assert how["trials"]["conditional"][0] == {**how["trials"]["conditional"][0], "cfg_scale": 1.0,
                                               "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0}
    # the export's sha256 is still the fingerprint of weights + config, and names the weights the file was chosen for
    payload = json.loads((export / "config.json").read_text())
    assert load_export(export).sha256 == payload["sha256"] == gc["prior_sha256"]
    assert (trained / "prior" / "samples" / "samples_tuned.png").is_file()


def test_tuning_skips_unlabelled_data_with_one_note(trained, tmp_path):
    from PIL import Image

    from vqgen.eval.tune import tune_sampling

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8), "L").save(tmp_path / "imgs" / f"{i}.png")
    notes = []
    prior = Prior.from_export(trained / "prior" / "export")
    assert tune_sampling(prior, tiny_vqvae(), str(tmp_path / "imgs"), str(tmp_path), TuneConfig(),
                         log=notes.append) is None
    assert len(notes) == 1 and "no class labels" in notes[0]


# -------------------------------------------------------------------------- used, overridden, ignored, absent
def test_sample_uses_the_stored_setting_unless_a_flag_or_builtin_says_otherwise(trained, tmp_path, capsys):
    prior = tmp_path / "prior"
    shutil.copytree(trained / "prior" / "export", prior)
    write_generation_config(prior, STORED, {"method": "test"}, load_export(prior).sha256)
    tok = trained / "tok"

    def run(name, *flags):
        return sample_tokens(prior, tok, tmp_path / name, *flags, capsys=capsys)

    stored, note = run("stored")
    assert "stored with the prior" in note and "cfg_scale 3.0" in note
    explicit, _ = run("explicit", "--cfg_scale", "3", "--cfg_schedule", "linear", "--temperature", "0.5",
                      "--top_k", "5")
    assert np.array_equal(stored, explicit)
    over, note = run("over", "--temperature", "1.0")           # one flag given: the rest stays stored
    assert "temperature 1.0 given" in note
    same, _ = run("over2", "--cfg_scale", "3", "--cfg_schedule", "linear", "--temperature", "1", "--top_k", "5")
    assert np.array_equal(over, same) and not np.array_equal(over, stored)
    builtin, note = run("builtin", "--sampling_defaults", "builtin")
    assert "stored" not in note and "built-in" in note
    plain, _ = run("plain", "--cfg_scale", "1", "--temperature", "1", "--top_k", "0", "--cfg_schedule", "constant")
    assert np.array_equal(builtin, plain) and not np.array_equal(builtin, stored)
    uncond, note = run("uncond", "--unconditional")
    assert "unconditional (null class)" in note and "temperature 0.7" in note
    assert not (tmp_path / "uncond" / "labels.npy").exists() and (tmp_path / "stored" / "labels.npy").exists()
    explicit_uncond, _ = run("uncond2", "--unconditional", "--temperature", "0.7", "--top_k", "4",
                             "--sampling_defaults", "builtin")
    assert np.array_equal(uncond, explicit_uncond)
    (prior / GENERATION_CONFIG).unlink()                         # an export written before: the built-in setting
    absent, note = run("absent")
    assert np.array_equal(absent, builtin) and "stored" not in note


def test_from_pretrained_generates_with_the_stored_setting_and_save_pretrained_keeps_it(trained, tmp_path,
                                                                                          capsys):
    src = tmp_path / "src"
    shutil.copytree(trained / "prior" / "export", src)
    write_generation_config(src, STORED, {"method": "test"}, load_export(src).sha256)
    prior = Prior.from_pretrained(src)
    assert prior.generation_config["conditional"] == STORED["conditional"]
    labels = [0, 1, 2, 3]
    a = generate(prior, 4, labels=labels, generator=torch.Generator().manual_seed(0))
    b = generate(prior, 4, labels=labels, **STORED["conditional"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    u = generate(prior, 4, generator=torch.Generator().manual_seed(0))           # no labels: the unconditional one
    v = generate(prior, 4, temperature=0.7, top_k=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, v)
    prior.save_pretrained(tmp_path / "copy")
    assert Prior.from_pretrained(tmp_path / "copy").generation_config["conditional"] == STORED["conditional"]
    with torch.no_grad():                                        # other weights do not inherit the setting silently
        next(prior.parameters()).add_(1.0)
    prior.save_pretrained(tmp_path / "edited")
    capsys.readouterr()
    assert Prior.from_pretrained(tmp_path / "edited").generation_config is None
    assert "chosen for other weights" in capsys.readouterr().err


def test_a_corrupt_file_is_ignored_with_one_warning(trained, tmp_path, capsys):
    prior = tmp_path / "prior"
    shutil.copytree(trained / "prior" / "export", prior)
    (prior / GENERATION_CONFIG).write_text("{not json")
    assert read_generation_config(prior) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignored" in err and "built-in" in err
    (prior / GENERATION_CONFIG).write_text(json.dumps({"format": "vqgen-generation-config",
                                                       "conditional": {"temperature": -1}}))
    assert read_generation_config(prior) is None and "temperature must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- unconditional, checks first
def test_class_label_is_checked_before_any_model_is_loaded(trained, tmp_path, capsys, monkeypatch):
    def never(*a):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sample, "load_pair", never)
    base = ["--checkpoint", str(trained / "tok"), "--checkpoint_t", str(trained / "prior" / "export"),
            "--output_dir", str(tmp_path / "s")]
    for flags, needles in ((["--class_label", "99"], ("--class_label 99 is out of range", "0..9", "--unconditional")),
                           (["--class_label", "-1"], ("out of range", "--unconditional")),
                           (["--class_label", "3", "--unconditional"], ("contradict",)),
                           (["--unconditional", "--cfg_scale", "2"], ("--cfg_scale needs class labels",))):
        assert run_cli(sample.run, SampleConfig, base + flags) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles) and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_no_png_writes_no_image_folder(trained, tmp_path):
    sample_tokens(trained / "prior" / "export", trained / "tok", tmp_path / "s", "--no_png", "--npz")
    assert not (tmp_path / "s" / "images").exists()
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"grid.png", "tokens.npy", "labels.npy", "samples.npz"}


def test_pipeline_samples_unconditionally(trained, tmp_path):
    argv = ["--sample", "--checkpoint", trained / "tok", "--checkpoint_t", trained / "prior" / "export",
            "--output_dir", tmp_path / "run", "--unconditional", "--num_samples", "3"]
    assert run_cli(pipeline.run, PipelineConfig, [str(a) for a in argv]) == 0
    out = tmp_path / "run" / "samples"
    assert np.load(out / "tokens.npy").shape[0] == 3 and not (out / "labels.npy").exists()


def test_evaluate_unconditionally_with_the_data_the_tokenizer_records(trained, tmp_path, capsys):
    argv = ["--checkpoint", trained / "tok", "--checkpoint_t", trained / "prior" / "export", "--shards",
            trained / "shards", "--num_samples", "20", "--max_images", "60", "--unconditional", "--no_plots",
            "--output", tmp_path / "eval.json"]
    assert run_cli(evaluate, EvalConfig, [str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert f"--data_dir {trained / 'data'}" in printed and "sampling, unconditional (null class)" in printed
    res = json.loads((tmp_path / "eval.json").read_text())
    # no --data_dir: the classifier cached in the tokenizer's data folder is the feature space
    assert res["feature_space"]["export"] == str(trained / "data" / "classifier" / "digits")
    p = res["prior"]
    assert p["conditional"] is False and p["cfg_scale"] == 1.0 and "label_accuracy" not in p["classifier"]
    assert p["temperature"] == json.loads((trained / "prior" / "export" / GENERATION_CONFIG).read_text())[
        "unconditional"]["temperature"]


def test_extract_takes_its_data_from_the_tokenizer_and_says_so(trained, tmp_path, capsys):
    assert run_cli(extract.run, ExtractConfig, ["--checkpoint", str(trained / "tok"), "--split", "test",
                                                "--output", str(tmp_path / "sh"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("as the tokenizer export") == 1 and f"--dataset digits --data_dir {trained / 'data'}" in out
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["splits"]["test"]["total"] == 297
    # given flags win, and nothing is said
    assert run_cli(extract.run, ExtractConfig, ["--checkpoint", str(trained / "tok"), "--split", "test", "--dataset",
                                                "digits", "--data_dir", str(tmp_path / "d"), "--output",
                                                str(tmp_path / "sh2"), "--no_progress"]) == 0
    assert "as the tokenizer export" not in capsys.readouterr().out
    # a tokenizer that records nothing needs --dataset
    tiny_vqvae().export_to(tmp_path / "bare")
    assert run_cli(extract.run, ExtractConfig, ["--checkpoint", str(tmp_path / "bare"), "--output",
                                                str(tmp_path / "sh3")]) == 2
    assert "pass --dataset" in capsys.readouterr().err and not (tmp_path / "sh3").exists()
