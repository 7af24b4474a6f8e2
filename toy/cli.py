"""The toy experiments' command-line options, generated from their ``Config`` dataclasses.

Each field of a ``Config`` is declared once, with its type, its default and an attribute docstring
(the string literal on the line after it); :func:`add_config_arguments` turns every field into a
flag (``train_T`` → ``--train-T``, tuples take several values, booleans ``--x``/``--no-x``) whose
help is that docstring, and :func:`config_from_args` builds the validated ``Config`` back.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import textwrap
import time
import typing


def field_docs(config_cls) -> dict[str, str]:
    """Field name → its attribute docstring, read from the class source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(config_cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of ``config_cls`` (help from its docstring, default from the dataclass)."""
    defaults, docs = config_cls(), field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, default, hint = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), hints[f.name]
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs = dict(dest=f.name, default=default, help=f"{docs.get(f.name, '')} (default: {shown})")
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(hint) is tuple:
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            parser.add_argument(flag, type=item, nargs="+", metavar=item.__name__.upper(), **kwargs)
        else:
            parser.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **kwargs)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(config_cls, args: argparse.Namespace):
    """An experiment's ``Config`` from parsed options (lists become tuples), validated, fast settings applied."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values).apply_fast().validate()


def experiment_commands(config_cls, run):
    """An experiment module's command-line contract from its ``Config`` and ``run(cfg, out, progress)``:
    ``(add_arguments(parser), config_from_args(args), main(args) -> dict)``."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config_cls)

    def from_args(args: argparse.Namespace):
        return config_from_args(config_cls, args)

    def main(args: argparse.Namespace) -> dict:
        return run(from_args(args), args.out, progress=not getattr(args, "no_progress", False))

    return add_arguments, from_args, main


def run_captured(job: tuple[str, str, argparse.Namespace], capture: bool = True) -> tuple[str, dict, float]:
    """Run one experiment, ``job = (name, module, args)``: what it printed (when ``capture``), its result, its
    seconds. A module-level function, so that ``python -m toy`` can hand it to worker processes."""
    _, module_name, args = job
    start, out = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
        result = importlib.import_module(module_name).main(args)
    return out.getvalue(), result, time.perf_counter() - start


def check(ok: bool, message: str) -> None:
    """A ValueError with ``message`` (one line that says what to change) unless ``ok``."""
    if not ok:
        raise ValueError(message)
