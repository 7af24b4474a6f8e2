"""On-policy self-distillation with privileged context (OPSD) against plain OPD and SFT, on a tiny walker.

    python -m opd_mini.experiments opsd [--quick] [--seeds 0,1,2] [--steps N] [--workers 2] [--out runs/opsd]

In OPSD the teacher is the student itself, but its prompt holds privileged information: here the
reference answer, through the template ``'{prompt} (the answer is {answer})'``
(:data:`opd_mini.experiments.worlds.PRIVILEGED_TEMPLATE`). It scores the student's own rollout behind that prompt. With
a LoRA student and ``--teacher self`` the teacher is the adapter-disabled base: no second copy.

**Does the base use the privileged prompt at all?** A tiny model never trained with such prompts ignores
them, or worse: the ``compounding`` walk student's sampled pass@1 falls from 0.3-0.4 behind its own
prompt to under 0.1 behind the privileged one (measured again by every run of this command and
written to the JSON). So the student here is the ``privileged`` setting's (:mod:`opd_mini.experiments.worlds`): a
walk student warm-started like the compounding one, but with four fifths of its warm-up prompts
privileged; behind the privileged prompt its pass@1 is well above its plain one.

The methods, through the same loop (:func:`opd_mini.train.train`), from the same LoRA start, with the same
optimiser, learning rate and budget:

================  ===================================================================================
``opsd``          sampled-token reverse KL; the teacher is the student's base behind the privileged prompt
``opsd_clipped``  the same, with the per-token log-ratio r_t clipped to [−c, c] (``clip_log_ratio``)
``opd``           sampled-token reverse KL from a separate teacher, the compounding setting's walk expert
``sft``           SFT on that teacher's samples
================  ===================================================================================

Reported per method, mean ± std over seeds, on ``n`` temperature-1 samples per prompt of the final student:
pass@1, pass@k, the student's mean per-token entropy on its samples, **diversity** (distinct completions
per prompt, out of n), and **where the per-token KL concentrates**: the share of Σ r_t, r_t = log π(y_t) −
log q(y_t) on the student's samples (q = the method's own teacher; for ``sft`` the expert), by completion
position and by token kind (answer characters, EOS, other), at the start (π₀) and at the end. The sum of
r_t over the samples is the sampled estimate of the sequence-level reverse KL, so a position's share is
its part of that estimate (a share can be negative: q may like the sampled tokens there better than π
does); the shares of Σ |r_t| are given beside them.

``walk:10`` has only 90 distinct prompts, so the measured prompts are also training prompts.

Writes ``OUT/opsd.json``, ``OUT/opsd.md`` (the table and the claims) and ``OUT/opsd.png``. Runs go to ``OUT/runs`` in
``--workers`` processes, one torch thread each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, mean, mean_std

NAME = "opsd"
QUICK_HELP = "the small budget (under a minute; the tests use it)"

#: The per-token clipping of ``opsd_clipped``: r_t is clipped to [−CLIP, CLIP] (chosen before any run).
CLIP = 1.0
#: The settings, from recipes/experiments/opsd.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: The methods: name -> the TrainConfig fields that make it ({teacher} = the separate teacher's path,
#: {template} = the privileged prompt).
METHODS: dict[str, dict] = RECIPE["methods"]
SETTING, TASK = "privileged", "walk:10"
#: The control: a student that never saw privileged prompts (does the privileged prompt help it?).
CONTROL_SETTING = "compounding"
SCALES: dict[str, dict] = RECIPE["scales"]
#: Samples per prompt of the final measurements, and the k of pass@k.
SAMPLES, K = 8, 4
RUN = RECIPE["run"]
#: Token kinds of the KL-concentration measure, in index order.
KINDS = ("answer", "eos", "other")


# --------------------------------------------------------------------------------------------
# the measures (pure functions; the tests check them against brute force)
# --------------------------------------------------------------------------------------------


def distinct_per_prompt(completions: list[str], prompt_index: list[int]) -> float:
    """Diversity: the mean over prompts of the number of distinct completions among that prompt's samples."""
    seen: dict[int, set] = {}
    for i, c in zip(prompt_index, completions):
        seen.setdefault(int(i), set()).add(c)
    return sum(len(s) for s in seen.values()) / len(seen)


def log_ratio_shares(r_BT: torch.Tensor, mask_BT: torch.Tensor, group_BT: torch.Tensor, num_groups: int) -> dict:
    """How the masked per-token log-ratios r_t split over groups (positions, token kinds ...).

    Returns lists of length ``num_groups``: ``sum`` (Σ r_t of the group), ``abs_sum`` (Σ |r_t|), ``count``
    (tokens), ``share`` (sum / Σ r_t over all groups; 0 when that total is 0) and ``abs_share``
    (abs_sum / Σ |r_t|)."""
    r, g = r_BT[mask_BT].double(), group_BT[mask_BT].long()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, r)
    abs_sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, r.abs())
    counts = torch.bincount(g, minlength=num_groups)
    total, abs_total = float(sums.sum()), float(abs_sums.sum())
    return {"sum": sums.tolist(), "abs_sum": abs_sums.tolist(), "count": counts.tolist(),
            "share": [float(s) / total if total else 0.0 for s in sums],
            "abs_share": [float(s) / abs_total if abs_total else 0.0 for s in abs_sums]}


def token_kinds(completion_ids_BT: torch.Tensor, answer_ids: set[int], eos_id: int) -> torch.Tensor:
    """(B, T) index into :data:`KINDS`: 0 a character of the task's answers, 1 EOS, 2 anything else."""
    kinds = torch.full_like(completion_ids_BT, 2)
    kinds[torch.isin(completion_ids_BT, torch.tensor(sorted(answer_ids), dtype=completion_ids_BT.dtype))] = 0
    kinds[completion_ids_BT == eos_id] = 1
    return kinds


# --------------------------------------------------------------------------------------------
# measuring one model
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(model, tokenizer, task, examples: list, scorer, *, max_new_tokens: int, seed: int) -> dict:
    """On :data:`SAMPLES` temperature-1 samples per prompt of ``model``: pass@1, pass@K, per-token entropy,
    diversity, mean r_t per token and its split by position and token kind (``scorer(rollouts)`` gives
    log q of the sampled tokens, (B, T))."""
    from opd_mini.eval import pass_at_k
    from opd_mini.forward import completion_logits
    from opd_mini.sampler import sample

    r = sample(model, tokenizer, [e.prompt for e in examples], num_generations=SAMPLES, max_new_tokens=max_new_tokens,
               temperature=1.0, seed=seed, behaviour_logp="forward")
    index = r.prompt_index_B.tolist()
    rewards = torch.tensor(task.rewards(r.completions, [examples[i] for i in index])).view(len(examples), SAMPLES)
    correct = rewards.sum(1).long().tolist()
    mask = r.mask_BT
    logp_BTV = torch.log_softmax(completion_logits(model, r, len(tokenizer)).float(), dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num(0.0).sum(-1)
    r_BT = (r.behaviour_logp_BT.float() - scorer(r).float().cpu()) * mask
    answer_ids = {i for e in task.examples(256, seed=0) for i in tokenizer(e.answer, add_special_tokens=False)["input_ids"]}
    return {
        "pass@1": sum(pass_at_k(SAMPLES, c, 1) for c in correct) / len(correct),
        f"pass@{K}": sum(pass_at_k(SAMPLES, c, K) for c in correct) / len(correct),
        "entropy": float(entropy_BT[mask].mean()), "diversity": distinct_per_prompt(r.completions, index),
        "kl": float(r_BT[mask].sum() / mask.sum()), "completion_len": float(mask.sum(1).float().mean()),
        "by_position": log_ratio_shares(r_BT, mask, torch.arange(r_BT.shape[1]).expand_as(r_BT), max_new_tokens),
        "by_kind": log_ratio_shares(r_BT, mask, token_kinds(r.tokens_BT, answer_ids, tokenizer.eos_token_id),
                                    len(KINDS)),
    }


def privileged_scorer(model, tokenizer, examples: list, template: str, *, disable_adapter: bool):
    """log q of the sampled tokens, q = ``model`` (its base, with ``disable_adapter``) behind the privileged prompt."""
    from opd_mini.sampler import with_prompts
    from opd_mini.teacher import score

    prompts = [template.format(prompt=e.prompt, answer=e.answer) for e in examples]
    return lambda r: score(model, r, view=with_prompts(r, tokenizer, prompts), vocab_size=len(tokenizer),
                           disable_adapter=disable_adapter).teacher_logp_BT


def model_scorer(model, tokenizer):
    """log q of the sampled tokens, q = ``model`` behind the student's own prompt."""
    from opd_mini.teacher import score

    return lambda r: score(model, r, vocab_size=len(tokenizer)).teacher_logp_BT


@torch.no_grad()
def privileged_check(path: str, tokenizer, task, examples: list, template: str, *, max_new_tokens: int,
                     seed: int = 0) -> dict:
    """Does the model behind the privileged prompt score the right answer higher? Mean log-prob of the
    reference answer (EOS included), the fraction of prompts where it is higher behind the privileged prompt,
    and sampled pass@1 (4 samples per prompt) behind each prompt."""
    from opd_mini.sampler import build_rollouts, sample

    model = toolkit.load_frozen(path)
    out, logps = {}, {}
    for name, tmpl in (("plain", "{prompt}"), ("privileged", template)):
        prompts = [tmpl.format(prompt=e.prompt, answer=e.answer) for e in examples]
        logps[name] = model_scorer(model, tokenizer)(build_rollouts(tokenizer, prompts, [e.answer for e in examples])).sum(1)
        s = sample(model, tokenizer, prompts, num_generations=4, max_new_tokens=max_new_tokens, seed=seed)
        out[f"{name}_answer_logp"] = float(logps[name].mean())
        out[f"{name}_pass@1"] = sum(task.rewards(s.completions, [examples[i] for i in s.prompt_index_B.tolist()])) / len(
            s.completions)
    out["answer_logp_higher_frac"] = float((logps["privileged"] > logps["plain"]).float().mean())
    return out


# --------------------------------------------------------------------------------------------
# one run (a worker process)
# --------------------------------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """Train one (method, seed), then measure the start model and the final one against the method's teacher."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    c = job["config"]
    summary = toolkit.train_run(c, f"{job['method']} / seed {c['seed']}")
    clip = [r["opd/clip_frac"] for r in summary["log"] if "opd/clip_frac" in r]
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    task = get_task(c["task"])
    examples = held_out_examples(task, job["measure_prompts"], c["seed"])
    start = toolkit.load_frozen(c["student"])
    end = toolkit.load_frozen(c["student"], str(Path(summary["checkpoint"]) / "model"))
    if c["teacher"] == "self":
        q_start = privileged_scorer(start, tokenizer, examples, c["teacher_template"], disable_adapter=False)
        q_end = privileged_scorer(end, tokenizer, examples, c["teacher_template"], disable_adapter=True)
    else:
        q_start = q_end = model_scorer(toolkit.load_frozen(c["teacher"]), tokenizer)
    kw = dict(max_new_tokens=c["max_new_tokens"], seed=c["seed"])
    curve = toolkit.curves(summary, "pass@1")
    return {"method": job["method"], "seed": c["seed"], "steps": curve["steps"], "pass@1_curve": curve["pass@1"],
            "clip_frac": mean(clip), "train_s": summary["train_time_s"],
            "start": measure(start, tokenizer, task, examples, q_start, **kw),
            "end": measure(end, tokenizer, task, examples, q_end, **kw)}


# --------------------------------------------------------------------------------------------
# aggregation, claims, report
# --------------------------------------------------------------------------------------------

SCALARS = ("pass@1", f"pass@{K}", "entropy", "diversity", "kl", "completion_len")


def aggregate(runs: list[dict], methods: list[str]) -> list[dict]:
    """One entry per method: per-seed values of every scalar at start and end, the per-seed shares of Σ r_t
    (and Σ |r_t|) by position and kind, and the pass@1 curves."""
    out = []
    for name in methods:
        mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
        entry = {"method": name, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                 "pass@1_curves": [r["pass@1_curve"] for r in mine], "clip_frac": [r["clip_frac"] for r in mine],
                 "train_s": [r["train_s"] for r in mine]}
        for when in ("start", "end"):
            entry[when] = {k: [r[when][k] for r in mine] for k in SCALARS}
            for split in ("by_position", "by_kind"):
                entry[when][split] = {k: [r[when][split][k] for r in mine] for k in ("share", "abs_share", "count")}
        out.append(entry)
    return out


def _m(entry: dict, when: str, key: str) -> float:
    return mean(entry[when][key])


def _share(entry: dict, when: str, split: str, i: int, key: str = "share") -> float:
    return mean([s[i] for s in entry[when][split][key]])


def claims(result: dict) -> dict:
    """What the run measured, as checks (each holds or not; nothing is tuned to make one hold)."""
    by = {e["method"]: e for e in result["methods"]}
    chk, ctl = result["privileged_check"]["student"], result["privileged_check"]["control"]
    out = {"privileged_prompt_helps_the_student_not_the_control": {
        "holds": chk["privileged_pass@1"] > chk["plain_pass@1"] and ctl["privileged_pass@1"] < ctl["plain_pass@1"],
        "student": [chk["plain_pass@1"], chk["privileged_pass@1"]], "control": [ctl["plain_pass@1"], ctl["privileged_pass@1"]]}}
    out["opsd_improves_pass@1_every_seed"] = {
        "holds": all(b > a for a, b in zip(by["opsd"]["start"]["pass@1"], by["opsd"]["end"]["pass@1"])),
        "start": by["opsd"]["start"]["pass@1"], "end": by["opsd"]["end"]["pass@1"]}
    out["opsd_diversity_drops_every_seed"] = {
        "holds": all(b < a for a, b in zip(by["opsd"]["start"]["diversity"], by["opsd"]["end"]["diversity"])),
        "start": by["opsd"]["start"]["diversity"], "end": by["opsd"]["end"]["diversity"]}
    out["opd_beats_opsd_pass@1"] = {"holds": _m(by["opd"], "end", "pass@1") > _m(by["opsd"], "end", "pass@1"),
                                    "opd": _m(by["opd"], "end", "pass@1"), "opsd": _m(by["opsd"], "end", "pass@1")}
    eos = KINDS.index("eos")
    out["opsd_kl_share_on_eos_exceeds_its_token_share_at_start"] = {
        "holds": _share(by["opsd"], "start", "by_kind", eos) > _token_share(by["opsd"], "start", eos),
        "kl_share": _share(by["opsd"], "start", "by_kind", eos), "token_share": _token_share(by["opsd"], "start", eos)}
    return out


def _token_share(entry: dict, when: str, kind: int) -> float:
    return mean([c[kind] / sum(c) for c in entry[when]["by_kind"]["count"]])


def table(result: dict) -> str:
    """The Markdown table: one row for the start, one per method."""
    n, kinds = result["samples"], result["kinds"]
    head = (f"| method | pass@1 | pass@{K} | entropy (nats/token) | distinct / {n} | KL per token (start → end) | "
            + " | ".join(f"share of Σr on {k} (start → end)" for k in kinds) + " |")
    lines = [head, "|---" * (6 + len(kinds)) + "|"]
    first = result["methods"][0]
    lines.append(f"| start (π₀) | {fmt(first['start']['pass@1'])} | {fmt(first['start'][f'pass@{K}'])} | "
                 f"{fmt(first['start']['entropy'])} | {fmt(first['start']['diversity'], 2)} | "
                 + " | ".join(["—"] * (1 + len(kinds))) + " |")
    for e in result["methods"]:
        shares = " | ".join(f"{_share(e, 'start', 'by_kind', i):.2f} → {_share(e, 'end', 'by_kind', i):.2f}"
                            for i in range(len(kinds)))
        lines.append(f"| {e['method']} | {fmt(e['end']['pass@1'])} | {fmt(e['end'][f'pass@{K}'])} | "
                     f"{fmt(e['end']['entropy'])} | {fmt(e['end']['diversity'], 2)} | "
                     f"{fmt(e['start']['kl'])} → {fmt(e['end']['kl'])} | {shares} |")
    return "\n".join(lines)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' OPSD block, generated from opsd.json (the table alone when not every method ran)."""
    if not result["claims"]:
        return table(result)
    chk, ctl = result["privileged_check"]["student"], result["privileged_check"]["control"]
    c = result["claims"]
    word = lambda name: toolkit.verdict(c[name])  # noqa: E731
    by = {e["method"]: e for e in result["methods"]}
    peak = lambda e, when: max(range(len(e[when]["by_position"]["share"][0])),  # noqa: E731
                               key=lambda t: _share(e, when, "by_position", t))
    lines = [
        f"On-policy self-distillation with privileged context (`python -m opd_mini.experiments opsd`; `{results_dir}/opsd.json`): "
        f"the teacher is the student's own base behind the prompt `{result['template']}`. First, does the base read "
        f"the privileged prompt? A walk student that never saw such prompts does not: its sampled pass@1 goes from "
        f"{ctl['plain_pass@1']:.3f} behind its own prompt to {ctl['privileged_pass@1']:.3f} behind the privileged one "
        f"(log-prob of the reference answer {ctl['plain_answer_logp']:.2f} → {ctl['privileged_answer_logp']:.2f}). "
        f"So the student is the `privileged` setting's, warm-started with four fifths of its prompts privileged: "
        f"{chk['plain_pass@1']:.3f} → {chk['privileged_pass@1']:.3f} (answer log-prob {chk['plain_answer_logp']:.2f} → "
        f"{chk['privileged_answer_logp']:.2f}, higher on {chk['answer_logp_higher_frac']:.0%} of prompts). "
        f"LoRA, {result['steps']} steps × {result['run']['prompts_per_step'] * result['run']['num_generations']} "
        f"sequences, lr {result['run']['lr']:g}, {len(result['seeds'])} seeds; the final student measured on "
        f"{result['measure_prompts']} prompts × {result['samples']} samples; mean ± std over seeds; `opsd_clipped` clips "
        f"r_t to [−{result['clip']:g}, {result['clip']:g}]; `opd` and `sft` learn from the walk expert "
        f"(pass@1 {result['teacher_pass@1']:.3f}). The last columns: the share of Σ r_t (r_t = log π − log q on the "
        f"student's samples, q the method's teacher) on each token kind, at the start and at the end:", "",
        table(result), "",
        "Where the KL sits by position: the largest share of Σ r_t is at completion token "
        + "; ".join(f"{e['method']} {peak(e, 'start')} → {peak(e, 'end')}" for e in result["methods"])
        + " (start → end; EOS is "
        + f"{_token_share(by['opsd'], 'start', KINDS.index('eos')):.0%} of π₀'s tokens). "
        f"OPSD improves pass@1 in every seed: **{word('opsd_improves_pass@1_every_seed')}**; OPSD's diversity "
        f"drops in every seed: **{word('opsd_diversity_drops_every_seed')}**; plain OPD from the expert ends above "
        f"OPSD: **{word('opd_beats_opsd_pass@1')}**; at the start OPSD's KL on EOS exceeds EOS's share of the tokens: "
        f"**{word('opsd_kl_share_on_eos_exceeds_its_token_share_at_start')}**. Clipping touched "
        f"{mean(by['opsd_clipped']['clip_frac']) or 0.0:.1%} of the tokens.",
        "", f"![OPSD, OPD and SFT: pass@1, diversity and where the KL sits]({results_dir}/opsd.png)"]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Four panels: pass@1 against steps (the two teachers' pass@1 dotted); pass@1, pass@k and diversity at the end; the share of Σ r_t by
    completion position, start (dashed) and end; the share by token kind, start and end."""
    plt = toolkit.pyplot()
    methods = result["methods"]
    colors = {e["method"]: f"C{i}" for i, e in enumerate(methods)}
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0][0]
    for e in methods:
        toolkit.band(a, e["steps"], e["pass@1_curves"], e["method"], color=colors[e["method"]])
    a.axhline(result["teacher_pass@1"], color="k", ls=":", lw=1, label="walk expert (opd, sft's teacher)")
    a.axhline(result["privileged_check"]["student"]["privileged_pass@1"], color=colors["opsd"], ls=":", lw=1,
              label="π₀ behind the privileged prompt (opsd's teacher)")
    a.set(xlabel="step", ylabel="pass@1 (eval, 4 samples)", title="learning curves", ylim=(0, 1.02))
    a.legend(frameon=False, fontsize=8)

    a = ax[0][1]
    keys = ("pass@1", f"pass@{K}", "diversity")
    names = ["start"] + [e["method"] for e in methods]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        e, when = (methods[0], "start") if name == "start" else (next(m for m in methods if m["method"] == name), "end")
        vals, sds = zip(*(mean_std([x / (result["samples"] if k == "diversity" else 1) for x in e[when][k]])
                          for k in keys))
        a.bar([i + j * width for i in range(len(keys))], vals, width, yerr=sds, label=name,
              color="0.6" if name == "start" else colors[name])
    a.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(keys))],
                 ["pass@1", f"pass@{K}", f"distinct / {result['samples']}"])
    a.set(title="the final student (± std over seeds)", ylim=(0, 1.05))
    a.legend(frameon=False, fontsize=8, ncol=2)

    a = ax[1][0]
    for e in methods:
        T = len(e["end"]["by_position"]["share"][0])
        for when, ls in (("start", "--"), ("end", "-")):
            a.plot(range(T), [_share(e, when, "by_position", t) for t in range(T)], ls=ls, color=colors[e["method"]],
                   marker="o", ms=3, label=f"{e['method']} ({when})" if when == "end" else None, alpha=0.9)
    a.axhline(0, color="k", lw=0.6)
    a.set(xlabel="completion token index", ylabel="share of Σ r_t", title="where the KL sits: position (dashed = start)")
    a.legend(frameon=False, fontsize=8)

    a = ax[1][1]
    labels = []
    for i, e in enumerate(methods):
        for j, when in enumerate(("start", "end")):
            x = i * 2.6 + j
            pos = neg = 0.0
            for k, kind in enumerate(result["kinds"]):
                v = _share(e, when, "by_kind", k)
                a.bar(x, v, 0.9, bottom=pos if v >= 0 else neg, color=f"C{k + 4}",
                      label=kind if i == 0 and j == 0 else None, edgecolor="k" if when == "end" else "none")
                pos, neg = (pos + v, neg) if v >= 0 else (pos, neg + v)
            labels.append((x, f"{e['method'].replace('_', chr(10))}\n{when}"))
    a.set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=7)
    a.axhline(0, color="k", lw=0.6)
    a.set(ylabel="share of Σ r_t", title="where the KL sits: token kind (outlined = end)")
    a.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    toolkit.save(fig, path)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: all)")


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.worlds import PRIVILEGED_TEMPLATE, accuracies, ensure_setting
    from opd_mini.tasks import get_task

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    methods = toolkit.parse_names(args.methods, METHODS, "methods")
    if "opsd" not in methods:
        raise ValueError("--methods must include opsd (the experiment's subject)")
    paths = ensure_setting(SETTING, progress=False)
    control = ensure_setting(CONTROL_SETTING, progress=False)
    names = {"teacher": paths["teacher"], "template": PRIVILEGED_TEMPLATE}
    jobs = [{"method": name, "measure_prompts": scale["measure_prompts"], "config": toolkit.run_config(
                RUN, toolkit.fill(METHODS[name], names), student=paths["student"], tokenizer=paths["tokenizer"],
                seed=seed, steps=steps, eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
                out_dir=str(Path(args.out) / "runs" / f"{name}-seed{seed}"))}
            for name in methods for seed in seeds]

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    task = get_task(TASK)
    examples = held_out_examples(task, scale["measure_prompts"], seeds[0])
    torch.set_num_threads(1)
    check = {role: privileged_check(p, tokenizer, task, examples, PRIVILEGED_TEMPLATE, max_new_tokens=RUN["max_new_tokens"])
             for role, p in (("student", paths["student"]), ("control", control["student"]))}
    teacher_acc = accuracies(toolkit.load_frozen(paths["teacher"]), tokenizer, task, max_new_tokens=RUN["max_new_tokens"],
                             n=scale["measure_prompts"])["sampled"]
    print(f"opsd: {len(methods)} method(s) × {len(seeds)} seed(s) = {len(jobs)} runs of {steps} steps in "
          f"{args.workers} process(es)", file=sys.stderr)
    runs = toolkit.run_pool(run_job, jobs, args.workers, desc="opsd runs", progress=not args.no_progress)

    result = {"scale": scale_name, "seeds": seeds, "steps": steps, "setting": SETTING,
              "task": TASK, "template": PRIVILEGED_TEMPLATE, "clip": CLIP, "samples": SAMPLES, "k": K,
              "kinds": list(KINDS), "measure_prompts": scale["measure_prompts"],
              "run": {**RUN, "student": f"{SETTING} student (opd_mini.experiments.worlds)"},
              "method_fields": {m: METHODS[m] for m in methods}, "teacher_pass@1": teacher_acc,
              "privileged_check": check, "methods": aggregate(runs, methods)}
    result["claims"] = claims(result) if set(METHODS) <= set(methods) else {}
    return result


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
