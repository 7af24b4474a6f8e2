"""Exact quantities of the toy world by enumerating every (prompt, sequence) pair in one batch.

With V^T sequences per prompt small enough to enumerate, every expectation over the student's (or any
policy's) sequences is a weighted sum, so the toy experiments report exact KLs, successes and gradient
moments instead of estimates. Every function here builds its batch with :func:`enumerate_pairs`.
"""

from __future__ import annotations

import torch

from toy.world import Policy, Task, World, sequence_logprobs


def enumerate_pairs(world: World, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (prompt, sequence) pair, prompt-major: ``prompts_X`` (K·N,) and ``tokens_XT`` (K·N, T), N = V^T."""
    seqs_NT = world.sequences()
    prompts_X = torch.tensor(prompts, dtype=torch.long).repeat_interleave(seqs_NT.shape[0])
    return prompts_X, seqs_NT.repeat(len(prompts), 1)


def all_sequence_logprobs(policy: Policy, prompts: list[int]) -> torch.Tensor:
    """log π(y|p) for every prompt given and every sequence y (lexicographic), shape (K, N = V^T)."""
    prompts_X, tokens_XT = enumerate_pairs(policy.world, prompts)
    return sequence_logprobs(policy, prompts_X, tokens_XT).view(len(prompts), -1)


def sequence_ids(tokens_BT: torch.Tensor, V: int) -> torch.Tensor:
    """Lexicographic index n = Σ_t y_t V^(T−1−t) of each sequence, shape (B,)."""
    T = tokens_BT.shape[1]
    return (tokens_BT.long() * V ** torch.arange(T - 1, -1, -1)).sum(-1)


def correct_table(task: Task, world: World) -> torch.Tensor:
    """1[y is correct for p] for the task's prompts and every sequence, bool (K, N)."""
    prompts_X, tokens_XT = enumerate_pairs(world, task.prompts)
    return task.is_correct(prompts_X, tokens_XT).view(len(task.prompts), -1)


def kl_from_logprobs(logp_KN: torch.Tensor, logq_KN: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_p Σ_y p(y) (log p(y) − log q(y)), with 0 · log 0 = 0."""
    p_KN = logp_KN.exp()
    return torch.where(p_KN > 0, p_KN * (logp_KN - logq_KN), torch.zeros(())).sum(-1).mean()


def entropy_from_logprobs(logp_KN: torch.Tensor) -> torch.Tensor:
    """Sequence entropy −(1/K) Σ_p Σ_y π(y|p) log π(y|p) in nats."""
    p_KN = logp_KN.exp()
    return -torch.where(p_KN > 0, p_KN * logp_KN, torch.zeros(())).sum(-1).mean()
