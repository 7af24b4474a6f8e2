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

import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from opd_mini.stats import json_safe, pearson, spearman
from toy import report
from toy.cli import Job, Timing, check, experiment_commands, run_experiment
from toy.exact import (all_sequence_logprobs, correct_table, entropy_from_logprobs, kl_from_logprobs, sequence_ids,
                       table_logprobs)
from toy.forgetting_world import (METHOD_LOSSES, Setup, build_setup, evaluate, expected_gradient,
                                  gradient_check, loss_from_logits, make_multi_answer_task,
                                  make_multi_answer_teacher, make_optimizer, method_loss, method_spec,
                                  optimizer_step, per_sequence_gradients, perturbed_copy, random_prompts,
                                  trainable_copy)
from toy.policies import copy_policy, frozen_table, sample
from toy.report import continual_summary, summarise_self_distill

__all__ = [  # the experiments, and the pieces of the other toy modules that notebooks and tests reach through here
    "Config", "SELF_DISTILL_METHODS", "NEW_TASK_METHODS", "ON_POLICY", "run_self_distill", "run_continual",
    "run_comparison", "summarise_self_distill", "continual_summary", "run", "add_arguments", "config_from_args",
    "main", "Setup", "build_setup", "evaluate", "METHOD_LOSSES", "method_spec", "loss_from_logits", "method_loss",
    "make_multi_answer_task", "make_multi_answer_teacher", "trainable_copy", "make_optimizer", "optimizer_step",
    "random_prompts", "per_sequence_gradients", "expected_gradient", "perturbed_copy", "gradient_check",
    "all_sequence_logprobs", "sequence_ids", "correct_table", "kl_from_logprobs", "entropy_from_logprobs",
    "spearman", "pearson", "json_safe",
]

NAME = "forgetting"
SELF_DISTILL_METHODS = ("sft_fresh", "sft_fixed", "opd_sampled", "opd_full")
NEW_TASK_METHODS = ("sft", "grpo", "opd_sampled", "opd_full", "opd_topk", "forward_kl", "jsd")
#: how the continual-learning lineages learn B
CONTINUAL_LEARN = ("sft", "sft_replay")
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

    methods: tuple[str, ...] = NEW_TASK_METHODS
    """the methods of experiment 3: the built-in ones, or any registered loss (opd_mini.registry)"""
    fast: bool = False
    """small settings for tests (overrides the sizes above)"""

    def apply_fast(self) -> "Config":
        if self.fast:
            self.sd_lrs, self.sd_steps, self.sd_seeds = (0.3, 1.0), 60, 2
            self.cl_steps, self.cl_recover_steps, self.cmp_steps = 120, 120, 120
        return self

    def validate(self) -> "Config":
        """A ValueError naming the option and what is allowed, for any setting out of range."""
        check(self.V >= 2 and self.T >= 1 and self.prompts_per_task >= 1 and self.hidden >= 1,
              "--V must be >= 2, --T, --prompts-per-task and --hidden >= 1")
        check(1 <= self.context <= max(1, self.T - 1) and 0 <= self.two_answer_prompts <= self.prompts_per_task,
              "--context must lie in [1, T − 1] and --two-answer-prompts in [0, prompts_per_task]")
        check(bool(self.sd_lrs) and all(lr > 0 for lr in self.sd_lrs) and self.lr > 0 and self.warmup_lr > 0,
              f"learning rates must be > 0, got sd_lrs={self.sd_lrs}, lr={self.lr}, warmup_lr={self.warmup_lr}")
        check(self.sd_optimizer in ("sgd", "adam") and self.optimizer in ("sgd", "adam"),
              "--sd-optimizer and --optimizer must be sgd or adam")
        check(min(self.sd_steps, self.sd_batch, self.sd_fixed_size, self.sd_seeds, self.sd_eval_every, self.batch,
                  self.cl_steps, self.cl_recover_steps, self.cmp_steps, self.group_size, self.pass_k,
                  self.eval_every) >= 1 and self.warmup_steps >= 0,
              "step counts, batch sizes, seeds and intervals must be >= 1")
        check(0 <= self.cl_replay_frac <= 1 and 0 <= self.target_success <= 1 and 0 <= self.jsd_beta <= 1,
              "--cl-replay-frac, --target-success and --jsd-beta must lie in [0, 1]")
        check(self.batch % self.group_size == 0, f"--batch {self.batch} must be a multiple of --group-size "
              f"{self.group_size} (GRPO groups)")
        check(2 <= self.topk <= self.V, f"--topk must lie in [2, V={self.V}], got {self.topk}")
        for method in self.methods:
            method_spec(method)  # a ValueError listing the known methods and registered losses
        return self



# --------------------------------------------------------------------------------------------
# experiment 1: self-distillation drift
# --------------------------------------------------------------------------------------------


def self_distill_runs(setup: Setup, cfg: Config, method: str, lr: float) -> list[dict]:
    """Train copies of π₀ on task A with π₀ as the teacher, by one method at one learning rate (each
    schedule, each seed); rows of exact KL(π₀‖π) and success_A.

    Seed s uses the same sampling generator for every (method, lr, schedule) (common random numbers).
    """
    prompts_A = setup.task_A.prompts
    init = frozen_table(setup.init)  # π₀ as the teacher and the data, read by lookup
    rows = []
    for schedule in ("constant", "linear") if method.startswith("sft") else ("constant",):
        for seed in range(cfg.sd_seeds):
            student = trainable_copy(setup.init)
            opt = make_optimizer(cfg.sd_optimizer, student, lr)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + 100 + seed)
            if method == "sft_fixed":  # one finite data set of π₀'s samples, reused every step
                fixed_prompts_M = random_prompts(prompts_A, cfg.sd_fixed_size, gen)
                fixed_tokens_MT = sample(init, fixed_prompts_M, gen)
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
                    tokens_BT = sample(init if method == "sft_fresh" else student, prompts_B, gen)
                loss, _ = method_loss(method, student, init, prompts_B, tokens_BT)
                optimizer_step(opt, loss)
    return rows


def run_self_distill(cfg: Config, setup: Setup, progress: bool = True) -> list[dict]:
    """Every self-distillation run (:func:`self_distill_runs` for each method and learning rate)."""
    runs = [(method, lr) for method in SELF_DISTILL_METHODS for lr in cfg.sd_lrs]
    return [r for method, lr in tqdm(runs, desc="self-distillation", disable=not progress, leave=False)
            for r in self_distill_runs(setup, cfg, method, lr)]


# --------------------------------------------------------------------------------------------
# experiment 2: continual learning
# --------------------------------------------------------------------------------------------


def continual_runs(setup: Setup, cfg: Config, learn: str) -> list[dict]:
    """One lineage of the continual-learning experiment (``learn``: ``sft`` or ``sft_replay``).

    Phase ``learn_B``: from π₀, learn B by SFT on teacher-B samples, pure (``sft``) or with a fraction
    ``cl_replay_frac`` of each batch replaced by π₀'s own samples on A prompts (``sft_replay``).
    Phase ``recover_A``: from the end of phase 1 (checkpoint π_B), OPD with the earlier checkpoint π₀
    as the teacher on A prompts (``+opd_A``), or on A prompts with teacher π₀ and B prompts with teacher
    π_B, half of each batch (``+opd_AB``; at the start the B half has zero gradient, like π₀ on A in
    experiment 1, and it pulls B back if it drifts). Steps count on across the two phases.
    """
    rows = []
    init = frozen_table(setup.init)  # π₀ as the teacher and the replayed data, read by lookup
    n_replay = int(round(cfg.cl_replay_frac * cfg.batch))
    total = cfg.cl_steps + cfg.cl_recover_steps

    def record(student, phase, method, step):
        ev = evaluate(student, setup)
        rows.append({"phase": phase, "method": method, "step": step,
                     "success_A": ev["success_A"], "success_B": ev["success_B"]})

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
            tokens_BT = torch.cat([tokens_BT, sample(init, replay_prompts, gen)])
        loss, _ = method_loss("sft", student, setup.teacher_B, prompts_B, tokens_BT)
        optimizer_step(opt, loss)

    checkpoint_B = copy_policy(student)  # π_B, where the recovery starts, and the teacher of B prompts in +opd_AB
    teacher_B = frozen_table(checkpoint_B)
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
            parts = [(setup.task_A.prompts, n_a, init), (setup.task_B.prompts, cfg.batch - n_a, teacher_B)]
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


def run_continual(cfg: Config, setup: Setup, progress: bool = True) -> list[dict]:
    """Both lineages of the continual-learning experiment (:func:`continual_runs`), ``sft`` then ``sft_replay``."""
    return [r for learn in tqdm(CONTINUAL_LEARN, desc="continual", disable=not progress, leave=False)
            for r in continual_runs(setup, cfg, learn)]


# --------------------------------------------------------------------------------------------
# experiment 3: SFT vs RL vs OPD on a new task
# --------------------------------------------------------------------------------------------


def comparison_run(setup: Setup, cfg: Config, method: str) -> tuple[dict, dict, list[dict]]:
    """Learn B from π₀ with one method at ``batch`` samples per step (teacher samples for SFT).

    success_B is checked exactly after every step, so ``samples_to_target`` has a resolution of one
    batch; at that moment the retention of A and KL(π₀‖π) on B are also kept (``*_at_target``: the
    comparison at matched new-task success that RL's Razor makes). Returns (the table row in the JSON
    schema, the method's diagnostics, its learning curve every ``eval_every`` steps).
    """
    base = evaluate(setup.init, setup, cfg.pass_k)
    curves = []
    student = trainable_copy(setup.init)
    opt = make_optimizer(cfg.optimizer, student, cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 300)
    at_target = None
    for step in range(cfg.cmp_steps + 1):
        if at_target is None:
            with torch.no_grad():
                logp_B_KN = table_logprobs(student.state_table(), setup.world, setup.task_B.prompts)
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
        on_policy = method_spec(method).rollouts == "student"
        tokens_BT = sample(student if on_policy else setup.teacher_B, prompts_B, gen)
        loss, _ = method_loss(method, student, setup.teacher_B, prompts_B, tokens_BT, task=setup.task_B,
                              group_size=cfg.group_size, topk=cfg.topk, jsd_beta=cfg.jsd_beta)
        optimizer_step(opt, loss)
    row = {"method": method, "samples_to_target": None if at_target is None else at_target["samples"],
           "retention": ev["success_A"] / base["success_A"], "entropy": ev["entropy_B"],
           "pass_at_k": ev["pass_at_k_B"], "kl_to_init": ev["kl_B"]}
    nan = float("nan")
    details = {"method": method, **ev,
               "retention_at_target": nan if at_target is None else at_target["success_A"] / base["success_A"],
               "kl_B_at_target": nan if at_target is None else at_target["kl_B"],
               "entropy_B_at_target": nan if at_target is None else at_target["entropy_B"]}
    return row, details, curves


def run_comparison(cfg: Config, setup: Setup, progress: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Learn B from π₀ with every method of ``cfg.methods`` (:func:`comparison_run`). Returns (table rows in
    the JSON schema, per-method diagnostics, learning curves every ``eval_every`` steps)."""
    runs = [comparison_run(setup, cfg, m) for m in tqdm(cfg.methods, desc="comparison", disable=not progress,
                                                        leave=False)]
    return [r[0] for r in runs], [r[1] for r in runs], [row for r in runs for row in r[2]]


# --------------------------------------------------------------------------------------------
# the jobs and the run
# --------------------------------------------------------------------------------------------


def jobs(cfg: Config) -> list[Job]:
    """The setup (π₀ and the tasks), then the gradient check, one job per self-distillation (method, lr), one per
    continual-learning lineage and one per compared method, each given the setup."""
    setup = ("forgetting/setup",)
    sd_cost = cfg.sd_seeds * cfg.sd_steps / 700  # seconds per schedule, roughly
    return ([Job("forgetting/setup", build_setup, (cfg,), cost=cfg.warmup_steps / 500),
             Job("forgetting/init", init_job, (cfg,), setup, cost=0.3)]
            + [Job(f"forgetting/self-distill/{m}/lr={lr}", self_distill_runs, (cfg, m, lr), setup,
                   cost=sd_cost * (2 if m.startswith("sft") else 1)) for m in SELF_DISTILL_METHODS for lr in cfg.sd_lrs]
            + [Job(f"forgetting/continual/{learn}", continual_runs, (cfg, learn), setup,
                   cost=(cfg.cl_steps + 2 * cfg.cl_recover_steps) / 400) for learn in CONTINUAL_LEARN]
            + [Job(f"forgetting/comparison/{m}", comparison_run, (cfg, m), setup, cost=cfg.cmp_steps / 450)
               for m in cfg.methods])


def init_job(setup: Setup, cfg: Config) -> dict:
    """The gradient check (:func:`gradient_check`) and the exact evaluation of π₀ and of both teachers."""
    return {"gradient_at_init": gradient_check(setup), "init": evaluate(setup.init, setup, cfg.pass_k),
            "teachers": [evaluate(t, setup, cfg.pass_k) for t in (setup.teacher_A, setup.teacher_B)]}


#: the parts of the run whose seconds the JSON reports, by the prefix of their jobs' keys
CLOCK_PARTS = {"setup_and_gradient_check": ("forgetting/setup", "forgetting/init"),
               "self_distill": ("forgetting/self-distill/",), "continual": ("forgetting/continual/",),
               "comparison": ("forgetting/comparison/",)}


def finish(cfg: Config, results: dict, out: str, timing: Timing) -> dict:
    """Print the tables, save ``out/forgetting.png`` and write ``out/forgetting.json`` and
    ``out/forgetting_details.json`` from the results of :func:`jobs` (``timing``: how they ran).

    ``forgetting.json``::

        {"self_distill": [{"method", "lr", "schedule", "seed", "step", "kl_to_init", "success"}...],
         "continual":    [{"phase", "method", "step", "success_A", "success_B"}...],
         "comparison":   [{"method", "samples_to_target", "retention", "entropy", "pass_at_k", "kl_to_init"}...],
         "config":       {...}}

    ``samples_to_target`` is null when the target was never reached.
    """
    os.makedirs(out, exist_ok=True)
    init = results["forgetting/init"]
    grad_rows, base = init["gradient_at_init"], init["init"]
    sd_rows = [r for m in SELF_DISTILL_METHODS for lr in cfg.sd_lrs for r in results[f"forgetting/self-distill/{m}/lr={lr}"]]
    cl_rows = [r for learn in CONTINUAL_LEARN for r in results[f"forgetting/continual/{learn}"]]
    runs = [results[f"forgetting/comparison/{m}"] for m in cfg.methods]
    table, details, curves = [r[0] for r in runs], [r[1] for r in runs], [row for r in runs for row in r[2]]
    wall = timing.wall(NAME)
    clock = {part: sum(v for k, v in timing.seconds.items() if k.startswith(prefixes))
             for part, prefixes in CLOCK_PARTS.items()}

    sd_summary, cl_summary = summarise_self_distill(sd_rows, cfg), continual_summary(cl_rows, cfg)
    report.print_forgetting(cfg, grad_rows, sd_summary, cl_summary, table, details, base, *init["teachers"])
    fig_path = os.path.join(out, "forgetting.png")
    report.plot_forgetting(cfg, sd_rows, cl_rows, curves, table, details, fig_path, SELF_DISTILL_METHODS)

    config = {**asdict(cfg), "sd_lrs": list(cfg.sd_lrs), "methods": list(cfg.methods), "student": "MLPPolicy", "wall_time_s": wall,
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
                   "continual_summary": cl_summary, "comparison_details": details,
                   "comparison_curves": curves, "init": base}
    with open(os.path.join(out, "forgetting_details.json"), "w") as f:
        json.dump(json_safe(details_out), f, indent=1)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in clock.items())
    print(f"\nwrote {os.path.join(out, 'forgetting.json')}, forgetting_details.json and {fig_path}; "
          f"wall time {wall:.1f} s (jobs: {parts})")
    return {**result, "details": details_out, "figures": [fig_path]}


def run(cfg: Config, out: str, progress: bool = True, workers: int | None = None) -> dict:
    """Run the three experiments (their jobs in ``workers`` processes, default one per core) and write their
    results (:func:`finish`)."""
    return run_experiment(sys.modules[__name__], cfg, out, progress, workers)


# --------------------------------------------------------------------------------------------
# command line (the contract of toy/__main__.py)
# --------------------------------------------------------------------------------------------


#: ``add_arguments(parser)``, ``config_from_args(args)`` and ``main(args) -> dict``, the contract of toy/__main__.py
add_arguments, config_from_args, main = experiment_commands(Config, run)
