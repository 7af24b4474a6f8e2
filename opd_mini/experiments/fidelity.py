"""Teacher fidelity, measured: how far 8-bit and 4-bit teachers are from full precision, and what that costs OPD.

    python -m opd_mini.experiments fidelity [--quick] [--seeds 0,1,2] [--steps N] [--out runs/fidelity] [--workers 2]

(Defaults: 5 seeds × 40 steps, under 5 minutes on 2 CPU cores; ``--quick``: 2 seeds × 6 steps, under a minute.)

The ``compounding`` setting of :mod:`opd_mini.experiments.worlds` (a walk to a goal; a tiny trained teacher and a
warm-started student sharing one character tokenizer) is loaded three times, its teacher in full
precision (``none``), in LLM.int8 (``8bit``) and in NF4 with double quantization (``4bit``), through
:func:`opd_mini.teacher.load_teacher`. Two measurements:

1. **Fidelity on the student's own rollouts** (:func:`compare_teachers`): the student samples
   completions of held-out prompts (:func:`opd_mini.sampler.sample`); each teacher version scores them
   over the full vocabulary (:func:`opd_mini.teacher.score` with ``full=True``). Per version, over the
   masked-in completion tokens: the exact per-token **KL(q_full ‖ q_version)** (a sum over the whole
   vocabulary, no sampling), the **top-1 agreement** (the two teachers' most likely next token is the
   same) and the **mean |Δ log q(y_t)|** of the sampled token (what the sampled-token losses read).
   The full-precision row is a check: exactly 0, 1 and 0.
2. **What it does to training** (:func:`run_job`): a short OPD run (sampled-token reverse KL) per teacher
   version and seed, through the same loop (:func:`opd_mini.train.train` with ``teacher_quantization``),
   from the same warm start with the same prompts and sampling seeds. Reported per version, mean ± std
   over seeds: the final **pass@1** of the student, its exact per-token **KL(π_θ ‖ q_full)** to the
   *full-precision* teacher on its own samples of the held-out prompts (whatever teacher it trained
   with), and the paired difference of both from the full-precision teacher's run of the same seed.

:func:`opd_mini.models.check_rendering` (run by the loop before its first update) checks that the text and tokens a teacher scores are the ones the student
generated, rendered the teacher's way. Writes ``OUT/fidelity.json``, ``OUT/fidelity.md`` (the docs block:
the table, and what each quantized teacher costs) and ``OUT/fidelity.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

from opd_mini.experiments import toolkit
from opd_mini.experiments.toolkit import fmt, load_frozen, mean

NAME = "fidelity"
QUICK_HELP = "the small budget (2 seeds × 6 steps, under a minute on 2 cores; the tests use it)"

#: The teacher versions, in the order they are reported: full precision first (the reference).
VERSIONS = ("none", "8bit", "4bit")
LABELS = {"none": "full precision", "8bit": "8-bit (LLM.int8)", "4bit": "4-bit (NF4)"}
SETTING = "compounding"
#: The settings, from recipes/experiments/fidelity.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
SCALES: dict[str, dict] = RECIPE["scales"]
#: What every run shares (the demo's loop settings; only the teacher's quantization differs).
RUN = RECIPE["run"]
#: Samples per prompt of the fidelity comparison and of the final KL measurement.
SAMPLES = 4
#: Edges (log10 of nats) of the per-token KL histogram kept in the JSON; values are clamped into the range.
KL_LOG10_EDGES = [x / 4 for x in range(-40, 5)]  # 1e-10 .. 10 nats, four bins per decade


# --------------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------------


def token_kl(p_logp_BTV: torch.Tensor, q_logp_BTV: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)), (B, T), from log-probabilities over the
    same vocabulary (float64 sums); a token with p(v) = 0 adds 0, whatever q(v) is."""
    p_logp, q_logp = p_logp_BTV.double(), q_logp_BTV.double()
    terms = torch.where(p_logp > -math.inf, p_logp.exp() * (p_logp - q_logp), torch.zeros_like(p_logp))
    return terms.sum(-1)


def compare_signals(reference, other, mask_BT: torch.Tensor) -> dict:
    """How far ``other`` is from ``reference`` (two :class:`opd_mini.batch.Batch` of the same rollouts, scored by
    :func:`opd_mini.teacher.score` with ``full=True``), over the masked-in positions of ``mask_BT``.

    Returns ``kl`` (mean per-token KL(reference ‖ other), exact over the vocabulary), ``kl_max``,
    ``kl_quantiles`` (50 / 90 / 99 %), ``kl_histogram`` (token counts in the bins of :data:`KL_LOG10_EDGES`),
    ``top1_agreement`` (fraction of positions whose argmax next token is the same), ``mean_abs_dlogq``
    (mean |log q_other(y_t) − log q_reference(y_t)| of the sampled token) and ``tokens``.
    """
    if reference.teacher_logp_BTV is None or other.teacher_logp_BTV is None:
        raise ValueError("compare_signals needs teacher signals scored with full=True")
    p_BTV, q_BTV = reference.teacher_logp_BTV, other.teacher_logp_BTV
    mask = mask_BT.to(p_BTV.device).bool()
    if not mask.any():
        raise ValueError("the completion mask selects no token: there is nothing to compare")
    kl = token_kl(p_BTV, q_BTV)[mask]
    agree = (p_BTV.argmax(-1) == q_BTV.argmax(-1))[mask]
    dlogq = (other.teacher_logp_BT.double() - reference.teacher_logp_BT.double()).abs()[mask]
    logs = kl.clamp(min=10 ** KL_LOG10_EDGES[0], max=10 ** KL_LOG10_EDGES[-1]).log10()
    edges = torch.tensor(KL_LOG10_EDGES, dtype=logs.dtype)
    bins = (torch.bucketize(logs, edges, right=True) - 1).clamp(0, len(KL_LOG10_EDGES) - 2)
    quantiles = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=kl.dtype)).tolist()
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "kl_quantiles": dict(zip(("50", "90", "99"), quantiles)),
            "kl_histogram": torch.bincount(bins, minlength=len(KL_LOG10_EDGES) - 1).tolist(),
            "top1_agreement": float(agree.double().mean()), "mean_abs_dlogq": float(dlogq.mean()),
            "tokens": int(mask.sum())}


@torch.no_grad()
def compare_teachers(teacher, student, tokenizer, prompts: list[str], *, versions=VERSIONS, task=None, examples=None,
                     num_generations: int = SAMPLES, max_new_tokens: int = 12, seed: int = 0,
                     use_chat_template: bool | str = "auto", device: str = "cpu") -> dict:
    """A teacher against its quantized versions, on the student's own rollouts.

    ``teacher``: a ``save_pretrained`` directory or hub id (each version of ``versions`` is loaded from it
    with :func:`opd_mini.teacher.load_teacher`); ``student``: a causal LM, which samples
    ``num_generations`` completions of each prompt (seeded). Every version scores those rollouts over the
    whole vocabulary; each is compared with the first of ``versions`` (the reference, normally ``"none"``)
    by :func:`compare_signals`. With ``task`` and ``examples`` (the prompts' task examples), each version's
    own sampled pass@1 on the same prompts is added (``teacher_pass@1``).

    Returns ``{"rollouts", "tokens", "reference", "versions": {version: metrics}}``.
    """
    from opd_mini.sampler import sample
    from opd_mini.teacher import load_teacher, score

    if not versions:
        raise ValueError("versions needs at least one teacher version (the first is the reference)")
    rollouts = sample(student, tokenizer, prompts, num_generations=num_generations, max_new_tokens=max_new_tokens,
                      seed=seed, use_chat_template=use_chat_template)
    V = len(tokenizer)
    signals, out = {}, {}
    for version in versions:
        model = load_teacher(teacher, quantization=version, device=device)
        signals[version] = score(model, rollouts, vocab_size=V, full=True)
        out[version] = compare_signals(signals[versions[0]], signals[version], rollouts.mask_BT)
        if task is not None and examples is not None:
            own = sample(model, tokenizer, prompts, num_generations=num_generations, max_new_tokens=max_new_tokens,
                         seed=seed + 1, use_chat_template=use_chat_template)
            rewards = task.rewards(own.completions, [examples[i] for i in own.prompt_index_B.tolist()])
            out[version]["teacher_pass@1"] = sum(rewards) / len(rewards)
        del model
    return {"rollouts": int(rollouts.input_ids_BL.shape[0]), "tokens": rollouts.num_masked, "reference": versions[0],
            "versions": out}


@torch.no_grad()
def kl_to_teacher(student, teacher, tokenizer, prompts: list[str], *, num_generations: int = SAMPLES,
                  max_new_tokens: int = 12, seed: int = 0, use_chat_template: bool | str = "auto") -> float:
    """Exact per-token reverse KL(π ‖ q) of ``student`` π to ``teacher`` q (both causal LMs), summed over the
    vocabulary at each position of the student's own seeded samples of ``prompts``, averaged over tokens."""
    from opd_mini.sampler import sample
    from opd_mini.teacher import score

    r = sample(student, tokenizer, prompts, num_generations=num_generations, max_new_tokens=max_new_tokens, seed=seed,
               use_chat_template=use_chat_template)
    V = len(tokenizer)
    kl = token_kl(score(student, r, vocab_size=V, full=True).teacher_logp_BTV,
                  score(teacher, r, vocab_size=V, full=True).teacher_logp_BTV)
    return float(kl[r.mask_BT].mean())


# --------------------------------------------------------------------------------------------
# the jobs (worker processes)
# --------------------------------------------------------------------------------------------


def compare_job(job: dict) -> dict:
    """The fidelity comparison of :func:`compare_teachers` on the setting's held-out prompts."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.tasks import get_task

    toolkit.quiet_worker()
    quiet_bitsandbytes()
    task = get_task(job["task"])
    examples = held_out_examples(task, job["prompts"], job["seed"])
    out = compare_teachers(job["teacher"], load_frozen(job["student"]), AutoTokenizer.from_pretrained(job["tokenizer"]),
                           [e.prompt for e in examples], task=task, examples=examples, max_new_tokens=job["max_new_tokens"],
                           seed=job["seed"])
    return {"kind": "compare", "prompts": job["prompts"], "samples_per_prompt": SAMPLES, "seed": job["seed"], **out}


def run_job(job: dict) -> dict:
    """One OPD run with one teacher version and seed; then the final student's exact KL to the full-precision
    teacher (and the starting student's, for reference) on its own samples of the held-out prompts."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples, held_out_seed
    from opd_mini.tasks import get_task

    quiet_bitsandbytes()
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['version']} teacher / seed {c['seed']}")
    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer"])
    prompts = [e.prompt for e in held_out_examples(get_task(c["task"]), c["eval_prompts"], c["seed"])]
    teacher = load_frozen(c["teacher"])  # full precision, whatever the run trained with
    kl = {name: kl_to_teacher(load_frozen(path), teacher, tokenizer, prompts, max_new_tokens=c["max_new_tokens"],
                              seed=held_out_seed(c["seed"]) + 7)
          for name, path in (("start", c["student"]), ("final", str(Path(summary["checkpoint"]) / "model")))}
    curve = toolkit.curves(summary, "pass@1", "pass@k", "kl_reverse")
    return {"kind": "run", "version": job["version"], "seed": c["seed"], "steps": curve["steps"],
            "pass@1": curve["pass@1"], "pass@k": curve["pass@k"], "kl_to_own_teacher": curve["kl_reverse"],
            "kl_to_full_start": kl["start"], "kl_to_full": kl["final"], "train_s": summary["train_time_s"]}


# --------------------------------------------------------------------------------------------
# aggregation, table, figure, docs block
# --------------------------------------------------------------------------------------------


def aggregate(runs: list[dict], versions: list[str], seeds: list[int]) -> dict:
    """Per version: the runs' values per seed (in seed order) and the paired differences from ``none``."""
    by = {(r["version"], r["seed"]): r for r in runs}
    out = {}
    for v in versions:
        mine = [by[(v, s)] for s in seeds]
        entry = {"seeds": seeds, "steps": mine[0]["steps"], "pass@1": [r["pass@1"] for r in mine],
                 "pass@k": [r["pass@k"] for r in mine], "kl_to_own_teacher": [r["kl_to_own_teacher"] for r in mine],
                 "final_pass@1": [r["pass@1"][-1] for r in mine], "final_pass@k": [r["pass@k"][-1] for r in mine],
                 "kl_to_full": [r["kl_to_full"] for r in mine], "kl_to_full_start": [r["kl_to_full_start"] for r in mine],
                 "train_s": [r["train_s"] for r in mine]}
        if "none" in versions:
            ref = [by[("none", s)] for s in seeds]
            entry["delta_pass@1"] = [r["pass@1"][-1] - f["pass@1"][-1] for r, f in zip(mine, ref)]
            entry["delta_kl_to_full"] = [r["kl_to_full"] - f["kl_to_full"] for r, f in zip(mine, ref)]
        out[v] = entry
    return out


def _sci(x: float) -> str:
    return "0" if x == 0 else (f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}")


def table(result: dict) -> str:
    """The Markdown table: one row per teacher version."""
    c, o = result["teachers"]["versions"], result["opd"]
    lines = ["| teacher | KL(full ‖ this) per token | top-1 agreement | mean abs Δ log q(y_t) | teacher pass@1 | "
             "student pass@1 after OPD | Δ pass@1 vs full (paired) | student KL(π ‖ q_full) after OPD | "
             "Δ KL vs full (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for v in result["versions"]:
        dp, dkl = ((fmt(o[v]["delta_pass@1"], signed=True), fmt(o[v]["delta_kl_to_full"], signed=True))
                   if v != "none" else ("—", "—"))
        lines.append(f"| {LABELS[v]} | {_sci(c[v]['kl'])} | {c[v]['top1_agreement']:.4f} | {_sci(c[v]['mean_abs_dlogq'])} | "
                     f"{c[v]['teacher_pass@1']:.3f} | {fmt(o[v]['final_pass@1'])} | {dp} | {fmt(o[v]['kl_to_full'])} | {dkl} |")
    return "\n".join(lines)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block of teacher-fidelity results, generated from fidelity.json."""
    run, t = result["run"], result["teachers"]
    n = len(result["seeds"])
    o = result["opd"]
    start_pass = sum(p[0] for p in o["none"]["pass@1"]) / n
    start_kl = sum(o["none"]["kl_to_full_start"]) / n
    lines = [f"`python -m opd_mini.experiments fidelity` loads the {result['setting']} setting's teacher in full precision, 8-bit "
             f"and 4-bit (bitsandbytes) and measures, on {t['rollouts']} of the student's own rollouts ({t['tokens']} "
             f"completion tokens), how far each is from full precision; then it trains the student with each "
             f"({run['loss']}, {result['steps']} steps × {run['prompts_per_step'] * run['num_generations']} sequences, "
             f"lr {run['lr']:g}, {n} seeds, the same prompts and sampling seeds for every teacher; {result['wall_s']:.0f} s "
             f"on {result['cpus']} CPU cores; `{results_dir}/fidelity.json`). KL is per token, exact over the vocabulary; "
             f"pass@1 and KL(π ‖ q_full) on held-out prompts, mean ± std over seeds (the student starts at pass@1 "
             f"{start_pass:.3f} and KL {start_kl:.3f}):", "", table(result), "",
             f"![teacher fidelity and the students each teacher trains]({results_dir}/fidelity.png)", ""]
    spread = toolkit.mean_std(o["none"]["final_pass@1"])[1]
    for v in result["versions"]:
        if v == t["reference"]:
            continue
        c = t["versions"][v]
        lines.append(f"- **{LABELS[v]}**: the mean KL is carried by a tail (median {_sci(c['kl_quantiles']['50'])}, "
                     f"99th percentile {_sci(c['kl_quantiles']['99'])}, largest {_sci(c['kl_max'])} nats); the "
                     f"most likely next token differs on {1 - c['top1_agreement']:.1%} of the tokens. Paired by seed, "
                     f"its students end {fmt(o[v]['delta_pass@1'], signed=True)} pass@1 from the full-precision "
                     f"teacher's (whose students' own spread over seeds is {spread:.3f}).")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Three panels: the per-token KL of each quantized teacher from full precision (histogram), the student's
    pass@1 against steps with each teacher, and each student's final KL to the full-precision teacher."""
    plt = toolkit.pyplot()
    colors = {"none": "#333333", "8bit": "#1f77b4", "4bit": "#d62728"}
    versions = result["versions"]
    c, o = result["teachers"]["versions"], result["opd"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))

    ax = axes[0]
    centers = [10 ** ((a + b) / 2) for a, b in zip(KL_LOG10_EDGES, KL_LOG10_EDGES[1:])]
    for v in versions:
        if v == result["teachers"]["reference"]:
            continue
        counts = c[v]["kl_histogram"]
        total = max(1, sum(counts))
        ax.step(centers, [x / total for x in counts], where="mid", color=colors.get(v), lw=1.8,
                label=f"{LABELS[v]}: mean {_sci(c[v]['kl'])}, top-1 agrees {c[v]['top1_agreement']:.1%}")
        ax.axvline(c[v]["kl"], color=colors.get(v), ls=":", lw=1)
    ax.set_xscale("log")
    ticks = [10.0 ** e for e in range(int(KL_LOG10_EDGES[0]), int(KL_LOG10_EDGES[-1]) + 1, 2)]
    ax.set_xticks(ticks, [f"≤1e{int(math.log10(t))}" if t == ticks[0] else f"1e{int(math.log10(t))}" for t in ticks])
    ax.set_xlabel(f"KL(q_full ‖ q_quantized) at one token (nats; {result['teachers']['tokens']} tokens)")
    ax.set_ylabel("share of the student's tokens")
    ax.set_title("How far each quantized teacher is, token by token")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the tallest bars
    ax.legend(frameon=False, fontsize=8, loc="upper right")

    ax = axes[1]
    for v in versions:
        toolkit.band(ax, o[v]["steps"], o[v]["pass@1"], f"taught by the {LABELS[v]} teacher", color=colors.get(v))
    ax.axhline(c["none"]["teacher_pass@1"], color="k", lw=0.8, ls="--", label="full-precision teacher itself")
    ax.set_xlabel("OPD step")
    ax.set_ylabel("student pass@1 (held-out prompts)")
    ax.set_title(f"Learning with each teacher ({len(result['seeds'])} seeds, ± 1 std)")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8, loc="lower right")

    ax = axes[2]  # one line per seed: the same held-out prompts and sampling seed before OPD and after each run
    short = {"none": "full precision", "8bit": "8-bit", "4bit": "4-bit"}
    xs = ["before OPD"] + [f"after OPD,\n{short.get(v, v)} teacher" for v in versions]
    for k, seed in enumerate(result["seeds"]):
        ys = [o[versions[0]]["kl_to_full_start"][k]] + [o[v]["kl_to_full"][k] for v in versions]
        ax.plot(range(len(xs)), ys, color="0.6", lw=0.9, marker="o", ms=3, label="one seed" if k == 0 else None)
    means = [mean(o[versions[0]]["kl_to_full_start"])] + [mean(o[v]["kl_to_full"]) for v in versions]
    ax.plot(range(len(xs)), means, color="k", lw=2, marker="s", ms=5, label="mean over seeds")
    for x, v in enumerate(versions, start=1):
        ax.scatter([x], [means[x]], color=colors.get(v), s=60, zorder=4)
    ax.set_xticks(range(len(xs)), xs, fontsize=8)
    ax.set_xlim(-0.4, len(xs) - 0.6)
    ax.set_ylabel("student's KL(π ‖ q_full) per token")
    ax.set_title("Distance to the full-precision teacher")
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    fig.suptitle(f"Quantized teachers in on-policy distillation ({result['setting']} setting, "
                 f"{result['steps']} steps of {result['run']['loss']})", fontsize=11)
    toolkit.save(fig, path)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(seeds=None)  # the scale's: 5 seeds, --quick 2


def run(args: argparse.Namespace) -> dict:
    from opd_mini.experiments.worlds import ensure_setting, get_setting
    from opd_mini.loading import quantization_config

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    quiet_bitsandbytes()
    for v in VERSIONS:
        quantization_config(v, "cpu")  # no bitsandbytes: say so now, before any run
    setting = get_setting(SETTING)
    paths = ensure_setting(SETTING, progress=False)
    jobs = [(compare_job, {"kind": "compare", "teacher": paths["teacher"], "student": paths["student"],
                           "tokenizer": paths["tokenizer"], "task": setting.task, "max_new_tokens": setting.max_new_tokens,
                           "prompts": scale["compare_prompts"], "seed": seeds[0]})]
    jobs += [(run_job, {"kind": "run", "version": version, "config": toolkit.run_config(
                 RUN, student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"],
                 task=setting.task, max_new_tokens=setting.max_new_tokens, teacher_quantization=version, seed=seed,
                 steps=steps, eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
                 out_dir=str(Path(args.out) / "runs" / f"{version}-seed{seed}"))})
             for version in VERSIONS for seed in seeds]
    print(f"fidelity: {len(VERSIONS)} teacher versions × {len(seeds)} seed(s) = {len(jobs) - 1} runs of {steps} steps "
          f"in {args.workers} process(es)", file=sys.stderr)
    done = toolkit.run_pool(None, jobs, args.workers, desc="fidelity", progress=not args.no_progress)
    compare = next(r for r in done if r["kind"] == "compare")
    return {"scale": scale_name, "setting": SETTING, "task": setting.task,
            "versions": list(VERSIONS), "steps": steps, "seeds": seeds, "cpus": toolkit.cpus(),
            "run": {**RUN, "student": f"{SETTING} student (opd_mini.experiments.worlds)"},
            "teachers": {k: v for k, v in compare.items() if k != "kind"},
            "opd": aggregate([r for r in done if r["kind"] == "run"], list(VERSIONS), seeds)}


def quiet_bitsandbytes() -> None:
    """No bitsandbytes notices: LLM.int8 says on every call that it casts float32 inputs to float16."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
