"""Fu et al.'s special-token masking, measured: sampled-token OPD with and without ``--mask_special_tokens``.

    python -m opd_mini.experiments special [--quick] [--worlds compounding] [--seeds 0,1,2] [--out runs/special]

Fu et al. (§4.2) find the one-token comparison distorted on special tokens, where student and teacher tokenisations
disagree most, and report that masking them lifted sampled-token OPD from 36.4 to 40.7. Here student and teacher
share one tokenizer, so there is no mismatch to hide; what masking removes is the teacher's judgement of when to
stop. On the demo's worlds (``compounding``: walk:10, ``counter_example``: reverse:5) this experiment measures:

* **at the start**: on the student's temperature-1 samples of held-out prompts, the share of the completion tokens
  that are special (EOS) and the share of Σ|r_t|, r_t = log π − log q of the sampled token, that sits on them: the
  share of the sampled-token update that masking removes;
* **after training**: sampled-token OPD (``reverse_kl_sampled``) with and without the mask, the same budget: final
  held-out pass@1 and completion length.

Writes ``OUT/special.json``, ``OUT/special.md`` and ``OUT/special.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "special"
QUICK_HELP = "the small budget: counter_example, 1 seed, 20 steps (the tests use it)"
WORLDS = ("compounding", "counter_example")
#: The settings, from recipes/experiments/special.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a
#: constant below: the loop's settings every run shares, the methods (name -> the loop's settings), the budgets.
RECIPE = toolkit.recipe(NAME)
RUN = RECIPE["run"]
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]


def start_job(job: dict) -> dict:
    """The start student's samples of one world and seed: the share of tokens that are special and of Σ|r_t| on them."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task
    from opd_mini.teacher import score

    toolkit.quiet_worker()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    student, teacher = toolkit.load_frozen(job["student"]), toolkit.load_frozen(job["teacher"])
    examples = held_out_examples(get_task(job["task"]), job["eval_prompts"], job["seed"])
    with torch.no_grad():
        r = sample(student, tokenizer, [e.prompt for e in examples], num_generations=4,
                   max_new_tokens=job["max_new_tokens"], temperature=1.0, seed=job["seed"] + 29)
        gap_BT = (sampled_token_logprobs(student, r).float()
                  - score(teacher, r, vocab_size=len(tokenizer)).teacher_logp_BT.float()).abs()
    mask_BT = r.mask_BT
    special_BT = torch.isin(r.tokens_BT, torch.tensor(tokenizer.all_special_ids)) & mask_BT
    return {"kind": "start", "world": job["world"], "seed": job["seed"],
            "special_token_share": float(special_BT.sum() / mask_BT.sum()),
            "special_gap_share": float(gap_BT[special_BT].sum() / gap_BT[mask_BT].sum()),
            "mean_abs_gap_special": float(gap_BT[special_BT].mean()) if special_BT.any() else None,
            "mean_abs_gap_other": float(gap_BT[mask_BT & ~special_BT].mean())}


def run_job(job: dict) -> dict:
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['world']} / {job['method']} / seed {c['seed']}")
    history = summary["eval_history"]
    return {"kind": "run", "world": job["world"], "method": job["method"], "seed": c["seed"],
            "curve": toolkit.curves(summary, "pass@1", "completion_len"),
            "ran_mask": summary["config"]["mask_special_tokens"],
            "start_pass@1": history[0]["eval/pass@1"], "final_pass@1": history[-1]["eval/pass@1"],
            "final_len": history[-1]["eval/completion_len"], "train_s": summary["train_time_s"]}


def aggregate(done: list[dict], world: str, methods: list[str]) -> dict:
    starts = sorted((r for r in done if r["kind"] == "start" and r["world"] == world), key=lambda r: r["seed"])
    out = {"world": world, **{k: [r[k] for r in starts] for k in ("special_token_share", "special_gap_share",
                                                                     "mean_abs_gap_special", "mean_abs_gap_other")},
           "methods": {}}
    for m in methods:
        rs = sorted((r for r in done if r["kind"] == "run" and r["world"] == world and r["method"] == m),
                    key=lambda r: r["seed"])
        out["methods"][m] = {k: [r[k] for r in rs] for k in ("seed", "start_pass@1", "final_pass@1", "final_len",
                                                             "ran_mask")}
        out["methods"][m]["steps"] = rs[0]["curve"]["steps"]
        out["methods"][m]["curves"] = [r["curve"]["pass@1"] for r in rs]
    by = out["methods"]
    if "opd_sampled" in by and "opd_sampled_masked" in by:
        out["gap_masked_minus_unmasked"] = [a - b for a, b in zip(by["opd_sampled_masked"]["final_pass@1"],
                                                                  by["opd_sampled"]["final_pass@1"])]
    return out


def claims(result: dict) -> dict:
    """Fu et al.'s direction, per world: masking the special tokens raises sampled-token OPD's final pass@1 (the mean
    of the paired gaps above one standard deviation of them)."""
    out = {}
    for w in result["worlds"]:
        gaps = w.get("gap_masked_minus_unmasked")
        if gaps:
            m, sd = mean_std(gaps)
            out[f"{w['world']}/masking_raises_pass@1"] = toolkit.claim(m > sd, gaps=gaps)
    return out


def docs_block(result: dict, results_dir: str) -> str:
    run, n = result["run"], len(result["seeds"])
    lines = [f"What `python -m opd_mini.experiments special` measured ({n} seeds; {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full fine-tuning; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is in "
             f"`{results_dir}/special.json`). At the start, on the student's samples: the share of the completion tokens "
             "that are special (EOS here) and the share of Σ|r_t| on them. After training: final held-out pass@1 and "
             "completion length, mean ± standard deviation over seeds; the gap is paired by seed.", "",
             f"![masking special tokens]({results_dir}/special.png)", "",
             "| world | special tokens | share of Σ abs r_t on them | mean abs r_t: special / other | unmasked | masked | "
             "masked − unmasked | length: unmasked / masked |", "|---|---|---|---|---|---|---|---|"]
    for w in result["worlds"]:
        by = w["methods"]
        lines.append(f"| {w['world']} | {fmt(w['special_token_share'], 2)} | {fmt(w['special_gap_share'], 2)} | "
                     f"{mean_std(w['mean_abs_gap_special'])[0]:.2f} / {mean_std(w['mean_abs_gap_other'])[0]:.2f} | "
                     f"{fmt(by['opd_sampled']['final_pass@1'], 3)} | {fmt(by['opd_sampled_masked']['final_pass@1'], 3)} | "
                     f"{fmt(w['gap_masked_minus_unmasked'], 3, signed=True)} | "
                     f"{mean_std(by['opd_sampled']['final_len'])[0]:.1f} / "
                     f"{mean_std(by['opd_sampled_masked']['final_len'])[0]:.1f} |")
    lines.append("")
    for key, c in result["claims"].items():
        world = key.split("/")[0]
        lines.append(f"- **{world}: masking the special tokens raises sampled-token OPD's final pass@1: "
                     f"{toolkit.verdict(c)}** (paired gaps {', '.join(f'{g:+.3f}' for g in c['gaps'])}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(1, len(result["worlds"]), figsize=(5.5 * len(result["worlds"]), 3.8), squeeze=False)
    for ax, w in zip(axes[0], result["worlds"]):
        for m, color, label in (("opd_sampled", "C2", "sampled-token OPD"),
                                ("opd_sampled_masked", "C9", "… special tokens masked")):
            v = w["methods"][m]
            toolkit.band(ax, v["steps"], v["curves"], label=label, color=color)
        ax.set(xlabel="step", ylabel="held-out pass@1", ylim=(0, 1.02), title=w["world"])
        ax.legend(fontsize=8, frameon=False)
    toolkit.save(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)
    p.add_argument("--worlds", default=None, help=f"comma-separated, from {', '.join(WORLDS)}")


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    worlds = toolkit.parse_names(args.worlds, WORLDS, "worlds", default=scale["worlds"])
    jobs = []
    for world in worlds:
        setting, paths = get_setting(world), ensure_setting(world, progress=False)
        base = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"], task=setting.task,
                    max_new_tokens=setting.max_new_tokens)
        for seed in seeds:
            jobs.append((start_job, {**base, "world": world, "seed": seed, "eval_prompts": scale["eval_prompts"]}))
            for m in METHODS:
                config = toolkit.run_config(RUN, base, METHODS[m], steps=steps, eval_every=min(scale["eval_every"], steps),
                                            eval_prompts=scale["eval_prompts"], seed=seed,
                                            out_dir=str(Path(args.out) / "runs" / f"{world}-{m}-seed{seed}"))
                jobs.append((run_job, {"world": world, "method": m, "config": config}))
    print(f"special: {len(jobs)} jobs, runs of {steps} steps, in {args.workers} process(es)", file=sys.stderr)
    done = toolkit.run_pool(None, jobs, args.workers, desc="special", progress=not args.no_progress)
    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "run": RUN, "cpus": toolkit.cpus(),
              "workers": args.workers, "eval_prompts": scale["eval_prompts"],
              "worlds": [aggregate(done, w, list(METHODS)) for w in worlds]}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
