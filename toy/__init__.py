"""The toy tabular world (``toy.world``) and the reproduction experiments run by ``python -m toy``."""

from __future__ import annotations

import argparse
import dataclasses


def config_from_args(config_cls, args: argparse.Namespace):
    """An experiment's ``Config`` from parsed command-line options: every field that has an option of the
    same name (``--teacher-scale`` → ``teacher_scale``; lists become tuples), then its fast settings."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values).apply_fast()
