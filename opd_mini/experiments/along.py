"""The teacher along the sequence: how its judgement of the student's tokens, and its own chance of finishing from the
student's prefixes, change with the position in the completion.

    python -m opd_mini.experiments along [--quick] [--seeds 0,1,2] [--out runs/along]

Fu et al. report "unreliable teacher guidance on student-generated prefixes": the teacher–student log-prob gap
grows "progressively wider later in the sequence". Here, on two tiny worlds of :mod:`opd_mini.experiments.worlds`
(``compounding``: walk:10, ``counter_example``: reverse:5), the student samples completions of held-out prompts at
temperature 1, and for every position t of every completion:

* **the gap** r_t = log π(y_t | c_t) − log q(y_t | c_t) of the sampled token (what sampled-token OPD trains on), its
  mean and its mean absolute value over the completions long enough to have a position t;
* **success-to-go**: from the student's prefix y_<t, the teacher (and, for comparison, the student) samples the
  rest of the completion ``continuations`` times; the share that the task's verifier accepts. At t = 0 it is the
  model's own pass@1; later, it says whether the prefix the student has written is one the teacher can still
  finish.

Reported per world, mean ± std over sampling seeds (the models are fixed): both curves against position, and
Spearman's correlation of each with the position. Writes ``OUT/along.json``, ``OUT/along.md`` and ``OUT/along.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit

NAME = "along"
QUICK_HELP = "the small budget: 32 prompts, 2 continuations per prefix (the tests use it)"
WORLDS = ("compounding", "counter_example")
#: The settings, from recipes/experiments/along.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
SCALES: dict[str, dict] = RECIPE["scales"]
#: A position is reported where at least this many completions reach it (over all seeds' samples).
MIN_ROWS = 20


def measure(job: dict) -> dict:
    """One world and seed: the gap and the success-to-go at every position of the student's completions."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.worlds import ensure_setting, get_setting
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task
    from opd_mini.teacher import score

    toolkit.quiet_worker()
    setting, paths = get_setting(job["world"]), ensure_setting(job["world"], progress=False)
    task, T = get_task(setting.task), setting.max_new_tokens
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    models = {"student": toolkit.load_frozen(paths["student"]), "teacher": toolkit.load_frozen(paths["teacher"])}
    examples = held_out_examples(task, job["prompts"], job["seed"])
    with torch.no_grad():
        r = sample(models["student"], tokenizer, [e.prompt for e in examples], num_generations=job["samples"],
                   max_new_tokens=T, temperature=1.0, seed=job["seed"], use_chat_template=False)
        student_logp = sampled_token_logprobs(models["student"], r).float()
        teacher_logp = score(models["teacher"], r, vocab_size=len(tokenizer)).teacher_logp_BT.float()
    gap_BT, mask_BT = (student_logp - teacher_logp).cpu(), r.mask_BT.cpu()
    rows = [examples[int(i)] for i in r.prompt_index_B]
    lengths = mask_BT.sum(1).tolist()
    gap = {"mean": [], "abs": [], "rows": []}
    for t in range(T):  # the batch is only as wide as its longest completion
        if t >= mask_BT.shape[1]:
            gap["rows"].append(0), gap["mean"].append(None), gap["abs"].append(None)
            continue
        keep = mask_BT[:, t]
        gap["rows"].append(int(keep.sum()))
        gap["mean"].append(float(gap_BT[keep, t].mean()) if keep.any() else None)
        gap["abs"].append(float(gap_BT[keep, t].abs().mean()) if keep.any() else None)
    togo = {}
    for who, model in models.items():  # from each prefix y_<t (t = 0 .. length-1) the model finishes the completion
        prefixes = [(b, t) for b, n in enumerate(lengths) for t in range(int(n))]
        texts = [rows[b].prompt + tokenizer.decode(r.tokens_BT[b, :t].tolist()) if t else rows[b].prompt
                 for b, t in prefixes]
        wins = [0.0] * T
        counts = [0] * T
        for t in range(T):  # one sampling call per prefix length (the same max_new_tokens in a call)
            idx = [i for i, (_, tt) in enumerate(prefixes) if tt == t]
            if not idx:
                continue
            with torch.no_grad():
                cont = sample(model, tokenizer, [texts[i] for i in idx], num_generations=job["continuations"],
                              max_new_tokens=T - t, temperature=1.0, seed=job["seed"] * 1_000 + t,
                              use_chat_template=False)
            for k, c in enumerate(cont.completions):
                b, _ = prefixes[idx[int(cont.prompt_index_B[k])]]
                head = tokenizer.decode(r.tokens_BT[b, :t].tolist()) if t else ""
                wins[t] += task.reward(head + c, rows[b])
                counts[t] += 1
        togo[who] = [w / c if c else None for w, c in zip(wins, counts)]
    return {"world": job["world"], "seed": job["seed"], "task": setting.task, "gap": gap, "success_to_go": togo,
            "completions": len(lengths)}


def summarise(runs: list[dict], world: str) -> dict:
    """Mean ± std over seeds at each position reached by at least MIN_ROWS completions, and Spearman with position."""
    mine = sorted((r for r in runs if r["world"] == world), key=lambda r: r["seed"])
    T = len(mine[0]["gap"]["rows"])
    reached = [t for t in range(T) if sum(r["gap"]["rows"][t] for r in mine) >= MIN_ROWS]

    def band(values):
        return [toolkit.mean_std([v[t] for v in values if v[t] is not None]) for t in reached]

    out = {"world": world, "task": mine[0]["task"], "seeds": [r["seed"] for r in mine], "positions": reached,
           "rows": [sum(r["gap"]["rows"][t] for r in mine) for t in reached],
           "gap_mean": band([r["gap"]["mean"] for r in mine]), "gap_abs": band([r["gap"]["abs"] for r in mine]),
           "teacher_to_go": band([r["success_to_go"]["teacher"] for r in mine]),
           "student_to_go": band([r["success_to_go"]["student"] for r in mine])}
    for key in ("gap_mean", "gap_abs", "teacher_to_go", "student_to_go"):
        means = [m for m, _ in out[key]]
        out[f"spearman_{key}"] = toolkit.spearman(reached, means) if len(reached) > 2 else None
    return out


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(len(result["worlds"]), 2, figsize=(10, 3.3 * len(result["worlds"])), squeeze=False)
    for row, w in enumerate(result["worlds"]):
        x = [t + 1 for t in w["positions"]]
        for key, label, color in (("gap_mean", "mean r_t", "C0"), ("gap_abs", "mean |r_t|", "C1")):
            m = [v[0] for v in w[key]]
            s = [v[1] for v in w[key]]
            axes[row][0].plot(x, m, color=color, label=label)
            axes[row][0].fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color,
                                      alpha=0.2)
        for key, label, color in (("teacher_to_go", "teacher", "C2"), ("student_to_go", "student", "C3")):
            axes[row][1].plot(x, [v[0] for v in w[key]], color=color, label=f"{label} finishes")
        axes[row][0].set_title(f"{w['world']} ({w['task']}): log π − log q of the student's token", fontsize=9)
        axes[row][1].set_title(f"{w['world']}: success-to-go from the student's prefix", fontsize=9)
        axes[row][0].set(xlabel="position in the completion")
        axes[row][1].set(xlabel="position in the completion", ylim=(-0.02, 1.02))
        axes[row][0].legend(frameon=False, fontsize=8)
        axes[row][1].legend(frameon=False, fontsize=8)
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    lines = [f"The teacher along the sequence (`python -m opd_mini.experiments along`): the student samples "
             f"{result['prompts']} held-out prompts × {result['samples']} at temperature 1; at every position, the gap "
             f"r_t = log π − log q of its token, and the share of {result['continuations']} continuations from its "
             f"prefix that the verifier accepts (the teacher's and the student's own), mean ± std over "
             f"{len(result['seeds'])} sampling seeds. Spearman of each curve with the position:", "",
             "| world | positions | mean r_t | mean abs r_t | teacher success-to-go | student success-to-go |",
             "|---|---|---|---|---|---|"]
    for w in result["worlds"]:
        if not w["positions"]:
            lines.append(f"| {w['world']} (`{w['task']}`) | none reached by {result['min_rows']} completions | | | | |")
            continue
        first, last = w["positions"][0], w["positions"][-1]

        def span(key):
            a, b = w[key][0], w[key][-1]
            return f"{a[0]:.3f} → {b[0]:.3f} (ρ {toolkit.num(w['spearman_' + key])})"

        lines.append(f"| {w['world']} (`{w['task']}`) | {first + 1}-{last + 1} | {span('gap_mean')} | "
                     f"{span('gap_abs')} | {span('teacher_to_go')} | {span('student_to_go')} |")
    lines += ["", f"![the gap and the success-to-go against position]({results_dir}/along.png)"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", default=",".join(WORLDS), help=f"comma-separated, from {', '.join(WORLDS)}")


def run(args: argparse.Namespace) -> dict:
    scale_name = "quick" if args.quick else "full"
    scale, seeds = SCALES[scale_name], toolkit.parse_seeds(args.seeds)
    worlds = toolkit.parse_names(args.worlds, WORLDS, "worlds")
    jobs = [{"world": w, "seed": s, **scale} for w in worlds for s in seeds]
    runs = toolkit.run_pool(measure, jobs, args.workers, desc="along", progress=not args.no_progress)
    return {"scale": scale_name, "seeds": seeds, **scale, "min_rows": MIN_ROWS,
            "worlds": [summarise(runs, w) for w in worlds]}


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
