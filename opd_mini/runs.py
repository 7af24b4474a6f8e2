"""What a training run leaves in ``out_dir``, and how it stops when the numbers go bad.

    out_dir/metrics.jsonl                         one JSON line per step (keys: train.METRIC_DOCS)
    out_dir/checkpoints/step_000040/model/        the student, loadable by plain transformers / peft
    out_dir/checkpoints/step_000040/trainer_state.pt   trainable weights, optimizer, scheduler, RNG states
    out_dir/summary.json                          the final evaluation and where everything is

Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves half
a checkpoint, and older ones are deleted only after the new one exists. On resume, log lines written
after the checkpoint (by a run killed between the two) are dropped, so the log matches the weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from opd_mini.student import save_student


class NonFiniteLossError(RuntimeError):
    """Raised when a loss, a metric or the gradient norm is NaN or inf; the message is the diagnostic."""


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary directories are ignored)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_checkpoint(out_dir: str | Path, student, tokenizer, optimizer, scheduler, *, step: int, train_time: float,
                    config: dict, keep: int = 1) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXX`` atomically; keep the ``keep`` most recent checkpoints."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(student, tmp / "model", tokenizer=tokenizer)  # loadable by plain peft / HF
    state = {
        "step": step, "train_time": train_time, "config": config,
        "trainable": {n: p.detach().cpu().clone() for n, p in student.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student, optimizer, scheduler) -> tuple[int, float, dict]:
    """Restore weights, optimizer, scheduler and RNG states; return (step, train_time, saved config)."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["train_time"], state["config"]


# ---------------------------------------------------------------------------------------------
# the metrics log
# ---------------------------------------------------------------------------------------------


def append_log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# the non-finite diagnostic
# ---------------------------------------------------------------------------------------------


def check_finite(values: dict, *, cfg, student, where: str, last_good: Path | None) -> None:
    """Raise NonFiniteLossError with a diagnostic when any of ``values`` (loss, metrics) is NaN or inf.

    ``where`` says which step (and micro-batch); the message names what to change, from ``cfg``.
    """
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if not bad:
        return
    weights_bad = any(not torch.isfinite(p).all() for p in student.parameters() if p.requires_grad)
    kept = (f"the last good checkpoint is kept at {last_good} (continue from it with --resume after changing "
            "the settings below)") if last_good else "no checkpoint was written yet (set --save_every to keep one)"
    raise NonFiniteLossError(
        f"non-finite values at {where} with loss={cfg.loss}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
        + f"; the student's trainable weights are {'NOT ' if weights_bad else ''}finite.\n"
        f"Training stopped; {kept}.\nLikely causes and what to change:\n"
        f"  - learning rate too high (lr={cfg.lr}): lower --lr, add --warmup_steps, keep --max_grad_norm > 0 "
        f"(now {cfg.max_grad_norm})\n"
        f"  - low-precision overflow (weights in {next(student.parameters()).dtype}): try --dtype float32\n"
        f"  - the teacher gives ~zero probability to sampled tokens (huge log-ratios): set --clip_log_ratio "
        f"(e.g. 10) or --mask_special_tokens true\n"
        f"  - a diverging run: look at the last lines of {Path(cfg.out_dir) / 'metrics.jsonl'} "
        f"(kl/…, optim/grad_norm) to see where it started")
