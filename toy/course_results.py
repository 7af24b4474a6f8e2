"""The results of the course experiments: their tables, figures and JSON files, alone or together.

Every course experiment (:mod:`toy.course_passk`, :mod:`toy.course_hybrid`, :mod:`toy.course_cost`,
:mod:`toy.course_fixes`) writes ``<name>.json`` (``course_passk.json`` …: its config, its summary over seeds,
its own keys and the per-seed results it reads) and its figure, whether it runs alone or with the others.
Run together (``python -m toy``, ``python -m toy.course``) they also write ``course.json``: all four in one
file, every seed's raw results included, the file the results page and notebook 8 read.

A course experiment's module has ``NAME``, ``TRAINED`` (the methods whose training it reads), ``RECORD`` (the
keys of a seed's results it keeps), ``jobs(cfg)``, ``add_results(cfg, seeds, results) -> dict`` (adds its
own results to the seed records, returns its top-level keys), ``summarise(cfg, seeds, results) -> dict``,
``print_report(cfg, summary)`` and ``figures(cfg, summary, seeds, out)`` (``(path, figure)`` pairs);
:func:`course_commands` gives it the rest of the contract of ``toy/__main__.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict
from types import ModuleType

from opd_mini.stats import json_safe
from toy import report
from toy.cli import Timing, experiment_commands, run_experiment
from toy.course_world import FLOPS_SCALE, METHODS, Config, init_key, seeds_of, train_key

#: the order of the summary's keys in the JSON, whichever experiments wrote them
SUMMARY_ORDER = ("ks", "pass_at_k", "table", "curves", "hybrid", "neg_reward", "distil_back", "feedback_at_init",
                 "clipping", "clipping_init")


def seed_records(cfg: Config, results: dict) -> list[dict]:
    """Each seed's raw results that the shared jobs computed: ``seed``, ``base`` and ``teacher`` (when their
    evaluation ran), ``methods`` (final evaluations) and ``curves`` of the methods that were trained."""
    records = []
    for s in seeds_of(cfg):
        record = {"seed": s}
        if init_key(s) in results:
            record.update(results[init_key(s)])
        trained = {m: results[train_key(s, m)] for m in METHODS if train_key(s, m) in results}
        if trained:
            record["methods"] = {m: r["eval"] for m, r in trained.items()}
            record["curves"] = {m: r["curve"] for m, r in trained.items()}
        records.append(record)
    return records


def rounded(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` significant digits (a JSON a reader can diff)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def finish_parts(cfg: Config, parts: list[ModuleType], results: dict, out: str, timing: Timing,
                 together: str | None = None) -> dict:
    """Print, draw and write the results of the course experiments ``parts`` (modules, in course order): each
    one's ``out/<name>.json`` and figures and, with ``together``, ``out/<together>.json`` holding them all.

    Returns the results of all of them (the content of ``<together>.json``) with the paths of the figures and
    of the JSON files.
    """
    os.makedirs(out, exist_ok=True)
    seeds = seed_records(cfg, results)
    extras = {part: part.add_results(cfg, seeds, results) for part in parts}
    summaries = {part: part.summarise(cfg, seeds, results) for part in parts}
    summary = ordered({k: v for s in summaries.values() for k, v in s.items()})
    for part in parts:
        part.print_report(cfg, summary)
    plt = report.pyplot()
    figures = []
    for part in parts:
        for path, fig in part.figures(cfg, summary, seeds, out):
            figures.append(path)
            plt.close(fig)
    wall, workers = timing.wall("course/"), timing.workers
    config = {**asdict(cfg), "clip_values": list(cfg.clip_values), "methods": list(METHODS), "wall_time_s": wall,
              "workers": workers, "flops_scale": FLOPS_SCALE}
    files = {os.path.join(out, part.NAME.replace("-", "_") + ".json"):
             layout(config, ordered(summaries[part]), extras[part], [kept(part, r) for r in seeds]) for part in parts}
    result = layout(config, summary, {k: v for e in extras.values() for k, v in e.items()}, seeds)
    if together:
        files[os.path.join(out, f"{together}.json")] = result
    for path, content in files.items():
        with open(path, "w") as f:
            json.dump(json_safe(rounded(content)), f, indent=1)
    print(f"\nwrote {', '.join([*files, *figures])}; wall time {wall:.1f} s "
          f"({workers} process{'es' if workers > 1 else ''})")
    return {**result, "figures": figures, "files": list(files)}


def ordered(summary: dict) -> dict:
    return {k: summary[k] for k in SUMMARY_ORDER if k in summary}


def layout(config: dict, summary: dict, extra: dict, seeds: list[dict]) -> dict:
    """A course JSON: ``config``, ``summary``, ``flops`` (if any), ``seeds``, then the other keys."""
    return {"config": config, "summary": summary, **{k: v for k, v in extra.items() if k == "flops"},
            "seeds": seeds, **{k: v for k, v in extra.items() if k != "flops"}}


def kept(part: ModuleType, record: dict) -> dict:
    """The part of a seed's results that an experiment reads: its ``RECORD`` keys, its ``TRAINED`` methods."""
    out = {"seed": record["seed"]}
    for key in part.RECORD:
        if key in ("methods", "curves"):
            out[key] = {m: record[key][m] for m in part.TRAINED}
        else:
            out[key] = record[key]
    return out


def course_commands(module_name: str, parts: tuple[str, ...] = (), together: str | None = None) -> tuple:
    """The contract of a course experiment's module (or, with ``parts``, of the module that runs those module
    names together and writes ``<together>.json`` too): ``(run, finish, add_arguments, config_from_args,
    main)``."""
    def modules() -> list[ModuleType]:
        return [sys.modules[name] for name in parts or (module_name,)]

    def run(cfg: Config, out: str, progress: bool = True, workers: int | None = None) -> dict:
        """Run the jobs (in ``workers`` processes, default one per core) and :func:`finish`."""
        return run_experiment(sys.modules[module_name], cfg, out, progress, workers)

    def finish(cfg: Config, results: dict, out: str, timing: Timing) -> dict:
        """The tables, the figures and the JSON files from the results of the jobs (:func:`finish_parts`)."""
        return finish_parts(cfg, modules(), results, out, timing, together)

    return (run, finish, *experiment_commands(Config, run))
