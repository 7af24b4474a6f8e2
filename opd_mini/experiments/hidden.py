"""A student above its teacher: a teacher whose errors depend on what the student cannot see.

    python -m opd_mini.experiments hidden [--quick] [--seeds 0,1,2,3,4] [--rhos 0.25,0.5,1] [--etas 0.15,0.3]
                                          [--methods sft,opd_full,opd_sampled,opd_full_visible] [--out runs/hidden]

Per-token reverse KL toward a teacher that depends on context c the student cannot see has its optimum
where the student's next-token distribution is the **normalised geometric mean** of the teacher's,
π(y) ∝ exp E_c[log q(y|c)], while SFT on the teacher's samples (and forward KL) lands on the **arithmetic
mean** E_c[q(y|c)]: the teacher's own mixture, errors included. Where the teacher's errors depend on c, the
geometric mean all but removes them (a wrong move must be likely under every c to survive), so a student
trained by OPD can end above its teacher; where they do not (ρ = 1 below, or the demo's noisy teacher,
whose noise is a fixed function of the visible state), both means are the teacher and nobody beats it.

The world (:mod:`opd_mini.experiments.worlds`, settings ``hidden_flag`` η = 0.3 and ``hidden_flag_mild``
η = 0.15): a walk teacher that, behind a flag ``!`` in front of the prompt, flips every move with probability
η, and walks straight without it. Distillation runs on ``hidden:ρ:walk:10``: each example is flagged with
probability ρ, the teacher reads the flag (``--teacher_template '{hidden}{prompt}'``, for scoring and for its
own samples), the student never does. The methods, from the compounding setting's student, same budget:

====================  ========================================================================================
``sft``               SFT on the teacher's samples, drawn behind the same hidden flags
``opd_full``          OPD, full-vocabulary reverse KL, the teacher behind the hidden flags
``opd_sampled``       OPD, sampled-token reverse KL
``opd_full_visible``  the control: ``visible:ρ:walk:10``, the flag in the student's prompt too (then the
                      optimum is the teacher itself)
====================  ========================================================================================

Measured per run: the final pass@1 (the student's prompts: plain, or flagged for the control) against the
teacher's on the same examples behind the same flags (4 samples each), and the mechanism, exactly, on the
final student's own samples: per-token KL(π ‖ G) and KL(π ‖ A), with G the normalised geometric and A the
arithmetic mean of the teacher's two distributions (flag and no flag, weights ρ and 1 − ρ).

Writes ``OUT/hidden.json``, ``OUT/hidden.md`` and ``OUT/hidden.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "hidden"
QUICK_HELP = "the small budget: η = 0.3, ρ = 0.5, sft and opd_full, 2 seeds, 60 steps (under a minute on 2 cores)"
#: The teacher of each noise level η (a setting of opd_mini.experiments.worlds).
SETTINGS = {0.3: "hidden_flag", 0.15: "hidden_flag_mild"}
TEMPLATE = "{hidden}{prompt}"
#: The settings, from recipes/experiments/hidden.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: The methods: name -> the loop's settings that make it ({rho}: the flag rate of the cell).
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
RUN = RECIPE["run"]
#: The headline cell of the claims.
HEADLINE = (0.5, 0.3)  # (rho, eta)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_pass1(teacher, tokenizer, examples: list, *, samples: int, seed: int) -> float:
    """The teacher's pass@1 on ``examples`` behind each one's own flag (``{hidden}{prompt}``, or the prompt that
    shows it), ``samples`` samples each."""
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    prompts = [e.hidden + e.prompt for e in examples]  # examples of hidden:RHO:walk:10: plain prompts, hidden flags
    r = sample(teacher, tokenizer, prompts, num_generations=samples, max_new_tokens=RUN["max_new_tokens"], seed=seed)
    rewards = get_task("walk:10").rewards(r.completions, [examples[int(i)] for i in r.prompt_index_B])
    return sum(rewards) / len(rewards)


@torch.no_grad()
def means_kl(student, teacher, tokenizer, examples: list, *, rho: float, samples: int, seed: int) -> dict:
    """On the student's own samples of the examples' prompts: per-token KL(π ‖ G) and KL(π ‖ A), G ∝ exp((1 − ρ)
    log q(·|prompt) + ρ log q(·|!prompt)) and A = (1 − ρ) q(·|prompt) + ρ q(·|!prompt), and KL(π ‖ q(·|prompt))."""
    from opd_mini.forward import completion_logits
    from opd_mini.sampler import sample, with_prompts
    from opd_mini.tasks import FlagTask

    prompts = [e.prompt for e in examples]
    r = sample(student, tokenizer, prompts, num_generations=samples, max_new_tokens=RUN["max_new_tokens"], seed=seed)
    V = len(tokenizer)
    logp = torch.log_softmax(completion_logits(student, r, V).double(), -1)
    clean = torch.log_softmax(completion_logits(teacher, r, V).double(), -1)
    flagged_view = with_prompts(r, tokenizer, [FlagTask.FLAG + p for p in prompts])
    flagged = torch.log_softmax(completion_logits(teacher, flagged_view, V).double(), -1)
    log_g = torch.log_softmax((1 - rho) * clean + rho * flagged, -1)
    log_a = torch.logaddexp(clean + math.log(1 - rho) if rho < 1 else torch.full_like(clean, -math.inf),
                            flagged + math.log(rho))
    mask = r.mask_BT

    def kl(log_x: torch.Tensor) -> float:
        per = (logp.exp() * (logp - log_x)).sum(-1)
        return float(per[mask].mean())

    return {"kl_to_geometric": kl(log_g), "kl_to_arithmetic": kl(log_a), "kl_to_unflagged": kl(clean)}


def run_job(job: dict) -> dict:
    """Train one (η, ρ, method, seed) and measure the final student."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"η={job['eta']} / ρ={job['rho']} / {job['method']} / seed {c['seed']}")
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    student = toolkit.load_frozen(str(Path(summary["checkpoint"]) / "model"))
    teacher = toolkit.load_frozen(c["teacher"])
    hidden = held_out_examples(get_task(f"hidden:{job['rho']:g}:walk:10"), 64, c["seed"])
    return {"eta": job["eta"], "rho": job["rho"], "method": job["method"], "seed": c["seed"],
            "start_pass@1": summary["eval_history"][0]["eval/pass@1"],
            "final_pass@1": summary["eval_history"][-1]["eval/pass@1"],
            "final_kl": summary["eval_history"][-1].get("eval/kl_reverse"),
            "means": means_kl(student, teacher, tokenizer, hidden, rho=job["rho"], samples=4, seed=c["seed"] + 29),
            "ran_template": summary["config"]["teacher_template"], "train_s": summary["train_time_s"]}


def teacher_job(job: dict) -> dict:
    """The teacher's pass@1 behind the hidden flags of each seed's evaluation examples (the runs' own)."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    toolkit.quiet_worker()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    teacher = toolkit.load_frozen(job["teacher"])
    task = get_task(f"hidden:{job['rho']:g}:walk:10")
    out = {"eta": job["eta"], "rho": job["rho"], "teacher_pass@1": []}
    for seed in job["seeds"]:
        examples = held_out_examples(task, job["eval_prompts"], seed)
        out["teacher_pass@1"].append(teacher_pass1(teacher, tokenizer, examples, samples=RUN["eval_samples"],
                                                   seed=seed + 31))
    return out


# --------------------------------------------------------------------------------------------
# aggregation and claims
# --------------------------------------------------------------------------------------------


def aggregate(runs: list[dict], teachers: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for t in sorted(teachers, key=lambda t: (t["eta"], t["rho"])):
        cell = {"eta": t["eta"], "rho": t["rho"], "teacher_pass@1": t["teacher_pass@1"], "methods": {}}
        for m in methods:
            rs = sorted((r for r in runs if (r["eta"], r["rho"], r["method"]) == (t["eta"], t["rho"], m)),
                        key=lambda r: r["seed"])
            if rs:
                cell["methods"][m] = {
                    "seeds": [r["seed"] for r in rs], "start_pass@1": [r["start_pass@1"] for r in rs],
                    "pass@1": [r["final_pass@1"] for r in rs],
                    "margin_over_teacher": [r["final_pass@1"] - tp for r, tp in zip(rs, t["teacher_pass@1"])],
                    **{k: [r["means"][k] for r in rs] for k in ("kl_to_geometric", "kl_to_arithmetic",
                                                                 "kl_to_unflagged")}}
        out.append(cell)
    return out


def claims(result: dict) -> dict:
    """The aims, as measured, at the headline cell (ρ = 0.5, η = 0.3) when the grid has it."""
    cell = next((c for c in result["cells"] if (c["rho"], c["eta"]) == HEADLINE), None)
    if cell is None:
        return {}
    out = {}
    if "opd_full" in cell["methods"]:
        margins = cell["methods"]["opd_full"]["margin_over_teacher"]
        out["opd_above_teacher_every_seed"] = toolkit.claim(min(margins) > 0, margins=margins)
    if "opd_full_visible" in cell["methods"]:
        margins = cell["methods"]["opd_full_visible"]["margin_over_teacher"]
        out["visible_control_within_0.05_of_teacher"] = toolkit.claim(abs(mean_std(margins)[0]) <= 0.05,
                                                                      mean_margin=mean_std(margins)[0])
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def docs_block(result: dict, results_dir: str) -> str:
    run, n, methods = result["run"], len(result["seeds"]), result["methods"]
    lines = [f"What `python -m opd_mini.experiments hidden` measured ({n} seeds, {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full fine-tuning; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is in `{results_dir}/hidden.json`). "
             "Final pass@1, mean ± standard deviation over seeds; the teacher's is measured behind the same hidden "
             "flags on the same examples.", "",
             f"![students against their teacher]({results_dir}/hidden.png)", "",
             "| η | ρ | teacher | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for c in result["cells"]:
        lines.append(" | ".join([f"| {c['eta']:g}", f"{c['rho']:g}", fmt(c["teacher_pass@1"]),
                                 *[fmt(c["methods"][m]["pass@1"]) if m in c["methods"] else "-" for m in methods]])
                     + " |")
    lines += ["", "The mechanism, per token on each final student's own samples: KL(π ‖ G) / KL(π ‖ A), G the "
              "geometric and A the arithmetic mean of the teacher's distributions with and without the flag.", "",
              "| η | ρ | " + " | ".join(m for m in methods if m != "opd_full_visible") + " |",
              "|---|---|" + "---|" * len([m for m in methods if m != "opd_full_visible"])]
    for c in result["cells"]:
        row = [f"| {c['eta']:g}", f"{c['rho']:g}"]
        for m in methods:
            if m == "opd_full_visible":
                continue
            v = c["methods"].get(m)
            row.append(f"{mean_std(v['kl_to_geometric'])[0]:.3f} / {mean_std(v['kl_to_arithmetic'])[0]:.3f}" if v
                       else "-")
        lines.append(" | ".join(row) + " |")
    cl = result["claims"]
    if "opd_above_teacher_every_seed" in cl:
        c = cl["opd_above_teacher_every_seed"]
        lines += ["", f"- **At ρ = {HEADLINE[0]:g}, η = {HEADLINE[1]:g} the full-KL OPD student is above its teacher on "
                  f"every seed: {toolkit.verdict(c)}** (margins {', '.join(f'{m:+.3f}' for m in c['margins'])})."]
    if "visible_control_within_0.05_of_teacher" in cl:
        c = cl["visible_control_within_0.05_of_teacher"]
        lines.append(f"- **With the flag visible to the student, OPD ends within 0.05 of the teacher: "
                     f"{toolkit.verdict(c)}** (mean margin {c['mean_margin']:+.3f}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Final pass@1 against ρ per method, one panel per η, the teacher behind the same flags."""
    plt = toolkit.pyplot()
    etas = result["etas"]
    fig, axes = plt.subplots(1, len(etas), figsize=(5.2 * len(etas), 3.8), squeeze=False)
    for ax, eta in zip(axes[0], etas):
        cells = sorted((c for c in result["cells"] if c["eta"] == eta), key=lambda c: c["rho"])
        rhos = [c["rho"] for c in cells]
        series = {"teacher": [c["teacher_pass@1"] for c in cells]}
        for m in result["methods"]:
            series[m] = [c["methods"][m]["pass@1"] for c in cells if m in c["methods"]]
        for name, values in series.items():
            if len(values) != len(rhos):
                continue
            st = {"teacher": dict(color="k", label="teacher (behind the flags)"),
                  "opd_full_visible": dict(color="C1", label="OPD full, flag visible")}.get(name, toolkit.style(name))
            ax.errorbar(rhos, [mean_std(v)[0] for v in values], yerr=[mean_std(v)[1] for v in values], marker="o",
                        capsize=3, ls="--" if name in ("teacher", "opd_full_visible") else "-", **st)
        ax.set(title=f"noise behind the flag η = {eta:g}", xlabel="share of flagged examples ρ",
               ylabel="final pass@1", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    toolkit.save(fig, path)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _floats(text: str | None, what: str, default) -> list[float]:
    if not text:
        return list(default)
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)
    p.add_argument("--rhos", default=None, help="comma-separated shares of flagged examples ρ in (0, 1] "
                   "(default 0.25,0.5,1; --quick 0.5)")
    p.add_argument("--etas", default=None, help=f"comma-separated noise levels behind the flag, from "
                   f"{', '.join(f'{e:g}' for e in SETTINGS)} (one teacher each; default both; --quick 0.3)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)}")


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    rhos = _floats(args.rhos, "rhos", scale["rhos"])
    etas = _floats(args.etas, "etas", scale["etas"])
    if any(not 0 < r <= 1 for r in rhos):
        raise ValueError(f"--rhos needs shares in (0, 1], got {args.rhos!r}")
    if any(e not in SETTINGS for e in etas):
        raise ValueError(f"--etas must be some of {', '.join(f'{e:g}' for e in SETTINGS)} (one teacher each), got "
                         f"{args.etas!r}")
    methods = toolkit.parse_names(args.methods, METHODS, "methods", default=scale["methods"])
    out = Path(args.out)
    jobs, teacher_jobs = [], []
    for eta in etas:
        paths = ensure_setting(SETTINGS[eta], progress=False)
        for rho in rhos:
            teacher_jobs.append({"eta": eta, "rho": rho, "teacher": paths["teacher"], "tokenizer": paths["tokenizer"],
                                 "eval_prompts": scale["eval_prompts"], "seeds": seeds})
            for m in methods:
                fields = {**METHODS[m], "task": METHODS[m]["task"].format(rho=f"{rho:g}")}
                for seed in seeds:
                    config = toolkit.run_config(
                        RUN, fields, student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"],
                        steps=steps, eval_every=steps, eval_prompts=scale["eval_prompts"], seed=seed,
                        out_dir=str(out / "runs" / f"eta{eta:g}-rho{rho:g}-{m}-seed{seed}"))
                    jobs.append({"eta": eta, "rho": rho, "method": m, "config": config})
    print(f"hidden: {len(etas)} η × {len(rhos)} ρ, {len(jobs)} runs of {steps} steps in {args.workers} process(es)",
          file=sys.stderr)
    done = toolkit.run_pool(None, [(teacher_job, j) for j in teacher_jobs] + [(run_job, j) for j in jobs],
                            args.workers, desc="hidden", progress=not args.no_progress)
    teachers = [r for r in done if "teacher_pass@1" in r]
    runs = [r for r in done if "method" in r]
    result = {"scale": scale_name, "steps": steps, "seeds": seeds, "rhos": rhos, "etas": etas, "methods": methods,
              "run": RUN, "cpus": toolkit.cpus(), "workers": args.workers, "eval_prompts": scale["eval_prompts"],
              "cells": aggregate(runs, teachers, methods)}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
