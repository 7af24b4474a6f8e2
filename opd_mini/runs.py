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

import fcntl
import json
import math
import os
import pickle
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from opd_mini.student import save_student


class NonFiniteLossError(RuntimeError):
    """Raised when a loss, a metric or the gradient norm is NaN or inf; the message is the diagnostic."""

    exit_code = 3


#: Settings a resumed run cannot change: they decide which weights the checkpoint's tensors belong to.
FIXED_ON_RESUME = ("student", "teacher", "tokenizer", "tiny_dir", "teacher_quantization", "lora", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_target_modules", "dtype")
#: Settings whose change means nothing for a run (how it is shown, not what it computes).
IGNORED_ON_RESUME = ("resume", "progress")


# ---------------------------------------------------------------------------------------------
# the run directory: one run at a time
# ---------------------------------------------------------------------------------------------


@contextmanager
def locked_out_dir(out_dir: str | Path):
    """Create ``out_dir`` and hold an exclusive lock on it (``out_dir/.lock``) for the duration of the block.

    A second run started into the same directory gets a ValueError naming the holder, instead of both
    writing one metrics log. The lock is an ``flock`` on an open file, so the operating system releases
    it when the process ends, however it ends: a killed run leaves no stale lock behind.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".lock", "a+")
    except FileExistsError:
        raise ValueError(f"out_dir {out_dir} exists and is not a directory: choose another --out_dir") from None
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} cannot be written ({e.strerror}): choose a writable --out_dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"out_dir {out_dir} is in use by another run ({holder}): wait for it to finish, or choose "
                         "another --out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield out_dir
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


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
    (tmp / "trainer_config.json").write_text(json.dumps(config, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_config(path: Path) -> dict:
    """The TrainConfig (as a dict) a checkpoint was written with, without loading its tensors."""
    try:
        return json.loads((path / "trainer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return read_state(path)["config"]


def read_state(path: Path) -> dict:
    """``path/trainer_state.pt``; a truncated or unreadable file is a ValueError naming it."""
    file = path / "trainer_state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"checkpoint file {file} cannot be read ({type(e).__name__}: {e})") from None


def resume_changes(saved: dict, now: dict) -> dict:
    """The settings that differ between a checkpoint's config and the resumed run's, as {name: (then, now)}.

    Those in :data:`FIXED_ON_RESUME` are a ValueError: the checkpoint's tensors would not fit the models
    the new settings describe; so is another number of processes that changes the step's micro-batches
    (:func:`check_resumed_processes`). Every other change is applied from the resumed step on (the loop
    reads the config each step; the learning rate and weight decay are written into the restored optimizer).
    """
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in IGNORED_ON_RESUME}
    fixed = {k: v for k, v in changed.items() if k in FIXED_ON_RESUME}
    if fixed:
        listed = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in fixed.items())
        raise ValueError(f"--resume cannot change {listed}: the checkpoint holds weights for the old setting; "
                         "resume with the checkpoint's values, or start a new run in another --out_dir")
    check_resumed_processes(saved, now)
    return changed


def check_resumed_processes(saved: dict, now: dict) -> None:
    """A run may be resumed on another number of processes (``num_processes``, recorded in the checkpoint's
    config; 1 when absent) only if num_processes × grad_accum stays the same: the step is then cut into the
    same global micro-batches, with the same prompts and sampling seeds, and the resumed run continues as
    the uninterrupted one would have (up to float rounding). Only which process computes which micro-batch
    changes. Otherwise a ValueError says which grad_accum keeps it. On an unchanged number of processes,
    grad_accum may change as any other setting (the micro-batches, hence the samples, change from then on).
    """
    before_w, now_w = int(saved.get("num_processes", 1)), int(now.get("num_processes", 1))
    if before_w == now_w:
        return
    before = before_w * int(saved.get("grad_accum", 1))
    after = now_w * int(now.get("grad_accum", 1))
    if before != after:
        fix = (f"resume with --grad_accum {before // now_w} on {now_w} process(es), or on {before_w}"
               if before % now_w == 0 else f"resume on {before_w} process(es)")
        raise ValueError(f"--resume on {now_w} process(es) with grad_accum={now.get('grad_accum', 1)} cannot "
                         f"continue a run checkpointed on {before_w} with grad_accum={saved.get('grad_accum', 1)}: "
                         f"num_processes × grad_accum must stay {before} (the step's micro-batches and their sampling "
                         f"seeds); {fix}, or start a new run in another --out_dir")


def load_checkpoint(path: Path, student, optimizer, scheduler) -> tuple[int, float, dict]:
    """Restore weights, optimizer, scheduler and RNG states; return (step, train_time, saved config)."""
    state = read_state(path)
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


def load_latest_checkpoint(paths: list[Path], student, optimizer, scheduler) -> tuple[Path, int, float, dict]:
    """Restore the newest readable checkpoint of ``paths`` (oldest first), saying on stderr when one is skipped
    because its state file is damaged; a ValueError when none can be read. Returns (path, step, time, config)."""
    errors = []
    for path in reversed(paths):
        try:
            return (path, *load_checkpoint(path, student, optimizer, scheduler))
        except ValueError as e:
            errors.append(str(e))
            print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    raise ValueError(f"no checkpoint in {paths[-1].parent} can be read: {errors[0]}; delete the damaged one to "
                     "start over, or restore it")


# ---------------------------------------------------------------------------------------------
# the metrics log
# ---------------------------------------------------------------------------------------------


def append_log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path: Path) -> list[dict]:
    """The rows of a metrics log; a line that does not parse is a ValueError naming the file and line."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or delete that line") from None
    return rows


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# the non-finite diagnostic
# ---------------------------------------------------------------------------------------------


class DivergenceError(NonFiniteLossError):
    """Raised when the gradient norm spikes far above its recent median: the run is stopped before that step
    is applied, while the weights (and the last checkpoint) are still sound."""


#: Steps of gradient-norm history the divergence check compares with, and how many it needs first.
DIVERGENCE_WINDOW, DIVERGENCE_MIN_HISTORY = 20, 10


def check_divergence(grad_norm: float, history: list[float], *, cfg, student, step: int,
                     last_good: Path | None) -> None:
    """Raise DivergenceError when ``grad_norm`` exceeds ``cfg.divergence_factor`` × the median of the last
    :data:`DIVERGENCE_WINDOW` steps' norms (once :data:`DIVERGENCE_MIN_HISTORY` are known; factor 0 = off).

    Healthy tiny-world runs of every built-in loss stay within 2.3× of that median; a blow-up that ends
    in NaN starts with a jump of orders of magnitude. Checked before the optimizer applies the step.
    """
    if cfg.divergence_factor <= 0 or len(history) < DIVERGENCE_MIN_HISTORY:
        return
    recent = sorted(history[-DIVERGENCE_WINDOW:])
    median = recent[len(recent) // 2] if len(recent) % 2 else 0.5 * (recent[len(recent) // 2 - 1] + recent[len(recent) // 2])
    if grad_norm > cfg.divergence_factor * median:
        raise DivergenceError(
            f"the run is diverging at step {step}: gradient norm {grad_norm:.4g} is {grad_norm / max(median, 1e-30):.0f}× "
            f"the median {median:.4g} of the previous {len(recent)} steps (limit: --divergence_factor "
            f"{cfg.divergence_factor:g}); this step was not applied.\n"
            f"Training stopped; {_kept(last_good)}.\nLikely causes and what to change:\n" + _advice(cfg, student))


def check_finite(values: dict, *, cfg, student, where: str, last_good: Path | None) -> None:
    """Raise NonFiniteLossError with a diagnostic when any of ``values`` (loss, metrics) is NaN or inf.

    ``where`` says which step (and micro-batch); the message names what to change, from ``cfg``.
    """
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if not bad:
        return
    weights_bad = any(not torch.isfinite(p).all() for p in student.parameters() if p.requires_grad)
    raise NonFiniteLossError(
        f"non-finite values at {where} with loss={cfg.loss}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
        + f"; the student's trainable weights are {'NOT ' if weights_bad else ''}finite.\n"
        f"Training stopped; {_kept(last_good)}.\nLikely causes and what to change:\n" + _advice(cfg, student))


def _kept(last_good: Path | None) -> str:
    return (f"the last good checkpoint is kept at {last_good} (continue from it with --resume after changing "
            "the settings below)") if last_good else "no checkpoint was written yet (set --save_every to keep one)"


def _advice(cfg, student) -> str:
    """What to change, limited to what applies to this run's settings."""
    lines = [f"  - learning rate too high (lr={cfg.lr}): lower --lr"
             + (", add --warmup_steps" if cfg.warmup_steps == 0 else "")
             + (", set --max_grad_norm (now 0: no clipping)" if cfg.max_grad_norm == 0 else "")]
    dtype = next(student.parameters()).dtype
    if dtype != torch.float32:
        lines.append(f"  - low-precision overflow (weights in {dtype}): try --dtype float32")
    if cfg.loss in ("reverse_kl_sampled", "opd_grpo") and not cfg.clip_log_ratio:
        lines.append("  - the teacher gives ~zero probability to sampled tokens (huge log-ratios): set --clip_log_ratio "
                     "(e.g. 10)" + ("" if cfg.mask_special_tokens else " or --mask_special_tokens true"))
    lines.append(f"  - see where it started in the last lines of {Path(cfg.out_dir) / 'metrics.jsonl'} "
                 "(kl/…, optim/grad_norm)")
    return "\n".join(lines)
