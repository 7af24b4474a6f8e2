"""The divergences over the vocabulary at each position, with their gradients written out: one fused pass.

With z the student's logits at a position, π = softmax(z), q the teacher's distribution::

    reverse KL   KL(π ‖ q) = Σ_v π(v) (log π(v) − log q(v))       ∂/∂z_v = π(v) (d_v − KL),       d = log π − log q
    forward KL   KL(q ‖ π) = Σ_v q(v) (log q(v) − log π(v))       ∂/∂z_v = π(v) − q(v)   (q normalised)
    JSD(β)       β KL(q ‖ m) + (1 − β) KL(π ‖ m),                 ∂/∂z_v = (1 − β) π(v) (g_v − Σ_u π(u) g_u),
                 m = β q + (1 − β) π                                         g = log π − log m

(for JSD: ∂/∂π_v of β KL(q‖m) is −β(1−β) q_v / m_v, of (1−β) KL(π‖m) it is (1−β)(log π_v/m_v + 1 − (1−β) π_v/m_v);
their sum is (1−β) log(π_v/m_v), and the softmax turns a gradient g over π into π ⊙ (g − ⟨π, g⟩) over z).

Autograd would keep log π, π and each intermediate (B, T, V) tensor of the formula for the backward pass; the
:class:`Divergence` function keeps only the logits and the teacher's log-probs, which the caller holds anyway,
and recomputes π in the backward pass. Measured on one (8, 8, 151,936) chunk on the CPU (BENCHMARKS.md,
``benchmarks/compile_divergence.py``) that peaks no lower than the plain formula under autograd and is
slower; ``torch.compile`` of the plain formula (``set_backend("compiled")``, ``--divergence_backend compiled``)
is several times faster and peaks lower, but needs a C++ compiler and compiles per shape. Masked-out positions hold a uniform student and teacher (finite values,
zero gradient), whatever garbage the inputs hold there. ``tests/test_losses.py`` checks every value and
gradient against brute force, and the autograd of the plain formula (:func:`reference`).
"""

from __future__ import annotations

import contextlib
import math

import torch

KINDS = ("reverse", "forward", "jsd")
#: How :func:`divergence` computes: ``fused`` (:class:`Divergence`, the gradient written out) or ``compiled``
#: (``torch.compile`` of the plain formula, :func:`reference`: inductor fuses the formula and its backward into a
#: few loops over V; on the CPU it needs a C++ compiler, and each new shape compiles once, seconds each).
BACKENDS = ("fused", "compiled")
_backend = {"name": "fused", "compiled": None}


def set_backend(name: str) -> None:
    """Choose how :func:`divergence` computes from now on, process-wide."""
    if name not in BACKENDS:
        raise ValueError(f"divergence backend must be one of {BACKENDS}, got {name!r}")
    _backend["name"] = name


@contextlib.contextmanager
def backend(name: str):
    """:func:`set_backend` for the duration of a ``with`` block (a training run: ``--divergence_backend``)."""
    before = _backend["name"]
    set_backend(name)
    try:
        yield
    finally:
        _backend["name"] = before


def divergence(z_BTV: torch.Tensor, logq_BTV: torch.Tensor, mask_BT: torch.Tensor, kind: str,
               beta: float = 0.5, floor: float | None = None) -> torch.Tensor:
    """The per-position divergence (B, T), float32, differentiable in the student's logits ``z_BTV``.

    ``logq_BTV`` are the teacher's log-probabilities (constant: a teacher that needs a gradient is computed
    by :func:`reference`, the plain formula under autograd), clamped at ``floor`` when given (the reverse KL
    of a token the teacher forbids stays finite). ``kind``: reverse, forward or jsd (0 < β < 1).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if logq_BTV.requires_grad:
        return reference(z_BTV, logq_BTV, mask_BT, kind, beta, floor)
    if _backend["name"] == "compiled":
        if _backend["compiled"] is None:
            _backend["compiled"] = torch.compile(reference)
        return _backend["compiled"](z_BTV, logq_BTV, mask_BT, kind, beta, floor)
    return Divergence.apply(z_BTV, logq_BTV, mask_BT, kind, beta, floor)


def _inputs(z_BTV, logq_BTV, mask_BT, floor):
    """log π and log q in float32, a uniform distribution at the masked-out positions (finite, never read)."""
    m = mask_BT.unsqueeze(-1)
    V = z_BTV.shape[-1]
    logp = torch.log_softmax(torch.where(m, z_BTV.float(), 0.0), dim=-1)
    logq = torch.where(m, logq_BTV.float() if floor is None else logq_BTV.float().clamp(min=floor), -math.log(V))
    return logp, logq


def _log_m(logp, logq, beta):
    """log(β q + (1 − β) π), with entries where both are zero kept at −inf without a NaN."""
    a, b = logq + math.log(beta), logp + math.log1p(-beta)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0)).masked_fill(both_zero,
                                                                                                      -math.inf)


def _kl(logp_a, logp_b):
    """Σ_v a(v) (log a(v) − log b(v)) over the last dim, with 0 · anything = 0 where a(v) = 0."""
    p_a = logp_a.exp()
    return (p_a * torch.where(p_a > 0, logp_a - logp_b, 0.0)).sum(-1)


def _values(logp, logq, kind, beta):
    if kind == "reverse":
        return _kl(logp, logq)
    if kind == "forward":
        return _kl(logq, logp)
    logm = _log_m(logp, logq, beta)
    return beta * _kl(logq, logm) + (1.0 - beta) * _kl(logp, logm)


class Divergence(torch.autograd.Function):
    """The fused divergence: forward returns the per-position values, backward its gradient in the logits."""

    @staticmethod
    def forward(ctx, z_BTV, logq_BTV, mask_BT, kind, beta, floor):
        with torch.no_grad():
            logp, logq = _inputs(z_BTV, logq_BTV, mask_BT, floor)
            values_BT = _values(logp, logq, kind, beta)
        ctx.save_for_backward(z_BTV, logq_BTV, mask_BT)
        ctx.kind, ctx.beta, ctx.floor = kind, beta, floor
        return values_BT

    @staticmethod
    def backward(ctx, grad_BT):
        z_BTV, logq_BTV, mask_BT = ctx.saved_tensors
        kind, beta = ctx.kind, ctx.beta
        with torch.no_grad():
            logp, logq = _inputs(z_BTV, logq_BTV, mask_BT, ctx.floor)
            p = logp.exp()
            if kind == "forward":  # π Σq − q: π − q for a normalised teacher, and exact for any other
                q = logq.exp()
                grad = p * q.sum(-1, keepdim=True) - q
            else:
                if kind == "reverse":
                    g = torch.where(p > 0, logp - logq, 0.0)  # d = log π − log q
                else:
                    g = torch.where(p > 0, logp - _log_m(logp, logq, beta), 0.0) * (1.0 - beta)
                del logq
                grad = p * (g - (p * g).sum(-1, keepdim=True))
            grad = grad * torch.where(mask_BT, grad_BT, 0.0).unsqueeze(-1)
        return grad.to(z_BTV.dtype), None, None, None, None, None


def reference(z_BTV: torch.Tensor, logq_BTV: torch.Tensor, mask_BT: torch.Tensor, kind: str,
              beta: float = 0.5, floor: float | None = None) -> torch.Tensor:
    """The same values as :func:`divergence`, from the plain formula under autograd (the readable reference)."""
    logp, logq = _inputs(z_BTV, logq_BTV, mask_BT, floor)
    return _values(logp, logq, kind, beta)
