"""Compounding errors on a slippery route (the DAgger setting): where on-policy data pays, and where it does not.

    python -m opd_mini.experiments slips [--quick] [--seeds 0,1,2] [--waypoints 1,2,4] [--slips 0,0.05,0.1,0.2]
                                         [--methods bc,dart,opd_full] [--out runs/slips] [--workers 2]

The world (:mod:`opd_mini.experiments.worlds`, setting ``route``): routes through K waypoints in order on a
line of 6 positions (``route:6:K``, about 2.3 moves a leg, so the horizon T grows with K). The environment **slips**: each
emitted move is swapped (``L`` ↔ ``R``) with probability ε, after the policy drew it, in the training
rollouts and at evaluation alike (``--slip_prob``, :class:`opd_mini.sampler.Slip`). A slip is nobody's
mistake and every slip is recoverable: the route is still solved by walking back. The teacher was trained
on routes walked through slips, so it knows the way back from anywhere; the student has seen clean direct
paths only.

The methods, from the same student, with the same optimiser, learning rate and budget (steps × 64 sequences):

=================  =============================================================================================
``bc``             behaviour cloning: SFT on the teacher's clean walks (``--slip_train false``: no slips in the
                   training rollouts, evaluation still slips)
``dart``           SFT on the teacher's walks through the same slips, loss on the teacher's own moves only (DART):
                   off-policy data that visits the deviations, the honest counterpoint to on-policy sampling
``opd_full``       OPD, full-vocabulary reverse KL on the student's own slipping walks
``opd_sampled``    OPD, sampled-token reverse KL
``grpo``           RL with the route's verifier, no teacher
=================  =============================================================================================

The grid is K × ε. DAgger's argument (Ross et al. 2011): a policy trained only on the teacher's states makes
ε-rate errors that take it to states it never trained on, so its failures compound, O(εT²), against O(εT)
for a policy trained on its own states. It predicts a gap that grows with ε·T and vanishes at ε = 0, where
there is nothing to recover from (the demo's walk settings sit in that corner: ε·T ≪ 1).

Measured for each run (final student, ``eval_prompts`` held-out prompts × 4 samples, with slips): pass@1;
the success of the walks that slipped at least once (recovery); the error rate per leg (legs failed /
legs started); and, for each method's training data at the start, the share of the training states that
are off the teacher's direct path.

Writes ``OUT/slips.json``, ``OUT/slips.md`` (the docs block and the full table) and ``OUT/slips.png`` (the
OPD − BC gap over the grid, and pass@1 against ε per method at the largest K).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean_std

NAME = "slips"
QUICK_HELP = "the small budget: K = 2, slips in {0, 0.2}, bc and opd_full, 2 seeds, 50 steps (under a minute on 2 cores)"
SETTING = "route"
#: The settings, from recipes/experiments/slips.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: The methods: name -> the loop's settings that make it.
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
#: Positions of the route's line.
POSITIONS = 6


def max_new_tokens(K: int) -> int:
    """The completion budget of a K-waypoint route: a leg is at most 5 moves, each slip costs two more."""
    return 6 * K + 6
#: What every run shares: the loop's settings apart from the method's.
RUN = RECIPE["run"]
#: Samples per prompt of the final measurements.
SAMPLES = 4


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def off_path_share(batch, examples: list) -> float:
    """The share of a batch's loss-bearing states (mask, slips excluded) that are off the teacher's direct path:
    the moves before them are not the start of the reference answer."""
    off = total = 0
    for b, text in enumerate(batch.completions):
        answer = examples[int(batch.prompt_index_B[b])].answer
        keep = batch.mask_BT[b] & ~batch.slipped_BT[b] if batch.slipped_BT is not None else batch.mask_BT[b]
        for t in torch.nonzero(keep).flatten().tolist():
            total += 1
            off += text[:t] != answer[:t]
    return off / max(1, total)


@torch.no_grad()
def route_stats(model, tokenizer, examples: list, *, slip_prob: float, max_new_tokens: int, seed: int) -> dict:
    """On ``SAMPLES`` temperature-1 samples per prompt through slips: pass@1, the success of the walks that slipped
    at least once, the error rate per leg (legs failed / legs started), and the share of states off the direct path."""
    from opd_mini.sampler import sample, slip_for
    from opd_mini.tasks import RouteTask

    slip = slip_for(tokenizer, RouteTask.slip_moves, slip_prob)
    r = sample(model, tokenizer, [e.prompt for e in examples], num_generations=SAMPLES, max_new_tokens=max_new_tokens,
               seed=seed, slip=slip)
    slipped_B = r.slipped_BT.any(1) if r.slipped_BT is not None else torch.zeros(len(r.completions), dtype=torch.bool)
    wins, legs_started, legs_failed = [], 0, 0
    for b, text in enumerate(r.completions):
        e = examples[int(r.prompt_index_B[b])]
        reached, ok = RouteTask.legs_done(e.prompt, text)
        wins.append(float(ok))
        legs = len(RouteTask.stops(e.prompt)) - 1
        legs_started += legs if ok else min(reached + 1, legs)
        legs_failed += 0 if ok else 1
    wins_B = torch.tensor(wins)
    n_slipped = int(slipped_B.sum())
    return {"pass@1": float(wins_B.mean()), "slipped": n_slipped / len(wins),
            "success_after_slip": float(wins_B[slipped_B].mean()) if n_slipped else None,
            "success_without_slip": float(wins_B[~slipped_B].mean()) if n_slipped < len(wins) else None,
            "leg_error": legs_failed / max(1, legs_started), "off_path": off_path_share(r, examples)}


def run_job(job: dict) -> dict:
    """Train one (K, ε, method, seed) and measure the final student."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"K={job['K']} / slip {job['eps']} / {job['method']} / seed {c['seed']}")
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    examples = held_out_examples(get_task(c["task"]), c["eval_prompts"], c["seed"])
    student = toolkit.load_frozen(str(Path(summary["checkpoint"]) / "model"))
    final = route_stats(student, tokenizer, examples, slip_prob=c["slip_prob"], max_new_tokens=c["max_new_tokens"],
                        seed=c["seed"] + 17)
    train_slipped = [r["rollout/slipped_frac"] for r in summary["log"] if "rollout/slipped_frac" in r]
    return {"K": job["K"], "eps": job["eps"], "method": job["method"], "seed": c["seed"],
            "start_pass@1": summary["eval_history"][0]["eval/pass@1"],
            "final_pass@1": summary["eval_history"][-1]["eval/pass@1"], "final": final,
            "train_slipped_frac": sum(train_slipped) / len(train_slipped) if train_slipped else 0.0,
            "ran_slip": summary["ran"].get("slip"), "train_s": summary["train_time_s"]}


def cell_job(job: dict) -> dict:
    """The teacher and the start student of one cell (K, ε), and the share of each method's training states off
    the teacher's path (its training rollouts at the start: the teacher's clean or slipping walks, the student's)."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.sampler import sample, slip_for
    from opd_mini.tasks import RouteTask, get_task

    toolkit.quiet_worker()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    task = get_task(job["task"])
    teacher, student = toolkit.load_frozen(job["teacher"]), toolkit.load_frozen(job["student"])
    out = {"K": job["K"], "eps": job["eps"], "teacher": [], "student": [], "training_off_path": {}}
    for seed in job["seeds"]:
        examples = held_out_examples(task, job["eval_prompts"], seed)
        for role, model in (("teacher", teacher), ("student", student)):
            out[role].append(route_stats(model, tokenizer, examples, slip_prob=job["eps"],
                                         max_new_tokens=job["max_new_tokens"], seed=seed + 17))
    train = task.examples(64, seed=123, split="train")
    slip = slip_for(tokenizer, RouteTask.slip_moves, job["eps"])
    for name, model, s in (("bc", teacher, None), ("dart", teacher, slip), ("opd", student, slip)):
        r = sample(model, tokenizer, [e.prompt for e in train], num_generations=4, max_new_tokens=job["max_new_tokens"],
                   seed=5, slip=s)
        out["training_off_path"][name] = off_path_share(r, train)
    return out


# --------------------------------------------------------------------------------------------
# aggregation and claims
# --------------------------------------------------------------------------------------------


def aggregate(runs: list[dict], cells: list[dict], methods: list[str]) -> list[dict]:
    """One entry per cell (K, ε): the teacher, the start, each method over seeds, and the paired OPD − BC gap."""
    out = []
    for c in sorted(cells, key=lambda c: (c["K"], c["eps"])):
        mine = [r for r in runs if r["K"] == c["K"] and r["eps"] == c["eps"]]
        entry = {"K": c["K"], "eps": c["eps"], "teacher_pass@1": [s["pass@1"] for s in c["teacher"]],
                 "teacher_success_after_slip": [s["success_after_slip"] for s in c["teacher"]],
                 "start_pass@1": [s["pass@1"] for s in c["student"]],
                 "start_success_after_slip": [s["success_after_slip"] for s in c["student"]],
                 "training_off_path": c["training_off_path"], "methods": {}}
        for m in methods:
            rs = sorted((r for r in mine if r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            entry["methods"][m] = {
                "seeds": [r["seed"] for r in rs], "pass@1": [r["final"]["pass@1"] for r in rs],
                "eval_pass@1": [r["final_pass@1"] for r in rs],
                "success_after_slip": [r["final"]["success_after_slip"] for r in rs],
                "leg_error": [r["final"]["leg_error"] for r in rs], "off_path": [r["final"]["off_path"] for r in rs],
                "train_slipped_frac": [r["train_slipped_frac"] for r in rs], "train_s": [r["train_s"] for r in rs]}
        by = entry["methods"]
        for a, b in (("opd_full", "bc"), ("dart", "bc"), ("opd_full", "dart")):
            if a in by and b in by and by[a]["seeds"] == by[b]["seeds"]:
                entry[f"gap_{a}_{b}"] = [x - y for x, y in zip(by[a]["pass@1"], by[b]["pass@1"])]
        out.append(entry)
    return out


def claims(result: dict) -> dict:
    """The aims, as measured: at the cell with the largest ε·T, OPD − BC ≥ 0.3 on every seed; at ε = 0, the mean gap
    within 0.05 at every K (each only where the grid has its cells)."""
    cells = [c for c in result["cells"] if "gap_opd_full_bc" in c]
    out = {}
    slipping = [c for c in cells if c["eps"] > 0]
    if slipping:
        corner = max(slipping, key=lambda c: (c["eps"] * c["K"], c["K"]))
        out["corner_gap_at_least_0.3_every_seed"] = toolkit.claim(
            min(corner["gap_opd_full_bc"]) >= 0.3, K=corner["K"], eps=corner["eps"], gaps=corner["gap_opd_full_bc"])
    clean = [c for c in cells if c["eps"] == 0]
    if clean:
        out["no_gap_without_slips"] = toolkit.claim(
            all(abs(mean_std(c["gap_opd_full_bc"])[0]) <= 0.05 for c in clean),
            gaps={str(c["K"]): mean_std(c["gap_opd_full_bc"])[0] for c in clean})
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block, generated from slips.json (a test keeps docs/results.md equal to it)."""
    run, n = result["run"], len(result["seeds"])
    methods = result["methods"]
    lines = [f"What `python -m opd_mini.experiments slips` measured ({n} seeds, {len(result['headline_seeds'])} at the "
             f"largest K without slips and with the most; {result['steps']} steps × "
             f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full fine-tuning; "
             f"{result['wall_s']:.0f} s in {result['workers']} process(es) on {result['cpus']} CPU cores; every number is in `{results_dir}/slips.json`). "
             f"Final pass@1 with slips, mean ± standard deviation over seeds; the gap is paired by seed.", "",
             f"![OPD − BC over the grid]({results_dir}/slips.png)", "",
             "| K | ε | teacher | start | " + " | ".join(methods) + " | OPD − BC | success after a slip (BC / OPD) |",
             "|---|---|---|---|" + "---|" * len(methods) + "---|---|"]
    for c in result["cells"]:
        by = c["methods"]
        after = " / ".join(fmt(by[m]["success_after_slip"], 2, never="-") if m in by else "-" for m in ("bc", "opd_full"))
        lines.append(" | ".join([f"| {c['K']}", f"{c['eps']:g}", fmt(c["teacher_pass@1"], 2), fmt(c["start_pass@1"], 2),
                                 *[fmt(by[m]["pass@1"], 2) if m in by else "-" for m in methods],
                                 fmt(c.get("gap_opd_full_bc", []), 2, signed=True, never="-"), after]) + " |")
    cl = result["claims"]
    if "corner_gap_at_least_0.3_every_seed" in cl:
        corner = cl["corner_gap_at_least_0.3_every_seed"]
        lines += ["", f"- **At the largest ε·T (K = {corner['K']}, ε = {corner['eps']:g}) OPD is above BC by at least "
                  f"0.3 on every seed: {toolkit.verdict(corner)}** (gaps "
                  f"{', '.join(f'{g:+.2f}' for g in corner['gaps'])})."]
    if "no_gap_without_slips" in cl:
        clean = cl["no_gap_without_slips"]
        lines.append(f"- **Without slips the gap is within 0.05 at every K: {toolkit.verdict(clean)}** (mean gaps "
                     f"{', '.join(f'K={k}: {g:+.3f}' for k, g in clean['gaps'].items())}).")
    return "\n".join(lines)


def details(result: dict) -> str:
    """Each cell's full measurements (the rest of ``OUT/slips.md``)."""
    out = ["| K | ε | method | pass@1 | success after a slip | error per leg | states off path (final) | "
           "training states off path (start) |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        for m, v in c["methods"].items():
            source = "bc" if m == "bc" else "dart" if m == "dart" else "opd"
            out.append(" | ".join([f"| {c['K']}", f"{c['eps']:g}", m, fmt(v["pass@1"], 2),
                                   fmt(v["success_after_slip"], 2, never="-"), fmt(v["leg_error"], 3),
                                   fmt(v["off_path"], 2), f"{c['training_off_path'][source]:.2f}"]) + " |")
    return "\n".join(out)


def figure(result: dict, path: Path) -> None:
    """Left: the OPD − BC gap (mean, and its spread) over K × ε. Right: pass@1 against ε per method, largest K."""
    plt = toolkit.pyplot()
    Ks, eps = result["waypoints"], result["slips"]
    cells = {(c["K"], c["eps"]): c for c in result["cells"]}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    grid = torch.full((len(Ks), len(eps)), float("nan"))
    for i, k in enumerate(Ks):
        for j, e in enumerate(eps):
            gaps = cells.get((k, e), {}).get("gap_opd_full_bc")
            if gaps:
                mu, sd = mean_std(gaps)
                grid[i, j] = mu
                ax.text(j, i, f"{mu:+.2f}\n± {sd:.2f}", ha="center", va="center", fontsize=9)
    im = ax.imshow(grid.numpy(), cmap="RdBu", vmin=-1, vmax=1, origin="lower", aspect="auto")
    ax.set(xticks=range(len(eps)), xticklabels=[f"{e:g}" for e in eps], yticks=range(len(Ks)), yticklabels=Ks,
           xlabel="slip probability ε", ylabel="waypoints K", title="OPD full − BC, final pass@1 with slips")
    fig.colorbar(im, ax=ax)
    K = max(Ks)
    for m in result["methods"] + ["teacher"]:
        xs, ys = [], []
        for e in eps:
            c = cells.get((K, e))
            if c is None:
                continue
            values = c["teacher_pass@1"] if m == "teacher" else c["methods"].get(m, {}).get("pass@1")
            if values:
                xs.append(e)
                ys.append(values)
        if xs:
            mu = [mean_std(v)[0] for v in ys]
            sd = [mean_std(v)[1] for v in ys]
            bx.errorbar(xs, mu, yerr=sd, marker="o", capsize=3, **_style(m))
    bx.set(xlabel="slip probability ε", ylabel="pass@1 with slips", title=f"K = {K} waypoints", ylim=(0, 1.02))
    bx.legend(fontsize=8)
    toolkit.save(fig, path)


def _style(method: str) -> dict:
    return {"bc": dict(color="C0", label="BC (SFT, clean teacher walks)"),
            "dart": dict(color="C9", label="DART (SFT, teacher walks through slips)")}.get(method, toolkit.style(method))


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)
    p.add_argument("--waypoints", default=None, help="comma-separated K (default 1,2,4; --quick 2)")
    p.add_argument("--slips", default=None, help="comma-separated slip probabilities ε in [0, 1) (default "
                   "0,0.05,0.1,0.2; --quick 0,0.2)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: "
                   f"{','.join(SCALES['full']['methods'])} on the grid and {','.join(SCALES['full']['corner_methods'])} "
                   "at the largest K and ε)")


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    Ks = [int(k) for k in _floats(args.waypoints, "waypoints")] if args.waypoints else list(scale["waypoints"])
    eps = _floats(args.slips, "slips") if args.slips else list(scale["slips"])
    if any(k < 1 for k in Ks) or any(k != int(k) for k in _floats(args.waypoints or "1", "waypoints")):
        raise ValueError(f"--waypoints needs whole numbers K >= 1, got {args.waypoints!r}")
    if any(not 0 <= e < 1 for e in eps):
        raise ValueError(f"--slips needs probabilities in [0, 1), got {args.slips!r}")
    if args.methods:
        grid_methods, corner_methods = toolkit.parse_names(args.methods, METHODS, "methods"), []
    else:
        grid_methods, corner_methods = list(scale["methods"]), list(scale["corner_methods"])
    headline = seeds if args.seeds is not None else toolkit.parse_seeds(scale["headline_seeds"])
    paths = ensure_setting(SETTING, progress=False)
    out = Path(args.out)
    jobs, cell_jobs = [], []
    for K in Ks:
        for e in eps:
            task, T = f"route:{POSITIONS}:{K}", max_new_tokens(K)
            cell_jobs.append({"K": K, "eps": e, "task": task, "teacher": paths["teacher"], "student": paths["student"],
                              "tokenizer": paths["tokenizer"], "max_new_tokens": T, "eval_prompts": scale["eval_prompts"],
                              "seeds": seeds})
            methods = grid_methods + (corner_methods if K == max(Ks) and e == max(eps) else [])
            # the headline cells (the largest K, without slips and with the most): more seeds, when --seeds is not given
            cell_seeds = headline if K == max(Ks) and e in (min(eps), max(eps)) else seeds
            cell_jobs[-1]["seeds"] = cell_seeds
            for m in methods:
                fields = dict(METHODS[m])
                if e == 0:
                    fields.pop("slip_train", None)  # nothing to turn off without slips: bc and dart coincide
                for seed in cell_seeds:
                    config = toolkit.run_config(
                        RUN, fields, student=paths["student"], teacher=fields.get("teacher", paths["teacher"]),
                        tokenizer=paths["tokenizer"], task=task, max_new_tokens=T, slip_prob=e, steps=steps,
                        eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"], seed=seed,
                        out_dir=str(out / "runs" / f"K{K}-eps{e:g}-{m}-seed{seed}"))
                    jobs.append({"K": K, "eps": e, "method": m, "config": config})
    print(f"slips: {len(Ks)} K × {len(eps)} ε, {len(jobs)} runs of {steps} steps in {args.workers} process(es)",
          file=sys.stderr)
    done = toolkit.run_pool(None, [(cell_job, j) for j in cell_jobs] + [(run_job, j) for j in jobs], args.workers,
                            desc="slips", progress=not args.no_progress)
    cells = [r for r in done if "training_off_path" in r]
    runs = [r for r in done if "method" in r]
    methods = [m for m in METHODS if m in grid_methods + corner_methods]
    result = {"scale": scale_name, "steps": steps, "seeds": seeds, "headline_seeds": headline, "waypoints": Ks, "slips": eps, "methods": methods,
              "run": RUN, "cpus": toolkit.cpus(), "workers": args.workers, "eval_prompts": scale["eval_prompts"],
              "cells": aggregate(runs, cells, methods)}
    result["claims"] = claims(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
