"""The config system (vqgen/config/): flags generated from the stage dataclasses, YAML files, precedence, aliases,
one declaration per flag, config.yaml in the run folder reused by --resume, and the example configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vqgen import pipeline
from vqgen.cli import run_cli
from vqgen.config import (
    EvalConfig,
    ExtractConfig,
    PipelineConfig,
    PriorStageConfig,
    SampleConfig,
    SamplingConfig,
    TrainConfig,
    VQVAEStageConfig,
    build_parser,
    flag,
    load_config,
    part,
    to_dict,
    validate,
)
from vqgen.data import DATASETS
from vqgen.errors import ConfigError
from vqgen.train import vqvae_task

ROOT = Path(__file__).resolve().parents[1]
STAGES = (VQVAEStageConfig, ExtractConfig, PriorStageConfig, SampleConfig, EvalConfig, PipelineConfig)
# configs/digits_demo.yaml as flags (it replaced the Makefile's DEMO_FLAGS): the only candidate of bench/demo_time.py
# that kept >= 99% classifier-confident samples, with fixed sampling settings (the FID-chosen ones trade that away).
DEMO_FLAGS = ["--train", "--sample", "--dataset", "digits", "--no_wandb", "--batch_size", "64", "--n_epochs", "15",
              "--lr", "1e-3", "--num_channels", "64", "--num_res_channels", "64", "--num_res_layers", "1",
              "--num_embeddings", "128", "--attn_layers_dim", "128", "--attn_layers_depth",
              "4", "--attn_layers_heads", "4", "--attn_dropout", "0.1", "--n_epochs_t", "40", "--lr_t", "1e-3",
              "--batch_size_t", "64", "--warmup_steps_t", "100", "--sample_and_save_freq", "5", "--shard_size", "500",
              "--num_samples", "64", "--cfg_scale", "2", "--temperature", "0.8", "--tune_sampling", "none"]


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 1.0e-3, batch_size: 32}\nmodel: {attn_layers_dim: 64}\n")
    cfg = load_config(PriorStageConfig, ["--config", str(f), "--batch_size", "8"])
    assert cfg.model.attn_layers_dim == 64 and cfg.model.attn_layers_depth == 12
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 8                     # file, then flags
    assert (cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.weight_decay) == ("cosine", 100, 0.05)
    stage1 = load_config(VQVAEStageConfig, []).train                              # stage 1's own defaults
    assert (stage1.lr, stage1.lr_schedule, stage1.warmup_steps) == (1e-3, "cosine", 0)
    pipe = load_config(PipelineConfig, ["--train"])                               # VQVAE_T.py's --lr / --lr_t
    assert (pipe.training.lr, pipe.prior_training.lr) == (stage1.lr, load_config(PriorStageConfig, []).train.lr)
    f.write_text("model: {num_channels: [8, 16]}\n")
    with pytest.raises(ConfigError, match="unknown key 'model.num_channels'"):   # a VQ-VAE flag in a prior file
        load_config(PriorStageConfig, ["--config", str(f)])


def test_old_spellings_are_aliases():
    p = load_config(PriorStageConfig, ["--lr_t", "3e-4", "--n_epochs_t", "7", "--train_split", "val"])
    assert (p.train.lr, p.train.n_epochs, p.split) == (3e-4, 7, "val")
    e = load_config(ExtractConfig, ["--output", "x/shards"])
    assert e.output_dir == "x/shards"
    s = load_config(SampleConfig, ["--precision", "fp32", "--sample_batch_size", "5"])
    assert (s.mixed_precision, s.batch_size) == ("no", 5)
    assert load_config(SampleConfig, ["--mixed_precision", "bf16"]).mixed_precision == "bf16"
    with pytest.raises(SystemExit):
        load_config(SampleConfig, ["--precision", "fp64"])


def test_top_p_and_cfg_schedule_wherever_sampling_happens(capsys):
    for cls in (SampleConfig, EvalConfig, PriorStageConfig, PipelineConfig):
        for name in ("--top_p", "--cfg_schedule"):
            assert any(name in a.option_strings for a in build_parser(cls)._actions), (cls.__name__, name)
    cfg = load_config(PipelineConfig, ["--train", "--top_p", "0.9", "--cfg_schedule", "linear"])
    for c in (pipeline.stage_configs(cfg)[k] for k in ("prior", "sample")):
        assert (c.sampling.top_p, c.sampling.cfg_schedule) == (0.9, "linear")
        assert c.sampling.draw_kwargs()["cfg_schedule"] == "linear"
    unset = load_config(SampleConfig, []).sampling                               # unset: stored, else built-in
    assert unset.cfg_schedule is None and unset.draw_kwargs()["cfg_schedule"] == "constant"
    with pytest.raises(SystemExit) as e:
        load_config(SampleConfig, ["--cfg_schedule", "cosine"])
    assert e.value.code == 2 and "invalid choice: 'cosine'" in capsys.readouterr().err


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.PROG)
def test_help_shows_each_default_once(cls):
    parser = build_parser(cls)
    text = parser.format_help()
    assert "%(default)" not in text
    for action in parser._actions:
        assert (action.help or "").count("(default") <= 1, action.option_strings
    assert text.count("--lr_t") <= 1 + text.count("usage")  # an alias is listed with its flag, not as a new entry


def test_a_flag_is_declared_once_per_script():
    @dataclasses.dataclass
    class Clash:
        PROG = "clash.py"
        train: TrainConfig = part(TrainConfig)
        sampling: SamplingConfig = part(SamplingConfig)   # both declare --seed

    with pytest.raises(TypeError, match="--seed a second time"):
        build_parser(Clash)

    @dataclasses.dataclass
    class Fine:
        train: TrainConfig = part(TrainConfig)
        sampling: SamplingConfig = part(SamplingConfig, only=("temperature",))
        note: str = flag("x", "a stage's own flag")

    assert load_config(Fine, ["--seed", "3", "--temperature", "0.5"]).train.seed == 3


def test_bad_file_values_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_size: many}\n")
    assert run_cli(vqvae_task.run, VQVAEStageConfig, ["--config", str(bad), "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "'many'" in err and len(err.strip().splitlines()) == 1
    bad.write_text("trian: {batch_size: 8}\n")
    assert run_cli(vqvae_task.run, VQVAEStageConfig, ["--config", str(bad)]) == 2
    assert "unknown key 'trian'" in capsys.readouterr().err
    assert run_cli(vqvae_task.run, VQVAEStageConfig, ["--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--output_dir is required"):
        validate(load_config(VQVAEStageConfig, []))
    assert not (tmp_path / "r").exists()


def test_demo_config_is_the_demo_flags():
    from_file = load_config(PipelineConfig, ["--config", str(ROOT / "configs/digits_demo.yaml")])
    assert to_dict(from_file) == to_dict(load_config(PipelineConfig, DEMO_FLAGS))
    ev = load_config(EvalConfig, ["--config", str(ROOT / "configs/digits_demo.yaml")])
    assert (ev.sampling.num_samples, ev.sampling.cfg_scale, ev.sampling.temperature) == (500, 2.0, 0.8)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_build_every_stage(path):
    sections = yaml.safe_load(path.read_text())
    by_prog = {cls.PROG: cls for cls in STAGES}
    assert sections and set(sections) <= set(by_prog), sections.keys()
    built = []
    for prog in sections:
        cfg = validate(load_config(by_prog[prog], ["--config", str(path)]))
        built += list(pipeline.stage_configs(cfg).values()) if prog == "VQVAE_T.py" else [cfg]
    for cfg in built:
        validate(cfg)
        if isinstance(cfg, VQVAEStageConfig):  # the model flags build a model config for the dataset's images
            spec = DATASETS[cfg.data.dataset]
            cfg.model.build(spec.channels, cfg.data.image_size or spec.image_size)
        if isinstance(cfg, PriorStageConfig):
            cfg.model.build(vocab_size=256, latent_h=16, latent_w=16, num_classes=10)
    assert {type(c) for c in built} & {VQVAEStageConfig, PriorStageConfig}, path.name


TINY = ["--dataset", "digits", "--num_channels", "8", "--num_res_channels", "8", "--num_res_layers", "1",
        "--num_embeddings", "16", "--embedding_dim", "4", "--batch_size", "128", "--no_wandb", "--val_images", "32",
        "--n_epochs", "1", "--sample_and_save_freq", "100"]


def test_run_folder_config_yaml_is_reused_by_resume(tmp_path):
    out = tmp_path / "run"
    loop = vqvae_task.run(load_config(VQVAEStageConfig, [*TINY, "--output_dir", str(out), "--max_steps", "1"]))
    assert loop.state.global_step == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["num_channels"] == [8] and saved["train"]["batch_size"] == 128
    assert "resume" not in saved["train"] and "max_steps" not in saved["train"]   # per-invocation settings
    # Only the folder, --resume and a new stop: every other value comes back from config.yaml (a different
    # model config would be refused), and a flag given now still wins.
    cfg = load_config(VQVAEStageConfig, ["--output_dir", str(out), "--resume", "latest", "--max_steps", "2",
                                         "--val_images", "16"])
    assert cfg.model.num_channels == [8] and cfg.data.dataset == "digits" and cfg.val_images == 16
    assert vqvae_task.run(cfg).state.global_step == 2


def test_pipeline_batch_size_is_each_stages_own_unless_given():
    """Stage 1 trains at batch 32 and the prior at 128 by default (equal-time ablation, docs/RESULTS.md section 4);
    VQVAE_T.py's --batch_size, the original tool's one flag for both trainers, sets both when it is given."""
    own = (load_config(VQVAEStageConfig, []).train.batch_size, load_config(PriorStageConfig, []).train.batch_size)
    assert own == (32, 128)
    stages = pipeline.stage_configs(load_config(PipelineConfig, ["--train"]))
    assert (stages["vqvae"].train.batch_size, stages["prior"].train.batch_size) == own
    assert stages["extract"].batch_size == load_config(ExtractConfig, ["--checkpoint", "x"]).batch_size
    stages = pipeline.stage_configs(load_config(PipelineConfig, ["--train", "--batch_size", "64"]))
    assert {stages["vqvae"].train.batch_size, stages["prior"].train.batch_size, stages["extract"].batch_size} == {64}
    with pytest.raises(ConfigError, match="--batch_size must be > 0"):
        validate(load_config(PipelineConfig, ["--train", "--batch_size", "0"]))


def test_config_and_help_never_import_torch(repo_root):
    """The config sits at the bottom of the import graph: importing it, and printing any script's --help, loads no
    torch (the stage module is imported only after the flags parsed)."""
    import subprocess
    import sys

    probe = ("import runpy, sys\n"
             "import vqgen.config\n"
             "assert 'torch' not in sys.modules, 'vqgen.config imported torch'\n"
             "for script in ('train_vqvae.py', 'extract_codes.py', 'train_prior.py', 'sample.py', 'evaluate.py', "
             "'VQVAE_T.py'):\n"
             "    sys.argv = [script, '--help']\n"
             "    try:\n"
             "        runpy.run_path(script, run_name='__main__')\n"
             "    except SystemExit:\n"
             "        pass\n"
             "    assert 'torch' not in sys.modules, script\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_pipeline_prior_batch_and_warmup_of_its_own():
    """--batch_size_t / --warmup_steps_t (the prior's, like --lr_t / --n_epochs_t) beat the shared --batch_size; in
    train_prior.py they are aliases of --batch_size / --warmup_steps."""
    cfg = load_config(PipelineConfig, ["--train", "--batch_size", "64", "--batch_size_t", "128", "--warmup_steps_t",
                                       "20", "--tune_minutes", "1", "--tune_sampling", "none"])
    stages = pipeline.stage_configs(cfg)
    assert (stages["vqvae"].train.batch_size, stages["prior"].train.batch_size) == (64, 128)
    assert stages["prior"].train.warmup_steps == 20 and stages["vqvae"].train.warmup_steps == 0
    assert (stages["prior"].tuning.tune_minutes, stages["prior"].tuning.tune_sampling) == (1.0, "none")
    default = pipeline.stage_configs(load_config(PipelineConfig, ["--train"]))["prior"].train
    assert (default.warmup_steps, default.batch_size) == (load_config(PriorStageConfig, []).train.warmup_steps, 128)
    prior = load_config(PriorStageConfig, ["--batch_size_t", "8", "--warmup_steps_t", "3"]).train
    assert (prior.batch_size, prior.warmup_steps) == (8, 3)
    with pytest.raises(ConfigError, match="--tune_minutes 40 must stay below --timeout_minutes 30"):
        validate(load_config(PriorStageConfig, ["--shards", "s", "--output_dir", "o", "--tune_minutes", "40"]))
