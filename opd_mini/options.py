"""Declaring an option once: its default, its help text and its allowed values, in one ``opt(...)`` call.

    lr: float = opt(1e-4, "peak learning rate of AdamW", gt=0, lt=10)

From that declaration come the ``--help`` text and the flag of every command (:mod:`opd_mini.cli`), and
the check of a value (:func:`check_fields`: a ValueError naming the field, the value and what is allowed).
:class:`opd_mini.registry.LossOptions` and :class:`opd_mini.config.TrainConfig` declare their fields this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import field, fields
from typing import Any, Callable


def opt(default: Any, help: str, *, choices: tuple | Callable[[], tuple] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values stored in ``metadata`` (written once)."""
    return field(default=default, metadata=dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt))


def choices_of(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values; a callable is asked each time (e.g. the losses registered so far)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def range_text(f: dataclasses.Field) -> str:
    """``"it must be >= 0 and < 1"`` for a field declared with ``ge=0, lt=1``; empty without a range."""
    m = f.metadata
    parts = [f"{sym} {m[key]:g}" for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if m.get(key) is not None]
    return ("it must be " + " and ".join(parts)) if parts else ""


def check_fields(obj) -> None:
    """Coerce every field of the dataclass ``obj`` to its declared type and check its choices and range."""
    for f in fields(obj):
        if "help" not in f.metadata:
            continue
        value = coerce(f, getattr(obj, f.name))
        setattr(obj, f.name, value)
        choices = choices_of(f)
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m = f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r} is not allowed; {range_text(f) or 'it must be a finite number'}")
            bad = ((m["ge"] is not None and value < m["ge"]) or (m["gt"] is not None and value <= m["gt"])
                   or (m["le"] is not None and value > m["le"]) or (m["lt"] is not None and value >= m["lt"]))
            if bad:
                raise ValueError(f"{f.name}={value!r} is out of range; {range_text(f)}")


def parse_bool(text: str | bool) -> bool:
    """``true/false, yes/no, on/off, 1/0`` (any case) → bool; anything else is an ``ArgumentTypeError``."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Accept the obvious spellings from YAML/JSON (1 for 1.0, "true" for True); reject the rest by name."""
    kind = type_name(f)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)):
                return parse_bool(value)
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError):
        raise ValueError(f"{f.name}={value!r} is not allowed; it must be a {kind}") from None
    return value
