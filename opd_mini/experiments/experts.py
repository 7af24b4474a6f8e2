"""Merging experts: distil a reversal expert and an addition expert into one student.

    python -m opd_mini.experiments experts [--quick] [--methods opd_two_teachers,sft_mixture] [--seeds 0,1,2] [--lora]
                                           [--out DIR]

The student is the ``experts`` world's model (:mod:`opd_mini.experiments.worlds`): a small transformer trained on
both tasks, ``reverse:5`` and ``add:2``, until its addition reached pass@1 0.2; by then it knows reversal well
(pass@1 above 0.9), so the question is whether a merge learns addition without losing reversal. The reversal expert is the ``counter_example``
teacher, the addition expert the ``experts`` setting's teacher; all share the character tokenizer.
Four methods train the student through the same loop (:func:`opd_mini.train.train`), from the same start,
with the same optimiser, learning rate and number of sequences per step:

=====================  ===============================================================================
``opd_two_teachers``   OPD on the mixture ``reverse:5+add:2``: each task's rollouts scored by its own expert
``sft_mixture``        SFT on the same mixture: each task's samples drawn from its own expert
``opd_reverse_only``   OPD on reversal alone, from the reversal expert
``opd_add_only``       OPD on addition alone, from the addition expert
=====================  ===============================================================================

Every run is evaluated on both tasks (``eval_task`` = the mixture: ``eval/pass@1/TASK`` for each); during
training a run has the KL to the expert of each task it trains on (``eval/kl_reverse/TASK``). After
training, every final student is scored once more on each task's held-out prompts (the same prompts and
sampling seeds as the loop's evaluation) with **both** experts: pass@1 per task and the per-token
reverse KL to each task's expert, KL(π ‖ q_TASK) on the student's own samples, for every method.

Writes ``OUT/experts.json`` (every number, per seed), ``OUT/experts.md`` (the table and the claims) and
``OUT/experts.png`` (pass@1 per task and KL to each task's expert against steps). Runs go to ``OUT/runs``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import mean

NAME = "experts"
QUICK_HELP = "the small budget (under a minute on 2 cores; the tests use it)"
REVERSE, ADD = "reverse:5", "add:2"
MIXTURE = f"{REVERSE}+{ADD}"
TASKS = (REVERSE, ADD)
#: The OPD loss of every OPD method (full-vocabulary reverse KL: the vocabulary has 101 tokens).
OPD_LOSS = "reverse_kl_full"
#: The settings, from recipes/experiments/experts.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: name -> the TrainConfig fields that make the method ({R}, {A} = the reversal and addition experts' paths).
METHODS: dict[str, dict] = RECIPE["methods"]
#: Which tasks each method trains on (and so has an expert for during training).
TRAINED_ON = {"opd_two_teachers": TASKS, "sft_mixture": TASKS, "opd_reverse_only": (REVERSE,), "opd_add_only": (ADD,)}
SCALES: dict[str, dict] = RECIPE["scales"]
#: What every run shares: full fine-tuning of the small student, the demo's loop settings, lr 1e-3.
RUN = RECIPE["run"]

#: ``--lora``: a rank-8 LoRA adapter on every linear layer instead, at the retention experiment's LoRA lr.
LORA = RECIPE["lora"]

# --------------------------------------------------------------------------------------------
# one run (a worker process)
# --------------------------------------------------------------------------------------------


def posthoc(model_dir: str, experts: dict[str, str], c: dict) -> dict:
    """The model at ``model_dir`` (run config ``c``) on each task's held-out prompts (the loop's prompts and
    sampling seeds): pass@1 and KL(π ‖ q_TASK) per token to that task's expert."""
    from transformers import AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.tasks import get_task
    from opd_mini.teacher import score

    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    if (Path(model_dir) / "adapter_config.json").exists():  # a LoRA run: its adapter on the student's weights
        model = toolkit.load_frozen(c["student"], model_dir).merge_and_unload().eval()
    else:
        model = toolkit.load_frozen(model_dir)
    out: dict = {"pass@1": {}, "kl": {}}
    for name in TASKS:
        expert = toolkit.load_frozen(experts[name])
        vocab = min(len(tokenizer), model.config.vocab_size, expert.config.vocab_size)
        r = evaluate(model, tokenizer, get_task(name), num_prompts=c["eval_prompts"], num_samples=c["eval_samples"],
                     k=c["pass_k"], max_new_tokens=c["max_new_tokens"], temperature=c["eval_temperature"],
                     seed=c["seed"], split="all", sampler_options=dict(method=c["sampler"]),
                     score_teacher=lambda batch, e=expert: score(e, batch, vocab_size=vocab,  # noqa: E731
                                                                 chunk_size=c["teacher_chunk_size"]))
        out["pass@1"][name], out["kl"][name] = r["eval/pass@1"], r["eval/kl_reverse"]
    return out


def _per_task(row: dict, key: str, task: str, c: dict) -> float | None:
    """``eval/KEY`` of ``task`` in one evaluation: a mixture's per-task key, a single task's own key, or (pass@1)
    the retention task's."""
    if f"eval/{key}/{task}" in row:
        return row[f"eval/{key}/{task}"]
    if c["task"] == task:
        return row.get(f"eval/{key}")
    return row.get("eval/retention_pass@1") if key == "pass@1" and c["retention_task"] == task else None


def run_job(job: dict) -> dict:
    """Train one (method, seed), then score its final student with both experts."""
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['method']} / seed {c['seed']}")
    hist = summary["eval_history"]
    curves = {"pass@1": {t: [_per_task(h, "pass@1", t, c) for h in hist] for t in TASKS},
              "kl": {t: [_per_task(h, "kl_reverse", t, c) for h in hist] for t in TASKS}}
    final = posthoc(str(Path(summary["checkpoint"]) / "model"), job["experts"], c)
    return {"method": job["method"], "seed": c["seed"], "steps": [h["step"] for h in hist], "curves": curves,
            "final": final, "train_time_s": summary["train_time_s"],
            "eval_prompts_trained_on": summary["eval_prompts_trained_on"]}


# --------------------------------------------------------------------------------------------
# results, claims, table, figure
# --------------------------------------------------------------------------------------------


def method_results(runs: list[dict], methods: list[str]) -> list[dict]:
    """One entry per method: final pass@1 and KL to each task's expert per seed (post-hoc), and the curves."""
    out = []
    for name in methods:
        mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
        out.append({
            "method": name, "trained_on": list(TRAINED_ON[name]), "seeds": [r["seed"] for r in mine],
            "steps": mine[0]["steps"],
            "pass@1": {t: [r["final"]["pass@1"][t] for r in mine] for t in TASKS},
            "kl": {t: [r["final"]["kl"][t] for r in mine] for t in TASKS},
            "curves": {key: {t: [r["curves"][key][t] for r in mine] for t in TASKS} for key in ("pass@1", "kl")},
            "start_pass@1": {t: [r["curves"]["pass@1"][t][0] for r in mine] for t in TASKS},
            "train_time_s": [round(r["train_time_s"], 1) for r in mine]})
    return out


def claims(entries: list[dict]) -> dict:
    """What was measured, as statements that hold or not (means over seeds of the final, post-hoc numbers)."""
    by = {e["method"]: e for e in entries}
    out: dict = {}
    if "opd_two_teachers" not in by:
        return out
    two = by["opd_two_teachers"]

    def against(single_task: tuple, holds) -> list[dict]:  # the two-teacher student against each single run
        cases = []
        for single, task in single_task:
            if single in by:
                a, b = mean(two["pass@1"][task]), mean(by[single]["pass@1"][task])
                cases.append({"single": single, "task": task, "two_teachers": a, "single_run": b, "holds": holds(a, b)})
        return cases

    for key, pairs, holds in (
            ("two_teachers_beat_single_on_unseen_task", (("opd_reverse_only", ADD), ("opd_add_only", REVERSE)),
             lambda a, b: a > b),
            ("two_teachers_within_0.05_of_single_on_its_task", (("opd_reverse_only", REVERSE), ("opd_add_only", ADD)),
             lambda a, b: a >= b - 0.05)):
        cases = against(pairs, holds)
        if cases:
            out[key] = toolkit.claim(all(c["holds"] for c in cases), cases=cases)
    if "sft_mixture" in by:
        sft = by["sft_mixture"]
        for key, what, better in (("two_teachers_beat_sft_mixture_pass@1", "pass@1", lambda a, b: a > b),
                                  ("two_teachers_lower_kl_than_sft_mixture", "kl", lambda a, b: a < b)):
            cases = [{"task": t, "two_teachers": mean(two[what][t]), "sft_mixture": mean(sft[what][t]),
                      "holds": better(mean(two[what][t]), mean(sft[what][t]))} for t in TASKS]
            out[key] = toolkit.claim(all(c["holds"] for c in cases), cases=cases)
    return out


def _pm(values: list) -> str:
    return toolkit.fmt(values, never="—")


def table(result: dict) -> str:
    """The Markdown table: final pass@1 per task and KL to each task's expert, mean ± std over seeds."""
    lines = [f"| method | trained on | pass@1 {REVERSE} | pass@1 {ADD} | KL to the reversal expert ({REVERSE}) | "
             f"KL to the addition expert ({ADD}) |", "|---|---|---|---|---|---|"]
    s = result["start"]
    lines.append(f"| student at the start | — | {_pm(s['pass@1'][REVERSE])} | {_pm(s['pass@1'][ADD])} | "
                 f"{_pm(s['kl'][REVERSE])} | {_pm(s['kl'][ADD])} |")
    for e in result["methods"]:
        lines.append(f"| {e['method']} | {' + '.join(e['trained_on'])} | {_pm(e['pass@1'][REVERSE])} | "
                     f"{_pm(e['pass@1'][ADD])} | {_pm(e['kl'][REVERSE])} | {_pm(e['kl'][ADD])} |")
    x = result["experts"]
    lines.append(f"| the expert of the task | — | {x[REVERSE]['pass@1']:.3f} | {x[ADD]['pass@1']:.3f} | 0 | 0 |")
    return "\n".join(lines)


#: The claims' sentences, in the order of the block.
CLAIM_TEXT = {
    "two_teachers_beat_single_on_unseen_task": "The two-teacher student beats each single-teacher run on the task "
                                               "that run did not train on",
    "two_teachers_within_0.05_of_single_on_its_task": "On each task, the two-teacher student is within 0.05 pass@1 of "
                                                      "the single-teacher run that trained on it alone (with half its "
                                                      "prompts per step)",
    "two_teachers_beat_sft_mixture_pass@1": "Two-teacher OPD ends above SFT on the experts' samples on both tasks",
    "two_teachers_lower_kl_than_sft_mixture": "Two-teacher OPD ends closer to each expert (KL per token) than SFT on "
                                              "the experts' samples",
}


def _claim_lines(result: dict) -> list[str]:
    lines = []
    for key, text in CLAIM_TEXT.items():
        if key in result["claims"]:
            c = result["claims"][key]
            cases = "; ".join(f"{x['task']}: {x['two_teachers']:.3f} vs " + (
                f"{x['single']} {x['single_run']:.3f}" if "single" in x else f"{x['sft_mixture']:.3f}")
                for x in c["cases"])
            lines.append(f"- **{text}: {toolkit.verdict(c)}** ({cases}).")
    return lines


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block of merging-experts results, generated from experts.json."""
    run = result["run"]
    x, s = result["experts"], result["start"]["pass@1"]
    lines = [
        f"What `python -m opd_mini.experiments experts` measured ({len(result['seeds'])} seeds, {result['steps']} "
        f"steps × {run['prompts_per_step'] * run['num_generations']} sequences per run, "
        f"{'LoRA' if run['lora'] else 'full fine-tuning'}, lr {run['lr']:g}, OPD loss `{result['opd_loss']}`; "
        f"{result['wall_s']:.0f} s on 2 CPU cores; every number is in `{results_dir}/experts.json`). The student "
        f"is {result['student']}; it starts at pass@1 {mean(s[REVERSE]):.2f} on {REVERSE} and {mean(s[ADD]):.2f} on "
        f"{ADD}: it knows reversal well and addition weakly. The reversal expert ({x[REVERSE]['model']}) and the "
        f"addition expert ({x[ADD]['model']}) each know one task. The mixture runs split every step's prompts half "
        "and half. "
        f"After training every student is evaluated on both tasks ({result['eval_prompts']} held-out prompts × "
        f"{run['eval_samples']} samples each) and scored by both experts: pass@1 and the per-token KL(π ‖ q) to the "
        "task's expert on the student's own samples, mean ± std over seeds:", "",
        table(result), "", *_claim_lines(result), "",
        f"![pass@1 and KL to each expert against steps]({results_dir}/experts.png)"]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """pass@1 (top) and the KL to the task's expert (bottom) against steps, one column per task, ± 1 std.
    The KL curve of a single-teacher run exists only for its own task (the loop scores with the teachers it has);
    the post-hoc final KL of every run is the marker at the last step."""
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(2, len(TASKS), figsize=(4.6 * len(TASKS), 6.4), squeeze=False)
    for e in result["methods"]:
        color = None
        for col, t in enumerate(TASKS):
            for row, key in enumerate(("pass@1", "kl")):
                curves, ax = e["curves"][key][t], axes[row][col]
                if all(v is not None for c in curves for v in c):
                    color = toolkit.band(ax, e["steps"], curves, e["method"] if row == 0 and col == 0 else None,
                                         ls="-" if t in e["trained_on"] else "--", color=color).get_color()
                if key == "kl":
                    ax.errorbar([e["steps"][-1]], [mean(e["kl"][t])], yerr=[toolkit.mean_std(e["kl"][t])[1]], fmt="o",
                                ms=4, color=color, capsize=2)
    for col, t in enumerate(TASKS):
        axes[0][col].set(title=t, ylabel="pass@1 (held-out)")
        axes[1][col].set(ylabel=f"KL(π ‖ {t} expert) per token", xlabel="step")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle("dashed: a task the run does not train on; dots: final KL, scored after training", fontsize=9)
    toolkit.save(fig, path)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    p.add_argument("--lora", action="store_true", help=f"train a LoRA adapter ({LORA}) instead of every weight")


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.experiments.worlds import ensure_setting
    from opd_mini.tasks import get_task

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    methods = toolkit.parse_names(args.methods, METHODS, "methods")
    run = {**RUN, **(LORA if args.lora else {})}
    world = ensure_setting("experts", progress=False)
    experts = {REVERSE: str(ensure_setting("counter_example", progress=False)["teacher"]), ADD: world["teacher"]}
    names = {"R": experts[REVERSE], "A": experts[ADD]}
    jobs = [{"method": name, "experts": experts, "config": toolkit.run_config(
                run, toolkit.fill(METHODS[name], names), student=world["student"], tokenizer=world["tokenizer"],
                seed=seed, steps=steps, eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
                out_dir=str(Path(args.out) / "runs" / f"{name}-seed{seed}"))}
            for name in methods for seed in seeds]
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="experts runs", progress=not args.no_progress)

    # each expert on its own task, with the runs' evaluation (seed 0's prompts and sampling)
    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    expert_pass = {t: evaluate(toolkit.load_frozen(experts[t]), tokenizer, get_task(t),
                               num_prompts=scale["eval_prompts"], num_samples=run["eval_samples"], k=1,
                               max_new_tokens=run["max_new_tokens"], seed=seeds[0], split="all")["eval/pass@1"]
                   for t in TASKS}
    entries = method_results(runs, methods)
    # the start: every run's step-0 evaluation (the same student; per seed, the same prompts); its KL to each
    # expert comes from the runs that had that expert from step 0
    start = {"pass@1": {t: entries[0]["start_pass@1"][t] for t in TASKS}, "kl": {}}
    for t in TASKS:
        having = next((e for e in entries if e["curves"]["kl"][t][0][0] is not None), None)
        start["kl"][t] = [c[0] for c in having["curves"]["kl"][t]] if having else [None]
    return {
        "scale": scale_name, "seeds": seeds, "steps": steps, "eval_prompts": scale["eval_prompts"],
        "run": run, "opd_loss": OPD_LOSS, "tasks": list(TASKS),
        "student": "the experts world's student (opd_mini.experiments.worlds)",
        "student_info": world["info"]["student"]["final"],
        "experts": {REVERSE: {"model": "the counter_example teacher", "pass@1": expert_pass[REVERSE]},
                    ADD: {"model": "the experts world's teacher", "pass@1": expert_pass[ADD]}},
        "methods_config": {k: {f: v for f, v in m.items() if f != "teachers"} for k, m in METHODS.items()
                           if k in methods},
        "start": start, "methods": entries, "claims": claims(entries)}


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
