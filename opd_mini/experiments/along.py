"""The teacher along the sequence: how its judgement of the student's tokens, and its own chance of finishing from the
student's prefixes, change with the position in the completion; and whether clipping or top-K support flattens it.

    python -m opd_mini.experiments along [--quick] [--parts gap,train] [--seeds 0,1,2] [--out runs/along]

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
Spearman's correlation of each with the position (part ``gap``).

Part ``train``: on ``compounding``, where the gap grows and the teacher's success-to-go falls along the completion,
does a fix of Fu et al.'s flatten the late positions' pull, and does that help? The methods of the recipe train from
the same student with the same budget: sampled-token OPD, the same with r_t clipped to [−c, c]
(``--clip_log_ratio``), the same on the first half of each completion only (``--prefix_fraction 0.5``: the late
signal removed), reverse KL inside the teacher's top-K (renormalised, and with a tail bucket) and full reverse KL. The
**update share** of position t is ‖∇_θ L_t‖ / Σ_s ‖∇_θ L_s‖, L_t the method's loss with only position t's tokens kept
(the normaliser unchanged), on ``share_prompts`` held-out prompts × 2 of the model's own samples: at the start (one
student, the same samples for every method) and at the end (each run's final student). **Late** is the second half of
the positions. Also the final held-out pass@1 (the loop's evaluation). Writes ``OUT/along.json``, ``OUT/along.md``
and ``OUT/along.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt

NAME = "along"
QUICK_HELP = ("the small budget: 32 prompts, 2 continuations per prefix; 2 methods × 4 steps, 8 prompts for the "
              "update shares (the tests use it)")
PARTS = ("gap", "train")
WORLDS = ("compounding", "counter_example")
#: The train part's world: the one where the gap grows along the completion.
TRAIN_WORLD = "compounding"
#: The settings, from recipes/experiments/along.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a
#: constant below: the train part's loop settings, its methods (name -> the loop's settings), the budgets.
RECIPE = toolkit.recipe(NAME)
RUN: dict = RECIPE["run"]
METHODS: dict[str, dict] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
GAP_KEYS = ("prompts", "samples", "continuations")
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


def update_shares(model, teacher, tokenizer, prompts: list[str], config: dict, seed: int) -> list[float]:
    """The share of the update at each position: ‖∇_θ L_t‖ / Σ_s ‖∇_θ L_s‖, L_t the method's loss (``config``'s) on
    the model's own temperature-1 samples of ``prompts`` (2 each) with only position t kept, the normaliser N of the
    whole batch unchanged; positions past ``--prefix_fraction``'s cut carry no loss."""
    import dataclasses
    import math
    from types import SimpleNamespace

    import torch

    from opd_mini.registry import LossOptions, get_loss
    from opd_mini.sampler import sample
    from opd_mini.student import loss_and_backward
    from opd_mini.teacher import score

    spec, T, V = get_loss(config["loss"]), config["max_new_tokens"], len(tokenizer)
    with torch.no_grad():
        b = sample(model, tokenizer, prompts, num_generations=2, max_new_tokens=T, temperature=1.0, seed=seed,
                   use_chat_template=False)
        b = score(teacher, b, vocab_size=V, top_k=config["top_k"] if spec.signal == "topk" else 0,
                  full=spec.signal == "full")
    mask = b.mask_BT.clone()
    mask[:, max(1, math.ceil(config["prefix_fraction"] * T - 1e-9)):] = False
    b = dataclasses.replace(b, mask_BT=mask, num_tokens=float(mask.sum()), group_size=2)
    opts, params = LossOptions.from_config(SimpleNamespace(**config)), [p for p in model.parameters() if p.requires_grad]
    norms = [0.0] * T
    for t in range(mask.shape[1]):
        if not mask[:, t].any():
            continue
        only = torch.zeros_like(mask)
        only[:, t] = mask[:, t]
        model.zero_grad(set_to_none=True)
        loss_and_backward(model, dataclasses.replace(b, mask_BT=only), spec, opts, vocab_size=V)
        norms[t] = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    model.zero_grad(set_to_none=True)
    total = sum(norms)
    return [n / total for n in norms]


def train_job(job: dict) -> dict:
    """Train one (method, seed) on TRAIN_WORLD; its update shares at the start and at the end, and its pass@1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"{job['method']} / seed {c['seed']}")
    tokenizer, teacher = AutoTokenizer.from_pretrained(c["tokenizer"]), toolkit.load_frozen(c["teacher"])
    prompts = [e.prompt for e in held_out_examples(get_task(c["task"]), job["share_prompts"], c["seed"])]
    shares = {}
    for when, path in (("start", c["student"]), ("end", str(Path(summary["checkpoint"]) / "model"))):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()  # eval: no dropout
        shares[when] = update_shares(model, teacher, tokenizer, prompts, c, seed=c["seed"] + 101)
    history = summary["eval_history"]
    return {"method": job["method"], "seed": c["seed"], "start_pass@1": history[0]["eval/pass@1"],
            "final_pass@1": history[-1]["eval/pass@1"], "shares": shares}


def late(shares: list[float]) -> float:
    """The share of the update on the second half of the positions."""
    return sum(shares[len(shares) // 2:])


def aggregate_train(runs: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        T = len(rs[0]["shares"]["start"])
        entry = {"method": m, "settings": METHODS[m], "seeds": [r["seed"] for r in rs],
                 "start_pass@1": [r["start_pass@1"] for r in rs], "final_pass@1": [r["final_pass@1"] for r in rs]}
        for when in ("start", "end"):
            entry[f"shares_{when}"] = [toolkit.mean_std([r["shares"][when][t] for r in rs]) for t in range(T)]
            entry[f"late_{when}"] = [late(r["shares"][when]) for r in rs]
        out.append(entry)
    return out


def train_claims(rows: list[dict]) -> dict:
    """Against sampled-token OPD: does each method put a smaller share of the start update on the late positions
    (paired by seed: every method reads the same start samples of a seed), by more than the spread of the paired
    differences; and does it end above sampled-token's pass@1 by more than the larger seed spread (separate runs)?"""
    from opd_mini.experiments.toolkit import mean_std

    by = {e["method"]: e for e in rows}
    base, out = by.get("opd_sampled"), {}
    if not base or len(base["seeds"]) < 2:  # a spread needs seeds
        return out
    for e in rows:
        if e["method"] == "opd_sampled":
            continue
        diff, spread = mean_std([b - a for a, b in zip(e["late_start"], base["late_start"])])
        out[f"{e['method']}/flattens"] = toolkit.claim(diff > spread, diff=diff, spread=spread)
        (a, sa), (b, sb) = mean_std(e["final_pass@1"]), mean_std(base["final_pass@1"])
        out[f"{e['method']}/helps"] = toolkit.claim(a - b > max(sa, sb), diff=a - b, spread=max(sa, sb))
    return out


def figure(result: dict, path: Path) -> None:
    plt = toolkit.pyplot()
    gap_rows = len(result.get("worlds", []))
    rows = gap_rows + (1 if "train" in result else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.3 * rows), squeeze=False)
    for row, w in enumerate(result.get("worlds", [])):
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
        axes[row][1].legend(frameon=False, fontsize=8, loc="lower left")
    if "train" in result:
        from opd_mini.experiments.toolkit import mean_std

        tr, ax_s, ax_p = result["train"], axes[-1][0], axes[-1][1]
        for i, e in enumerate(tr["rows"]):
            st = toolkit.style(e["method"])
            color = st.get("color", f"C{i % 10}")
            ax_s.plot(range(1, len(e["shares_start"]) + 1), [m for m, _ in e["shares_start"]], marker="o", ms=3,
                      color=color, label=st["label"], ls="--" if "clip" in e["method"] or "half" in e["method"] else "-")
            (x, sx), (y, sy) = mean_std(e["late_start"]), mean_std(e["final_pass@1"])
            ax_p.errorbar(x, y, xerr=sx, yerr=sy, marker="o", color=color, capsize=3)
        ax_s.set(xlabel="position in the completion", ylabel="share of the update at the start")
        ax_s.set_title(f"{tr['world']}: where each loss pulls (the start student's samples)", fontsize=9)
        ax_s.legend(frameon=False, fontsize=7, loc="upper right")
        T = len(tr["rows"][0]["shares_start"])
        ax_p.set(xlabel=f"late share of the update at the start (positions {T // 2 + 1}-{T})",
                 ylabel=f"final held-out pass@1 ({tr['steps']} steps)")
        ax_p.set_title(f"{tr['world']}: flatter, and better? (mean ± std over seeds)", fontsize=9)
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    lines = []
    if "worlds" in result:
        lines += [f"The teacher along the sequence (`python -m opd_mini.experiments along`): the student samples "
                  f"{result['prompts']} held-out prompts × {result['samples']} at temperature 1; at every position, the "
                  f"gap r_t = log π − log q of its token, and the share of {result['continuations']} continuations from "
                  f"its prefix that the verifier accepts (the teacher's and the student's own), mean ± std over "
                  f"{len(result['seeds'])} sampling seeds. Spearman of each curve with the position:", "",
                  "| world | positions | mean r_t | mean abs r_t | teacher success-to-go | student success-to-go |",
                  "|---|---|---|---|---|---|"]
        for w in result["worlds"]:
            if not w["positions"]:
                lines.append(f"| {w['world']} (`{w['task']}`) | none reached by {result['min_rows']} completions | | "
                             "| | |")
                continue
            first, last = w["positions"][0], w["positions"][-1]

            def span(key):
                a, b = w[key][0], w[key][-1]
                return f"{a[0]:.3f} → {b[0]:.3f} (ρ {toolkit.num(w['spearman_' + key])})"

            lines.append(f"| {w['world']} (`{w['task']}`) | {first + 1}-{last + 1} | {span('gap_mean')} | "
                         f"{span('gap_abs')} | {span('teacher_to_go')} | {span('student_to_go')} |")
        lines += [""]
    if "train" in result:
        tr, run = result["train"], result["train"]["run"]
        T = len(tr["rows"][0]["shares_start"])
        lines += [f"Does a fix flatten it? ({tr['world']}, `{tr['task']}`; {len(tr['seeds'])} seeds; {tr['steps']} steps × "
                  f"{run['prompts_per_step'] * run['num_generations']} sequences per run, lr {run['lr']}, full "
                  f"fine-tuning.) Update share: ‖∇L_t‖ / Σ_s ‖∇L_s‖ on {tr['share_prompts']} held-out prompts × 2 of "
                  f"the model's own samples; late: positions {T // 2 + 1}-{T}; start: the start student, end: the "
                  "run's final student. Mean ± std over seeds:", "",
                  "| method | settings | late share, start | late share, end | final pass@1 |", "|---|---|---|---|---|"]
        for e in tr["rows"]:
            settings = ", ".join(f"{k} {v}" for k, v in e["settings"].items() if k != "loss")
            lines.append(f"| {e['method']} | `{e['settings']['loss']}`{', ' + settings if settings else ''} | "
                         f"{fmt(e['late_start'], 3)} | {fmt(e['late_end'], 3)} | {fmt(e['final_pass@1'], 3)} |")
        lines.append("")
        for key, c in tr["claims"].items():
            method, what = key.split("/")
            text = ("puts a smaller share of the start update on the late positions than sampled-token OPD, by more "
                    "than the spread of the paired differences" if what == "flattens" else
                    "ends above sampled-token OPD's pass@1 by more than the seed spread")
            lines.append(f"- **{method} {text}: {toolkit.verdict(c)}** (by {c['diff']:+.3f}, spread "
                         f"{c['spread']:.3f}).")
        lines.append("")
    lines += [f"![the gap and the success-to-go against position]({results_dir}/along.png)"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", default=",".join(WORLDS), help=f"comma-separated, from {', '.join(WORLDS)} (part gap)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from opd_mini.experiments.worlds import ensure_setting, get_setting

    scale_name = "quick" if args.quick else "full"
    scale, seeds = SCALES[scale_name], toolkit.parse_seeds(args.seeds)
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    result = {"scale": scale_name, "seeds": seeds, "parts": parts}
    jobs, worlds = [], toolkit.parse_names(args.worlds, WORLDS, "worlds")
    if "train" in parts:
        methods = toolkit.parse_names(",".join(scale["methods"]), METHODS, f"scales.{scale_name}.methods")
        steps = scale["steps"] if args.steps is None else args.steps
        setting, paths = get_setting(TRAIN_WORLD), ensure_setting(TRAIN_WORLD, progress=False)
        vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
        base = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"], task=setting.task,
                    max_new_tokens=setting.max_new_tokens, steps=steps, eval_every=min(scale["eval_every"], steps),
                    eval_prompts=scale["eval_prompts"])
        for m in methods:
            if not 1 <= METHODS[m].get("top_k", 1) <= vocab:
                raise ValueError(f"methods.{m}.top_k={METHODS[m]['top_k']}: K must lie in [1, V={vocab}] (the "
                                 "tokenizer's vocabulary)")
            for seed in seeds:
                config = toolkit.run_config(RUN, base, METHODS[m], seed=seed,
                                            out_dir=str(Path(args.out) / "runs" / f"{m}-seed{seed}"))
                jobs.append((train_job, {"method": m, "config": config, "share_prompts": scale["share_prompts"]}))
        result["train"] = {"world": TRAIN_WORLD, "task": setting.task, "vocab": vocab, "steps": steps, "seeds": seeds,
                           "share_prompts": scale["share_prompts"], "run": RUN}
    if "gap" in parts:  # after the training jobs, the longer ones
        jobs += [(measure, {"world": w, "seed": s, **{k: scale[k] for k in GAP_KEYS}}) for w in worlds for s in seeds]
        result.update({k: scale[k] for k in GAP_KEYS}, min_rows=MIN_ROWS)
    done = toolkit.run_pool(None, jobs, args.workers, desc="along", progress=not args.no_progress)
    gap_runs = [r for r in done if "gap" in r]
    if "gap" in parts:
        result["worlds"] = [summarise(gap_runs, w) for w in worlds]
    if "train" in parts:
        result["train"]["rows"] = aggregate_train([r for r in done if "shares" in r], methods)
        result["train"]["claims"] = train_claims(result["train"]["rows"])
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
