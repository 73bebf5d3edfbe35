"""docs/ARCHITECTURE.md's tables hold: every module it lists exists and holds the names it says, the import layers are
respected by every import in vqgen/, and the model-config fields it lists are the configs' fields."""

import ast
import dataclasses
import importlib
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def table(title_line: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header line starts with ``title_line``."""
    lines = DOC[DOC.index(title_line):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def module_files(path: str) -> list[Path]:
    p = ROOT / path
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def dotted(file: Path) -> str:
    return ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = table("| module | what it holds |")


@pytest.mark.parametrize("row", MODULES, ids=[r[0] for r in MODULES])
def test_module_table_names_exist(row):
    path = row[0].strip("`")
    assert (ROOT / path).exists(), path
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row[1]))
    found = set()
    for f in module_files(path):
        found |= {n for n in names if hasattr(importlib.import_module(dotted(f)), n)}
    assert names <= found, f"{path}: {sorted(names - found)} not defined there"


def layer_of() -> dict[str, int]:
    """Module (dotted, or a package prefix ending in '.') -> its layer in the doc's layer table."""
    out = {}
    for layer, cells in table("| layer | modules |"):
        for path in re.findall(r"`(vqgen/[^`]+)`", cells):
            out[dotted(ROOT / path) + ("." if path.endswith("/") else "")] = int(layer)
    return out


def find_layer(module: str, layers: dict[str, int]) -> int | None:
    best = None
    for key, layer in layers.items():
        if module == key.rstrip(".") or (key.endswith(".") and module.startswith(key)):
            if best is None or len(key) > len(best[0]):
                best = (key, layer)
    return best[1] if best else None


def test_every_import_points_down_the_layers():
    layers = layer_of()
    bad = []
    for f in sorted((ROOT / "vqgen").rglob("*.py")):
        me = dotted(f)
        mine = find_layer(me, layers)
        if mine is None:
            continue  # vqgen/__init__.py
        package = me if f.name == "__init__.py" else me.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("vqgen"):
                    continue
                theirs = find_layer(t, layers)
                if theirs is not None and theirs > mine:
                    bad.append(f"{me} (layer {mine}) imports {t} (layer {theirs})")
    assert not bad, "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("cls_name", ["VQVAEConfig", "PriorConfig"])
def test_model_config_fields_match_the_doc(cls_name):
    """The doc lists every field of the model configs, and every snake_case name it lists there exists."""
    import vqgen.config as config

    cls = getattr(config, cls_name)
    lines = DOC[DOC.index(f"@dataclass class {cls_name}(ModelConfig):"):].splitlines()
    block = " ".join([lines[0]] + [ln for ln in itertools.takewhile(
        lambda ln: ln.startswith("    "), lines[1:])])
    names = set(re.findall(r"\b[a-z][a-z0-9_]*\b", block))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert not fields - names, f"fields missing from the doc: {sorted(fields - names)}"
    snake = {n for n in names if "_" in n}
    unknown = sorted(n for n in snake if n not in fields and not hasattr(cls, n))
    assert not unknown, f"not in {cls_name}: {unknown}"
