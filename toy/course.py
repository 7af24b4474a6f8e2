"""The course's four experiments together: exact pass@k, the OPD + reward hybrid, cost, and the fixes.

1. **Diversity** (:mod:`toy.course_passk`): exact pass@k against k for π₀, the teacher and every student.
2. **Hybrid** (:mod:`toy.course_hybrid`): ``opd_grpo`` against both parents.
3. **Cost** (:mod:`toy.course_cost`): FLOPs per method, the feedback per episode, distilling the RL teacher back.
4. **Fu et al.'s fixes** (:mod:`toy.course_fixes`): clipping the log-ratio, the imbalanced one-token signal.

They share their world, π₀ and trained students (:mod:`toy.course_world`), so run together each student is
trained once. ``python -m toy.course --out DIR`` (and ``python -m toy``, which runs every experiment) prints
their tables and writes each one's JSON file and figure (``course_passk.json`` and ``course_passk.png`` …)
and ``DIR/course.json``: the four in one file, with every seed's raw results (:mod:`toy.course_results`).
``--fast`` is a one-seed, few-step version for tests. Bad options end in one ``error:`` line and exit code 2.

This module also gathers the names notebook 8 uses (``from toy import course as C``).
"""

from __future__ import annotations

import sys

from toy import course_cost, course_fixes, course_hybrid, course_passk
from toy.course_cost import distil_back, flops_table, plot_cost
from toy.course_fixes import plot_fixes, run_clipping
from toy.course_passk import k_grid, plot_passk
from toy.course_results import course_commands, rounded
from toy.course_world import METHODS, Config, build_world, evaluate, train

#: the course experiments, in the order their tables print
PARTS = (course_passk, course_hybrid, course_cost, course_fixes)

__all__ = ["PARTS", "Config", "METHODS", "build_world", "train", "evaluate", "k_grid", "rounded", "distil_back",
           "flops_table", "run_clipping", "plot_passk", "plot_cost", "plot_fixes", "jobs", "finish", "run",
           "add_arguments", "config_from_args", "main", "cli"]


def jobs(cfg: Config):
    """Every course experiment's jobs (the shared ones once)."""
    return [job for part in PARTS for job in part.jobs(cfg)]


#: ``run(cfg, out)`` (the four experiments together: each one's files and ``out/course.json``), ``finish``, and
#: the command line: ``add_arguments(parser)``, ``config_from_args(args)``, ``main(args) -> dict``
run, finish, add_arguments, config_from_args, main = course_commands(
    __name__, parts=tuple(part.__name__ for part in PARTS), together="course")


def build_parser():
    """The parser of ``python -m toy.course``: ``--out`` and one option per field of :class:`Config`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m toy.course", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="runs/toy", help="output directory (default runs/toy)")
    add_arguments(parser)
    return parser


def cli(argv: list[str] | None = None) -> dict:
    """``python -m toy.course [options]`` in-process: parse ``argv``, run, return the results."""
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    from opd_mini.cli import run_cli

    sys.exit(run_cli(lambda: cli() and 0))
