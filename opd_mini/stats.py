"""Statistics over seeds and runs, shared by the ablation, the experiments and the toy world.

A comparison between methods is reported as mean ± sample standard deviation over seeds
(:func:`mean_std`, :func:`fmt_ms`); a difference smaller than the spread is not a result. Correlations
across runs are Pearson's on the values or Spearman's on their ranks.
"""

from __future__ import annotations

import math

import torch


def mean(values) -> float:
    """The mean of an iterable of numbers; NaN when it is empty."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the values that are not None; (None, None) when there are
    none, and a standard deviation of 0 for a single value."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def fmt_ms(values, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.512 ± 0.031"`` over the values that are not None, with ``(k/n)`` when only k of n are; ``"never"``
    when none is (a per-seed list where None means "not reached")."""
    got = [x * scale for x in values if x is not None]
    if not got:
        return f"never (0/{len(values)})"
    m, s = mean_std(got)
    text = f"{m:.{digits}f} ± {s:.{digits}f}"
    return text if len(got) == len(values) else f"{text} ({len(got)}/{len(values)})"


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks, ties get their average rank).

    NaN when either side is constant.
    """
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        r = torch.empty_like(v)
        r[torch.argsort(v)] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):  # average the ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    return pearson(ranks(x), ranks(y))


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def agrees(text: str, value: float, spread: float = 0.0) -> bool:
    """Whether a number as a text writes it (``"0.27"``, ``"55%"``, ``"+8"``) agrees with ``value``: within the
    text's rounding, plus ``spread`` in the value's units. A live stochastic run (another CPU draws other samples)
    is compared with the text within its spread, e.g. :func:`sampling_error` or a measured seed spread, times 3;
    a quantity the code computes exactly has spread 0."""
    number = text.rstrip("%").lstrip("+").replace("−", "-")
    scale = 100 if text.endswith("%") else 1
    digits = len(number.split(".")[1]) if "." in number else 0
    return abs(value * scale - float(number)) <= 0.5 * 10 ** -digits + spread * scale + 1e-9


def sampling_error(p: float, n: int) -> float:
    """The standard error of a rate ``p`` estimated from ``n`` independent samples: sqrt(p (1 − p) / n)."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1.0 / n) / max(n, 1))


def check_quotes(quoted: list[tuple], claims: list[tuple]) -> str:
    """The check cell of a notebook: every number its text quotes, ``(where, text, value)`` or ``(where, text,
    value, spread)`` (see :func:`agrees`), and every claim, ``(where, claim, holds)``, against this run. Prints what
    disagrees with the values behind it and raises AssertionError; returns the one-line verdict otherwise."""
    failures = []
    for where, text, value, *spread in quoted:
        if not agrees(text, value, spread[0] if spread else 0.0):
            failures.append(f"{where}: the text says {text}, this run gives {value:.4g}"
                            + (f" (± {spread[0]:.2g} allowed)" if spread else ""))
    failures += [f"{where}: the text says that {claim}, which no longer holds" for where, claim, holds in claims
                 if not holds]
    if failures:
        raise AssertionError("the text disagrees with this run:\n" + "\n".join(failures))
    return f"all {len(quoted)} quoted numbers and {len(claims)} claims of the text agree with this run"
