"""Why OPD forgets little, on a transformer: retention, self-distillation drift, recovering an old skill.

    python -m opd_mini.forgetting [--quick] [--parts retention,self_distill,recovery] [--seeds 0,1,2]
                                  [--lrs 1e-3,3e-3,1e-2] [--out runs/forgetting]

**1. Retention.** The student π₀ is the ``continual`` world's model (:mod:`opd_mini.worlds`): it knows
skill A (``reverse:5``) and has seen a little of skill B (``walk:10``). With a LoRA adapter it learns B
from the B-expert (the compounding setting's walk teacher) by each method of :data:`RETENTION_METHODS`;
every evaluation measures B's pass@1, A's pass@1 and KL(π₀ ‖ π) per token on A's prompts (π₀ = the
adapter-disabled base, on its own samples). Forgetting is compared at **matched B success**: the first
evaluation where B's pass@1 closes ``target_gap`` of the gap from π₀ to the B-expert.

**3. Recovery.** From each seed's post-B ``sft`` adapter (A eroded), OPD on A's prompts with the pre-B
model as the teacher (the adapter-disabled base: no second copy), alone (``opd_A``) or with B's prompts
distilled from the post-B model at the same time (``opd_A+B``, per-task teachers); reported: the steps
until two thirds of A's drop is recovered, and B's pass@1 then and at the end.

**2. Self-distillation.** The teacher is the initial student π₀ itself: a LoRA student whose teacher is ``self``, scored with its
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
(:mod:`opd_mini.worlds`).

Writes ``OUT/forgetting.json`` and the figures ``OUT/retention.png``, ``OUT/forgetting.png`` (self-distillation)
and ``OUT/recovery.png``.
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
#: Part 1: name -> the TrainConfig fields that make the method ({B} = the B-expert's path).
RETENTION_METHODS: dict[str, dict] = {
    "sft": dict(loss="sft", teacher="{B}"),
    "sft_replay": dict(loss="sft", task="{Btask}*3+{A}", teachers="{Btask}={B};{A}=self"),  # a quarter replay of A
    "opd_sampled": dict(loss="reverse_kl_sampled", teacher="{B}"),
    "opd_topk": dict(loss="reverse_kl_topk", teacher="{B}"),
    "opd_full": dict(loss="reverse_kl_full", teacher="{B}"),
    "grpo": dict(loss="grpo", teacher="none"),
}
#: Part 3: variant -> fields ({post} = the merged post-B model of the same seed).
RECOVERY_VARIANTS: dict[str, dict] = {
    "opd_A": dict(task="{A}", teacher="{pre}"),
    "opd_A+B": dict(task="{A}+{Btask}", teachers="{A}={pre};{Btask}={post}"),
}
A_TASK, B_TASK = "reverse:5", "walk:10"
TRANSFER_SCALES: dict[str, dict] = {
    "full": dict(steps=100, recovery_steps=60, eval_every=10, eval_prompts=64, target_gap=0.15,
                 methods=tuple(RETENTION_METHODS)),
    "quick": dict(steps=30, recovery_steps=20, eval_every=10, eval_prompts=32, target_gap=0.05,
                  methods=("sft", "opd_sampled")),
}
TRANSFER_RUN = dict(lora=True, lr=3e-3, warmup_steps=5, task="{Btask}", eval_task="{Btask}", retention_task="{A}",
                    eval_kl_to_init=True, max_new_tokens=12, prompts_per_step=16, num_generations=4, eval_samples=4,
                    pass_k=4, threads=1, save_every=0, progress=False, device="cpu", dtype="float32",
                    divergence_factor=0.0)
#: A retention task the student knows: its pass@1 at the start must reach this.
MIN_A = 0.5
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
    hist = summary["eval_history"]
    series = {key: [h.get(f"eval/{key}") for h in hist] for key in
              ("pass@1", "kl_forward", "retention_pass@1", "retention_kl_to_init")}
    return {"part": job.get("part", "self_distill"), "method": job["method"], "lr": cfg.lr, "seed": cfg.seed,
            "steps": [h["step"] for h in hist], "kl_to_init": series["kl_forward"], "pass@1": series["pass@1"],
            "retention_pass@1": series["retention_pass@1"], "retention_kl_to_init": series["retention_kl_to_init"],
            "checkpoint": summary["checkpoint"]}


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


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def _fmt(xs: list, digits: int = 3) -> str:
    """'mean ± std (k/n reached)' of a per-seed list where None = not reached."""
    got = [x for x in xs if x is not None]
    if not got:
        return f"not reached (0/{len(xs)})"
    text = f"{_mean(got):.{digits}f} ± {_sd(got):.{digits}f}"
    return text if len(got) == len(xs) else f"{text} ({len(got)}/{len(xs)} seeds)"


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's correlation (0 when either side is constant)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = sum((a - mx) ** 2 for a in x) ** 0.5, sum((b - my) ** 2 for b in y) ** 0.5
    return cov / (sx * sy) if sx > 0 and sy > 0 else 0.0


def _fill(fields: dict, names: dict) -> dict:
    """Replace the {A}/{B}/... placeholders of a method's fields."""
    return {k: (v.format(**names) if isinstance(v, str) else v) for k, v in fields.items()}


def first_reaching(run: dict, key: str, level: float) -> int | None:
    """Index of the first evaluation where ``run[key]`` >= ``level`` (None: never)."""
    return next((i for i, v in enumerate(run[key]) if v is not None and v >= level - 1e-12), None)


# --------------------------------------------------------------------------------------------
# part 1: retention at matched B success
# --------------------------------------------------------------------------------------------


def retention_results(runs: list[dict], methods: list[str], target: float) -> list[dict]:
    """One entry per method: A before, and at the first evaluation where B's pass@1 reaches ``target``, A's
    pass@1 and KL(π₀ ‖ π) on A's prompts (None where a seed never reached it), B at the end, the curves."""
    out = []
    for name in methods:
        mine = sorted((r for r in runs if r["part"] == "retention" and r["method"] == name), key=lambda r: r["seed"])
        hits = [first_reaching(r, "pass@1", target) for r in mine]
        at = lambda r, i, key: None if i is None else r[key][i]  # noqa: E731
        out.append({
            "method": name, "seeds": [r["seed"] for r in mine],
            "A_before": _mean([r["retention_pass@1"][0] for r in mine]),
            "A_before_per_seed": [r["retention_pass@1"][0] for r in mine],
            "B_before": _mean([r["pass@1"][0] for r in mine]),
            "matched_B": target,
            "steps_to_matched_B": [at(r, i, "steps") for r, i in zip(mine, hits)],
            "A_at_matched_B": [at(r, i, "retention_pass@1") for r, i in zip(mine, hits)],
            "kl_A_at_matched_B": [at(r, i, "retention_kl_to_init") for r, i in zip(mine, hits)],
            "B_final": [r["pass@1"][-1] for r in mine], "A_final": [r["retention_pass@1"][-1] for r in mine],
            "kl_A_final": [r["retention_kl_to_init"][-1] for r in mine],
            "steps": mine[0]["steps"], "B_curves": [r["pass@1"] for r in mine],
            "A_curves": [r["retention_pass@1"] for r in mine], "kl_A_curves": [r["retention_kl_to_init"] for r in mine]})
    return out


def retention_correlations(entries: list[dict]) -> dict:
    """How A's drop tracks KL(π₀ ‖ π) on A's prompts: across (method, seed) at matched B, and across every
    evaluation of every run (Spearman and Pearson)."""
    matched = [(e["A_before_per_seed"][i] - a, k) for e in entries
               for i, (a, k) in enumerate(zip(e["A_at_matched_B"], e["kl_A_at_matched_B"])) if a is not None]
    every = [(e["A_before_per_seed"][s] - a, k) for e in entries for s in range(len(e["seeds"]))
             for a, k in zip(e["A_curves"][s][1:], e["kl_A_curves"][s][1:])]
    out = {}
    for name, pts in (("at_matched_B", matched), ("every_eval", every)):
        drops, kls = [p[0] for p in pts], [p[1] for p in pts]
        out[name] = {"points": len(pts), "spearman": rank_correlation(drops, kls) if len(pts) > 2 else None,
                     "pearson": pearson(drops, kls) if len(pts) > 2 else None}
    return out


def retention_claim(entries: list[dict]) -> dict:
    """The aim: each OPD method's drop of A at matched B is at most half of SFT's (mean over seeds; a method
    with a seed that never reaches matched B does not hold)."""
    drop = {e["method"]: (None if None in e["A_at_matched_B"] else
                          _mean([b - a for b, a in zip(e["A_before_per_seed"], e["A_at_matched_B"])])) for e in entries}
    cases = [{"method": m, "drop": d, "sft_drop": drop.get("sft"),
              "holds": d is not None and drop.get("sft") is not None and d <= 0.5 * drop["sft"]}
             for m, d in drop.items() if m.startswith("opd")]
    return {"holds": bool(cases) and all(c["holds"] for c in cases), "cases": cases, "drops": drop}


# --------------------------------------------------------------------------------------------
# part 3: recovery
# --------------------------------------------------------------------------------------------


def merge_adapter(base: str, adapter: str, tokenizer: str, out: Path) -> str:
    """The post-B model as a plain checkpoint: ``base`` with the LoRA ``adapter`` merged in (a teacher)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return str(out)


def recovery_results(runs: list[dict], retention: dict, variants: list[str]) -> list[dict]:
    """One entry per variant: A before and after B (the sft run of the same seed), the steps until two
    thirds of A's drop is recovered, B then and at the end."""
    out = []
    for name in variants:
        mine = sorted((r for r in runs if r["part"] == "recovery" and r["method"] == name), key=lambda r: r["seed"])
        before = [retention[r["seed"]]["retention_pass@1"][0] for r in mine]
        after = [retention[r["seed"]]["retention_pass@1"][-1] for r in mine]
        b_after = [retention[r["seed"]]["pass@1"][-1] for r in mine]
        levels = [a + 2 / 3 * (b - a) for a, b in zip(after, before)]
        hits = [first_reaching(r, "pass@1", lv) for r, lv in zip(mine, levels)]
        out.append({
            "variant": name, "seeds": [r["seed"] for r in mine],
            "A_before_B": _mean(before), "A_after_B": _mean(after), "B_after_B": _mean(b_after),
            "A_before_B_per_seed": before, "A_after_B_per_seed": after, "B_after_B_per_seed": b_after,
            "two_thirds_level": levels,
            "steps_to_two_thirds": [None if i is None else r["steps"][i] for r, i in zip(mine, hits)],
            "A_recovered": [r["pass@1"][-1] for r in mine],
            "B_at_two_thirds": [None if i is None else r["retention_pass@1"][i] for r, i in zip(mine, hits)],
            "B_final": [r["retention_pass@1"][-1] for r in mine],
            "steps": mine[0]["steps"], "A_curves": [r["pass@1"] for r in mine],
            "B_curves": [r["retention_pass@1"] for r in mine]})
    return out


def recovery_claim(entries: list[dict]) -> dict:
    """The aim: every seed gets back two thirds of A's drop while B stays within 0.05 of its post-B value."""
    cases = []
    for e in entries:
        within = [None if b is None else abs(b - b0) <= 0.05 for b, b0 in zip(e["B_at_two_thirds"], e["B_after_B_per_seed"])]
        cases.append({"variant": e["variant"], "recovered_seeds": sum(x is not None for x in e["steps_to_two_thirds"]),
                      "B_within_0.05_seeds": sum(bool(x) for x in within), "seeds": len(e["seeds"]),
                      "holds": all(bool(x) for x in within)})
    return {"holds": bool(cases) and all(c["holds"] for c in cases), "cases": cases}


# --------------------------------------------------------------------------------------------
# figures and README sections
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, steps, curves, label, ls="-"):
    import torch

    ys = torch.tensor(curves, dtype=torch.float64)
    mu, sd = ys.mean(0), (ys.std(0) if len(ys) > 1 else torch.zeros(ys.shape[1]))
    line, = ax.plot(steps, mu, label=label, lw=1.5, ls=ls)
    ax.fill_between(steps, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
    return line


def retention_figure(result: dict, path: Path) -> None:
    """B's pass@1, A's pass@1 and KL(π₀ ‖ π) on A against steps per method (± 1 std), and A's drop against
    the KL at every evaluation."""
    plt = _pyplot()
    entries = result["retention"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for e in entries:
        ls = "-" if e["method"].startswith("opd") else "--"
        line = _band(axes[0], e["steps"], e["B_curves"], e["method"], ls)
        _band(axes[1], e["steps"], e["A_curves"], e["method"], ls)
        _band(axes[2], e["steps"], e["kl_A_curves"], e["method"], ls)
        for s, a0 in enumerate(e["A_before_per_seed"]):
            axes[3].scatter(e["kl_A_curves"][s][1:], [a0 - a for a in e["A_curves"][s][1:]], s=9,
                            color=line.get_color(), alpha=0.6)
    axes[0].axhline(result["retention_setup"]["matched_B"], color="grey", lw=0.8, ls=":")
    for ax, title in zip(axes, (f"B ({result['retention_setup']['B_task']}) pass@1; dotted: matched B",
                                f"A ({result['retention_setup']['A_task']}) pass@1",
                                "KL(π₀ ‖ π) per token on A's prompts", "A's drop against the KL, every eval")):
        ax.set_title(title, fontsize=9)
    for ax in axes[:3]:
        ax.set_xlabel("step")
    axes[3].set_xlabel("KL(π₀ ‖ π) on A")
    axes[3].set_ylabel("drop of A's pass@1")
    axes[1].legend(frameon=False, fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_figure(result: dict, path: Path) -> None:
    """A's and B's pass@1 against recovery steps, per variant (± 1 std)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for e in result["recovery"]:
        _band(axes[0], e["steps"], e["A_curves"], e["variant"])
        _band(axes[1], e["steps"], e["B_curves"], e["variant"])
    e0 = result["recovery"][0]
    axes[0].axhline(e0["A_before_B"], color="grey", lw=0.8, ls=":", label="A before B")
    axes[1].axhline(e0["B_after_B"], color="grey", lw=0.8, ls=":", label="B after B")
    axes[0].set_title("A pass@1 during recovery", fontsize=9)
    axes[1].set_title("B pass@1 during recovery", fontsize=9)
    for ax in axes:
        ax.set_xlabel("recovery step")
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retention_section(result: dict, results_dir: str = "tutorials/results") -> str:
    """The README's retention block, generated from forgetting.json."""
    setup = result["retention_setup"]
    lines = [f"Retention on a transformer (`python -m opd_mini.forgetting`, part 1): the `continual` model knows A "
             f"(`{setup['A_task']}`, pass@1 {setup['A_start']:.3f}) and a little of B (`{setup['B_task']}`, "
             f"{setup['B_start']:.3f}); with a LoRA adapter it learns B from the B-expert (B pass@1 "
             f"{setup['B_expert']:.3f}), {len(result['seeds'])} seeds, {setup['steps']} steps. Matched B = the first "
             f"evaluation with B's pass@1 ≥ {setup['matched_B']:.3f}; mean ± std over the seeds that reach it:", "",
             "| method | steps to matched B | A at matched B | KL(π₀ ‖ π) on A at matched B | B final | A final |",
             "|---|---|---|---|---|---|"]
    for e in result["retention"]:
        lines.append(f"| {e['method']} | {_fmt(e['steps_to_matched_B'], 0)} | {_fmt(e['A_at_matched_B'])} | "
                     f"{_fmt(e['kl_A_at_matched_B'])} | {_fmt(e['B_final'])} | {_fmt(e['A_final'])} |")
    c = result["claims"]["opd_drop_at_most_half_of_sft"]
    cases = ", ".join(f"{x['method']} {x['drop']:.3f}" if x["drop"] is not None else f"{x['method']} not reached in every seed"
                      for x in c["cases"])
    sft = c["drops"].get("sft")
    corr = result["retention_correlation"]
    lines += ["", f"OPD's drop of A at matched B is at most half of SFT's: **{'holds' if c['holds'] else 'does not hold'}** "
              f"(drop of A's pass@1: sft {'not reached' if sft is None else f'{sft:.3f}'}; {cases}). "
              f"A's drop against KL(π₀ ‖ π) on A: Spearman {_num(corr['every_eval']['spearman'])} over every evaluation "
              f"({corr['every_eval']['points']} points), {_num(corr['at_matched_B']['spearman'])} at matched B "
              f"({corr['at_matched_B']['points']} points).", "",
              f"![B, A and the KL to π₀ against steps]({results_dir}/retention.png)"]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def recovery_section(result: dict, results_dir: str = "tutorials/results") -> str:
    """The README's recovery block, generated from forgetting.json."""
    lines = [f"Recovery (part 3): from each seed's post-B `sft` adapter, {result['recovery_setup']['steps']} steps of "
             "sampled-token OPD with the pre-B model (the adapter-disabled base) as the teacher on A's prompts; "
             "`opd_A+B` also distils B's prompts from the post-B model. Mean ± std over seeds:", "",
             "| variant | A before B | A after B | steps to ⅔ of A's drop back | A recovered | B after B | B at ⅔ | B final |",
             "|---|---|---|---|---|---|---|---|"]
    for e in result["recovery"]:
        lines.append(f"| {e['variant']} | {e['A_before_B']:.3f} | {e['A_after_B']:.3f} | "
                     f"{_fmt(e['steps_to_two_thirds'], 0)} | {_fmt(e['A_recovered'])} | {e['B_after_B']:.3f} | "
                     f"{_fmt(e['B_at_two_thirds'])} | {_fmt(e['B_final'])} |")
    c = result["claims"]["recovery_two_thirds_B_within_0.05"]
    cases = "; ".join(f"{x['variant']}: {x['recovered_seeds']}/{x['seeds']} seeds recover ⅔, "
                      f"{x['B_within_0.05_seeds']}/{x['seeds']} with B within 0.05" for x in c["cases"])
    lines += ["", f"Recovery gets back ⅔ of A's drop while B stays within 0.05 of its post-B value: "
              f"**{'holds' if c['holds'] else 'does not hold'}** ({cases}).", "",
              f"![A and B during recovery]({results_dir}/recovery.png)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

PARTS = ("retention", "self_distill", "recovery")


def _transfer_config(paths: dict, fields: dict, names: dict, *, seed: int, steps: int, scale: dict, out_dir: Path) -> dict:
    config = {**TrainConfig().to_dict(), **_fill({**TRANSFER_RUN, **fields}, names), "student": paths["student"],
              "tokenizer": paths["tokenizer"], "seed": seed, "steps": steps,
              "eval_every": min(scale["eval_every"], max(1, steps)), "eval_prompts": scale["eval_prompts"],
              "out_dir": str(out_dir)}
    TrainConfig(**config).validate()  # bad values stop here, before any run
    return config


def start_point(paths: dict, expert: str, a_task: str, b_task: str, eval_prompts: int) -> dict:
    """π₀'s pass@1 on A and B and the B-expert's on B, measured as every run's first evaluation measures them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_mini.eval import evaluate
    from opd_mini.tasks import get_task

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a measurement, not the user's run: no "Loading weights" bars
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    kw = dict(num_prompts=eval_prompts, num_samples=4, k=1, max_new_tokens=TRANSFER_RUN["max_new_tokens"], seed=0)
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(expert).eval()
    return {"A_start": evaluate(student, tokenizer, get_task(a_task), split="all", **kw)["eval/pass@1"],
            "B_start": evaluate(student, tokenizer, get_task(b_task), split="all", **kw)["eval/pass@1"],
            "B_expert": evaluate(teacher, tokenizer, get_task(b_task), split="all", **kw)["eval/pass@1"]}


def check_recovery_teacher(path: str, tokenizer_path: str) -> None:
    """A pre-B teacher given by path must share the student's tokenizer (else the scores mean nothing)."""
    from transformers import AutoTokenizer

    from opd_mini.teacher import check_same_tokenizer

    if not Path(path).is_dir():
        raise ValueError(f"--recovery_teacher {path} is not a directory: give a save_pretrained checkpoint of the "
                         "student before it learned B, or 'self' (the adapter-disabled base)")
    try:
        theirs = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise ValueError(f"--recovery_teacher {path} has no tokenizer, so it cannot be checked against the "
                         "student's: save the checkpoint with its tokenizer") from None
    try:
        check_same_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path), theirs)
    except ValueError as e:
        raise ValueError(f"--recovery_teacher {path} does not match the student: {e}") from None


def run_experiment(args: argparse.Namespace) -> int:
    from opd_mini.demo import parse_names, run_pool
    from opd_mini.tasks import get_task
    from opd_mini.worlds import ensure_setting

    quick = "quick" if args.quick else "full"
    scale, tscale = SCALES[quick], TRANSFER_SCALES[quick]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(scale["lrs"])
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers and --lrs comma-separated numbers; got "
                         f"{args.seeds!r} and {args.lrs!r}") from None
    if not seeds or not lrs:
        raise ValueError("--seeds and --lrs need at least one value each")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct integers >= 0; got {args.seeds!r}")
    if args.steps is not None:
        TrainConfig(steps=args.steps)  # a bad value stops here, before anything loads
    parts = parse_names(args.parts, PARTS, "parts")
    if "recovery" in parts and "retention" not in parts:
        raise ValueError("--parts recovery needs retention too (it starts from the post-B sft adapters)")
    methods = parse_names(args.methods, RETENTION_METHODS, "methods") if args.methods else list(tscale["methods"])
    if "recovery" in parts and "sft" not in methods:
        raise ValueError("recovery starts from the sft runs: add sft to --methods")
    a_task = args.retention_task
    get_task(a_task)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bars of the main process's own loads
    out = Path(args.out)
    t0 = time.perf_counter()
    result: dict = {"scale": quick, "seeds": seeds, "parts": parts}
    jobs, names = [], {}
    if "retention" in parts:
        world, expert = ensure_setting("continual", progress=False), ensure_setting("compounding", progress=False)["teacher"]
        if args.recovery_teacher != "self":
            check_recovery_teacher(args.recovery_teacher, world["tokenizer"])
        steps = tscale["steps"] if args.steps is None else args.steps
        start = start_point(world, expert, a_task, B_TASK, tscale["eval_prompts"])
        if start["A_start"] < MIN_A:
            raise ValueError(f"the student has not learned the retention task {a_task} (pass@1 {start['A_start']:.3f} < "
                             f"{MIN_A}): choose a task it knows, e.g. --retention_task {A_TASK}")
        target = start["B_start"] + tscale["target_gap"] * (start["B_expert"] - start["B_start"])
        result["retention_setup"] = {"A_task": a_task, "B_task": B_TASK, **start, "matched_B": target,
                                     "target_gap": tscale["target_gap"], "steps": steps,
                                     "student": "continual (opd_mini.worlds)", "B_expert": start["B_expert"],
                                     "B_expert_model": "compounding teacher (opd_mini.worlds)",
                                     "run": {k: v for k, v in TRANSFER_RUN.items()}}
        names = {"A": a_task, "Btask": B_TASK, "B": expert}
        for name in methods:
            for seed in seeds:
                cfg = _transfer_config(world, RETENTION_METHODS[name], names, seed=seed, steps=steps, scale=tscale,
                                       out_dir=out / "runs" / f"retention-{name}-seed{seed}")
                jobs.append({"part": "retention", "method": name, "config": cfg})
    if "self_distill" in parts:
        paths = ensure_setting("compounding", progress=False)
        sd_steps = scale["steps"] if args.steps is None else args.steps
        for name, (loss, pool) in METHODS.items():
            for lr in lrs:
                for seed in seeds:
                    config = {**TrainConfig().to_dict(), **RUN, "student": paths["student"], "tokenizer": paths["tokenizer"],
                              "loss": loss, "teacher_sample_pool": pool, "lr": lr, "seed": seed, "steps": sd_steps,
                              "eval_every": min(scale["eval_every"], max(1, sd_steps)), "eval_prompts": scale["eval_prompts"],
                              "out_dir": str(out / "runs" / f"{name}-lr{lr:g}-seed{seed}")}
                    TrainConfig(**config).validate()
                    jobs.append({"part": "self_distill", "method": name, "config": config})
        result.update(steps=sd_steps, run={**RUN, "student": "compounding student (opd_mini.worlds)"},
                      methods={k: {"loss": v[0], "teacher_sample_pool": v[1]} for k, v in METHODS.items()})
    runs = run_pool(run_job, jobs, args.workers, desc="forgetting runs", progress=not args.no_progress)

    if "retention" in parts:
        result["retention"] = retention_results(runs, methods, result["retention_setup"]["matched_B"])
        result["retention_correlation"] = retention_correlations(result["retention"])
    if "self_distill" in parts:
        entries = []
        for name in METHODS:
            for lr in lrs:
                mine = sorted((r for r in runs if r["part"] == "self_distill" and r["method"] == name and r["lr"] == lr),
                              key=lambda r: r["seed"])
                entries.append({"method": name, "lr": lr, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                                "kl_to_init": [r["kl_to_init"] for r in mine], "pass@1": [r["pass@1"] for r in mine]})
        result["self_distill"] = entries
    if "recovery" in parts:
        post_b = {r["seed"]: r for r in runs if r["part"] == "retention" and r["method"] == "sft"}
        rjobs, rsteps = [], tscale["recovery_steps"] if args.steps is None else args.steps
        for seed in seeds:
            adapter = str(Path(post_b[seed]["checkpoint"]) / "model")
            merged = merge_adapter(world["student"], adapter, world["tokenizer"], out / "runs" / f"post_b-seed{seed}")
            rnames = {**names, "post": merged, "pre": "self" if args.recovery_teacher == "self" else args.recovery_teacher}
            for variant, fields in RECOVERY_VARIANTS.items():
                fields = {**fields, "loss": "reverse_kl_sampled", "init_adapter": adapter, "eval_task": "{A}",
                          "retention_task": "{Btask}", "eval_kl_to_init": False, "teacher": fields.get("teacher", "self")}
                rjobs.append({"part": "recovery", "method": variant, "config": _transfer_config(
                    world, fields, rnames, seed=seed, steps=rsteps, scale=tscale,
                    out_dir=out / "runs" / f"recovery-{variant}-seed{seed}")})
        rruns = run_pool(run_job, rjobs, args.workers, desc="recovery runs", progress=not args.no_progress)
        result["recovery_setup"] = {"steps": rsteps, "loss": "reverse_kl_sampled",
                                    "pre_B_teacher": "the adapter-disabled base" if args.recovery_teacher == "self"
                                    else args.recovery_teacher}
        result["recovery"] = recovery_results(rruns, post_b, list(RECOVERY_VARIANTS))

    claims_: dict = {}
    if "retention" in parts:
        claims_["opd_drop_at_most_half_of_sft"] = retention_claim(result["retention"])
    if "self_distill" in parts:
        claims_.update(claims(result["self_distill"]))
    if "recovery" in parts:
        claims_["recovery_two_thirds_B_within_0.05"] = recovery_claim(result["recovery"])
    result["claims"] = claims_
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forgetting.json").write_text(json.dumps(result, indent=1) + "\n")
    written = [out / "forgetting.json"]
    if "retention" in parts:
        retention_figure(result, out / "retention.png")
        written.append(out / "retention.png")
        print(retention_section(result, str(out)) + "\n")
    if "self_distill" in parts:
        figure(result, out / "forgetting.png")
        written.append(out / "forgetting.png")
        print(readme_section(result, str(out)) + "\n")
    if "recovery" in parts:
        recovery_figure(result, out / "recovery.png")
        written.append(out / "recovery.png")
        print(recovery_section(result, str(out)) + "\n")
    print(f"wall time {result['wall_s']:.0f} s; written: {', '.join(map(str, written))}")
    if "retention" in parts and not any(x is not None for e in result["retention"] for x in e["A_at_matched_B"]):
        raise ValueError(f"no run reached the matched B success ({result['retention_setup']['matched_B']:.3f}) within "
                         f"{result['retention_setup']['steps']} steps, so forgetting cannot be compared there (reported as "
                         "not reached in the results): raise --steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    from opd_mini.demo import experiment_parser

    p = experiment_parser("python -m opd_mini.forgetting", __doc__.split("\n\n")[0],
                          "the small budget (the tests use it)", "runs/forgetting")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--methods", default=None, help=f"retention methods, from {', '.join(RETENTION_METHODS)} (default: "
                   f"all; --quick: {','.join(TRANSFER_SCALES['quick']['methods'])})")
    p.add_argument("--lrs", default=None, help="self-distillation: comma-separated learning rates (default: the scale's)")
    p.add_argument("--retention_task", default=A_TASK, help=f"skill A, which the student must know (default {A_TASK})")
    p.add_argument("--recovery_teacher", default="self", help="the pre-B teacher of recovery: 'self' (the student's "
                   "adapter-disabled base) or a save_pretrained directory")
    args = p.parse_args(argv)
    return run_cli(lambda: run_experiment(args))


if __name__ == "__main__":
    sys.exit(main())
