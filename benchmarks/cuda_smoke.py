"""The GPU smoke test: everything the loop does, once, on CUDA in bf16; then the laptop-gpu preset at its real
shapes under a laptop's memory; one JSON of PASS/FAIL and peaks.

    python benchmarks/cuda_smoke.py --out smoke.json              # a CUDA GPU: about 5 minutes
    python benchmarks/cuda_smoke.py --dry-run --out smoke.json    # the same checks on the CPU, fp32, reduced

Section ``tiny`` (the shipped tiny pair, bf16 on the GPU): both samplers; the 8-bit and 4-bit teachers and
their KL to the full-precision one; one training run of every registered loss through ``opd_mini.train``,
each evaluated at step 0 with the teacher's reverse and forward KL and, for the LoRA runs, KL(π₀ ‖ π) on a
retention task (the device mixes the CPU cannot see); an interrupted run resumed against an uninterrupted
one; self-distillation (the LoRA student's own base as the teacher): max |r_t| on the student's samples, 0
exactly in fp32 and measured in bf16. Section ``preset`` (``benchmarks/gpu_shapes.py``): the laptop-gpu
preset on random-init Qwen2.5-0.5B / 3B stand-ins with the allocator capped at ``--memory_cap_gib`` (7.5):
its step-0 evaluation and one step of each of the default losses. ``--dry-run`` runs the same code on the
CPU in fp32 with reduced shapes (what the test suite runs). Every check is independent: a failure is
recorded with its error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: The losses of the preset section: the default and the two other families users pick first.
PRESET_LOSSES = ("reverse_kl_sampled", "reverse_kl_topk", "reverse_kl_full")


class Smoke:
    """Runs named checks, each recorded as PASS (with its numbers) or FAIL (with the error), into one JSON."""

    def __init__(self, out: Path, device: str):
        self.out, self.device, self.results = out, device, {}

    def check(self, name: str, fn) -> None:
        import torch

        t0 = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            numbers = fn() or {}
            entry = {"status": "PASS", **numbers}
        except Exception as e:  # a smoke test records every failure and goes on
            frames = traceback.extract_tb(e.__traceback__)[-8:]
            entry = {"status": "FAIL", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}",
                     "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}: {f.line}" for f in frames]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        if self.device == "cuda":
            entry["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.results[name] = entry
        print(f"{entry['status']}  {name}  ({entry['seconds']} s) " + (entry.get("error", "")), flush=True)
        self.write()

    def write(self) -> None:
        passed = sum(r["status"] == "PASS" for r in self.results.values())
        self.out.write_text(json.dumps({"device": self.device, "passed": passed, "failed": len(self.results) - passed,
                                        "checks": self.results}, indent=1))


def tiny_section(smoke: Smoke, args, root: Path) -> None:
    import torch

    from opd_mini import registry
    from opd_mini.config import TrainConfig
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task
    from opd_mini.teacher import load_teacher, score
    from opd_mini.tiny import ensure_tiny_models
    from opd_mini.train import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = ensure_tiny_models(progress=False)
    device = torch.device(smoke.device)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(pair["tokenizer"])
    prompts = [e.prompt for e in get_task("reverse:5").examples(16, seed=0)]
    base = dict(student=pair["student"], teacher=pair["teacher"], tokenizer=pair["tokenizer"], task="reverse:5",
                device=smoke.device, dtype="float32" if args.dry_run else "auto", steps=2, prompts_per_step=8,
                num_generations=2, max_new_tokens=8, eval_prompts=16, eval_samples=2, pass_k=2, eval_every=0,
                progress=False, lr=1e-3, overwrite=True, eval_kl_forward=True)

    def samplers():
        model = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=dtype).to(device)
        out = {}
        for method in ("generate", "decode"):
            r = sample(model, tokenizer, prompts, num_generations=4, max_new_tokens=8, seed=0, method=method)
            forward = sampled_token_logprobs(model, r, len(tokenizer))
            out[f"{method}_max_abs_logp_vs_forward"] = float((r.behaviour_logp_BT - forward).abs().max())
            assert r.tokens_BT.device.type == device.type and r.num_masked > 0
        return out

    def quantized_teachers():
        student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=dtype).to(device)
        batch = sample(student, tokenizer, prompts, num_generations=4, max_new_tokens=8, seed=1)
        full = score(load_teacher(pair["teacher"], device=device, compute_dtype=dtype), batch,
                     vocab_size=len(tokenizer), full=True)
        out = {}
        for q in ("8bit", "4bit"):
            teacher = load_teacher(pair["teacher"], quantization=q, device=device, compute_dtype=dtype)
            other = score(teacher, batch, vocab_size=len(tokenizer), full=True)
            p, lq = full.teacher_logp_BTV, other.teacher_logp_BTV
            kl_BT = (p.exp() * (p - lq)).sum(-1)
            out[f"kl_full_to_{q}"] = float(kl_BT[batch.mask_BT].mean())
        return out

    smoke.check("tiny/samplers", samplers)
    smoke.check("tiny/quantized_teachers", quantized_teachers)
    for name, spec in registry.LOSS_REGISTRY.items():
        lora = name in ("reverse_kl_sampled", "reverse_kl_full", "sft")
        extra = dict(lora=lora, retention_task="add:2", eval_kl_to_init=True) if lora else {}
        if spec.reward:
            extra["num_generations"] = 2

        def one(name=name, extra=extra):
            summary = train(TrainConfig(**{**base, **extra, "loss": name, "out_dir": str(root / f"loss-{name}")}))
            first, last = summary["eval_history"][0], summary["eval_history"][-1]
            assert all(v == v for v in last.values()), "NaN in the evaluation"
            return {k: round(v, 5) for k, v in {**first, **{f"last_{k}": v for k, v in last.items()}}.items()
                    if k.startswith(("eval/", "last_eval/"))}

        smoke.check(f"tiny/loss/{name}", one)

    def resume():
        opts = {**base, "steps": 4, "save_every": 2, "lora": True, "loss": "reverse_kl_topk", "top_k": 4}
        straight = train(TrainConfig(**opts, out_dir=str(root / "straight")))
        train(TrainConfig(**{**opts, "steps": 2}, out_dir=str(root / "resumed")))
        resumed = train(TrainConfig(**{**opts, "resume": True, "overwrite": False}, out_dir=str(root / "resumed")))
        a, b = straight["final_eval"], resumed["final_eval"]
        gap = max(abs(a[k] - b[k]) for k in a if k.startswith("eval/"))
        assert gap < (1e-6 if args.dry_run else 0.1), f"resumed run ends {gap} away from the uninterrupted one"
        return {"max_eval_gap": gap}

    def self_distillation():
        from opd_mini.student import load_student

        summary = train(TrainConfig(**{**base, "teacher": "self", "lora": True, "steps": 1,
                                       "out_dir": str(root / "self")}))
        kl = summary["eval_history"][0]["eval/kl_reverse"]
        assert kl == 0.0, f"eval/kl_reverse at step 0 is {kl}, not 0: the teacher is the student's own base"
        student = load_student(pair["student"], lora=True, device=device, dtype=dtype)
        out = {"step0_kl_reverse": kl}
        for logp in ("forward", "decode"):  # log-probs from a forward (what the loop uses) or recorded while decoding
            batch = sample(student, tokenizer, prompts, num_generations=4, max_new_tokens=8, seed=2, method="decode",
                           behaviour_logp=logp)
            scored = score(student, batch, vocab_size=len(tokenizer), disable_adapter=True)
            out[f"max_abs_r_t_{logp}_logp"] = float((scored.behaviour_logp_BT - scored.teacher_logp_BT)[batch.mask_BT]
                                                    .abs().max())
        assert out["max_abs_r_t_forward_logp"] == 0.0, out
        return out

    smoke.check("tiny/resume", resume)
    smoke.check("tiny/self_distillation_r_t_zero", self_distillation)


def preset_section(smoke: Smoke, args, root: Path) -> None:
    """The stand-in models are built once; each loss then runs the preset (its step-0 evaluation, one step)."""
    import gpu_shapes

    argv = ["--device", smoke.device, "--steps", "1", "--memory_cap_gib", str(args.memory_cap_gib)]
    if args.dry_run:
        argv += ["--reduced", "--dtype", "float32", "--teacher_quantization", "none"]
    paths = {}
    smoke.check("preset/build_models", lambda: {"build_s": paths.update(gpu_shapes.prepare(
        gpu_shapes.parser().parse_args(argv), root / "preset")) or paths["build_s"]})
    for loss in PRESET_LOSSES:
        opts = gpu_shapes.parser().parse_args([*argv, "--loss", loss])
        smoke.check(f"preset/{loss}", lambda opts=opts: gpu_shapes.run(opts, paths=paths))
    if smoke.results[f"preset/{PRESET_LOSSES[0]}"]["status"] != "PASS" and not args.dry_run:
        # the same run with the teacher unquantized and no cap: whether the 4-bit teacher or the memory failed
        opts = gpu_shapes.parser().parse_args([*argv[:4], "--teacher_quantization", "none", "--memory_cap_gib", "0"])
        smoke.check(f"preset/{PRESET_LOSSES[0]}/unquantized_no_cap", lambda: gpu_shapes.run(opts, paths=paths))


def docs_block(result: dict, source: str = "benchmarks/results/cuda_smoke_h200.json") -> str:
    """The measured block of docs/laptop-gpu.md, generated from a smoke run's JSON (a test keeps them equal)."""
    checks = result["checks"]
    gpu = checks.get("gpu", {})
    tiny = [k for k in checks if k.startswith("tiny/")]
    lines = [f"Measured by `python benchmarks/cuda_smoke.py` on one {gpu.get('name', '?')} (torch {gpu.get('torch', '?')}, "
             f"native bf16: {gpu.get('bf16_native')}); every number is in `{source}`. "
             f"{result['passed']} checks passed, {result['failed']} failed.", "",
             f"- **The tiny pair in bf16 on CUDA**: {sum(checks[k]['status'] == 'PASS' for k in tiny)} of {len(tiny)} "
             "checks passed: both samplers, the 8-bit and 4-bit teachers, every registered loss through the loop "
             "with its step-0 evaluation (the teacher's reverse and forward KL, KL(π₀ ‖ π) on a retention task), "
             "an interrupted run resumed, self-distillation."]
    sd = checks.get("tiny/self_distillation_r_t_zero", {})
    if sd.get("status") == "PASS":
        lines.append(f"- **r_t = 0 in bf16**: with the student's own base as the teacher, max |r_t| on its samples is "
                     f"{sd['max_abs_r_t_forward_logp']:g} with the behaviour log-probs from a forward (what the loop "
                     f"uses) and {sd['max_abs_r_t_decode_logp']:g} with those recorded while decoding; "
                     f"eval/kl_reverse at step 0 is {sd['step0_kl_reverse']:g}.")
    q = checks.get("tiny/quantized_teachers", {})
    if q.get("status") == "PASS":
        lines.append(f"- **Quantized teachers**: per-token KL(full ‖ quantized) of the tiny teacher on the student's "
                     f"samples: {q['kl_full_to_8bit']:.1e} (8-bit), {q['kl_full_to_4bit']:.1e} (4-bit).")
    preset = [k for k in checks if k.startswith("preset/") and k != "preset/build_models"]
    if preset:
        first = checks[preset[0]]
        lines += ["", f"**The laptop-gpu preset at its real shapes** (random-init Qwen2.5-0.5B LoRA student and Qwen2.5-3B "
                  f"teacher in {first.get('teacher_quantization', '4bit')}; {first.get('sequences_per_step')} sequences "
                  f"per step in {first.get('grad_accum')} micro-batches; the step-0 evaluation samples "
                  f"{first.get('eval_rows')} rows and scores them, then the retention task), the CUDA allocator "
                  f"capped at {first.get('memory_cap_gib')} GiB:", "",
                  "| loss | result | step-0 evaluation s | its peak allocated / reserved GiB | step s | "
                  "its peak allocated / reserved GiB |", "|---|---|---|---|---|---|"]
        for k in preset:
            c = checks[k]
            if c["status"] != "PASS":
                lines.append(f"| {k.split('/', 1)[1]} | FAIL: {c['error'][:120]} | | | | |")
                continue
            lines.append(f"| {c['loss']} | PASS | {c['s_eval_step0']:.1f} | {c['eval_peak_allocated_GB']:.2f} / "
                         f"{c['eval_peak_reserved_GB']:.2f} | {c['s_step']:.1f} | {c['step_peak_allocated_GB']:.2f} / "
                         f"{c['step_peak_reserved_GB']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="cuda_smoke.json", help="the JSON of PASS/FAIL and peaks")
    p.add_argument("--dry-run", action="store_true", help="the CPU: fp32, reduced preset shapes")
    p.add_argument("--sections", default="tiny,preset")
    p.add_argument("--memory_cap_gib", type=float, default=7.5)
    args = p.parse_args(argv)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU: run with --dry-run on the CPU")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    smoke = Smoke(Path(args.out), device)
    if device == "cuda":
        smoke.results["gpu"] = {"status": "PASS", "name": torch.cuda.get_device_name(0),
                                "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
                                "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        sections = args.sections.split(",")
        if "tiny" in sections:
            tiny_section(smoke, args, Path(tmp))
        if "preset" in sections:
            preset_section(smoke, args, Path(tmp))
    smoke.write()
    failed = [k for k, v in smoke.results.items() if v["status"] != "PASS"]
    print(f"{len(smoke.results) - len(failed)} passed, {len(failed)} failed; written: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
