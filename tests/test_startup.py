"""Start-up: every script parses its flags and runs its input checks before torch is imported, so --help and a wrong
input (a missing dataset, an uncached hf: model, an out-of-range class) answer fast; third-party notices a user cannot
act on are silenced at their source, and nothing else is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from factories import tiny_vqvae
from vqgen import noise
from vqgen.errors import DatasetUnavailableError
from vqgen.export import ExportMeta
from vqgen.preflight import dataset_on_disk

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_vqvae.py", "extract_codes.py", "train_prior.py", "sample.py", "evaluate.py", "VQVAE_T.py")

# Runs each argv as the script's __main__ in one interpreter, then says whether torch was ever imported.
CHILD = """
import json, runpy, sys
codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def run_scripts(argvs: list[list[str]], **env) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argvs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_help_and_bad_inputs_never_import_torch(tmp_path):
    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "config.json").write_text(json.dumps({"format": "vqgen-export", "kind": "prior",
                                                   "config": {"num_classes": 10}}))
    tiny_vqvae().export_to(tmp_path / "tok", meta=ExportMeta(dataset={"name": "cifar10",
                                                                      "data_dir": str(tmp_path / "nodata")}))
    argvs = [[s, "--help"] for s in SCRIPTS] + [
        ["train_vqvae.py", "--dataset", "cifar10", "--data_dir", str(tmp_path / "empty"), "--output_dir",
         str(tmp_path / "run")],
        ["sample.py", "--checkpoint", "hf:nobody/tok", "--checkpoint_t", "hf:nobody/prior"],
        ["sample.py", "--checkpoint", str(tmp_path / "tok"), "--checkpoint_t", str(prior), "--class_label", "10"],
        ["extract_codes.py", "--checkpoint", str(tmp_path / "tok")],            # cifar10 in its data_dir: missing
        ["evaluate.py", "--checkpoint", str(tmp_path / "nowhere")],
    ]
    res, err = run_scripts(argvs, VQGEN_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert res["codes"] == [0] * len(SCRIPTS) + [2] * 5, (res, err)
    assert res["torch"] is False, "a script imported torch before its checks passed"
    lines = [ln for ln in err.splitlines() if ": error: " in ln]           # one message each (no traceback)
    assert len(lines) == 5 and "Traceback" not in err, err
    assert "'cifar10' is not on disk" in lines[0] and "hf:nobody/tok is not in the local" in lines[1]
    assert "--unconditional" in lines[2] and "'cifar10'" in lines[3] and str(tmp_path / "nodata") in err
    assert not (tmp_path / "run").exists()


def test_dataset_on_disk_is_the_loader_s_answer_made_early(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGEN_OFFLINE", "1")
    dataset_on_disk("digits", str(tmp_path))                              # bundled with scikit-learn
    dataset_on_disk(str(tmp_path), str(tmp_path))                          # generic inputs: the loader decides
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    dataset_on_disk("cifar10", str(tmp_path))                              # present: the loader reads (or refuses) it
    for name in ("svhn", "bloodmnist", "tinyimagenet"):
        with pytest.raises(DatasetUnavailableError, match="looked in"):
            dataset_on_disk(name, str(tmp_path))
    monkeypatch.setattr("vqgen.preflight.SYSTEM_DIRS", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetUnavailableError, match="IDX archives"):
        dataset_on_disk("mnist", str(tmp_path))
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    dataset_on_disk("mnist", str(tmp_path))


def test_deepspeed_cpu_notice_is_dropped_and_nothing_else(caplog):
    noise.silence()
    noise.silence()                                                        # idempotent
    logger = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, noise._Drop) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="DeepSpeed"):
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("zero stage 2 with offload: slow")
    assert [r.getMessage() for r in caplog.records] == ["zero stage 2 with offload: slow"]


def test_deepspeed_import_prints_no_accelerator_notice():
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}   # conftest sets it; users do not
    proc = subprocess.run([sys.executable, "-c", "import vqgen, deepspeed"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Setting accelerator" not in proc.stdout + proc.stderr
