"""Typed hyperparameters: one dataclass per method, loaded from YAML and ``--set key=value``."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from medit.errors import HParamsError, InputFileError

H = TypeVar("H", bound="HParams")


@dataclasses.dataclass
class HParams:
    """Base class. Subclasses are dataclasses with typed, documented fields and a ``__post_init__``
    that validates values (raise :class:`HParamsError` naming the field and the fix)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def convert_values(cls, values: dict[str, Any], source: str = "hparams") -> dict[str, Any]:
        """``values`` converted to the fields' types; unknown names and unconvertible values are
        refused. Needs no model: the CLI checks ``--set`` with it before loading one."""
        valid = cls.field_names()
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise HParamsError(f"unknown hparam(s) {', '.join(map(repr, unknown))} in {source}; "
                               f"valid for {cls.__name__}: {', '.join(valid)}")
        hints = typing.get_type_hints(cls)
        return {k: convert(v, hints[k], k) for k, v in values.items()}

    @classmethod
    def from_dict(cls: type[H], values: dict[str, Any], source: str = "hparams") -> H:
        """Build from a plain mapping, converting each value to its field's type."""
        converted = cls.convert_values(values, source)
        try:
            return cls(**converted)
        except TypeError as exc:  # a required field missing
            raise HParamsError(f"{cls.__name__} from {source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: H, **changes: Any) -> H:
        return type(self).from_dict({**self.to_dict(), **changes}, "replace()")


def convert(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to type ``tp``; raise HParamsError if impossible."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, name)
            except HParamsError as exc:
                errors.append(str(exc))
        raise HParamsError(f"hparam {name!r}: cannot use {value!r} as {_tname(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise HParamsError(f"hparam {name!r}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in text.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [convert(v, inner, name) for v in value]
        return out if origin is list else tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise HParamsError(f"hparam {name!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise HParamsError(f"hparam {name!r}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise HParamsError(f"hparam {name!r}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise HParamsError(f"hparam {name!r}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise HParamsError(f"hparam {name!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HParamsError(f"hparam {name!r}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise HParamsError(f"hparam {name!r}: expected a string, got {value!r}")
        return str(value)
    return value


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"hparams file {str(p)!r} does not exist; pass an existing YAML file to --hparams")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise InputFileError(f"hparams file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise InputFileError(f"hparams file {str(p)!r} is not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(data, dict):
        raise InputFileError(f"hparams file {str(p)!r} must hold a mapping of key: value")
    return data


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """Parse repeatable ``--set key=value`` options (values stay strings; fields convert them)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise HParamsError(f"--set {item!r} is not key=value; write e.g. --set lr=0.1")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
