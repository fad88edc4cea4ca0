"""Config dataclasses from TOML tables and back: type-checked building with errors naming the dotted key,
`--set` overrides, and TOML serialisation. Generic over the dataclasses; genesis.config holds the sections."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from typing import Any

from genesis.errors import ConfigValueError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, tables -> dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(value, inner[0], key)
        for alternative in inner:  # bool | str: the first that takes the value
            try:
                return convert(value, alternative, key)
            except ConfigValueError:
                pass
        names = {bool: "true, false", int: "an integer", float: "a number", str: "a string"}
        first, last = ", ".join(names.get(a, _type_name(a)) for a in inner).rsplit(", ", 1)
        raise ConfigValueError(key, f"expected {first} or {last}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigValueError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigValueError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigValueError(key, f"expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigValueError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigValueError(key, f"expected a table, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigValueError(key, f"expected a table, got {value!r}")
        return build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


_ALIASES = {"class": "cls"}  # TOML keys that are Python keywords


def did_you_mean(name: str, known: list[str]) -> str:
    """'; did you mean "steps"?' for the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def fields_of(cls: type, table: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from a TOML table: unknown keys and wrong types raise, values are
    converted; no `__post_init__` checks yet. Errors carry the dotted key under `prefix`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in table.items():
        name = _ALIASES.get(raw_key, raw_key)
        dotted = f"{prefix}.{raw_key}" if prefix else raw_key
        if name not in names:
            valid = sorted({k for k, v in _ALIASES.items() if v in names} | names - set(_ALIASES.values()))
            suggestion = did_you_mean(raw_key, valid)
            raise ConfigValueError(dotted, f"unknown key{suggestion} (valid keys: {', '.join(valid)})")
        kwargs[name] = convert(value, hints[name], dotted)
    return kwargs


def build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a TOML table; errors carry the dotted key under `prefix`."""
    kwargs = fields_of(cls, table, prefix)
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        if e.key.startswith(prefix + ".") or not prefix:
            raise
        raise ConfigValueError(f"{prefix}.{e.key}", e.reason, tuple(f"{prefix}.{k}" for k in e.also)) from None


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, table by table; `over`'s values are copied (a preset stays unchanged
    when a --set later writes into the merged table)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(table: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = table
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigValueError(dotted, f"'{p}' is not a table")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as TOML (numbers, true/false, [lists], "strings"), else as a string."""
    if "=" not in text:
        raise ConfigValueError(text, "an override must look like section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if "." not in key:
        raise ConfigValueError(key, "an override key needs a section, like training.steps")
    if "[" in key:  # masking.rules[0].p: a --set names a key; a list is set whole
        whole = key.split("[", 1)[0]
        raise ConfigValueError(key, f"a --set cannot index into a list; set the whole list, e.g. {whole}=[...]")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def to_dict(cfg: Any) -> Any:
    """A plain dict (TOML-serialisable, None dropped) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v is None:
                continue
            out["class" if f.name == "cls" else f.name] = to_dict(v)
        return out
    if isinstance(cfg, (list, tuple)):  # tuples from Python callers (bert_split=(0.8, 0.1, 0.1)) read as TOML arrays
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def toml_value(v: Any) -> str:
    """A value of a config field (after to_dict) as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def toml_string(s: str) -> str:
    """A TOML basic string: backslash, quote and the control characters U+0000-U+001F and U+007F escaped."""
    return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if c < " " or c == "\x7f" else c) for c in s) + '"'


def toml_key(k: str) -> str:
    """A TOML key: bare where the spec allows it (ASCII letters, digits, _ and -), else a quoted basic string."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_string(k)
