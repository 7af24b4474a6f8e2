"""Two cheap versions of OPD the sources suggest: distil only a prefix of each completion, or train on one prompt.

    python -m opd_mini.experiments shortcuts [--quick] [--parts prefix,one_prompt] [--worlds compounding]
                                             [--seeds 0,1,2] [--out runs/shortcuts]

**The prefix.** "The OPD signal often concentrates in the prefix; distilling only the prefix may suffice", and the
teacher penalises early "forking tokens" most. With ``--prefix_fraction F`` the student's training rollouts stop
after ⌈F·T⌉ of their T new tokens; the teacher scores those and the loss reads them, while evaluation samples
whole completions. Sampling and scoring cost scales with the tokens drawn, so F is also the cost. For
F ∈ {0.25, 0.5, 1}, full-vocabulary OPD from the demo's worlds (``compounding``: walk:10, ``counter_example``:
reverse:5), the same budget in steps. Beside it, where the signal sits in these worlds: the mean |r_t| of the
start student's tokens by position, from the committed ``along`` results.

**One prompt.** "Training 20 steps on a single prompt … we still roughly reached the teacher's performance." With
``--train_prompts 1`` every step's prompts are one training prompt (drawn with the seed), sampled
``prompts_per_step × num_generations`` times; against four prompts and the whole training split, for OPD and
for SFT on the teacher's samples of the same prompts. Evaluation is on the held-out prompts. (``walk:10`` has
only 90 distinct prompts, so there the evaluation prompts are also training prompts of the whole split; the one
prompt is one of 90.)

Reported per world and variant, over seeds: final held-out pass@1 (the loop's evaluation), its start, the teacher's
sampled pass@1 on the same prompts and the tokens the training rollouts drew. Writes
``OUT/shortcuts.json``, ``OUT/shortcuts.md`` and ``OUT/shortcuts.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "shortcuts"
QUICK_HELP = "the small budget: counter_example, F ∈ {0.5, 1}, one prompt against all, OPD, 1 seed, 20 steps"
PARTS = ("prefix", "one_prompt")
WORLDS = ("compounding", "counter_example")
#: The settings, from recipes/experiments/shortcuts.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a
#: constant below: the loop's settings every run shares, the methods (name -> the loop's settings), the budgets.
RECIPE = toolkit.recipe(NAME)
RUN = RECIPE["run"]
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]


def run_job(job: dict) -> dict:
    """Train one (part, world, variant, method, seed); its curve and the tokens its rollouts drew."""
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['part']} / {job['world']} / {job['variant']} / {job['method']} / seed {c['seed']}")
    steps = [r for r in summary["log"] if "time/step" in r]
    return {**{k: job[k] for k in ("part", "world", "variant", "method")}, "seed": c["seed"],
            "curve": toolkit.curves(summary, "pass@1"), "tokens": sum(r["rollout/num_tokens"] for r in steps),
            "truncated": sum(r["rollout/truncated_frac"] for r in steps) / max(1, len(steps)),
            "eval_prompts_trained_on": summary["eval_prompts_trained_on"], "train_s": summary["train_time_s"]}


def teacher_job(job: dict) -> dict:
    """The world's teacher: its sampled pass@1 on the held-out prompts the runs evaluate on, over the seeds."""
    from transformers import AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.tasks import get_task

    toolkit.quiet_worker()
    tokenizer, teacher = AutoTokenizer.from_pretrained(job["tokenizer"]), toolkit.load_frozen(job["teacher"])
    values = [evaluate(teacher, tokenizer, get_task(job["task"]), num_prompts=job["eval_prompts"], num_samples=4, k=1,
                       max_new_tokens=job["max_new_tokens"], seed=seed)["eval/pass@1"] for seed in job["seeds"]]
    return {"world": job["world"], "teacher_pass@1": sum(values) / len(values)}


def _variant_name(part: str, value) -> str:
    if part == "prefix":
        return f"F={value:g}"
    return "all" if value == 0 else f"{value} prompt{'s' if value > 1 else ''}"


def aggregate(runs: list[dict], part: str, world: str, teacher: float) -> dict:
    mine = [r for r in runs if r["part"] == part and r["world"] == world]
    out = {"world": world, "teacher_pass@1": teacher, "variants": {}}
    for variant in dict.fromkeys(r["variant"] for r in mine):
        for method in dict.fromkeys(r["method"] for r in mine if r["variant"] == variant):
            rs = sorted((r for r in mine if r["variant"] == variant and r["method"] == method), key=lambda r: r["seed"])
            out["variants"][f"{variant}/{method}"] = {
                "variant": variant, "method": method, "seeds": [r["seed"] for r in rs],
                "start_pass@1": [r["curve"]["pass@1"][0] for r in rs],
                "final_pass@1": [r["curve"]["pass@1"][-1] for r in rs],
                "steps": rs[0]["curve"]["steps"], "curves": [r["curve"]["pass@1"] for r in rs],
                "tokens": [r["tokens"] for r in rs], "truncated": [r["truncated"] for r in rs],
                "eval_prompts_trained_on": [r["eval_prompts_trained_on"] for r in rs]}
    return out


def _final(entry: dict, key: str) -> float | None:
    v = entry["variants"].get(key)
    return mean_std(v["final_pass@1"])[0] if v else None


def claims(result: dict) -> dict:
    """Per world: distilling half of each completion ends within 0.05 of distilling all of it; OPD on one prompt
    closes at least 80 % of the gain (final − start) that OPD on every training prompt makes."""
    out = {}
    for w in result.get("prefix", []):
        half, full = _final(w, "F=0.5/opd_full"), _final(w, "F=1/opd_full")
        if half is not None and full is not None:
            out[f"{w['world']}/half_prefix_within_0.05"] = toolkit.claim(half >= full - 0.05, half=half, full=full)
    for w in result.get("one_prompt", []):
        one, every = w["variants"].get("1 prompt/opd_full"), w["variants"].get("all/opd_full")
        if one and every:
            start = mean_std(every["start_pass@1"])[0]
            gain_one, gain_all = mean_std(one["final_pass@1"])[0] - start, mean_std(every["final_pass@1"])[0] - start
            out[f"{w['world']}/one_prompt_80pct_of_gain"] = toolkit.claim(
                gain_all > 0 and gain_one >= 0.8 * gain_all, gain_one=gain_one, gain_all=gain_all)
    return out


def docs_block(result: dict, results_dir: str) -> str:
    run, n = result["run"], len(result["seeds"])
    lines = [f"What `python -m opd_mini.experiments shortcuts` measured ({n} seeds; {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full fine-tuning; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is in "
             f"`{results_dir}/shortcuts.json`). Final held-out pass@1, mean ± standard deviation over seeds.", "",
             f"![the prefix and one prompt]({results_dir}/shortcuts.png)"]
    if result.get("prefix"):
        lines += ["", "**The prefix** (full-vocabulary OPD; tokens: what the training rollouts drew, in thousands; the "
                  "mean |r_t| of the start student's tokens at the first and the last position, from `along`):", "",
                  "| world | teacher | start | " + " | ".join(result["fractions_shown"]) + " | tokens (F=1 → smallest F) "
                  "| mean abs r_t, first → last |", "|---|---|---|" + "---|" * len(result["fractions_shown"]) + "---|---|"]
        for w in result["prefix"]:
            vs = [w["variants"].get(f"{f}/opd_full") for f in result["fractions_shown"]]
            tokens = [mean_std(v["tokens"])[0] / 1000 for v in vs if v]
            signal = w.get("along_abs_gap")
            lines.append(f"| {w['world']} | {w['teacher_pass@1']:.2f} | {fmt(vs[-1]['start_pass@1'], 2)} | "
                         + " | ".join(fmt(v["final_pass@1"], 3) if v else "-" for v in vs)
                         + f" | {tokens[0]:.0f}k → {tokens[-1]:.0f}k | "
                         + (f"{signal[0]:.2f} → {signal[-1]:.2f}" if signal else "-") + " |")
    if result.get("one_prompt"):
        shown = result["train_prompts_shown"]
        methods = result["one_prompt_methods"]
        lines += ["", "**One prompt** (every step's samples from 1 or 4 training prompts, or from the whole split):", "",
                  "| world | teacher | start | " + " | ".join(f"{m}: {p}" for m in methods for p in shown) + " |",
                  "|---|---|---|" + "---|" * (len(methods) * len(shown))]
        for w in result["one_prompt"]:
            any_v = next(iter(w["variants"].values()))
            lines.append(f"| {w['world']} | {w['teacher_pass@1']:.2f} | {fmt(any_v['start_pass@1'], 2)} | "
                         + " | ".join(fmt(w["variants"][f"{p}/{m}"]["final_pass@1"], 3)
                                      if f"{p}/{m}" in w["variants"] else "-" for m in methods for p in shown) + " |")
    cl = result["claims"]
    if cl:
        lines.append("")
    for key, c in cl.items():
        world, what = key.split("/")
        if what == "half_prefix_within_0.05":
            lines.append(f"- **{world}: distilling half of each completion ends within 0.05 of distilling all of it: "
                         f"{toolkit.verdict(c)}** ({c['half']:.3f} against {c['full']:.3f}).")
        else:
            lines.append(f"- **{world}: OPD on one prompt closes at least 80 % of the gain OPD makes on every training "
                         f"prompt: {toolkit.verdict(c)}** (gains {c['gain_one']:+.3f} against {c['gain_all']:+.3f}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, w in enumerate(result.get("prefix", [])):
        xs, mu, sd = [], [], []
        for key, v in w["variants"].items():
            xs.append(float(v["variant"].split("=")[1]))
            m, s = mean_std(v["final_pass@1"])
            mu.append(m), sd.append(s)
        ax.errorbar(xs, mu, yerr=sd, marker="o", capsize=3, color=f"C{i}", label=w["world"])
        ax.axhline(w["teacher_pass@1"], color=f"C{i}", ls=":", lw=1)
    ax.set(xlabel="prefix fraction F distilled", ylabel="final held-out pass@1", ylim=(0, 1.02),
           title="the prefix (teacher dotted)")
    ax.legend(fontsize=8, frameon=False)
    shown, methods = result.get("train_prompts_shown", []), result.get("one_prompt_methods", [])
    width = 0.8 / max(1, len(shown) * len(methods))
    for i, w in enumerate(result.get("one_prompt", [])):
        for j, (m, p) in enumerate((m, p) for m in methods for p in shown):
            v = w["variants"].get(f"{p}/{m}")
            if v:
                mu, sd = mean_std(v["final_pass@1"])
                bx.bar(i + j * width, mu, width, yerr=sd, capsize=2, color=f"C{j}",
                       label=f"{m}, {p}" if i == 0 else None)
        bx.axhline(w["teacher_pass@1"], xmin=i / len(result["one_prompt"]), xmax=(i + 1) / len(result["one_prompt"]),
                   color="k", ls=":", lw=1)
    bx.set_xticks([i + 0.4 - width / 2 for i in range(len(result.get("one_prompt", [])))],
                  [w["world"] for w in result.get("one_prompt", [])])
    bx.set(ylabel="final held-out pass@1", ylim=(0, 1.02), title="one prompt (teacher dotted)")
    bx.legend(fontsize=7, frameon=False)
    toolkit.save(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--worlds", default=None, help=f"comma-separated, from {', '.join(WORLDS)}")


def _along_signal(world: str) -> list[float] | None:
    """Mean |r_t| of the start student's tokens by position, from the committed along results (None if absent)."""
    import json

    path = toolkit.REPO / toolkit.RESULTS_DIR / "along.json"
    if not path.is_file():
        return None
    got = next((w for w in json.loads(path.read_text())["worlds"] if w["world"] == world), None)
    return [m for m, _ in got["gap_abs"]] if got else None


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    worlds = toolkit.parse_names(args.worlds, WORLDS, "worlds", default=scale["worlds"])
    jobs, teacher_jobs = [], []
    for world in worlds:
        setting, paths = get_setting(world), ensure_setting(world, progress=False)
        teacher_jobs.append((teacher_job, {"world": world, "teacher": paths["teacher"], "tokenizer": paths["tokenizer"],
                                           "task": setting.task, "max_new_tokens": setting.max_new_tokens,
                                           "eval_prompts": scale["eval_prompts"], "seeds": seeds}))
        base = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"], task=setting.task,
                    max_new_tokens=setting.max_new_tokens, steps=steps, eval_every=min(scale["eval_every"], steps),
                    eval_prompts=scale["eval_prompts"])
        grid = ([("prefix", f, m, dict(prefix_fraction=f)) for f in scale["fractions"] for m in ("opd_full",)]
                if "prefix" in parts else [])
        grid += ([("one_prompt", n, m, dict(train_prompts=n)) for n in scale["train_prompts"]
                  for m in scale["one_prompt_methods"]] if "one_prompt" in parts else [])
        for part, value, method, fields in grid:
            for seed in seeds:
                variant = _variant_name(part, value)
                config = toolkit.run_config(RUN, base, METHODS[method], fields, seed=seed, out_dir=str(
                    Path(args.out) / "runs" / f"{part}-{world}-{variant.replace(' ', '_')}-{method}-seed{seed}"))
                jobs.append((run_job, {"part": part, "world": world, "variant": variant, "method": method,
                                       "config": config}))
    print(f"shortcuts: {len(jobs)} runs of {steps} steps in {args.workers} process(es)", file=sys.stderr)
    done = toolkit.run_pool(None, teacher_jobs + jobs, args.workers, desc="shortcuts", progress=not args.no_progress)
    runs = [r for r in done if "part" in r]
    teacher = {r["world"]: r["teacher_pass@1"] for r in done if "part" not in r}
    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "parts": parts, "worlds": worlds, "run": RUN,
              "cpus": toolkit.cpus(), "workers": args.workers,
              "fractions_shown": [_variant_name("prefix", f) for f in sorted(scale["fractions"], reverse=True)],
              "train_prompts_shown": [_variant_name("one_prompt", n) for n in scale["train_prompts"]],
              "one_prompt_methods": list(scale["one_prompt_methods"])}
    if "prefix" in parts:
        result["prefix"] = [{**aggregate(runs, "prefix", w, teacher[w]), "along_abs_gap": _along_signal(w)}
                            for w in worlds]
    if "one_prompt" in parts:
        result["one_prompt"] = [aggregate(runs, "one_prompt", w, teacher[w]) for w in worlds]
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
