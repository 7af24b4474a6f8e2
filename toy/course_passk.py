"""Diversity, measured properly: exact pass@k against k for π₀, the teacher and every trained student.

Exact pass@k (k = 1 … max_k) for the base model π₀, the teacher and every student of the course
(:data:`toy.course_world.METHODS`: SFT, GRPO, the OPD variants, on-policy forward KL and the OPD + reward
hybrid), over several seeds, in the world of :mod:`toy.course_world`. The question (Yue et al. 2025 for RL):
does training sharpen the distribution so much that the base model, with enough samples, solves more
prompts? And does OPD narrow too? ``k_below_base`` is the k from which a student's pass@k stays below π₀'s.

``python -m toy course-passk --out DIR`` prints the table and writes ``DIR/course_passk.json`` and
``DIR/course_passk.png``; ``python -m toy.course`` runs it with the other course experiments.
"""

from __future__ import annotations

import math
import os

from opd_mini.stats import mean_std
from toy.course_results import course_commands
from toy.course_world import COLORS, LABELS, METHODS, Config, shared_jobs
from toy.report import fmt, pyplot

NAME = "course-passk"
#: the module that runs the course experiments together (``python -m toy`` finishes them through it)
GROUP = "toy.course"
#: the methods whose training it reads, and the keys of each seed's results its JSON keeps
TRAINED = METHODS
RECORD = ("base", "teacher", "methods")


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


def first_k_below(curve: list[float], base: list[float]) -> int | None:
    """The smallest k (1-based) from which ``curve`` stays below ``base`` up to the largest k, or None."""
    below = [c < b for c, b in zip(curve, base)]
    if not below[-1]:
        return None
    k = len(below)
    while k > 1 and below[k - 2]:
        k -= 1
    return k


def policy_eval(record: dict, name: str) -> dict:
    """A seed record's evaluation of ``name``: π₀ (``"base"``), the teacher or a trained method."""
    return record[name] if name in ("base", "teacher") else record["methods"][name]


# --------------------------------------------------------------------------------------------
# the experiment's contract with toy.course_world.finish
# --------------------------------------------------------------------------------------------


def jobs(cfg: Config):
    """Each seed's world, π₀ and teacher evaluated, and every method trained."""
    return shared_jobs(cfg, TRAINED)


def add_results(cfg: Config, seeds: list[dict], results: dict) -> dict:
    """Nothing of its own beyond the shared jobs' results."""
    return {}


def summarise(cfg: Config, seeds: list[dict], results: dict | None = None) -> dict:
    """pass@k of every policy (mean and std over seeds at each k) and the table the report prints."""
    ks = list(range(1, cfg.max_k + 1))
    policies = ("base", "teacher") + METHODS
    passk = {}
    for name in policies:
        per_seed = [policy_eval(r, name)["pass_at_k"] for r in seeds]
        passk[name] = {"mean": [mean_std(col)[0] for col in zip(*per_seed)],
                       "std": [mean_std(col)[1] for col in zip(*per_seed)]}
    table = {}
    for name in policies:
        rows = [policy_eval(r, name) for r in seeds]
        crossing = [None if name == "base" else first_k_below(policy_eval(r, name)["pass_at_k"], r["base"]["pass_at_k"])
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
    return {"ks": ks, "pass_at_k": passk, "table": table}


def print_report(cfg: Config, summary: dict) -> None:
    t = summary["table"]
    print(f"\nDiversity — exact pass@k, mean ± std over {cfg.seeds} seeds (V={cfg.V}, T={cfg.T}, {cfg.prompts} prompts, "
          f"{cfg.steps} steps × {cfg.batch} samples)")
    print(f"{'policy':12s} {'pass@1':>15s} {'pass@8':>15s} {'pass@' + str(cfg.max_k):>15s} {'entropy':>15s} "
          f"{'prompts <1%':>13s}  k from which below π₀ (per seed)")
    for name, row in t.items():
        print(f"{name:12s} {fmt(row['pass@1']):>15s} {fmt(row['pass@8']):>15s} {fmt(row[f'pass@{cfg.max_k}']):>15s} "
              f"{fmt(row['entropy'], 2):>15s} {fmt(row['prompts_below_1pct'], 1):>13s}  "
              f"{'' if name == 'base' else row['k_below_base']}")


def figures(cfg: Config, summary: dict, seeds: list[dict], out: str):
    path = os.path.join(out, "course_passk.png")
    yield path, plot_passk(cfg, summary, seeds, path)


def plot_passk(cfg: Config, summary: dict, seeds: list[dict], path: str | None = None):
    """pass@k against k for every policy (bands: ± one std over seeds), and per-prompt success; returns the
    figure (saved to ``path`` when given)."""
    plt = pyplot()
    ks = summary["ks"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, names, title in ((axes[0], ("base", "teacher", "sft", "grpo", "opd_sampled", "opd_full"), "pass@k"),
                             (axes[1], ("base", "teacher", "opd_topk", "forward_kl", "opd_grpo", "grpo"),
                              "pass@k (the other methods)")):
        for name in names:
            m, s = summary["pass_at_k"][name]["mean"], summary["pass_at_k"][name]["std"]
            ls = "--" if name in ("base", "teacher") else "-"
            ax.plot(ks, m, ls, color=COLORS[name], label=LABELS[name])
            ax.fill_between(ks, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=COLORS[name],
                            alpha=0.15, lw=0)
        ax.set(xscale="log", xlabel="k (samples per prompt)", ylabel="exact pass@k", title=title, ylim=(0, 1.02))
        ticks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= ks[-1]]
        ax.set_xticks(ticks, [str(k) for k in ticks])  # every power of two labelled, not only 10^0 and 10^1
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    r = seeds[0]
    order = sorted(range(cfg.prompts), key=lambda p: r["base"]["success_per_prompt"][p])
    x, shown = list(range(cfg.prompts)), []
    for name in ("base", "grpo", "opd_full", "teacher"):
        vals = policy_eval(r, name)["success_per_prompt"]
        shown += [vals[p] for p in order]
        ax.plot(x, [vals[p] for p in order], "o-" if name != "teacher" else "s--", ms=4, color=COLORS[name], label=LABELS[name])
    floor = min([v for v in shown if v > 0] or [1e-6]) / 3  # every positive success on the axis, however small
    ax.set(yscale="log", ylim=(floor, 1.5), xlabel=f"prompt (by π₀'s success; seed {r['seed']})",
           ylabel="success on the prompt", title="where GRPO's pass@k goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


#: ``run(cfg, out)`` (this experiment alone: ``out/course_passk.json`` and its figure), ``finish``, and the command
#: line of toy/__main__.py: ``add_arguments(parser)``, ``config_from_args(args)``, ``main(args) -> dict``
run, finish, add_arguments, config_from_args, main = course_commands(__name__)
