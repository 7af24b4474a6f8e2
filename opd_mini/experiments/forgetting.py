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
(``eval/kl_forward``) and pass@1.

**Away from π₀** (``--parts perturbed``). From π₀, OPD staying at KL 0 holds by construction (r_t = 0 at π = π₀),
so it says nothing about stability. The second part starts every method from a *perturbed* student: π₀ plus a
LoRA adapter of Gaussian noise (every adapter weight ~ N(0, σ²), σ = :data:`PERTURB_SIGMA`, seeded per seed; about
0.24 nats per token from π₀), with π₀ (the adapter-disabled base) still the teacher. OPD should come back toward
KL(π₀ ‖ π) ≈ 0, SFT on π₀'s samples settle at its noise floor, which grows with the learning rate. The student is the ``compounding`` setting's warm-started walker
(:mod:`opd_mini.experiments.worlds`). Learning a new skill and forgetting an old one, and recovering it, is
the ``retention`` experiment (:mod:`opd_mini.experiments.retention`).

Writes ``OUT/forgetting.json``, ``OUT/forgetting.md``, ``OUT/forgetting.png`` and (the second part)
``OUT/forgetting_perturbed.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit

NAME = "forgetting"
QUICK_HELP = "the small budget: one learning rate, 10 steps (the tests use it)"
#: The settings, from recipes/experiments/forgetting.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: The methods: name -> (loss, teacher_sample_pool).
METHODS: dict[str, tuple[str, int]] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
#: The parts: from π₀ itself, and from a perturbed student (their docs blocks: forgetting, forgetting_perturbed).
PARTS = {"self_distill": "forgetting", "perturbed": "forgetting_perturbed"}
#: The standard deviation of every weight of the noise adapter the perturbed part starts from (r 8, alpha 16:
#: about 0.24 nats per token from π₀ on the walk student, ten times the largest SFT floor measured from π₀).
PERTURB_SIGMA = 0.07
RUN = RECIPE["run"]


def run_job(job: dict) -> dict:
    """Train one (method, lr, seed); returns its evaluation history."""
    c = job["config"]
    series = toolkit.curves(toolkit.train_run(c, f"{job['method']} / lr {c['lr']:g} / seed {c['seed']}"),
                            "pass@1", "kl_forward")
    return {"part": job["part"], "method": job["method"], "lr": c["lr"], "seed": c["seed"], "steps": series["steps"],
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


def perturbed_claims(entries: list[dict]) -> dict:
    """The aim: from the perturbed start, OPD ends at least 5× closer to π₀ (final KL, mean over seeds) than each SFT
    variant, at every learning rate."""
    cases = []
    for lr in sorted({e["lr"] for e in entries}):
        by = {e["method"]: e for e in entries if e["lr"] == lr}
        opd_final = toolkit.mean_std([k[-1] for k in by["opd"]["kl_to_init"]])[0]
        for name in ("sft_fixed", "sft_fresh"):
            final = toolkit.mean_std([k[-1] for k in by[name]["kl_to_init"]])[0]
            cases.append({"lr": lr, "method": name, "final_kl": final, "opd_final_kl": opd_final,
                          "ratio": final / opd_final if opd_final > 0 else None, "holds": 5 * opd_final <= final})
    return {"opd_5x_closer_than_sft": toolkit.claim(all(c["holds"] for c in cases), cases=cases)}


def figure(result: dict, path: Path, part: str = "self_distill") -> None:
    """KL(π₀ ‖ π) (top) and pass@1 (bottom) against steps, one column per learning rate, ± 1 std over seeds."""
    plt = toolkit.pyplot()
    lrs = sorted({e["lr"] for e in result[part]})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.2), squeeze=False)
    for col, lr in enumerate(lrs):
        for e in (e for e in result[part] if e["lr"] == lr):
            for row, key in enumerate(("kl_to_init", "pass@1")):
                toolkit.band(axes[row][col], e["steps"], e[key], ls="-" if e["method"] == "opd" else "--",
                             **toolkit.style(e["method"]))
        axes[0][col].set(title=f"lr {lr:g}" + (" (from a perturbed start)" if part == "perturbed" else ""),
                         ylabel="KL(π₀ ‖ π) per token")
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


def perturbed_figure(result: dict, path: Path) -> None:
    figure(result, path, part="perturbed")


def perturbed_block(result: dict, results_dir: str) -> str:
    """The docs' block of the perturbed start, generated from forgetting.json."""
    setup = result["perturbed_setup"]
    lines = [f"From a perturbed start (`python -m opd_mini.experiments forgetting`, its second part): π₀ plus a LoRA "
             f"adapter of Gaussian noise (σ = {setup['sigma']:g}), {len(result['seeds'])} seeds, {setup['steps']} "
             f"steps; the teacher is still π₀. KL(π₀ ‖ π) per token at the start and at the last step, mean ± std:", "",
             "| lr | start | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for lr in sorted({e["lr"] for e in result["perturbed"]}):
        mine = [e for name in METHODS for e in result["perturbed"] if e["lr"] == lr and e["method"] == name]
        start = toolkit.fmt([k[0] for k in mine[0]["kl_to_init"]], 3)
        lines.append(f"| {lr:g} | {start} | " + " | ".join(toolkit.fmt([k[-1] for k in e["kl_to_init"]], 4)
                                                           for e in mine) + " |")
    c = result["claims"]["opd_5x_closer_than_sft"]
    ratios = ", ".join(f"{x['method']} at lr {x['lr']:g}: {toolkit.num(x['ratio'], 1)}×" for x in c["cases"])
    lines += ["", f"OPD ends at least 5× closer to π₀ than SFT on π₀'s samples, at every learning rate: "
              f"**{toolkit.verdict(c)}** (SFT's final KL over OPD's: {ratios}).", "",
              f"![KL to the initial model and pass@1 from a perturbed start]({results_dir}/forgetting_perturbed.png)"]
    return "\n".join(lines)


#: The blocks and figures of each part (by block name; result["parts"] lists the block names that ran).
OUTPUTS = {"forgetting": (docs_block, figure), "forgetting_perturbed": (perturbed_block, perturbed_figure)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the scale's)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")


def perturbed_adapter(student: str, out: Path, seed: int) -> str:
    """A LoRA adapter (r 8, alpha 16, every linear layer) whose weights are all N(0, PERTURB_SIGMA²), seeded by
    ``seed``, saved under ``out``: π₀ plus it is the perturbed start."""
    import torch

    from opd_mini.student import load_student, save_student

    model = load_student(student, lora=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * PERTURB_SIGMA)
    return str(save_student(model, out))


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(scale["lrs"])
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, e.g. 1e-3,3e-3; got {args.lrs!r}") from None
    if not lrs:
        raise ValueError("--lrs needs at least one learning rate")
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    paths = ensure_setting("compounding", progress=False)
    out = Path(args.out)
    psteps = scale["perturbed_steps"] if args.steps is None else args.steps
    starts = {seed: perturbed_adapter(paths["student"], out / "runs" / f"perturbed-start-seed{seed}", seed)
              for seed in seeds} if "perturbed" in parts else {}

    def job(part: str, name: str, loss: str, pool: int, lr: float, seed: int) -> dict:
        n = steps if part == "self_distill" else psteps
        extra = {} if part == "self_distill" else {"init_adapter": starts[seed]}
        return {"part": part, "method": name, "config": toolkit.run_config(
            RUN, extra, student=paths["student"], tokenizer=paths["tokenizer"], loss=loss, teacher_sample_pool=pool,
            lr=lr, seed=seed, steps=n, eval_every=min(scale["eval_every"], n), eval_prompts=scale["eval_prompts"],
            out_dir=str(out / "runs" / f"{'' if part == 'self_distill' else 'perturbed-'}{name}-lr{lr:g}-seed{seed}"))}

    jobs = [job(part, name, loss, pool, lr, seed) for part in parts for name, (loss, pool) in METHODS.items()
            for lr in lrs for seed in seeds]
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="self-distillation runs", progress=not args.no_progress)

    def entries(part: str) -> list[dict]:
        out = []
        for name in METHODS:
            for lr in lrs:
                mine = sorted((r for r in runs if r["part"] == part and r["method"] == name and r["lr"] == lr),
                              key=lambda r: r["seed"])
                out.append({"method": name, "lr": lr, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                            "kl_to_init": [r["kl_to_init"] for r in mine], "pass@1": [r["pass@1"] for r in mine]})
        return out

    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "parts": [PARTS[p] for p in parts],
              "run": {**RUN, "student": "compounding student (opd_mini.experiments.worlds)"},
              "methods": {k: {"loss": v[0], "teacher_sample_pool": v[1]} for k, v in METHODS.items()}, "claims": {}}
    if "self_distill" in parts:
        result["self_distill"] = entries("self_distill")
        result["claims"].update(claims(result["self_distill"]))
    if "perturbed" in parts:
        result["perturbed"] = entries("perturbed")
        result["perturbed_setup"] = {"sigma": PERTURB_SIGMA, "steps": psteps, "lora_r": 8, "lora_alpha": 16}
        result["claims"].update(perturbed_claims(result["perturbed"]))
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
