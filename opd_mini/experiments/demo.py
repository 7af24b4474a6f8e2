"""Why on-policy distillation learns fast, or does not, on tiny transformers: four settings, eight methods.

    python -m opd_mini.experiments demo [--quick] [--settings compounding,noisy_teacher] [--methods sft,opd_full]
                                        [--seeds 0,1,2,3,4] [--out runs/demo] [--workers 2]

Each **setting** (:mod:`opd_mini.experiments.worlds`) is a task, a teacher built to a target accuracy and a
student warm-started to a lower one:

* ``counter_example``: reversal with a near-perfect teacher (the documented case where continued SFT wins);
* ``compounding``: a walk to a goal; the teacher knows how to repair a wrong move, its own samples
  never need to, the student has seen direct paths only;
* ``noisy_teacher``: a stochastic teacher, greedy walk right, sampled pass@1 about 0.7;
* ``capacity``: a one-layer width-16 student (about a twentieth of the teacher's parameters).

Each **method** trains the student through the same :func:`opd_mini.train.train` loop, from the same
warm start, with the same optimiser, learning rate and budget (steps × 64 sequences); only the loss
differs (method names start with ``sft``, ``grpo`` or ``opd``):

====================  ==========================================================================
``sft``               continued SFT on teacher samples (off-policy)
``opd_sampled``       OPD, sampled-token reverse KL (the student samples, the teacher scores)
``opd_topk``          OPD, reverse KL inside the teacher's top-K (renormalised)
``opd_topk_tail``     OPD, reverse KL over the teacher's top-K plus one bucket for the mass outside them
``opd_full``          OPD, full-vocabulary reverse KL
``opd_jsd``           OPD, generalised JSD (β = 0.5), between forward and reverse KL
``grpo``              RL with the task's verifier, no teacher
``opd_grpo``          OPD + the verifier's reward (advantages mixed)
====================  ==========================================================================

Reported per setting and method, over seeds (mean ± standard deviation; "never" when a seed does not
reach the target): **student sequences to the target**, the first evaluation where pass@1 closes half
(``--quick``: 30 %; two settings, three methods) of the gap between the student's start and the teacher's sampled pass@1 (SFT's sequences are teacher
samples); **wall seconds** and **FLOPs** to that point; final pass@1, pass@k, per-token KL to the
teacher and per-token entropy (the teacher's own entropy on its own samples beside it); and on the
final student's samples, **recovery**: the share that **deviate** (emit a token the teacher gives
probability < 0.1), the share whose first deviation is **recoverable** (the teacher, continuing from that
prefix, finishes correctly in at least one of 4 samples), and the student's **success after a recoverable
deviation** (pooled over the seeds, beside the number of such samples): whether it repairs what it broke, the
quantity on which on-policy training should differ.

FLOPs are estimated from parameter counts P (all weights) and the tokens of each step, logged by the
loop, prompts included: 2·P per token for a forward pass (sampling with a KV cache: the prompt once, then
each new token; teacher scoring) and 6·P for a student forward + backward; the sampler of SFT is the
teacher, GRPO has no teacher pass.

``walk:10`` has only 90 distinct prompts, so its evaluation prompts are also training prompts (the
JSON gives the share): there the comparison is of how fast each method learns a policy over a small
set of prompts, not of generalisation to new ones.

Writes ``OUT/demo.json`` (every number, per seed), ``OUT/demo.md`` (the docs block, then the full tables with
seconds and FLOPs) and ``OUT/demo.png`` (pass@1 against student sequences, one panel per setting, bands of
± one standard deviation). Runs go to ``OUT/runs`` in ``--workers`` processes, one torch thread each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.recovery import (DEVIATION_P, RECOVERY_CONTINUATIONS, deviations,  # noqa: F401
                                          policy_stats)
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "demo"
QUICK_HELP = "the small budget: the two walk settings, three methods, 30 steps (under a minute on 2 cores)"
#: The settings, from recipes/experiments/demo.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: The methods: name -> loss of the training loop (see the module docstring).
METHODS: dict[str, str] = RECIPE["methods"]
SETTING_NAMES = ("counter_example", "compounding", "noisy_teacher", "capacity")

#: Budgets: the full demo (about 10 minutes on 2 cores) and --quick (the tests use it: the settings and methods
#: whose claims they check).
SCALES: dict[str, dict] = RECIPE["scales"]
#: What every run shares: the loop's settings apart from the loss.
#: (No divergence stop: a rare teacher token can spike SFT's gradient norm; clipping bounds those steps.)
RUN = RECIPE["run"]
#: Teacher samples per prompt for its own pass@1 and entropy.
TEACHER_SAMPLES = 8


# --------------------------------------------------------------------------------------------
# one run (a worker process)
# --------------------------------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """Train one (setting, method, seed) and measure it; returns a JSON-able dict."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"{job['setting']} / {job['method']} / seed {c['seed']}")
    steps = [r for r in summary["log"] if "time/step" in r]
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    task = get_task(c["task"])
    examples = held_out_examples(task, c["eval_prompts"], c["seed"])
    student = toolkit.load_frozen(str(Path(summary["checkpoint"]) / "model"))
    final = policy_stats(student, toolkit.load_frozen(c["teacher"]), tokenizer, task, examples,
                         max_new_tokens=c["max_new_tokens"], seed=c["seed"])
    return {
        "setting": job["setting"], "method": job["method"], "seed": c["seed"],
        "evals": [{k: h[k] for k in ("step", "eval/pass@1", "eval/pass@k", "eval/kl_reverse")}
                  for h in summary["eval_history"]],
        "step_seconds": [r["time/step"] for r in steps],
        "step_tokens": [r["rollout/num_tokens"] for r in steps],
        "train_s": summary["train_time_s"], "final": final,
        "eval_prompts_trained_on": summary["eval_prompts_trained_on"],
    }


def setting_job(job: dict) -> dict:
    """The teacher's and the starting student's measurements of one setting (same prompts as the runs)."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task
    from opd_mini.tiny import num_parameters

    toolkit.quiet_worker()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    task = get_task(job["task"])
    teacher, student = toolkit.load_frozen(job["teacher"]), toolkit.load_frozen(job["student"])
    prompts = [e.prompt for e in held_out_examples(task, job["eval_prompts"], job["seeds"][0])]
    out = {"setting": job["setting"], "teacher_params": num_parameters(teacher),
           "student_params": num_parameters(student),
           "prompt_tokens": sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)}
    for seed in job["seeds"]:
        examples = held_out_examples(task, job["eval_prompts"], seed)
        out[f"teacher/{seed}"] = policy_stats(teacher, None, tokenizer, task, examples,
                                              max_new_tokens=job["max_new_tokens"], samples=TEACHER_SAMPLES, seed=seed)
        out[f"student/{seed}"] = policy_stats(student, teacher, tokenizer, task, examples,
                                              max_new_tokens=job["max_new_tokens"], seed=seed)
    return out


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def flops_per_step(method: str, tokens: float, n_sequences: int, prompt_len: float, p_student: int,
                   p_teacher: int) -> float:
    """FLOPs of one step with ``tokens`` completion tokens (see the module docstring)."""
    total = tokens + n_sequences * prompt_len  # every token of the step's sequences, prompts included
    sampler = p_teacher if method == "sft" else p_student
    teacher = 0 if method in ("sft", "grpo") else p_teacher
    return 2 * sampler * total + 2 * teacher * total + 6 * p_student * total


def to_target(run: dict, target: float, sequences_per_step: int, flops: list[float]) -> dict:
    """Sequences, seconds and FLOPs at the first evaluation (after step 0) with pass@1 ≥ target; None if never."""
    for e in run["evals"][1:]:
        if e["eval/pass@1"] >= target:
            s = e["step"]
            return {"sequences": s * sequences_per_step, "seconds": sum(run["step_seconds"][:s]),
                    "flops": sum(flops[:s])}
    return {"sequences": None, "seconds": None, "flops": None}


def pooled(stats: list[dict], prefix: str = "") -> dict:
    """The success after a recoverable deviation over every seed's samples together (per seed there may be few):
    ``recovered_pooled`` (None when no sample deviated recoverably) and ``recoverable_total``, the samples behind it."""
    n = sum(s["recoverable_n"] for s in stats)
    return {f"{prefix}recovered_pooled": sum(s["recovered_n"] for s in stats) / n if n else None,
            f"{prefix}recoverable_total": n}


def recovery(rate: float | None, n: int) -> str:
    """A pooled success after a recoverable deviation, with the number of samples behind it."""
    return "no case" if not n else f"{rate:.2f} of {n}"


def aggregate(setting: dict, runs: list[dict], methods: list[str], seeds: list[int], prompt_len: float,
              gap_fraction: float) -> dict:
    """One setting's entry of demo.json."""
    seqs = RUN["prompts_per_step"] * RUN["num_generations"]
    teacher_p1 = mean_std([setting[f"teacher/{s}"]["pass@1"] for s in seeds])[0]
    start_p1 = mean_std([r["evals"][0]["eval/pass@1"] for r in runs])[0]
    target = start_p1 + gap_fraction * (teacher_p1 - start_p1)
    entry = {"name": setting["setting"], "task": setting["task"], "about": setting["about"],
             "teacher_params": setting["teacher_params"], "student_params": setting["student_params"],
             "teacher_pass@1": teacher_p1,
             "teacher_pass@1_per_seed": [setting[f"teacher/{s}"]["pass@1"] for s in seeds],
             "eval_prompts_also_trained_on": mean_std([r["eval_prompts_trained_on"] for r in runs])[0],
             "teacher_entropy": mean_std([setting[f"teacher/{s}"]["entropy"] for s in seeds])[0],
             "student_start_pass@1": start_p1,
             "student_start_entropy": mean_std([setting[f"student/{s}"]["entropy"] for s in seeds])[0],
             **{f"student_start_{k}": toolkit.mean([setting[f"student/{s}"][k] for s in seeds])
                for k in ("deviated", "recoverable")},
             **pooled([setting[f"student/{s}"] for s in seeds], "student_start_"),
             "target_pass@1": target, "methods": []}
    for method in methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        reached = []
        for r in mine:
            flops = [flops_per_step(method, t, seqs, prompt_len, setting["student_params"], setting["teacher_params"])
                     for t in r["step_tokens"]]
            reached.append(to_target(r, target, seqs, flops))
        entry["methods"].append({
            "method": method, "loss": METHODS[method], "seeds": [r["seed"] for r in mine],
            "samples_to_target": [x["sequences"] for x in reached],
            "seconds_to_target": [x["seconds"] for x in reached],
            "flops_to_target": [x["flops"] for x in reached],
            "final_pass@1": [r["evals"][-1]["eval/pass@1"] for r in mine],
            "final_pass@k": [r["evals"][-1]["eval/pass@k"] for r in mine],
            "final_kl": [r["evals"][-1]["eval/kl_reverse"] for r in mine],
            "entropy": [r["final"]["entropy"] for r in mine],
            "deviated": [r["final"]["deviated"] for r in mine],
            "recoverable": [r["final"]["recoverable"] for r in mine],
            "recovered": [r["final"]["recovered"] for r in mine],
            **pooled([r["final"] for r in mine]),
            "train_s": [r["train_s"] for r in mine],
            "curve": {"steps": [e["step"] for e in mine[0]["evals"]],
                      "sequences": [e["step"] * seqs for e in mine[0]["evals"]],
                      "pass@1": [[e["eval/pass@1"] for e in r["evals"]] for r in mine]},
        })
    return entry


def claims(result: dict) -> dict:
    """The issue's aims, evaluated on the results: ``holds`` True / False with the numbers behind them.

    Speed: an OPD variant (not the reward mix) that reached the target on every seed, against SFT and
    GRPO; a seed of theirs that never reached it counts as the whole budget (a lower bound, so the
    ratio is then a lower bound too, marked ``censored``)."""
    budget = result["steps"] * result["run"]["prompts_per_step"] * result["run"]["num_generations"]

    def mean_samples(m: dict) -> tuple[float, bool]:
        v = m["samples_to_target"]
        return sum(budget if x is None else x for x in v) / len(v), any(x is None for x in v)

    speed = []
    for s in result["settings"]:
        by = {m["method"]: m for m in s["methods"]}
        if "sft" not in by or "grpo" not in by:
            continue
        (sft, sft_censored), (grpo, grpo_censored) = mean_samples(by["sft"]), mean_samples(by["grpo"])
        for name, m in by.items():
            if not name.startswith("opd") or name == "opd_grpo" or None in m["samples_to_target"]:
                continue
            opd = mean_samples(m)[0]
            speed.append({"setting": s["name"], "method": name, "opd_samples": opd, "sft_samples": sft,
                          "grpo_samples": grpo, "vs_sft": sft / opd, "vs_grpo": grpo / opd,
                          "censored": sft_censored or grpo_censored,
                          "holds": sft / opd >= 3 and grpo / opd >= 5})
    above = []  # the OPD variants (not the reward mix) against the teacher measured on the same seed's prompts
    for s in result["settings"]:
        if s["name"] != "noisy_teacher":
            continue
        for m in s["methods"]:
            if m["method"].startswith("opd") and m["method"] != "opd_grpo":
                margins = [p - t for p, t in zip(m["final_pass@1"], s["teacher_pass@1_per_seed"])]
                above.append({"method": m["method"], "teacher_pass@1": s["teacher_pass@1_per_seed"],
                              "final_pass@1": m["final_pass@1"], "smallest_margin": min(margins),
                              "holds": min(margins) > 0})
    return {"opd_3x_fewer_than_sft_and_5x_fewer_than_grpo": {"holds": any(x["holds"] for x in speed), "cases": speed},
            "opd_above_noisy_teacher_every_seed": {"holds": any(x["holds"] for x in above), "cases": above}}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def start_recovery(s: dict) -> str:
    """The start student's deviations, in words."""
    n = s["student_start_recoverable_total"]
    return (f"{s['student_start_deviated']:.0%} of its samples deviate from the teacher's path, "
            f"{s['student_start_recoverable']:.0%} recoverably, and it succeeds after "
            + (f"{s['student_start_recovered_pooled']:.2f} of those ({n} samples over the seeds)" if n else
               "none (no sample deviated recoverably)"))


def tables(result: dict) -> str:
    """The Markdown tables: one per setting."""
    out = []
    for s in result["settings"]:
        out += [f"### {s['name']} ({s['task']})", "", s["about"] + ".", "",
                f"Teacher {s['teacher_params']:,} parameters, sampled pass@1 {s['teacher_pass@1']:.3f}, entropy "
                f"{s['teacher_entropy']:.3f} nats/token; student {s['student_params']:,} parameters, starts at pass@1 "
                f"{s['student_start_pass@1']:.3f}, {start_recovery(s)}; target pass@1 {s['target_pass@1']:.3f}.", "",
                "| method | sequences to target | seconds to target | GFLOPs to target | final pass@1 | pass@k | "
                "KL/token | entropy | deviate | recoverably | success after (of samples) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in s["methods"]:
            gflops = [None if x is None else x / 1e9 for x in m["flops_to_target"]]
            out.append(" | ".join([
                f"| {m['method']}", fmt(m["samples_to_target"], 0), fmt(m["seconds_to_target"], 1), fmt(gflops, 2),
                fmt(m["final_pass@1"]), fmt(m["final_pass@k"]), fmt(m["final_kl"]), fmt(m["entropy"]),
                fmt(m["deviated"], 2), fmt(m["recoverable"], 2),
                recovery(m["recovered_pooled"], m["recoverable_total"])]) + " |")
        out.append("")
    return "\n".join(out)


def details(result: dict) -> str:
    """The run's budget and the full tables (seconds and FLOPs too): the rest of ``OUT/demo.md``."""
    run, n = result["run"], len(result["seeds"])
    return (f"{n} seeds {result['seeds']}; {result['steps']} steps × {run['prompts_per_step'] * run['num_generations']} "
            f"sequences, lr {run['lr']}; {result['eval_prompts']} held-out prompts × {run['eval_samples']} samples; "
            f"pass@k with k = {run['pass_k']}; mean ± std over seeds, (k/{n}) when only k reached the target (the mean "
            f"is over those); wall time {result['wall_s']:.0f} s.\n\n" + tables(result))


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' demo block, generated from demo.json (a test keeps docs/results.md equal to it)."""
    run = result["run"]
    n = len(result["seeds"])
    lines = [f"What `python -m opd_mini.experiments demo` measured ({n} seeds, {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, "
             f"{'LoRA' if run['lora'] else 'full fine-tuning'}; {result['wall_s']:.0f} s on {result['cpus']} CPU cores; "
             f"every number is in `{results_dir}/demo.json`). Mean ± standard deviation over seeds; the target is "
             f"{result['gap_fraction']:.0%} of the way from the student's start to the teacher's sampled pass@1; "
             f"\"(k/{n})\" when only k seeds reached it (the mean is over those).", "",
             f"![pass@1 against student sequences]({results_dir}/demo.png)", ""]
    for s in result["settings"]:
        lines += [f"**{s['name']}** ({s['task']}; teacher pass@1 {s['teacher_pass@1']:.3f}, entropy "
                  f"{s['teacher_entropy']:.3f}; student starts at {s['student_start_pass@1']:.3f}, target "
                  f"{s['target_pass@1']:.3f}; {s['eval_prompts_also_trained_on']:.0%} of the evaluation prompts were "
                  f"also training prompts): {s['about']}.", "",
                  f"The start student: {start_recovery(s)}.", "",
                  "| method | sequences to target | final pass@1 | pass@k | entropy | deviate | recoverably | "
                  "success after (of samples) |", "|---|---|---|---|---|---|---|---|"]
        for m in s["methods"]:
            lines.append(" | ".join([f"| {m['method']}", fmt(m["samples_to_target"], 0), fmt(m["final_pass@1"]),
                                     fmt(m["final_pass@k"]), fmt(m["entropy"]), fmt(m["deviated"], 2),
                                     fmt(m["recoverable"], 2),
                                     recovery(m["recovered_pooled"], m["recoverable_total"])]) + " |")
        lines.append("")
    speed, above = result["claims"]["opd_3x_fewer_than_sft_and_5x_fewer_than_grpo"], \
        result["claims"]["opd_above_noisy_teacher_every_seed"]
    ratios = [f"{c['setting']}/{c['method']} {c['vs_sft']:.2f}× and {c['vs_grpo']:.2f}×" + (" (at least)" if c["censored"]
              else "") for c in speed["cases"]]
    lines.append(f"- **OPD needs ≥ 3× fewer student samples than SFT and ≥ 5× fewer than GRPO in some setting: "
                 f"{toolkit.verdict(speed)}.** SFT's and GRPO's sequences to the target divided "
                 f"by OPD's, for the OPD variants that reached it on every seed (a seed that never reached it counts "
                 f"as the whole budget): {'; '.join(ratios) or 'no OPD variant reached it on every seed'}.")
    best = max(above["cases"], key=lambda c: c["smallest_margin"], default=None)
    if best is not None:
        pairs = ", ".join(f"{p:.3f} vs {t:.3f}" for p, t in zip(best["final_pass@1"], best["teacher_pass@1"]))
        lines.append(f"- **An OPD student above the noisy teacher on every seed: {toolkit.verdict(above)}.** Closest "
                     f"OPD variant (the reward mix aside), {best['method']}, against the teacher on each seed's prompts: "
                     f"{pairs}.")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """pass@1 against student sequences, one panel per setting, mean ± one standard deviation over seeds."""
    plt = toolkit.pyplot()
    settings = result["settings"]
    cols = min(2, len(settings))
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, settings):
        for m in s["methods"]:
            toolkit.band(ax, m["curve"]["sequences"], m["curve"]["pass@1"],
                         ls="-" if m["method"].startswith("opd") else "--", **toolkit.style(m["method"]))
        ax.axhline(s["teacher_pass@1"], color="k", lw=1, label="teacher (sampled)")
        ax.axhline(s["target_pass@1"], color="k", lw=0.8, ls=":", label="target")
        ax.set(title=f"{s['name']} ({s['task']})", xlabel="student sequences", ylabel="pass@1 (evaluation prompts)",
               ylim=(0, 1))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.7 / (3.6 * rows + 0.6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)  # the scale's: 5 seeds, --quick 3
    p.add_argument("--settings", default=None, help=f"comma-separated, from {', '.join(SETTING_NAMES)} (default: all; "
                   f"--quick: {','.join(SCALES['quick']['settings'])})")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: all; "
                   f"--quick: {','.join(SCALES['quick']['methods'])})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate of every run (default {RUN['lr']})")


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    settings = toolkit.parse_names(args.settings, SETTING_NAMES, "settings", default=scale["settings"])
    methods = toolkit.parse_names(args.methods, METHODS, "methods", default=scale["methods"])
    lr = RUN["lr"] if args.lr is None else args.lr
    out = Path(args.out)

    jobs, setting_jobs, meta = [], [], {}
    for name in settings:
        s = get_setting(name)
        paths = ensure_setting(name, progress=False)
        meta[name] = {"task": s.task, "about": s.about}
        setting_jobs.append({"setting": name, "task": s.task, "teacher": paths["teacher"], "student": paths["student"],
                             "tokenizer": paths["tokenizer"], "max_new_tokens": s.max_new_tokens,
                             "eval_prompts": scale["eval_prompts"], "seeds": seeds})
        for method in methods:
            for seed in seeds:
                config = toolkit.run_config(
                    RUN, student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"], task=s.task,
                    max_new_tokens=s.max_new_tokens, steps=steps, eval_every=min(scale["eval_every"], steps),
                    eval_prompts=scale["eval_prompts"], loss=METHODS[method], seed=seed, lr=lr,
                    out_dir=str(out / "runs" / f"{name}-{method}-seed{seed}"))
                jobs.append({"setting": name, "method": method, "config": config})

    print(f"demo: {len(settings)} setting(s) × {len(methods)} method(s) × {len(seeds)} seed(s) = {len(jobs)} runs of "
          f"{steps} steps in {args.workers} process(es)", file=sys.stderr)
    done = toolkit.run_pool(None, [(setting_job, j) for j in setting_jobs] + [(run_job, j) for j in jobs], args.workers,
                            desc="demo", progress=not args.no_progress)
    setting_results = {r["setting"]: r for r in done if "teacher_params" in r}
    runs = [r for r in done if "evals" in r]

    result = {"scale": scale_name, "steps": steps, "seeds": seeds, "methods": methods,
              "run": {**RUN, "lr": lr}, "cpus": toolkit.cpus(), "gap_fraction": scale["gap_fraction"],
              "eval_prompts": scale["eval_prompts"], "settings": []}
    for name in settings:
        result["settings"].append(aggregate({**setting_results[name], **meta[name]},
                                            [r for r in runs if r["setting"] == name], methods, seeds,
                                            setting_results[name]["prompt_tokens"], scale["gap_fraction"]))
    result["claims"] = claims(result)
    return result


def failure(result: dict) -> str | None:
    """A budget in which no method reached its target answers nothing: say so (exit code 2)."""
    if all(x is None for s in result["settings"] for m in s["methods"] for x in m["samples_to_target"]):
        return (f"no method reached its target (pass@1 {result['gap_fraction']:.0%} of the way to the teacher's) in "
                f"any setting within {result['steps']} steps: raise --steps")
    return None


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
