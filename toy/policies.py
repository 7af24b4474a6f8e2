"""The toy world's policies, sampling and builders (part of the public API of :mod:`toy.world`).

Every policy is a ``torch.nn.Module`` with ``.world`` and one call: ``policy.logits(prompts_B, tokens_BT)``,
the next-token logits (B, T, V) at every position, causal. ``state_logits()`` gives the logits at every
(prompt, prefix) state, ``state_table()`` the same values without gradient by the cheapest route, and
``next_logits(prompts_B, tokens_BT, t)`` one position's (what :func:`sample` asks for).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from opd_mini import losses
from toy.world import Task, World

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

    @torch.no_grad()
    def state_table(self) -> torch.Tensor:
        """The values of :meth:`state_logits` without gradient, (P, S, V), by the cheapest route a subclass has
        (evaluation, sampling, a frozen teacher's lookups)."""
        return self.state_logits()

    def next_logits(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor, t: int) -> torch.Tensor:
        """Position t's logits only, (B, V), given the prompt and ``tokens[:, :t]`` (what sampling needs)."""
        return self.logits(prompts_B, tokens_BT)[:, t]

    def step_table(self) -> torch.Tensor | None:
        """The logits of every (prompt, position, previous token), (P, T, V + 1, V), for a policy that reads no more
        of the prefix than its last token (the previous token V is BOS); None for any other (the default)."""
        return None


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

    # The two routes below compute the rows :meth:`logits` computes, with the same operations in the same
    # order, for the positions asked for only. ``state_logits`` keeps the generic route: a gradient through it
    # sums over the padded positions too, in the order that fitted the committed π₀ of toy/results.

    @torch.no_grad()
    def step_table(self):
        if self.context != 1:
            return None
        x_PTXH = self.prompt_emb[:, None, None, :] + self.pos_emb[None, :, None, :] + self.bias_h
        x_PTXH = x_PTXH + self.prev_emb[0][None, None, :, :]  # previous token 0 … V − 1, and BOS = V
        return torch.tanh(x_PTXH) @ self.head_HV + self.bias_V  # (P, T, V + 1, V)

    def next_logits(self, prompts_B, tokens_BT, t):
        x_BH = self.prompt_emb[prompts_B.long()] + self.pos_emb[t] + self.bias_h
        for j in range(self.context):  # y_{t−1−j}, BOS (= V) where missing
            prev_B = tokens_BT[:, t - 1 - j].long() if t > j else torch.full_like(prompts_B.long(), self.world.V)
            x_BH = x_BH + self.prev_emb[j][prev_B]
        return torch.tanh(x_BH) @ self.head_HV + self.bias_V  # (B, V)

    @torch.no_grad()
    def state_table(self):
        if getattr(self, "_state_inputs", None) is None:  # which position and previous tokens each state reads
            w = self.world
            pos_S = w.state_positions()
            padded_SX = F.pad(w.state_prefixes(), (self.context, 0), value=w.V)  # BOS before every prefix
            rows = torch.arange(w.num_states)
            self._state_inputs = pos_S, [padded_SX[rows, self.context - 1 - j + pos_S] for j in range(self.context)]
        pos_S, prev_JS = self._state_inputs  # y_{t−1−j} of each prefix, BOS where missing
        x_PSH = self.prompt_emb.unsqueeze(1) + self.pos_emb[pos_S].unsqueeze(0) + self.bias_h
        for j, prev_S in enumerate(prev_JS):
            x_PSH = x_PSH + self.prev_emb[j][prev_S]
        return torch.tanh(x_PSH) @ self.head_HV + self.bias_V  # (P, S, V)


# --------------------------------------------------------------------------------------------
# sampling and log-probabilities
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(policy: Policy, prompts_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling ``y_t ∼ π(·| p, y_<t)``, t = 1 … T. Returns tokens (B, T) long.

    A policy that stores per-state logits, or whose world has at most :data:`TABLE_ROWS_PER_SAMPLE` states per
    sampled sequence, is read from its state table (:meth:`Policy.state_table`), walking the prefix index; a
    policy that reads only the last token is read from its (prompt, position, previous token) table
    (:meth:`Policy.step_table`); any other asks for one position at a time (:meth:`Policy.next_logits`). All three
    read the same logits, bit for bit (the test checks it), so they draw the same tokens from the same generator.
    """
    w = policy.world
    prompts_B = prompts_B.long()
    stores_table = type(policy).state_logits is not Policy.state_logits
    if stores_table or w.P * w.num_states <= TABLE_ROWS_PER_SAMPLE * len(prompts_B):
        logits_XV = policy.state_table().reshape(w.P * w.num_states, w.V)  # row p·S + s
        row_B, code_B, tokens = prompts_B * w.num_states, torch.zeros_like(prompts_B), []
        for t in range(w.T):
            probs_BV = torch.softmax(logits_XV.index_select(0, row_B + (w.offset(t) + code_B)).float(), dim=-1)
            tokens.append(categorical(probs_BV, generator))
            code_B = code_B * w.V + tokens[-1]
        return torch.stack(tokens, 1)
    step_PTXV = policy.step_table()
    if step_PTXV is not None:  # one lookup per position instead of a forward pass
        prev_B, tokens = torch.full_like(prompts_B, w.V), []
        for t in range(w.T):
            probs_BV = torch.softmax(step_PTXV[prompts_B, t, prev_B].float(), dim=-1)
            prev_B = categorical(probs_BV, generator)
            tokens.append(prev_B)
        return torch.stack(tokens, 1)
    tokens_BT = torch.zeros(prompts_B.shape[0], w.T, dtype=torch.long)
    for t in range(w.T):
        probs_BV = torch.softmax(policy.next_logits(prompts_B, tokens_BT, t).float(), dim=-1)
        tokens_BT[:, t] = categorical(probs_BV, generator)
    return tokens_BT


#: :func:`sample` reads a state table when the world has at most this many (prompt, prefix) states per sampled
#: sequence (building the table then costs less than T forward passes of the batch)
TABLE_ROWS_PER_SAMPLE = 64


def categorical(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from each row's categorical distribution, (B,) long, by the exponential race
    ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. (the first of V exponential clocks of rates p_v to ring).
    The same draws as ``torch.multinomial(probs_BV, 1, generator=generator)``, which runs this race on the CPU,
    without its argument checks."""
    return (probs_BV / torch.empty_like(probs_BV).exponential_(1, generator=generator)).argmax(-1)


def sequence_logprobs(policy: Policy, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """log π(y_1:T | p) = Σ_t log π(y_t | c_t), shape (B,), with grad."""
    return losses.token_logprobs(policy.logits(prompts_B, tokens_BT), tokens_BT).sum(-1)


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


def frozen_table(policy: Policy) -> TablePolicy:
    """A frozen :class:`TablePolicy` holding ``policy.state_table()``: the same policy, read by lookup (a fast
    teacher or sampler when the world's states are few)."""
    table = TablePolicy(policy.world, policy.state_table())
    table.requires_grad_(False)
    return table


def copy_policy(policy: Policy) -> Policy:
    """A deep copy with ``requires_grad=False`` on every parameter (e.g. a frozen π₀ teacher)."""
    frozen = copy.deepcopy(policy)
    for param in frozen.parameters():
        param.requires_grad_(False)
    return frozen
