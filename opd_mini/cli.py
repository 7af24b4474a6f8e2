"""The command line of every opd_mini command: one flag per config field, and one-line errors.

    python -m opd_mini.train --preset tiny-cpu --steps 10 --lr 3e-4
    python -m opd_mini.train --config run.yaml --loss jsd --beta 0.3     # flags override the file

:func:`build_parser` makes one flag per :class:`opd_mini.config.TrainConfig` field, with the field's
own help text and range; :func:`parse_args` builds the config (defaults < preset < file < flags);
:func:`run_cli` runs a command so that bad input ends in one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields
from typing import Any, Callable

from opd_mini import registry
from opd_mini.config import FIELD_NAMES, PRESETS, TrainConfig, load_file
from opd_mini.options import choices_of, parse_bool, range_text, type_name
from opd_mini.registry import LossOptions

_LOSS_FIELDS = {f.name for f in fields(LossOptions)}


def build_parser(prog: str = "python -m opd_mini.train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with --preset, --config and one flag per TrainConfig field (help from the field)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or "On-policy distillation of a causal LM.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=list(PRESETS), help="start from a named bundle of settings")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of field values (flags override it)")
    run = parser.add_argument_group("the run (opd_mini.config.TrainConfig)")
    loss = parser.add_argument_group("the loss options (opd_mini.registry.LossOptions)")
    for f in fields(TrainConfig):
        help_text = f.metadata["help"] + (f" (default: {f.default!r})" if f.default != "" else " (default: '')")
        choices = choices_of(f)
        if range_text(f) and choices is None:
            help_text += f"; {range_text(f)}"
        flag = "--" + f.name
        if type_name(f) == "bool":
            kwargs = dict(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kind = {"int": int, "float": float, "str": str}[type_name(f)]
            kwargs = dict(type=kind, choices=choices, metavar=None if choices else f.name.upper())
        group = loss if f.name in _LOSS_FIELDS else run
        group.add_argument(flag, help=help_text, **kwargs)
        if "_" in f.name:  # --lora-r works as well as --lora_r (not listed in --help)
            group.add_argument(flag.replace("_", "-"), dest=f.name, help=argparse.SUPPRESS, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Precedence: defaults < preset < --config file < flags."""
    given = vars(args).copy()
    preset = given.pop("preset", None)
    file = given.pop("config", None)
    values: dict[str, Any] = {}
    if preset:
        values["preset"] = preset
    if file:
        file_values = load_file(file)
        if "preset" in file_values and preset:  # a preset on the command line wins over one in the file
            file_values.pop("preset")
        values.update(file_values)
    values.update({k: v for k, v in given.items() if k in FIELD_NAMES})
    return TrainConfig.from_dict(values, source=str(file) if file else "command line")


def parse_args(argv: list[str] | None = None, prog: str = "python -m opd_mini.train") -> TrainConfig:
    """A TrainConfig from command-line arguments. The files of ``--loss_plugins`` and ``--task_plugins`` (on the
    command line or in the ``--config`` file) are imported first, so ``--loss`` and ``--task`` accept what they
    register."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--loss_plugins", "--loss-plugins", default=None)
    pre.add_argument("--task_plugins", "--task-plugins", default=None)
    pre.add_argument("--config", default=None)
    argv = join_negative_numbers(sys.argv[1:] if argv is None else argv)
    known, _ = pre.parse_known_args(argv)
    file = load_file(known.config) if known.config else {}
    registry.import_plugins(known.loss_plugins if known.loss_plugins is not None else file.get("loss_plugins", ""))
    registry.import_plugins(known.task_plugins if known.task_plugins is not None else file.get("task_plugins", ""),
                            what="task")
    return config_from_args(build_parser(prog).parse_args(argv))


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``["--lr", "-1e-4"]`` → ``["--lr=-1e-4"]``: argparse takes "-1e-4" for an option otherwise, and the range
    check (a clear message) never sees the value."""
    out: list[str] = []
    for item in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.match(item):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body so that bad input ends in one ``error:`` line and exit code 2, never a traceback.

    Bad input is a ValueError, an OSError (a missing file or model, no network), an ImportError (an
    optional package), or an error carrying an ``exit_code`` (a stopped diverging run: 3). Any other
    exception is a bug, and keeps its traceback. Under a launcher's several processes, a process other than
    the main one names itself (``error (process 2/4): …``); each message is written in one piece, so the
    lines of different processes do not interleave.
    """
    try:
        return body()
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        code = getattr(e, "exit_code", None)
        if code is None and isinstance(e, RuntimeError):
            raise
        message = str(e) if code == 3 else " ".join(str(e).split("\n")[0].split()) or type(e).__name__
        world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        who = f" (process {int(rank) + 1}/{world})" if world.isdigit() and rank.isdigit() and rank != "0" else ""
        sys.stderr.write(("\n" if code == 3 else "") + f"error{who}: {message}\n")
        sys.stderr.flush()
        return code or 2


def field_docs() -> dict[str, str]:
    """Field name → help text (the same text as ``--help``)."""
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}
