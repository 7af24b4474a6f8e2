"""The laptop-gpu preset through the real loop at its real shapes: the step-0 evaluation and training steps,
with the true peak memory of each.

No download: the student (Qwen2.5-0.5B-Instruct) and the teacher (Qwen2.5-3B-Instruct) are built from their
configs (written below: the values of their ``config.json`` on the Hugging Face hub) with random weights,
directly in bf16 on the CPU (no fp32 copy and nothing on the GPU until loading) and saved to a temporary
directory. ``opd_mini.train.train`` then runs ``--preset laptop-gpu`` on them, loading them as it loads the
real ones (the teacher in 4-bit NF4, the LoRA student with gradient checkpointing). The tokenizer is a
word-level stand-in with Qwen2.5's 151,665 tokens in the 151,936-row embedding (the padding rows are there
too); the task is a JSONL file of prompts of ``--prompt_len`` random tokens. Everything else is the preset's:
its evaluation at step 0 (128 prompts × 4 samples, and the retention task), its micro-batches, its chunks.

Memory is what the loop itself logs on a GPU (``memory/*`` in metrics.jsonl): the peak allocated and reserved
within each step and within each evaluation, over every phase. ``--memory_cap_gib`` caps the allocator
(``torch.cuda.set_per_process_memory_fraction``) to see whether the preset fits a smaller card.

    python benchmarks/gpu_shapes.py                                   # a CUDA GPU, 2 steps
    python benchmarks/gpu_shapes.py --memory_cap_gib 7.5 --loss reverse_kl_full
    python benchmarks/gpu_shapes.py --reduced --device cpu --teacher_quantization none  # tiny shapes (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

#: Qwen2.5-0.5B-Instruct and Qwen2.5-3B-Instruct, from their config.json (Qwen2 architecture: RoPE, SwiGLU,
#: RMSNorm, q/k/v biases, grouped-query attention, tied input/output embeddings).
QWEN2_COMMON = dict(vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                    hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False, sliding_window=32_768,
                    attention_dropout=0.0, initializer_range=0.02, bos_token_id=151_643, eos_token_id=151_645)
QWEN25_0_5B = dict(QWEN2_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, max_window_layers=21)
QWEN25_3B = dict(QWEN2_COMMON, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_window_layers=70)
#: Tokens of the Qwen2.5 tokenizer (151,643 regular + 22 special); the embedding has 151,936 rows.
QWEN25_TOKENS = 151_665
#: The CPU test's shapes: the same architecture, tiny.
REDUCED = dict(vocab_size=1_024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_window_layers=2)


def qwen2_config(shape: dict, reduced: bool = False, pad_token_id: int = 0, eos_token_id: int = 1):
    """A ``Qwen2Config`` of ``shape`` (one of the dicts above), with the stand-in tokenizer's special ids."""
    from transformers import Qwen2Config

    fields = dict(shape, **(REDUCED if reduced else {}))
    fields.update(pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=eos_token_id)
    return Qwen2Config(**fields)


def build_tokenizer(num_tokens: int):
    """A word-level tokenizer of ``num_tokens`` tokens: "<pad>" (0), "<eos>" (1), then "t0", "t1", …"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>"] + [f"t{i}" for i in range(num_tokens - 2)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def save_random_model(shape: dict, reduced: bool, path: Path, dtype, device: str = "cpu") -> None:
    """A random-init Qwen2 of ``shape`` built directly in ``dtype`` (no fp32 copy) on ``device``, saved and freed
    (without a tokenizer: next to a qwen2 config.json, AutoTokenizer would load Qwen2's own tokenizer class)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # a GPU initialises the weights in seconds; they are freed before the run
        model = AutoModelForCausalLM.from_config(qwen2_config(shape, reduced), dtype=dtype)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write_task(path: Path, tokenizer, prompt_len: int, n: int = 400) -> None:
    """A JSONL task of ``n`` prompts of ``prompt_len`` random tokens (answers of 3 tokens): the preset's shapes."""
    rng = random.Random(0)
    words = len(tokenizer) - 2
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(f"t{rng.randrange(words)}" for _ in range(prompt_len))
            f.write(json.dumps({"prompt": prompt, "answer": " ".join(f"t{rng.randrange(words)}" for _ in range(3))})
                    + "\n")


def prepare(args, root: Path) -> dict:
    """Tokenizer, random student and teacher, the task: the paths a TrainConfig needs."""
    import torch

    dtype = torch.bfloat16 if (args.dtype or "bfloat16") == "bfloat16" else torch.float32
    tokenizer = build_tokenizer(REDUCED["vocab_size"] - 16 if args.reduced else QWEN25_TOKENS)
    paths = {name: root / name for name in ("student", "teacher", "tokenizer")}
    t0 = time.perf_counter()
    tokenizer.save_pretrained(paths["tokenizer"])
    save_random_model(QWEN25_0_5B, args.reduced, paths["student"], dtype, args.device)
    save_random_model(QWEN25_3B, args.reduced, paths["teacher"], dtype, args.device)  # 6 GB of bf16 at the real shapes
    write_task(root / "task.jsonl", tokenizer, args.prompt_len)
    return {**{k: str(v) for k, v in paths.items()}, "task": f"jsonl:{root / 'task.jsonl'}",
            "build_s": time.perf_counter() - t0}


def preset_config(args, paths: dict, out_dir: Path):
    """The laptop-gpu preset on the stand-in models (reduced: the tests' small batch on a CPU)."""
    from opd_mini.config import TrainConfig

    overrides = dict(student=paths["student"], teacher=paths["teacher"], tokenizer=paths["tokenizer"],
                     task=paths["task"], loss=args.loss, steps=args.steps, eval_every=0, save_every=0,
                     device=args.device, teacher_quantization=args.teacher_quantization, sampler=args.sampler,
                     out_dir=str(out_dir), progress=False, overwrite=True, check_tokenizers=False)
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.reduced:
        overrides.update(prompts_per_step=4, num_generations=2, grad_accum=2, max_new_tokens=4, loss_chunk_size=2,
                         eval_prompts=8, eval_samples=2, pass_k=2, threads=args.threads, warmup_steps=1)
    return TrainConfig.from_preset("laptop-gpu", **overrides)


def run(args, paths: dict | None = None) -> dict:
    """Run the preset for ``args.steps`` steps on the stand-ins (built here unless ``paths`` gives them); the
    figures of its metrics log."""
    import gc

    import torch

    from opd_mini.train import train

    gc.collect()  # an earlier run's models (peft holds reference cycles) must not count in this run's peaks
    if args.device.startswith("cuda"):  # the cap, or none (a fraction of 1)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib / total) if args.memory_cap_gib else 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = paths or prepare(args, root)
        cfg = preset_config(args, paths, root / "run")
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    steps = [r for r in rows if "time/step" in r]
    evals = [r for r in rows if "time/eval" in r]
    peak = lambda rs, k: max((r.get(k, 0.0) for r in rs), default=0.0)  # noqa: E731
    return {"device": args.device, "dtype": cfg.dtype, "loss": cfg.loss, "sampler": cfg.sampler,
            "teacher_quantization": summary["ran"]["teachers"]["*"]["quantization"],
            "memory_cap_gib": args.memory_cap_gib, "sequences_per_step": cfg.prompts_per_step * cfg.num_generations,
            "grad_accum": cfg.grad_accum, "prompt_len": args.prompt_len, "max_new_tokens": cfg.max_new_tokens,
            "eval_rows": cfg.eval_prompts * cfg.eval_samples, "steps": len(steps), "build_s": paths["build_s"],
            "wall_s": wall, "s_step": sum(r["time/step"] for r in steps) / max(1, len(steps)),
            "s_sample": sum(r["time/sample"] for r in steps) / max(1, len(steps)),
            "s_eval_step0": evals[0]["time/eval"] if evals else None,
            "step_peak_allocated_GB": peak(steps, "memory/peak_allocated_GB"),
            "step_peak_reserved_GB": peak(steps, "memory/peak_reserved_GB"),
            "eval_peak_allocated_GB": peak(evals, "memory/eval_peak_allocated_GB"),
            "eval_peak_reserved_GB": peak(evals, "memory/eval_peak_reserved_GB"),
            "final_eval": {k: v for k, v in summary["final_eval"].items() if k.startswith("eval/")}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: the preset's (bfloat16)")
    p.add_argument("--loss", default="reverse_kl_sampled", help="a registered loss")
    p.add_argument("--sampler", default="decode", choices=("generate", "decode"), help="sampler.sample's method")
    p.add_argument("--teacher_quantization", default="4bit", choices=("4bit", "8bit", "none"))
    p.add_argument("--prompt_len", type=int, default=40, help="prompt tokens (the preset's add:4 prompts with "
                   "Qwen's chat template are about 40)")
    p.add_argument("--steps", type=int, default=2, help="training steps after the step-0 evaluation")
    p.add_argument("--memory_cap_gib", type=float, default=0.0, help="cap the CUDA allocator at this many GiB")
    p.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    p.add_argument("--reduced", action="store_true", help="tiny shapes (for a CPU test), the same architecture")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser().error("--device cuda but torch.cuda.is_available() is False: use --device cpu (with --reduced)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from opd_mini.cli import run_cli

    def body() -> int:
        res = run(args)
        if args.json:
            print(json.dumps(res))
            return 0
        name = "reduced shapes" if args.reduced else "Qwen2.5-0.5B student (LoRA) + Qwen2.5-3B teacher"
        print(f"laptop-gpu preset, {name}, random init; {res['device']} {res['dtype']}, teacher "
              f"{res['teacher_quantization']}, loss {res['loss']}, sampler {res['sampler']}; "
              f"{res['sequences_per_step']} sequences per step in {res['grad_accum']} micro-batches; evaluation "
              f"{res['eval_rows']} rows; allocator cap {res['memory_cap_gib'] or 'none'} GiB")
        print("\n| phase | seconds | peak allocated GiB | peak reserved GiB |\n|---|---|---|---|")
        print(f"| step-0 evaluation | {res['s_eval_step0']:.1f} | {res['eval_peak_allocated_GB']:.2f} | "
              f"{res['eval_peak_reserved_GB']:.2f} |")
        print(f"| training step | {res['s_step']:.1f} | {res['step_peak_allocated_GB']:.2f} | "
              f"{res['step_peak_reserved_GB']:.2f} |")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
