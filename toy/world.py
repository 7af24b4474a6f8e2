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

Every name below can be imported from ``toy.world``. The world itself and its tasks live here, the
policies, sampling and builders in :mod:`toy.policies`, the exact quantities in :mod:`toy.exact`.

World
    ``World(V, T, P=1)``  — sizes and index maths.
    ``world.num_states`` (S), ``world.num_sequences`` (V^T), ``world.prompts`` (P,) long,
    ``world.state_index(tokens_BT) -> (B, T)`` index in [0, S) of the prefix before each position,
    ``world.state_positions() -> (S,)`` prefix length t of each state,
    ``world.state_prefixes() -> (S, T)`` each state's prefix, zero-padded,
    ``world.sequences(start, stop) -> (stop − start, T)`` sequences in lexicographic order,
    ``world.iter_sequences(batch_size)`` yields ``(start, tokens_NT)`` chunks of all V^T sequences.

Policies (:mod:`toy.policies`; ``torch.nn.Module``; every one has ``.world`` and the same call)
    ``policy.logits(prompts_B, tokens_BT) -> (B, T, V)``: position t's next-token logits given the
    prompt and ``tokens[:, :t]`` (tokens at positions ≥ t are ignored; causal). ``policy(...)`` is the same.
    ``policy.state_logits() -> (P, S, V)``: logits at every (prompt, prefix) state (differentiable).
    ``policy.state_table() -> (P, S, V)``: the same values without gradient, by the cheapest route.
    ``policy.next_logits(prompts_B, tokens_BT, t) -> (B, V)``: position t's logits only (what sampling needs).

    * ``TablePolicy(world)`` — one free logit vector per (prompt, prefix): ``table_PSV``.
    * ``LowRankPolicy(world, rank)`` — ``logits = emb_PSR[p, s] @ out_RV + bias_V``: a per-state
      embedding times an output matrix *shared by every prompt and state* (rank R < V limits capacity).
    * ``MLPPolicy(world, hidden, context)`` — every parameter but a prompt embedding is shared:
      ``h = tanh(E_prompt[p] + E_pos[t] + Σ_{j<context} E_prev_j[y_{t−1−j}]) ; logits = W h + b``
      (a missing previous token reads as a BOS id V). Changing W for one task's prompts changes
      every other task's logits: the student that can forget.

Sampling and log-probabilities (:mod:`toy.policies`)
    ``sample(policy, prompts_B, generator=None) -> tokens_BT`` (no grad; ancestral sampling).
    ``sequence_logprobs(policy, prompts_B, tokens_BT) -> (B,)`` = Σ_t log π(y_t | c_t) (with grad).

Exact quantities (:mod:`toy.exact`; uniform weight 1/|prompts| over the prompts given; default all prompts)
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
    ``success(policy, task) -> scalar`` (:mod:`toy.exact`): exact probability of a correct answer, averaged over the
        task's prompts (``π(answer_p | p)``; by enumeration when a verifier is given). Differentiable.
    ``make_tasks(world, num_tasks, generator=None) -> list[Task]``: splits the P prompts into
        ``num_tasks`` disjoint tasks with random answer sequences.

Builders (:mod:`toy.policies`)
    ``random_table(world, scale=1.0, generator=None) -> TablePolicy`` with i.i.d. N(0, scale²) logits.
    ``make_teacher(world, tasks, peak=4.0, noise=1.0, generator=None) -> TablePolicy``: at every prefix
        of a task prompt p at position t, logits ``noise·N(0,1) + peak·onehot(answer_p[t])`` — the
        teacher prefers the right token at every prefix, so it also recovers after a mistake.
        Prompts in no task get pure ``noise·N(0,1)`` logits.
    ``make_student(world, kind="table"|"lowrank"|"mlp", generator=None, scale=1.0, **kwargs)``:
        a randomly initialised student (≠ any teacher built from another generator).
    ``copy_policy(policy) -> policy``: a frozen deep copy (e.g. the initial student π₀ as a teacher).
    ``frozen_table(policy) -> TablePolicy``: a frozen table of ``policy.state_table()`` (the same policy, by lookup).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

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
        T = tokens_BT.shape[1]
        if T != self.T:
            raise ValueError(f"tokens_BT has {T} positions but the world's horizon is T={self.T}")
        weights_TT, offsets_T = _prefix_code(self.V, self.T)
        return tokens_BT.long() @ weights_TT.to(tokens_BT.device) + offsets_T.to(tokens_BT.device)

    def state_positions(self) -> torch.Tensor:
        """Prefix length t of each state, shape (S,)."""
        return _state_tables(self.V, self.T)[0].clone()

    def state_prefixes(self) -> torch.Tensor:
        """Each state's prefix tokens, zero-padded to T, shape (S, T)."""
        return _state_tables(self.V, self.T)[1].clone()

    def sequences(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Sequences number ``start … stop−1`` in lexicographic order, shape (stop − start, T)."""
        stop = self.num_sequences if stop is None else stop
        return _digits(torch.arange(start, stop), self.V, self.T)

    def iter_sequences(self, batch_size: int = ENUM_BATCH) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, tokens_NT)`` chunks covering all V^T sequences."""
        for start in range(0, self.num_sequences, batch_size):
            yield start, self.sequences(start, min(start + batch_size, self.num_sequences))


@functools.lru_cache(maxsize=None)
def _prefix_code(V: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_TT, offset_T)`` with ``W[i, t] = V^(t−1−i)`` for i < t (else 0) and ``offset_T[t] = offset(t)``:
    the state before position t is ``Σ_i y_i W[i, t] + offset(t)`` (integer arithmetic, exact)."""
    i, t = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
    weights_TT = torch.where(i < t, V ** (t - 1 - i).clamp(min=0), torch.zeros((), dtype=torch.long))
    return weights_TT, (V ** torch.arange(T) - 1) // (V - 1)


@functools.lru_cache(maxsize=8)
def _state_tables(V: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each state's prefix length (S,) and prefix tokens zero-padded to T (S, T), built once per (V, T)."""
    positions_S = torch.cat([torch.full((V ** t,), t, dtype=torch.long) for t in range(T)])
    prefixes_ST = torch.cat([F.pad(_digits(torch.arange(V ** t), V, t), (0, T - t)) for t in range(T)])
    return positions_S, prefixes_ST


def _digits(n_N: torch.Tensor, base: int, width: int) -> torch.Tensor:
    """Base-``base`` digits of each integer, most significant first, shape (N, width)."""
    powers = base ** torch.arange(width - 1, -1, -1, dtype=torch.long)
    return (n_N.long().unsqueeze(-1) // powers) % base


def can_enumerate(world: World, num_prompts: int | None = None, limit: int = ENUM_LIMIT) -> bool:
    """True when ``num_prompts · V^T`` (default all P prompts) is at most ``limit``."""
    num_prompts = world.P if num_prompts is None else num_prompts
    return num_prompts * world.num_sequences <= limit


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
# the rest of the public API, importable from here too
# --------------------------------------------------------------------------------------------

_ELSEWHERE = {
    "toy.policies": ("Policy", "TablePolicy", "LowRankPolicy", "MLPPolicy", "sample", "sequence_logprobs",
                     "random_table", "make_teacher", "make_student", "copy_policy", "frozen_table"),
    "toy.exact": ("sequence_distribution", "expectation", "mc_expectation", "state_reach_probs", "sequence_kl",
                  "success"),
}
_MODULE_OF = {name: module for module, names in _ELSEWHERE.items() for name in names}


def __getattr__(name: str):
    """``from toy.world import sample`` and the like: the policies and exact quantities of the public API live
    in :mod:`toy.policies` and :mod:`toy.exact` (which import this module), and are looked up there."""
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
