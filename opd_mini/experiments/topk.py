"""Top-K as Fu et al. run it: top-p rollouts × K × {sampled-token, renormalised top-K, top-K with a tail bucket}.

    python -m opd_mini.experiments topk [--quick] [--seeds 0,1,2] [--out runs/topk]

Fu et al. find that top-K local support "yields more stable optimization and better downstream performance than
sampled-token OPD" (41.5 against 36.4), with top-p rollouts in their recipe. Here, on the demo's ``compounding``
world (walk:10; the tiny tokenizer has V = 101 tokens, so K ≪ V means something), from the same student and with
the same budget: sampled-token OPD (``reverse_kl_sampled``), reverse KL inside the teacher's top-K renormalised
(``reverse_kl_topk``) and with one bucket for the mass outside it (``reverse_kl_topk_tail``), for K in the recipe's
list, each with rollouts at top-p 0.9 and 1.0 (``--top_p``; the evaluation samples at temperature 1 without top-p).

Measured per run: final held-out pass@1 (the loop's evaluation); the final student's per-token entropy on its own
samples (the renormalised top-K leaves the mass outside the support unpenalised, the tail bucket does not); the
gradient norm's coefficient of variation over the steps (stability); and whether the run collapsed (ended more than
0.05 below its start). Writes ``OUT/topk.json``, ``OUT/topk.md`` and ``OUT/topk.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "topk"
QUICK_HELP = "the small budget: top-p 0.9, K = 8, 1 seed, 20 steps (the tests use it)"
#: A run that ends this far below its start collapsed.
COLLAPSE = 0.05
#: The settings, from recipes/experiments/topk.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a
#: constant below: the loop's settings every run shares, the methods (name -> the loop's settings), the budgets.
RECIPE = toolkit.recipe(NAME)
RUN = RECIPE["run"]
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]


def run_job(job: dict) -> dict:
    """Train one (method, K, top-p, seed); its final pass@1, entropy on its own samples and gradient-norm spread."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.recovery import policy_stats
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"{job['method']} / K={job['k']} / top-p {c['top_p']} / seed {c['seed']}")
    norms = [r["optim/grad_norm"] for r in summary["log"] if "optim/grad_norm" in r]
    mu, sd = mean_std(norms)
    task = get_task(c["task"])
    final = policy_stats(toolkit.load_frozen(str(Path(summary["checkpoint"]) / "model")),
                         None, AutoTokenizer.from_pretrained(c["tokenizer"]), task,
                         held_out_examples(task, c["eval_prompts"], c["seed"]), max_new_tokens=c["max_new_tokens"],
                         seed=c["seed"] + 11)
    history = summary["eval_history"]
    return {"method": job["method"], "k": job["k"], "top_p": c["top_p"], "seed": c["seed"],
            "start_pass@1": history[0]["eval/pass@1"], "final_pass@1": history[-1]["eval/pass@1"],
            "entropy": final["entropy"], "grad_norm_cv": sd / mu if mu else None, "train_s": summary["train_time_s"]}


def aggregate(runs: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["top_p"], r["method"], r["k"]) for r in runs):
        rs = sorted((r for r in runs if (r["top_p"], r["method"], r["k"]) == key), key=lambda r: r["seed"])
        entry = {"top_p": key[0], "method": key[1], "k": key[2], "seeds": [r["seed"] for r in rs]}
        for k in ("start_pass@1", "final_pass@1", "entropy", "grad_norm_cv"):
            entry[k] = [r[k] for r in rs]
        entry["collapsed"] = sum(r["final_pass@1"] < r["start_pass@1"] - COLLAPSE for r in rs)
        out.append(entry)
    return sorted(out, key=lambda e: (-e["top_p"], list(METHODS).index(e["method"]), e["k"] or 0))


def claims(result: dict) -> dict:
    """Per top-p: the best K of renormalised top-K ends above sampled-token OPD by more than the larger seed spread
    (Fu et al.'s direction); and, at every K and top-p, the tail bucket ends with a lower entropy than the
    renormalised top-K."""
    out, rows = {}, result["rows"]
    for p in result["top_ps"]:
        sampled = next((e for e in rows if e["top_p"] == p and e["method"] == "opd_sampled"), None)
        topk = [e for e in rows if e["top_p"] == p and e["method"] == "opd_topk"]
        if sampled and topk:
            best = max(topk, key=lambda e: mean_std(e["final_pass@1"])[0])
            margin = mean_std(best["final_pass@1"])[0] - mean_std(sampled["final_pass@1"])[0]
            spread = max(mean_std(best["final_pass@1"])[1], mean_std(sampled["final_pass@1"])[1])
            out[f"top_p={p:g}/topk_above_sampled"] = toolkit.claim(margin > spread, k=best["k"], margin=margin,
                                                                    spread=spread)
    pairs = [(a, b) for a in rows if a["method"] == "opd_topk_tail" for b in rows
             if b["method"] == "opd_topk" and (b["top_p"], b["k"]) == (a["top_p"], a["k"])]
    if pairs:
        diffs = [mean_std(a["entropy"])[0] - mean_std(b["entropy"])[0] for a, b in pairs]
        out["tail_lowers_entropy"] = toolkit.claim(all(d < 0 for d in diffs), differences=diffs)
    return out


def docs_block(result: dict, results_dir: str) -> str:
    run, n = result["run"], len(result["seeds"])
    lines = [f"What `python -m opd_mini.experiments topk` measured ({n} seeds; `{result['task']}`, V = {result['vocab']}; "
             f"{result['steps']} steps × {run['prompts_per_step'] * run['num_generations']} sequences per run, lr "
             f"{run['lr']}, full fine-tuning; {result['wall_s']:.0f} s in {result['workers']} process(es) on "
             f"{result['cpus']} CPU cores; every number is in `{results_dir}/topk.json`). Mean ± standard deviation over "
             "seeds; entropy: nats per token of the final student on its own samples; grad-norm CV: the gradient "
             f"norm's standard deviation over its mean across the steps; collapsed: runs that ended more than "
             f"{COLLAPSE} below their start.", "", f"![top-K against sampled-token]({results_dir}/topk.png)", "",
             "| top-p | method | K | final pass@1 | entropy | grad-norm CV | collapsed |", "|---|---|---|---|---|---|---|"]
    for e in result["rows"]:
        lines.append(f"| {e['top_p']:g} | {e['method']} | {e['k'] or '-'} | {fmt(e['final_pass@1'], 3)} | "
                     f"{fmt(e['entropy'], 3)} | {fmt(e['grad_norm_cv'], 2)} | {e['collapsed']}/{len(e['seeds'])} |")
    lines.append("")
    for key, c in result["claims"].items():
        if key == "tail_lowers_entropy":
            lines.append(f"- **The tail bucket ends with a lower entropy than the renormalised top-K at every K and "
                         f"top-p: {toolkit.verdict(c)}** (differences {', '.join(f'{d:+.3f}' for d in c['differences'])}).")
        else:
            lines.append(f"- **{key.split('/')[0]}: the best K of top-K (K = {c['k']}) ends above sampled-token OPD by "
                         f"more than the seed spread: {toolkit.verdict(c)}** (margin {c['margin']:+.3f}, spread "
                         f"{c['spread']:.3f}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for j, p in enumerate(result["top_ps"]):
        for method, ls in (("opd_topk", "-"), ("opd_topk_tail", "--")):
            rs = [e for e in result["rows"] if e["top_p"] == p and e["method"] == method]
            if not rs:
                continue
            for ax, key in zip(axes, ("final_pass@1", "entropy")):
                ax.errorbar([e["k"] for e in rs], [mean_std(e[key])[0] for e in rs],
                            yerr=[mean_std(e[key])[1] for e in rs], marker="o", capsize=3, ls=ls, color=f"C{j}",
                            label=f"{method}, top-p {p:g}")
        sampled = next((e for e in result["rows"] if e["top_p"] == p and e["method"] == "opd_sampled"), None)
        if sampled:
            for ax, key in zip(axes, ("final_pass@1", "entropy")):
                ax.axhline(mean_std(sampled[key])[0], color=f"C{j}", ls=":", lw=1, label=f"sampled-token, top-p {p:g}")
    for ax, label in zip(axes, ("final held-out pass@1", "final entropy (nats per token)")):
        ax.set(xscale="log", xlabel="K", ylabel=label)
        ax.legend(fontsize=7, frameon=False)
    toolkit.save(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    setting, paths = get_setting(scale["world"]), ensure_setting(scale["world"], progress=False)
    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    bad = [k for k in scale["ks"] if not 2 <= k <= vocab]
    if bad:
        raise ValueError(f"scales.{scale_name}.ks={scale['ks']}: every K must lie in [2, V={vocab}] (the tokenizer's "
                         "vocabulary); top-K with K = 1 keeps one token, whose renormalised KL is 0")
    if any(not 0 < p <= 1 for p in scale["top_ps"]):
        raise ValueError(f"scales.{scale_name}.top_ps={scale['top_ps']}: every top-p must lie in (0, 1]")
    base = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"], task=setting.task,
                max_new_tokens=setting.max_new_tokens, steps=steps, eval_every=min(scale["eval_every"], steps),
                eval_prompts=scale["eval_prompts"])
    jobs = []
    for p in scale["top_ps"]:
        for m, fields in METHODS.items():
            for k in (scale["ks"] if "topk" in fields["loss"] else [None]):
                for seed in seeds:
                    config = toolkit.run_config(RUN, base, fields, top_p=p, seed=seed, **({"top_k": k} if k else {}),
                                                out_dir=str(Path(args.out) / "runs" / f"p{p:g}-{m}-K{k}-seed{seed}"))
                    jobs.append({"method": m, "k": k, "config": config})
    print(f"topk: {len(jobs)} runs of {steps} steps in {args.workers} process(es)", file=sys.stderr)
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="topk", progress=not args.no_progress)
    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "task": setting.task, "vocab": vocab,
              "top_ps": list(scale["top_ps"]), "ks": list(scale["ks"]), "run": RUN, "cpus": toolkit.cpus(),
              "workers": args.workers, "eval_prompts": scale["eval_prompts"], "rows": aggregate(runs)}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
