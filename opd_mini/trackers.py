"""Experiment trackers: ``--report_to tensorboard | trackio | wandb`` (``none`` by default).

Every run writes ``metrics.jsonl``; a tracker gets the same rows as they are written, so ten runs can be compared in
one place. Each tracker is an optional install, imported only when asked for:

    --report_to tensorboard   OUT/tensorboard/ event files (`tensorboard --logdir runs`)
    --report_to trackio       trackio's local store ($TRACKIO_DIR, by default ~/.cache/huggingface/trackio)
    --report_to wandb         Weights & Biases under OUT/wandb, offline unless WANDB_MODE says otherwise

What is sent: the run's effective config once; every metric of every row (the keys of ``docs/metrics.md``) at its
step; and at every evaluation a small table of held-out samples (prompt, completion, reward, the per-token reverse
KL to the teacher where there is one), which TRL's trainers log as their completions table.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

TRACKERS = ("none", "tensorboard", "trackio", "wandb")
#: tracker -> (the module it imports, the pip command that installs it)
MODULES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "trackio": ("trackio", "pip install trackio"),
           "wandb": ("wandb", "pip install wandb")}
#: The columns of the samples table (its rows: :data:`opd_mini.eval.SAMPLE_ROWS`).
COLUMNS = ("prompt", "completion", "reward", "kl_per_token")
#: The project name trackio and wandb file runs under (wandb: $WANDB_PROJECT overrides it).
PROJECT = "opd_mini"


def check_installed(kind: str) -> None:
    """One line naming the pip command when the tracker ``kind`` is not installed."""
    if kind == "none":
        return
    module, pip = MODULES[kind]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"report_to={kind!r} needs the {module} package, which is not installed: run `{pip}`, or "
                         "use --report_to none")


class Tracker:
    """Sends a run's config, rows and sample tables to one tracker."""

    def log(self, row: dict, step: int) -> None:
        raise NotImplementedError

    def table(self, rows: list[dict], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def scalars(row: dict) -> dict[str, float]:
    """The numeric metrics of a row (``step`` is the x axis, not a metric)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard(Tracker):
    def __init__(self, out_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)

    def table(self, rows: list[dict], step: int) -> None:
        head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
        body = "\n".join("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows)
        self.writer.add_text("eval/samples", head + "\n" + body, step)

    def close(self) -> None:
        self.writer.close()


class Trackio(Tracker):
    def __init__(self, out_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=out_dir.name, config=config)

    def log(self, row: dict, step: int) -> None:
        self.trackio.log(scalars(row), step=step)

    def table(self, rows: list[dict], step: int) -> None:
        self.trackio.log({"eval/samples": self.trackio.Table(columns=list(COLUMNS),
                                                             data=[[r.get(c) for c in COLUMNS] for r in rows])},
                         step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandB(Tracker):
    def __init__(self, out_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out_dir.name, dir=str(out_dir),
                              config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: dict, step: int) -> None:
        self.run.log(scalars(row), step=step)

    def table(self, rows: list[dict], step: int) -> None:
        self.run.log({"eval/samples": self.wandb.Table(columns=list(COLUMNS),
                                                       data=[[r.get(c) for c in COLUMNS] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, out_dir: str | os.PathLike, config: dict) -> Tracker | None:
    """The tracker ``kind`` for the run writing to ``out_dir`` (None for ``none``), its config already sent."""
    if kind == "none":
        return None
    check_installed(kind)
    return {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": WandB}[kind](Path(out_dir), config)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", "⏎")
