"""How a run stops, or warns, when its numbers go bad: NaN/inf, a spike of the gradient norm, a slow death.

Every check runs before the optimizer applies the step, so the weights and the checkpoints are still sound
when a run stops; the message (exit code 3) says what happened, which checkpoint is known good, and what
to change for this run's settings. A checkpoint is *known good* once the step after it has passed these
checks: weights that produce a NaN at the next step are never called good.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss, a metric or the gradient norm is NaN or inf; the message is the diagnostic."""

    exit_code = 3


class DivergenceError(NonFiniteLossError):
    """Raised when the gradient norm spikes far above its recent median: the run is stopped before that step
    is applied, while the weights (and the last checkpoint) are still sound."""


#: Steps of gradient-norm history the divergence check compares with, and how many it needs first.
DIVERGENCE_WINDOW, DIVERGENCE_MIN_HISTORY = 20, 10
#: A slow death: this many consecutive steps with the gradient norm below SLOW_DEATH_FLOOR × its median over
#: the first steps, while the loss moves by less than 1 % (a warning, not a stop).
SLOW_DEATH_STEPS, SLOW_DEATH_FLOOR = 10, 1e-3


def check_divergence(grad_norm: float, history: list[float], *, cfg, student, step: int,
                     last_good: Path | None) -> None:
    """Raise DivergenceError when ``grad_norm`` exceeds ``cfg.divergence_factor`` × the median of the last
    :data:`DIVERGENCE_WINDOW` steps' norms (once :data:`DIVERGENCE_MIN_HISTORY` are known; factor 0 = off).

    Healthy tiny-world runs of every built-in loss stay within 2.3× of that median; a blow-up that ends
    in NaN starts with a jump of orders of magnitude. Checked before the optimizer applies the step.
    """
    if cfg.divergence_factor <= 0 or len(history) < DIVERGENCE_MIN_HISTORY:
        return
    recent = history[-DIVERGENCE_WINDOW:]
    median = _median(recent)
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


def slow_death(grad_norms: list[float], losses: list[float]) -> str | None:
    """A diagnostic when the last :data:`SLOW_DEATH_STEPS` gradient norms all lie below
    :data:`SLOW_DEATH_FLOOR` × the median of the first ones while the loss stays flat; else None."""
    n = SLOW_DEATH_STEPS
    if len(grad_norms) < 2 * n or len(losses) < n:
        return None
    start = _median(grad_norms[:n])
    recent, flat = grad_norms[-n:], losses[-n:]
    spread = max(flat) - min(flat)
    if start > 0 and max(recent) < SLOW_DEATH_FLOOR * start and spread <= 0.01 * max(abs(flat[-1]), 1e-12):
        return (f"the gradient norm has stayed below {SLOW_DEATH_FLOOR:g}× its starting median ({start:.3g}) for "
                f"{n} steps (last {recent[-1]:.3g}) while the loss sits at {flat[-1]:.4g}: the student has stopped "
                "learning (saturated or collapsed outputs); look at kl/… and eval/… in metrics.jsonl, and try a "
                "lower --lr or an earlier checkpoint")
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _kept(last_good: Path | None) -> str:
    return (f"the last checkpoint known good is {last_good} (continue from it with --resume after changing "
            "the settings below)") if last_good else ("no checkpoint known good was written yet (set --save_every "
                                                      "to keep one)")


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
