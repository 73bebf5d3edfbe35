"""How a config dataclass becomes command-line flags and YAML: the mechanism behind :mod:`vqgen.config`.

A flag is a field made with :func:`flag`; a field made with :func:`part` holds a group of flags (another dataclass);
a plain field (no ``flag``) is not a flag (a value the data decides, e.g. a model's vocabulary). A flag made with
``kind=`` belongs to one kind of its class's ``KIND_FIELD`` (``--fsq_levels`` to ``--quantizer fsq``): it is
refused when given for another kind and left out of the YAML written for one. :func:`build_parser`,
:func:`load_config` (defaults < a trainer's saved config < ``--config FILE.yaml`` < flags), :func:`to_yaml` /
:func:`from_dict` and :func:`validate` (every class's ``check()``) are the whole interface.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError


def flag(default: Any = None, help: str = "", *, choices: Sequence | None = None, aliases: Sequence[str] = (),
         type: Any = None, metavar: str | None = None, value_aliases: dict | None = None, required: bool = False,
         persist: bool = True, kind: str | Sequence[str] | None = None):
    """A command-line flag: a dataclass field with what argparse and YAML need.

    ``aliases``: older spellings (``"--output"``), accepted and listed next to the name in ``--help``.
    ``value_aliases``: older values mapped to current ones (``{"fp32": "no"}``). ``required``: must be set by a
    flag or the YAML file (checked after both are read). ``persist=False``: a per-invocation setting (``--resume``,
    ``--max_steps``...) that is not written to the run folder's config.yaml, so ``--resume`` never re-applies it.
    ``kind``: the kind(s) of the class's ``KIND_FIELD`` this setting belongs to.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases), "type": type,
            "metavar": metavar, "value_aliases": value_aliases or {}, "required": required, "persist": persist,
            "kinds": kinds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def part(cls: type, *, title: str | None = None, only: Sequence[str] | None = None, rename: dict | None = None,
         aliases: dict | None = None, help: dict | None = None, **defaults):
    """A shared group of flags inside a stage config.

    ``**defaults``: this stage's own defaults (the one place that says a stage differs). ``only``: the fields this
    stage exposes (the others keep their defaults and are not flags here). ``rename``/``aliases``: per-field flag
    name / extra old spellings in this stage. ``help``: per-field help text for this stage.
    """
    meta = {"part": True, "title": title, "only": tuple(only) if only else None, "rename": rename or {},
            "aliases": aliases or {}, "help": help or {}}
    return field(default_factory=lambda: cls(**copy.deepcopy(defaults)), metadata=meta)


@dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]      # field names from the stage config down: ("train", "lr")
    option: str                # "--lr"
    aliases: tuple[str, ...]
    help: str
    value: Any                 # the instance's value (the stage default when built from cls())
    kind: Any                  # resolved annotation: int, float | None, list[int], ...
    meta: dict
    selector: tuple[str, ...] | None = None   # path of the KIND_FIELD this flag depends on (meta["kinds"])

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _is_part(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("part"))


def _is_flag(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def _flags(cls: type, instance: Any = None, prefix: tuple[str, ...] = (), pmeta: dict | None = None) -> list[_Flag]:
    """Every flag of a config class, depth first, with this class's (stage-specific) defaults."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    pmeta = pmeta or {}
    out: list[_Flag] = []
    selector = getattr(cls, "KIND_FIELD", None)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_part(f):
            out += _flags(hints[f.name], getattr(instance, f.name), prefix + (f.name,), f.metadata)
            continue
        if not _is_flag(f) or (pmeta.get("only") is not None and f.name not in pmeta["only"]):
            continue
        name = pmeta.get("rename", {}).get(f.name, f.name)
        aliases = tuple(f.metadata["aliases"]) + tuple(pmeta.get("aliases", {}).get(f.name, ()))
        help_text = pmeta.get("help", {}).get(f.name, f.metadata["help"])
        dep = prefix + (selector,) if f.metadata.get("kinds") and selector else None
        out.append(_Flag(prefix + (f.name,), f"--{name}", aliases, help_text, getattr(instance, f.name),
                         hints[f.name], dict(f.metadata), dep))
    return out


def _get(cfg: Any, path: Sequence[str]) -> Any:
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _applies(fl: _Flag, cfg: Any) -> bool:
    """False for a kind-specific flag whose kind is not the one ``cfg`` selects."""
    return fl.selector is None or _get(cfg, fl.selector) in fl.meta["kinds"]


def _base(kind: Any) -> tuple[Any, bool, bool]:
    """(element type, optional, is_list) of an annotation such as ``int | None`` or ``list[int]``."""
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def build_parser(cls: type) -> argparse.ArgumentParser:
    """The argparse parser of a config class: flags given on the command line only (no defaults in the namespace:
    :func:`load_config` merges them over the YAML file and the defaults)."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(prog=getattr(cls, "PROG", None), description=doc,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of values, nested like the config (a file with sections keyed by script name "
                             "gives each script its section); flags given on the command line override it")
    groups: dict[tuple[str, ...], Any] = {}
    titles = {f.name: f.metadata.get("title") or f.name for f in dataclasses.fields(cls) if _is_part(f)}
    options = {fl.path: fl.option for fl in _flags(cls)}
    for fl in _flags(cls):
        where = fl.path[:1] if len(fl.path) > 1 else ()
        title = titles.get(where[0]) if where else getattr(cls, "GROUP", None)
        if fl.selector is not None:  # one group per kind: "VQ-VAE model: --quantizer fsq"
            where = where + ("/".join(fl.meta["kinds"]),)
            title = f"{title}: {options.get(fl.selector, fl.selector[-1])} {where[-1]}"
        if where not in groups:
            groups[where] = parser.add_argument_group(title)
        elem, optional, is_list = _base(fl.kind)
        kw: dict[str, Any] = {"dest": fl.key}
        if elem is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = fl.meta["type"] or (_value_alias(elem, fl.meta["value_aliases"]) if fl.meta["value_aliases"]
                                             else elem)
            if is_list:
                kw["nargs"] = "+"
            if fl.meta["choices"]:
                kw["choices"] = fl.meta["choices"]
            kw["metavar"] = fl.meta["metavar"] or (None if fl.meta["choices"] else fl.option[2:].upper())
        shown = " (required)" if fl.meta["required"] else (
            "" if fl.value is None or fl.value is False else f" (default: {_show(fl.value)})")
        kw["help"] = fl.help + shown
        try:
            groups[where].add_argument(fl.option, *fl.aliases, **kw)
            # None = "decided at run time", True = on by default: --no_<name> says false explicitly
            if elem is bool and (optional or fl.value is True):
                why = "its default is decided at run time" if fl.value is None else "on by default"
                groups[where].add_argument(f"--no_{fl.option[2:]}", dest=fl.key, action="store_false",
                                           help=f"turn {fl.option} off ({why})")
        except argparse.ArgumentError as e:
            raise TypeError(f"{cls.__name__}: {fl.key} declares {fl.option} a second time ({e})") from None
    return parser


def _value_alias(elem: type, aliases: dict):
    def convert(text: str):
        return elem(aliases.get(text, text))
    convert.__name__ = elem.__name__
    return convert


def _coerce(fl: _Flag, value: Any, where: str) -> Any:
    """A YAML or command-line value -> the field's type (ConfigError naming the key when it does not fit)."""
    elem, optional, is_list = _base(fl.kind)
    if value is None:
        if optional or fl.value is None:
            return None
        raise ConfigError(f"{where}{fl.key}: a value is required (null given)")

    def one(v):
        v = fl.meta["value_aliases"].get(v, v) if isinstance(v, str) else v
        try:
            if elem is bool:
                if not isinstance(v, bool):
                    raise ValueError("expected true or false")
                out = v
            elif elem is float:
                out = float(v)
            elif elem is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError("expected an integer")
                out = int(v)
            else:
                out = elem(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}{fl.key}: {v!r} is not a valid {elem.__name__} ({e})") from None
        if fl.meta["choices"] and out not in fl.meta["choices"]:
            raise ConfigError(f"{where}{fl.key}: {out!r} is not one of {', '.join(map(str, fl.meta['choices']))}")
        return out

    if not is_list:
        return one(value)
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    flat: list = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])  # nargs='+' of "2 4 1 1" gives lists of lists
    return [one(v) for v in flat]


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """A config from nested values over the class's defaults. Unknown keys (or keys that are not flags of this
    stage) are a ConfigError naming the key."""
    known = {fl.key: fl for fl in _flags(cls)}
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        if not isinstance(node, dict):
            raise ConfigError(f"{where}{prefix.rstrip('.') or 'the file'}: expected a mapping, got {node!r}")
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in known:
                flat[key] = _coerce(known[key], v, where)
            elif isinstance(v, dict) and any(name.startswith(key + ".") for name in known):
                walk(v, key + ".")
            else:
                raise ConfigError(f"{where}unknown key {key!r} (this config has: "
                                  f"{', '.join(sorted({n.split('.')[0] for n in known}))})")
    walk(values, "")
    cfg = cls()
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, last, value)
    return cfg


def to_dict(cfg: Any, persisted_only: bool = False) -> dict:
    """The flag values of a config, nested like the dataclasses (what ``config.yaml`` and ``--config`` hold)."""
    out: dict[str, Any] = {}
    for fl in _flags(type(cfg), cfg):
        if (persisted_only and not fl.meta["persist"]) or not _applies(fl, cfg):
            continue
        value = fl.value
        out[fl.key] = list(value) if isinstance(value, tuple) else value
    return _nest(out)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg, persisted_only=True), sort_keys=False, default_flow_style=None)


def read_yaml(path: str | os.PathLike, cls: type) -> dict:
    """The values of a YAML config file for ``cls`` (its section when the file is keyed by script names)."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of flag values at the top level")
    sections = [k for k in data if str(k).endswith(".py")]
    if sections:
        prog = getattr(cls, "PROG", None)
        if len(sections) != len(data):
            raise ConfigError(f"--config {p}: mixes script sections ({', '.join(sections)}) with other keys")
        if prog not in data:
            raise ConfigError(f"--config {p} has no section for {prog} (has: {', '.join(sections)})")
        data = data[prog] or {}
    return data


def load_config(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Flags (and ``--config``) -> a config of ``cls``: defaults < ``cls.saved_config(...)`` < file < flags.
    ``cls.SAVED_DEFAULTS``: what a saved config that lacks a key meant (the default before it changed)."""
    given = vars(build_parser(cls).parse_args(argv))
    file = given.pop("config", None)
    layer = _merge(read_yaml(file, cls) if file else {}, _nest(given))
    saved = cls.saved_config(layer) if hasattr(cls, "saved_config") else None
    base = (_merge(getattr(cls, "SAVED_DEFAULTS", {}), read_yaml(saved, cls))
            if saved is not None and Path(saved).is_file() else {})
    cfg = from_dict(cls, _merge(base, layer), where=f"{file}: " if file else "")
    _check_kinds(cls, cfg, layer)
    return cfg


def _check_kinds(cls: type, cfg: Any, given: dict) -> None:
    """A kind-specific setting given (flag or file) for another kind is a mistake, not something to ignore."""
    flags = _flags(cls, cfg)
    options = {fl.path: fl.option for fl in flags}
    for fl in flags:
        node = given
        for name in fl.path:
            node = node.get(name) if isinstance(node, dict) else None
        if node is None or _applies(fl, cfg):
            continue
        sel = options.get(fl.selector, "--" + fl.selector[-1])
        raise ConfigError(f"{fl.option} is a setting of {sel} {' / '.join(fl.meta['kinds'])}, but {sel} is "
                          f"{_get(cfg, fl.selector)}")


def validate(cfg: Any) -> Any:
    """Check a config (its parts first): required flags set, then each class's own ``check()``; returns it."""
    for fl in _flags(type(cfg), cfg):
        if fl.meta["required"] and fl.value is None:
            raise ConfigError(f"{fl.option} is required")
    _check_tree(cfg)
    return cfg


def _check_tree(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        if _is_part(f):
            _check_tree(getattr(cfg, f.name))
    if hasattr(cfg, "check"):
        cfg.check()


def int_list(text: str) -> list[int]:
    """Parse ``"2 4 1 1"`` or ``"2,4,1,1"`` (the seed passed list flags as one quoted string)."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by spaces or commas, got {text!r}") from None
