"""The OPD + reward hybrid against both parents: learning curves, samples to the teacher's half-way, final success.

``opd_grpo``: the sampled-token OPD advantage plus ``reward_weight`` × the GRPO advantage
(:func:`opd_mini.losses.mix_advantages`): the teacher's dense per-token signal together with the verifier's
unbiased sequence-level one. Every method of :data:`toy.course_world.METHODS` is trained at the same sample
budget in the world of :mod:`toy.course_world`; reported per method, over seeds: the exact learning curve,
the samples to half-way from π₀'s success to the teacher's, and the final success (also minus the teacher's).

``python -m toy course-hybrid --out DIR`` prints the table and writes ``DIR/course_hybrid.json`` and
``DIR/course_hybrid.png``; ``python -m toy.course`` runs it with the other course experiments.
"""

from __future__ import annotations

import os

from opd_mini.stats import mean_std
from toy.course_results import course_commands
from toy.course_world import COLORS, LABELS, METHODS, Config, samples_to, shared_jobs
from toy.report import fmt, pyplot

NAME = "course-hybrid"
#: the module that runs the course experiments together (``python -m toy`` finishes them through it)
GROUP = "toy.course"
#: the methods whose training it reads, and the keys of each seed's results its JSON keeps
TRAINED = METHODS
RECORD = ("base", "teacher", "methods", "curves")


def jobs(cfg: Config):
    """Each seed's world, π₀ and teacher evaluated, and every method trained."""
    return shared_jobs(cfg, TRAINED)


def add_results(cfg: Config, seeds: list[dict], results: dict) -> dict:
    """Nothing of its own beyond the shared jobs' results."""
    return {}


def summarise(cfg: Config, seeds: list[dict], results: dict | None = None) -> dict:
    """Learning curves (mean ± std of the exact success at each recorded step) and, per method, the samples to
    half-way from π₀ to the teacher and the final success."""
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
    return {"curves": curves, "hybrid": hybrid}


def print_report(cfg: Config, summary: dict) -> None:
    print("\nHybrid and learning speed — samples to half-way from π₀ to the teacher's success; final success")
    for m, h in summary["hybrid"].items():
        print(f"{m:12s} {fmt(h['samples_to_half_teacher_mean'], 0):>15s} ({h['reached']}/{cfg.seeds})  final "
              f"{fmt(h['final_success'])}  minus teacher {fmt(h['final_minus_teacher'])}")


def figures(cfg: Config, summary: dict, seeds: list[dict], out: str):
    path = os.path.join(out, "course_hybrid.png")
    yield path, plot_hybrid(cfg, summary, seeds, path)


#: the hybrid and its two parents
FAMILY = ("opd_grpo", "opd_sampled", "grpo")


def plot_curves(ax, curves: dict, methods, alpha: float) -> None:
    """Each method's learning curve (mean exact success against samples) and a band of ± one std over seeds."""
    for m in methods:
        c = curves[m]
        ax.plot(c["samples"], c["mean"], color=COLORS[m], label=LABELS[m])
        ax.fill_between(c["samples"], [a - b for a, b in zip(c["mean"], c["std"])],
                        [a + b for a, b in zip(c["mean"], c["std"])], color=COLORS[m], alpha=alpha, lw=0)


def plot_hybrid(cfg: Config, summary: dict, seeds: list[dict], path: str | None = None):
    """The hybrid's learning curve against its parents' (bands: ± one std over seeds), and every method's final
    success minus the teacher's; returns the figure (saved to ``path`` when given)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    plot_curves(ax, summary["curves"], FAMILY, alpha=0.15)
    for name, ls in (("teacher", "--"), ("base", ":")):
        ax.axhline(mean_std(r[name]["success"] for r in seeds)[0], color=COLORS[name], ls=ls,
                   label="teacher" if name == "teacher" else "π₀")
    ax.set(xlabel="student samples", ylabel="exact success (pass@1)",
           title=f"opd_grpo (w = {cfg.reward_weight:g}) and its parents, mean ± std over seeds")
    ax.legend(fontsize=7)
    ax = axes[1]
    h = summary["hybrid"]
    ax.bar(range(len(METHODS)), [h[m]["final_minus_teacher"][0] for m in METHODS],
           yerr=[h[m]["final_minus_teacher"][1] for m in METHODS], color=[COLORS[m] for m in METHODS], alpha=0.7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS], rotation=30, fontsize=8, ha="right")
    ax.set(ylabel="final success − the teacher's", title=f"after {cfg.steps} steps × {cfg.batch} samples")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


#: ``run(cfg, out)`` (this experiment alone: ``out/course_hybrid.json`` and its figure), ``finish``, and the command
#: line of toy/__main__.py: ``add_arguments(parser)``, ``config_from_args(args)``, ``main(args) -> dict``
run, finish, add_arguments, config_from_args, main = course_commands(__name__)
