"""Small statistics and report helpers shared by the toy experiments."""

from __future__ import annotations

import math

import torch


def mean(values) -> float:
    """The mean of an iterable of numbers; NaN when it is empty."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


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
