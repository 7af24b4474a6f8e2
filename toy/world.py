"""The toy tabular world: an autoregressive sequence world small enough to compute everything exactly.

A *world* has P prompts, a vocabulary of V tokens and a fixed horizon T. An episode picks a prompt
p ∈ [0, P) (the first state), then a policy emits tokens y_1 … y_T one at a time, each from a
next-token distribution given the prompt and the prefix ``c_t = (p, y_<t)``. There are
``V^T`` complete sequences per prompt and ``S = Σ_{t<T} V^t = (V^T − 1)/(V − 1)`` prefixes
("states") per prompt, so for V ≤ 6 and T ≤ ~10 every quantity can be computed exactly — by
enumerating the sequences, or by a dynamic programme over the prefixes.

Shape suffixes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``P`` prompts, ``S`` prefix states,
``N`` enumerated sequences.

Public API (stable; later versions only add to it)
--------------------------------------------------

World
    ``World(V, T, P=1)``  — sizes and index maths.
    ``world.num_states`` (S), ``world.num_sequences`` (V^T), ``world.prompts`` (P,) long,
    ``world.state_index(tokens_BT) -> (B, T)`` index in [0, S) of the prefix before each position,
    ``world.state_positions() -> (S,)`` prefix length t of each state,
    ``world.state_prefixes() -> (S, T)`` each state's prefix, zero-padded,
    ``world.sequences(start, stop) -> (stop − start, T)`` sequences in lexicographic order,
    ``world.iter_sequences(batch_size)`` yields ``(start, tokens_NT)`` chunks of all V^T sequences.

Policies (``torch.nn.Module``; every one has ``.world`` and the same call)
    ``policy.logits(prompts_B, tokens_BT) -> (B, T, V)``: position t's next-token logits given the
    prompt and ``tokens[:, :t]`` (tokens at positions ≥ t are ignored; causal). ``policy(...)`` is the same.
    ``policy.state_logits() -> (P, S, V)``: logits at every (prompt, prefix) state.

    * ``TablePolicy(world)`` — one free logit vector per (prompt, prefix): ``table_PSV``.
    * ``LowRankPolicy(world, rank)`` — ``logits = emb_PSR[p, s] @ out_RV + bias_V``: a per-state
      embedding times an output matrix *shared by every prompt and state* (rank R < V limits capacity).
    * ``MLPPolicy(world, hidden, context)`` — every parameter but a prompt embedding is shared:
      ``h = tanh(E_prompt[p] + E_pos[t] + Σ_{j<context} E_prev_j[y_{t−1−j}]) ; logits = W h + b``
      (a missing previous token reads as a BOS id V). Changing W for one task's prompts changes
      every other task's logits: the student that can forget.

Sampling and log-probabilities
    ``sample(policy, prompts_B, generator=None) -> tokens_BT`` (no grad; ancestral sampling).
    ``sequence_logprobs(policy, prompts_B, tokens_BT) -> (B,)`` = Σ_t log π(y_t | c_t) (with grad).

Exact quantities (uniform weight 1/|prompts| over the prompts given; default all prompts)
    ``sequence_distribution(policy, prompts=None) -> (len(prompts), V^T)`` probabilities π(y | p).
    ``sequence_kl(p_policy, q_policy, prompts=None, method="enum"|"dp") -> scalar``
        ``E_prompt KL(p(y_1:T | prompt) ‖ q(y_1:T | prompt))``, differentiable with respect to both
        policies (autograd through the exact value). ``sequence_kl(student, teacher)`` is the reverse
        KL KL(π‖q); ``sequence_kl(teacher, student)`` the forward KL KL(q‖π).
        "enum" sums over all V^T sequences (in batches), "dp" uses the chain rule over prefixes
        ``KL = Σ_s Pr_p(reach s) · KL(p(·|s) ‖ q(·|s))``; the two agree to float precision.
    ``state_reach_probs(policy) -> (P, S)`` probability that the policy reaches each prefix (DP).
    ``expectation(policy, fn, prompts=None, batch_size=...) -> tensor``: exact
        ``E_prompt E_{y∼π(·|prompt)} fn(prompts_N, tokens_NT)`` (fn returns (N,) or (N, ...)),
        differentiable through π.
    ``mc_expectation(policy, fn, prompts=None, num_samples=..., generator=None) -> (mean, stderr)``:
        the Monte Carlo fallback where V^T is too large to enumerate.
    ``can_enumerate(world, limit=ENUM_LIMIT) -> bool``.

Tasks (for task success and forgetting experiments)
    ``Task(name, prompts, answers_KT, verifier=None)``: a set of prompts, each with one correct
    answer sequence (``answers_KT[k]`` belongs to ``prompts[k]``), or a custom
    ``verifier(prompts_B, tokens_BT) -> bool (B,)``.
    ``task.is_correct(prompts_B, tokens_BT) -> bool (B,)``, ``task.answer_for(prompts_B) -> (B, T)``.
    ``success(policy, task) -> scalar``: exact probability of a correct answer, averaged over the
        task's prompts (``π(answer_p | p)``; by enumeration when a verifier is given). Differentiable.
    ``make_tasks(world, num_tasks, generator=None) -> list[Task]``: splits the P prompts into
        ``num_tasks`` disjoint tasks with random answer sequences.

Builders
    ``random_table(world, scale=1.0, generator=None) -> TablePolicy`` with i.i.d. N(0, scale²) logits.
    ``make_teacher(world, tasks, peak=4.0, noise=1.0, generator=None) -> TablePolicy``: at every prefix
        of a task prompt p at position t, logits ``noise·N(0,1) + peak·onehot(answer_p[t])`` — the
        teacher prefers the right token at every prefix, so it also recovers after a mistake.
        Prompts in no task get pure ``noise·N(0,1)`` logits.
    ``make_student(world, kind="table"|"lowrank"|"mlp", generator=None, scale=1.0, **kwargs)``:
        a randomly initialised student (≠ any teacher built from another generator).
    ``copy_policy(policy) -> policy``: a frozen deep copy (e.g. the initial student π₀ as a teacher).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from opd_mini import losses

#: Largest number of (prompt, sequence) pairs the exact routines enumerate by default.
ENUM_LIMIT = 2_000_000
#: Sequences per enumeration batch (bounds memory: batch · T · V floats per tensor).
ENUM_BATCH = 65_536


# --------------------------------------------------------------------------------------------
# the world: sizes and index maths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Sizes of the world. ``V`` tokens, horizon ``T``, ``P`` prompts.

    Prefix states are numbered by length, then lexicographically: the prefix ``u`` of length t has
    index ``offset(t) + Σ_i u_i V^(t−1−i)`` with ``offset(t) = (V^t − 1)/(V − 1)``; the empty prefix is 0.
    Sequences are numbered lexicographically, ``n = Σ_t y_t V^(T−1−t)``.
    """

    V: int
    T: int
    P: int = 1

    def __post_init__(self):
        if self.V < 2 or self.T < 1 or self.P < 1:
            raise ValueError(f"need V >= 2, T >= 1, P >= 1, got V={self.V}, T={self.T}, P={self.P}")

    # sizes
    @property
    def num_states(self) -> int:
        """S = Σ_{t<T} V^t prefixes per prompt."""
        return self.offset(self.T)

    @property
    def num_sequences(self) -> int:
        """V^T complete sequences per prompt."""
        return self.V ** self.T

    @property
    def prompts(self) -> torch.Tensor:
        """All prompt ids, shape (P,)."""
        return torch.arange(self.P)

    def offset(self, t: int) -> int:
        """Index of the first prefix of length t: (V^t − 1)/(V − 1)."""
        return (self.V ** t - 1) // (self.V - 1)

    # indices
    def state_index(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Index in [0, S) of the prefix ``tokens[:, :t]`` for every position t, shape (B, T)."""
        B, T = tokens_BT.shape
        if T != self.T:
            raise ValueError(f"tokens_BT has {T} positions but the world's horizon is T={self.T}")
        tokens = tokens_BT.long()
        code = torch.zeros(B, dtype=torch.long, device=tokens.device)
        out = torch.empty(B, T, dtype=torch.long, device=tokens.device)
        for t in range(T):
            out[:, t] = self.offset(t) + code
            code = code * self.V + tokens[:, t]
        return out

    def state_positions(self) -> torch.Tensor:
        """Prefix length t of each state, shape (S,)."""
        return torch.cat([torch.full((self.V ** t,), t, dtype=torch.long) for t in range(self.T)])

    def state_prefixes(self) -> torch.Tensor:
        """Each state's prefix tokens, zero-padded to T, shape (S, T)."""
        rows = []
        for t in range(self.T):
            prefix = _digits(torch.arange(self.V ** t), self.V, t)  # (V^t, t)
            rows.append(F.pad(prefix, (0, self.T - t)))
        return torch.cat(rows)

    def sequences(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Sequences number ``start … stop−1`` in lexicographic order, shape (stop − start, T)."""
        stop = self.num_sequences if stop is None else stop
        return _digits(torch.arange(start, stop), self.V, self.T)

    def iter_sequences(self, batch_size: int = ENUM_BATCH) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, tokens_NT)`` chunks covering all V^T sequences."""
        for start in range(0, self.num_sequences, batch_size):
            yield start, self.sequences(start, min(start + batch_size, self.num_sequences))


def _digits(n_N: torch.Tensor, base: int, width: int) -> torch.Tensor:
    """Base-``base`` digits of each integer, most significant first, shape (N, width)."""
    powers = base ** torch.arange(width - 1, -1, -1, dtype=torch.long)
    return (n_N.long().unsqueeze(-1) // powers) % base


def can_enumerate(world: World, num_prompts: int | None = None, limit: int = ENUM_LIMIT) -> bool:
    """True when ``num_prompts · V^T`` (default all P prompts) is at most ``limit``."""
    num_prompts = world.P if num_prompts is None else num_prompts
    return num_prompts * world.num_sequences <= limit


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------


class Policy(nn.Module):
    """Base class: a next-token policy over the world. Subclasses implement :meth:`logits`."""

    def __init__(self, world: World):
        super().__init__()
        self.world = world

    def logits(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position, (B, T, V); position t sees the prompt and tokens < t."""
        raise NotImplementedError

    def forward(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.logits(prompts_B, tokens_BT)

    def state_logits(self) -> torch.Tensor:
        """Logits at every (prompt, prefix) state, (P, S, V). Generic route: run :meth:`logits` on
        each state's zero-padded prefix and read the position after the prefix."""
        w = self.world
        prefixes_ST, pos_S = w.state_prefixes(), w.state_positions()
        S = w.num_states
        prompts = w.prompts.repeat_interleave(S)  # (P·S,)
        logits_XTV = self.logits(prompts, prefixes_ST.repeat(w.P, 1))
        out = logits_XTV[torch.arange(w.P * S), pos_S.repeat(w.P)]  # (P·S, V)
        return out.view(w.P, S, w.V)


class TablePolicy(Policy):
    """One free logit vector per (prompt, prefix): ``logits(p, c_t) = table_PSV[p, s(c_t)]``.

    The pure tabular softmax policy. Parameters are not shared between states, so learning one
    prompt never changes another.
    """

    def __init__(self, world: World, table_PSV: torch.Tensor | None = None):
        super().__init__(world)
        if table_PSV is None:
            table_PSV = torch.zeros(world.P, world.num_states, world.V)
        if tuple(table_PSV.shape) != (world.P, world.num_states, world.V):
            raise ValueError(f"table_PSV must have shape {(world.P, world.num_states, world.V)}, got {tuple(table_PSV.shape)}")
        self.table_PSV = nn.Parameter(table_PSV.clone().float())

    def logits(self, prompts_B, tokens_BT):
        s_BT = self.world.state_index(tokens_BT)
        return self.table_PSV[prompts_B.long().unsqueeze(1), s_BT]  # (B, T, V)

    def state_logits(self):
        return self.table_PSV


class LowRankPolicy(Policy):
    """Low-rank logits: ``logits(p, c_t) = emb_PSR[p, s(c_t)] @ out_RV + bias_V``.

    The per-state embedding is free, but the output matrix ``out_RV`` and ``bias_V`` are shared by all
    prompts and states: a gradient step on one task's prompts moves every other task's logits.
    With rank R ≥ V it can represent any table; R < V limits capacity.
    """

    def __init__(self, world: World, rank: int = 2, scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__(world)
        self.rank = rank
        self.emb_PSR = nn.Parameter(torch.randn(world.P, world.num_states, rank, generator=generator) * scale)
        self.out_RV = nn.Parameter(torch.randn(rank, world.V, generator=generator) / math.sqrt(rank))
        self.bias_V = nn.Parameter(torch.zeros(world.V))

    def logits(self, prompts_B, tokens_BT):
        s_BT = self.world.state_index(tokens_BT)
        return self.emb_PSR[prompts_B.long().unsqueeze(1), s_BT] @ self.out_RV + self.bias_V

    def state_logits(self):
        return self.emb_PSR @ self.out_RV + self.bias_V


class MLPPolicy(Policy):
    """A one-hidden-layer network over (prompt, position, last ``context`` tokens); all but the prompt
    embedding is shared between prompts::

        h_t = tanh(E_prompt[p] + E_pos[t] + Σ_{j<context} E_prev_j[y_{t−1−j}] + b_h)      (hidden,)
        logits_t = W h_t + b                                                             (V,)

    A missing previous token (t − 1 − j < 0) reads as the BOS id ``V``. With ``context < T`` the
    policy cannot see the whole prefix (a capacity limit, like a real model's).
    """

    def __init__(self, world: World, hidden: int = 32, context: int = 1, scale: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__(world)
        self.hidden, self.context = hidden, context
        g = generator
        self.prompt_emb = nn.Parameter(torch.randn(world.P, hidden, generator=g) * scale)
        self.pos_emb = nn.Parameter(torch.randn(world.T, hidden, generator=g) * scale)
        self.prev_emb = nn.Parameter(torch.randn(context, world.V + 1, hidden, generator=g) * scale / math.sqrt(max(context, 1)))
        self.bias_h = nn.Parameter(torch.zeros(hidden))
        self.head_HV = nn.Parameter(torch.randn(hidden, world.V, generator=g) * scale / math.sqrt(hidden))
        self.bias_V = nn.Parameter(torch.zeros(world.V))

    def logits(self, prompts_B, tokens_BT):
        B, T = tokens_BT.shape
        x_BTH = self.prompt_emb[prompts_B.long()].unsqueeze(1) + self.pos_emb[:T].unsqueeze(0) + self.bias_h
        # previous tokens shifted right, BOS (= V) where missing
        padded = F.pad(tokens_BT.long(), (self.context, 0), value=self.world.V)  # (B, context + T)
        for j in range(self.context):
            prev_BT = padded[:, self.context - 1 - j: self.context - 1 - j + T]  # y_{t-1-j}
            x_BTH = x_BTH + self.prev_emb[j][prev_BT]
        return torch.tanh(x_BTH) @ self.head_HV + self.bias_V  # (B, T, V)


# --------------------------------------------------------------------------------------------
# sampling and log-probabilities
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(policy: Policy, prompts_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling ``y_t ∼ π(·| p, y_<t)``, t = 1 … T. Returns tokens (B, T) long."""
    w = policy.world
    prompts_B = prompts_B.long()
    tokens_BT = torch.zeros(prompts_B.shape[0], w.T, dtype=torch.long)
    if type(policy).state_logits is not Policy.state_logits:
        # fast path for policies that store per-state logits: walk the prefix index, O(T) gathers
        logits_PSV = policy.state_logits()
        code_B = torch.zeros_like(prompts_B)
        for t in range(w.T):
            probs_BV = torch.softmax(logits_PSV[prompts_B, w.offset(t) + code_B].float(), dim=-1)
            tokens_BT[:, t] = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
            code_B = code_B * w.V + tokens_BT[:, t]
        return tokens_BT
    for t in range(w.T):
        probs_BV = torch.softmax(policy.logits(prompts_B, tokens_BT)[:, t].float(), dim=-1)
        tokens_BT[:, t] = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return tokens_BT


def sequence_logprobs(policy: Policy, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """log π(y_1:T | p) = Σ_t log π(y_t | c_t), shape (B,), with grad."""
    return losses.token_logprobs(policy.logits(prompts_B, tokens_BT), tokens_BT).sum(-1)


# --------------------------------------------------------------------------------------------
# exact quantities
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


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A task: a set of prompts, each with one correct answer sequence (or a custom verifier).

    ``answers_KT[k]`` is the answer of ``prompts[k]``. ``verifier(prompts_B, tokens_BT) -> bool (B,)``,
    when given, replaces exact-match checking (success is then computed by enumeration).
    """

    name: str
    prompts: list[int]
    answers_KT: torch.Tensor
    verifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.prompts = [int(p) for p in self.prompts]
        self.answers_KT = torch.as_tensor(self.answers_KT, dtype=torch.long)
        if self.answers_KT.shape[0] != len(self.prompts):
            raise ValueError("answers_KT needs one row per prompt")

    @property
    def prompts_K(self) -> torch.Tensor:
        return torch.tensor(self.prompts, dtype=torch.long)

    def answer_for(self, prompts_B: torch.Tensor) -> torch.Tensor:
        """The answer sequence of each prompt, shape (B, T). Every prompt must belong to the task."""
        lookup = {p: k for k, p in enumerate(self.prompts)}
        idx = torch.tensor([lookup[int(p)] for p in prompts_B.tolist()], dtype=torch.long)
        return self.answers_KT[idx]

    def is_correct(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Whether each sequence solves its prompt, bool (B,)."""
        if self.verifier is not None:
            return self.verifier(prompts_B, tokens_BT).bool()
        return (tokens_BT.long() == self.answer_for(prompts_B)).all(-1)


def success(policy: Policy, task: Task) -> torch.Tensor:
    """Exact task success: ``(1/|task|) Σ_p Pr_π(correct | p)``, a differentiable scalar.

    With exact-match answers this is ``mean_p π(answer_p | p)``; with a verifier, an enumeration.
    """
    if task.verifier is None:
        return sequence_logprobs(policy, task.prompts_K, task.answers_KT).exp().mean()
    return expectation(policy, lambda p, y: task.is_correct(p, y).float(), prompts=task.prompts)


def make_tasks(world: World, num_tasks: int, generator: torch.Generator | None = None) -> list[Task]:
    """Split prompts 0 … P−1 into ``num_tasks`` contiguous, disjoint tasks ("A", "B", …) with answer
    sequences drawn uniformly at random."""
    if not 1 <= num_tasks <= world.P:
        raise ValueError(f"need 1 <= num_tasks <= P={world.P}, got {num_tasks}")
    answers_PT = torch.randint(world.V, (world.P, world.T), generator=generator)
    tasks = []
    for k, chunk in enumerate(torch.tensor_split(world.prompts, num_tasks)):
        tasks.append(Task(name=chr(ord("A") + k), prompts=chunk.tolist(), answers_KT=answers_PT[chunk]))
    return tasks


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def random_table(world: World, scale: float = 1.0, generator: torch.Generator | None = None) -> TablePolicy:
    """A table policy with i.i.d. ``N(0, scale²)`` logits at every state."""
    return TablePolicy(world, torch.randn(world.P, world.num_states, world.V, generator=generator) * scale)


def make_teacher(world: World, tasks: list[Task], peak: float = 4.0, noise: float = 1.0,
                 generator: torch.Generator | None = None) -> TablePolicy:
    """A table teacher peaked on the right answers: for a task prompt p at any prefix of length t,
    ``logits = noise·N(0, 1) + peak·onehot(answer_p[t])``; other prompts get ``noise·N(0, 1)``.

    Its success on a task is ``Π_t q(answer_t)`` ≈ ``(e^peak / (e^peak + V − 1))^T`` for small noise.
    """
    table = torch.randn(world.P, world.num_states, world.V, generator=generator) * noise
    pos_S = world.state_positions()
    for task in tasks:
        for k, p in enumerate(task.prompts):
            table[p, torch.arange(world.num_states), task.answers_KT[k][pos_S]] += peak
    return TablePolicy(world, table)


def make_student(world: World, kind: str = "table", generator: torch.Generator | None = None,
                 scale: float = 1.0, **kwargs) -> Policy:
    """A randomly initialised student: ``"table"`` (N(0, scale²) logits), ``"lowrank"``
    (:class:`LowRankPolicy`, kwargs: rank) or ``"mlp"`` (:class:`MLPPolicy`, kwargs: hidden, context)."""
    if kind == "table":
        return random_table(world, scale, generator)
    if kind == "lowrank":
        return LowRankPolicy(world, scale=scale, generator=generator, **kwargs)
    if kind == "mlp":
        return MLPPolicy(world, scale=scale, generator=generator, **kwargs)
    raise ValueError(f"kind must be 'table', 'lowrank' or 'mlp', got {kind!r}")


def copy_policy(policy: Policy) -> Policy:
    """A deep copy with ``requires_grad=False`` on every parameter (e.g. a frozen π₀ teacher)."""
    frozen = copy.deepcopy(policy)
    for param in frozen.parameters():
        param.requires_grad_(False)
    return frozen
