"""Frozen dataclasses from YAML plus `key=value` overrides, for both phases' configs.

precompute/ and train/ never import each other, so the overlay both use lives here, in the
shared kernel (see shards/__init__.py). `build(Cls, apply_overrides(yaml_dict, ["a.b=1"]))`
checks every value against the field's type (a `Literal[...]` is a choice: the error lists
the allowed values), refuses unknown keys, naming them (with a hint for a renamed key), and
prefixes the errors a dataclass's own `__post_init__` raises with its section
("loss.beta must be in [0, 1]"), so each range is checked once, where the field is declared.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing

import yaml


def parse_value(value, tp, key: str):
    """Coerce a YAML value to a dataclass field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("true" if value else "false") in choices:
            value = "true" if value else "false"  # YAML 1.1 reads true/false/on/off as bools
        if isinstance(value, bool) or value not in choices:
            allowed = " | ".join(str(c) for c in choices)
            raise ValueError(f"{key}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(parse_value(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return parse_value(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):  # e.g. tuple[ShardSource, ...] items written as mappings
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key + ".")
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "true" if value else "false"
        return "" if value is None else str(value)
    raise ValueError(f"{key}: unsupported type {tp}")


def build(cls, data: dict, prefix: str = "", renamed: dict[str, str] | None = None):
    """Instantiate dataclass `cls` from a nested dict; unknown keys are errors.

    renamed: dotted old key -> what replaced it, named in the error when an old key is used.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        said = [prefix + u for u in unknown]
        moved = [f"{k} is now {renamed[k]}" for k in said if k in (renamed or {})]
        raise ValueError(
            f"unknown config key(s) {', '.join(said)}"
            + (f" ({'; '.join(moved)})" if moved else "")
            + f"; known in {prefix or 'top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a section, got {value!r}")
            kwargs[name] = build(tp, value, f"{prefix}{name}.", renamed)
        else:
            kwargs[name] = parse_value(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a range check in __post_init__, which names the field
        raise ValueError(f"{prefix}{e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a copy of a nested dict (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _scalar(raw)
    return data


def _scalar(raw: str):
    """A YAML scalar, or a flow mapping/list when written as one; any other text that YAML
    would read as a structure ("Hint: {experience}") stays the string it looks like."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        return raw
    return value


def option(default, help: str):
    """A dataclass field with its one-line help (`metadata["help"]`), listed by `help_lines`.

    Tuples are immutable, so they are plain defaults; a dataclass default (a section) goes
    through default_factory."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def type_name(tp) -> str:
    """A field type as a user reads it: `int`, `auto | float32`, `list of str`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(str(c) for c in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"{len(args)} x {type_name(args[0])}" if len(set(args)) == 1 else str(tp)
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


def field_docs(cls, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, help) of every field of `cls`, sections flattened."""
    out = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(inst, f.name)
        if dataclasses.is_dataclass(tp) and dataclasses.is_dataclass(value):
            out.extend(field_docs(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, type_name(tp), value, f.metadata.get("help", "")))
    return out


def help_lines(cls) -> list[str]:
    """`key (type, default value): help` for every field, for an argparse epilog."""
    out = []
    for key, tp, default, help in field_docs(cls):
        if isinstance(default, tuple) and all(dataclasses.is_dataclass(d) for d in default):
            default = [dataclasses.asdict(d) for d in default]
        elif isinstance(default, tuple):
            default = list(default)
        out.append(f"  {key} ({tp}, default {default!r})\n      {help}")
    return out
