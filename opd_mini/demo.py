"""The tiny-world demonstration, offline on a CPU: continued SFT on teacher samples vs on-policy distillation.

    python -m opd_mini.demo [--steps 100] [--seeds 0,1] [--losses reverse_kl_sampled,reverse_kl_topk] [--out runs/demo]

From the tiny teacher and the briefly SFT-warm-started student of :mod:`opd_mini.tiny`, it trains
the student three ways through the same ``train`` function and prints one table:

* **continued SFT, equal samples**: the teacher generates, the student does cross-entropy on the
  teacher's samples (off-policy), for the same number of steps × sequences as OPD;
* **OPD**: the student generates and the teacher scores every token of the student's own samples
  (on-policy distillation; by default three variants: sampled-token reverse KL, reverse KL inside the
  teacher's top-K, and the exact full-vocabulary reverse KL);
* **continued SFT, equal wall time**: SFT again, for as many steps as fit in the first OPD variant's
  training time (sampling + scoring + updates; evaluation excluded).

All runs use the ``tiny-cpu`` preset (full fine-tuning, AdamW, its learning rate and batch) and differ
only in the loss, so "equal samples" means equal steps × sequences per step.

Rows also give the teacher and the student before training. Evaluation: pass@1/pass@k by the task's
verifier on held-out prompts (sampling at temperature 1) and the per-token reverse KL to the teacher.
The table is also written to ``OUT/demo.md`` and ``OUT/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from opd_mini.config import TrainConfig, run_cli
from opd_mini.registry import LOSS_REGISTRY
from opd_mini.eval import evaluate
from opd_mini.tasks import get_task
from opd_mini.train import train


def teacher_row(cfg: TrainConfig) -> dict:
    """Evaluate the tiny teacher itself with the students' evaluation settings."""
    from transformers import AutoTokenizer

    from opd_mini.teacher import load_teacher
    from opd_mini.tiny import ensure_tiny_models

    paths = ensure_tiny_models(cfg.tiny_dir or None, task=cfg.task) if "tiny" in (cfg.teacher, cfg.student) else {}
    teacher_path = str(paths["teacher"]) if cfg.teacher == "tiny" else cfg.teacher
    tokenizer_path = cfg.tokenizer or (str(paths["tokenizer"]) if cfg.student == "tiny" else cfg.student)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    teacher = load_teacher(teacher_path, device="cpu")
    return evaluate(teacher, tokenizer, get_task(cfg.task), num_prompts=cfg.eval_prompts, num_samples=cfg.eval_samples,
                    k=cfg.pass_k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature, seed=cfg.seed)


def run(cfg: TrainConfig) -> dict:
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the demo owns its run directories
    return train(cfg)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_mini.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the equal-samples runs "
                   "(default: the tiny-cpu preset's)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (rows are means over seeds)")
    p.add_argument("--losses", default="reverse_kl_sampled,reverse_kl_topk,reverse_kl_full",
                   help="comma-separated OPD loss variants; the first sets the wall-time budget of the SFT run")
    p.add_argument("--task", default=None, help="task spec (default: the tiny-cpu preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the preset's)")
    p.add_argument("--teacher", default=None, help="teacher model directory (default: the tiny teacher of the task)")
    p.add_argument("--student", default=None, help="warm-started student directory (default: the tiny student)")
    p.add_argument("--eval_prompts", type=int, default=256, help="held-out prompts per evaluation")
    p.add_argument("--out", default="runs/demo", help="output directory")
    args = p.parse_args(argv)
    return run_cli(lambda: run_demo(args))


def run_demo(args: argparse.Namespace) -> int:
    """The demo's runs and table (see the module docstring), from parsed command-line arguments."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1; got {args.seeds!r}") from None
    opd_losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    opd_variants = [n for n, s in LOSS_REGISTRY.items() if s.signal is not None and s.rollouts == "student"]
    bad = [x for x in opd_losses if x not in opd_variants]
    if bad or not opd_losses:
        raise ValueError(f"--losses must name OPD variants (the student samples, the teacher scores) from "
                         f"{', '.join(opd_variants)}; got {args.losses!r}")
    overrides = dict(task=args.task, lr=args.lr, steps=args.steps, teacher=args.teacher, student=args.student)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = TrainConfig.from_preset("tiny-cpu", eval_every=0, eval_prompts=args.eval_prompts, progress=False,
                                   **overrides)
    samples_per_step = base.prompts_per_step * base.num_generations

    t0 = time.perf_counter()
    teacher = teacher_row(base)
    per_seed = []
    for seed in seeds:
        cfg = base.replace(seed=seed)
        runs = {}
        for loss in opd_losses:
            print(f"seed {seed}: OPD ({loss}), {base.steps} steps", file=sys.stderr)
            runs[loss] = run(cfg.replace(loss=loss, out_dir=str(out / f"{loss}_seed{seed}")))
        print(f"seed {seed}: continued SFT, {base.steps} steps", file=sys.stderr)
        runs["sft"] = run(cfg.replace(loss="sft", out_dir=str(out / f"sft_samples_seed{seed}")))
        budget = runs[opd_losses[0]]["train_time_s"]
        print(f"seed {seed}: continued SFT for {opd_losses[0]}'s {budget:.1f} s", file=sys.stderr)
        runs["sft_time"] = run(cfg.replace(loss="sft", steps=100 * base.steps, max_time_s=budget,
                                           out_dir=str(out / f"sft_time_seed{seed}")))
        per_seed.append({"before": runs[opd_losses[0]]["eval_history"][0], **runs})

    def row(name: str, key: str | None) -> dict:
        if key is None:
            evals = [s["before"] for s in per_seed]
            steps = time_s = 0.0
        else:
            evals = [s[key]["final_eval"] for s in per_seed]
            steps = _mean([s[key]["steps_done"] for s in per_seed])
            time_s = _mean([s[key]["train_time_s"] for s in per_seed])
        return {"method": name, "steps": steps, "training_sequences": steps * samples_per_step, "train_s": time_s,
                **{k: _mean([e[k] for e in evals]) for k in ("eval/pass@1", "eval/pass@k", "eval/kl_reverse")}}

    rows = [
        {"method": "teacher", "steps": None, "training_sequences": None, "train_s": None,
         "eval/pass@1": teacher["eval/pass@1"], "eval/pass@k": teacher["eval/pass@k"], "eval/kl_reverse": 0.0},
        row("student before (SFT warm start)", None),
        row("continued SFT on teacher samples, equal samples", "sft"),
        *[row(f"OPD ({loss}), equal samples", loss) for loss in opd_losses],
        row(f"continued SFT on teacher samples, equal wall time (= {opd_losses[0]}'s)", "sft_time"),
    ]
    header = (f"Task {base.task}; {len(seeds)} seed(s) {seeds}; {base.eval_prompts} held-out prompts × "
              f"{base.eval_samples} samples at temperature {base.eval_temperature}; pass@k with k={base.pass_k}; "
              f"{samples_per_step} training sequences per step; lr {base.lr}; total wall time "
              f"{time.perf_counter() - t0:.0f} s.")
    table = [header, "", "| method | steps | training sequences | train s | pass@1 | pass@k | KL(student‖teacher)/token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = ["–" if r[k] is None else f"{r[k]:.0f}" for k in ("steps", "training_sequences")]
        cells.append("–" if r["train_s"] is None else f"{r['train_s']:.1f}")
        cells += [f"{r['eval/pass@1']:.3f}", f"{r['eval/pass@k']:.3f}", f"{r['eval/kl_reverse']:.4f}"]
        table.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    text = "\n".join(table)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text(text + "\n")
    (out / "demo.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"\nwritten: {out / 'demo.md'}, {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
