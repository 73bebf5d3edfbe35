"""bench/gpu.py (the prepared GPU benchmark) and bench/decode.py run their code paths on CPU at toy size: every row
of the table, the JSON a later GPU session fills docs/RESULTS.md from, and compiled vs eager decoding side by side.
No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def bench(*argv, timeout=600) -> str:
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows_of(path: Path) -> list[dict]:
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["tiny"] is True
    assert not [r for r in result["rows"] if "error" in r], result["rows"]
    return result["rows"]


def test_gpu_bench_tiny_eager_paths(tmp_path):
    out = bench("bench/gpu.py", "--device", "cpu", "--tiny", "--no_compile", "--steps", "1", "--warmup", "1",
                "--json", str(tmp_path / "r.json"))
    rows = rows_of(tmp_path / "r.json")
    assert {r["section"] for r in rows} == {"a", "b", "c", "d"}
    what = {(r["what"], r["variant"]) for r in rows}
    assert {("vqgen tokenizer", "fp32"), ("vqgen tokenizer", "bf16+cl"), ("monai tokenizer", "bf16+cl"),
            ("vqgen prior tiny-2", "bf16"), ("monai prior tiny-3", "bf16"), ("vqgen decoding", "CFG 2"),
            ("monai decoding", "no CFG")} <= what
    assert all(r["items_per_s"] > 0 for r in rows)
    prior = next(r for r in rows if r["what"] == "vqgen prior tiny-2")
    assert prior["flops_per_token"] > 0 and prior["mfu"] is None            # no peak FLOP/s on CPU: n/a
    assert all(r["projected_50k_s"] > 0 for r in rows if r["section"] == "c")
    assert "tokenizer bf16+cl / fp32" in out and "| a | vqgen tokenizer | fp32 |" in out


@pytest.mark.slow
def test_gpu_bench_tiny_compiled_paths_and_decode_bench(tmp_path):
    bench("bench/gpu.py", "--device", "cpu", "--tiny", "--sections", "tokenizer", "prior", "decode", "--steps", "1",
          "--warmup", "2", "--json", str(tmp_path / "r.json"), timeout=1500)
    rows = rows_of(tmp_path / "r.json")
    compiled = [r for r in rows if "compile" in r["variant"] or "compiled" in r]
    assert len(compiled) == 4                     # tokenizer, 2 prior sizes, decoding with CFG
    decoding = next(r for r in rows if "compiled" in r)
    assert decoding["same_tokens"] is True and decoding["speedup"] > 0
    out = bench("bench/decode.py", "--tiny", "--json", str(tmp_path / "d.json"), timeout=900)
    assert "compiled / eager = " in out and "same tokens: yes" in out
    assert json.loads((tmp_path / "d.json").read_text())["same_tokens"] is True
