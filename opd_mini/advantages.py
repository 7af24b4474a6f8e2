"""The advantages of the policy-gradient losses: OPD's return-to-go, GRPO's group baseline, and their mix.

Used by :mod:`opd_mini.losses` (and re-exported there, so ``losses.return_to_go`` keeps working).
"""

from __future__ import annotations

import math

import torch

from opd_mini.tensors import check_bt, check_unit_interval


def return_to_go(x_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go ``G_t = Σ_{t' ≥ t} γ^(t'−t) · mask_t' · x_t'`` along T, shape (B, T).

    γ = 0 gives ``G_t = x_t`` (no coupling to the future); γ = 1 the plain reverse cumulative sum.
    Discounting counts positions, so a masked-out token inside the completion still ages the discount.
    """
    gamma = check_unit_interval("gamma", gamma)
    mask = check_bt(mask_BT, x_BT=x_BT)
    x = torch.where(mask, x_BT.float(), torch.zeros((), device=x_BT.device))
    if gamma == 0.0:
        return x
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out


def grpo_advantages(rewards_B: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages of GRPO (Shao et al. 2024), shape (B,).

    The batch holds ``B / group_size`` prompts with ``group_size`` consecutive samples each.
    ``A_i = (R_i − mean_group R) / (std_group R + eps)``; with ``normalize_std=False`` only the group
    mean is subtracted (REINFORCE with a leave-in group baseline, as in Dr. GRPO). std is the
    population standard deviation. A group whose rewards are all equal gets advantage 0.
    """
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards_B must have shape (B,), got {tuple(rewards_B.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards_B.shape[0] % group_size != 0:
        raise ValueError(f"batch size {rewards_B.shape[0]} is not a multiple of group_size {group_size}")
    r = rewards_B.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def mix_advantages(opd_advantages_BT: torch.Tensor, reward_advantages_B: torch.Tensor, reward_weight: float) -> torch.Tensor:
    """Mixed OPD + reward advantage ``A_t = A_t^OPD + w · A^reward`` (the sequence-level reward advantage
    is broadcast over every token of its sequence), shape (B, T). ``w = 0`` is pure OPD."""
    if reward_advantages_B.dim() != 1 or reward_advantages_B.shape[0] != opd_advantages_BT.shape[0]:
        raise ValueError(
            f"reward_advantages_B must have shape ({opd_advantages_BT.shape[0]},), got {tuple(reward_advantages_B.shape)}"
        )
    if not math.isfinite(reward_weight) or reward_weight < 0:
        raise ValueError(f"reward_weight must be a finite number >= 0, got {reward_weight}")
    return opd_advantages_BT.float() + reward_weight * reward_advantages_B.float().unsqueeze(1)
