"""Configs: dataclasses whose fields carry help text and allowed values, and round-trip through JSON/YAML.

Every option is declared with `option(default, help, ...)`. `Config.from_dict` coerces strings from
the command line or YAML to the field's type ("1e-5" -> 1e-05), refuses unknown keys with the closest
valid one, and `__post_init__` checks ranges and choices with messages that name the field.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(Config):
    ...     lr: float = option(1e-5, "learning rate", low=0.0)
    ...     mode: str = option("a", "which mode", choices=("a", "b"))
    >>> Demo.from_dict({"lr": "3e-4"}).lr
    0.0003
    >>> Demo.from_dict({"lrr": 1})
    Traceback (most recent call last):
    ...
    ValueError: unknown option 'lrr' for Demo; did you mean 'lr'? Options: lr, mode
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import MISSING, field, fields


def option(default=MISSING, help: str = "", *, choices=None, low=None, high=None, low_open=False,
           default_factory=MISSING):
    """A dataclass field with help text and validation metadata.

    Args:
        default: default value (or use `default_factory` for lists / dicts).
        help: one line shown by `saftune list` and `--help`.
        choices: allowed values.
        low, high: inclusive bounds for numbers (`low_open=True` makes the lower bound exclusive).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _coerce(value, annotation, name: str, owner: str):
    """Convert `value` to `annotation` where that is unambiguous (strings from a command line)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name, owner)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{owner}.{name} = {value!r} is not a valid {annotation}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{owner}.{name} must be a list, got {value!r}")
        inner = args[0] if args else typing.Any
        items = [_coerce(v, inner, name, owner) for v in value]
        return items if origin is list else tuple(items)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{owner}.{name} must be a mapping of {annotation.__name__} options, got {value!r}")
        return annotation.from_dict(value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ValueError(f"{owner}.{name} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1", "on"):
                return True
            if value.lower() in ("false", "no", "0", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if not isinstance(number, (int, float)) or number != number or int(number) != number:
            raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
        return int(number)
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{owner}.{name} must be a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, os.PathLike):  # folders and files given as pathlib.Path
            return os.fspath(value)
        if isinstance(value, bool):  # YAML reads `on` / `off` (kernels=on on the command line) as booleans
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ValueError(f"{owner}.{name} must be a string, got {value!r}")
        return value
    return value


class Config:
    """Mixin for option dataclasses: validation, coercion, dict round-trip, help."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                continue
            choices = meta.get("choices")
            if choices is not None:
                items = value if isinstance(value, (list, tuple)) else [value]
                for item in items:
                    if item not in choices:
                        raise ValueError(
                            f"{type(self).__name__}.{f.name} = {item!r} is not allowed; choose from {', '.join(map(str, choices))}"
                        )
            low, high = meta.get("low"), meta.get("high")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
                too_high = high is not None and value > high
                if too_low or too_high:
                    left = "(" if meta.get("low_open") else "["
                    bound = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
                    raise ValueError(f"{type(self).__name__}.{f.name} = {value!r} is outside the allowed range {bound}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None = None, **overrides):
        """Build from a mapping (YAML / JSON / CLI), coercing types and refusing unknown keys."""
        values = {**(values or {}), **overrides}
        hints = typing.get_type_hints(cls)
        known = cls.field_names()
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise ValueError(f"unknown option {key!r} for {cls.__name__}{hint} Options: {', '.join(known)}")
            kwargs[key] = _coerce(value, hints[key], key, cls.__name__)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the options."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes):
        """A copy with some options changed (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def describe(cls) -> list[tuple[str, str, object, str]]:
        """(name, type, default, help) per option, for `saftune list` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
