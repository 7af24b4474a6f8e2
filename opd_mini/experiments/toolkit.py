"""What every transformer experiment shares: its command line, seeds, the worker pool, measuring a frozen
model, figures, claims, and the generated text blocks of the docs.

An experiment is one module of :mod:`opd_mini.experiments` that follows one template::

    NAME = "demo"                                   # python -m opd_mini.experiments demo
    QUICK_HELP = "..."                              # what --quick means for it
    RECIPE = toolkit.recipe(NAME)                   # its settings, from recipes/experiments/demo.yaml:
    RUN, METHODS, SCALES = RECIPE["run"], ...       #   each key of the recipe is the constant of that name
    def add_arguments(parser): ...                  # its own flags, beside the shared ones (experiment_parser)
    def run(args) -> dict:                          # trains through opd_mini.train.train, returns the result,
                                                    # written as OUT/NAME.json by write_outputs
    def docs_block(result, results_dir) -> str:     # the docs' text block, generated from the result
    def figure(result, path) -> None:               # OUT/NAME.png
    def failure(result) -> str | None: ...          # optional: why the run answers nothing (exit code 2)
    def main(argv=None): return toolkit.main(sys.modules[__name__], argv)

Optional: ``details(result) -> str`` (more text for ``OUT/NAME.md`` and the terminal, after the block);
``OUTPUTS = {block name: (block function, figure function)}`` for a module that writes several blocks and
figures (``OUT/NAME.png`` is then ``OUT/<block name>.png`` each; a block is written when its name is in
``result["parts"]``); ``COMMITTED`` = the file under :data:`RESULTS_DIR` its blocks are generated from, when
that is not ``NAME.json``.

:func:`main` runs it: parses the flags, reads the recipe (``--recipe FILE``, then each ``--set KEY=VALUE``) into the
module's constants for the run, runs, writes ``NAME.json`` (with the ``recipe`` that ran), ``NAME.md`` and the figures
under ``--out``, prints the blocks; bad input ends in one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType
from typing import Callable

from opd_mini.cli import run_cli
from opd_mini.experiments.recipes import (RECIPE_ENV, RECIPE_META, RECIPES_DIR, apply_recipe,  # noqa: F401
                                         check_recipe, merged_recipe, recipe, recipe_path, restore_recipe)
from opd_mini.stats import fmt_ms, json_safe, mean_std, pearson, spearman  # noqa: F401  (the experiments' statistics)

#: The repository this package sits in.
REPO = Path(__file__).resolve().parents[2]
#: Where the committed results live (JSON, figures), relative to the repository: the course reads them there.
RESULTS_DIR = "tutorials/results"
#: The docs page that holds the experiments' generated blocks, and the results seen from it.
DOCS_PAGE, DOCS_RESULTS_DIR = "docs/results.md", "../tutorials/results"


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def experiment_parser(name: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every experiment shares: --quick, --seeds, --steps, --workers, --out, --no-progress."""
    p = argparse.ArgumentParser(prog=f"python -m opd_mini.experiments {name}", description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the scale's)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one torch thread each)")
    p.add_argument("--out", default=f"runs/{name}", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--recipe", default=None, help=f"the settings: a YAML file like {RECIPES_DIR}/{name}.yaml (the default), "
                   "checked against it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one field of the recipe, e.g. --set run.lr=0.001 --set scales.full.steps=50 (repeatable; "
                   "methods.NEW.loss=jsd adds a method)")
    return p


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct integers >= 0, at least one (else one error naming --seeds)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds needs distinct integers >= 0, at least one, e.g. 0,1,2; got {text!r}")
    return seeds


def parse_names(text: str | None, valid, what: str, default=None) -> list[str]:
    """The comma-separated names in ``text``, each one of ``valid`` (else one error naming --``what``);
    ``default`` (or all of ``valid``) when ``text`` is empty."""
    if not text:
        return list(default if default is not None else valid)
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in valid]
    if bad or not names:
        raise ValueError(f"--{what} must name some of {', '.join(valid)}; got {text!r}")
    return names


def budget(args: argparse.Namespace, scales: dict) -> tuple[str, dict, list[int], int]:
    """What --quick, --seeds and --steps ask of an experiment whose budgets are ``scales`` (``full``, ``quick``):
    the scale's name and its settings, the seeds (the scale's ``seeds`` when --seeds is not given), the steps."""
    name = "quick" if args.quick else "full"
    scale = scales[name]
    seeds = parse_seeds(scale["seeds"] if args.seeds is None else args.seeds)
    return name, scale, seeds, scale["steps"] if args.steps is None else args.steps


def check_common(args: argparse.Namespace) -> None:
    """The shared flags' ranges."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"steps={args.steps} is out of range: --steps must be >= 1")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")


def main(module: ModuleType, argv: list[str] | None = None) -> int:
    """Run one experiment module (see the module docstring) as a command."""
    doc = (module.__doc__ or module.NAME).strip().split("\n\n")[0]
    p = experiment_parser(module.NAME, doc, getattr(module, "QUICK_HELP", "the small budget the tests use"))
    module.add_arguments(p)
    args = p.parse_args(argv)

    def body() -> int:
        check_common(args)
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the "Loading weights" bars of this process's own loads
        values = merged_recipe(module.NAME, args.recipe, args.set)
        saved = apply_recipe(module, values)
        t0 = time.perf_counter()
        try:
            result = module.run(args)
        finally:
            restore_recipe(module, saved)
        result.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        result["recipe"] = {"file": args.recipe or f"{RECIPES_DIR}/{module.NAME}.yaml", "set": args.set, "values": values}
        write_outputs(module, result, Path(args.out))
        message = getattr(module, "failure", lambda r: None)(result)
        if message:  # e.g. a budget too small to reach any target: the results are written first
            raise ValueError(f"{message} (results are written to {args.out})")
        return 0

    return run_cli(body)


def outputs(module: ModuleType, result: dict | None = None) -> dict[str, tuple[Callable, Callable]]:
    """Block name -> (block function, figure function) of what ``module`` writes (of ``result``'s parts)."""
    every = getattr(module, "OUTPUTS", None)
    if every is None:
        return {module.NAME: (module.docs_block, module.figure)}
    return {k: v for k, v in every.items() if result is None or k in result["parts"]}


def blocks(module: ModuleType, result: dict, results_dir: str) -> dict[str, str]:
    """The docs blocks ``module`` makes of ``result``, by name; figures and files linked from ``results_dir``."""
    return {name: block(result, results_dir) for name, (block, _) in outputs(module, result).items()}


def write_outputs(module: ModuleType, result: dict, out: Path) -> None:
    """``OUT/NAME.json`` (every number), ``OUT/NAME.md`` (the docs blocks, then ``details``) and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    name, result = module.NAME, json_safe(result)  # strict JSON: a NaN (e.g. a constant correlation) is null
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    details = getattr(module, "details", None)
    text = "\n\n".join([*blocks(module, result, str(out)).values(), *([details(result)] if details else [])])
    (out / f"{name}.md").write_text(text + "\n")
    figures = []
    for part, (_, draw) in outputs(module, result).items():
        figures.append(out / f"{part}.png")
        draw(result, figures[-1])
    print(text)
    print(f"written: {', '.join(map(str, [out / f'{name}.json', out / f'{name}.md', *figures]))}")


def committed(module: ModuleType) -> dict:
    """The committed result ``module``'s docs blocks are generated from (``RESULTS_DIR/NAME.json``)."""
    return json.loads((REPO / RESULTS_DIR / getattr(module, "COMMITTED", f"{module.NAME}.json")).read_text())


def write_docs(module: ModuleType, page: str | Path = REPO / DOCS_PAGE) -> None:
    """Regenerate ``module``'s blocks of the docs page from its committed result."""
    for name, text in blocks(module, committed(module), DOCS_RESULTS_DIR).items():
        write_block(page, name, text)


# --------------------------------------------------------------------------------------------
# runs: configs, one run per process, one torch thread each
# --------------------------------------------------------------------------------------------


def fill(fields: dict, names: dict) -> dict:
    """Replace the ``{X}`` placeholders of a method's fields (paths of teachers, tasks ...) by ``names``."""
    return {k: (v.format(**names) if isinstance(v, str) else v) for k, v in fields.items()}


def run_config(*layers: dict, **fields) -> dict:
    """One run's settings as a dict: the loop's defaults, then each of ``layers``, then ``fields``; checked
    now, so that a bad value stops the experiment before any run."""
    from opd_mini.config import TrainConfig

    config = {**TrainConfig().to_dict()}
    for layer in (*layers, fields):
        config.update(layer)
    TrainConfig(**config).validate()
    return config


def quiet_worker() -> None:
    """A worker process: no Hugging Face progress bars or warnings, one torch thread."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)


def _apply(pair: tuple) -> object:
    fn, job = pair
    return fn(job)


def run_pool(fn: Callable | None, jobs: list, workers: int, desc: str = "", progress: bool = False) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` spawned processes (results in completion order, with a
    progress bar when ``progress``); one process runs them here, in order. ``fn=None``: each job is a
    ``(function, job)`` pair, so that jobs of several kinds share one pool (each spawned process costs seconds
    of imports)."""
    from tqdm.auto import tqdm

    fn = _apply if fn is None else fn
    if workers <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, disable=not progress)]
    # concurrent.futures rather than multiprocessing.Pool: a worker that dies (e.g. out of memory) raises
    # BrokenProcessPool here instead of leaving the pool waiting for it forever
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            return [f.result() for f in tqdm(as_completed(futures), total=len(jobs), desc=desc, disable=not progress)]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the first failure ends the experiment: drop the runs not started
            raise


def train_run(config: dict, label: str) -> dict:
    """Train one run of the loop in this (worker) process from a config dict; a bad setting names the run.
    Returns the summary with the metrics log's rows added (``log``)."""
    import shutil

    from opd_mini.config import TrainConfig
    from opd_mini.train import train

    quiet_worker()
    cfg = TrainConfig(**config)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # an experiment owns its run directories
    try:
        summary = train(cfg)
    except ValueError as e:  # bad input: say which run
        raise ValueError(f"{label}: {e}") from None
    summary["log"] = [json.loads(line) for line in Path(summary["metrics_path"]).read_text().splitlines() if line]
    return summary


def curves(summary: dict, *keys: str) -> dict:
    """A run's evaluations as curves: ``steps``, and each ``eval/KEY`` by its KEY (None where it is absent)."""
    history = summary["eval_history"]
    return {"steps": [h["step"] for h in history], **{k: [h.get(f"eval/{k}") for h in history] for k in keys}}


def load_frozen(path: str, adapter: str | None = None):
    """A saved model in float32, eval mode, no gradients: for measuring, not training. With ``adapter``, the
    LoRA adapter saved there on top of it (a peft model, whose ``disable_adapter()`` gives the base back)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

#: One name and one colour per method, in every figure (and the course's notebooks).
METHOD_STYLE: dict[str, dict] = {
    "teacher": dict(color="0.35", label="teacher"), "base": dict(color="k", label="start"),
    "sft": dict(color="C0", label="SFT"), "sft_fixed": dict(color="C0", label="SFT (fixed set)"),
    "sft_fresh": dict(color="C9", label="SFT (fresh samples)"), "grpo": dict(color="C3", label="GRPO"),
    "opd_sampled": dict(color="C2", label="OPD sampled-token"), "opd_full": dict(color="C1", label="OPD full"),
    "opd_topk": dict(color="C4", label="OPD top-K"), "opd_topk_tail": dict(color="teal", label="OPD top-K + tail"),
    "opd_jsd": dict(color="C5", label="OPD JSD"),
    "opd_grpo": dict(color="C6", label="OPD + reward"), "forward_kl": dict(color="C8", label="forward KL"),
    "opd_entropy_aware": dict(color="goldenrod", label="OPD entropy-aware"),
    "opd_sampled_clip2": dict(color="olive", label="OPD sampled-token, r_t clipped to ±2"),
    "opd_sampled_clip05": dict(color="yellowgreen", label="OPD sampled-token, r_t clipped to ±0.5"),
    "opd_sampled_half": dict(color="darkgreen", label="OPD sampled-token, first half only"),
    "opd": dict(color="C1", label="OPD"), "opsd": dict(color="C1", label="OPSD (teacher behind the prompt)"),
    "sft_context": dict(color="C0", label="SFT on the prompted teacher's samples"),
    "opsd_sampled": dict(color="C2", label="OPSD sampled-token"),
    "opsd_sampled_masked": dict(color="C6", label="OPSD sampled-token, special tokens masked"),
}


def style(method: str) -> dict:
    """Colour and label of a method (its name when it has no entry)."""
    return METHOD_STYLE.get(method, {"label": method})


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display) unless a backend is already chosen."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, x, curves, label: str | None = None, ls: str = "-", **kw):
    """Mean of ``curves`` (one per seed) against ``x``, with a band of ± one standard deviation."""
    import torch

    ys = torch.tensor(curves, dtype=torch.float64)
    mu, sd = ys.mean(0), (ys.std(0) if len(ys) > 1 else torch.zeros(ys.shape[1]))
    line, = ax.plot(x, mu, label=label, lw=1.5, ls=ls, **kw)
    ax.fill_between(x, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
    return line


def save(fig, path) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


# --------------------------------------------------------------------------------------------
# numbers, claims and the generated blocks of the docs
# --------------------------------------------------------------------------------------------


def fmt(values: list, digits: int = 3, *, signed: bool = False, never: str = "never",
        partial: str = "({k}/{n})") -> str:
    """``"mean ± std"`` over seeds of the values that are not None (None = a seed that never got there), then
    ``partial`` when only k of n are; ``never`` (with ``{n}``) when none is; ``signed``: ``+0.012 ± …``."""
    got = [x for x in values if x is not None]
    if not got:
        return never.format(n=len(values))
    m, sd = mean_std(got)
    text = f"{m:{'+' if signed else ''}.{digits}f} ± {sd:.{digits}f}"
    return text if len(got) == len(values) else f"{text} {partial.format(k=len(got), n=len(values))}"


def fmt_reached(values: list, digits: int = 3) -> str:
    """:func:`fmt` of per-seed values at a target some seeds may never reach (None)."""
    return fmt(values, digits, never="not reached (0/{n})", partial="({k}/{n} seeds)")


def first_reaching(curve: list, level: float) -> int | None:
    """Index of the first evaluation where ``curve`` >= ``level`` (None: never)."""
    return next((i for i, v in enumerate(curve) if v is not None and v >= level - 1e-12), None)


def at(curve: list, i: int | None):
    """``curve[i]``, or None when ``i`` is (a target never reached)."""
    return None if i is None else curve[i]


def mean(values: list) -> float | None:
    """The mean of the values that are not None (None when none is)."""
    return mean_std(values)[0]


def num(x: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or ``n/a`` (None, NaN: e.g. a correlation of a constant)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def claim(holds: bool, **numbers) -> dict:
    """A claim's verdict with the numbers behind it (``{"holds": bool, ...}``)."""
    return {"holds": bool(holds), **numbers}


def verdict(c: dict) -> str:
    return "holds" if c["holds"] else "does not hold"


_BLOCK = "<!-- {name}:start -->\n{text}\n<!-- {name}:end -->"


def read_block(path: str | Path, name: str) -> str:
    """The text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path`` (a ValueError if absent)."""
    text = Path(path).read_text()
    found = re.search(rf"<!-- {re.escape(name)}:start -->\n(.*?)\n<!-- {re.escape(name)}:end -->", text, re.S)
    if not found:
        raise ValueError(f"{path} has no <!-- {name}:start --> … <!-- {name}:end --> block")
    return found.group(1)


def write_block(path: str | Path, name: str, block: str) -> None:
    """Replace the ``NAME`` block of ``path`` by ``block`` (how the docs are regenerated from the results)."""
    path = Path(path)
    read_block(path, name)
    text = re.sub(rf"<!-- {re.escape(name)}:start -->\n.*?\n<!-- {re.escape(name)}:end -->",
                  lambda _: _BLOCK.format(name=name, text=block), path.read_text(), flags=re.S)
    path.write_text(text)


def cpus() -> int:
    return os.cpu_count() or 1
