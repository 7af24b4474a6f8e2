"""Entry point of the toy reproductions: ``python -m toy [EXPERIMENT] [--out DIR] [--workers N] [options]``.

Examples::

    python -m toy --list                         # the experiments, one line each
    python -m toy                                # every experiment with its defaults, into runs/toy
    python -m toy bias-variance --out runs/toy   # one experiment
    python -m toy course-fixes --fast --out /tmp/fixes
    python -m toy forgetting -h                  # an experiment's options

Each experiment is a module listed in :data:`EXPERIMENTS`. The contract of an experiment module: ``NAME``;
``add_arguments(parser)`` adds its options to an ``argparse`` parser (one per field of its ``Config``, see
:mod:`toy.cli`) and ``config_from_args(args)`` builds the validated config; ``jobs(cfg)`` lists its
independent pieces (:class:`toy.cli.Job`) and ``finish(cfg, results, out, timing) -> dict`` prints its tables,
writes ``out/<name>.json`` and its figures, and returns the results (with a ``"figures"`` list of the PNG
paths); ``main(args) -> dict`` runs the jobs and finishes.

The course's four experiments (``course-passk``, ``course-hybrid``, ``course-cost``, ``course-fixes``) share
their world and trained students: ``course`` runs the four together into one ``course.json``.
``python -m toy`` with no experiment runs every experiment (:data:`EVERYTHING`: bias-variance, forgetting and
the course) with its defaults into ``--out`` (default ``runs/toy``): all their jobs in one pool of worker
processes, one per core and one torch thread each (the course's shared jobs run once), then their tables,
printed whole and in order, and the paths of the figures. Unknown experiments and bad options end in one
``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from types import ModuleType

from opd_mini.cli import run_cli
from toy.cli import Job, captured, run_jobs

#: experiment name -> the module implementing it (the contract in this module's docstring)
EXPERIMENTS: dict[str, str] = {
    "bias-variance": "toy.bias_variance",
    "forgetting": "toy.forgetting",
    "course-passk": "toy.course_passk",
    "course-hybrid": "toy.course_hybrid",
    "course-cost": "toy.course_cost",
    "course-fixes": "toy.course_fixes",
    "distil-long": "toy.distil_long",
}
#: what ``python -m toy`` runs: every experiment
EVERYTHING = tuple(EXPERIMENTS)

DEFAULT_OUT = "runs/toy"


def load_experiment(name: str) -> ModuleType:
    """Import an experiment's module; a ValueError names the known experiments."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; the experiments are {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def summary_line(name: str) -> str:
    """An experiment's name and the first line of its module's docstring."""
    doc = (load_experiment(name).__doc__ or "").strip().splitlines()
    return f"{name:15s} {doc[0] if doc else ''}"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: an optional experiment name, ``--out``, ``--workers``, ``--list``. Experiment options
    are parsed by the experiment's own parser (:func:`experiment_parser`), so only the chosen module is imported."""
    parser = argparse.ArgumentParser(
        prog="python -m toy", description="Exact toy-world reproductions of on-policy distillation results.",
        epilog="experiments: " + ", ".join(EXPERIMENTS) + ". `python -m toy EXPERIMENT -h` lists its options.")
    parser.add_argument("experiment", nargs="?", help="experiment to run (default: every experiment)")
    add_run_options(parser)
    parser.add_argument("--list", action="store_true", help="list the experiments, one line each, and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes (default: one per core; 1 runs everything in this process)")


def experiment_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    doc = (module.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(prog=f"python -m toy {name}", description=doc[0] if doc else None)
    add_run_options(parser)
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


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    help_only = any(a in ("-h", "--help") for a in argv)
    args, rest = build_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if args.list:
        print("\n".join(summary_line(name) for name in EXPERIMENTS))
        return {}
    if args.experiment is not None:
        module = load_experiment(args.experiment)
        sub_argv = list(argv)
        sub_argv.remove(args.experiment)  # its first occurrence: the positional experiment name
        sub_args = experiment_parser(args.experiment, module).parse_args(sub_argv)
        check_out(sub_args.out)
        check_workers(sub_args.workers)
        return {args.experiment: module.main(sub_args)}
    if help_only or rest:
        build_parser().parse_args(argv)  # prints help, or the error for unknown options, and exits
    check_out(args.out)
    check_workers(args.workers)
    return run_everything(args.out, args.workers, progress=not args.no_progress)


def run_everything(out: str, workers: int | None = None, progress: bool = True) -> dict:
    """Every experiment of :data:`EVERYTHING` with its defaults: all their jobs in one pool, each one's finish
    (a job too) as soon as its jobs are done; their printed tables in order. Experiments with the same
    ``GROUP`` run and finish through that module."""
    start = time.perf_counter()
    units: dict[str, list[str]] = {}  # module that runs and finishes -> the experiments it covers
    for name in EVERYTHING:
        units.setdefault(getattr(load_experiment(name), "GROUP", EXPERIMENTS[name]), []).append(name)
    jobs = []
    for unit in units:
        module = importlib.import_module(unit)
        cfg = module.config_from_args(defaults_for(module, out))
        own = module.jobs(cfg)
        keys = tuple(dict.fromkeys(j.key for j in own))
        jobs += own + [Job(f"{unit}/finish", finish_job, ((unit, cfg, keys, out),), keys,
                           cost=FINISH_COST.get(unit, 1.0), timing=True)]
    results, timing = run_jobs(jobs, workers, progress, desc="toy")
    print(f"[toy] ran {', '.join(EVERYTHING)}: {len(results)} jobs in {timing.workers} "
          f"process{'es' if timing.workers > 1 else ''}")
    outcomes = {}
    for unit, names in units.items():
        printed, outcome = results[f"{unit}/finish"]
        outcomes.update(dict.fromkeys(names, outcome))
        print(f"\n[toy] {', '.join(names)}\n{printed}", end="")
    print(f"\n[toy] done in {time.perf_counter() - start:.1f} s; results in {out}/")
    figures = list(dict.fromkeys(fig for res in outcomes.values() if isinstance(res, dict)
                                 for fig in res.get("figures", [])))
    figures += [os.path.join(out, f) for f in sorted(os.listdir(out))  # any figure not listed
                if f.endswith(".png") and os.path.join(out, f) not in figures]
    for fig in figures:
        print(f"[toy] figure: {fig}")
    return outcomes


#: seconds an experiment's finish takes (its figures), for the order of the jobs
FINISH_COST = {"toy.bias_variance": 1.5, "toy.forgetting": 1.5, "toy.course": 4.0}


def finish_job(timing, *values) -> tuple[str, dict]:
    """An experiment's finish in a worker process, its printed tables captured. ``values``: the results of the
    experiment's jobs, then ``(module name, config, their keys, out)``."""
    *found, (module_name, cfg, keys, out) = values
    return captured(importlib.import_module(module_name).finish, cfg, dict(zip(keys, found)), out, timing)


def _cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_cli))
