"""Self-distillation on a transformer: SFT on the model's own samples drifts away from it, OPD stays put.

    python -m opd_mini.experiments forgetting [--quick] [--seeds 0,1,2] [--lrs 1e-3,3e-3,1e-2] [--out runs/forgetting]

The teacher is the initial student π₀ itself: a LoRA student whose teacher is ``self``, scored with its
adapter disabled, so there is no second copy of the weights. Every sample the teacher gives has, in
expectation, nothing to teach (KL = 0 to start with), so whatever moves the student away from π₀ is
noise. Three methods, through the same loop (:func:`opd_mini.train.train`), at each learning rate:

=============  ===================================================================================
``sft_fixed``  SFT on a fixed set of π₀'s samples (``teacher_sample_pool``: 64 prompts × 4 samples,
               drawn once), the classic distillation dataset
``sft_fresh``  SFT on fresh samples of π₀ every step
``opd``        OPD, sampled-token reverse KL on the student's own samples, scored by π₀
=============  ===================================================================================

Reported against steps, per seed: **KL(π₀ ‖ π)** per token on π₀'s own samples of held-out prompts
(``eval/kl_forward``) and pass@1. The student is the ``compounding`` setting's warm-started walker
(:mod:`opd_mini.experiments.worlds`). Learning a new skill and forgetting an old one, and recovering it, is
the ``retention`` experiment (:mod:`opd_mini.experiments.retention`).

Writes ``OUT/forgetting.json``, ``OUT/forgetting.md`` and ``OUT/forgetting.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit

NAME = "forgetting"
QUICK_HELP = "the small budget: one learning rate, 10 steps (the tests use it)"
#: The methods: name -> (loss, teacher_sample_pool).
METHODS: dict[str, tuple[str, int]] = {"sft_fixed": ("sft", 64), "sft_fresh": ("sft", 0),
                                       "opd": ("reverse_kl_sampled", 0)}
SCALES: dict[str, dict] = {
    "full": dict(steps=60, eval_every=10, eval_prompts=128, lrs=(1e-3, 3e-3, 1e-2)),
    "quick": dict(steps=10, eval_every=5, eval_prompts=48, lrs=(3e-3,)),
}
RUN = dict(lora=True, teacher="self", task="walk:10", max_new_tokens=12, prompts_per_step=16, num_generations=4,
           eval_samples=4, pass_k=4, eval_kl_forward=True, threads=1, save_every=0, progress=False, device="cpu",
           dtype="float32", divergence_factor=0.0)


def run_job(job: dict) -> dict:
    """Train one (method, lr, seed); returns its evaluation history."""
    c = job["config"]
    series = toolkit.curves(toolkit.train_run(c, f"{job['method']} / lr {c['lr']:g} / seed {c['seed']}"),
                            "pass@1", "kl_forward")
    return {"method": job["method"], "lr": c["lr"], "seed": c["seed"], "steps": series["steps"],
            "kl_to_init": series["kl_forward"], "pass@1": series["pass@1"]}


def claims(entries: list[dict]) -> dict:
    """The aim: at every lr, SFT's KL to π₀ rises with steps (mean Spearman correlation over seeds > 0.5)
    while OPD's final KL stays below a tenth of SFT's."""
    cases = []
    for lr in sorted({e["lr"] for e in entries}):
        by = {e["method"]: e for e in entries if e["lr"] == lr}
        opd_final = toolkit.mean_std([k[-1] for k in by["opd"]["kl_to_init"]])[0]
        for name in ("sft_fixed", "sft_fresh"):
            e = by[name]
            rho = toolkit.mean_std([toolkit.spearman(e["steps"], k) for k in e["kl_to_init"]])[0]
            final = toolkit.mean_std([k[-1] for k in e["kl_to_init"]])[0]
            cases.append({"lr": lr, "method": name, "kl_rank_correlation_with_steps": rho, "final_kl": final,
                          "opd_final_kl": opd_final, "rises": rho > 0.5, "opd_below_tenth": opd_final < 0.1 * final})
    return {"sft_kl_rises_opd_below_tenth": toolkit.claim(all(c["rises"] and c["opd_below_tenth"] for c in cases),
                                                          cases=cases)}


def figure(result: dict, path: Path) -> None:
    """KL(π₀ ‖ π) (top) and pass@1 (bottom) against steps, one column per learning rate, ± 1 std over seeds."""
    plt = toolkit.pyplot()
    lrs = sorted({e["lr"] for e in result["self_distill"]})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.2), squeeze=False)
    for col, lr in enumerate(lrs):
        for e in (e for e in result["self_distill"] if e["lr"] == lr):
            for row, key in enumerate(("kl_to_init", "pass@1")):
                toolkit.band(axes[row][col], e["steps"], e[key], ls="-" if e["method"] == "opd" else "--",
                             **toolkit.style(e["method"]))
        axes[0][col].set(title=f"lr {lr:g}", ylabel="KL(π₀ ‖ π) per token")
        axes[1][col].set(ylabel="pass@1 (held-out)", xlabel="step")
    axes[0][0].legend(frameon=False)
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block of transformer self-distillation results, generated from forgetting.json."""
    lines = [f"On a transformer (`python -m opd_mini.experiments forgetting`: the walk student of the demo with a LoRA "
             f"adapter, its teacher itself with the adapter disabled; {len(result['seeds'])} seeds, {result['steps']} "
             f"steps × {result['run']['prompts_per_step'] * result['run']['num_generations']} sequences; "
             f"`{results_dir}/forgetting.json`), KL(π₀ ‖ π) per token at the last step, mean ± std over seeds:", "",
             "| lr | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for lr in sorted({e["lr"] for e in result["self_distill"]}):
        cells = [toolkit.fmt([k[-1] for k in e["kl_to_init"]], 4) for name in METHODS
                 for e in result["self_distill"] if e["lr"] == lr and e["method"] == name]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    c = result["claims"]["sft_kl_rises_opd_below_tenth"]
    rho = ", ".join(f"{x['method']} at lr {x['lr']:g}: {toolkit.num(x['kl_rank_correlation_with_steps'])}"
                    for x in c["cases"])
    lines += ["", f"SFT's KL rises with steps at every learning rate while OPD's stays below a tenth of it: "
              f"**{toolkit.verdict(c)}** (rank correlation of KL with steps, mean over seeds: {rho}).", "",
              f"![KL to the initial model and pass@1 against steps]({results_dir}/forgetting.png)"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the scale's)")


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(scale["lrs"])
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, e.g. 1e-3,3e-3; got {args.lrs!r}") from None
    if not lrs:
        raise ValueError("--lrs needs at least one learning rate")
    paths = ensure_setting("compounding", progress=False)
    jobs = [{"method": name, "config": toolkit.run_config(
                RUN, student=paths["student"], tokenizer=paths["tokenizer"], loss=loss, teacher_sample_pool=pool, lr=lr,
                seed=seed, steps=steps, eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
                out_dir=str(Path(args.out) / "runs" / f"{name}-lr{lr:g}-seed{seed}"))}
            for name, (loss, pool) in METHODS.items() for lr in lrs for seed in seeds]
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="self-distillation runs", progress=not args.no_progress)
    entries = []
    for name in METHODS:
        for lr in lrs:
            mine = sorted((r for r in runs if r["method"] == name and r["lr"] == lr), key=lambda r: r["seed"])
            entries.append({"method": name, "lr": lr, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                            "kl_to_init": [r["kl_to_init"] for r in mine], "pass@1": [r["pass@1"] for r in mine]})
    return {"scale": scale_name, "seeds": seeds, "steps": steps,
            "run": {**RUN, "student": "compounding student (opd_mini.experiments.worlds)"},
            "methods": {k: {"loss": v[0], "teacher_sample_pool": v[1]} for k, v in METHODS.items()},
            "self_distill": entries, "claims": claims(entries)}


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
