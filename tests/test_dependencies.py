"""Dependency hygiene (issue 14): every package the code imports is declared in pyproject.toml, and every declared
runtime dependency is imported by vqgen, or is a runtime plugin that a library imports on vqgen's behalf (listed
below with the reason)."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Declared core dependencies that vqgen never imports itself: accelerate imports them for a vqgen feature.
USED_THROUGH_ACCELERATE = {
    "tensorboardx": "--report_to tensorboard: accelerate's TensorBoard tracker writes event files with it",
    "deepspeed": "the DeepSpeed ZeRO path (accelerate_configs/deepspeed_zero2.yaml): accelerate drives the engine",
    "transformers": "accelerate imports transformers.integrations.HfDeepSpeedConfig whenever DeepSpeed is used",
}
# Declared core dependencies that another library imports for vqgen (not accelerate).
USED_THROUGH_OTHERS = {
    "torch-fidelity": "torchmetrics' NoTrainInceptionV3 (evaluate.py --inception_weights: the TF-FID graph)",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """{"core": {...}, "<extra>": {...}} of normalised distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs):
        return {norm(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0]) for s in specs}

    return {"core": names(project["dependencies"]),
            **{k: names(v) for k, v in project["optional-dependencies"].items()}}


def imported_distributions(files) -> dict[str, set[str]]:
    """{distribution: {files importing it}} for absolute, non-stdlib imports anywhere in ``files`` (function-level
    imports too: vqgen imports heavy packages lazily)."""
    owners = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("vqgen", "factories", "conftest") or \
                        top.startswith("test_"):
                    continue
                assert top in owners, f"{f.relative_to(ROOT)} imports {top!r}, which no installed distribution provides"
                for dist in owners[top]:
                    out.setdefault(norm(dist), set()).add(str(f.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    deps = declared()
    package = sorted((ROOT / "vqgen").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    scopes = [(package, deps["core"] | deps["diffusers"]),                        # diffusers: lazy, optional
              (sorted((ROOT / "bench").glob("*.py")), deps["core"] | deps["bench"]),
              (sorted((ROOT / "tests").glob("*.py")), deps["core"] | deps["test"] | deps["bench"])]
    for files, allowed in scopes:
        for dist, where in imported_distributions(files).items():
            assert dist in allowed, f"{dist} is imported by {sorted(where)} but not declared"


def test_every_declared_dependency_is_used():
    used = imported_distributions(sorted((ROOT / "vqgen").rglob("*.py")))
    for dist in declared()["core"]:
        assert dist in used or dist in USED_THROUGH_ACCELERATE or dist in USED_THROUGH_OTHERS, \
            f"{dist} is declared but vqgen never imports it"
    for dist in {**USED_THROUGH_ACCELERATE, **USED_THROUGH_OTHERS}:
        assert dist not in used, f"vqgen imports {dist} now: move it out of USED_THROUGH_ACCELERATE"
    assert "diffusers" in used  # the optional extra has its importer
