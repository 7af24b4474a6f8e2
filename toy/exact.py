"""Exact quantities of the toy world (part of the public API of :mod:`toy.world`), by enumeration or by
dynamic programming over the prefixes.

With V^T sequences per prompt small enough to enumerate, every expectation over the student's (or any
policy's) sequences is a weighted sum, so the toy experiments report exact KLs, successes and gradient
moments instead of estimates: :func:`sequence_kl`, :func:`expectation`, :func:`success` … (and
:func:`mc_expectation`, the Monte Carlo fallback). The helpers of the experiments build their batch of every
(prompt, sequence) pair with :func:`enumerate_pairs`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from opd_mini.losses import token_logprobs
from toy.policies import Policy, sample, sequence_logprobs
from toy.world import ENUM_BATCH, ENUM_LIMIT, Task, World, can_enumerate

# --------------------------------------------------------------------------------------------
# exact quantities of the public API
# --------------------------------------------------------------------------------------------


def _prompt_list(world: World, prompts) -> torch.Tensor:
    return world.prompts if prompts is None else torch.as_tensor(prompts, dtype=torch.long).reshape(-1)


def _check_enumerable(world: World, num_prompts: int) -> None:
    if not can_enumerate(world, num_prompts):
        raise ValueError(
            f"{num_prompts} prompts × V^T = {num_prompts * world.num_sequences:,} sequences exceeds ENUM_LIMIT="
            f"{ENUM_LIMIT:,}; use method='dp' or mc_expectation"
        )


def sequence_distribution(policy: Policy, prompts=None, batch_size: int = ENUM_BATCH) -> torch.Tensor:
    """π(y | p) for every prompt given and every sequence (lexicographic), shape (len(prompts), V^T)."""
    w = policy.world
    prompts = _prompt_list(w, prompts)
    _check_enumerable(w, len(prompts))
    rows = []
    for p in prompts.tolist():
        chunks = [sequence_logprobs(policy, torch.full((len(tok),), p), tok) for _, tok in w.iter_sequences(batch_size)]
        rows.append(torch.cat(chunks).exp())
    return torch.stack(rows)


def expectation(policy: Policy, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompts=None,
                batch_size: int = ENUM_BATCH) -> torch.Tensor:
    """Exact ``(1/|prompts|) Σ_p Σ_y π(y|p) fn(p, y)`` by enumeration; differentiable through π.

    ``fn(prompts_N, tokens_NT)`` returns (N,) or (N, ...) per-sequence values.
    """
    w = policy.world
    prompts = _prompt_list(w, prompts)
    _check_enumerable(w, len(prompts))
    total = 0.0
    for p in prompts.tolist():
        for _, tok in w.iter_sequences(batch_size):
            prompts_N = torch.full((len(tok),), p, dtype=torch.long)
            prob_N = sequence_logprobs(policy, prompts_N, tok).exp()
            vals = fn(prompts_N, tok)
            total = total + (prob_N.reshape(-1, *([1] * (vals.dim() - 1))) * vals).sum(0)
    return total / len(prompts)


@torch.no_grad()
def mc_expectation(policy: Policy, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompts=None,
                   num_samples: int = 10_000, generator: torch.Generator | None = None,
                   batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo estimate of :func:`expectation`: ``(mean, standard error)`` from ``num_samples``
    samples (prompts drawn uniformly from ``prompts``, sequences from π). No grad."""
    w = policy.world
    prompts = _prompt_list(w, prompts)
    s1, s2, n = 0.0, 0.0, 0
    while n < num_samples:
        b = min(batch_size, num_samples - n)
        idx = torch.randint(len(prompts), (b,), generator=generator)
        prompts_B = prompts[idx]
        vals = fn(prompts_B, sample(policy, prompts_B, generator)).double()
        s1, s2, n = s1 + vals.sum(0), s2 + (vals ** 2).sum(0), n + b
    mean = s1 / n
    var = (s2 / n - mean ** 2).clamp(min=0) * n / max(n - 1, 1)
    return mean.float(), (var / n).sqrt().float()


def state_reach_probs(policy: Policy) -> torch.Tensor:
    """Pr_π(reach prefix s | p) for every prompt and state, shape (P, S), by the forward DP
    ``Pr(u·v) = Pr(u) · π(v | u)`` level by level (differentiable)."""
    w = policy.world
    logp_PSV = torch.log_softmax(policy.state_logits().float(), dim=-1)
    levels = [torch.zeros(w.P, 1)]  # log Pr of the empty prefix
    for t in range(1, w.T):
        prev = levels[-1]  # (P, V^(t-1)) in lexicographic order
        step = logp_PSV[:, w.offset(t - 1): w.offset(t)]  # (P, V^(t-1), V)
        levels.append((prev.unsqueeze(-1) + step).reshape(w.P, -1))
    return torch.cat(levels, dim=1).exp()


def sequence_kl(p_policy: Policy, q_policy: Policy, prompts=None, method: str = "enum",
                batch_size: int = ENUM_BATCH) -> torch.Tensor:
    """Exact sequence-level ``(1/|prompts|) Σ_prompt KL(p(y_1:T|prompt) ‖ q(y_1:T|prompt))``.

    * ``method="enum"``: ``Σ_y p(y) (log p(y) − log q(y))`` over all V^T sequences.
    * ``method="dp"``: the chain rule, ``Σ_s Pr_p(reach s) Σ_v p(v|s) (log p(v|s) − log q(v|s))``.

    Differentiable with respect to the parameters of both policies. ``sequence_kl(student, teacher)``
    is the reverse KL KL(π‖q) that OPD minimises; swap the arguments for the forward KL.
    """
    w = p_policy.world
    prompts = _prompt_list(w, prompts)
    if method == "dp":
        reach_PS = state_reach_probs(p_policy)[prompts]
        logp = torch.log_softmax(p_policy.state_logits().float(), -1)[prompts]
        logq = torch.log_softmax(q_policy.state_logits().float(), -1)[prompts]
        kl_PS = (logp.exp() * (logp - logq)).sum(-1)
        return (reach_PS * kl_PS).sum() / len(prompts)
    if method != "enum":
        raise ValueError(f"method must be 'enum' or 'dp', got {method!r}")
    _check_enumerable(w, len(prompts))
    total = 0.0
    for p in prompts.tolist():
        for _, tok in w.iter_sequences(batch_size):
            prompts_N = torch.full((len(tok),), p, dtype=torch.long)
            logp_N = sequence_logprobs(p_policy, prompts_N, tok)
            logq_N = sequence_logprobs(q_policy, prompts_N, tok)
            total = total + (logp_N.exp() * (logp_N - logq_N)).sum()
    return total / len(prompts)


def success(policy: Policy, task: Task) -> torch.Tensor:
    """Exact task success: ``(1/|task|) Σ_p Pr_π(correct | p)``, a differentiable scalar.

    With exact-match answers this is ``mean_p π(answer_p | p)``; with a verifier, an enumeration.
    """
    if task.verifier is None:
        return sequence_logprobs(policy, task.prompts_K, task.answers_KT).exp().mean()
    return expectation(policy, lambda p, y: task.is_correct(p, y).float(), prompts=task.prompts)


# --------------------------------------------------------------------------------------------
# every (prompt, sequence) pair in one batch: the experiments' helpers
# --------------------------------------------------------------------------------------------


def enumerate_pairs(world: World, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (prompt, sequence) pair, prompt-major: ``prompts_X`` (K·N,) and ``tokens_XT`` (K·N, T), N = V^T."""
    prompts_X, tokens_XT, _ = _pairs(world, tuple(prompts))
    return prompts_X.clone(), tokens_XT.clone()


@functools.lru_cache(maxsize=8)
def all_sequences(world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence (N, T), lexicographic, and the state before each of its positions (N, T), built once per
    world (shared: read them, never write)."""
    seqs_NT = world.sequences()
    return seqs_NT, world.state_index(seqs_NT)


@functools.lru_cache(maxsize=16)
def _pairs(world: World, prompts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`enumerate_pairs` and the state before each position (K·N, T), built once per world and prompts
    (shared: read them, never write)."""
    seqs_NT = world.sequences()
    prompts_X = torch.tensor(prompts, dtype=torch.long).repeat_interleave(seqs_NT.shape[0])
    tokens_XT = seqs_NT.repeat(len(prompts), 1)
    return prompts_X, tokens_XT, world.state_index(tokens_XT)


def all_sequence_logprobs(policy: Policy, prompts: list[int]) -> torch.Tensor:
    """log π(y|p) for every prompt given and every sequence y (lexicographic), shape (K, N = V^T)."""
    prompts_X, tokens_XT = enumerate_pairs(policy.world, prompts)
    return sequence_logprobs(policy, prompts_X, tokens_XT).view(len(prompts), -1)


def table_logprobs(logits_PSV: torch.Tensor, world: World, prompts: list[int]) -> torch.Tensor:
    """:func:`all_sequence_logprobs` of the policy whose logits at every state are ``logits_PSV``
    (:meth:`toy.policies.Policy.state_table`), read from the table: shape (K, N = V^T)."""
    prompts_X, tokens_XT, states_XT = _pairs(world, tuple(prompts))
    return token_logprobs(logits_PSV[prompts_X.unsqueeze(1), states_XT], tokens_XT).sum(-1).view(len(prompts), -1)


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
