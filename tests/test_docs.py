"""Prose that stays true: every vqgen name or path in the docstrings and comments of the code and tests and in the
docs exists, module docstrings stay short, and no issue number sits in the code.

A name resolves when the longest prefix that is a module file imports and the rest is reached by getattr (each
module imported once). EXCLUDED_DOCS: documents left out of the check (none).
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXCLUDED_DOCS: set[str] = set()
MAX_MODULE_DOCSTRING_LINES = 10

# a dotted vqgen name (with ~ in a role), not preceded by a word, dot, slash or dash (a url, a file name)
DOTTED = re.compile(r"(?<![\w./-])~?(vqgen(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./-])(vqgen/[\w/]*\w\.py)\b")
# :func:`name` / :class:`~name` / ... whose name does not start with vqgen. (those are DOTTED): local to the module
ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):`~?((?!vqgen\.)\.*[A-Za-z_][\w.]*)`")
ISSUE = re.compile(r"\b[Ii]ssues? ?#?\d|\bissue-\d")


def python_files(*, scripts: bool = True) -> list[Path]:
    files = sorted((ROOT / "vqgen").rglob("*.py"))
    if scripts:
        files += sorted((ROOT / "bench").glob("*.py")) + sorted(ROOT.glob("*.py"))
    return files


def doc_files() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return [d for d in docs if d.relative_to(ROOT).as_posix() not in EXCLUDED_DOCS]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def docstrings(tree: ast.AST):
    """(node, docstring) of the module, every class and every function."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node, doc


def prose(path: Path):
    """(line, text) of a file's prose: a Python file's docstrings and comments, a Markdown file's lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        yield from enumerate(text.splitlines(), 1)
        return
    for node, doc in docstrings(ast.parse(text)):
        yield getattr(node, "lineno", 1), doc
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def _is_module(parts: list[str]) -> bool:
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@cache
def _import(module: str):
    return importlib.import_module(module)


def _has(obj, name: str) -> bool:
    if hasattr(obj, name):
        return True
    if isinstance(obj, type):  # dataclass fields without a default, annotated class attributes
        return any(name in getattr(c, "__annotations__", {}) for c in obj.__mro__)
    return False


def _walk(obj, names: list[str]) -> bool:
    for name in names:
        if not _has(obj, name):
            return False
        obj = getattr(obj, name, None)
    return True


@cache
def resolves(dotted: str) -> bool:
    """Import the longest prefix of ``dotted`` that is a module file, then getattr along the rest."""
    parts = dotted.split(".")
    k = len(parts)
    while k > 1 and not _is_module(parts[:k]):
        k -= 1
    try:
        module = _import(".".join(parts[:k]))
    except Exception:
        return False
    return _walk(module, parts[k:])


def broken_references(path: Path) -> list[str]:
    bad = []
    for line, text in prose(path):
        for m in DOTTED.finditer(text):
            if not resolves(m.group(1)):
                bad.append(f"{rel(path)}:{line}: {m.group(1)}")
        for m in PATH.finditer(text):
            if not (ROOT / m.group(1)).is_file():
                bad.append(f"{rel(path)}:{line}: {m.group(1)}")
    return bad


def test_vqgen_names_and_paths_in_code_resolve():
    bad = [b for f in python_files() + sorted((ROOT / "tests").glob("*.py")) for b in broken_references(f)]
    assert not bad, "names or paths that do not exist:\n" + "\n".join(bad)


def test_vqgen_names_and_paths_in_docs_resolve():
    bad = [b for f in doc_files() for b in broken_references(f)]
    assert not bad, "names or paths that do not exist:\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_local_roles_in_vqgen_docstrings_resolve():
    """``:func:`name``` in a vqgen module's docstring names something of that module (or of the enclosing class);
    ``:mod:`.sub``` is relative to the module's package, as in an import."""
    bad = []
    for path in python_files(scripts=False):
        name = _module_name(path)
        module = _import(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def check(node, scopes):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for ref in ROLE.findall(ast.get_docstring(node, clean=False) or ""):
                    if ref.startswith("."):
                        ok = resolves(_absolute(ref, package))
                    else:
                        ok = any(_walk(scope, ref.split(".")) for scope in scopes)
                    if not ok:
                        bad.append(f"{rel(path)}:{getattr(node, 'lineno', 1)}: {ref}")
            for child in ast.iter_child_nodes(node):
                cls = getattr(scopes[0], child.name, None) if isinstance(child, ast.ClassDef) else None
                check(child, [cls, *scopes] if cls is not None else scopes)

        check(ast.parse(path.read_text(encoding="utf-8")), [module])
    assert not bad, "docstring references that do not exist:\n" + "\n".join(bad)


def _absolute(ref: str, package: str) -> str:
    """``..a.b`` relative to ``package``, as Python resolves a relative import."""
    dots = len(ref) - len(ref.lstrip("."))
    base = package.rsplit(".", dots - 1)[0] if dots > 1 else package
    return f"{base}.{ref[dots:]}"


@pytest.mark.parametrize("path", python_files(), ids=rel)
def test_module_docstring_is_short(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False) or ""
    n = len(doc.splitlines())
    assert n <= MAX_MODULE_DOCSTRING_LINES, (f"{rel(path)}: a {n}-line module docstring; say what the module is for "
                                             f"and why in a few lines, and move the rest to docs/NOTES.md")


def test_no_issue_numbers_in_code():
    bad = [f"{rel(f)}:{i}: {line.strip()}" for f in python_files()
           for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if ISSUE.search(line)]
    assert not bad, "issue numbers belong in commit messages and docs/, not in code:\n" + "\n".join(bad)


def test_the_checker_finds_what_is_broken():
    assert resolves("vqgen.config.flags.flag") and resolves("vqgen.shards.Manifest.read")
    assert resolves("vqgen.config.TrainConfig.batch_size")  # a dataclass field
    assert not resolves("vqgen.flags") and not resolves("vqgen.models.sampling.no_such_name")
    assert _absolute(".fsq.FSQ", "vqgen.models.quantizers") == "vqgen.models.quantizers.fsq.FSQ"
    assert _absolute("..errors", "vqgen.config") == "vqgen.errors"
    found = [m.group(1) for m in DOTTED.finditer("see :mod:`~vqgen.sampling`, https://x.org/vqgen.y and vqgen.io.")]
    assert found == ["vqgen.sampling", "vqgen.io"]
    assert ISSUE.search("(issue 12)") and ISSUE.search("issue-15") and not ISSUE.search("tissue 3")
