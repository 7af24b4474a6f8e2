"""Self-distillation on a transformer: SFT on the model's own samples drifts, OPD stays put.

    python -m opd_mini.forgetting [--quick] [--lrs 1e-3,3e-3,1e-2] [--seeds 0,1,2] [--out runs/forgetting]

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
(:mod:`opd_mini.worlds`). Writes ``OUT/forgetting.json`` and ``OUT/forgetting.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from opd_mini.config import TrainConfig, run_cli

#: The methods: name -> (loss, teacher_sample_pool).
METHODS: dict[str, tuple[str, int]] = {"sft_fixed": ("sft", 64), "sft_fresh": ("sft", 0),
                                       "opd": ("reverse_kl_sampled", 0)}
SCALES: dict[str, dict] = {
    "full": dict(steps=60, eval_every=10, eval_prompts=128, lrs=(1e-3, 3e-3, 1e-2)),
    "quick": dict(steps=20, eval_every=5, eval_prompts=48, lrs=(3e-3,)),
}
RUN = dict(lora=True, teacher="self", task="walk:10", max_new_tokens=12, prompts_per_step=16, num_generations=4,
           eval_samples=4, pass_k=4, eval_kl_forward=True, threads=1, save_every=0, progress=False, device="cpu",
           dtype="float32", divergence_factor=0.0)


def run_job(job: dict) -> dict:
    """Train one (method, lr, seed); returns its evaluation history."""
    import shutil

    from opd_mini.demo import quiet_worker
    from opd_mini.train import train

    quiet_worker()
    cfg = TrainConfig(**job["config"])
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the experiment owns its run directories
    summary = train(cfg)
    return {"method": job["method"], "lr": cfg.lr, "seed": cfg.seed,
            "steps": [h["step"] for h in summary["eval_history"]],
            "kl_to_init": [h["eval/kl_forward"] for h in summary["eval_history"]],
            "pass@1": [h["eval/pass@1"] for h in summary["eval_history"]]}


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank; 0 when either side is constant)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = sum((a - mx) ** 2 for a in rx) ** 0.5, sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx > 0 and sy > 0 else 0.0


def claims(entries: list[dict]) -> dict:
    """The aim: at every lr, SFT's KL to π₀ rises with steps (mean Spearman correlation over seeds > 0.5)
    while OPD's final KL stays below a tenth of SFT's."""
    cases = []
    for lr in sorted({e["lr"] for e in entries}):
        by = {e["method"]: e for e in entries if e["lr"] == lr}
        opd_final = sum(k[-1] for k in by["opd"]["kl_to_init"]) / len(by["opd"]["kl_to_init"])
        for name in ("sft_fixed", "sft_fresh"):
            e = by[name]
            rho = sum(rank_correlation(e["steps"], k) for k in e["kl_to_init"]) / len(e["kl_to_init"])
            final = sum(k[-1] for k in e["kl_to_init"]) / len(e["kl_to_init"])
            cases.append({"lr": lr, "method": name, "kl_rank_correlation_with_steps": rho, "final_kl": final,
                          "opd_final_kl": opd_final, "rises": rho > 0.5, "opd_below_tenth": opd_final < 0.1 * final})
    return {"sft_kl_rises_opd_below_tenth": {"holds": all(c["rises"] and c["opd_below_tenth"] for c in cases),
                                             "cases": cases}}


def figure(result: dict, path: Path) -> None:
    """KL(π₀ ‖ π) (top) and pass@1 (bottom) against steps, one column per learning rate, ± 1 std over seeds."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    lrs = sorted({e["lr"] for e in result["self_distill"]})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.2), squeeze=False)
    for col, lr in enumerate(lrs):
        for e in (e for e in result["self_distill"] if e["lr"] == lr):
            for row, key in enumerate(("kl_to_init", "pass@1")):
                ys = torch.tensor(e[key])
                mu, sd = ys.mean(0), (ys.std(0) if len(ys) > 1 else torch.zeros(ys.shape[1]))
                line, = axes[row][col].plot(e["steps"], mu, label=e["method"], lw=1.5,
                                            ls="-" if e["method"] == "opd" else "--")
                axes[row][col].fill_between(e["steps"], mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
        axes[0][col].set_title(f"lr {lr:g}")
        axes[0][col].set_ylabel("KL(π₀ ‖ π) per token")
        axes[1][col].set_ylabel("pass@1 (held-out)")
        axes[1][col].set_xlabel("step")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_section(result: dict, results_dir: str = "tutorials/results") -> str:
    """The README's block of transformer self-distillation results, generated from forgetting.json."""
    lines = [f"On a transformer (`python -m opd_mini.forgetting`: the walk student of the demo with a LoRA adapter, "
             f"its teacher itself with the adapter disabled; {len(result['seeds'])} seeds, {result['steps']} steps × "
             f"{result['run']['prompts_per_step'] * result['run']['num_generations']} sequences; "
             f"`{results_dir}/forgetting.json`), KL(π₀ ‖ π) per token at the last step, mean ± std over seeds:", "",
             "| lr | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for lr in sorted({e["lr"] for e in result["self_distill"]}):
        cells = []
        for name in METHODS:
            e = next(e for e in result["self_distill"] if e["lr"] == lr and e["method"] == name)
            finals = [k[-1] for k in e["kl_to_init"]]
            m = sum(finals) / len(finals)
            sd = (sum((x - m) ** 2 for x in finals) / max(1, len(finals) - 1)) ** 0.5
            cells.append(f"{m:.4f} ± {sd:.4f}")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    c = result["claims"]["sft_kl_rises_opd_below_tenth"]
    rho = ", ".join(f"{x['method']} at lr {x['lr']:g}: {x['kl_rank_correlation_with_steps']:.2f}" for x in c["cases"])
    lines += ["", f"SFT's KL rises with steps at every learning rate while OPD's stays below a tenth of it: "
              f"**{'holds' if c['holds'] else 'does not hold'}** (rank correlation of KL with steps, mean over seeds: "
              f"{rho}).", "", f"![KL to the initial model and pass@1 against steps]({results_dir}/forgetting.png)"]
    return "\n".join(lines)


def run_experiment(args: argparse.Namespace) -> int:
    from opd_mini.demo import run_pool
    from opd_mini.worlds import ensure_setting

    scale = SCALES["quick" if args.quick else "full"]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(scale["lrs"])
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers and --lrs comma-separated numbers; got "
                         f"{args.seeds!r} and {args.lrs!r}") from None
    if not seeds or not lrs:
        raise ValueError("--seeds and --lrs need at least one value each")
    steps = scale["steps"] if args.steps is None else args.steps
    out = Path(args.out)
    paths = ensure_setting("compounding", progress=False)
    jobs = []
    for name, (loss, pool) in METHODS.items():
        for lr in lrs:
            for seed in seeds:
                config = {**TrainConfig().to_dict(), **RUN, "student": paths["student"], "tokenizer": paths["tokenizer"],
                          "loss": loss, "teacher_sample_pool": pool, "lr": lr, "seed": seed, "steps": steps,
                          "eval_every": min(scale["eval_every"], max(1, steps)), "eval_prompts": scale["eval_prompts"],
                          "out_dir": str(out / "runs" / f"{name}-lr{lr:g}-seed{seed}")}
                TrainConfig(**config).validate()  # bad values stop here, before any run
                jobs.append({"method": name, "config": config})
    t0 = time.perf_counter()
    runs = run_pool(run_job, jobs, args.workers, desc="self-distillation runs", progress=not args.no_progress)
    entries = []
    for name in METHODS:
        for lr in lrs:
            mine = sorted((r for r in runs if r["method"] == name and r["lr"] == lr), key=lambda r: r["seed"])
            entries.append({"method": name, "lr": lr, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                            "kl_to_init": [r["kl_to_init"] for r in mine], "pass@1": [r["pass@1"] for r in mine]})
    result = {"scale": "quick" if args.quick else "full", "steps": steps, "seeds": seeds,
              "run": {**RUN, "student": "compounding student (opd_mini.worlds)"}, "methods": {
                  k: {"loss": v[0], "teacher_sample_pool": v[1]} for k, v in METHODS.items()},
              "self_distill": entries}
    result["claims"] = claims(entries)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forgetting.json").write_text(json.dumps(result, indent=1) + "\n")
    figure(result, out / "forgetting.png")
    print(readme_section(result, str(out)))
    print(f"\nwall time {result['wall_s']:.0f} s; written: {out / 'forgetting.json'}, {out / 'forgetting.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from opd_mini.demo import experiment_parser

    p = experiment_parser("python -m opd_mini.forgetting", __doc__.split("\n\n")[0],
                          "the small budget (the tests use it)", "runs/forgetting")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the scale's)")
    args = p.parse_args(argv)
    return run_cli(lambda: run_experiment(args))


if __name__ == "__main__":
    sys.exit(main())
