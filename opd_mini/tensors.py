"""Shape, dtype and mask checks and the masked reductions every loss of :mod:`opd_mini.losses` shares.

A wrong shape or dtype is a ValueError naming the argument, never a silent broadcast or cast; masked-out
positions are replaced by finite values *before* any arithmetic, so NaN or inf there can reach neither a loss
nor, through 0 · NaN, its gradient; every loss divides by the same N (see the normalisation of the losses).
"""

from __future__ import annotations

import torch


def check_unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_bt(mask_BT: torch.Tensor, **tensors: torch.Tensor | None) -> torch.Tensor:
    """Check the inputs' shapes against the mask's (B, T), and their dtypes; return the mask.

    Names ending in ``_BT`` must be exactly (B, T); names ending in ``_BTV``/``_BTK`` must be 3-d with
    (B, T) leading. A wrong shape is a ValueError, never a silent broadcast. The mask must be boolean (a
    float mask of weights would be read as True/False), token ids (names with ``ids`` or ``tokens``) integers.
    """
    check_mask_and_ids(mask_BT, tensors)
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must have shape (B, T), got {tuple(mask_BT.shape)}")
    BT = tuple(mask_BT.shape)
    for name, t in tensors.items():
        if t is None:
            continue
        ok = tuple(t.shape) == BT if name.endswith("_BT") else (t.dim() == 3 and tuple(t.shape[:2]) == BT)
        if not ok:
            want = "(B, T)" if name.endswith("_BT") else "(B, T, V)" if name.endswith("_BTV") else "(B, T, K)"
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask_BT has shape {BT}: {name} must be {want} and its (B, T) must match")
    return mask_BT


def check_mask_and_ids(mask_BT: torch.Tensor, tensors: dict) -> None:
    if mask_BT.dtype != torch.bool:
        raise ValueError(f"mask_BT must be a boolean tensor, got {mask_BT.dtype}: a mask says which positions count "
                         "(weights are not supported); pass mask_BT.bool() for a 0/1 mask")
    for name, t in tensors.items():
        if t is not None and ("ids" in name or "tokens" in name) and (t.is_floating_point() or t.dtype == torch.bool):
            raise ValueError(f"{name} must hold integer token ids, got {t.dtype}")


def fill_masked(x: torch.Tensor, mask: torch.Tensor, value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Replace masked-out positions of a (B, T) or (B, T, ·) tensor by a finite value *before* any
    arithmetic, so NaN/inf there can reach neither the loss nor (through 0 · NaN) its gradient."""
    m = mask.view(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.as_tensor(value, dtype=x.dtype, device=x.device))


def check_same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; they must match")


def denominator(mask: torch.Tensor, num_tokens: float | int | torch.Tensor | None) -> torch.Tensor:
    if num_tokens is None:
        return mask.sum().clamp(min=1).float()
    n = torch.as_tensor(num_tokens, dtype=torch.float32, device=mask.device)
    if not torch.isfinite(n) or n <= 0:
        raise ValueError(f"num_tokens must be a positive number of masked-in tokens, got {num_tokens}")
    return n


def masked_sum(x_BT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where (not x * mask) so inf/NaN at masked-out positions cannot leak into the sum
    return torch.where(mask, x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device)).sum()


def masked_mean(x_BT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean over the masked-in positions (for metrics; 0 when the mask is empty)."""
    return (masked_sum(x_BT.detach().float(), mask) / mask.sum().clamp(min=1)).detach()
