"""What a training run leaves in ``out_dir``: the metrics log, checkpoints, the summary; resuming them.

    out_dir/metrics.jsonl                         one JSON line per step (keys: opd_mini.metrics.METRIC_DOCS)
    out_dir/checkpoints/step_000040/model/        the student, loadable by plain transformers / peft
    out_dir/checkpoints/step_000040/trainer_state.pt   trainable weights, optimizer, scheduler, RNG states
    out_dir/summary.json                          the final evaluation and where everything is

Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves half
a checkpoint, and older ones are deleted only after the new one exists. On resume, log lines written
after the checkpoint (by a run killed between the two) are dropped, so the log matches the weights.
A new run never writes over an earlier one: it is refused unless ``--resume`` (continue it) or
``--overwrite`` (move the earlier files aside, into ``out_dir/replaced/TIMESTAMP/``), and every such
check runs before anything is written.
"""

from __future__ import annotations

import fcntl
import time
import json
import math
import os
import pickle
import random
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opd_mini import guards
from opd_mini.student import save_student


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
    created = not out_dir.exists()
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
        if created and [p.name for p in out_dir.iterdir()] == [".lock"]:  # a run refused before writing anything
            (out_dir / ".lock").unlink(missing_ok=True)
            out_dir.rmdir()


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary directories are ignored)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_checkpoint(out_dir: str | Path, student, tokenizer, optimizer, scheduler, *, step: int, train_time: float,
                    config: dict, keep: int = 1, protect: Path | None = None) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXX`` atomically; keep the ``keep`` most recent checkpoints, and
    ``protect`` (the newest one known good) until a newer one is known good."""
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
    prune_checkpoints(out_dir, keep, protect)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the ``keep`` newest checkpoints, never ``protect``."""
    for old in checkpoint_dirs(out_dir)[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)


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




def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# starting, resuming or replacing a run: every refusal before anything is written
# ---------------------------------------------------------------------------------------------

#: What an earlier run left in out_dir (``--overwrite`` moves these aside).
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")


def check_out_dir(cfg, *, main: bool = True) -> None:
    """Refuse, before anything is written: an ``out_dir`` that is a file; a new run (no ``--resume``) into a
    directory holding an earlier run, unless ``--overwrite``; ``--resume`` with nothing readable to resume
    from while an earlier run's log exists (the log would be lost)."""
    out = Path(cfg.out_dir)
    if not main:
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory: choose another --out_dir")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or cfg.overwrite:
        return
    if not cfg.resume:
        raise ValueError(f"out_dir {out} holds an earlier run ({', '.join(found)}): pass --resume true to continue it, "
                         "--overwrite true to start over (the earlier files are moved to "
                         f"{out / 'replaced'}/…), or choose another --out_dir")
    if not checkpoint_dirs(out):
        raise ValueError(f"--resume: out_dir {out} holds an earlier run's {', '.join(found)} but no checkpoint to "
                         "continue from: pass --overwrite true to start over (the earlier files are kept under "
                         f"{out / 'replaced'}/…), or choose another --out_dir")


def checkpoints_to_resume(cfg, out_dir: Path) -> list[Path]:
    """The checkpoints a ``--resume`` run continues from (empty for a new run); with ``--overwrite`` the earlier
    run's files are first moved to ``out_dir/replaced/TIMESTAMP/``."""
    if cfg.overwrite and any((out_dir / name).exists() for name in RUN_FILES):
        aside = out_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        aside.mkdir(parents=True)
        for name in RUN_FILES:
            if (out_dir / name).exists():
                os.replace(out_dir / name, aside / name)
        print(f"--overwrite: the earlier run's files were moved to {aside}", file=sys.stderr)
    return checkpoint_dirs(out_dir) if cfg.resume else []


@dataclass
class Progress:
    """Where a run stands: the step, the training time, the evaluations, the checkpoints, the guards' history;
    and the metrics log it appends to."""

    cfg: object
    metrics_path: Path
    config: dict  # recorded in every checkpoint (the effective config and the number of processes)
    step: int = 0
    train_time: float = 0.0
    last_good: Path | None = None  # the newest checkpoint known good (the step after it passed the guards)
    pending: Path | None = None  # the newest checkpoint, until the step after it passes the guards
    history: list = field(default_factory=list)  # the evaluations, {"step": …, "eval/…": …}
    grad_norms: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    warned: bool = False

    def record(self, step: int, row: dict, *, evaluated: bool) -> None:
        """Append a row to the log; an evaluated row also joins the history."""
        if evaluated:
            self.history.append({k: v for k, v in row.items() if k == "step" or k.startswith(("eval/", "time/eval"))})
        append_log(self.metrics_path, row)

    def finish(self) -> None:
        """The run ended normally: its last checkpoint (its step passed the guards, its evaluation ran) is good."""
        if self.pending is not None:
            self.last_good, self.pending = self.pending, None
            prune_checkpoints(self.cfg.out_dir, self.cfg.keep_checkpoints)

    @property
    def newest(self) -> Path | None:
        """The newest checkpoint written (or resumed from)."""
        return self.pending or self.last_good

    def save_checkpoint(self, out_dir: Path, m, optimizer, scheduler, step: int) -> None:
        self.pending = save_checkpoint(out_dir, m.student, m.tokenizer, optimizer, scheduler, step=step,
                                       train_time=self.train_time, config=self.config, keep=self.cfg.keep_checkpoints,
                                       protect=self.last_good)


def start_or_resume(cfg, out_dir: Path, previous: list[Path], student, optimizer, scheduler, *,
                    main: bool) -> Progress:
    """A fresh :class:`Progress` (a new log), or the state of the newest readable checkpoint of ``previous``
    (weights, optimizer, scheduler, RNG) with the log truncated to it. A checkpoint written with settings
    that cannot change is refused before anything is written."""
    from opd_mini import distributed

    world = distributed.current().world
    now = {**cfg.to_dict(), "num_processes": world}  # [dp] the checkpoint records its number of processes
    progress = Progress(cfg, out_dir / "metrics.jsonl", now)
    if not previous:
        if main and progress.metrics_path.exists():  # [dp] an empty log of a run that never checkpointed
            progress.metrics_path.unlink()
        return progress
    changed = resume_changes(saved_config(previous[-1]), now)
    last, step, train_time, _ = load_latest_checkpoint(previous, student, optimizer, scheduler)
    progress.step, progress.train_time, progress.last_good = step, train_time, last
    if main:  # [dp] the main process alone reports and rewrites the log
        if changed:
            print(f"resuming with changed settings (checkpoint → now), applied from step {step + 1}: {changed}",
                  file=sys.stderr)
        truncate_log(progress.metrics_path, step)
        print(f"resumed from {last} at step {step}", file=sys.stderr)
    rows = read_log(progress.metrics_path)
    progress.history = [r for r in rows if "eval/pass@1" in r]
    progress.grad_norms = [r["optim/grad_norm"] for r in rows if "optim/grad_norm" in r]
    progress.losses = [r["loss/total"] for r in rows if "loss/total" in r]
    return progress


def finite_check(cfg, student, where: str, progress: Progress):
    """The check the loss runs before each backward: NaN/inf in the loss or its metrics stops the run."""
    return lambda loss, metrics: guards.check_finite({**metrics, "loss/total": loss}, cfg=cfg, student=student,
                                                     where=where, last_good=progress.last_good)


def check_step(cfg, student, step: int, grad_norm: float, metrics: dict, progress: Progress) -> None:
    """The guards of a step, before the optimizer applies it: a non-finite gradient norm or a spike stops the
    run; a slow death warns once. The checkpoint before this step is then known good."""
    guards.check_finite({"optim/grad_norm": grad_norm}, cfg=cfg, student=student, where=f"step {step}",
                        last_good=progress.last_good)
    guards.check_divergence(grad_norm, progress.grad_norms, cfg=cfg, student=student, step=step,
                            last_good=progress.last_good)
    progress.grad_norms.append(grad_norm)
    progress.losses.append(float(metrics.get("loss/total", 0.0)))
    if progress.pending is not None:  # the weights of the newest checkpoint gave finite values: it is good
        progress.last_good, progress.pending = progress.pending, None
        prune_checkpoints(cfg.out_dir, cfg.keep_checkpoints)
    if not progress.warned and (message := guards.slow_death(progress.grad_norms, progress.losses)):
        progress.warned = True
        guards.warn(f"step {step}: {message}")


def interrupted(cfg) -> int:
    """Ctrl-C: one line with the newest checkpoint and the command that resumes from it; exit code 130."""
    found = checkpoint_dirs(cfg.out_dir)
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    command = f"{Path(sys.executable).name} -m opd_mini.train {' '.join(args)} --resume true".replace("  ", " ")
    where = (f"the newest checkpoint is {found[-1]}; continue with: {command}" if found else
             "no checkpoint was written yet (set --save_every to keep one)")
    sys.stderr.write(f"\ninterrupted: {where}\n")
    return 130
