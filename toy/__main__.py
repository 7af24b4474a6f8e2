"""Entry point of the toy reproductions: ``python -m toy [EXPERIMENT] [--out DIR] [options]``.

Each experiment is a module listed in :data:`EXPERIMENTS`. The contract of an experiment module:
``add_arguments(parser)`` adds its options to an ``argparse`` parser (one per field of its ``Config``,
see :mod:`toy.cli`), and ``main(args) -> dict`` runs it, writes ``args.out/<name>.json`` and its
figures, prints a table, and returns the results (including a ``"figures"`` list of the PNG paths).

``python -m toy`` with no experiment runs every experiment with its defaults into ``--out`` (default
``runs/toy``), each in its own process when the machine has the cores (every experiment runs on one
thread, so two cores run the two side by side; the printed tables come out whole, in order). Bad
options end in one ``error:`` line and exit code 2.

Examples::

    python -m toy bias-variance --out runs/toy
    python -m toy bias-variance --fast --out /tmp/bv
    python -m toy                      # everything, into runs/toy
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import sys
import time
from types import ModuleType

from opd_mini.config import run_cli
from toy.cli import run_captured

#: experiment name -> module implementing ``add_arguments(parser)`` and ``main(args) -> dict``
EXPERIMENTS: dict[str, str] = {
    "bias-variance": "toy.bias_variance",
    "forgetting": "toy.forgetting",
}

DEFAULT_OUT = "runs/toy"


def load_experiment(name: str) -> ModuleType:
    """Import an experiment's module."""
    return importlib.import_module(EXPERIMENTS[name])


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: an optional experiment name and ``--out``. Experiment options are parsed
    by the experiment's own parser (:func:`experiment_parser`), so only the chosen module is imported."""
    parser = argparse.ArgumentParser(
        prog="python -m toy", description="Exact toy-world reproductions of on-policy distillation results.",
        epilog="experiments: " + ", ".join(EXPERIMENTS) + ". `python -m toy EXPERIMENT -h` lists its options.")
    parser.add_argument("experiment", nargs="?", choices=list(EXPERIMENTS), help="experiment to run (default: all)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    return parser


def experiment_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    doc = (module.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(prog=f"python -m toy {name}", description=doc[0] if doc else None)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    module.add_arguments(parser)
    return parser


def defaults_for(module: ModuleType, out: str) -> argparse.Namespace:
    """The module's default arguments, with ``out`` set."""
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args([])
    args.out = out
    return args


def check_out(out: str) -> None:
    """A ValueError unless ``out`` is (or can become) a writable directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be created ({e.strerror}): choose a writable --out") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable: choose a writable --out")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    help_only = any(a in ("-h", "--help") for a in argv)
    args, rest = build_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if args.experiment is not None:
        module = load_experiment(args.experiment)
        sub_argv = list(argv)
        sub_argv.remove(args.experiment)  # its first occurrence: the positional experiment name
        sub_args = experiment_parser(args.experiment, module).parse_args(sub_argv)
        check_out(sub_args.out)
        return {args.experiment: module.main(sub_args)}
    if help_only or rest:
        build_parser().parse_args(argv)  # prints help, or the error for unknown options, and exits

    check_out(args.out)
    start = time.perf_counter()
    jobs = [(name, EXPERIMENTS[name], defaults_for(load_experiment(name), args.out)) for name in EXPERIMENTS]
    workers = min(len(jobs), os.cpu_count() or 1)
    print(f"[toy] running {', '.join(EXPERIMENTS)} -> {args.out} ({workers} process{'es' if workers > 1 else ''})")
    if workers > 1:
        for job in jobs:
            job[2].no_progress = True  # side-by-side progress bars would overwrite each other
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            outcomes = pool.map(run_captured, jobs)
    else:
        outcomes = [run_captured(job, capture=False) for job in jobs]
    results = {}
    for (name, _, _), (printed, result, seconds) in zip(jobs, outcomes):
        print(f"\n[toy] {name} ({seconds:.1f} s)\n{printed}", end="")
        results[name] = result
    print(f"\n[toy] done in {time.perf_counter() - start:.1f} s; results in {args.out}/")
    figures = [fig for res in results.values() if isinstance(res, dict) for fig in res.get("figures", [])]
    figures += [os.path.join(args.out, f) for f in sorted(os.listdir(args.out))  # any figure not listed
                if f.endswith(".png") and os.path.join(args.out, f) not in figures]
    for fig in figures:
        print(f"[toy] figure: {fig}")
    return results


def _cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_cli))
