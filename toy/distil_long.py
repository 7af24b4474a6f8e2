"""Distilling an RL teacher back, against the answer's length N: does OPD's advantage over RL grow with N?

The argument of the Thinking Machines blog: an RL episode carries O(1) bits (one reward), a distillation episode
O(N) (a teacher score per token), so distilling an RL-trained teacher back into a fresh student should need far
fewer samples than RL itself did, and more so for longer answers. At N = 4 (``course-cost``) it has nothing to
scale with. Here each of P prompts has one correct answer of N tokens (random, V = 4), the student is an
:class:`toy.policies.MLPPolicy` (it sees the prompt, the position and the last token: enough to write any answer),
and π₀ is warmed up by exact SFT on the answers, in two regimes:

* ``same_token``: until its success is ``init_token^N``, as if each token were right with probability
  ``init_token`` at every N: a longer answer holds more to learn, and a reward gets rarer (0.8^32 ≈ 0.0008);
* ``same_success``: until its success is ``init_success`` at every N (per-token accuracy init_success^(1/N)):
  a reward is as frequent at N = 32 as at N = 4, and what there is to learn (about log 1/init_success nats of
  sequence-level KL) does not grow with N either. Here the argument has nothing to bite on.

Per N and seed: GRPO trains π₀ (``rl_steps``); its final student is the RL teacher. Fresh copies of π₀ then learn
from it by OPD (sampled-token and full reverse KL) and by SFT on its samples; each is stopped at the level
``init + target_frac · (teacher − init)``, which GRPO's own curve is read at too. Success is exact at every
evaluation (the probability of the one correct answer, one forward pass). FLOPs per sequence follow
:func:`toy.course_cost.flops_table` at a transformer scale (:data:`toy.course_world.FLOPS_SCALE`: a 1B model,
prompts of 256 tokens), with answers of N tokens: GRPO samples and trains, OPD also lets the teacher score, SFT
lets it generate.

``python -m toy distil-long --out DIR`` writes ``DIR/distil_long.json`` and ``DIR/distil_long.png``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from opd_mini.stats import mean_std
from opd_mini.experiments.toolkit import METHOD_STYLE
from toy.cli import Job, Timing, check, experiment_commands, run_experiment
from toy.course_cost import flops_table
from toy.course_world import optimizer_step, samples_to, step_loss
from toy.forgetting_world import make_optimizer, random_prompts, trainable_copy
from toy.policies import MLPPolicy, sample
from toy.report import pyplot
from toy.world import World

NAME = "distil-long"
#: the methods that learn from the RL teacher (course_world's names of the registered losses)
DISTIL = ("opd_sampled", "opd_full", "sft")
REGIMES = ("same_token", "same_success")
COLORS = {m: METHOD_STYLE[m]["color"] for m in ("grpo", "opd_sampled", "opd_full", "sft")}  # the shared colours


@dataclass
class Config:
    """Settings of the distil-back experiment over the answer length (every field is a command-line option)."""

    Ns: tuple[int, ...] = (4, 8, 16, 32)
    """answer lengths N"""
    V: int = 4
    """vocabulary size"""
    prompts: int = 16
    """prompts, each with one correct answer"""
    hidden: int = 32
    """hidden width of the MLP student"""
    regimes: tuple[str, ...] = ("same_token", "same_success")
    """how π₀ is made at each N (see the module docstring)"""
    init_token: float = 0.8
    """same_token: π₀'s success is init_token^N"""
    init_success: float = 0.1
    """same_success: π₀'s success, the same at every N"""
    warmup_lr: float = 0.01
    """Adam learning rate of the exact SFT warm-up"""
    lr: float = 0.01
    """Adam learning rate of every method"""
    max_grad_norm: float = 1.0
    """clip the gradient norm (0 = off)"""
    batch: int = 32
    """sequences per step (student samples; teacher samples for SFT)"""
    group_size: int = 8
    """GRPO's samples per prompt"""
    rl_steps: int = 1000
    """GRPO steps that make the RL teacher"""
    distil_steps: int = 1000
    """most steps of each distillation (it stops at the level)"""
    target_frac: float = 0.9
    """the level: init + target_frac · (teacher − init)"""
    eval_every: int = 2
    """steps between exact evaluations (the samples to the level are read at this resolution)"""
    seeds: int = 3
    """seeds (a world, π₀, GRPO and the distillations each)"""
    seed: int = 0
    """first seed"""
    fast: bool = False
    """small settings for tests"""

    def apply_fast(self) -> "Config":
        if self.fast:
            self.Ns, self.rl_steps, self.distil_steps, self.seeds, self.eval_every = (4, 8), 60, 60, 2, 5
        return self

    def validate(self) -> "Config":
        check(bool(self.Ns) and all(n >= 1 for n in self.Ns), f"--Ns must be lengths >= 1, got {self.Ns}")
        check(self.V >= 2 and self.prompts >= 1 and self.hidden >= 1, "--V must be >= 2, --prompts and --hidden >= 1")
        check(0 < self.init_success < 1 and 0 < self.init_token < 1,
              f"--init-success and --init-token must lie in (0, 1), got {self.init_success}, {self.init_token}")
        check(bool(self.regimes) and all(r in REGIMES for r in self.regimes),
              f"--regimes must be among {', '.join(REGIMES)}, got {self.regimes}")
        check(0 < self.target_frac <= 1, f"--target-frac must lie in (0, 1], got {self.target_frac}")
        check(self.batch % self.group_size == 0 and self.group_size >= 2,
              f"--batch ({self.batch}) must be a multiple of --group-size ({self.group_size}), which must be >= 2")
        check(min(self.rl_steps, self.distil_steps, self.eval_every, self.seeds) >= 1 and self.lr > 0
              and self.warmup_lr > 0, "--rl-steps, --distil-steps, --eval-every, --seeds must be >= 1, the lrs > 0")
        return self


class AnswerTask:
    """P prompts, one correct answer each: ``answers_PN``; a sequence is correct when it is exactly the answer."""

    def __init__(self, answers_PN: torch.Tensor):
        self.answers_PN = answers_PN
        self.prompts = list(range(answers_PN.shape[0]))

    def is_correct(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        return (tokens_BT == self.answers_PN[prompts_B.long()]).all(-1)


def success(policy: MLPPolicy, task: AnswerTask) -> float:
    """Exact mean success: the mean over prompts of π(answer | prompt), from one forward pass of the answers."""
    with torch.no_grad():
        prompts = torch.tensor(task.prompts)
        logp_PN = torch.log_softmax(policy.logits(prompts, task.answers_PN).float(), -1)
        return float(logp_PN.gather(-1, task.answers_PN.unsqueeze(-1)).squeeze(-1).sum(-1).exp().mean())


def init_target(cfg: Config, regime: str, N: int) -> float:
    """π₀'s success in a regime at length N."""
    return cfg.init_token ** N if regime == "same_token" else cfg.init_success


def build(cfg: Config, regime: str, N: int, seed: int) -> tuple[AnswerTask, MLPPolicy, int]:
    """The answers and π₀ (warmed up by exact SFT on the answers until its success reaches the regime's
    :func:`init_target`); also the warm-up's steps."""
    g = torch.Generator().manual_seed(seed * 7919 + N)
    task = AnswerTask(torch.randint(cfg.V, (cfg.prompts, N), generator=g))
    policy = MLPPolicy(World(cfg.V, N, cfg.prompts), hidden=cfg.hidden, context=1, generator=g)
    opt, prompts, steps = make_optimizer("adam", policy, cfg.warmup_lr), torch.tensor(task.prompts), 0
    target = init_target(cfg, regime, N)
    while success(policy, task) < target:
        logp = torch.log_softmax(policy.logits(prompts, task.answers_PN), -1)
        loss = -logp.gather(-1, task.answers_PN.unsqueeze(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        check(steps < 100_000, f"the warm-up did not reach π₀'s success {target:g}")
    policy.requires_grad_(False)
    return task, policy, steps


def train(method: str, init: MLPPolicy, teacher: MLPPolicy | None, task: AnswerTask, cfg: Config, seed: int,
          steps: int, stop_at: float | None = None) -> tuple[MLPPolicy, list[dict]]:
    """A copy of π₀ trained by ``method`` (the registered loss, as the transformer loop computes it); its curve of
    exact success every ``eval_every`` steps (and at ``stop_at``, the first step at that level, which ends it)."""
    student, gen = trainable_copy(init), torch.Generator().manual_seed(seed * 1000 + 11)
    opt, curve = make_optimizer("adam", student, cfg.lr), []
    for step in range(steps + 1):
        s = success(student, task)
        reached = stop_at is not None and s >= stop_at
        if step % cfg.eval_every == 0 or step == steps or reached:
            curve.append({"step": step, "samples": step * cfg.batch, "success": s})
        if reached or step == steps:
            break
        grouped = method == "grpo"
        prompts_B = random_prompts(task.prompts, cfg.batch // (cfg.group_size if grouped else 1), gen)
        if grouped:
            prompts_B = prompts_B.repeat_interleave(cfg.group_size)
        with torch.no_grad():
            tokens_BT = sample(teacher if method == "sft" else student, prompts_B, gen)
        loss, _ = step_loss(method, student, teacher, task, prompts_B, tokens_BT, group_size=cfg.group_size)
        optimizer_step(opt, student, loss, cfg.max_grad_norm)
    return student, curve


def length_job(cfg: Config, regime: str, N: int, seed: int) -> dict:
    """One (regime, N, seed): π₀, GRPO's run (its final student is the teacher), and each distillation from it."""
    torch.set_num_threads(1)
    task, init, warmup = build(cfg, regime, N, seed)
    s0 = success(init, task)
    rl_student, rl_curve = train("grpo", init, None, task, cfg, seed, cfg.rl_steps)
    teacher = trainable_copy(rl_student).requires_grad_(False)
    s_rl = success(teacher, task)
    level = s0 + cfg.target_frac * (s_rl - s0)
    improved = s_rl > s0
    row = {"regime": regime, "N": N, "seed": seed, "warmup_steps": warmup, "init_success": s0,
           "teacher_success": s_rl, "teacher_improved": improved, "level": level, "curves": {"grpo": rl_curve},
           "samples_to_level": {"grpo": samples_to(rl_curve, level) if improved else None}}
    for method in DISTIL:
        if not improved:  # GRPO found nothing to teach: there is no level to reach
            row["curves"][method], row["samples_to_level"][method] = [], None
            continue
        _, curve = train(method, init, teacher, task, cfg, seed, cfg.distil_steps, stop_at=level)
        row["curves"][method], row["samples_to_level"][method] = curve, samples_to(curve, level)
    return row


def jobs(cfg: Config) -> list[Job]:
    return [Job(f"{NAME}/{regime}/N={N}/seed={s}", length_job, (cfg, regime, N, s),
                cost=N * (cfg.rl_steps + cfg.distil_steps) / 4000)
            for regime in cfg.regimes for N in cfg.Ns for s in range(cfg.seed, cfg.seed + cfg.seeds)]


def flops_per_sequence(N: int) -> dict[str, float]:
    """FLOPs per sequence of each method at the transformer scale, with N answer tokens."""
    from toy.course_world import FLOPS_SCALE

    rows = {r["method"]: r["per_sequence"] for r in flops_table(FLOPS_SCALE["P"], FLOPS_SCALE["prompt_len"], N,
                                                                 FLOPS_SCALE["G"])}
    return {"grpo": rows["grpo"], "opd_sampled": rows["opd"], "opd_full": rows["opd"], "sft": rows["sft"]}


def summarise(cfg: Config, rows: list[dict]) -> list[dict]:
    """Per regime and N: π₀'s and the teacher's success, each method's samples to the level (per seed; None where
    it never got there) and GRPO's samples over the method's, per seed, in samples and in FLOPs."""
    out = []
    for regime in cfg.regimes:
        for N in cfg.Ns:
            mine = sorted((r for r in rows if r["regime"] == regime and r["N"] == N), key=lambda r: r["seed"])
            flops = flops_per_sequence(N)
            entry = {"regime": regime, "N": N, "seeds": len(mine), "teachers_improved": sum(r["teacher_improved"] for r in mine),
                     "init_success": mean_std([r["init_success"] for r in mine]),
                     "teacher_success": mean_std([r["teacher_success"] for r in mine]), "methods": {}}
            for m in ("grpo", *DISTIL):
                got = [r["samples_to_level"][m] for r in mine]
                ratios = [r["samples_to_level"]["grpo"] / r["samples_to_level"][m] for r in mine
                          if r["samples_to_level"][m] and r["samples_to_level"]["grpo"]]
                entry["methods"][m] = {"samples": got, "reached": sum(x is not None for x in got),
                                       "grpo_over_method": ratios,
                                       "grpo_over_method_flops": [x * flops["grpo"] / flops[m] for x in ratios]}
            out.append(entry)
    return out


def figure(cfg: Config, rows: list[dict], summary: list[dict], path: str) -> None:
    """Left: GRPO's samples over each distillation's against N, per seed (dots) and their mean (lines; solid
    same_token, dashed same_success). Right: every run's curve at the longest N of the first regime."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    for regime, ls in zip(cfg.regimes, ("-", "--")):
        for m in DISTIL:
            mine = [e for e in summary if e["regime"] == regime]
            for e in mine:
                ax.scatter([e["N"]] * len(e["methods"][m]["grpo_over_method"]), e["methods"][m]["grpo_over_method"],
                           color=COLORS[m], s=9, alpha=0.5)
            means = [(e["N"], sum(r) / len(r)) for e in mine if (r := e["methods"][m]["grpo_over_method"])]
            if means:
                ax.plot(*zip(*means), color=COLORS[m], ls=ls, marker="o", ms=3, label=f"{METHOD_STYLE[m]['label']}, {regime}")
    ax.axhline(1, color="0.6", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="answer length N", ylabel="GRPO's samples / the method's",
           title="samples to 90% of the RL teacher's gain", ylim=(0.4, 80))  # room for the legend above the data
    ax.set_xticks(list(cfg.Ns), [str(n) for n in cfg.Ns])
    ax.minorticks_off()
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    longest, regime = max(cfg.Ns), cfg.regimes[0]
    for r in (r for r in rows if r["N"] == longest and r["regime"] == regime):
        for m, curve in r["curves"].items():
            bx.plot([c["samples"] for c in curve], [c["success"] for c in curve], color=COLORS[m], lw=1,
                    label=METHOD_STYLE[m]["label"] if r["seed"] == cfg.seed else None)
    bx.set(xlabel="samples", ylabel="exact success", title=f"{regime}, N = {longest}: GRPO, then each distils it")
    bx.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4)  # off the curves
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_cell(ratios: list[float], seeds: int) -> str:
    if not ratios:
        return "never"
    m, sd = mean_std(ratios)
    return f"{m:.2f} ± {sd:.2f}" + ("" if len(ratios) == seeds else f" ({len(ratios)}/{seeds})")


def docs_block(result: dict, results_dir: str = "../toy/results") -> str:
    """The block of docs/results.md, generated from the result."""
    c = result["config"]
    lines = [f"`python -m toy distil-long` ({c['seeds']} seeds, {c['prompts']} prompts with one answer of N tokens, "
             f"V = {c['V']}, an MLP student; GRPO {c['rl_steps']} steps × {c['batch']} samples makes the teacher; the "
             f"level is {c['target_frac']:.0%} of GRPO's gain; `../toy/results/distil_long.json`). GRPO's samples to "
             "the level over each method's, mean ± std over seeds (how many seeds got there when not all), and "
             "full OPD's ratio in FLOPs (a 1B student and teacher, prompts of 256 tokens, answers of N tokens; "
             "the teacher scores every sample):", "",
             "| regime | N | π₀ success | GRPO's teacher | GRPO's samples | " + " | ".join(DISTIL)
             + " | opd_full in FLOPs |", "|---|---|---|---|---|" + "---|" * (len(DISTIL) + 1)]
    for e in result["summary"]:
        g = mean_std([x for x in e["methods"]["grpo"]["samples"] if x is not None])
        better = "" if e["teachers_improved"] == e["seeds"] else f" (above π₀ on {e['teachers_improved']}/{e['seeds']})"
        lines.append(f"| {e['regime']} | {e['N']} | {e['init_success'][0]:.4f} | {e['teacher_success'][0]:.3f} ± "
                     f"{e['teacher_success'][1]:.3f}{better} | {'–' if g[0] is None else f'{g[0]:.0f} ± {g[1]:.0f}'} | "
                     + " | ".join(ratio_cell(e["methods"][m]["grpo_over_method"], e["seeds"]) for m in DISTIL)
                     + f" | {ratio_cell(e['methods']['opd_full']['grpo_over_method_flops'], e['seeds'])} |")
    lines += ["", f"![distilling the RL teacher back, against N]({results_dir}/distil_long.png)"]
    return "\n".join(lines)


def finish(cfg: Config, results: dict, out: str, timing: Timing) -> dict:
    """Print the table, write ``out/distil_long.json`` and ``out/distil_long.png``."""
    os.makedirs(out, exist_ok=True)
    rows = [results[j.key] for j in jobs(cfg)]
    summary = summarise(cfg, rows)
    print(f"\nDistilling the RL teacher back, against the answer length N ({cfg.seeds} seeds; the level: "
          f"{cfg.target_frac:.0%} of GRPO's gain): GRPO's samples to the level over each method's")
    print(f"{'regime':>13s} {'N':>3s} {'π₀':>8s} {'teacher':>15s} " + " ".join(f"{m:>17s}" for m in DISTIL))
    for e in summary:
        i, t = e["init_success"], e["teacher_success"]
        print(f"{e['regime']:>13s} {e['N']:3d} {i[0]:8.4f} {t[0]:7.3f} ± {t[1]:.3f} "
              + " ".join(f"{ratio_cell(e['methods'][m]['grpo_over_method'], e['seeds']):>17s}" for m in DISTIL))
    fig_path = os.path.join(out, "distil_long.png")
    figure(cfg, rows, summary, fig_path)
    result = {"config": {**asdict(cfg), "Ns": list(cfg.Ns), "regimes": list(cfg.regimes),
                         "wall_time_s": timing.wall(NAME), "flops_per_sequence": {N: flops_per_sequence(N) for N in cfg.Ns}},
              "summary": summary, "runs": [{k: v for k, v in r.items() if k != "curves"} for r in rows],
              "curves": [{"regime": r["regime"], "N": r["N"], "seed": r["seed"], **r["curves"]} for r in rows
                         if r["N"] == max(cfg.Ns)]}  # the figure's; every run's samples to the level are in "runs"
    with open(os.path.join(out, "distil_long.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(out, 'distil_long.json')} and {fig_path}; wall time {timing.wall(NAME):.1f} s")
    return {**result, "figures": [fig_path]}


def run(cfg: Config, out: str, progress: bool = True, workers: int | None = None) -> dict:
    return run_experiment(sys.modules[__name__], cfg, out, progress, workers)


add_arguments, config_from_args, main = experiment_commands(Config, run)
