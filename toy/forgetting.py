"""Self-distillation and continual learning: SFT drifts and forgets; on-policy distillation stays put and recovers.

Reproduces, in the exact tabular world of :mod:`toy.world`, the self-distillation and continual
learning results of the Thinking Machines "On-Policy Distillation" blog and the forgetting law of
RL's Razor (Shenfeld et al. 2025). The student is a :class:`toy.world.MLPPolicy`: all its parameters
but a per-prompt embedding are shared by every prompt, so training on one task's prompts moves the
other tasks' outputs — the student that can forget. Every loss comes from :mod:`opd_mini.losses`, fed
as the transformer loop feeds it (student log-probs ``losses.token_logprobs(student.logits(p, y), y)``,
teacher log-probs from the teacher's logits on the same tokens, a mask of ones).

Notation: π₀ the initial student (a frozen copy), π the student being trained, q a teacher, 𝒫 a set
of prompts (uniform weight), y = y_1:T a whole sequence. Exact quantities (every V^T sequence is
enumerated)::

    KL(π₀‖π)   = (1/|𝒫|) Σ_p Σ_y π₀(y|p) (log π₀(y|p) − log π(y|p))            "kl_to_init"
    success    = (1/|𝒫|) Σ_p Σ_y π(y|p) · 1[y is a correct answer of p]
    H(π)       = −(1/|𝒫|) Σ_p Σ_y π(y|p) log π(y|p)         sequence entropy in nats ("entropy")
    pass@k     = (1/|𝒫|) Σ_p [1 − (1 − success_p)^k]           some of k samples is correct
    coverage@k = (1/|𝒫|) Σ_p (1/|A_p|) Σ_{a∈A_p} [1 − (1 − π(a|p))^k]
                 the expected fraction of p's distinct correct answers A_p found among k samples

The three experiments
---------------------
1. **Self-distillation drift** (task A, teacher = π₀). ``sft_fresh``: SFT on fresh samples of π₀
   every step; ``sft_fixed``: SFT on one fixed set of samples of π₀; ``opd_sampled`` /
   ``opd_full``: sampled-token / full-vocabulary reverse KL to π₀ on the student's own samples. A
   learning-rate sweep, constant and linearly decaying (lr_t = lr · (1 − t/steps)).
   What the maths says, and the run shows:

   * SFT on samples of π₀ minimises ``E_{y∼π₀}[−log π(y)] = KL(π₀‖π) + H(π₀)``; its expected
     gradient at π₀ is ``−Σ_y π₀(y) ∇log π₀(y) = −∇Σ_y π₀(y) = 0``, but a *single* sample's gradient is
     not 0: its covariance is the Fisher information of π₀. SGD therefore leaves π₀ at once and
     random-walks in the well of KL(π₀‖π) around it: with fresh samples the walk is held by the
     restoring force of the well, and KL(π₀‖π) settles at a noise floor that grows with lr/batch.
     A fixed finite sample set moves the bottom of the well itself, to the empirical distribution of
     the set: KL(π₀‖π) then keeps growing towards KL(π₀‖π̂) with π̂ the fit to those samples.
   * OPD with π₀ as the teacher: at π = π₀ the log-ratio ``r_t = log π(y_t|c_t) − log π₀(y_t|c_t)`` is
     0 on *every* sample, so every per-sample gradient is exactly 0 — zero mean *and* zero variance.
     The student stays at π₀ for any learning rate. :func:`expected_gradient` checks both moments by
     enumeration.

2. **Continual learning** (tasks A and B share parameters). From π₀ (good at A), learn B by SFT on
   samples of a B teacher — pure (``sft``) or with a fraction of replayed A samples of π₀
   (``sft_replay``); A degrades. Then OPD with the earlier checkpoint π₀ as the teacher (phase
   ``recover_A``): on A prompts only (``+opd_A``), or on A prompts (teacher π₀) and B prompts (teacher
   π_B, the checkpoint after learning B) together (``+opd_AB``). OPD brings A back within a few
   steps either way; run on A prompts alone for long, it moves the shared parameters on and erodes B
   again, which the B half of ``+opd_AB`` prevents (at π = π_B its gradient there is 0, as in 1).

3. **SFT vs RL vs OPD on a new task B** at an equal budget of samples per step: SFT on teacher samples;
   GRPO on the verifiable reward 1[correct]; OPD (sampled-token, full reverse KL, teacher top-K);
   on-policy forward KL and JSD(β). Reported per method: samples to reach a target success on B,
   retention of A (success_A / success_A(π₀)), entropy and pass@k on B, and KL(π₀‖π) on B (the
   quantity that RL's Razor says forgetting tracks), and also at the moment the target is reached
   (matched new-task success, as RL's Razor compares). Some B prompts have two correct answers,
   between which the teacher splits its mass, so that entropy and coverage measure diversity. The
   distillation losses all converge to the teacher's distribution on B and forget about as much as
   each other; GRPO maximises success itself, past the teacher's, collapsing onto one answer per
   prompt (low entropy, coverage 1/2 on two-answer prompts), so by the end of the budget it is the
   furthest from π₀ in KL, and the method that forgot the most.

``python -m toy forgetting --out DIR`` prints the tables and the wall time, saves
``DIR/forgetting.png`` and writes ``DIR/forgetting.json`` (schema in :func:`run`) and
``DIR/forgetting_details.json`` (the gradient check and the per-method diagnostics).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from opd_mini import losses
import toy
from toy.world import (MLPPolicy, Policy, TablePolicy, Task, World, copy_policy, make_student, make_tasks,
                       make_teacher, sample)

SELF_DISTILL_METHODS = ("sft_fresh", "sft_fixed", "opd_sampled", "opd_full")
NEW_TASK_METHODS = ("sft", "grpo", "opd_sampled", "opd_full", "opd_topk", "forward_kl", "jsd")
#: methods whose loss is computed on the student's own samples (all but SFT)
ON_POLICY = ("grpo", "opd_sampled", "opd_full", "opd_topk", "forward_kl", "jsd")


@dataclass
class Config:
    """Settings of the forgetting experiments (the main ones are also command-line options)."""

    # the world and the student
    V: int = 4
    """vocabulary size"""
    T: int = 3
    """horizon (answer length)"""
    prompts_per_task: int = 4
    """prompts of task A and of task B (P = 2 · prompts_per_task)"""
    hidden: int = 16
    """hidden width of the MLPPolicy student"""
    context: int = 2
    """previous tokens the student sees (T − 1 = the whole prefix)"""
    teacher_peak: float = 3.0
    """teacher logit bonus of the right next token (per-token prob ≈ e^peak / (e^peak + V − 1))"""
    teacher_noise: float = 0.5
    """std of the teacher's random logits"""
    two_answer_prompts: int = 2
    """B prompts with two correct answers (the teacher splits its mass between them)"""
    init_B_peak: float = 0.75
    """π₀'s weak prior on B: the warm-up also fits B prompts to a B teacher with this smaller peak
    (π₀ then solves B now and then, as a base model does; 0 = no prior, only random logits)"""
    warmup_steps: int = 300
    """Adam steps of the exact SFT warm-up that makes π₀ (KL(q_A‖π) on A prompts + KL(q_B⁰‖π) on B)"""
    warmup_lr: float = 0.03
    """learning rate of the warm-up"""
    seed: int = 0
    """seed of the tasks, teachers, initial student and every sampling generator"""

    # 1. self-distillation
    sd_lrs: tuple[float, ...] = (0.1, 0.3, 1.0)
    """learning rates of the self-distillation sweep"""
    sd_optimizer: str = "sgd"
    """optimizer of the self-distillation runs ('sgd' keeps lr a clean noise scale; or 'adam')"""
    sd_steps: int = 100
    """steps per self-distillation run"""
    sd_batch: int = 32
    """sequences per step"""
    sd_fixed_size: int = 64
    """size of the fixed sample set of sft_fixed (drawn once from π₀)"""
    sd_seeds: int = 5
    """sampling seeds per (method, lr, schedule)"""
    sd_eval_every: int = 10
    """steps between exact evaluations"""

    # 2. continual learning and 3. comparison
    optimizer: str = "adam"
    """optimizer of experiments 2 and 3"""
    lr: float = 0.01
    """learning rate of experiments 2 and 3 (the same for every method)"""
    batch: int = 32
    """samples per step in experiments 2 and 3 (the equal sample budget of the comparison)"""
    cl_steps: int = 150
    """steps of learning task B by SFT (phase learn_B)"""
    cl_recover_steps: int = 150
    """steps of OPD on A prompts with π₀ as the teacher (phase recover_A)"""
    cl_replay_frac: float = 0.5
    """fraction of each sft_replay batch that is A samples of π₀"""
    cmp_steps: int = 150
    """steps per method in the comparison"""
    group_size: int = 8
    """GRPO samples per prompt (batch / group_size prompts per step)"""
    topk: int = 2
    """K of the teacher top-K reverse KL"""
    jsd_beta: float = 0.5
    """β of JSD(β) (0 = forward KL, 1 = reverse KL)"""
    target_success: float = 0.5
    """success on B that counts as 'learned' for samples_to_target"""
    pass_k: int = 4
    """k of pass@k and coverage@k"""
    eval_every: int = 5
    """steps between exact evaluations in experiments 2 and 3"""

    fast: bool = False
    """small settings for tests (overrides the sizes above)"""

    def apply_fast(self) -> "Config":
        if self.fast:
            self.sd_lrs, self.sd_steps, self.sd_seeds = (0.3, 1.0), 60, 2
            self.cl_steps, self.cl_recover_steps, self.cmp_steps = 120, 120, 120
        return self


# --------------------------------------------------------------------------------------------
# tasks with several correct answers, and their teacher (built on the public API of toy.world)
# --------------------------------------------------------------------------------------------


def make_multi_answer_task(name: str, answer_sets: dict[int, torch.Tensor]) -> Task:
    """A :class:`toy.world.Task` whose prompt p accepts any sequence in ``answer_sets[p]`` ((M_p, T)).

    ``task.answers_KT`` holds each prompt's first answer; the verifier checks all of them.
    """
    prompts = sorted(answer_sets)
    M = max(len(a) for a in answer_sets.values())
    T = answer_sets[prompts[0]].shape[1]
    answers_KMT = torch.full((len(prompts), M, T), -1, dtype=torch.long)  # −1 never matches a token
    for k, p in enumerate(prompts):
        answers_KMT[k, : len(answer_sets[p])] = answer_sets[p]
    row_of = {p: k for k, p in enumerate(prompts)}

    def verifier(prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        rows_B = torch.tensor([row_of[int(p)] for p in prompts_B.tolist()], dtype=torch.long)
        return (tokens_BT.long().unsqueeze(1) == answers_KMT[rows_B]).all(-1).any(-1)  # (B,)

    return Task(name=name, prompts=prompts, answers_KT=answers_KMT[:, 0], verifier=verifier)


def make_multi_answer_teacher(world: World, answer_sets: dict[int, torch.Tensor], weights: dict[int, torch.Tensor],
                              peak: float, noise: float, generator: torch.Generator | None = None) -> TablePolicy:
    """A table teacher that puts weight ``w_a`` on each correct answer a of a prompt.

    At a prefix u of length t, let C be the answers whose first t tokens are u (all of the prompt's
    answers when none is — the teacher steers back after a mistake) and ``m_v = Σ_{a∈C, a_t=v} w_a /
    Σ_{a∈C} w_a`` their mixture over the next token. Then::

        logits_v = noise · N(0, 1) + log(1 + (e^peak − 1) · m_v)

    With one answer this is ``toy.world.make_teacher`` (+peak on the right token); with two answers
    that part at position t, each gets ≈ peak − log 2, so q(a|p) ≈ w_a · (single-answer success).
    Prompts without answers get ``noise · N(0, 1)`` logits.
    """
    table_PSV = torch.randn(world.P, world.num_states, world.V, generator=generator) * noise
    prefixes_ST, pos_S = world.state_prefixes(), world.state_positions()
    for p, answers_MT in answer_sets.items():
        w_M = weights[p].float()
        for s in range(world.num_states):
            t = int(pos_S[s])
            consistent_M = (answers_MT[:, :t] == prefixes_ST[s, :t]).all(-1)
            if not consistent_M.any():
                consistent_M = torch.ones_like(consistent_M)
            mix_V = torch.zeros(world.V).index_add_(0, answers_MT[consistent_M, t], w_M[consistent_M])
            table_PSV[p, s] += torch.log1p(math.expm1(peak) * mix_V / mix_V.sum())
    return TablePolicy(world, table_PSV)


# --------------------------------------------------------------------------------------------
# exact quantities, by enumeration of all V^T sequences in one batched forward pass
# --------------------------------------------------------------------------------------------


def all_sequence_logprobs(policy: Policy, prompts: list[int]) -> torch.Tensor:
    """log π(y|p) for every prompt given and every sequence y (lexicographic), shape (K, N = V^T)."""
    w = policy.world
    seqs_NT = w.sequences()
    N = seqs_NT.shape[0]
    prompts_X = torch.tensor(prompts, dtype=torch.long).repeat_interleave(N)  # (K·N,)
    tokens_XT = seqs_NT.repeat(len(prompts), 1)
    logp_X = losses.token_logprobs(policy.logits(prompts_X, tokens_XT), tokens_XT).sum(-1)
    return logp_X.view(len(prompts), N)


def sequence_ids(tokens_BT: torch.Tensor, V: int) -> torch.Tensor:
    """Lexicographic index n = Σ_t y_t V^(T−1−t) of each sequence, shape (B,)."""
    T = tokens_BT.shape[1]
    return (tokens_BT.long() * V ** torch.arange(T - 1, -1, -1)).sum(-1)


def correct_table(task: Task, world: World) -> torch.Tensor:
    """1[y is correct for p] for the task's prompts and every sequence, bool (K, N)."""
    seqs_NT = world.sequences()
    return torch.stack([task.is_correct(torch.full((len(seqs_NT),), p), seqs_NT) for p in task.prompts])


def kl_from_logprobs(logp_KN: torch.Tensor, logq_KN: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_p Σ_y p(y) (log p(y) − log q(y)), with 0 · log 0 = 0."""
    p_KN = logp_KN.exp()
    return torch.where(p_KN > 0, p_KN * (logp_KN - logq_KN), torch.zeros(())).sum(-1).mean()


def entropy_from_logprobs(logp_KN: torch.Tensor) -> torch.Tensor:
    """Sequence entropy −(1/K) Σ_p Σ_y π(y|p) log π(y|p) in nats."""
    p_KN = logp_KN.exp()
    return -torch.where(p_KN > 0, p_KN * logp_KN, torch.zeros(())).sum(-1).mean()


@dataclass
class Setup:
    """The world, the two tasks, their teachers and the initial student π₀ shared by the experiments."""

    world: World
    task_A: Task
    task_B: Task
    answer_sets_B: dict[int, torch.Tensor]
    teacher_A: TablePolicy
    teacher_B: TablePolicy
    init: MLPPolicy  # π₀, frozen
    correct_A_KN: torch.Tensor
    correct_B_KN: torch.Tensor
    init_logp_A_KN: torch.Tensor
    init_logp_B_KN: torch.Tensor


@torch.no_grad()
def evaluate(policy: Policy, setup: Setup, pass_k: int = 4) -> dict[str, float]:
    """Exact success on A and B, KL(π₀‖π) on A and on B, entropy, pass@k and coverage@k on B."""
    w = setup.world
    logp_A_KN = all_sequence_logprobs(policy, setup.task_A.prompts)
    logp_B_KN = all_sequence_logprobs(policy, setup.task_B.prompts)
    succ_A_K = (logp_A_KN.exp() * setup.correct_A_KN).sum(-1)
    succ_B_K = (logp_B_KN.exp() * setup.correct_B_KN).sum(-1)
    coverage_K = torch.stack([
        (1 - (1 - logp_B_KN[k, sequence_ids(setup.answer_sets_B[p], w.V)].exp()) ** pass_k).mean()
        for k, p in enumerate(setup.task_B.prompts)])
    return {"success_A": float(succ_A_K.mean()), "success_B": float(succ_B_K.mean()),
            "kl_A": float(kl_from_logprobs(setup.init_logp_A_KN, logp_A_KN)),
            "kl_B": float(kl_from_logprobs(setup.init_logp_B_KN, logp_B_KN)),
            "entropy_B": float(entropy_from_logprobs(logp_B_KN)),
            "pass_at_k_B": float((1 - (1 - succ_B_K) ** pass_k).mean()),
            "coverage_at_k_B": float(coverage_K.mean())}


def build_setup(cfg: Config) -> Setup:
    """Tasks A and B, their teachers, and π₀: an MLP student warmed up by exact SFT.

    The warm-up minimises the exact forward KL ``KL(q_A‖π)`` on A prompts plus ``KL(q_B⁰‖π)`` on B
    prompts (the expected SFT loss on teacher samples, without sampling noise), where q_B⁰ is a weak
    B teacher (peak ``init_B_peak``): π₀ is peaked on A's answers as q_A is, and knows B only a little.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    world = World(cfg.V, cfg.T, 2 * cfg.prompts_per_task)
    task_A, single_B = make_tasks(world, 2, g)
    # task B: the first `two_answer_prompts` prompts get a second, different answer, weighted 50/50
    answer_sets, weights = {}, {}
    for k, p in enumerate(single_B.prompts):
        answers = [single_B.answers_KT[k]]
        if k < cfg.two_answer_prompts:
            other = torch.randint(cfg.V, (cfg.T,), generator=g)
            while torch.equal(other, answers[0]):
                other = torch.randint(cfg.V, (cfg.T,), generator=g)
            answers.append(other)
        answer_sets[p] = torch.stack(answers)
        weights[p] = torch.full((len(answers),), 1.0 / len(answers))
    task_B = make_multi_answer_task("B", answer_sets)
    teacher_A = make_teacher(world, [task_A], peak=cfg.teacher_peak, noise=cfg.teacher_noise, generator=g)
    teacher_B = make_multi_answer_teacher(world, answer_sets, weights, cfg.teacher_peak, cfg.teacher_noise, g)
    for teacher in (teacher_A, teacher_B):
        teacher.requires_grad_(False)

    prior_B = make_multi_answer_teacher(world, answer_sets, weights, cfg.init_B_peak, cfg.teacher_noise, g)

    student = make_student(world, "mlp", g, hidden=cfg.hidden, context=cfg.context)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.warmup_lr)
    with torch.no_grad():
        target_logp_KN = torch.cat([all_sequence_logprobs(teacher_A, task_A.prompts),
                                    all_sequence_logprobs(prior_B, task_B.prompts)])
    prompts_AB = task_A.prompts + task_B.prompts
    for _ in range(cfg.warmup_steps):
        loss = kl_from_logprobs(target_logp_KN, all_sequence_logprobs(student, prompts_AB))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    init = copy_policy(student)
    with torch.no_grad():
        init_logp_A, init_logp_B = (all_sequence_logprobs(init, t.prompts) for t in (task_A, task_B))
    return Setup(world, task_A, task_B, answer_sets, teacher_A, teacher_B, init,
                 correct_table(task_A, world), correct_table(task_B, world), init_logp_A, init_logp_B)


# --------------------------------------------------------------------------------------------
# losses (from opd_mini.losses, fed as the transformer loop feeds them) and training helpers
# --------------------------------------------------------------------------------------------


def loss_from_logits(method: str, student_logits_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                     teacher_logits_BTV: torch.Tensor | None = None, *, rewards_B: torch.Tensor | None = None,
                     group_size: int = 8, topk: int = 2, jsd_beta: float = 0.5,
                     num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one method on a batch of sequences (B, T), from logits; every loss is a per-token
    mean over the B·T tokens (or a sum over sequences of per-sequence means with ``num_tokens=T``).

    * ``sft`` (also ``sft_fresh``/``sft_fixed``): ``−(1/N) Σ log π(y_t|c_t)`` on the given tokens.
    * ``grpo``: rewards R (B,), group-normalised advantages over consecutive groups of
      ``group_size``, then the policy-gradient loss ``−(1/N) Σ_t A · ρ_t``.
    * ``opd_sampled``: advantage ``A_t = −(log π(y_t|c_t) − log q(y_t|c_t))`` (γ = 0).
    * ``opd_full``: ``Σ_v π(v|c_t)(log π(v|c_t) − log q(v|c_t))`` at each visited prefix.
    * ``opd_topk``: the same inside the teacher's top-K tokens ∪ {y_t}, both renormalised there
      (Fu et al. 2026 §4.1; with the sampled token in the support, mass the student puts on a token
      the teacher dislikes is penalised even outside the top-K).
    * ``forward_kl``: ``Σ_v q(v|c_t)(log q(v|c_t) − log π(v|c_t))`` at each visited prefix.
    * ``jsd``: generalized JSD(β) with ``m = β q + (1 − β) π``.

    Shapes: student_logits_BTV (B, T, V) with grad; tokens_BT (B, T); teacher_logits_BTV (B, T, V).
    """
    mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
    student_logp_BT = losses.token_logprobs(student_logits_BTV, tokens_BT)
    if method in ("sft", "sft_fresh", "sft_fixed"):
        return losses.sft_cross_entropy(student_logp_BT, mask_BT, num_tokens=num_tokens)
    if method == "grpo":
        advantages_B = losses.grpo_advantages(rewards_B, group_size)
        return losses.policy_gradient(student_logp_BT, advantages_B, mask_BT, num_tokens=num_tokens)
    if method == "opd_sampled":
        teacher_logp_BT = losses.token_logprobs(teacher_logits_BTV, tokens_BT)
        return losses.reverse_kl_sampled_token(student_logp_BT, teacher_logp_BT, mask_BT, num_tokens=num_tokens)
    teacher_logp_BTV = torch.log_softmax(teacher_logits_BTV.float(), dim=-1)
    if method == "opd_full":
        return losses.reverse_kl_full(student_logits_BTV, teacher_logp_BTV, mask_BT, num_tokens=num_tokens)
    if method == "opd_topk":  # support: the teacher's top-K tokens ∪ the student's sampled token
        topk_logp_BTK, topk_ids_BTK = teacher_logp_BTV.topk(topk, dim=-1)
        teacher_sampled_logp_BT = teacher_logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
        return losses.reverse_kl_topk(student_logits_BTV, topk_ids_BTK, topk_logp_BTK, mask_BT,
                                      sampled_ids_BT=tokens_BT, teacher_sampled_logp_BT=teacher_sampled_logp_BT,
                                      num_tokens=num_tokens)
    if method == "forward_kl":
        return losses.forward_kl_full(student_logits_BTV, teacher_logp_BTV, mask_BT, num_tokens=num_tokens)
    if method == "jsd":
        return losses.generalized_jsd(student_logits_BTV, teacher_logp_BTV, mask_BT, beta=jsd_beta,
                                      num_tokens=num_tokens)
    raise ValueError(f"unknown method {method!r}")


def method_loss(method: str, student: Policy, teacher: Policy, prompts_B: torch.Tensor, tokens_BT: torch.Tensor, *,
                task: Task | None = None, num_tokens: float | None = None, **kwargs) -> tuple[torch.Tensor, dict]:
    """:func:`loss_from_logits` on a batch, as the transformer loop computes it: the student's logits
    with grad, the teacher's logits without, and for ``grpo`` the rewards ``1[y correct]`` of ``task``."""
    student_logits_BTV = student.logits(prompts_B, tokens_BT)
    teacher_logits_BTV = rewards_B = None
    if method == "grpo":
        rewards_B = task.is_correct(prompts_B, tokens_BT).float()
    elif not method.startswith("sft"):
        with torch.no_grad():
            teacher_logits_BTV = teacher.logits(prompts_B, tokens_BT)
    return loss_from_logits(method, student_logits_BTV, tokens_BT, teacher_logits_BTV, rewards_B=rewards_B,
                            num_tokens=num_tokens, **kwargs)


def trainable_copy(policy: Policy) -> Policy:
    """A deep copy of ``policy`` with every parameter trainable (the student starting at π₀)."""
    student = copy.deepcopy(policy)
    student.requires_grad_(True)
    return student


def make_optimizer(name: str, policy: Policy, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(policy.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(policy.parameters(), lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def random_prompts(prompts: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """n prompts drawn uniformly (with replacement) from ``prompts``, shape (n,)."""
    return torch.tensor(prompts, dtype=torch.long)[torch.randint(len(prompts), (n,), generator=generator)]


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


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# the exact gradient at π₀ (mean and variance of one sample's gradient, by enumeration)
# --------------------------------------------------------------------------------------------


def per_sequence_gradients(method: str, student: Policy, teacher: Policy, prompts_N: torch.Tensor,
                           tokens_NT: torch.Tensor) -> torch.Tensor:
    """``g_n = ∇_θ ℓ(y_n)`` for each sequence, where ℓ(y) is the method's loss on the single sequence y
    (a per-token mean over its T tokens), shape (N, D) over the student's trainable parameters.

    Two passes of autograd: (1) the batch loss with ``num_tokens=T`` is ``Σ_n ℓ(y_n)`` and each
    ℓ(y_n) depends only on its own logits, so its gradient with respect to the logits holds each
    sequence's own ``δ_n = ∂ℓ(y_n)/∂logits_n`` (N, T, V); (2) one batched vector-Jacobian product pulls
    every δ_n back to the parameters, ``g_n = J_nᵀ δ_n`` (``is_grads_batched``).
    """
    N, T = tokens_NT.shape
    params = [p for p in student.parameters() if p.requires_grad]
    logits_NTV = student.logits(prompts_N, tokens_NT)
    with torch.no_grad():
        teacher_logits_NTV = teacher.logits(prompts_N, tokens_NT)
    leaf_NTV = logits_NTV.detach().requires_grad_(True)
    loss, _ = loss_from_logits(method, leaf_NTV, tokens_NT, teacher_logits_NTV, num_tokens=T)
    (delta_NTV,) = torch.autograd.grad(loss, leaf_NTV)
    one_hot_rows_NNTV = torch.eye(N).view(N, N, 1, 1) * delta_NTV.unsqueeze(0)  # batch n: δ_n in row n, 0 elsewhere
    grads = torch.autograd.grad(logits_NTV, params, grad_outputs=one_hot_rows_NNTV, is_grads_batched=True)
    return torch.cat([g.reshape(N, -1) for g in grads], dim=1)


def expected_gradient(method: str, student: Policy, teacher: Policy, prompts: list[int], *,
                      sampler: Policy | None = None) -> dict[str, float]:
    """Mean and variance of one sequence's gradient of a method's loss, exactly::

        g(y) = ∇_θ ℓ(y),      mean = E_{p, y∼sampler(·|p)} g(y),      variance = E ‖g(y) − mean‖²

    The sampler is the student for on-policy methods and the data distribution for SFT. Every
    (prompt, sequence) pair is enumerated with weight ``sampler(y|p)/|prompts|``.
    Returns ``mean_norm`` = ‖mean‖, ``mean_max_abs`` = ‖mean‖_∞ and ``variance`` (float64 sums).
    """
    sampler = student if sampler is None else sampler
    w = student.world
    with torch.no_grad():
        weight_X = all_sequence_logprobs(sampler, prompts).double().exp().reshape(-1) / len(prompts)
    prompts_X = torch.tensor(prompts, dtype=torch.long).repeat_interleave(w.num_sequences)
    tokens_XT = w.sequences().repeat(len(prompts), 1)
    g_XD = per_sequence_gradients(method, student, teacher, prompts_X, tokens_XT).double()
    mean_D = weight_X @ g_XD
    second_moment = float(weight_X @ g_XD.pow(2).sum(1))
    return {"mean_norm": float(mean_D.norm()), "mean_max_abs": float(mean_D.abs().max()),
            "variance": max(second_moment - float(mean_D.pow(2).sum()), 0.0)}


def perturbed_copy(policy: Policy, scale: float, generator: torch.Generator) -> Policy:
    """A trainable copy of ``policy`` with ``scale · N(0, 1)`` added to every parameter."""
    student = trainable_copy(policy)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return student


def gradient_check(setup: Setup, perturbation: float = 0.1, seed: int = 0) -> list[dict]:
    """Exact gradient moments on task A with π₀ as the teacher, for SFT on samples of π₀ and for OPD,
    at π = π₀ and at a perturbed student π₀ + ε (where OPD's mean gradient is a restoring force and
    SFT's equals ∇KL(π₀‖π)/T)."""
    rows = []
    points = {"init": trainable_copy(setup.init),
              "perturbed": perturbed_copy(setup.init, perturbation, torch.Generator().manual_seed(seed))}
    for point, student in points.items():
        for method in ("sft_fresh", "opd_sampled", "opd_full"):
            sampler = setup.init if method == "sft_fresh" else student
            rows.append({"point": point, "method": method,
                         **expected_gradient(method, student, setup.init, setup.task_A.prompts, sampler=sampler)})
    return rows


# --------------------------------------------------------------------------------------------
# experiment 1: self-distillation drift
# --------------------------------------------------------------------------------------------


def run_self_distill(cfg: Config, setup: Setup, progress: bool = True) -> list[dict]:
    """Train copies of π₀ on task A with π₀ as the teacher; rows of exact KL(π₀‖π) and success_A.

    Seed s uses the same sampling generator for every (method, lr, schedule) (common random numbers).
    """
    prompts_A = setup.task_A.prompts
    runs = [(method, lr, schedule, seed)
            for method in SELF_DISTILL_METHODS for lr in cfg.sd_lrs
            for schedule in (("constant", "linear") if method.startswith("sft") else ("constant",))
            for seed in range(cfg.sd_seeds)]
    rows = []
    for method, lr, schedule, seed in tqdm(runs, desc="self-distillation", disable=not progress, leave=False):
        student = trainable_copy(setup.init)
        opt = make_optimizer(cfg.sd_optimizer, student, lr)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 100 + seed)
        if method == "sft_fixed":  # one finite data set of π₀'s samples, reused every step
            fixed_prompts_M = random_prompts(prompts_A, cfg.sd_fixed_size, gen)
            fixed_tokens_MT = sample(setup.init, fixed_prompts_M, gen)
        for step in range(cfg.sd_steps + 1):
            if step % cfg.sd_eval_every == 0 or step == cfg.sd_steps:
                ev = evaluate(student, setup)
                rows.append({"method": method, "lr": lr, "schedule": schedule, "seed": seed, "step": step,
                             "kl_to_init": ev["kl_A"], "success": ev["success_A"]})
            if step == cfg.sd_steps:
                break
            for group in opt.param_groups:  # linear decay: lr_t = lr · (1 − t / steps)
                group["lr"] = lr * (1 - step / cfg.sd_steps) if schedule == "linear" else lr
            if method == "sft_fixed":
                idx_B = torch.randint(cfg.sd_fixed_size, (cfg.sd_batch,), generator=gen)
                prompts_B, tokens_BT = fixed_prompts_M[idx_B], fixed_tokens_MT[idx_B]
            else:
                prompts_B = random_prompts(prompts_A, cfg.sd_batch, gen)
                tokens_BT = sample(setup.init if method == "sft_fresh" else student, prompts_B, gen)
            loss, _ = method_loss(method, student, setup.init, prompts_B, tokens_BT)
            optimizer_step(opt, loss)
    return rows


# --------------------------------------------------------------------------------------------
# experiment 2: continual learning
# --------------------------------------------------------------------------------------------


def run_continual(cfg: Config, setup: Setup, progress: bool = True) -> list[dict]:
    """Phase ``learn_B``: from π₀, learn B by SFT on teacher-B samples, pure (``sft``) or with a fraction
    ``cl_replay_frac`` of each batch replaced by π₀'s own samples on A prompts (``sft_replay``).
    Phase ``recover_A``: from the end of phase 1 (checkpoint π_B), OPD with the earlier checkpoint π₀
    as the teacher on A prompts (``+opd_A``), or on A prompts with teacher π₀ and B prompts with teacher
    π_B, half of each batch (``+opd_AB``; at the start the B half has zero gradient, like π₀ on A in
    experiment 1, and it pulls B back if it drifts). Steps count on across the two phases.
    """
    rows = []
    n_replay = int(round(cfg.cl_replay_frac * cfg.batch))
    total = cfg.cl_steps + cfg.cl_recover_steps

    def record(student, phase, method, step):
        ev = evaluate(student, setup)
        rows.append({"phase": phase, "method": method, "step": step,
                     "success_A": ev["success_A"], "success_B": ev["success_B"]})

    for learn in tqdm(("sft", "sft_replay"), desc="continual", disable=not progress, leave=False):
        student = trainable_copy(setup.init)
        opt = make_optimizer(cfg.optimizer, student, cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 200)
        for step in range(cfg.cl_steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.cl_steps:
                record(student, "learn_B", learn, step)
            if step == cfg.cl_steps:
                break
            n_b = cfg.batch - (n_replay if learn == "sft_replay" else 0)
            prompts_B = random_prompts(setup.task_B.prompts, n_b, gen)
            tokens_BT = sample(setup.teacher_B, prompts_B, gen)
            if learn == "sft_replay":
                replay_prompts = random_prompts(setup.task_A.prompts, n_replay, gen)
                prompts_B = torch.cat([prompts_B, replay_prompts])
                tokens_BT = torch.cat([tokens_BT, sample(setup.init, replay_prompts, gen)])
            loss, _ = method_loss("sft", student, setup.teacher_B, prompts_B, tokens_BT)
            optimizer_step(opt, loss)

        checkpoint_B = copy_policy(student)  # π_B, the teacher of B prompts in +opd_AB
        for recover in ("opd_A", "opd_AB"):
            method = f"{learn}+{recover}"
            student = trainable_copy(checkpoint_B)
            opt = make_optimizer(cfg.optimizer, student, cfg.lr)  # a fresh optimizer for the new phase
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + 250)
            for step in range(cfg.cl_steps, total + 1):
                if step % cfg.eval_every == 0 or step in (cfg.cl_steps, total):
                    record(student, "recover_A", method, step)
                if step == total:
                    break
                n_a = cfg.batch if recover == "opd_A" else cfg.batch // 2
                parts = [(setup.task_A.prompts, n_a, setup.init), (setup.task_B.prompts, cfg.batch - n_a, checkpoint_B)]
                loss = 0.0
                for prompts, n, teacher in parts:  # per-token mean over the whole batch: num_tokens = batch · T
                    if n == 0:
                        continue
                    prompts_B = random_prompts(prompts, n, gen)
                    tokens_BT = sample(student, prompts_B, gen)
                    part_loss, _ = method_loss("opd_sampled", student, teacher, prompts_B, tokens_BT,
                                               num_tokens=cfg.batch * setup.world.T)
                    loss = loss + part_loss
                optimizer_step(opt, loss)
    return rows


# --------------------------------------------------------------------------------------------
# experiment 3: SFT vs RL vs OPD on a new task
# --------------------------------------------------------------------------------------------


def run_comparison(cfg: Config, setup: Setup, progress: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Learn B from π₀ with every method at ``batch`` samples per step (teacher samples for SFT).

    success_B is checked exactly after every step, so ``samples_to_target`` has a resolution of one
    batch; at that moment the retention of A and KL(π₀‖π) on B are also kept (``*_at_target``: the
    comparison at matched new-task success that RL's Razor makes). Returns (table rows in the JSON
    schema, per-method diagnostics, learning curves every ``eval_every`` steps).
    """
    base = evaluate(setup.init, setup, cfg.pass_k)
    table, details, curves = [], [], []
    for method in tqdm(NEW_TASK_METHODS, desc="comparison", disable=not progress, leave=False):
        student = trainable_copy(setup.init)
        opt = make_optimizer(cfg.optimizer, student, cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 300)
        at_target = None
        for step in range(cfg.cmp_steps + 1):
            if at_target is None:
                with torch.no_grad():
                    logp_B_KN = all_sequence_logprobs(student, setup.task_B.prompts)
                if float((logp_B_KN.exp() * setup.correct_B_KN).sum(-1).mean()) >= cfg.target_success:
                    at_target = {"samples": step * cfg.batch, **evaluate(student, setup, cfg.pass_k)}
            if step % cfg.eval_every == 0 or step == cfg.cmp_steps:
                ev = evaluate(student, setup, cfg.pass_k)
                curves.append({"method": method, "step": step, "samples": step * cfg.batch, **ev})
            if step == cfg.cmp_steps:
                break
            if method == "grpo":  # batch / group_size prompts, group_size samples each
                prompts_B = random_prompts(setup.task_B.prompts, cfg.batch // cfg.group_size, gen)
                prompts_B = prompts_B.repeat_interleave(cfg.group_size)
            else:
                prompts_B = random_prompts(setup.task_B.prompts, cfg.batch, gen)
            tokens_BT = sample(student if method in ON_POLICY else setup.teacher_B, prompts_B, gen)
            loss, _ = method_loss(method, student, setup.teacher_B, prompts_B, tokens_BT, task=setup.task_B,
                                  group_size=cfg.group_size, topk=cfg.topk, jsd_beta=cfg.jsd_beta)
            optimizer_step(opt, loss)
        table.append({"method": method, "samples_to_target": None if at_target is None else at_target["samples"],
                      "retention": ev["success_A"] / base["success_A"], "entropy": ev["entropy_B"],
                      "pass_at_k": ev["pass_at_k_B"], "kl_to_init": ev["kl_B"]})
        nan = float("nan")
        details.append({"method": method, **ev,
                        "retention_at_target": nan if at_target is None else at_target["success_A"] / base["success_A"],
                        "kl_B_at_target": nan if at_target is None else at_target["kl_B"],
                        "entropy_B_at_target": nan if at_target is None else at_target["entropy_B"]})
    return table, details, curves


# --------------------------------------------------------------------------------------------
# tables, figures and the run
# --------------------------------------------------------------------------------------------


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarise_self_distill(rows: list[dict], cfg: Config) -> list[dict]:
    """Per (method, lr, schedule): final KL (mean over seeds), Spearman of the seed-mean KL with the
    step, and the mean change of success over the second half of the run (mean over seeds)."""
    summary = []
    keys = sorted({(r["method"], r["lr"], r["schedule"]) for r in rows},
                  key=lambda k: (SELF_DISTILL_METHODS.index(k[0]), k[1], k[2]))
    for method, lr, schedule in keys:
        sel = [r for r in rows if (r["method"], r["lr"], r["schedule"]) == (method, lr, schedule)]
        steps = sorted({r["step"] for r in sel})
        kl_mean = [_mean(r["kl_to_init"] for r in sel if r["step"] == s) for s in steps]
        succ0 = _mean(r["success"] for r in sel if r["step"] == 0)
        late = [r["success"] - succ0 for r in sel if r["step"] >= steps[-1] / 2 and r["step"] > 0]
        summary.append({"method": method, "lr": lr, "schedule": schedule, "kl_final": kl_mean[-1],
                        "kl_max": max(kl_mean), "kl_mid": kl_mean[len(kl_mean) // 2],
                        "spearman_kl_step": spearman(steps, kl_mean),
                        "success_change_late": _mean(late)})
    return summary


def print_tables(cfg: Config, setup: Setup, grad_rows, sd_summary, cl_rows, table, details, base) -> None:
    print(f"\nWorld V={cfg.V}, T={cfg.T}, tasks A and B with {cfg.prompts_per_task} prompts each "
          f"({cfg.two_answer_prompts} B prompts with two correct answers); student MLP hidden={cfg.hidden}, "
          f"context={cfg.context}")
    print(f"π₀: success_A={base['success_A']:.3f} (teacher_A {float(evaluate(setup.teacher_A, setup)['success_A']):.3f}), "
          f"success_B={base['success_B']:.3f} (teacher_B {float(evaluate(setup.teacher_B, setup)['success_B']):.3f})")

    print("\n[1a] Exact moments of one sample's gradient g(y) on A, teacher π₀, by enumeration: "
          "mean E g and variance E‖g − E g‖², at π = π₀ and at π₀ + 0.1·N(0, 1)")
    print(f"{'point':>9} {'method':>12} {'‖E g‖':>11} {'max|E g|':>11} {'variance':>11}")
    for r in grad_rows:
        print(f"{r['point']:>9} {r['method']:>12} {r['mean_norm']:>11.3e} {r['mean_max_abs']:>11.3e} {r['variance']:>11.3e}")

    print(f"\n[1b] Self-distillation on A, teacher π₀ ({cfg.sd_optimizer}, batch {cfg.sd_batch}, {cfg.sd_steps} steps, "
          f"{cfg.sd_seeds} seeds; fixed set {cfg.sd_fixed_size} samples): exact KL(π₀‖π), mean over seeds")
    print(f"{'method':>12} {'lr':>5} {'schedule':>9} {'KL mid':>10} {'KL final':>10} {'KL max':>10} "
          f"{'ρ(KL,step)':>10} {'Δsuccess late':>13}")
    for s in sd_summary:
        print(f"{s['method']:>12} {s['lr']:>5g} {s['schedule']:>9} {s['kl_mid']:>10.2e} {s['kl_final']:>10.2e} "
              f"{s['kl_max']:>10.2e} {s['spearman_kl_step']:>10.3f} {s['success_change_late']:>+13.4f}")

    print(f"\n[2] Continual learning ({cfg.optimizer}, lr {cfg.lr}): learn B by SFT for {cfg.cl_steps} steps, then "
          f"{cfg.cl_recover_steps} steps of OPD with teacher π₀ on A prompts (+opd_A), or half A prompts (teacher π₀) "
          f"and half B prompts (teacher π_B, the checkpoint after B) (+opd_AB)")
    print(f"{'method':>17} {'A: π₀':>7} {'A: after B':>10} {'A: recovered':>12} {'recovery':>9} "
          f"{'B: π₀':>7} {'B: after B':>10} {'B: recovered':>12} | {'steps→⅔':>7} {'B then':>6}")
    for c in continual_summary(cl_rows, cfg):
        two_thirds = "-" if c["steps_to_two_thirds"] is None else str(c["steps_to_two_thirds"])
        b_then = "-" if c["B_at_two_thirds"] is None else f"{c['B_at_two_thirds']:.3f}"
        print(f"{c['method']:>17} {c['A_init']:>7.3f} {c['A_after_B']:>10.3f} {c['A_after_recovery']:>12.3f} "
              f"{c['recovered_fraction']:>9.2f} {c['B_init']:>7.3f} {c['B_after_B']:>10.3f} {c['B_after_recovery']:>12.3f} | "
              f"{two_thirds:>7} {b_then:>6}")
    print("(recovery = (A recovered − A after B) / (A π₀ − A after B); steps→⅔: recovery steps until A has "
          "regained two thirds of its drop, B then: success_B at that moment)")

    print(f"\n[3] Learning B from π₀, {cfg.cmp_steps} steps × {cfg.batch} samples ({cfg.optimizer}, lr {cfg.lr}); "
          f"target success_B ≥ {cfg.target_success}; k = {cfg.pass_k}")
    print(f"{'method':>12} {'samples→tgt':>11} {'success_B':>9} {'retention':>9} {'success_A':>9} "
          f"{'H(B) nats':>9} {'pass@k':>7} {'cover@k':>7} {'KL(π₀‖π) B':>11} {'KL A':>7} | "
          f"{'ret@tgt':>7} {'KL B@tgt':>8}")
    t_ev = evaluate(setup.teacher_B, setup, cfg.pass_k)
    print(f"{'(teacher_B)':>12} {'':>11} {t_ev['success_B']:>9.3f} {'':>9} {'':>9} {t_ev['entropy_B']:>9.3f} "
          f"{t_ev['pass_at_k_B']:>7.3f} {t_ev['coverage_at_k_B']:>7.3f} {t_ev['kl_B']:>11.3f}")
    print(f"{'(π₀)':>12} {'':>11} {base['success_B']:>9.3f} {1.0:>9.3f} {base['success_A']:>9.3f} "
          f"{base['entropy_B']:>9.3f} {base['pass_at_k_B']:>7.3f} {base['coverage_at_k_B']:>7.3f} {0.0:>11.3f}")
    for row, d in zip(table, details):
        stt = "never" if row["samples_to_target"] is None else str(row["samples_to_target"])
        print(f"{row['method']:>12} {stt:>11} {d['success_B']:>9.3f} {row['retention']:>9.3f} {d['success_A']:>9.3f} "
              f"{row['entropy']:>9.3f} {row['pass_at_k']:>7.3f} {d['coverage_at_k_B']:>7.3f} "
              f"{row['kl_to_init']:>11.3f} {d['kl_A']:>7.3f} | {d['retention_at_target']:>7.3f} "
              f"{d['kl_B_at_target']:>8.3f}")
    for when, kl_key, ret_key in (("at the end", None, None), ("at the target", "kl_B_at_target", "retention_at_target")):
        kl = [r["kl_to_init"] for r in table] if kl_key is None else [d[kl_key] for d in details]
        forget = [1 - r["retention"] for r in table] if ret_key is None else [1 - d[ret_key] for d in details]
        for label, skip in (("all methods", ()), ("without grpo", ("grpo",))):
            ok = [i for i, r in enumerate(table)
                  if math.isfinite(kl[i]) and math.isfinite(forget[i]) and r["method"] not in skip]
            print(f"forgetting (1 − retention) vs KL(π₀‖π) on B, {when}, {label}: Spearman "
                  f"{spearman([forget[i] for i in ok], [kl[i] for i in ok]):.3f}, Pearson "
                  f"{pearson([forget[i] for i in ok], [kl[i] for i in ok]):.3f} ({len(ok)} methods)")


def continual_summary(rows: list[dict], cfg: Config) -> list[dict]:
    """Per lineage (learn method + recovery method): success on A and B at π₀, after learning B, and
    after the recovery; ``recovered_fraction = (A_recovered − A_after_B) / (A_π₀ − A_after_B)``."""
    out = []
    end_B, end = cfg.cl_steps, cfg.cl_steps + cfg.cl_recover_steps
    for method in dict.fromkeys(r["method"] for r in rows if r["phase"] == "recover_A"):
        learn = method.split("+")[0]
        phase1 = {r["step"]: r for r in rows if r["method"] == learn}
        phase2 = {r["step"]: r for r in rows if r["method"] == method}
        a0, ab, ar = phase1[0]["success_A"], phase1[end_B]["success_A"], phase2[end]["success_A"]
        drop = a0 - ab
        # the first evaluation at which A has recovered two thirds of its drop, and B at that moment
        first = next((r for _, r in sorted(phase2.items()) if drop > 0 and r["success_A"] - ab >= 2 / 3 * drop), None)
        out.append({"method": method, "A_init": a0, "A_after_B": ab, "A_after_recovery": ar,
                    "recovered_fraction": (ar - ab) / drop if drop > 0 else float("nan"),
                    "B_init": phase1[0]["success_B"], "B_after_B": phase1[end_B]["success_B"],
                    "B_after_recovery": phase2[end]["success_B"],
                    "steps_to_two_thirds": None if first is None else first["step"] - end_B,
                    "B_at_two_thirds": None if first is None else first["success_B"]})
    return out


def plot(cfg: Config, sd_rows, cl_rows, curves, table, details, base, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(SELF_DISTILL_METHODS)}
    widths = {lr: 0.8 + 1.2 * i for i, lr in enumerate(cfg.sd_lrs)}
    for key, ax in (("kl_to_init", axes[0, 0]), ("success", axes[0, 1])):
        for method, lr, schedule in sorted({(r["method"], r["lr"], r["schedule"]) for r in sd_rows}):
            sel = [r for r in sd_rows if (r["method"], r["lr"], r["schedule"]) == (method, lr, schedule)]
            steps = sorted({r["step"] for r in sel})
            ys = [_mean(r[key] for r in sel if r["step"] == s) for s in steps]
            ax.plot(steps, ys, color=colors[method], lw=widths[lr], ls="-" if schedule == "constant" else "--")
        handles = [Line2D([], [], color=c, label=m) for m, c in colors.items()]
        handles += [Line2D([], [], color="gray", lw=w, label=f"lr={lr:g}") for lr, w in widths.items()]
        handles += [Line2D([], [], color="gray", ls="--", label="linear decay")]
        ax.legend(handles=handles, fontsize=7, ncol=2)
    axes[0, 0].set_yscale("symlog", linthresh=1e-4)
    axes[0, 0].set(xlabel="step", ylabel="exact KL(π₀‖π) on A (symlog)",
                   title="[1] self-distillation, teacher π₀: drift (mean over seeds)")
    axes[0, 1].set(xlabel="step", ylabel="exact success on A", title="[1] task success (mean over seeds)")

    ax = axes[0, 2]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in cl_rows)):
        sel = [r for r in cl_rows if r["method"] == method]
        ax.plot([r["step"] for r in sel], [r["success_A"] for r in sel], color=f"C{i}", label=f"{method}: A")
        ax.plot([r["step"] for r in sel], [r["success_B"] for r in sel], color=f"C{i}", ls="--", label=f"{method}: B")
    ax.axvline(cfg.cl_steps, color="k", lw=0.8)
    ax.set(xlabel=f"step (SFT on B until {cfg.cl_steps}, then OPD recovery)", ylabel="exact success (A solid, B dashed)",
           title="[2] continual: learn B by SFT, recover A by OPD")
    ax.legend(fontsize=6, ncol=2)

    ax = axes[1, 0]
    for i, method in enumerate(NEW_TASK_METHODS):
        sel = [c for c in curves if c["method"] == method]
        ax.plot([c["samples"] for c in sel], [c["success_B"] for c in sel], color=f"C{i}", label=method)
    ax.axhline(cfg.target_success, color="k", lw=0.6, ls=":")
    ax.set(xlabel="samples", ylabel="exact success on B", title="[3] learning the new task B")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    for i, (row, d) in enumerate(zip(table, details)):
        ax.scatter(row["kl_to_init"], 1 - row["retention"], color=f"C{i}")
        ax.annotate(row["method"], (row["kl_to_init"], 1 - row["retention"]), fontsize=8)
        ax.scatter(d["kl_B_at_target"], 1 - d["retention_at_target"], facecolors="none", edgecolors=f"C{i}")
    ax.set(xlabel="KL(π₀‖π) on B", ylabel="forgetting: 1 − retention of A",
           title="[3] RL's Razor (filled: end, hollow: at target success)")

    ax = axes[1, 2]
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], [r["entropy"] for r in table], width=0.4, label="entropy on B (nats)")
    ax.bar([i + 0.2 for i in x], [d["coverage_at_k_B"] for d in details], width=0.4, label=f"coverage@{cfg.pass_k} on B")
    ax.set_xticks(list(x), [r["method"] for r in table], rotation=30, fontsize=8)
    ax.set(title="[3] diversity")
    ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run(cfg: Config, out: str, progress: bool = True) -> dict:
    """Run the three experiments; write ``out/forgetting.json``, ``out/forgetting_details.json`` and
    ``out/forgetting.png``.

    ``forgetting.json``::

        {"self_distill": [{"method", "lr", "schedule", "seed", "step", "kl_to_init", "success"}...],
         "continual":    [{"phase", "method", "step", "success_A", "success_B"}...],
         "comparison":   [{"method", "samples_to_target", "retention", "entropy", "pass_at_k", "kl_to_init"}...],
         "config":       {...}}

    ``samples_to_target`` is null when the target was never reached.
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading costs more than it saves, and the CPU is shared
    try:
        os.makedirs(out, exist_ok=True)
        clock = {}
        tic = time.perf_counter()
        setup = build_setup(cfg)
        base = evaluate(setup.init, setup, cfg.pass_k)
        grad_rows = gradient_check(setup)
        clock["setup_and_gradient_check"], tic = time.perf_counter() - tic, time.perf_counter()
        sd_rows = run_self_distill(cfg, setup, progress)
        clock["self_distill"], tic = time.perf_counter() - tic, time.perf_counter()
        cl_rows = run_continual(cfg, setup, progress)
        clock["continual"], tic = time.perf_counter() - tic, time.perf_counter()
        table, details, curves = run_comparison(cfg, setup, progress)
        clock["comparison"] = time.perf_counter() - tic
    finally:
        torch.set_num_threads(threads)

    sd_summary = summarise_self_distill(sd_rows, cfg)
    print_tables(cfg, setup, grad_rows, sd_summary, cl_rows, table, details, base)
    fig_path = os.path.join(out, "forgetting.png")
    plot(cfg, sd_rows, cl_rows, curves, table, details, base, fig_path)
    wall = time.perf_counter() - start

    config = {**asdict(cfg), "sd_lrs": list(cfg.sd_lrs), "student": "MLPPolicy", "wall_time_s": wall,
              "wall_time_parts_s": clock,
              "metrics": {"kl_to_init": "exact KL(π₀‖π) over the task's prompts (A in self_distill, B in comparison)",
                          "success": "exact probability of a correct answer, mean over the task's prompts",
                          "retention": "success_A(final) / success_A(π₀)",
                          "entropy": "exact sequence entropy on B prompts, nats",
                          "pass_at_k": "mean over B prompts of 1 − (1 − success_p)^k, k = pass_k",
                          "samples_to_target": "student samples (teacher samples for sft) until success_B ≥ target_success"}}
    result = {"self_distill": sd_rows, "continual": cl_rows, "comparison": table, "config": config}
    with open(os.path.join(out, "forgetting.json"), "w") as f:
        json.dump(json_safe(result), f, indent=1)
    details_out = {"gradient_at_init": grad_rows, "self_distill_summary": sd_summary,
                   "continual_summary": continual_summary(cl_rows, cfg), "comparison_details": details,
                   "comparison_curves": curves, "init": base}
    with open(os.path.join(out, "forgetting_details.json"), "w") as f:
        json.dump(json_safe(details_out), f, indent=1)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in clock.items())
    print(f"\nwrote {os.path.join(out, 'forgetting.json')}, forgetting_details.json and {fig_path}; "
          f"wall time {wall:.1f} s ({parts})")
    return {**result, "details": details_out, "figures": [fig_path]}


# --------------------------------------------------------------------------------------------
# command line (the contract of toy/__main__.py)
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Config()
    parser.add_argument("--fast", action="store_true", help="small settings (tests)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of tasks, teachers, π₀ and sampling")
    parser.add_argument("--hidden", type=int, default=d.hidden, help="hidden width of the MLP student")
    parser.add_argument("--sd-lrs", type=float, nargs="+", default=list(d.sd_lrs), help="self-distillation learning rates")
    parser.add_argument("--sd-optimizer", choices=["sgd", "adam"], default=d.sd_optimizer)
    parser.add_argument("--sd-steps", type=int, default=d.sd_steps, help="steps per self-distillation run")
    parser.add_argument("--sd-seeds", type=int, default=d.sd_seeds, help="seeds per self-distillation setting")
    parser.add_argument("--sd-fixed-size", type=int, default=d.sd_fixed_size, help="samples in sft_fixed's data set")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer, help="optimizer of experiments 2-3")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of experiments 2-3")
    parser.add_argument("--batch", type=int, default=d.batch, help="samples per step in experiments 2-3")
    parser.add_argument("--cl-steps", type=int, default=d.cl_steps, help="steps of learning B by SFT")
    parser.add_argument("--cl-recover-steps", type=int, default=d.cl_recover_steps, help="steps of OPD recovery of A")
    parser.add_argument("--cmp-steps", type=int, default=d.cmp_steps, help="steps per method in the comparison")
    parser.add_argument("--target-success", type=float, default=d.target_success, help="target success on B")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> Config:
    return toy.config_from_args(Config, args)


def main(args: argparse.Namespace) -> dict:
    return run(config_from_args(args), args.out, progress=not getattr(args, "no_progress", False))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/toy")
    add_arguments(p)
    main(p.parse_args())
