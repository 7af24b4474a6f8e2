"""A small ablation grid (loss variants × seeds) through the same ``train`` function, with a table and a plot.

    python -m opd_mini.ablate --preset tiny-cpu --losses reverse_kl_sampled,reverse_kl_topk,sft \\
        --seeds 0,1 --steps 40 --out runs/ablation [any TrainConfig flag, e.g. --lr 3e-4]

Writes, under ``--out``::

    runs/<loss>_seed<k>/     each run's metrics.jsonl, checkpoint and summary.json
    results.csv              one row per run: final evaluation metrics
    results.md               per loss: mean ± std over seeds of each final metric
    ablation.png             eval/pass@1 against step, one line per loss (mean over seeds, band = min..max)
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

from opd_mini.cli import build_parser, config_from_args, join_negative_numbers, run_cli
from opd_mini.config import TrainConfig
from opd_mini.stats import mean_std
from opd_mini.registry import LOSS_REGISTRY
from opd_mini.eval import EVAL_METRIC_DOCS
from opd_mini.train import train

#: Final-evaluation columns of the results table, in order (those a run did not produce are left out).
METRICS = [k for k in EVAL_METRIC_DOCS if k not in ("eval/completion_len", "eval/eos_frac")] + [
    "eval/completion_len", "eval/eos_frac"]


def run_grid(base: TrainConfig, losses: list[str], seeds: list[int], out: str | Path) -> list[dict]:
    """Train every (loss, seed) pair from ``base`` (out_dir = out/runs/<loss>_seed<k>); return their summaries.

    All configs are built and validated before the first run, so a bad combination fails at once.
    """
    out = Path(out)
    configs = []
    for loss in losses:
        for seed in seeds:
            run_dir = out / "runs" / f"{loss}_seed{seed}"
            configs.append(base.replace(loss=loss, seed=seed, out_dir=str(run_dir), resume=False))
    results = []
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] loss={cfg.loss} seed={cfg.seed} → {cfg.out_dir}", file=sys.stderr)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the grid owns its run directories: rerun from scratch
        summary = train(cfg)
        results.append({"loss": cfg.loss, "seed": cfg.seed, **summary})
    return results


def write_results(results: list[dict], out: str | Path) -> dict[str, Path]:
    """results.csv (per run), results.md (mean ± std over seeds per loss) and ablation.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [k for k in METRICS if any(k in r["final_eval"] for r in results)]

    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loss", "seed", "steps", "train_time_s", *metrics])
        for r in results:
            writer.writerow([r["loss"], r["seed"], r["steps_done"], f"{r['train_time_s']:.2f}",
                             *(f"{r['final_eval'].get(k, float('nan')):.6g}" for k in metrics)])

    losses = list(dict.fromkeys(r["loss"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Final evaluation after {results[0]['steps_done']} steps; mean ± std over seeds {seeds}.", "",
             "| loss | " + " | ".join(metrics) + " | train s |", "|---" * (len(metrics) + 2) + "|"]
    for loss in losses:
        runs = [r for r in results if r["loss"] == loss]
        cells = []
        for k in metrics:
            mean, std = mean_std([r["final_eval"].get(k, float("nan")) for r in runs])
            cells.append(f"{mean:.3f} ± {std:.3f}")
        t_mean, _ = mean_std([r["train_time_s"] for r in runs])
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {t_mean:.1f} |")
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")

    png_path = out / "ablation.png"
    plot_curves(results, png_path)
    return {"csv": csv_path, "md": md_path, "png": png_path}


def plot_curves(results: list[dict], path: Path, metric: str = "eval/pass@1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in dict.fromkeys(r["loss"] for r in results):
        curves = [{h["step"]: h[metric] for h in r["eval_history"] if metric in h}
                  for r in results if r["loss"] == loss]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        ax.plot(steps, [sum(v) / len(v) for v in values], marker="o", label=loss)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} on held-out prompts\n(mean over seeds; band: min to max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(prog="python -m opd_mini.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="reverse_kl_sampled,reverse_kl_topk,sft",
                        help=f"comma-separated loss variants, from: {', '.join(LOSS_REGISTRY)} (and any --loss_plugins registers)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--out", default="runs/ablation", help="output directory")
    args = parser.parse_args(join_negative_numbers(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        grid_losses = [s.strip() for s in args.losses.split(",") if s.strip()]
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
        out = Path(args.out)
        for name in ("losses", "seeds", "out"):
            delattr(args, name)
        base = config_from_args(args)  # imports --loss_plugins, so their losses are registered below
        unknown = [x for x in grid_losses if x not in LOSS_REGISTRY]
        if unknown or not grid_losses or not seeds:
            raise ValueError(f"--losses must name loss variants from {', '.join(LOSS_REGISTRY)} and --seeds at least "
                             f"one seed; got losses={grid_losses}, seeds={seeds}")
        for loss in grid_losses:  # validate each combination before spending time on any
            base.replace(loss=loss)
        paths = write_results(run_grid(base, grid_losses, seeds, out), out)
        print(paths["md"].read_text())
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
