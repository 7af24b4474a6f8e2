"""Learning a new skill on a transformer: how much of an old one each method forgets, and getting it back.

    python -m opd_mini.experiments retention [--quick] [--parts retention,recovery] [--methods sft,opd_sampled]
                                             [--seeds 0,1,2] [--out runs/retention]

**Retention.** The student π₀ is the ``continual`` world's model (:mod:`opd_mini.experiments.worlds`): it knows
skill A (``reverse:5``) and has seen a little of skill B (``walk:10``). With a LoRA adapter it learns B
from the B-expert (the compounding setting's walk teacher) by each method of :data:`METHODS`;
every evaluation measures B's pass@1, A's pass@1 and KL(π₀ ‖ π) per token on A's prompts (π₀ = the
adapter-disabled base, on its own samples). Forgetting is compared at **matched B success**: the first
evaluation where B's pass@1 closes ``target_gap`` of the gap from π₀ to the B-expert.

**Recovery.** From each seed's post-B ``sft`` adapter (A eroded), OPD on A's prompts with the pre-B
model as the teacher (the adapter-disabled base: no second copy), alone (``opd_A``) or with B's prompts
distilled from the post-B model at the same time (``opd_A+B``, per-task teachers); reported: the steps
until two thirds of A's drop is recovered, and B's pass@1 then and at the end.

(These were parts 1 and 3 of the forgetting experiment, whose part 2, self-distillation, is now
``python -m opd_mini.experiments forgetting``; the committed results of all three are in
``tutorials/results/forgetting.json``.) Writes ``OUT/retention.json``, ``OUT/retention.md`` and the figures
``OUT/retention.png`` and ``OUT/recovery.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt_reached, mean_std

NAME = "retention"
QUICK_HELP = "the small budget: SFT alone, 60 steps, then recovery (the tests use it)"
PARTS = ("retention", "recovery")
A_TASK, B_TASK = "reverse:5", "walk:10"
#: The settings, from recipes/experiments/retention.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: name -> the TrainConfig fields that make the method ({B} = the B-expert's path).
METHODS: dict[str, dict] = RECIPE["methods"]
#: Recovery: variant -> fields ({pre} = the pre-B teacher, {post} = the merged post-B model of the same seed).
RECOVERY_VARIANTS: dict[str, dict] = RECIPE["recovery_variants"]
SCALES: dict[str, dict] = RECIPE["scales"]
RUN = RECIPE["run"]
#: A retention task the student knows: its pass@1 at the start must reach this.
MIN_A = 0.5


def run_job(job: dict) -> dict:
    """Train one (method or variant, seed); returns its evaluation history and checkpoint."""
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['part']} / {job['method']} / seed {c['seed']}")
    return {"part": job["part"], "method": job["method"], "seed": c["seed"], "checkpoint": summary["checkpoint"],
            **toolkit.curves(summary, "pass@1", "retention_pass@1", "retention_kl_to_init")}


# --------------------------------------------------------------------------------------------
# retention at matched B success
# --------------------------------------------------------------------------------------------


def retention_results(runs: list[dict], methods: list[str], target: float) -> list[dict]:
    """One entry per method: A before, and at the first evaluation where B's pass@1 reaches ``target``, A's
    pass@1 and KL(π₀ ‖ π) on A's prompts (None where a seed never reached it), B at the end, the curves."""
    out = []
    for name in methods:
        mine = sorted((r for r in runs if r["part"] == "retention" and r["method"] == name), key=lambda r: r["seed"])
        hits = [toolkit.first_reaching(r["pass@1"], target) for r in mine]
        out.append({
            "method": name, "seeds": [r["seed"] for r in mine],
            "A_before": mean_std([r["retention_pass@1"][0] for r in mine])[0],
            "A_before_per_seed": [r["retention_pass@1"][0] for r in mine],
            "B_before": mean_std([r["pass@1"][0] for r in mine])[0],
            "matched_B": target,
            "steps_to_matched_B": [toolkit.at(r["steps"], i) for r, i in zip(mine, hits)],
            "A_at_matched_B": [toolkit.at(r["retention_pass@1"], i) for r, i in zip(mine, hits)],
            "kl_A_at_matched_B": [toolkit.at(r["retention_kl_to_init"], i) for r, i in zip(mine, hits)],
            "B_final": [r["pass@1"][-1] for r in mine], "A_final": [r["retention_pass@1"][-1] for r in mine],
            "kl_A_final": [r["retention_kl_to_init"][-1] for r in mine],
            "steps": mine[0]["steps"], "B_curves": [r["pass@1"] for r in mine],
            "A_curves": [r["retention_pass@1"] for r in mine], "kl_A_curves": [r["retention_kl_to_init"] for r in mine]})
    return out


def retention_correlations(entries: list[dict]) -> dict:
    """How A's drop tracks KL(π₀ ‖ π) on A's prompts: across (method, seed) at matched B, and across every
    evaluation of every run (Spearman and Pearson; None with fewer than three points)."""
    matched = [(e["A_before_per_seed"][i] - a, k) for e in entries
               for i, (a, k) in enumerate(zip(e["A_at_matched_B"], e["kl_A_at_matched_B"])) if a is not None]
    every = [(e["A_before_per_seed"][s] - a, k) for e in entries for s in range(len(e["seeds"]))
             for a, k in zip(e["A_curves"][s][1:], e["kl_A_curves"][s][1:])]
    out = {}
    for name, pts in (("at_matched_B", matched), ("every_eval", every)):
        drops, kls = [p[0] for p in pts], [p[1] for p in pts]
        out[name] = {"points": len(pts), "spearman": toolkit.spearman(drops, kls) if len(pts) > 2 else None,
                     "pearson": toolkit.pearson(drops, kls) if len(pts) > 2 else None}
    return out


def retention_claim(entries: list[dict]) -> dict:
    """The aim: each OPD method's drop of A at matched B is at most half of SFT's (mean over seeds; a method
    with a seed that never reaches matched B does not hold)."""
    drop = {e["method"]: (None if None in e["A_at_matched_B"] else
                          mean_std([b - a for b, a in zip(e["A_before_per_seed"], e["A_at_matched_B"])])[0])
            for e in entries}
    cases = [{"method": m, "drop": d, "sft_drop": drop.get("sft"),
              "holds": d is not None and drop.get("sft") is not None and d <= 0.5 * drop["sft"]}
             for m, d in drop.items() if m.startswith("opd")]
    return toolkit.claim(bool(cases) and all(c["holds"] for c in cases), cases=cases, drops=drop)


# --------------------------------------------------------------------------------------------
# recovery
# --------------------------------------------------------------------------------------------


def merge_adapter(base: str, adapter: str, tokenizer: str, out: Path) -> str:
    """The post-B model as a plain checkpoint: ``base`` with the LoRA ``adapter`` merged in (a teacher)."""
    from transformers import AutoTokenizer

    toolkit.load_frozen(base, adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return str(out)


def recovery_results(runs: list[dict], post_b: dict, variants: list[str]) -> list[dict]:
    """One entry per variant: A before and after B (the sft run of the same seed, ``post_b[seed]``), the steps
    until two thirds of A's drop is recovered, B then and at the end."""
    out = []
    for name in variants:
        mine = sorted((r for r in runs if r["part"] == "recovery" and r["method"] == name), key=lambda r: r["seed"])
        before = [post_b[r["seed"]]["retention_pass@1"][0] for r in mine]
        after = [post_b[r["seed"]]["retention_pass@1"][-1] for r in mine]
        b_after = [post_b[r["seed"]]["pass@1"][-1] for r in mine]
        levels = [a + 2 / 3 * (b - a) for a, b in zip(after, before)]
        hits = [toolkit.first_reaching(r["pass@1"], lv) for r, lv in zip(mine, levels)]
        out.append({
            "variant": name, "seeds": [r["seed"] for r in mine],
            "A_before_B": mean_std(before)[0], "A_after_B": mean_std(after)[0], "B_after_B": mean_std(b_after)[0],
            "A_before_B_per_seed": before, "A_after_B_per_seed": after, "B_after_B_per_seed": b_after,
            "two_thirds_level": levels,
            "steps_to_two_thirds": [toolkit.at(r["steps"], i) for r, i in zip(mine, hits)],
            "A_recovered": [r["pass@1"][-1] for r in mine],
            "B_at_two_thirds": [toolkit.at(r["retention_pass@1"], i) for r, i in zip(mine, hits)],
            "B_final": [r["retention_pass@1"][-1] for r in mine],
            "steps": mine[0]["steps"], "A_curves": [r["pass@1"] for r in mine],
            "B_curves": [r["retention_pass@1"] for r in mine]})
    return out


def recovery_claim(entries: list[dict]) -> dict:
    """The aim: every seed gets back two thirds of A's drop while B stays within 0.05 of its post-B value."""
    cases = []
    for e in entries:
        within = [None if b is None else abs(b - b0) <= 0.05 for b, b0 in zip(e["B_at_two_thirds"], e["B_after_B_per_seed"])]
        cases.append({"variant": e["variant"], "recovered_seeds": sum(x is not None for x in e["steps_to_two_thirds"]),
                      "B_within_0.05_seeds": sum(bool(x) for x in within), "seeds": len(e["seeds"]),
                      "holds": all(bool(x) for x in within)})
    return toolkit.claim(bool(cases) and all(c["holds"] for c in cases), cases=cases)


# --------------------------------------------------------------------------------------------
# figures and docs blocks
# --------------------------------------------------------------------------------------------


def figure(result: dict, path: Path) -> None:
    """B's pass@1, A's pass@1 and KL(π₀ ‖ π) on A against steps per method (± 1 std), and A's drop against
    the KL at every evaluation."""
    plt = toolkit.pyplot()
    setup = result["retention_setup"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for e in result["retention"]:
        kw = dict(ls="-" if e["method"].startswith("opd") else "--", **toolkit.style(e["method"]))
        line = toolkit.band(axes[0], e["steps"], e["B_curves"], **kw)
        toolkit.band(axes[1], e["steps"], e["A_curves"], **kw)
        toolkit.band(axes[2], e["steps"], e["kl_A_curves"], **kw)
        for s, a0 in enumerate(e["A_before_per_seed"]):
            axes[3].scatter(e["kl_A_curves"][s][1:], [a0 - a for a in e["A_curves"][s][1:]], s=9,
                            color=line.get_color(), alpha=0.6)
    axes[0].axhline(setup["matched_B"], color="grey", lw=0.8, ls=":")
    for ax, title in zip(axes, (f"B ({setup['B_task']}) pass@1; dotted: matched B", f"A ({setup['A_task']}) pass@1",
                                "KL(π₀ ‖ π) per token on A's prompts", "A's drop against the KL, every eval")):
        ax.set_title(title, fontsize=9)
    for ax in axes[:3]:
        ax.set_xlabel("step")
    axes[3].set(xlabel="KL(π₀ ‖ π) on A", ylabel="drop of A's pass@1")
    axes[1].legend(frameon=False, fontsize=8, loc="lower left")
    toolkit.save(fig, path)


def recovery_figure(result: dict, path: Path) -> None:
    """A's and B's pass@1 against recovery steps, per variant (± 1 std)."""
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for e in result["recovery"]:
        toolkit.band(axes[0], e["steps"], e["A_curves"], e["variant"])
        toolkit.band(axes[1], e["steps"], e["B_curves"], e["variant"])
    e0 = result["recovery"][0]
    axes[0].axhline(e0["A_before_B"], color="grey", lw=0.8, ls=":", label="A before B")
    axes[1].axhline(e0["B_after_B"], color="grey", lw=0.8, ls=":", label="B after B")
    for ax, title in zip(axes, ("A pass@1 during recovery", "B pass@1 during recovery")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("recovery step")
        ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)  # off the data
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' retention block, generated from the result."""
    setup = result["retention_setup"]
    lines = [f"Retention on a transformer (`python -m opd_mini.experiments retention`): the `continual` model knows A "
             f"(`{setup['A_task']}`, pass@1 {setup['A_start']:.3f}) and a little of B (`{setup['B_task']}`, "
             f"{setup['B_start']:.3f}); with a LoRA adapter it learns B from the B-expert (B pass@1 "
             f"{setup['B_expert']:.3f}), {len(result['seeds'])} seeds, {setup['steps']} steps. Matched B = the first "
             f"evaluation with B's pass@1 ≥ {setup['matched_B']:.3f}; mean ± std over the seeds that reach it:", "",
             "| method | steps to matched B | A at matched B | KL(π₀ ‖ π) on A at matched B | B final | A final |",
             "|---|---|---|---|---|---|"]
    for e in result["retention"]:
        lines.append(f"| {e['method']} | {fmt_reached(e['steps_to_matched_B'], 0)} | {fmt_reached(e['A_at_matched_B'])} | "
                     f"{fmt_reached(e['kl_A_at_matched_B'])} | {fmt_reached(e['B_final'])} | {fmt_reached(e['A_final'])} |")
    c = result["claims"]["opd_drop_at_most_half_of_sft"]
    cases = ", ".join(f"{x['method']} {x['drop']:.3f}" if x["drop"] is not None else f"{x['method']} not reached in every seed"
                      for x in c["cases"])
    sft = c["drops"].get("sft")
    corr = result["retention_correlation"]
    lines += ["", f"OPD's drop of A at matched B is at most half of SFT's: **{toolkit.verdict(c)}** "
              f"(drop of A's pass@1: sft {'not reached' if sft is None else f'{sft:.3f}'}; {cases}). "
              f"A's drop against KL(π₀ ‖ π) on A: Spearman {toolkit.num(corr['every_eval']['spearman'])} over every "
              f"evaluation ({corr['every_eval']['points']} points), {toolkit.num(corr['at_matched_B']['spearman'])} at "
              f"matched B ({corr['at_matched_B']['points']} points).", "",
              f"![B, A and the KL to π₀ against steps]({results_dir}/retention.png)"]
    return "\n".join(lines)


def recovery_block(result: dict, results_dir: str) -> str:
    """The docs' recovery block, generated from the result."""
    lines = [f"Recovery (`python -m opd_mini.experiments retention`, its second part): from each seed's post-B `sft` "
             f"adapter, {result['recovery_setup']['steps']} steps of sampled-token OPD with the pre-B model (the "
             "adapter-disabled base) as the teacher on A's prompts; `opd_A+B` also distils B's prompts from the post-B "
             "model. Mean ± std over seeds:", "",
             "| variant | A before B | A after B | steps to ⅔ of A's drop back | A recovered | B after B | B at ⅔ | B final |",
             "|---|---|---|---|---|---|---|---|"]
    for e in result["recovery"]:
        lines.append(f"| {e['variant']} | {e['A_before_B']:.3f} | {e['A_after_B']:.3f} | "
                     f"{fmt_reached(e['steps_to_two_thirds'], 0)} | {fmt_reached(e['A_recovered'])} | {e['B_after_B']:.3f} | "
                     f"{fmt_reached(e['B_at_two_thirds'])} | {fmt_reached(e['B_final'])} |")
    c = result["claims"]["recovery_two_thirds_B_within_0.05"]
    cases = "; ".join(f"{x['variant']}: {x['recovered_seeds']}/{x['seeds']} seeds recover ⅔, "
                      f"{x['B_within_0.05_seeds']}/{x['seeds']} with B within 0.05" for x in c["cases"])
    lines += ["", f"Recovery gets back ⅔ of A's drop while B stays within 0.05 of its post-B value: "
              f"**{toolkit.verdict(c)}** ({cases}).", "", f"![A and B during recovery]({results_dir}/recovery.png)"]
    return "\n".join(lines)


#: The blocks and figures of each part.
OUTPUTS = {"retention": (docs_block, figure), "recovery": (recovery_block, recovery_figure)}


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: all; "
                   f"--quick: {','.join(SCALES['quick']['methods'])})")
    p.add_argument("--retention_task", default=A_TASK, help=f"skill A, which the student must know (default {A_TASK})")
    p.add_argument("--recovery_teacher", default="self", help="the pre-B teacher of recovery: 'self' (the student's "
                   "adapter-disabled base) or a save_pretrained directory")


def start_point(paths: dict, expert: str, a_task: str, b_task: str, eval_prompts: int) -> dict:
    """π₀'s pass@1 on A and B and the B-expert's on B, measured as every run's first evaluation measures them."""
    from transformers import AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    kw = dict(num_prompts=eval_prompts, num_samples=4, k=1, max_new_tokens=RUN["max_new_tokens"], seed=0, split="all")
    student, teacher = toolkit.load_frozen(paths["student"]), toolkit.load_frozen(expert)
    return {"A_start": evaluate(student, tokenizer, get_task(a_task), **kw)["eval/pass@1"],
            "B_start": evaluate(student, tokenizer, get_task(b_task), **kw)["eval/pass@1"],
            "B_expert": evaluate(teacher, tokenizer, get_task(b_task), **kw)["eval/pass@1"]}


def check_recovery_teacher(path: str, tokenizer_path: str) -> None:
    """A pre-B teacher given by path must share the student's tokenizer (else the scores mean nothing)."""
    from transformers import AutoTokenizer

    from opd_mini.teacher import check_same_tokenizer

    if not Path(path).is_dir():
        raise ValueError(f"--recovery_teacher {path} is not a directory: give a save_pretrained checkpoint of the "
                         "student before it learned B, or 'self' (the adapter-disabled base)")
    try:
        theirs = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise ValueError(f"--recovery_teacher {path} has no tokenizer, so it cannot be checked against the "
                         "student's: save the checkpoint with its tokenizer") from None
    try:
        check_same_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path), theirs)
    except ValueError as e:
        raise ValueError(f"--recovery_teacher {path} does not match the student: {e}") from None


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting
    from opd_mini.tasks import get_task

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    if "recovery" in parts and "retention" not in parts:
        raise ValueError("--parts recovery needs retention too (it starts from the post-B sft adapters)")
    methods = toolkit.parse_names(args.methods, METHODS, "methods", default=scale["methods"])
    if "recovery" in parts and "sft" not in methods:
        raise ValueError("recovery starts from the sft runs: add sft to --methods")
    a_task = args.retention_task
    get_task(a_task)
    world = ensure_setting("continual", progress=False)
    expert = ensure_setting("compounding", progress=False)["teacher"]
    if args.recovery_teacher != "self":
        check_recovery_teacher(args.recovery_teacher, world["tokenizer"])
    start = start_point(world, expert, a_task, B_TASK, scale["eval_prompts"])
    if start["A_start"] < MIN_A:
        raise ValueError(f"the student has not learned the retention task {a_task} (pass@1 {start['A_start']:.3f} < "
                         f"{MIN_A}): choose a task it knows, e.g. --retention_task {A_TASK}")
    target = start["B_start"] + scale["target_gap"] * (start["B_expert"] - start["B_start"])
    out = Path(args.out)
    names = {"A": a_task, "Btask": B_TASK, "B": expert}

    def config(fields: dict, names: dict, seed: int, steps: int, run_dir: str) -> dict:
        return toolkit.run_config(toolkit.fill({**RUN, **fields}, names), student=world["student"],
                                  tokenizer=world["tokenizer"], seed=seed, steps=steps,
                                  eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
                                  out_dir=str(out / "runs" / run_dir))

    jobs = [{"part": "retention", "method": name,
             "config": config(METHODS[name], names, seed, steps, f"retention-{name}-seed{seed}")}
            for name in methods for seed in seeds]
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="retention runs", progress=not args.no_progress)
    result: dict = {"scale": scale_name, "seeds": seeds, "parts": parts,
                    "retention_setup": {"A_task": a_task, "B_task": B_TASK, **start, "matched_B": target,
                                        "target_gap": scale["target_gap"], "steps": steps,
                                        "student": "continual (opd_mini.experiments.worlds)",
                                        "B_expert_model": "compounding teacher (opd_mini.experiments.worlds)",
                                        "run": dict(RUN)}}
    result["retention"] = retention_results(runs, methods, target)
    result["retention_correlation"] = retention_correlations(result["retention"])
    result["claims"] = {"opd_drop_at_most_half_of_sft": retention_claim(result["retention"])}
    if "recovery" in parts:
        post_b = {r["seed"]: r for r in runs if r["method"] == "sft"}
        rsteps = scale["recovery_steps"] if args.steps is None else args.steps
        pre = "self" if args.recovery_teacher == "self" else args.recovery_teacher
        rjobs = []
        for seed in seeds:
            adapter = str(Path(post_b[seed]["checkpoint"]) / "model")
            merged = merge_adapter(world["student"], adapter, world["tokenizer"], out / "runs" / f"post_b-seed{seed}")
            for variant, fields in RECOVERY_VARIANTS.items():
                fields = {"teacher": "self", **fields, "loss": "reverse_kl_sampled", "init_adapter": adapter,
                          "eval_task": "{A}", "retention_task": "{Btask}", "eval_kl_to_init": False}
                rjobs.append({"part": "recovery", "method": variant, "config": config(
                    fields, {**names, "post": merged, "pre": pre}, seed, rsteps, f"recovery-{variant}-seed{seed}")})
        rruns = toolkit.run_pool(run_job, rjobs, args.workers, desc="recovery runs", progress=not args.no_progress)
        result["recovery_setup"] = {"steps": rsteps, "loss": "reverse_kl_sampled", "pre_B_teacher":
                                    "the adapter-disabled base" if pre == "self" else pre}
        result["recovery"] = recovery_results(rruns, post_b, list(RECOVERY_VARIANTS))
        result["claims"]["recovery_two_thirds_B_within_0.05"] = recovery_claim(result["recovery"])
    return result


def failure(result: dict) -> str | None:
    """No run reached matched B: forgetting cannot be compared there (exit code 2)."""
    if not any(x is not None for e in result["retention"] for x in e["A_at_matched_B"]):
        setup = result["retention_setup"]
        return (f"no run reached the matched B success ({setup['matched_B']:.3f}) within {setup['steps']} steps, so "
                "forgetting cannot be compared there (reported as not reached in the results): raise --steps")
    return None


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
