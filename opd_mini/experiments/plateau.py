"""Learns faster, by the blog's protocol: from a student that SFT has brought to a plateau, what closes the rest of
the gap to the teacher, and at what cost.

    python -m opd_mini.experiments plateau [--quick] [--seeds 0,1,2] [--pools 16,32,64,128]
                                           [--methods sft_pool,sft_fresh,opd_full,grpo] [--out runs/plateau]

The blog's speed-up (9-30× fewer samples than SFT) is measured against a student already SFT'd on a large
distillation set and sitting on a plateau, with SFT's further cost read off a data-scaling fit. This experiment
runs that protocol where its mechanism is present: the slippery route of :mod:`opd_mini.experiments.slips`
(``route:6:2``, slips ε = 0.2 in training and at evaluation), where a policy must come back from states that a
fixed set of teacher walks covers only in part.

1. **The warm start.** From the ``route`` world's student, SFT on a fixed pool of teacher walks through the same
   slips (``--teacher_sample_pool P``: P prompts × 4 walks, sampled once), long enough that held-out pass@1
   stops rising; one run per pool size P and seed. The plateau level is the mean of the last
   ``PLATEAU_EVALS`` evaluations, and its slope over the second half of the run is reported beside it.
2. **The data-scaling fit.** The plateau level against the pool's teacher walks N, fitted as a + b·ln N over
   every (P, seed): where SFT on more of the same data would reach a target, extrapolated as the blog did.
3. **From the plateau student** (the largest pool's, per seed), with the same optimiser and budget:
   continued SFT on the same pool (``sft_pool``) and on fresh teacher walks every step (``sft_fresh``), OPD
   with the full-vocabulary reverse KL on the student's own walks (``opd_full``), and GRPO with the route's
   verifier (``grpo``). The target is a fraction (50 % and 80 %) of the remaining gap from that seed's start to
   the teacher's pass@1 with slips; reported: the **sequences** each method trains on to get there (SFT's are
   teacher walks, the others the student's own), the first evaluation at or above it, evaluated every
   ``eval_every`` steps (a tenth of the budget at most, so that ratios are not quantised), and the FLOPs to
   that point (as in :mod:`opd_mini.experiments.demo`: 2·P a token forward, 6·P forward + backward; a pool is
   sampled once, so ``sft_pool`` pays no sampler per step).

Writes ``OUT/plateau.json``, ``OUT/plateau.md`` and ``OUT/plateau.png`` (the warm-start curves per pool, the
plateau against N with the fit, and the continuations against sequences with the targets).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from opd_mini.experiments import slips, toolkit
from opd_mini.experiments.toolkit import fmt, fmt_reached, mean_std

NAME = "plateau"
QUICK_HELP = ("the small budget: the BC pools of 16 and 32 prompts, sft_fresh and opd_full, 2 seeds, 40 + 80 steps "
              "(the tests use it)")
SETTING = "route"
#: The settings, from recipes/experiments/plateau.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: Where the pool's teacher walks come from: the loop's settings of the SFT runs that read them.
SOURCES: dict[str, dict] = RECIPE["sources"]
#: The continuations from a plateau student: name -> the loop's settings ({pool}: its warm pool); the SFT
#: methods read the same source as the warm start.
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
#: The targets: fractions of the remaining gap from the plateau student to the teacher.
GAP_FRACTIONS = (0.5, 0.8)
#: The plateau level: the mean of the warm run's last evaluations.
PLATEAU_EVALS = 4
RUN = RECIPE["run"]


# --------------------------------------------------------------------------------------------
# runs (worker processes)
# --------------------------------------------------------------------------------------------


def _curve(summary: dict) -> dict:
    return {"steps": [h["step"] for h in summary["eval_history"]],
            "pass@1": [h["eval/pass@1"] for h in summary["eval_history"]]}


def warm_job(job: dict) -> dict:
    """SFT on a fixed pool of P prompts' teacher walks from the world's student: the curve and the checkpoint."""
    c = job["config"]
    summary = toolkit.train_run(c, f"warm start / {job['source']} pool {job['pool']} / seed {c['seed']}")
    return {"kind": "warm", "source": job["source"], "pool": job["pool"], "seed": c["seed"], "curve": _curve(summary),
            "model": str(Path(summary["checkpoint"]) / "model"), "train_s": summary["train_time_s"]}


def continue_job(job: dict) -> dict:
    """One method from a seed's plateau student: its curve, each step's tokens, and the final student with slips."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"from the {job['source']} plateau / {job['method']} / seed {c['seed']}")
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    examples = held_out_examples(get_task(c["task"]), c["eval_prompts"], c["seed"])
    final = slips.route_stats(toolkit.load_frozen(str(Path(summary["checkpoint"]) / "model")), tokenizer, examples,
                              slip_prob=c["slip_prob"], max_new_tokens=c["max_new_tokens"], seed=c["seed"] + 17)
    return {"kind": "continue", "source": job["source"], "method": job["method"], "seed": c["seed"],
            "curve": _curve(summary),
            "step_tokens": [r["rollout/num_tokens"] for r in summary["log"] if "time/step" in r],
            "final": final, "train_s": summary["train_time_s"]}


def models_job(job: dict) -> dict:
    """The teacher's and the world's student's pass@1 with slips on each seed's evaluation prompts, their sizes
    and the prompts' mean length in tokens."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task
    from opd_mini.tiny import num_parameters

    toolkit.quiet_worker()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    teacher, student = toolkit.load_frozen(job["teacher"]), toolkit.load_frozen(job["student"])
    out = {"kind": "models", "teacher_params": num_parameters(teacher), "student_params": num_parameters(student),
           "teacher": {}, "student": {}}
    for seed in job["seeds"]:
        examples = held_out_examples(get_task(RUN["task"]), job["eval_prompts"], seed)
        out["prompt_tokens"] = sum(len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"])
                                   for e in examples) / len(examples)
        for role, model in (("teacher", teacher), ("student", student)):
            out[role][str(seed)] = slips.route_stats(model, tokenizer, examples, slip_prob=RUN["slip_prob"],
                                                     max_new_tokens=RUN["max_new_tokens"], seed=seed + 17)["pass@1"]
    return out


# --------------------------------------------------------------------------------------------
# aggregation and claims
# --------------------------------------------------------------------------------------------


def flops_per_step(method: str, tokens: float, n_sequences: int, prompt_len: float, p_student: int,
                   p_teacher: int) -> float:
    """FLOPs of one step (the demo's estimate); a fixed pool was sampled once, so its steps pay no sampler."""
    from opd_mini.experiments.demo import flops_per_step as demo_flops

    kind = "sft" if method.startswith("sft") else "grpo" if method == "grpo" else "opd"
    total = demo_flops(kind, tokens, n_sequences, prompt_len, p_student, p_teacher)
    return total - 2 * p_teacher * (tokens + n_sequences * prompt_len) if method == "sft_pool" else total


def line_fit(x: list[float], y: list[float]) -> tuple[float, float, float | None]:
    """Least squares y = a + b·x: (a, b, r²)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx if sxx else 0.0
    a = my - b * mx
    ss = sum((v - my) ** 2 for v in y)
    return a, b, (1 - sum((v - a - b * u) ** 2 for u, v in zip(x, y)) / ss if ss else None)


def fit_log_linear(n: list[float], level: list[float]) -> dict:
    """Least squares of level = a + b·ln N; its r² and the range of N it saw."""
    a, b, r2 = line_fit([math.log(v) for v in n], level)
    return {"a": a, "b": b, "r2": r2, "n_min": min(n), "n_max": max(n)}


def extrapolate(fit: dict, level: float) -> float | None:
    """The N at which the fit reaches ``level`` (None when it does not rise)."""
    return math.exp((level - fit["a"]) / fit["b"]) if fit["b"] > 1e-9 else None


def plateau_of(curve: dict) -> dict:
    """The level (mean of the last PLATEAU_EVALS evaluations) and the slope per 100 steps over the second half."""
    steps, values = curve["steps"], curve["pass@1"]
    half = [(s, v) for s, v in zip(steps, values) if s >= steps[-1] / 2]
    slope = line_fit([s for s, _ in half], [v for _, v in half])[1] if len(half) > 1 else 0.0
    return {"level": sum(values[-PLATEAU_EVALS:]) / len(values[-PLATEAU_EVALS:]), "slope_per_100": 100 * slope}


def aggregate_source(done: list[dict], source: str, models: dict, methods: list[str], seeds: list[int],
                     pools: list[int]) -> dict:
    """One source's warm start, its fit, and the continuations from its plateau student."""
    sequences = RUN["prompts_per_step"] * RUN["num_generations"]
    tau = mean_std([models["teacher"][str(s)] for s in seeds])[0]
    warm = {}
    for p in pools:
        rs = sorted((r for r in done if r["kind"] == "warm" and r["source"] == source and r["pool"] == p),
                    key=lambda r: r["seed"])
        plateaus = [plateau_of(r["curve"]) for r in rs]
        warm[str(p)] = {"pool": p, "teacher_walks": p * RUN["num_generations"], "seeds": [r["seed"] for r in rs],
                        "steps": rs[0]["curve"]["steps"], "curves": [r["curve"]["pass@1"] for r in rs],
                        "level": [x["level"] for x in plateaus], "slope_per_100": [x["slope_per_100"] for x in plateaus],
                        "train_s": [r["train_s"] for r in rs]}
    fit = fit_log_linear([w["teacher_walks"] for w in warm.values() for _ in w["level"]],
                         [v for w in warm.values() for v in w["level"]])
    cont = {}
    for m in methods:
        rs = sorted((r for r in done if r["kind"] == "continue" and r["source"] == source and r["method"] == m),
                    key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["curve"]["steps"],
                 "curves": [r["curve"]["pass@1"] for r in rs],
                 "final_pass@1": [r["final"]["pass@1"] for r in rs],
                 "success_after_slip": [r["final"]["success_after_slip"] for r in rs],
                 "train_s": [r["train_s"] for r in rs]}
        for f in GAP_FRACTIONS:
            seqs, flops = [], []
            for r in rs:
                start = r["curve"]["pass@1"][0]
                i = toolkit.first_reaching(r["curve"]["pass@1"][1:], start + f * (tau - start))
                step = None if i is None else r["curve"]["steps"][i + 1]
                seqs.append(None if step is None else step * sequences)
                flops.append(None if step is None else sum(
                    flops_per_step(m, t, sequences, models["prompt_tokens"], models["student_params"],
                                   models["teacher_params"]) for t in r["step_tokens"][:step]))
            entry[f"sequences_to_{f:g}"], entry[f"flops_to_{f:g}"] = seqs, flops
        cont[m] = entry
    start = [c[0] for c in next(iter(cont.values()))["curves"]] if cont else []
    out = {"warm": warm, "fit": fit, "methods": cont, "start_pass@1": start, "extrapolated": {}}
    s0 = mean_std(start)[0]
    for f in GAP_FRACTIONS:
        if s0 is None:
            break
        target = s0 + f * (tau - s0)
        n = extrapolate(fit, target)
        out["extrapolated"][f"{f:g}"] = {"target": target, "teacher_walks": n,
                                         "beyond_largest_pool": None if n is None else n - fit["n_max"]}
    return out


#: A per-seed ratio where the slower method never got there (infinitely many sequences).
NEVER = "never"


def claims(result: dict) -> dict:
    """The aim, per source of the pool: from the plateau, OPD reaches 80 % of the remaining gap on every seed, with ≥ 3×
    fewer new sequences than SFT (fresh teacher walks, measured; where SFT never gets there in the budget, the teacher
    walks the fit says the pool would need beyond its largest size; against OPD's mean over the seeds it reached) and
    ≥ 3× fewer than GRPO on every seed (paired; a seed where GRPO never gets there counts as infinitely many)."""
    out = {}
    for source, r in result["sources"].items():
        by = r["methods"]
        if "opd_full" not in by:
            continue
        opd = by["opd_full"]["sequences_to_0.8"]
        reached = None not in opd
        opd_mean = mean_std(opd)[0]
        if "sft_fresh" in by:
            sft = by["sft_fresh"]["sequences_to_0.8"]
            measured = None not in sft
            cost = mean_std(sft)[0] if measured else r["extrapolated"].get("0.8", {}).get("beyond_largest_pool")
            ratio = None if cost is None or opd_mean is None else cost / opd_mean
            out[f"{source}_opd_3x_fewer_than_sft"] = toolkit.claim(
                reached and (cost is None or ratio >= 3), ratio=ratio, sft_source="measured" if measured else "fit",
                sft_cost=cost, opd=opd, sft=sft)
        if "grpo" in by:
            grpo = by["grpo"]["sequences_to_0.8"]
            ratios = [None if o is None else NEVER if g is None else g / o for o, g in zip(opd, grpo)]
            out[f"{source}_opd_3x_fewer_than_grpo"] = toolkit.claim(
                reached and all(x == NEVER or x >= 3 for x in ratios), ratios=ratios, opd=opd, grpo=grpo)
    return out


def failure(result: dict) -> str | None:
    """A budget in which no method from any plateau reaches even the first target (results are written first)."""
    f = f"{GAP_FRACTIONS[0]:g}"
    every = [m for r in result["sources"].values() for m in r["methods"].values()]
    if every and all(x is None for m in every for x in m[f"sequences_to_{f}"]):
        return f"no method reached {f} of the gap to the teacher in {result['steps']} steps: give a larger --steps"
    return None

# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _sci(values: list) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"never (0/{len(values)})"
    m, _ = mean_std(got)
    return f"{m:.2g}" + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)})")


STYLE = {"sft_pool": dict(color="C0", ls="--", label="SFT (the same pool)"),
         "sft_fresh": dict(color="C0", label="SFT (fresh teacher walks)")}
SOURCE_TEXT = {"bc": "the teacher's clean walks", "dart": "the teacher's walks through the slips"}


def docs_block(result: dict, results_dir: str) -> str:
    run, n, sources = result["run"], len(result["seeds"]), result["sources"]
    lines = [f"What `python -m opd_mini.experiments plateau` measured ({n} seeds; `{run['task']}` with slips ε = {run['slip_prob']:g}; "
             f"lr {run['lr']}, full fine-tuning, {result['sequences_per_step']} sequences a step; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is "
             f"in `{results_dir}/plateau.json`). Mean ± standard deviation over seeds. The teacher's pass@1 with slips "
             f"is {fmt(result['teacher_pass@1'], 3)}; the world's student starts at "
             f"{fmt(result['world_student_pass@1'], 3)}.", "",
             f"![the plateau protocol]({results_dir}/plateau.png)", "",
             f"**The warm start.** SFT on a fixed pool of teacher walks for {result['warm_steps']} steps. The plateau is "
             f"the mean of the last {PLATEAU_EVALS} evaluations; the slope is per 100 steps, over the run's second half:",
             "", "| pool (prompts × 4 walks) | " + " | ".join(f"{s}: plateau | {s}: slope" for s in sources) + " |",
             "|---|" + "---|---|" * len(sources)]
    for p in map(str, result["pools"]):
        cells = [f"{fmt(r['warm'][p]['level'], 3)} | {fmt(r['warm'][p]['slope_per_100'], 3, signed=True)}"
                 for r in sources.values()]
        lines.append(f"| {p} × 4 = {int(p) * 4} | " + " | ".join(cells) + " |")
    lines.append("")
    for s, r in sources.items():
        fit, ext = r["fit"], r["extrapolated"]
        lines.append(f"- **{s}** ({SOURCE_TEXT[s]}): plateau = {fit['a']:.3f} {'+' if fit['b'] >= 0 else '−'} "
                     f"{abs(fit['b']):.3f}·ln N (r² {toolkit.num(fit['r2'])}, N = {fit['n_min']:g} to {fit['n_max']:g} "
                     f"walks). The plateau student (the largest pool) starts at {fmt(r['start_pass@1'], 3)}. Read "
                     "off the fit, " + "; ".join(
                         f"{float(f) * 100:.0f} % of its gap (pass@1 {e['target']:.3f}) "
                         + ("is never reached: the fit does not rise" if e["teacher_walks"] is None else
                            f"needs N ≈ {e['teacher_walks']:.3g} walks, {e['beyond_largest_pool']:+.3g} beyond the "
                            "largest pool") for f, e in ext.items()) + ".")
    lines += ["", f"**From each plateau student**, {result['steps']} steps, evaluated every {result['eval_every']} steps. "
              "The columns give the new sequences drawn to reach 50 % and 80 % of the remaining gap to the teacher "
              "(fresh SFT: teacher walks of the same source; the pool: none; OPD and GRPO: the student's rollouts; "
              "*not reached*: not within the budget):", "",
              "| pool | method | to 50 % | to 80 % | FLOPs to 80 % | final pass@1 | success after a slip |",
              "|---|---|---|---|---|---|---|"]
    for s, r in sources.items():
        for m, v in r["methods"].items():
            lines.append(f"| {s} | {m} | {fmt_reached(v['sequences_to_0.5'], 0)} | "
                         f"{fmt_reached(v['sequences_to_0.8'], 0)} | {_sci(v['flops_to_0.8'])} | "
                         f"{fmt(v['final_pass@1'], 3)} | {fmt(v['success_after_slip'], 3, never='-')} |")
    lines.append("")
    for key, c in result["claims"].items():
        source, what = key.split("_", 1)
        n_opd = f"OPD got there on {sum(x is not None for x in c['opd'])}/{len(c['opd'])} seeds"
        if what == "opd_3x_fewer_than_sft":
            how = ("fresh teacher walks, measured" if c["sft_source"] == "measured" else
                   "SFT on fresh walks never got there: the pool's fit" if c["sft_cost"] is not None else
                   "SFT never got there and the fit does not rise")
            lines.append(f"- **{source} plateau: OPD reaches 80 % of the gap on every seed with at least 3× fewer "
                         f"sequences than SFT ({how}): {toolkit.verdict(c)}** (ratio {c['ratio']:.3g}; {n_opd})."
                         if c["ratio"] is not None else
                         f"- **{source} plateau: OPD reaches 80 % of the gap on every seed with at least 3× fewer "
                         f"sequences than SFT ({how}): {toolkit.verdict(c)}** ({n_opd}).")
        else:
            ratios = ", ".join("-" if x is None else x if x == NEVER else f"{x:.2f}" for x in c["ratios"])
            lines.append(f"- **{source} plateau: … and at least 3× fewer than GRPO on every seed: "
                         f"{toolkit.verdict(c)}** (GRPO's sequences over OPD's, by seed: {ratios}; never: GRPO never "
                         "got there).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Per source: the warm-start curves, the plateau against N with its fit, the continuations with the targets."""
    plt = toolkit.pyplot()
    sources = result["sources"]
    fig, axes = plt.subplots(len(sources), 3, figsize=(15, 3.8 * len(sources)), squeeze=False)
    tau = mean_std(result["teacher_pass@1"])[0]
    seqs = result["sequences_per_step"]
    for row, (s, r) in enumerate(sources.items()):
        ax, bx, cx = axes[row]
        for i, (p, w) in enumerate(r["warm"].items()):
            toolkit.band(ax, w["steps"], w["curves"], label=f"pool {p} × 4", color=f"C{i}")
        ax.set(xlabel="step", ylabel="pass@1 with slips", title=f"{s}: SFT on a fixed pool", ylim=(0, 1.02))
        fit = r["fit"]
        bx.scatter([w["teacher_walks"] for w in r["warm"].values() for _ in w["level"]],
                   [v for w in r["warm"].values() for v in w["level"]], color="C0", s=14, label="plateau (a seed)")
        reach = [e["teacher_walks"] for e in r["extrapolated"].values() if e["teacher_walks"] is not None]
        top = max([fit["n_max"] * 1.5] + [n for n in reach if n < fit["n_max"] * 1e3])
        grid = [fit["n_min"] * (top / fit["n_min"]) ** (i / 50) for i in range(51)]
        bx.plot(grid, [fit["a"] + fit["b"] * math.log(g) for g in grid], color="C0", ls="--", label="a + b·ln N")
        for f, e in r["extrapolated"].items():
            for a in (bx, cx):
                a.axhline(e["target"], color="C3", lw=0.8, ls=":")
            bx.text(fit["n_min"], e["target"], f" {float(f) * 100:.0f} % of the gap", fontsize=7, va="bottom",
                    color="C3")
        bx.set(xscale="log", xlabel="teacher walks in the pool N", ylabel="plateau pass@1",
               title=f"{s}: SFT's data scaling", ylim=(0, 1.02))
        ticks = [w["teacher_walks"] for w in r["warm"].values()] + ([round(top)] if top > fit["n_max"] * 2 else [])
        bx.set_xticks(ticks, [f"{t:,}" for t in ticks])
        bx.xaxis.set_minor_formatter(plt.NullFormatter())
        for m, v in r["methods"].items():
            toolkit.band(cx, [x * seqs for x in v["steps"]], v["curves"], **STYLE.get(m, toolkit.style(m)))
        cx.set(xlabel="new sequences", ylabel="pass@1 with slips", title=f"from the {s} plateau student", ylim=(0, 1.02))
        for a in (ax, cx):
            a.axhline(tau, color="k", ls=":", lw=1, label="teacher")
        for a in (ax, bx, cx):
            a.legend(fontsize=7, frameon=False)
    toolkit.save(fig, path)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)
    p.add_argument("--pools", default=None, help="comma-separated pool sizes in prompts (each >= 16, the prompts of a "
                   "step; default 16,32,64,128; --quick 16,32); the largest is continued from")
    p.add_argument("--sources", default=None, help=f"where the pools' walks come from: {', '.join(SOURCES)}")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--warm_steps", type=int, default=None, help="steps of each warm-start run (default: the scale's)")


def _pools(text: str | None, default) -> list[int]:
    try:
        pools = sorted({int(x) for x in text.split(",") if x.strip()}) if text else list(default)
    except ValueError:
        raise ValueError(f"--pools must be comma-separated whole numbers, got {text!r}") from None
    if len(pools) < 2 or min(pools) < RUN["prompts_per_step"]:
        raise ValueError(f"--pools needs at least two sizes, each >= {RUN['prompts_per_step']} (the prompts of a "
                         f"step), got {text!r}")
    return pools


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    warm_steps = scale["warm_steps"] if args.warm_steps is None else args.warm_steps
    if warm_steps < 2 * PLATEAU_EVALS:
        raise ValueError(f"--warm_steps={warm_steps} is out of range: give at least {2 * PLATEAU_EVALS}")
    pools = _pools(args.pools, scale["pools"])
    sources = toolkit.parse_names(args.sources, SOURCES, "sources", default=scale["sources"])
    methods = toolkit.parse_names(args.methods, METHODS, "methods", default=scale["methods"])
    paths = ensure_setting(SETTING, progress=False)
    out, big = Path(args.out), max(pools)
    warm_every = max(1, min(scale["warm_eval_every"], warm_steps // (2 * PLATEAU_EVALS)))
    every = max(1, min(scale["eval_every"], steps // 10))
    base = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"],
                eval_prompts=scale["eval_prompts"])
    warm_jobs = [(warm_job, {"source": src, "pool": p, "config": toolkit.run_config(
        RUN, base, SOURCES[src], loss="sft", teacher_sample_pool=p, steps=warm_steps, eval_every=warm_every, seed=s,
        out_dir=str(out / "runs" / f"warm-{src}-pool{p}-seed{s}"))}) for src in sources for p in pools for s in seeds]
    models = (models_job, {"teacher": paths["teacher"], "student": paths["student"], "tokenizer": paths["tokenizer"],
                           "eval_prompts": scale["eval_prompts"], "seeds": seeds})
    print(f"plateau: {len(warm_jobs)} warm-start runs of {warm_steps} steps, then "
          f"{len(sources) * len(methods) * len(seeds)} of {steps} in {args.workers} process(es)", file=sys.stderr)
    done = toolkit.run_pool(None, [models, *warm_jobs], args.workers, desc="plateau: warm start",
                            progress=not args.no_progress)
    plateau_student = {(r["source"], r["seed"]): r["model"] for r in done if r["kind"] == "warm" and r["pool"] == big}
    jobs = []
    for src in sources:
        for m in methods:
            fields = {**toolkit.fill(METHODS[m], {"pool": str(big)})}
            if "teacher_sample_pool" in fields:
                fields["teacher_sample_pool"] = int(fields["teacher_sample_pool"])
            if fields["loss"] == "sft":
                fields.update(SOURCES[src])
            for s in seeds:
                jobs.append((continue_job, {"source": src, "method": m, "config": toolkit.run_config(
                    RUN, base, fields, student=plateau_student[src, s], teacher=fields.get("teacher", paths["teacher"]),
                    steps=steps, eval_every=every, seed=s, out_dir=str(out / "runs" / f"{src}-{m}-seed{s}"))}))
    done += toolkit.run_pool(None, jobs, args.workers, desc="plateau: from the plateau", progress=not args.no_progress)
    models_done = next(r for r in done if r["kind"] == "models")
    result = {"scale": scale_name, "seeds": seeds, "pools": pools, "warm_steps": warm_steps, "warm_eval_every": warm_every,
              "steps": steps, "eval_every": every, "run": RUN, "sources_fields": {s: SOURCES[s] for s in sources},
              "methods": methods, "cpus": toolkit.cpus(), "workers": args.workers, "eval_prompts": scale["eval_prompts"],
              "teacher_pass@1": [models_done["teacher"][str(s)] for s in seeds],
              "world_student_pass@1": [models_done["student"][str(s)] for s in seeds],
              "teacher_params": models_done["teacher_params"], "student_params": models_done["student_params"],
              "sequences_per_step": RUN["prompts_per_step"] * RUN["num_generations"],
              "sources": {src: aggregate_source(done, src, models_done, methods, seeds, pools) for src in sources}}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
