"""pass@k to k = 64 on the transformer worlds: does RL sharpen, and does OPD keep its teacher's coverage?

    python -m opd_mini.experiments passk [--quick] [--seeds 0,1,2] [--out runs/passk]

The toy world (notebook 8) computes pass@k exactly and finds that GRPO sharpens (pass@1 up, pass@k at large k below
the model it started from, on prompts it gave up) while OPD inherits its teacher's support. Here the same question
on the demo's two worlds (``compounding``: walk:10, where many walks are right; ``counter_example``: reverse:5, one
right answer), from the same student with the same budget: SFT on teacher samples, full-vocabulary OPD, top-K OPD
with a tail bucket, and GRPO. Each final student, the start student and the teacher draw ``samples`` completions at
temperature 1 for each held-out prompt; pass@k for k = 1, 2, 4, … up to ``samples`` is the unbiased estimator
1 − C(n − c, k)/C(n, k) averaged over prompts, and the share of prompts never solved in ``samples`` tries is the
coverage the policy has lost.

Writes ``OUT/passk.json``, ``OUT/passk.md`` and ``OUT/passk.png`` (pass@k against k, one panel per world).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "passk"
QUICK_HELP = "the small budget: reversal, 16 prompts × 16 samples, 1 seed, 20 steps (the tests use it)"
#: The settings, from recipes/experiments/passk.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a
#: constant below.
RECIPE = toolkit.recipe(NAME)
RUN = RECIPE["run"]
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]


def k_grid(n: int) -> list[int]:
    """1, 2, 4, … below ``n``, then ``n``."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return ks + [n] if ks[-1] != n else ks


def curve(model_dir: str, job: dict) -> dict:
    """pass@k for every k of :func:`k_grid`, the share of prompts never solved and the per-token entropy, from
    ``samples`` completions a prompt."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples, pass_at_k
    from opd_mini.forward import completion_logits
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    task, n = get_task(job["task"]), job["samples"]
    examples = held_out_examples(task, job["eval_prompts"], job["seed"])
    model = toolkit.load_frozen(model_dir)
    with torch.no_grad():
        r = sample(model, AutoTokenizer.from_pretrained(job["tokenizer"]), [e.prompt for e in examples],
                   num_generations=n, max_new_tokens=job["max_new_tokens"], temperature=1.0, seed=job["seed"] + 7,
                   use_chat_template=False)
        logp_BTV = torch.log_softmax(completion_logits(model, r).float(), dim=-1)
        entropy = float((-(logp_BTV.exp() * logp_BTV).sum(-1))[r.mask_BT].mean())
    correct = [0] * len(examples)
    for i, c in zip(r.prompt_index_B.tolist(), r.completions):
        correct[i] += int(task.reward(c, examples[i]) > 0)
    ks = k_grid(n)
    return {"pass@k": [sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks],
            "never_solved": sum(c == 0 for c in correct) / len(correct), "entropy": entropy}


def run_job(job: dict) -> dict:
    """A trained student (a method and seed), or the start student or the teacher (``job["model"]``): its curve."""
    if "config" in job:
        c = job["config"]
        summary = toolkit.train_run(c, f"{job['world']} / {job['method']} / seed {c['seed']}")
        model_dir = str(Path(summary["checkpoint"]) / "model")
        high = [r["opd/high_entropy_frac"] for r in summary["log"] if "opd/high_entropy_frac" in r]
    else:
        toolkit.quiet_worker()
        model_dir, high = job["model"], []
    return {"world": job["world"], "method": job["method"], "seed": job["seed"], **curve(model_dir, job),
            "high_entropy_frac": sum(high) / len(high) if high else None}


def aggregate(runs: list[dict], world: str, names: list[str]) -> dict:
    out = {}
    for name in names:
        rs = sorted((r for r in runs if r["world"] == world and r["method"] == name), key=lambda r: r["seed"])
        out[name] = {"seeds": [r["seed"] for r in rs], "pass@k": [r["pass@k"] for r in rs],
                     "never_solved": [r["never_solved"] for r in rs], "entropy": [r["entropy"] for r in rs],
                     "high_entropy_frac": [r["high_entropy_frac"] for r in rs]}
    return out


def claims(result: dict) -> dict:
    """Per world, each against the larger of the two seed standard deviations (the spread): GRPO sharpens (pass@1
    above the start's and pass@64 below it, each by more than the spread), GRPO gives up prompts (pass@64 below the
    start's by more than the spread), and full OPD keeps the start's coverage (pass@64 not below it by more than the
    spread)."""
    out = {}
    for world, w in result["worlds"].items():
        def gap(name, i):  # (method − start, spread) at the i-th k
            a, b = ([c[i] for c in w["methods"][x]["pass@k"]] for x in (name, "start"))
            return mean_std(a)[0] - mean_std(b)[0], max(mean_std(a)[1], mean_std(b)[1])

        if "grpo" in w["methods"]:
            (up, s1), (down, sn) = gap("grpo", 0), gap("grpo", -1)
            out[f"{world}/grpo_sharpens"] = toolkit.claim(up > s1 and -down > sn, gain_1=up, spread_1=s1,
                                                          gain_n=down, spread_n=sn)
            out[f"{world}/grpo_gives_up_prompts"] = toolkit.claim(-down > sn, gain_n=down, spread_n=sn)
        if "opd_full" in w["methods"]:
            down, sn = gap("opd_full", -1)
            out[f"{world}/opd_keeps_coverage"] = toolkit.claim(-down <= sn, gain_n=down, spread_n=sn)
        if "opd_full" in w["methods"] and "opd_entropy_aware" in w["methods"]:
            a, b = ([c[-1] for c in w["methods"][x]["pass@k"]] for x in ("opd_entropy_aware", "opd_full"))
            diff, spread = mean_std(a)[0] - mean_std(b)[0], max(mean_std(a)[1], mean_std(b)[1])
            out[f"{world}/entropy_aware_covers_more"] = toolkit.claim(
                diff > spread, gain_n=diff, spread_n=spread,
                high_entropy_frac=mean_std(w["methods"]["opd_entropy_aware"]["high_entropy_frac"])[0])
    return out


def docs_block(result: dict, results_dir: str) -> str:
    run, n, ks = result["run"], len(result["seeds"]), result["ks"]
    shown = [i for i, k in enumerate(ks) if k in (1, 4, 16) or i == len(ks) - 1]
    lines = [f"What `python -m opd_mini.experiments passk` measured ({n} seeds; {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full fine-tuning; "
             f"{result['eval_prompts']} held-out prompts × {result['samples']} samples at temperature 1; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is "
             f"in `{results_dir}/passk.json`). Unbiased pass@k, mean ± standard deviation over seeds (the start student "
             "and the teacher: over the seeds' prompts and samples); never solved: the share of prompts with no correct "
             f"sample in {result['samples']}; entropy: nats per token on those samples.", "", f"![pass@k against k]({results_dir}/passk.png)", "",
             "| world | policy | " + " | ".join(f"pass@{ks[i]}" for i in shown) + " | never solved | entropy |",
             "|---|---|" + "---|" * (len(shown) + 2)]
    for world, w in result["worlds"].items():
        for name, m in w["methods"].items():
            lines.append(f"| {world} | {name} | " + " | ".join(fmt([c[i] for c in m["pass@k"]], 3) for i in shown)
                         + f" | {fmt(m['never_solved'], 3)} | {fmt(m['entropy'], 3)} |")
    lines.append("")
    n_max = ks[-1]
    for key, c in result["claims"].items():
        world, what = key.split("/")
        if what == "grpo_sharpens":
            lines.append(f"- **{world}: GRPO sharpens, its pass@1 above the start's and its pass@{n_max} below it, each by "
                         f"more than the seed spread: {toolkit.verdict(c)}** (pass@1 {c['gain_1']:+.3f}, spread "
                         f"{c['spread_1']:.3f}; pass@{n_max} {c['gain_n']:+.3f}, spread {c['spread_n']:.3f}).")
        elif what == "grpo_gives_up_prompts":
            lines.append(f"- **{world}: GRPO gives up prompts, its pass@{n_max} below the start's by more than the seed "
                         f"spread: {toolkit.verdict(c)}** ({c['gain_n']:+.3f}, spread {c['spread_n']:.3f}).")
        elif what == "entropy_aware_covers_more":
            lines.append(f"- **{world}: entropy-aware OPD ends with a pass@{n_max} above full OPD's by more than the seed "
                         f"spread: {toolkit.verdict(c)}** ({c['gain_n']:+.3f}, spread {c['spread_n']:.3f}; its forward "
                         f"term was on at {c['high_entropy_frac']:.1%} of the training positions).")
        else:
            lines.append(f"- **{world}: full OPD keeps the start's coverage, its pass@{n_max} not below the start's by "
                         f"more than the seed spread: {toolkit.verdict(c)}** ({c['gain_n']:+.3f}, spread "
                         f"{c['spread_n']:.3f}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    worlds = list(result["worlds"])
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for name, m in result["worlds"][world]["methods"].items():
            kw = {"start": dict(color="k", ls=":", label="start student"),
                  "teacher": dict(color="k", ls="--", label="teacher")}.get(name) or toolkit.style(name)
            toolkit.band(ax, result["ks"], m["pass@k"], **kw)
        ax.set(xscale="log", xlabel="k", ylabel="pass@k", title=world)
        ax.set_xticks(result["ks"], [str(k) for k in result["ks"]])
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    toolkit.save(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    if scale["samples"] < 2:
        raise ValueError(f"scales.{scale_name}.samples={scale['samples']}: pass@k needs at least 2 samples a prompt")
    jobs = []
    for world in scale["worlds"]:
        setting, paths = get_setting(world), ensure_setting(world, progress=False)
        measure = dict(world=world, task=setting.task, tokenizer=paths["tokenizer"], samples=scale["samples"],
                       eval_prompts=scale["eval_prompts"], max_new_tokens=setting.max_new_tokens)
        for seed in seeds:
            jobs += [{**measure, "method": who, "seed": seed, "model": paths[role]}
                     for who, role in (("start", "student"), ("teacher", "teacher"))]
            for m, fields in METHODS.items():
                config = toolkit.run_config(
                    RUN, fields, student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"],
                    task=setting.task, max_new_tokens=setting.max_new_tokens, steps=steps,
                    eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"], seed=seed,
                    out_dir=str(Path(args.out) / "runs" / f"{world}-{m}-seed{seed}"))
                jobs.append({**measure, "method": m, "seed": seed, "config": config})
    print(f"passk: {len(jobs)} jobs ({len(scale['worlds'])} world(s) × {len(METHODS)} methods × {len(seeds)} seed(s), "
          f"with the start student and the teacher) in {args.workers} process(es)", file=sys.stderr)
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="passk", progress=not args.no_progress)
    names = ["start", "teacher", *METHODS]
    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "run": RUN, "samples": scale["samples"],
              "eval_prompts": scale["eval_prompts"], "ks": k_grid(scale["samples"]), "cpus": toolkit.cpus(),
              "workers": args.workers,
              "worlds": {w: {"task": get_setting(w).task, "methods": aggregate(runs, w, names)} for w in scale["worlds"]}}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
