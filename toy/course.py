"""Practical OPD in the exact toy world: diversity (pass@k), the OPD + reward hybrid, cost, and the fixes.

Four experiments, each exact wherever the world can be enumerated (V^T sequences per prompt):

1. **Diversity, measured properly.** Exact pass@k against k (1 … 64) for the base model π₀, the teacher
   and every trained student (SFT, GRPO, the OPD variants, on-policy forward KL and the OPD + reward
   hybrid), over several seeds. The question (Yue et al. 2025 for RL): does training sharpen the
   distribution so much that the base model, with enough samples, solves more prompts? And does OPD
   narrow too?
2. **Hybrid.** ``opd_grpo``: the sampled-token OPD advantage plus ``reward_weight`` × the GRPO advantage
   (:func:`opd_mini.losses.mix_advantages`): the teacher's dense per-token signal together with the
   verifier's unbiased sequence-level one. Its learning curve and final success against both parents.
3. **Cost.** An analytic FLOPs table per method (:func:`flops_table`), the feedback each episode
   carries (one reward, at most 1 bit, against one teacher score per token), and "distil the RL
   teacher back": the GRPO-trained student becomes the teacher of a fresh copy of π₀, and the samples
   that OPD (and SFT) need to reach its level are counted against the samples GRPO itself needed.
4. **Fu et al.'s practical fixes.** Per-token clipping of the log-ratio (``clip_log_ratio``) in a world
   whose first token is a *style* token the teacher and the student disagree about by ~10 nats, and the
   "imbalanced one-token signal" (``opd/neg_reward_frac``), measured exactly along training.

The world of 1-3 (:func:`build_world`): P prompts, V tokens, horizon T; half the prompts accept two
answers (the teacher splits its mass between them). The teacher is a table peaked on the answers and
recovers after a mistake (:func:`toy.forgetting_world.make_multi_answer_teacher`); the student is a
:class:`toy.world.MLPPolicy` (parameters shared between prompts) warmed up by exact SFT on a weak prior
whose strength varies from prompt to prompt, so π₀ finds some prompts' answers often and others rarely,
as a base model does. Every loss is a registered one of :mod:`opd_mini.registry`, fed as the transformer
loop feeds it, and every step clips the gradient norm as the loop does (``max_grad_norm``).

Exact quantities (every (prompt, sequence) pair enumerated)::

    success_p   = Σ_y π(y|p) · 1[y correct for p]
    pass@k      = (1/P) Σ_p [1 − (1 − success_p)^k]          (k independent samples, some correct)
    entropy     = −(1/P) Σ_p Σ_y π(y|p) log π(y|p)             nats

``python -m toy.course --out DIR`` prints the tables and writes ``DIR/course.json`` (the config, the summary over
seeds, the FLOPs table, every seed's raw results) and the figures ``DIR/course_passk.png``, ``DIR/course_cost.png``
and ``DIR/course_fixes.png``. It takes about a minute of CPU time, the seeds in parallel processes (one per core);
``--fast`` is a one-seed, few-step version for tests. Bad options end in one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from opd_mini import registry
from opd_mini.losses import LOGP_FLOOR, token_logprobs
from toy.cli import check, experiment_commands
from toy.exact import correct_table, entropy_from_logprobs, enumerate_pairs
from toy.forgetting_world import (make_multi_answer_task, make_multi_answer_teacher, make_optimizer, method_spec,
                                  random_prompts, trainable_copy)
from toy.stats import json_safe
from toy.world import MLPPolicy, Policy, TablePolicy, Task, World, copy_policy, make_student, sample

#: The trained methods of the diversity comparison, in display order.
METHODS = ("sft", "grpo", "opd_sampled", "opd_full", "opd_topk", "forward_kl", "opd_grpo")
#: Methods that sample B/G prompts with G samples each (they read a group-normalised reward).
GROUPED = ("grpo", "opd_grpo")


@dataclass
class Config:
    """Settings of the course experiments (every field is also a command-line option)."""

    # the world of experiments 1-3
    V: int = 4
    """vocabulary size"""
    T: int = 4
    """horizon (answer length)"""
    prompts: int = 16
    """prompts of the task"""
    two_answer_prompts: int = 8
    """prompts with two correct answers (the teacher splits its mass between them)"""
    teacher_peak: float = 3.0
    """teacher logit bonus of a right next token (per-token prob ≈ e^peak / (e^peak + V − 1))"""
    teacher_noise: float = 0.5
    """std of the teacher's random logits"""
    prior_peak_max: float = 1.5
    """π₀'s prior on prompt p has peak prior_peak_max · p / (P − 1): from none (prompt 0) to this"""
    hidden: int = 16
    """hidden width of the MLPPolicy student"""
    warmup_steps: int = 300
    """Adam steps of the exact SFT warm-up that makes π₀"""
    warmup_lr: float = 0.03
    """learning rate of the warm-up"""

    # training (every method the same)
    lr: float = 0.01
    """Adam learning rate of every method"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this before each step, as the loop does (0 = off)"""
    batch: int = 32
    """student samples per step (teacher samples for SFT): the equal sample budget"""
    steps: int = 250
    """steps per method"""
    group_size: int = 8
    """samples per prompt of GRPO and opd_grpo (batch / group_size prompts per step)"""
    topk: int = 2
    """K of the teacher top-K reverse KL"""
    reward_weight: float = 1.0
    """w of opd_grpo: A_t = −r_t + w · A^GRPO"""
    eval_every: int = 10
    """steps between recorded evaluations of the learning curves"""
    seeds: int = 3
    """seeds (each draws its own world, π₀ and sampling noise)"""
    max_k: int = 64
    """largest k of the pass@k curves (k = 1, 2, 4, … up to it)"""
    target_frac: float = 0.9
    """distil-back: the level is π₀'s success + target_frac · (the GRPO student's gain)"""
    distil_steps: int = 250
    """distil-back: most steps of each method trained on the GRPO teacher"""

    # the fixes (experiment 4)
    clip_values: tuple[float, ...] = (0.0, 4.0, 2.0, 1.0, 0.5)
    """clip_log_ratio values of the style-token demo (0 = no clipping)"""
    style_gap: float = 10.0
    """the teacher's logit margin for its style token at position 0 (its other style tokens ≈ −gap nats)"""
    style_prior: float = 3.0
    """π₀'s logit margin for a different style token at position 0"""
    clip_steps: int = 100
    """steps per clip value"""
    content_target: float = 0.5
    """content success that counts as learned in the clipping demo"""
    seed: int = 0
    """first seed"""
    fast: bool = False
    """small settings for tests (overrides the sizes above)"""

    def apply_fast(self) -> "Config":
        if self.fast:
            self.steps, self.distil_steps, self.clip_steps, self.seeds, self.warmup_steps = 60, 60, 20, 1, 100
            self.clip_values = (0.0, 1.0)
        return self

    def validate(self) -> "Config":
        """A ValueError naming the option and what is allowed, for any setting out of range."""
        check(self.V >= 2 and self.T >= 2 and self.prompts >= 2 and self.hidden >= 1,
              "--V must be >= 2, --T >= 2, --prompts >= 2, --hidden >= 1")
        check(0 <= self.two_answer_prompts <= self.prompts, "--two-answer-prompts must lie in [0, prompts]")
        check(self.lr > 0 and self.warmup_lr > 0 and self.max_grad_norm >= 0, "learning rates must be > 0, "
              "--max-grad-norm >= 0")
        check(min(self.batch, self.steps, self.group_size, self.eval_every, self.seeds, self.max_k,
                  self.distil_steps, self.clip_steps) >= 1 and self.warmup_steps >= 0,
              "step counts, batch sizes, seeds and intervals must be >= 1")
        check(self.group_size >= 2 and self.batch % self.group_size == 0,
              f"--batch {self.batch} must be a multiple of --group-size {self.group_size} (>= 2)")
        check(2 <= self.topk <= self.V, f"--topk must lie in [2, V={self.V}]")
        check(0 < self.target_frac <= 1 and 0 <= self.content_target <= 1,
              "--target-frac must lie in (0, 1] and --content-target in [0, 1]")
        check(all(c >= 0 for c in self.clip_values) and self.clip_values, "--clip-values must be >= 0 (0 = off)")
        check(self.prompts * self.V ** self.T <= 200_000,
              f"{self.prompts} prompts × V^T = {self.prompts * self.V ** self.T} sequences: too many to enumerate "
              "(keep it <= 200,000)")
        return self


# --------------------------------------------------------------------------------------------
# pass@k, exactly and from samples
# --------------------------------------------------------------------------------------------


def pass_at_k_exact(success_P: torch.Tensor, ks) -> list[float]:
    """``(1/P) Σ_p [1 − (1 − s_p)^k]`` for each k: the probability that some of k independent samples of
    a uniformly drawn prompt is correct, from each prompt's exact success ``s_p`` (P,)."""
    s = success_P.double().clamp(0, 1)
    return [float((1 - (1 - s) ** k).mean()) for k in ks]


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021):
    ``1 − C(n − c, k) / C(n, k)``, for k ≤ n."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_grid(max_k: int) -> list[int]:
    """1, 2, 4, … up to ``max_k`` (``max_k`` included)."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


# --------------------------------------------------------------------------------------------
# the world: a task, its teacher and π₀
# --------------------------------------------------------------------------------------------


@dataclass
class CourseWorld:
    """The world of experiments 1-3: the task, its teacher, π₀ and the exact correctness table."""

    world: World
    task: Task
    teacher: TablePolicy
    init: MLPPolicy  # π₀, frozen
    correct_PN: torch.Tensor  # (P, V^T) bool: 1[y correct for p]


def warm_up(student: Policy, prior: Policy, cfg: Config) -> Policy:
    """Exact SFT of ``student`` on ``prior``: ``warmup_steps`` Adam steps on the exact forward KL
    KL(prior ‖ student) over every (prompt, sequence) pair — the expected SFT loss without sampling noise."""
    opt = torch.optim.Adam(student.parameters(), lr=cfg.warmup_lr)
    with torch.no_grad():
        target_logp_PN = all_logprobs(prior, student.world)
    for _ in range(cfg.warmup_steps):
        loss = (target_logp_PN.exp() * (target_logp_PN - all_logprobs(student, student.world))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student


def build_world(cfg: Config, seed: int) -> CourseWorld:
    """Draw the task (answers, some prompts with two), its teacher, and π₀ for ``seed``.

    π₀ is an MLP student fitted by exact SFT (Adam on the exact forward KL) to a prior teacher whose
    peak on the answers grows with the prompt's index, from 0 to ``prior_peak_max``: π₀ solves the last
    prompts now and then and the first ones almost never.
    """
    g = torch.Generator().manual_seed(seed)
    world = World(cfg.V, cfg.T, cfg.prompts)
    answer_sets, weights = {}, {}
    for p in range(cfg.prompts):
        answers = [torch.randint(cfg.V, (cfg.T,), generator=g)]
        if p % 2 == 1 and len(answer_sets) // 2 < cfg.two_answer_prompts:  # odd prompts first, then none
            other = torch.randint(cfg.V, (cfg.T,), generator=g)
            while torch.equal(other, answers[0]):
                other = torch.randint(cfg.V, (cfg.T,), generator=g)
            answers.append(other)
        answer_sets[p] = torch.stack(answers)
        weights[p] = torch.full((len(answers),), 1.0 / len(answers))
    task = make_multi_answer_task("task", answer_sets)
    teacher = make_multi_answer_teacher(world, answer_sets, weights, cfg.teacher_peak, cfg.teacher_noise, g)
    teacher.requires_grad_(False)
    # the prior: one multi-answer teacher per peak, prompt p taking the table of its own peak
    prior_PSV = torch.empty(world.P, world.num_states, world.V)
    for p in range(cfg.prompts):
        peak = cfg.prior_peak_max * p / max(cfg.prompts - 1, 1)
        table = make_multi_answer_teacher(world, {p: answer_sets[p]}, {p: weights[p]}, peak, cfg.teacher_noise, g)
        prior_PSV[p] = table.table_PSV.detach()[p]
    prior = TablePolicy(world, prior_PSV)
    student = warm_up(make_student(world, "mlp", g, hidden=cfg.hidden, context=cfg.T - 1), prior, cfg)
    return CourseWorld(world, task, teacher, copy_policy(student), correct_table(task, world))


def all_logprobs(policy: Policy, world: World) -> torch.Tensor:
    """log π(y|p) for every prompt and every sequence (lexicographic), shape (P, V^T), with grad.

    The same numbers as :func:`toy.exact.all_sequence_logprobs`, by way of the policy's logits at its
    P·S prefix states (:meth:`toy.world.Policy.state_logits`) rather than at every position of all
    P·V^T sequences: ``log π(y|p) = Σ_t log π(y_t | state s_t(y))``.
    """
    logp_PSV = torch.log_softmax(policy.state_logits().float(), -1)
    seqs_NT = world.sequences()
    states_NT = world.state_index(seqs_NT)
    return logp_PSV[:, states_NT, seqs_NT].sum(-1)


@torch.no_grad()
def evaluate(policy: Policy, cw: CourseWorld, ks=None) -> dict:
    """Exact success (mean and per prompt), sequence entropy and, for ``ks``, pass@k."""
    logp_PN = all_logprobs(policy, cw.world)[cw.task.prompts]
    success_P = (logp_PN.exp() * cw.correct_PN).sum(-1)
    out = {"success": float(success_P.mean()), "success_per_prompt": success_P.tolist(),
           "entropy": float(entropy_from_logprobs(logp_PN))}
    if ks is not None:
        out["pass_at_k"] = pass_at_k_exact(success_P, ks)
    return out


# --------------------------------------------------------------------------------------------
# one training step of any method, as the transformer loop computes it
# --------------------------------------------------------------------------------------------


def method_batch(method: str, student: Policy, teacher: Policy, task: Task, batch: int, group_size: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts and tokens of one step: B prompts (B/G prompts × G samples for the grouped methods),
    sampled by the student (on-policy methods) or by the teacher (SFT)."""
    if method in GROUPED:
        prompts_B = random_prompts(task.prompts, batch // group_size, gen).repeat_interleave(group_size)
    else:
        prompts_B = random_prompts(task.prompts, batch, gen)
    on_policy = method_spec(method).rollouts == "student"
    return prompts_B, sample(student if on_policy else teacher, prompts_B, gen)


def step_loss(method: str, student: Policy, teacher: Policy, task: Task, prompts_B: torch.Tensor,
              tokens_BT: torch.Tensor, *, group_size: int = 8, topk: int = 2, clip_log_ratio: float = 0.0,
              reward_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The registered loss of ``method`` on a batch: student logits with grad, the teacher signal the loss
    reads (no grad), the verifier's rewards when it reads them, and the behaviour log-probs (the student's
    own, detached: these samples are fresh, so every importance ratio is 1)."""
    spec = method_spec(method)
    logits_BTV = student.logits(prompts_B, tokens_BT)
    teacher_logits_BTV = None
    if spec.signal is not None:
        with torch.no_grad():
            teacher_logits_BTV = teacher.logits(prompts_B, tokens_BT)
    rewards_B = task.is_correct(prompts_B, tokens_BT).float() if spec.reward else None
    batch = registry.LossBatch.from_teacher_logits(
        tokens_BT, teacher_logits_BTV, signal=spec.signal, top_k=topk, rewards_B=rewards_B,
        group_size=group_size if spec.reward else 1,
        behaviour_logp_BT=token_logprobs(logits_BTV.detach(), tokens_BT))
    opts = registry.LossOptions(top_k=topk, clip_log_ratio=clip_log_ratio, reward_weight=reward_weight,
                                add_sampled_token=True)
    return registry.compute_loss(spec.name, logits_BTV, batch, opts)


def optimizer_step(opt: torch.optim.Optimizer, student: Policy, loss: torch.Tensor, max_grad_norm: float) -> float:
    """Backward, clip the global gradient norm (as the loop does), step. Returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    opt.step()
    return float(norm)


def train(method: str, cw: CourseWorld, cfg: Config, seed: int, *, teacher: Policy | None = None,
          steps: int | None = None, stop_at: float | None = None, clip_log_ratio: float = 0.0,
          track_signal: bool = False, eval_every: int | None = None) -> tuple[Policy, list[dict]]:
    """Train a copy of π₀ with ``method``; returns the student and its curve.

    The curve has a row at step 0, every ``eval_every`` steps and at the end: ``step``, ``samples``
    (student samples so far; teacher samples for SFT) and exact ``success`` (``eval_every`` overrides the
    config's interval). ``stop_at``: evaluate after
    every step and stop at the first with success ≥ stop_at (that row ends the curve).
    ``track_signal``: also the exact imbalance of the one-token signal (:func:`signal_balance`) and the
    batch metric ``opd/neg_reward_frac`` at each recorded step.
    """
    teacher = cw.teacher if teacher is None else teacher
    steps = cfg.steps if steps is None else steps
    eval_every = cfg.eval_every if eval_every is None else eval_every
    student = trainable_copy(cw.init)
    opt = make_optimizer("adam", student, cfg.lr)
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    curve, batch_metric = [], None
    for step in range(steps + 1):
        record = step % eval_every == 0 or step == steps
        if record or stop_at is not None:
            ev = evaluate(student, cw)
            reached = stop_at is not None and ev["success"] >= stop_at
            if record or reached:
                row = {"step": step, "samples": step * cfg.batch, "success": ev["success"]}
                if track_signal:
                    row.update(signal_balance(student, teacher, cw.world, cw.task.prompts))
                    row["batch_neg_reward_frac"] = batch_metric
                curve.append(row)
            if reached:
                break
        if step == steps:
            break
        prompts_B, tokens_BT = method_batch(method, student, teacher, cw.task, cfg.batch, cfg.group_size, gen)
        loss, metrics = step_loss(method, student, teacher, cw.task, prompts_B, tokens_BT, group_size=cfg.group_size,
                                  topk=cfg.topk, clip_log_ratio=clip_log_ratio, reward_weight=cfg.reward_weight)
        batch_metric = float(metrics["opd/neg_reward_frac"]) if "opd/neg_reward_frac" in metrics else None
        optimizer_step(opt, student, loss, cfg.max_grad_norm)
    return student, curve


def samples_to(curve: list[dict], level: float) -> int | None:
    """Samples at the first row of a curve with success ≥ level (None if never)."""
    return next((r["samples"] for r in curve if r["success"] >= level), None)


# --------------------------------------------------------------------------------------------
# the imbalanced one-token signal, exactly
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def signal_balance(student: Policy, teacher: Policy, world: World, prompts: list[int]) -> dict:
    """Exact moments of the sampled-token reward −r_t on the student's own samples, per token::

        neg_reward_frac = E_{p, y∼π} (1/T) Σ_t 1[r_t > 0]            (the expectation of opd/neg_reward_frac)
        mean_reward     = E (1/T) Σ_t −r_t = −(per-token reverse KL) ≤ 0
        neg_part / pos_part = E (1/T) Σ_t −r_t · 1[−r_t < 0]  and  · 1[−r_t > 0]

    (prompts uniform; every (prompt, sequence) pair enumerated).
    """
    seqs_NT = world.sequences()
    states_NT = world.state_index(seqs_NT)
    logp_PNT = torch.log_softmax(student.state_logits().float(), -1)[prompts][:, states_NT, seqs_NT]
    logq_PNT = torch.log_softmax(teacher.state_logits().float(), -1)[prompts][:, states_NT, seqs_NT]
    w_X = logp_PNT.sum(-1).reshape(-1).double().exp() / len(prompts)
    r_XT = (logp_PNT - logq_PNT.clamp(min=LOGP_FLOOR)).reshape(-1, world.T).double()
    reward_XT = -r_XT
    return {"neg_reward_frac": float(w_X @ (r_XT > 0).double().mean(-1)),
            "mean_reward": float(w_X @ reward_XT.mean(-1)),
            "neg_part": float(w_X @ reward_XT.clamp(max=0).mean(-1)),
            "pos_part": float(w_X @ reward_XT.clamp(min=0).mean(-1))}


# --------------------------------------------------------------------------------------------
# cost: FLOPs per method and the feedback per episode
# --------------------------------------------------------------------------------------------


def flops_table(P: float, prompt_len: float, T: float, G: int = 8, *, P_teacher: float | None = None,
                sft_teacher_generates: bool = True) -> list[dict]:
    """FLOPs per prompt of one training step of each method, for a transformer of ``P`` parameters (the
    teacher ``P_teacher``, default P), prompts of ``prompt_len`` tokens and ``T`` completion tokens.

    Convention (the one of :func:`opd_mini.demo.flops_per_step`): 2·P FLOPs per token for a forward pass,
    6·P for a forward + backward; every pass reads the prompt's tokens too, so a sequence costs
    ``L + T`` tokens per pass (sampling with a KV cache: the prompt once, then each new token).
    Attention's T² term and the optimizer are left out.

    * ``sft``: the teacher generates one sequence (``sft_teacher_generates``; 0 when the data exist already),
      the student trains on it.
    * ``opd``: the student samples one sequence, the teacher scores it in one forward, the student trains.
    * ``grpo``: the student samples G sequences and trains on all G; no teacher.
    * ``opd_grpo``: G samples, each scored by the teacher, all G trained on.

    Each row: ``student_sampling``, ``teacher_generation``, ``teacher_scoring``, ``train`` (forward+backward),
    ``total`` (FLOPs per prompt), ``sequences`` (per prompt), ``per_sequence`` (= total / sequences),
    ``supervised_tokens`` (tokens with a training signal per prompt) and ``feedback_scalars`` (numbers of
    feedback per prompt: one reward per sequence for GRPO, one teacher score per token for OPD).
    """
    P_teacher = P if P_teacher is None else P_teacher
    tokens = prompt_len + T  # tokens per sequence, per pass
    fwd_s, fwd_t, train_s = 2 * P * tokens, 2 * P_teacher * tokens, 6 * P * tokens
    rows = [
        dict(method="sft", sequences=1, student_sampling=0.0,
             teacher_generation=fwd_t if sft_teacher_generates else 0.0, teacher_scoring=0.0, train=train_s,
             supervised_tokens=T, feedback_scalars=T),
        dict(method="opd", sequences=1, student_sampling=fwd_s, teacher_generation=0.0, teacher_scoring=fwd_t,
             train=train_s, supervised_tokens=T, feedback_scalars=T),
        dict(method="grpo", sequences=G, student_sampling=G * fwd_s, teacher_generation=0.0, teacher_scoring=0.0,
             train=G * train_s, supervised_tokens=G * T, feedback_scalars=G),
        dict(method="opd_grpo", sequences=G, student_sampling=G * fwd_s, teacher_generation=0.0,
             teacher_scoring=G * fwd_t, train=G * train_s, supervised_tokens=G * T, feedback_scalars=G * T + G),
    ]
    for r in rows:
        r["total"] = r["student_sampling"] + r["teacher_generation"] + r["teacher_scoring"] + r["train"]
        r["per_sequence"] = r["total"] / r["sequences"]
    return rows


def binary_entropy_bits(s: torch.Tensor) -> torch.Tensor:
    """H(s) = −s log₂ s − (1 − s) log₂(1 − s), elementwise (0 at s ∈ {0, 1})."""
    s = s.double().clamp(0, 1)
    h = -(torch.where(s > 0, s * torch.log2(s), torch.zeros_like(s))
          + torch.where(s < 1, (1 - s) * torch.log2(1 - s), torch.zeros_like(s)))
    return h


def episode_feedback(success_P: torch.Tensor, T: int, group_size: int) -> dict:
    """What one episode tells the learner at a policy with per-prompt success ``s_p``:

    * ``reward_bits``: the entropy of the verifier's reward, mean over prompts of H(s_p) ≤ 1 bit — the most
      one episode of RL can carry about the policy's success;
    * ``zero_advantage_groups``: the probability that a group of G samples is all wrong or all right,
      ``(1/P) Σ_p (1 − s_p)^G + s_p^G``: GRPO's gradient from such a group is exactly 0;
    * ``opd_scalars``: the teacher's scores per episode in sampled-token OPD, one per token (T).
    """
    s = success_P.double().clamp(0, 1)
    return {"reward_bits": float(binary_entropy_bits(s).mean()),
            "zero_advantage_groups": float(((1 - s) ** group_size + s ** group_size).mean()),
            "rl_scalars": 1, "opd_scalars": T}


# --------------------------------------------------------------------------------------------
# experiments 1-3: diversity, hybrid, distil-back
# --------------------------------------------------------------------------------------------


def run_seed(cfg: Config, seed: int) -> dict:
    """Every method on one seed's world, the pass@k curves, and the distil-back experiment."""
    ks = list(range(1, cfg.max_k + 1))
    cw = build_world(cfg, seed)
    base, teach = evaluate(cw.init, cw, ks), evaluate(cw.teacher, cw, ks)
    out = {"seed": seed, "base": base, "teacher": teach, "methods": {}, "curves": {},
           "feedback_at_init": episode_feedback(torch.tensor(base["success_per_prompt"]), cfg.T, cfg.group_size)}
    students = {}
    for method in METHODS:  # GRPO's curve has every step: the distil-back counts its samples to a level
        student, curve = train(method, cw, cfg, seed, track_signal=method == "opd_sampled",
                               eval_every=1 if method == "grpo" else None)
        students[method] = student
        out["methods"][method] = evaluate(student, cw, ks)
        out["curves"][method] = curve
    out["distil_back"] = distil_back(cfg, cw, seed, students["grpo"], out["curves"]["grpo"], base["success"])
    return out


def distil_back(cfg: Config, cw: CourseWorld, seed: int, rl_student: Policy, rl_curve: list[dict], base_success: float,
                methods=("opd_sampled", "opd_full", "sft")) -> dict:
    """Distil the RL teacher back: the GRPO student ``rl_student`` teaches fresh copies of π₀.

    The level is ``base_success + target_frac · (GRPO's final success − base_success)``. Returns the level, the
    RL student's success, GRPO's own samples to the level (read off ``rl_curve``, which must have a row after
    every step) and, per method, the samples to the level (None if not within ``distil_steps``), the success it
    stopped at (``<method>_final``) and its pass@max_k there (``<method>_pass_at_max_k``; the RL teacher's is
    ``rl_teacher_pass_at_max_k``).
    """
    rl_teacher = copy_policy(rl_student)
    ks = [cfg.max_k]
    rl_eval = evaluate(rl_teacher, cw, ks)
    s_rl = rl_eval["success"]
    level = base_success + cfg.target_frac * (s_rl - base_success)
    rows = {"level": level, "rl_teacher_success": s_rl, "rl_teacher_pass_at_max_k": rl_eval["pass_at_k"][0],
            "grpo": samples_to(rl_curve, level)}
    for method in methods:
        student, curve = train(method, cw, cfg, seed, teacher=rl_teacher, steps=cfg.distil_steps, stop_at=level)
        rows[method] = samples_to(curve, level)
        rows[f"{method}_final"] = curve[-1]["success"]
        rows[f"{method}_pass_at_max_k"] = evaluate(student, cw, ks)["pass_at_k"][0]
    return rows


# --------------------------------------------------------------------------------------------
# experiment 4: clipping the log-ratio where a style token dominates
# --------------------------------------------------------------------------------------------


def build_style_world(cfg: Config, seed: int) -> CourseWorld:
    """A world whose first token is *style* (like a greeting): any value is correct, the verifier reads
    positions 1 … T−1 only. The teacher puts its style mass on token 0 (the others ≈ −style_gap nats) and is
    peaked on the answer elsewhere; π₀ prefers style token 1 (margin ``style_prior``) and knows the answers a
    little (an exact SFT warm-up on a prior with peak 0.75). The student's log-ratio on its favourite style
    token is then ≈ style_gap, ten times its content log-ratios.
    """
    g = torch.Generator().manual_seed(seed + 500)
    world = World(cfg.V, cfg.T, cfg.prompts)
    answers_PT = torch.randint(cfg.V, (cfg.prompts, cfg.T), generator=g)
    pos_S = world.state_positions()
    states = torch.arange(world.num_states)

    def table(peak: float, style_token: int, style_margin: float, noise: float) -> torch.Tensor:
        t = torch.randn(world.P, world.num_states, world.V, generator=g) * noise
        for p in range(cfg.prompts):
            t[p, states, answers_PT[p][pos_S]] += peak
        t[:, 0] = 0.0
        t[:, 0, style_token] = style_margin
        return t

    def content_verifier(prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        return (tokens_BT[:, 1:] == answers_PT[prompts_B.long()][:, 1:]).all(-1)

    task = Task("content", list(range(cfg.prompts)), answers_PT, verifier=content_verifier)
    teacher = TablePolicy(world, table(cfg.teacher_peak, 0, cfg.style_gap, cfg.teacher_noise))
    teacher.requires_grad_(False)
    prior = TablePolicy(world, table(0.75, 1, cfg.style_prior, cfg.teacher_noise))
    student = warm_up(make_student(world, "mlp", g, hidden=cfg.hidden, context=cfg.T - 1), prior, cfg)
    return CourseWorld(world, task, teacher, copy_policy(student), correct_table(task, world))


@torch.no_grad()
def style_stats(student: Policy, cw: CourseWorld) -> dict:
    """Exact content success, the style position's reverse KL (nats) and the student's mass on the
    teacher's style token."""
    logits_PV = student.state_logits()[:, 0] if isinstance(student, TablePolicy) else student.logits(
        torch.arange(cw.world.P), torch.zeros(cw.world.P, cw.world.T, dtype=torch.long))[:, 0]
    logp_PV = torch.log_softmax(logits_PV, -1)
    logq_PV = torch.log_softmax(cw.teacher.table_PSV[:, 0], -1)
    return {"success": evaluate(student, cw)["success"],
            "style_kl": float((logp_PV.exp() * (logp_PV - logq_PV)).sum(-1).mean()),
            "style_mass": float(logp_PV[:, 0].exp().mean())}


def expected_gradient_share(student: Policy, cw: CourseWorld, clip_log_ratio: float = 0.0) -> dict:
    """How much of the expected sampled-token OPD gradient comes from the style position, exactly.

    For every (prompt, sequence) pair the loss of that one sequence is split by position, ``ℓ = Σ_t ℓ_t``;
    the expected gradient of each part is ``g_t = Σ_{p,y} w(p,y) ∇_θ ℓ_t(y)`` with w = π(y|p)/P. Returns
    ‖g_0‖ (style), ‖Σ_{t≥1} g_t‖ (content) and the style share ‖g_0‖² / (‖g_0‖² + ‖g_content‖²).
    """
    prompts_X, tokens_XT = enumerate_pairs(cw.world, cw.task.prompts)
    with torch.no_grad():
        w_X = all_logprobs(student, cw.world)[cw.task.prompts].reshape(-1).exp() / len(cw.task.prompts)
    params = [p for p in student.parameters() if p.requires_grad]
    logits = student.logits(prompts_X, tokens_XT)
    with torch.no_grad():
        teacher_logits = cw.teacher.logits(prompts_X, tokens_XT)
    T = cw.world.T
    grads = {}
    for name, mask_T in (("style", torch.arange(T) == 0), ("content", torch.arange(T) > 0)):
        mask_XT = mask_T.expand(len(prompts_X), T)
        batch = registry.LossBatch.from_teacher_logits(tokens_XT, teacher_logits, signal="sampled", mask_BT=mask_XT,
                                                       num_tokens=1.0)
        logp_XT = token_logprobs(logits, tokens_XT)
        gs = torch.autograd.grad(weighted_sampled_token_loss(logp_XT, batch.teacher_logp_BT, mask_XT, w_X,
                                                             clip_log_ratio), params, retain_graph=True)
        grads[name] = torch.cat([g.reshape(-1) for g in gs])
    s, c = grads["style"].norm(), grads["content"].norm()
    return {"style_norm": float(s), "content_norm": float(c), "style_share": float(s ** 2 / (s ** 2 + c ** 2))}


def weighted_sampled_token_loss(logp_XT: torch.Tensor, teacher_logp_XT: torch.Tensor, mask_XT: torch.Tensor,
                                w_X: torch.Tensor, clip_log_ratio: float = 0.0) -> torch.Tensor:
    """``Σ_x w_x ℓ(x)`` with ℓ(x) = −Σ_t ρ_t A_t the sampled-token loss of row x (γ = 0, on-policy, summed
    over its masked positions): ``A_t = −clip(r_t)`` is a constant and ρ_t = 1 in value, so weighting
    row x by w_x weights its gradient. With w = 1 it equals ``losses.reverse_kl_sampled_token`` with
    ``num_tokens=1`` (the tests check this); with w_x = π(y|p)/P its gradient is the exact expected one."""
    log_ratio = torch.where(mask_XT, logp_XT.detach() - teacher_logp_XT.clamp(min=LOGP_FLOOR), torch.zeros(()))
    if clip_log_ratio:
        log_ratio = log_ratio.clamp(-clip_log_ratio, clip_log_ratio)
    ratio_XT = torch.exp(logp_XT - logp_XT.detach())
    return (w_X.unsqueeze(1) * ratio_XT * log_ratio * mask_XT).sum()


def run_clipping(cfg: Config, seed: int) -> dict:
    """Sampled-token OPD in the style world at each ``clip_values`` (0 = off): exact content success,
    style KL and the style share of the expected gradient along training."""
    cw = build_style_world(cfg, seed)
    out = {"seed": seed, "init": style_stats(cw.init, cw), "runs": {}}
    out["init"].update(signal_balance(cw.init, cw.teacher, cw.world, cw.task.prompts))
    for c in cfg.clip_values:
        student = trainable_copy(cw.init)
        opt = make_optimizer("adam", student, cfg.lr)
        gen = torch.Generator().manual_seed(seed * 1000 + 11)
        rows = []
        for step in range(cfg.clip_steps + 1):
            if step % 5 == 0 or step == cfg.clip_steps:
                row = {"step": step, **style_stats(student, cw)}
                if step % 20 == 0:
                    row.update(expected_gradient_share(student, cw, clip_log_ratio=c))
                rows.append(row)
            if step == cfg.clip_steps:
                break
            prompts_B, tokens_BT = method_batch("opd_sampled", student, cw.teacher, cw.task, cfg.batch,
                                                cfg.group_size, gen)
            loss, _ = step_loss("opd_sampled", student, cw.teacher, cw.task, prompts_B, tokens_BT, clip_log_ratio=c)
            optimizer_step(opt, student, loss, cfg.max_grad_norm)
        out["runs"][str(c)] = rows
    return out


# --------------------------------------------------------------------------------------------
# summaries over seeds
# --------------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the non-None values (None, None when there are none)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def first_k_below(curve: list[float], base: list[float]) -> int | None:
    """The smallest k (1-based) from which ``curve`` stays below ``base`` up to the largest k, or None."""
    below = [c < b for c, b in zip(curve, base)]
    if not below[-1]:
        return None
    k = len(below)
    while k > 1 and below[k - 2]:
        k -= 1
    return k


def summarise(cfg: Config, seeds: list[dict], clips: list[dict]) -> dict:
    """Means and standard deviations over seeds of everything the figures and the notebook quote."""
    ks = list(range(1, cfg.max_k + 1))
    policies = ("base", "teacher") + METHODS

    def ev(r, name):
        return r[name] if name in ("base", "teacher") else r["methods"][name]

    passk = {}
    for name in policies:
        per_seed = [ev(r, name)["pass_at_k"] for r in seeds]
        passk[name] = {"mean": [mean_std(col)[0] for col in zip(*per_seed)],
                       "std": [mean_std(col)[1] for col in zip(*per_seed)]}
    table = {}
    for name in policies:
        rows = [ev(r, name) for r in seeds]
        crossing = [None if name == "base" else first_k_below(ev(r, name)["pass_at_k"], r["base"]["pass_at_k"])
                    for r in seeds]
        solved = [sum(s > 0.5 for s in x["success_per_prompt"]) for x in rows]  # prompts solved more often than not
        rare = [sum(s < 0.01 for s in x["success_per_prompt"]) for x in rows]   # prompts it almost never solves
        table[name] = {
            "pass@1": mean_std(x["pass_at_k"][0] for x in rows),
            "pass@8": mean_std(x["pass_at_k"][7] for x in rows),
            f"pass@{cfg.max_k}": mean_std(x["pass_at_k"][-1] for x in rows),
            "entropy": mean_std(x["entropy"] for x in rows),
            "prompts_above_half": mean_std(solved), "prompts_below_1pct": mean_std(rare),
            "k_below_base": crossing,
            "below_base_at_max_k": sum(c is not None for c in crossing)}
    # learning curves (mean ± std of success at each recorded step) and the hybrid's targets
    curves = {}
    for m in METHODS:
        per_seed = [r["curves"][m] for r in seeds]
        curves[m] = {"samples": [row["samples"] for row in per_seed[0]],
                     "mean": [mean_std(c)[0] for c in zip(*[[row["success"] for row in c] for c in per_seed])],
                     "std": [mean_std(c)[1] for c in zip(*[[row["success"] for row in c] for c in per_seed])]}
    hybrid = {}
    for m in METHODS:
        to_half = []
        for r in seeds:
            level = r["base"]["success"] + 0.5 * (r["teacher"]["success"] - r["base"]["success"])
            to_half.append(samples_to(r["curves"][m], level))
        hybrid[m] = {"samples_to_half_teacher": to_half, "samples_to_half_teacher_mean": mean_std(to_half),
                     "reached": sum(x is not None for x in to_half),
                     "final_success": mean_std(r["methods"][m]["success"] for r in seeds),
                     "final_minus_teacher": mean_std(r["methods"][m]["success"] - r["teacher"]["success"]
                                                     for r in seeds)}
    n_rows = len(seeds[0]["curves"]["opd_sampled"])
    neg = {"steps": [row["step"] for row in seeds[0]["curves"]["opd_sampled"]]}
    for key in ("neg_reward_frac", "mean_reward", "neg_part", "pos_part"):
        cols = [mean_std(r["curves"]["opd_sampled"][i][key] for r in seeds) for i in range(n_rows)]
        neg[key] = [m for m, _ in cols]
        neg[key + "_std"] = [s for _, s in cols]
    # distil-back
    db = {}
    for m in ("grpo", "opd_sampled", "opd_full", "sft"):
        vals = [r["distil_back"][m] for r in seeds]
        db[m] = {"samples": vals, "mean": mean_std(vals), "reached": sum(v is not None for v in vals)}
    # FLOPs per sequence with the teacher as large as the student (it *is* the RL student): the ratio does not
    # depend on P, the prompt length or T (sft 8, opd 10, grpo 8 units of P·(L + T))
    per_seq = {r["method"]: r["per_sequence"] for r in flops_table(1.0, 0.0, 1.0, G=cfg.group_size)}
    cost = {"grpo": per_seq["grpo"], "opd_sampled": per_seq["opd"], "opd_full": per_seq["opd"], "sft": per_seq["sft"]}
    for m in ("opd_sampled", "opd_full", "sft"):
        ok = [r for r in seeds if r["distil_back"][m] and r["distil_back"]["grpo"]]
        ratios = [r["distil_back"]["grpo"] / r["distil_back"][m] for r in ok]
        db[m]["grpo_over_method"] = ratios
        db[m]["grpo_over_method_mean"] = mean_std(ratios)
        db[m]["grpo_flops_over_method"] = [x * cost["grpo"] / cost[m] for x in ratios]
        db[m]["grpo_flops_over_method_mean"] = mean_std(db[m]["grpo_flops_over_method"])
    db["flops_per_sequence"] = cost
    db["pass_at_max_k"] = {"rl_teacher": mean_std(r["distil_back"]["rl_teacher_pass_at_max_k"] for r in seeds),
                           **{m: mean_std(r["distil_back"][f"{m}_pass_at_max_k"] for r in seeds)
                              for m in ("opd_sampled", "opd_full", "sft")}}
    feedback = {k: mean_std(r["feedback_at_init"][k] for r in seeds)
                for k in ("reward_bits", "zero_advantage_groups")}
    # clipping
    clip = {}
    for c in cfg.clip_values:
        runs = [x["runs"][str(c)] for x in clips]
        steps = [row["step"] for row in runs[0]]
        clip[str(c)] = {
            "steps": steps,
            "success_mean": [mean_std(col)[0] for col in zip(*[[row["success"] for row in r] for r in runs])],
            "success_std": [mean_std(col)[1] for col in zip(*[[row["success"] for row in r] for r in runs])],
            "style_kl_mean": [mean_std(col)[0] for col in zip(*[[row["style_kl"] for row in r] for r in runs])],
            "final_success": mean_std(r[-1]["success"] for r in runs),
            "final_style_kl": mean_std(r[-1]["style_kl"] for r in runs),
            "steps_to_content_target": [next((row["step"] for row in r if row["success"] >= cfg.content_target), None)
                                        for r in runs],
            "style_share_at_init": mean_std(r[0]["style_share"] for r in runs)}
    clip_init = {k: mean_std(x["init"][k] for x in clips) for k in clips[0]["init"]}
    return {"ks": ks, "pass_at_k": passk, "table": table, "curves": curves, "hybrid": hybrid,
            "neg_reward": neg, "distil_back": db, "feedback_at_init": feedback, "clipping": clip,
            "clipping_init": clip_init}


# --------------------------------------------------------------------------------------------
# printing and figures
# --------------------------------------------------------------------------------------------


def _f(ms, digits=3) -> str:
    m, s = ms
    return "—" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def print_report(cfg: Config, summary: dict, flops: list[dict]) -> None:
    """The tables of ``python -m toy.course``."""
    t, n = summary["table"], cfg.seeds
    print(f"\nDiversity — exact pass@k, mean ± std over {n} seeds (V={cfg.V}, T={cfg.T}, {cfg.prompts} prompts, "
          f"{cfg.steps} steps × {cfg.batch} samples)")
    print(f"{'policy':12s} {'pass@1':>15s} {'pass@8':>15s} {'pass@' + str(cfg.max_k):>15s} {'entropy':>15s} "
          f"{'prompts <1%':>13s}  k from which below π₀ (per seed)")
    for name, row in t.items():
        print(f"{name:12s} {_f(row['pass@1']):>15s} {_f(row['pass@8']):>15s} {_f(row[f'pass@{cfg.max_k}']):>15s} "
              f"{_f(row['entropy'], 2):>15s} {_f(row['prompts_below_1pct'], 1):>13s}  "
              f"{'' if name == 'base' else row['k_below_base']}")
    print("\nHybrid and learning speed — samples to half-way from π₀ to the teacher's success; final success")
    for m, h in summary["hybrid"].items():
        print(f"{m:12s} {_f(h['samples_to_half_teacher_mean'], 0):>15s} ({h['reached']}/{n})  final "
              f"{_f(h['final_success'])}  minus teacher {_f(h['final_minus_teacher'])}")
    db = summary["distil_back"]
    print(f"\nDistil the RL teacher back — samples to {cfg.target_frac:.0%} of the GRPO student's gain, per seed")
    for m in ("grpo", "opd_sampled", "opd_full", "sft"):
        d = db[m]
        extra = "" if m == "grpo" else (f"   GRPO's samples / these: {_f(d['grpo_over_method_mean'], 2)}, "
                                        f"GRPO's FLOPs / these: {_f(d['grpo_flops_over_method_mean'], 2)}")
        print(f"{m:12s} {str(d['samples']):>22s}{extra}")
    print(f"pass@{cfg.max_k} at the level: RL teacher {_f(db['pass_at_max_k']['rl_teacher'])}, "
          + ", ".join(f"{m} {_f(db['pass_at_max_k'][m])}" for m in ("opd_sampled", "opd_full", "sft"))
          + f" (π₀ {_f(t['base'][f'pass@{cfg.max_k}'])})")
    fb = summary["feedback_at_init"]
    print(f"\nFeedback per episode at π₀: reward entropy {_f(fb['reward_bits'])} bits (≤ 1); GRPO groups of "
          f"{cfg.group_size} with zero advantage {_f(fb['zero_advantage_groups'])}; OPD: {cfg.T} teacher scores")
    print("\nFLOPs per prompt (P = 1e9, prompt 256 tokens, 1024 completion tokens, G = 8)")
    print(f"{'method':10s} {'sampling':>10s} {'teacher':>10s} {'train':>10s} {'total':>10s} {'per seq':>10s} "
          f"{'feedback':>9s}")
    for r in flops:
        print(f"{r['method']:10s} {r['student_sampling']:>10.2e} {r['teacher_generation'] + r['teacher_scoring']:>10.2e} "
              f"{r['train']:>10.2e} {r['total']:>10.2e} {r['per_sequence']:>10.2e} {r['feedback_scalars']:>9d}")
    print(f"\nClipping the log-ratio — style world, sampled-token OPD, {cfg.clip_steps} steps; π₀'s style KL "
          f"{_f(summary['clipping_init']['style_kl'], 2)} nats")
    for c, r in summary["clipping"].items():
        print(f"clip {c:>4s}: final content success {_f(r['final_success'])}, style KL {_f(r['final_style_kl'], 3)}, "
              f"steps to {cfg.content_target} {r['steps_to_content_target']}, style share of the expected "
              f"gradient at π₀ {_f(r['style_share_at_init'], 2)}")
    neg = summary["neg_reward"]
    pair = {k: ((neg[k][0], neg[k + "_std"][0]), (neg[k][-1], neg[k + "_std"][-1])) for k in ("neg_reward_frac", "mean_reward")}
    print(f"\nImbalanced one-token signal (opd_sampled, exact): neg_reward_frac {_f(pair['neg_reward_frac'][0])} at π₀, "
          f"{_f(pair['neg_reward_frac'][1])} after {neg['steps'][-1]} steps; mean reward {_f(pair['mean_reward'][0])} → "
          f"{_f(pair['mean_reward'][1])} nats/token")


COLORS = {"base": "k", "teacher": "0.55", "sft": "C0", "grpo": "C3", "opd_sampled": "C2", "opd_full": "C1",
          "opd_topk": "C4", "forward_kl": "C5", "opd_grpo": "C6"}


def plot_passk(cfg: Config, summary: dict, seeds: list[dict], path: str | None = None):
    """pass@k against k for every policy (bands: ± one std over seeds), and per-prompt success; returns the
    figure (saved to ``path`` when given)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = summary["ks"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, names, title in ((axes[0], ("base", "teacher", "sft", "grpo", "opd_sampled", "opd_full"), "pass@k"),
                             (axes[1], ("base", "teacher", "opd_topk", "forward_kl", "opd_grpo", "grpo"),
                              "pass@k (the other methods)")):
        for name in names:
            m, s = summary["pass_at_k"][name]["mean"], summary["pass_at_k"][name]["std"]
            ls = "--" if name in ("base", "teacher") else "-"
            ax.plot(ks, m, ls, color=COLORS[name], label=name)
            ax.fill_between(ks, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=COLORS[name],
                            alpha=0.15, lw=0)
        ax.set(xscale="log", xlabel="k (samples per prompt)", ylabel="exact pass@k", title=title, ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    r = seeds[0]
    order = sorted(range(cfg.prompts), key=lambda p: r["base"]["success_per_prompt"][p])
    x = list(range(cfg.prompts))
    for name in ("base", "grpo", "opd_full", "teacher"):
        vals = (r[name] if name in ("base", "teacher") else r["methods"][name])["success_per_prompt"]
        ax.plot(x, [vals[p] for p in order], "o-" if name != "teacher" else "s--", ms=4, color=COLORS[name], label=name)
    ax.set(yscale="log", ylim=(1e-6, 1.5), xlabel=f"prompt (by π₀'s success; seed {r['seed']})",
           ylabel="success on the prompt", title="where GRPO's pass@k goes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def plot_cost(cfg: Config, summary: dict, path: str | None = None):
    """Learning curves (the hybrid among them) and the distil-back sample counts."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for m in METHODS:
        c = summary["curves"][m]
        ax.plot(c["samples"], c["mean"], color=COLORS[m], label=m)
        ax.fill_between(c["samples"], [a - b for a, b in zip(c["mean"], c["std"])],
                        [a + b for a, b in zip(c["mean"], c["std"])], color=COLORS[m], alpha=0.12, lw=0)
    teacher = summary["table"]["teacher"]["pass@1"][0]
    ax.axhline(teacher, color=COLORS["teacher"], ls="--", label="teacher")
    ax.set(xlabel="student samples (teacher samples for SFT)", ylabel="exact success (pass@1)",
           title="learning curves, mean ± std over seeds")
    ax.legend(fontsize=7)
    ax = axes[1]
    db = summary["distil_back"]
    names = ("grpo", "opd_sampled", "opd_full", "sft")
    for i, m in enumerate(names):
        vals = [v for v in db[m]["samples"] if v is not None]
        mean = db[m]["mean"][0]
        ax.bar(i, 0 if mean is None else mean, color=COLORS[m], alpha=0.6)
        ax.plot([i] * len(vals), vals, "ko", ms=4)
    ax.set_xticks(range(len(names)), ["GRPO from π₀\n(the RL run)", "OPD sampled\nfrom RL teacher",
                                      "OPD full\nfrom RL teacher", "SFT on RL\nteacher samples"], fontsize=8)
    ax.set(ylabel=f"samples to {cfg.target_frac:.0%} of GRPO's gain", title="distil the RL teacher back")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def plot_fixes(cfg: Config, summary: dict, path: str | None = None):
    """Clipping in the style world, and the exact neg_reward_frac along OPD training."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (c, r) in enumerate(summary["clipping"].items()):
        color = "C3" if float(c) == 0 else cmap(i / len(summary["clipping"]))
        label = "no clipping" if float(c) == 0 else f"clip_log_ratio = {float(c):g}"
        axes[0].plot(r["steps"], r["success_mean"], color=color, label=label)
        axes[1].plot(r["steps"], r["style_kl_mean"], color=color, label=label)
    axes[0].set(xlabel="step", ylabel="exact content success", title="the tokens that matter")
    axes[1].set(xlabel="step", ylabel="reverse KL at the style position (nats)", yscale="log",
                title="the style token")
    axes[0].legend(fontsize=7)
    neg = summary["neg_reward"]
    ax = axes[2]
    steps = neg["steps"]
    ax.plot(steps, neg["neg_reward_frac"], "o-", color="C2", label="neg_reward_frac (exact)")
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(xlabel="step (opd_sampled, course world)", ylabel="fraction of tokens with reward −r_t < 0",
           title="the imbalanced one-token signal")
    ax2 = ax.twinx()
    ax2.plot(steps, neg["mean_reward"], "s--", color="C7", label="mean reward = −KL/token")
    ax2.set_ylabel("mean reward (nats/token)")
    ax.fill_between(steps, [m - e for m, e in zip(neg["neg_reward_frac"], neg["neg_reward_frac_std"])],
                    [m + e for m, e in zip(neg["neg_reward_frac"], neg["neg_reward_frac_std"])], color="C2", alpha=0.15, lw=0)
    lines = ax.get_lines()[:1] + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

#: the illustrative scale of the printed FLOPs table
FLOPS_SCALE = {"P": 1e9, "prompt_len": 256, "T": 1024, "G": 8}


def rounded(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` significant digits (a JSON a reader can diff)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def _seed_job(args: tuple[Config, int]) -> tuple[dict, dict]:
    cfg, seed = args
    torch.set_num_threads(1)
    return run_seed(cfg, seed), run_clipping(cfg, seed)


def run(cfg: Config, out: str, progress: bool = True, workers: int | None = None) -> dict:
    """Every experiment for seeds ``seed … seed + seeds − 1``; writes ``out/course.json`` and the figures.

    Seeds run in ``workers`` processes (default: as many as there are cores, at most one per seed), one torch
    thread each; the results do not depend on the number of workers.
    """
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    jobs = [(cfg, cfg.seed + i) for i in range(cfg.seeds)]
    workers = min(len(jobs), os.cpu_count() or 1) if workers is None else max(1, workers)
    threads = torch.get_num_threads()
    try:
        if workers > 1:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_seed_job, jobs)
        else:
            results = [_seed_job(job) for job in jobs]
    finally:
        torch.set_num_threads(threads)
    seeds, clips = [r[0] for r in results], [r[1] for r in results]
    summary = summarise(cfg, seeds, clips)
    flops = flops_table(**FLOPS_SCALE)
    print_report(cfg, summary, flops)
    figures = [os.path.join(out, f"course_{name}.png") for name in ("passk", "cost", "fixes")]
    import matplotlib.pyplot as plt

    for fig in (plot_passk(cfg, summary, seeds, figures[0]), plot_cost(cfg, summary, figures[1]),
                plot_fixes(cfg, summary, figures[2])):
        plt.close(fig)
    wall = time.perf_counter() - start
    config = {**asdict(cfg), "clip_values": list(cfg.clip_values), "methods": list(METHODS), "wall_time_s": wall,
              "workers": workers, "flops_scale": FLOPS_SCALE}
    result = {"config": config, "summary": summary, "flops": flops, "seeds": seeds, "clipping_runs": clips}
    with open(os.path.join(out, "course.json"), "w") as f:
        json.dump(json_safe(rounded(result)), f, indent=1)
    print(f"\nwrote {os.path.join(out, 'course.json')} and {', '.join(figures)}; wall time {wall:.1f} s "
          f"({workers} process{'es' if workers > 1 else ''})")
    return {**result, "figures": figures}


# --------------------------------------------------------------------------------------------
# command line: python -m toy.course --out DIR [options]
# --------------------------------------------------------------------------------------------

#: ``add_arguments(parser)``, ``config_from_args(args)`` and ``main(args) -> dict`` (the toy experiments' contract)
add_arguments, config_from_args, main = experiment_commands(Config, run)


def build_parser():
    """The parser of ``python -m toy.course``: ``--out`` and one option per field of :class:`Config`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m toy.course", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="runs/toy", help="output directory (default runs/toy)")
    add_arguments(parser)
    return parser


def cli(argv: list[str] | None = None) -> dict:
    """``python -m toy.course [options]`` in-process: parse ``argv``, run, return the results."""
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    from opd_mini.config import run_cli

    sys.exit(run_cli(lambda: cli() and 0))
