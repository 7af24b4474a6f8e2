"""The toy experiments' command line, and the jobs that run them side by side.

Options: each field of an experiment's ``Config`` is declared once, with its type, its default and an
attribute docstring (the string literal on the line after it); :func:`add_config_arguments` turns every
field into a flag (``train_T`` → ``--train-T``, tuples take several values, booleans ``--x``/``--no-x``)
whose help is that docstring, and :func:`config_from_args` builds the validated ``Config`` back.

Jobs: an experiment is a list of :class:`Job` (its independent pieces: one horizon, one training run, one
seed's world …) and a ``finish`` that turns their results into tables, figures and a JSON file.
:func:`run_jobs` runs the jobs of one or several experiments in worker processes, one torch thread each,
each as soon as the jobs it needs are done (the longest chain of work first); jobs with the same key run
once. A job's result depends on its arguments only, so the results do not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import multiprocessing
import os
import queue
import sys
import textwrap
import time
import typing
from typing import Any, Callable

from tqdm.auto import tqdm


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
    """An experiment module's command-line contract from its ``Config`` and
    ``run(cfg, out, progress, workers) -> dict``: ``(add_arguments(parser), config_from_args(args), main(args))``."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config_cls)

    def from_args(args: argparse.Namespace):
        return config_from_args(config_cls, args)

    def main(args: argparse.Namespace) -> dict:
        return run(from_args(args), args.out, progress=not getattr(args, "no_progress", False),
                   workers=getattr(args, "workers", None))

    return add_arguments, from_args, main


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One independent piece of an experiment: ``fn(*[results of the jobs in needs], *args)``, run in a
    worker process. ``fn`` is a module-level function (a worker imports it by name); ``cost`` is a rough
    estimate of its seconds. With ``timing``, ``fn`` also gets the run's :class:`Timing` so far, first."""

    key: str
    fn: Callable
    args: tuple = ()
    needs: tuple[str, ...] = ()
    cost: float = 1.0
    timing: bool = False


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(jobs: list[Job]) -> int:
    """One worker per core, at most one per job."""
    return max(1, min(len({j.key for j in jobs}), cores()))


@dataclasses.dataclass
class Timing:
    """How a set of jobs ran: ``workers`` processes; each job's ``seconds`` and when it ``ended`` (seconds
    after the start of the run)."""

    workers: int
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    ended: dict[str, float] = dataclasses.field(default_factory=dict)

    def wall(self, prefix: str = "") -> float:
        """Seconds from the start until the last job whose key starts with ``prefix`` ended."""
        return max((t for k, t in self.ended.items() if k.startswith(prefix)), default=0.0)


def run_jobs(jobs: list[Job], workers: int | None = None, progress: bool = False,
             desc: str = "jobs") -> tuple[dict[str, Any], Timing]:
    """Run every job once (jobs with the same key are the same job); returns their results by key, and how
    they ran.

    ``workers`` processes (default :func:`default_workers`; 1 runs the jobs here, in the same order), one torch
    thread each. A job starts when the jobs it needs are done; of the jobs ready, the one with the longest
    chain of costs ahead of it (itself and the jobs that wait for it) starts first. A job that raises stops the
    run with its exception.
    """
    unique: dict[str, Job] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    for job in unique.values():
        missing = [k for k in job.needs if k not in unique]
        if missing:
            raise KeyError(f"job {job.key} needs unknown jobs {missing}")
    timing = Timing(default_workers(jobs) if workers is None else max(1, workers))
    results: dict[str, Any] = {}
    waiting = dict(unique)
    chain = _chains(unique)
    start = time.perf_counter()
    bar = tqdm(total=len(unique), desc=desc, disable=not progress, unit="job", leave=False)

    def next_ready() -> Job | None:
        ready = [j for j in waiting.values() if all(k in results for k in j.needs)]
        if not ready:
            return None
        job = max(ready, key=lambda j: chain[j.key])  # the first listed among equals
        del waiting[job.key]
        return job

    def call_args(job: Job) -> tuple:
        first = (dataclasses.replace(timing, seconds=dict(timing.seconds), ended=dict(timing.ended)),)
        return job.fn, first * job.timing + tuple(results[k] for k in job.needs) + tuple(job.args)

    def done(key: str, outcome: tuple[Any, float]) -> None:
        results[key], timing.seconds[key] = outcome
        timing.ended[key] = time.perf_counter() - start
        bar.update()

    if timing.workers == 1:
        threads = torch_threads(1)
        try:
            while (job := next_ready()) is not None:
                done(job.key, _timed(*call_args(job)))
        finally:
            torch_threads(threads)
            bar.close()
        return results, timing

    finished: queue.SimpleQueue = queue.SimpleQueue()
    # fork (where it is safe) starts the workers with this process's modules already imported
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(timing.workers, initializer=torch_threads, initargs=(1,)) as pool:
        running = 0
        try:
            while waiting or running:
                while running < timing.workers and (job := next_ready()) is not None:
                    pool.apply_async(_timed, call_args(job),
                                     callback=lambda r, k=job.key: finished.put((k, r, None)),
                                     error_callback=lambda e, k=job.key: finished.put((k, None, e)))
                    running += 1
                if not running:
                    raise RuntimeError(f"jobs wait for each other: {sorted(waiting)}")
                key, outcome, error = finished.get()
                running -= 1
                if error is not None:
                    raise error
                done(key, outcome)
        finally:
            bar.close()
    return results, timing


def run_experiment(module, cfg, out: str, progress: bool = True, workers: int | None = None) -> dict:
    """Run an experiment module's jobs (``module.jobs(cfg)``) and finish it (``module.finish(cfg, results, out,
    timing)``: its tables, figures and JSON)."""
    results, timing = run_jobs(module.jobs(cfg), workers, progress, desc=getattr(module, "NAME", module.__name__))
    return module.finish(cfg, results, out, timing)


def _chains(jobs: dict[str, Job]) -> dict[str, float]:
    """Each job's cost plus the costliest chain of jobs that wait for it."""
    waiting_for: dict[str, list[str]] = {k: [] for k in jobs}
    for job in jobs.values():
        for k in job.needs:
            waiting_for[k].append(job.key)
    chain: dict[str, float] = {}

    def of(key: str) -> float:
        if key not in chain:
            chain[key] = jobs[key].cost + max((of(k) for k in waiting_for[key]), default=0.0)
        return chain[key]

    for key in jobs:
        of(key)
    return chain


def _timed(fn: Callable, args: tuple) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def torch_threads(n: int) -> int:
    """Set torch's CPU threads to ``n``; returns the previous number. Each worker runs one thread: the tensors
    are tiny, and one thread was 3-30× faster than two on a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def captured(fn: Callable, *args) -> tuple[str, Any]:
    """``fn(*args)`` with its printed output captured: ``(printed, result)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args)
    return out.getvalue(), result


def check(ok: bool, message: str) -> None:
    """A ValueError with ``message`` (one line that says what to change) unless ``ok``."""
    if not ok:
        raise ValueError(message)
