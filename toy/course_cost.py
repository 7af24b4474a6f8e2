"""Cost: FLOPs per method, the feedback each episode carries, and distilling the RL teacher back.

An analytic FLOPs table per method (:func:`flops_table`), the feedback each episode carries at π₀ (one
reward, at most 1 bit, against one teacher score per token: :func:`episode_feedback`), and "distil the RL
teacher back" (:func:`distil_back`): the GRPO-trained student becomes the teacher of a fresh copy of π₀, and
the samples that OPD (and SFT) need to reach its level are counted against the samples GRPO itself needed,
in the world of :mod:`toy.course_world`.

``python -m toy course-cost --out DIR`` prints the tables and writes ``DIR/course_cost.json`` and
``DIR/course_cost.png`` (with every method's learning curve); ``python -m toy.course`` runs it with the
other course experiments.
"""

from __future__ import annotations

import os

import torch

from opd_mini.stats import mean_std
from toy import course_hybrid, course_passk
from toy.cli import Job
from toy.course_results import course_commands
from toy.course_world import (COLORS, FLOPS_SCALE, METHODS, Config, CourseWorld, evaluate, samples_to,
                              seeds_of, shared_jobs, train, train_key, world_key)
from toy.policies import Policy, frozen_table
from toy.report import fmt, pyplot

NAME = "course-cost"
#: the module that runs the course experiments together (``python -m toy`` finishes them through it)
GROUP = "toy.course"
#: the methods whose training it reads, and the keys of each seed's results its JSON keeps
TRAINED = METHODS
RECORD = ("base", "teacher", "methods", "curves", "feedback_at_init", "distil_back")
#: the methods trained on the GRPO student as the teacher
DISTIL_METHODS = ("opd_sampled", "opd_full", "sft")


def flops_table(P: float, prompt_len: float, T: float, G: int = 8, *, P_teacher: float | None = None,
                sft_teacher_generates: bool = True) -> list[dict]:
    """FLOPs per prompt of one training step of each method, for a transformer of ``P`` parameters (the
    teacher ``P_teacher``, default P), prompts of ``prompt_len`` tokens and ``T`` completion tokens.

    Convention (the one of :func:`opd_mini.experiments.demo.flops_per_step`): 2·P FLOPs per token for a forward pass,
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


def distil_back(cfg: Config, cw: CourseWorld, seed: int, rl_student: Policy, rl_curve: list[dict], base_success: float,
                methods=DISTIL_METHODS) -> dict:
    """Distil the RL teacher back: the GRPO student ``rl_student`` teaches fresh copies of π₀.

    The level is ``base_success + target_frac · (GRPO's final success − base_success)``. Returns the level, the
    RL student's success, GRPO's own samples to the level (read off ``rl_curve``, which must have a row after
    every step) and, per method, the samples to the level (None if not within ``distil_steps``), the success it
    stopped at (``<method>_final``) and its pass@max_k there (``<method>_pass_at_max_k``; the RL teacher's is
    ``rl_teacher_pass_at_max_k``).
    """
    rl_teacher = frozen_table(rl_student)  # the same policy, read by lookup
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
# the experiment's contract with toy.course_world.finish
# --------------------------------------------------------------------------------------------


def distil_key(seed: int, method: str) -> str:
    return f"course/distil/seed={seed}/{method}"


def jobs(cfg: Config) -> list[Job]:
    """Each seed's world, π₀ and teacher evaluated, every method trained (the figure draws every learning
    curve), and one distil-back job per seed and method trained on the GRPO student."""
    return shared_jobs(cfg, TRAINED) + [
        Job(distil_key(s, m), distil_job, (cfg, s, m), (world_key(s), train_key(s, "grpo")), cfg.distil_steps / 570)
        for s in seeds_of(cfg) for m in DISTIL_METHODS]


def distil_job(cw: CourseWorld, grpo: dict, cfg: Config, seed: int, method: str) -> dict:
    """:func:`distil_back` of one method, from the GRPO run of :func:`toy.course_world.train_job`."""
    return distil_back(cfg, cw, seed, grpo["student"], grpo["curve"], evaluate(cw.init, cw)["success"], (method,))


def add_results(cfg: Config, seeds: list[dict], results: dict) -> dict:
    """Each seed's feedback at π₀ and distil-back results; the FLOPs table at :data:`FLOPS_SCALE`."""
    for r in seeds:
        r["feedback_at_init"] = episode_feedback(torch.tensor(r["base"]["success_per_prompt"]), cfg.T, cfg.group_size)
        r["distil_back"] = {k: v for m in DISTIL_METHODS for k, v in results[distil_key(r["seed"], m)].items()}
    return {"flops": flops_table(**FLOPS_SCALE)}


def summarise(cfg: Config, seeds: list[dict], results: dict | None = None) -> dict:
    """Distil-back (samples to the level per seed, GRPO's samples and FLOPs over each method's, pass@max_k at
    the level) and the feedback per episode at π₀, over seeds."""
    db = {}
    for m in ("grpo",) + DISTIL_METHODS:
        vals = [r["distil_back"][m] for r in seeds]
        db[m] = {"samples": vals, "mean": mean_std(vals), "reached": sum(v is not None for v in vals)}
    # FLOPs per sequence with the teacher as large as the student (it *is* the RL student): the ratio does not
    # depend on P, the prompt length or T (sft 8, opd 10, grpo 8 units of P·(L + T))
    per_seq = {r["method"]: r["per_sequence"] for r in flops_table(1.0, 0.0, 1.0, G=cfg.group_size)}
    cost = {"grpo": per_seq["grpo"], "opd_sampled": per_seq["opd"], "opd_full": per_seq["opd"], "sft": per_seq["sft"]}
    for m in DISTIL_METHODS:
        ok = [r for r in seeds if r["distil_back"][m] and r["distil_back"]["grpo"]]
        ratios = [r["distil_back"]["grpo"] / r["distil_back"][m] for r in ok]
        db[m]["grpo_over_method"] = ratios
        db[m]["grpo_over_method_mean"] = mean_std(ratios)
        db[m]["grpo_flops_over_method"] = [x * cost["grpo"] / cost[m] for x in ratios]
        db[m]["grpo_flops_over_method_mean"] = mean_std(db[m]["grpo_flops_over_method"])
    db["flops_per_sequence"] = cost
    db["pass_at_max_k"] = {"rl_teacher": mean_std(r["distil_back"]["rl_teacher_pass_at_max_k"] for r in seeds),
                           **{m: mean_std(r["distil_back"][f"{m}_pass_at_max_k"] for r in seeds)
                              for m in DISTIL_METHODS}}
    feedback = {k: mean_std(r["feedback_at_init"][k] for r in seeds)
                for k in ("reward_bits", "zero_advantage_groups")}
    return {"distil_back": db, "feedback_at_init": feedback}


def print_report(cfg: Config, summary: dict) -> None:
    db = summary["distil_back"]
    print(f"\nDistil the RL teacher back — samples to {cfg.target_frac:.0%} of the GRPO student's gain, per seed")
    for m in ("grpo",) + DISTIL_METHODS:
        d = db[m]
        extra = "" if m == "grpo" else (f"   GRPO's samples / these: {fmt(d['grpo_over_method_mean'], 2)}, "
                                        f"GRPO's FLOPs / these: {fmt(d['grpo_flops_over_method_mean'], 2)}")
        print(f"{m:12s} {str(d['samples']):>22s}{extra}")
    base = f" (π₀ {fmt(summary['table']['base'][f'pass@{cfg.max_k}'])})" if "table" in summary else ""
    print(f"pass@{cfg.max_k} at the level: RL teacher {fmt(db['pass_at_max_k']['rl_teacher'])}, "
          + ", ".join(f"{m} {fmt(db['pass_at_max_k'][m])}" for m in DISTIL_METHODS) + base)
    fb = summary["feedback_at_init"]
    print(f"\nFeedback per episode at π₀: reward entropy {fmt(fb['reward_bits'])} bits (≤ 1); GRPO groups of "
          f"{cfg.group_size} with zero advantage {fmt(fb['zero_advantage_groups'])}; OPD: {cfg.T} teacher scores")
    print("\nFLOPs per prompt (P = 1e9, prompt 256 tokens, 1024 completion tokens, G = 8)")
    print(f"{'method':10s} {'sampling':>10s} {'teacher':>10s} {'train':>10s} {'total':>10s} {'per seq':>10s} "
          f"{'feedback':>9s}")
    for r in flops_table(**FLOPS_SCALE):
        print(f"{r['method']:10s} {r['student_sampling']:>10.2e} {r['teacher_generation'] + r['teacher_scoring']:>10.2e} "
              f"{r['train']:>10.2e} {r['total']:>10.2e} {r['per_sequence']:>10.2e} {r['feedback_scalars']:>9d}")


def figures(cfg: Config, summary: dict, seeds: list[dict], out: str):
    if "curves" not in summary or "table" not in summary:  # run alone: the other experiments' numbers it draws
        summary = {**course_passk.summarise(cfg, seeds), **course_hybrid.summarise(cfg, seeds), **summary}
    path = os.path.join(out, "course_cost.png")
    yield path, plot_cost(cfg, summary, path)


def plot_cost(cfg: Config, summary: dict, path: str | None = None):
    """Learning curves (the hybrid among them) and the distil-back sample counts."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    course_hybrid.plot_curves(ax, summary["curves"], METHODS, alpha=0.12)
    teacher = summary["table"]["teacher"]["pass@1"][0]
    ax.axhline(teacher, color=COLORS["teacher"], ls="--", label="teacher")
    ax.set(xlabel="student samples (teacher samples for SFT)", ylabel="exact success (pass@1)",
           title="learning curves, mean ± std over seeds")
    ax.legend(fontsize=7)
    ax = axes[1]
    db = summary["distil_back"]
    names = ("grpo",) + DISTIL_METHODS
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


#: ``run(cfg, out)`` (this experiment alone: ``out/course_cost.json`` and its figure), ``finish``, and the command
#: line of toy/__main__.py: ``add_arguments(parser)``, ``config_from_args(args)``, ``main(args) -> dict``
run, finish, add_arguments, config_from_args, main = course_commands(__name__)
