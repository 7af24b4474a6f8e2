"""Forgetting with a teacher close to the student: self-distillation behind a privileged prompt (SDFT / OPSD)
against SFT and an external expert, with KL(π₀ ‖ π) measured on the new task.

    python -m opd_mini.experiments sdft [--quick] [--methods sdft_full,sft_answers] [--seeds 0,1,2] [--out runs/sdft]

**The world** (``sdft`` in :mod:`opd_mini.experiments.worlds`): one model that knows skill A (``reverse:5``) and has
seen skill B (``walk:10``) almost only behind the privileged prompt ``'{prompt} (the answer is {answer})'``: plain B
is weak, privileged B strong. Every method starts from it with a fresh LoRA adapter, the same optimiser, learning
rate and budget, trains on B's prompts (the control on A's), and is evaluated on B (pass@1, pass@k), on A (never
trained) and on KL(π₀ ‖ π) per token on **both** tasks' prompts, π₀ = the adapter-disabled start, on its own samples.

================  =================================================================================================
``sft_answers``   SFT on B's reference answers (``--teacher answers``)
``sft_expert``    SFT on an external expert's samples (the compounding setting's walk teacher)
``sdft_full``     full-vocabulary reverse KL; the teacher is the start model itself behind the privileged prompt
``sdft_sampled``  the same teacher, the sampled-token loss
``sdft_moving``   full reverse KL; the teacher is the student as it trains behind the privileged prompt (OPSD's moving
                  teacher, ``--teacher student``)
``opd_expert``    full-vocabulary reverse KL from the external expert
``grpo``          GRPO on B's verifier (no teacher)
``control_A``     SFT on A's reference answers: nothing new is learned; does this learning rate keep A?
================  =================================================================================================

**The question** (RL's Razor): does A's drop follow how far training moves the model *on the new task*, KL(π₀ ‖ π) on
B's prompts, and does a teacher close to the student move it least? Measured at **matched B**: the first evaluation
where B's pass@1 closes half the gap from plain B to privileged B. Also reported: the share of the reverse-KL
estimate that comes from tokens the method's teacher all but forbids (log q < −10), at the start and at the end, and
Spearman's correlation of A's drop with each KL over every evaluation of every run.

Writes ``OUT/sdft.json``, ``OUT/sdft.md`` and ``OUT/sdft.png``. Runs go to ``OUT/runs`` in ``--workers`` processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt_reached, mean_std

NAME = "sdft"
QUICK_HELP = "the small budget: sdft_full and sft_answers at lr 3e-3, 30 steps (the tests use it)"
A_TASK, B_TASK = "reverse:5", "walk:10"
#: The settings, from recipes/experiments/sdft.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: name -> the TrainConfig fields that make the method ({expert} = the external expert's path, {template} = the
#: privileged prompt, {A} = skill A's task).
METHODS: dict[str, dict] = RECIPE["methods"]
#: The learning rates. The headline, 3e-3, was chosen before the other methods ran: the larger of 3e-3 and 1e-3 at
#: which ``control_A`` keeps A over the full budget (A's pass@1 0.93 -> 0.99 at both, seed 0, 200 steps). At 3e-3
#: every method that learns B ends with A nearly gone, so the main methods run again at 1e-3, longer.
HEADLINE_LR = 3e-3
MAIN = ("sft_answers", "sft_expert", "sdft_full", "sdft_sampled", "opd_expert")
SCALES: dict[str, dict] = RECIPE["scales"]
RUN = RECIPE["run"]
#: Colours of the figure (one per method; sdft_* solid, the others dashed).
COLOURS = {"sft_answers": "C0", "sft_expert": "C1", "sdft_full": "C2", "sdft_sampled": "C4", "sdft_moving": "C6",
           "opd_expert": "C5", "grpo": "C3", "control_A": "C7"}
KEYS = ("pass@1", "pass@k", "retention_pass@1", "kl_to_init", "retention_kl_to_init", "kl_reverse", "kl_forbidden_share")


def run_job(job: dict) -> dict:
    """Train one (method, seed); returns its evaluation history."""
    c = job["config"]
    summary = toolkit.train_run(c, f"sdft / {job['method']} / seed {c['seed']}")
    return {"method": job["method"], "lr": c["lr"], "seed": c["seed"], **toolkit.curves(summary, *KEYS)}


def method_results(runs: list[dict], cells: list[tuple[str, float]], target: float) -> list[dict]:
    """One entry per (method, lr), per seed: A's drop, the KLs on B and on A, B's pass@k at matched B (None where a
    seed never reaches it), the final values and the curves."""
    out = []
    for name, lr in cells:
        mine = sorted((r for r in runs if r["method"] == name and r["lr"] == lr), key=lambda r: r["seed"])
        hits = [toolkit.first_reaching(r["pass@1"], target) for r in mine]
        a0 = [r["retention_pass@1"][0] for r in mine]
        out.append({
            "method": name, "lr": lr, "seeds": [r["seed"] for r in mine], "A_before_per_seed": a0,
            "steps_to_matched_B": [toolkit.at(r["steps"], i) for r, i in zip(mine, hits)],
            "A_drop_at_matched_B": [None if i is None else a - r["retention_pass@1"][i] for r, i, a in zip(mine, hits, a0)],
            "kl_B_at_matched_B": [toolkit.at(r["kl_to_init"], i) for r, i in zip(mine, hits)],
            "kl_A_at_matched_B": [toolkit.at(r["retention_kl_to_init"], i) for r, i in zip(mine, hits)],
            "B_final": [r["pass@1"][-1] for r in mine], "B_pass@k_final": [r["pass@k"][-1] for r in mine],
            "A_drop_final": [a - r["retention_pass@1"][-1] for r, a in zip(mine, a0)],
            "kl_B_final": [r["kl_to_init"][-1] for r in mine], "kl_A_final": [r["retention_kl_to_init"][-1] for r in mine],
            "kl_to_teacher_start": [r["kl_reverse"][0] for r in mine],
            "forbidden_share_start": [r["kl_forbidden_share"][0] for r in mine],
            "forbidden_share_final": [r["kl_forbidden_share"][-1] for r in mine],
            "steps": mine[0]["steps"], **{f"{k}_curves": [r[k] for r in mine] for k in KEYS}})
    return out


def correlations(entries: list[dict]) -> dict:
    """Spearman (and Pearson) of A's drop with KL(π₀ ‖ π) on B's and on A's prompts: over every evaluation after the
    start of every run (``every_eval``, and per learning rate ``every_eval_lr_<lr>``), and over the (method, seed)
    pairs at matched B."""
    def every(mine):
        return [(e["A_before_per_seed"][s] - a, kb, ka) for e in mine for s in range(len(e["seeds"]))
                for a, kb, ka in zip(e["retention_pass@1_curves"][s][1:], e["kl_to_init_curves"][s][1:],
                                     e["retention_kl_to_init_curves"][s][1:])]

    matched = [(d, kb, ka) for e in entries for d, kb, ka in zip(e["A_drop_at_matched_B"], e["kl_B_at_matched_B"],
                                                                 e["kl_A_at_matched_B"]) if d is not None]
    groups = [("every_eval", every(entries)), ("at_matched_B", matched)]
    lrs = list(dict.fromkeys(e["lr"] for e in entries))
    if len(lrs) > 1:
        groups += [(f"every_eval_lr_{lr:g}", every([e for e in entries if e["lr"] == lr])) for lr in lrs]
    out = {}
    for name, pts in groups:
        drops = [p[0] for p in pts]
        out[name] = {"points": len(pts), **{
            f"{stat}_{task}": (fn(drops, [p[j] for p in pts]) if len(pts) > 2 else None)
            for task, j in (("kl_B", 1), ("kl_A", 2)) for stat, fn in (("spearman", toolkit.spearman),
                                                                    ("pearson", toolkit.pearson))}}
    return out


def _drop(entries: list[dict], name: str, lr: float) -> float | None:
    e = next((e for e in entries if e["method"] == name and e["lr"] == lr), None)
    if e is None or None in e["A_drop_at_matched_B"]:
        return None
    return mean_std(e["A_drop_at_matched_B"])[0]


def claims(entries: list[dict], corr: dict, control_keeps: dict) -> dict:
    """The issue's aims, each as measured: SDFT's drop of A at matched B at most half of SFT-on-answers' (at every
    learning rate; a seed that never reaches matched B fails it); Spearman of A's drop with KL on B at least 0.8; the
    control keeps A."""
    cases = []
    for lr in dict.fromkeys(e["lr"] for e in entries):
        sft = _drop(entries, "sft_answers", lr)
        for m in ("sdft_full", "sdft_sampled", "sdft_moving"):
            if any(e["method"] == m and e["lr"] == lr for e in entries):
                d = _drop(entries, m, lr)
                cases.append({"method": m, "lr": lr, "drop": d, "sft_answers_drop": sft,
                              "holds": d is not None and sft is not None and d <= 0.5 * max(sft, 0.0)})
    rho = corr["every_eval"]["spearman_kl_B"]
    return {"sdft_drop_at_most_half_of_sft_answers": toolkit.claim(bool(cases) and all(c["holds"] for c in cases),
                                                                   cases=cases),
            "spearman_drop_kl_B_at_least_0.8": toolkit.claim(rho is not None and rho >= 0.8, spearman=rho,
                                                             spearman_kl_A=corr["every_eval"]["spearman_kl_A"]),
            "control_keeps_A": control_keeps}


def control_claim(entries: list[dict]) -> dict:
    """The control keeps A: its final A pass@1 is at most 0.05 below the start (or above it), in every seed."""
    mine = [e for e in entries if e["method"] == "control_A"]
    if not mine:
        return toolkit.claim(False, ran=False)
    return toolkit.claim(all(d <= 0.05 for e in mine for d in e["A_drop_final"]), ran=True,
                         drops={e["lr"]: e["A_drop_final"] for e in mine})


# --------------------------------------------------------------------------------------------
# the figure and the docs block
# --------------------------------------------------------------------------------------------


def figure(result: dict, path: Path) -> None:
    """B's pass@1, KL(π₀ ‖ π) on B, A's pass@1 against steps (± 1 std), and A's drop against the KL on B."""
    plt = toolkit.pyplot()
    setup = result["setup"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    lr0 = result["methods"][0]["lr"]
    colours = {}
    for e in result["methods"]:
        if e["lr"] == lr0:  # the curves at the first learning rate
            kw = dict(ls="-" if e["method"].startswith("sdft") else "--", color=COLOURS.get(e["method"]),
                      label=e["method"])
            colours[e["method"]] = toolkit.band(axes[0], e["steps"], e["pass@1_curves"], **kw).get_color()
            toolkit.band(axes[1], e["steps"], e["kl_to_init_curves"], **kw)
            toolkit.band(axes[2], e["steps"], e["retention_pass@1_curves"], **kw)
        for s, a0 in enumerate(e["A_before_per_seed"]):  # every run at every learning rate
            axes[3].scatter(e["kl_to_init_curves"][s][1:], [a0 - a for a in e["retention_pass@1_curves"][s][1:]], s=9,
                            color=colours.get(e["method"], "grey"), alpha=0.6, marker="o" if e["lr"] == lr0 else "x")
    axes[0].axhline(setup["matched_B"], color="grey", lw=0.8, ls=":")
    for ax, title in zip(axes, (f"B ({setup['B_task']}) pass@1 at lr {lr0:g}; dotted: matched B",
                                f"KL(π₀ ‖ π) per token on B's prompts, lr {lr0:g}", f"A ({setup['A_task']}) pass@1, never trained",
                                "A's drop against the KL on B, every eval (x: other lr)")):
        ax.set_title(title, fontsize=9)
    for ax in axes[:3]:
        ax.set_xlabel("step")
    axes[3].set(xlabel="KL(π₀ ‖ π) on B", ylabel="drop of A's pass@1")
    axes[1].legend(*axes[0].get_legend_handles_labels(), loc="upper left", ncol=2, frameon=False, fontsize=7)
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block, generated from the result."""
    s = result["setup"]
    runs = ", ".join(f"lr {lr:g}: {x['steps']} steps, {len(x['methods'])} methods" for lr, x in
                     ((float(k), v) for k, v in s["lrs"].items()))
    lines = [f"A teacher close to the student (`python -m opd_mini.experiments sdft`): the `sdft` model knows A "
             f"(`{s['A_task']}`, pass@1 {s['A_start']:.3f}) and has seen B (`{s['B_task']}`) almost only behind the "
             f"privileged prompt: plain B {s['B_start']:.3f}, privileged B {s['B_privileged']:.3f} (the external "
             f"expert: {s['B_expert']:.3f}). LoRA ({runs}), {len(result['seeds'])} seeds. Matched B = the first "
             f"evaluation with B's pass@1 ≥ {s['matched_B']:.3f} (half the plain → privileged gap); mean ± std over the "
             "seeds that reach it:", "",
             "| lr | method | steps to matched B | A's drop at matched B | KL(π₀ ‖ π) on B there | on A there | B final | "
             "B pass@4 final | A's drop final | KL to its teacher at the start | forbidden share start → end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["methods"]:
        teacher = e["forbidden_share_start"][0] is not None
        share = f"{fmt_reached(e['forbidden_share_start'], 2)} → {fmt_reached(e['forbidden_share_final'], 2)}" if teacher else "–"
        kl_q = fmt_reached(e["kl_to_teacher_start"], 2) if teacher else "–"
        lines.append(f"| {e['lr']:g} | {e['method']} | {fmt_reached(e['steps_to_matched_B'], 0)} | {fmt_reached(e['A_drop_at_matched_B'])} | "
                     f"{fmt_reached(e['kl_B_at_matched_B'])} | {fmt_reached(e['kl_A_at_matched_B'])} | {fmt_reached(e['B_final'])} | "
                     f"{fmt_reached(e['B_pass@k_final'])} | {fmt_reached(e['A_drop_final'])} | {kl_q} | {share} |")
    c, corr = result["claims"], result["correlation"]
    half = c["sdft_drop_at_most_half_of_sft_answers"]
    by_lr: dict = {}
    for x in half["cases"]:
        by_lr.setdefault(x["lr"], [f"sft_answers {toolkit.num(x['sft_answers_drop'], 3)}"]).append(
            f"{x['method']} {toolkit.num(x['drop'], 3)}")
    cases = "; ".join(f"lr {lr:g}: " + ", ".join(v) for lr, v in by_lr.items())
    rho = c["spearman_drop_kl_B_at_least_0.8"]
    ctrl = c["control_keeps_A"]
    per_lr = "".join(f"; at lr {k[len('every_eval_lr_'):]} alone: {toolkit.num(v['spearman_kl_B'])} on B"
                     for k, v in corr.items() if k.startswith("every_eval_lr_"))
    lines += ["", f"SDFT's drop of A at matched B is at most half of SFT-on-answers': **{toolkit.verdict(half)}** "
              f"({cases}; n/a: not every seed reached matched B). A's drop against KL(π₀ ‖ π) over every evaluation "
              f"({corr['every_eval']['points']} points): Spearman {toolkit.num(corr['every_eval']['spearman_kl_B'])} "
              f"with the KL on B's prompts, {toolkit.num(corr['every_eval']['spearman_kl_A'])} with the KL on A's "
              f"(at least 0.8 on B: **{toolkit.verdict(rho)}**{per_lr}). The control keeps A at the learning rate it ran at: "
              f"**{toolkit.verdict(ctrl) if ctrl['ran'] else 'not run'}**.", "", f"![B, the KL on B, A, and A's drop against the KL]({results_dir}/sdft.png)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: the "
                   "scale's at each learning rate)")


def start_point(world: dict, expert: str, eval_prompts: int) -> dict:
    """π₀'s pass@1 on A and on plain B and the expert's on B, as the first evaluation measures them, and π₀'s
    sampled pass@1 behind the privileged prompt (256 held-out prompts, as the world was built)."""
    from transformers import AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.experiments.worlds import PRIVILEGED_TEMPLATE, accuracies
    from opd_mini.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    kw = dict(num_prompts=eval_prompts, num_samples=4, k=1, max_new_tokens=RUN["max_new_tokens"], seed=0)
    student, teacher = toolkit.load_frozen(world["student"]), toolkit.load_frozen(expert)
    b = get_task(B_TASK)
    return {"A_start": evaluate(student, tokenizer, get_task(A_TASK), **kw, split="all")["eval/pass@1"],
            "B_start": evaluate(student, tokenizer, b, **kw)["eval/pass@1"],
            "B_privileged": accuracies(student, tokenizer, b, max_new_tokens=RUN["max_new_tokens"],
                                       template=PRIVILEGED_TEMPLATE)["sampled"],
            "B_expert": evaluate(teacher, tokenizer, b, **kw)["eval/pass@1"]}


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import PRIVILEGED_TEMPLATE, ensure_setting

    scale_name = "quick" if args.quick else "full"
    scale, seeds = SCALES[scale_name], toolkit.parse_seeds(args.seeds)
    chosen = toolkit.parse_names(args.methods, METHODS, "methods", default=list(METHODS))
    lrs = {float(lr): {"steps": x["steps"] if args.steps is None else args.steps,
                       "methods": [m for m in x["methods"] if m in chosen]} for lr, x in scale["lrs"].items()}
    lrs = {lr: x for lr, x in lrs.items() if x["methods"]}
    if not lrs:
        raise ValueError(f"--methods {args.methods} names none of the methods this scale runs: "
                         f"{', '.join(dict.fromkeys(m for x in scale['lrs'].values() for m in x['methods']))}")
    world = ensure_setting("sdft", progress=False)
    expert = ensure_setting("compounding", progress=False)["teacher"]
    start = start_point(world, expert, scale["eval_prompts"])
    target = start["B_start"] + scale["target_gap"] * (start["B_privileged"] - start["B_start"])
    out = Path(args.out)
    names = {"A": A_TASK, "expert": expert, "template": PRIVILEGED_TEMPLATE}
    jobs = [{"method": name, "config": toolkit.run_config(
        toolkit.fill({**RUN, **METHODS[name]}, names), student=world["student"], tokenizer=world["tokenizer"],
        lr=lr, seed=seed, steps=x["steps"], eval_every=min(scale["eval_every"], x["steps"]),
        eval_prompts=scale["eval_prompts"], out_dir=str(out / "runs" / f"{name}-lr{lr:g}-seed{seed}"))}
        for lr, x in lrs.items() for name in x["methods"] for seed in seeds]
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="sdft runs", progress=not args.no_progress)
    entries = method_results(runs, [(m, lr) for lr, x in lrs.items() for m in x["methods"]], target)
    corr = correlations(entries)
    return {"scale": scale_name, "seeds": seeds, "methods": entries, "correlation": corr,
            "setup": {"A_task": A_TASK, "B_task": B_TASK, **start, "matched_B": target, "target_gap": scale["target_gap"],
                      "lrs": {str(lr): x for lr, x in lrs.items()}, "headline_lr": HEADLINE_LR,
                      "world": "sdft (opd_mini.experiments.worlds)",
                      "expert": "compounding teacher (opd_mini.experiments.worlds)", "template": PRIVILEGED_TEMPLATE,
                      "run": dict(RUN)},
            "claims": claims(entries, corr, control_claim(entries))}


def failure(result: dict) -> str | None:
    """No run reached matched B: forgetting cannot be compared there (exit code 2)."""
    if not any(x is not None for e in result["methods"] for x in e["A_drop_at_matched_B"]):
        return (f"no run reached the matched B success ({result['setup']['matched_B']:.3f}) within its budget, so "
                "forgetting cannot be compared there: raise --steps")
    return None


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
