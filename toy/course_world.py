"""The world of the course experiments, its π₀, the training loop they share, and their jobs and JSON.

The four course experiments (:mod:`toy.course_passk`, :mod:`toy.course_hybrid`, :mod:`toy.course_cost`,
:mod:`toy.course_fixes`; :mod:`toy.course` runs them together) train students in one world
(:func:`build_world`): P prompts, V tokens, horizon T; half the prompts accept two answers (the teacher
splits its mass between them). The teacher is a table peaked on the answers and recovers after a mistake
(:func:`toy.forgetting_world.make_multi_answer_teacher`); the student is a :class:`toy.policies.MLPPolicy`
(parameters shared between prompts) warmed up by exact SFT on a weak prior whose strength varies from prompt
to prompt, so π₀ finds some prompts' answers often and others rarely, as a base model does. Every loss is a
registered one of :mod:`opd_mini.registry`, fed as the transformer loop feeds it, and every step clips the
gradient norm as the loop does (``max_grad_norm``).

Exact quantities (every (prompt, sequence) pair enumerated)::

    success_p   = Σ_y π(y|p) · 1[y correct for p]
    pass@k      = (1/P) Σ_p [1 − (1 − success_p)^k]          (k independent samples, some correct)
    entropy     = −(1/P) Σ_p Σ_y π(y|p) log π(y|p)             nats

The experiments share their jobs (:func:`shared_jobs`: each seed's world, its π₀ and teacher evaluated, one
training run per method), so run together they train each student once; :mod:`toy.course_results` turns the
results of any set of them into their tables, figures and JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_mini import registry
from opd_mini.batch import Batch
from opd_mini.experiments.toolkit import METHOD_STYLE
from opd_mini.losses import LOGP_FLOOR, token_logprobs
from toy.cli import Job, check
from toy.exact import all_sequences, correct_table, entropy_from_logprobs
from toy.forgetting_world import (answer_set, loss_options, make_multi_answer_task, make_multi_answer_teacher,
                                  make_optimizer, method_spec, random_prompts, trainable_copy)
from toy.policies import MLPPolicy, Policy, TablePolicy, copy_policy, make_student, sample
from toy.world import Task, World

#: The trained methods of the course, in display order.
METHODS = ("sft", "grpo", "opd_sampled", "opd_full", "opd_topk", "forward_kl", "opd_grpo")
#: Methods that sample B/G prompts with G samples each (they read a group-normalised reward).
GROUPED = ("grpo", "opd_grpo")
#: One colour per policy, the same in every figure and notebook (the shared table of the transformer experiments).
COLORS = {m: METHOD_STYLE[m]["color"] for m in ("base", "teacher", *METHODS)}
#: and one name, in every legend (the JSON keeps the short names)
LABELS = {m: METHOD_STYLE[m]["label"] for m in ("base", "teacher", *METHODS)}
#: the illustrative scale of the printed FLOPs table (:func:`toy.course_cost.flops_table`), kept in every JSON
FLOPS_SCALE = {"P": 1e9, "prompt_len": 256, "T": 1024, "G": 8}


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
# pass@k, exactly
# --------------------------------------------------------------------------------------------


def pass_at_k_exact(success_P: torch.Tensor, ks) -> list[float]:
    """``(1/P) Σ_p [1 − (1 − s_p)^k]`` for each k: the probability that some of k independent samples of
    a uniformly drawn prompt is correct, from each prompt's exact success ``s_p`` (P,)."""
    s = success_P.double().clamp(0, 1)
    return [float((1 - (1 - s) ** k).mean()) for k in ks]


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
        second = p % 2 == 1 and len(answer_sets) // 2 < cfg.two_answer_prompts  # odd prompts first, then none
        answer_sets[p], weights[p] = answer_set(torch.randint(cfg.V, (cfg.T,), generator=g), second, cfg.V, g)
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


def all_logprobs(policy: Policy, world: World, logits_PSV: torch.Tensor | None = None) -> torch.Tensor:
    """log π(y|p) for every prompt and every sequence (lexicographic), shape (P, V^T), with grad.

    The same numbers as :func:`toy.exact.all_sequence_logprobs`, by way of the policy's logits at its
    P·S prefix states (:meth:`toy.policies.Policy.state_logits`, or ``logits_PSV`` when given) rather than at
    every position of all P·V^T sequences: ``log π(y|p) = Σ_t log π(y_t | state s_t(y))``.
    """
    logp_PSV = torch.log_softmax((policy.state_logits() if logits_PSV is None else logits_PSV).float(), -1)
    seqs_NT, states_NT = all_sequences(world)
    return logp_PSV[:, states_NT, seqs_NT].sum(-1)


@torch.no_grad()
def evaluate(policy: Policy, cw: CourseWorld, ks=None) -> dict:
    """Exact success (mean and per prompt), sequence entropy and, for ``ks``, pass@k."""
    logp_PN = all_logprobs(policy, cw.world, policy.state_table())[cw.task.prompts]
    success_P = (logp_PN.exp() * cw.correct_PN).sum(-1)
    out = {"success": float(success_P.mean()), "success_per_prompt": success_P.tolist(),
           "entropy": float(entropy_from_logprobs(logp_PN))}
    if ks is not None:
        out["pass_at_k"] = pass_at_k_exact(success_P, ks)
    return out


@torch.no_grad()
def signal_balance(student: Policy, teacher: Policy, world: World, prompts: list[int]) -> dict:
    """Exact moments of the sampled-token reward −r_t on the student's own samples, per token::

        neg_reward_frac = E_{p, y∼π} (1/T) Σ_t 1[r_t > 0]            (the expectation of opd/neg_reward_frac)
        mean_reward     = E (1/T) Σ_t −r_t = −(per-token reverse KL) ≤ 0
        neg_part / pos_part = E (1/T) Σ_t −r_t · 1[−r_t < 0]  and  · 1[−r_t > 0]

    (prompts uniform; every (prompt, sequence) pair enumerated).
    """
    seqs_NT, states_NT = all_sequences(world)
    logp_PNT = torch.log_softmax(student.state_table().float(), -1)[prompts][:, states_NT, seqs_NT]
    logq_PNT = torch.log_softmax(teacher.state_table().float(), -1)[prompts][:, states_NT, seqs_NT]
    w_X = logp_PNT.sum(-1).reshape(-1).double().exp() / len(prompts)
    r_XT = (logp_PNT - logq_PNT.clamp(min=LOGP_FLOOR)).reshape(-1, world.T).double()
    reward_XT = -r_XT
    return {"neg_reward_frac": float(w_X @ (r_XT > 0).double().mean(-1)),
            "mean_reward": float(w_X @ reward_XT.mean(-1)),
            "neg_part": float(w_X @ reward_XT.clamp(max=0).mean(-1)),
            "pos_part": float(w_X @ reward_XT.clamp(min=0).mean(-1))}


# --------------------------------------------------------------------------------------------
# one training step of any method, as the transformer loop computes it, and the training run
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
    batch = Batch.from_teacher_logits(
        tokens_BT, teacher_logits_BTV, signal=spec.signal, top_k=topk, rewards_B=rewards_B,
        group_size=group_size if spec.reward else 1,
        behaviour_logp_BT=token_logprobs(logits_BTV.detach(), tokens_BT))
    opts = loss_options(top_k=topk, clip_log_ratio=clip_log_ratio, reward_weight=reward_weight, add_sampled_token=True)
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
# the shared jobs: each seed's world, π₀ and the teacher evaluated, one training run per method
# --------------------------------------------------------------------------------------------


def world_key(seed: int) -> str:
    return f"course/world/seed={seed}"


def init_key(seed: int) -> str:
    return f"course/init/seed={seed}"


def train_key(seed: int, method: str) -> str:
    return f"course/train/seed={seed}/{method}"


def seeds_of(cfg: Config) -> list[int]:
    return [cfg.seed + i for i in range(cfg.seeds)]


def shared_jobs(cfg: Config, methods=METHODS) -> list[Job]:
    """Per seed: the world (:func:`build_world`), π₀ and the teacher evaluated, and one training run of each
    of ``methods`` (:func:`train_job`)."""
    out = []
    for s in seeds_of(cfg):
        world = (world_key(s),)
        out += [Job(world_key(s), build_world, (cfg, s), cost=cfg.warmup_steps / 230),
                Job(init_key(s), init_job, (cfg,), world, cost=0.01)]
        out += [Job(train_key(s, m), train_job, (cfg, s, m), world, cost=cfg.steps / (330 if m == "grpo" else 400))
                for m in methods]
    return out


def init_job(cw: CourseWorld, cfg: Config) -> dict:
    """π₀ and the teacher, evaluated with pass@k for k = 1 … max_k."""
    ks = list(range(1, cfg.max_k + 1))
    return {"base": evaluate(cw.init, cw, ks), "teacher": evaluate(cw.teacher, cw, ks)}


def train_job(cw: CourseWorld, cfg: Config, seed: int, method: str) -> dict:
    """One method trained from π₀: the student, its exact evaluation (pass@k for k = 1 … max_k) and its curve.
    GRPO's curve has a row after every step (the distil-back counts its samples to a level), opd_sampled's
    the exact imbalance of its signal."""
    student, curve = train(method, cw, cfg, seed, track_signal=method == "opd_sampled",
                           eval_every=1 if method == "grpo" else None)
    return {"student": student, "eval": evaluate(student, cw, list(range(1, cfg.max_k + 1))), "curve": curve}
