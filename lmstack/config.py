"""Typed dataclass configs: the single source of truth for CLI flags and YAML recipes.

A YAML recipe is a saved config: ``load_config(Cls, "recipe.yaml")`` builds the dataclass,
``add_config_args``/``config_from_args`` derive the CLI flags from the same fields. Unknown
keys and wrong types are errors that name the field, the value and the expected type.
Deliberately left out: nested dataclasses on the command line (use a YAML file) and
string-to-object wiring (no dotted import paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from lmstack.errors import ConfigError
from lmstack.files import atomic_write_text

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    """Check/convert one field value; raise ConfigError naming the field otherwise."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{cls_name}.{name}: got null, expected {getattr(tp, '__name__', tp)}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(cls_name, name, inner, v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected an integer") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected a number")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name}: got {value!r}, expected a string")
        return str(value)
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        import difflib

        close = {u: m[0] for u in unknown if (m := difflib.get_close_matches(str(u), fields, n=1))}
        if len(unknown) == 1 and close:
            hint = f"did you mean {close[unknown[0]]!r}? "
        else:
            hint = f"did you mean {', '.join(f'{m!r} (for {u!r})' for u, m in close.items())}? " if close else ""
        raise ConfigError(
            f"{cls.__name__}: unknown field(s) {unknown}; {hint}known fields are {sorted(fields)}"
        )
    kwargs = {k: _coerce(cls.__name__, k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML (or JSON) recipe holds; a missing or malformed file is a ConfigError."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (expected a YAML recipe)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Load a YAML (or JSON) recipe into dataclass ``cls``; ``overrides`` win over the file."""
    data = read_recipe(path)
    data.update(overrides or {})
    return config_from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per scalar field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, dest=f.name, choices=typing.get_args(tp), default=None,
                                help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            parser.add_argument(flag, dest=f.name, nargs="*", default=None, help=help_text)
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)


def given_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags (those left at None were not)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from ``base`` (e.g. a YAML file's content) plus flags the user gave."""
    return config_from_dict(cls, {**(base or {}), **given_flags(cls, args)})


def config_from_recipe(cls: type[T], recipe: str | os.PathLike | None, args: argparse.Namespace,
                       *, log=None) -> T:
    """The one way every command merges a recipe and its flags: a flag given wins over the file.

    Each flag that changes a value the recipe set is stated (on stderr by default), so a run
    never differs from its recipe silently.
    """
    base = read_recipe(recipe) if recipe else {}
    flags = given_flags(cls, args)
    for k, v in flags.items():
        if k in base and base[k] != v:
            msg = f"--{k.replace('_', '-')} {v} overrides the recipe's {k}: {base[k]!r} ({recipe})"
            (log or (lambda m: print(m, file=sys.stderr)))(msg)
    return config_from_dict(cls, {**base, **flags})
