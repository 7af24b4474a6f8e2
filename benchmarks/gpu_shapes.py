"""The laptop-gpu preset's step on random-init models of its real shapes: memory per phase, seconds per step.

No download: the student (Qwen2.5-0.5B-Instruct) and the teacher (Qwen2.5-3B-Instruct) are built from
their configs, written below (the values of their ``config.json`` on the Hugging Face hub), with random
weights. The teacher is saved once in bf16 to a temporary directory and loaded back through
``opd_mini.teacher.load_teacher`` with the preset's quantization (NF4, double quantization, bf16
compute), the student through ``opd_mini.student.load_student`` (LoRA r = 16 on all linear layers,
gradient checkpointing), exactly as ``python -m opd_mini.train --preset laptop-gpu`` loads the real
ones. The tokenizer is a word-level stand-in with Qwen2.5's 151,665 tokens in the 151,936-row
embedding, so the padding rows are there too. Prompts are random tokens of ``--prompt_len``.

One step is the preset's: ``prompts_per_step`` prompts × ``num_generations`` samples, cut into
``grad_accum`` micro-batches; all are sampled first, then each is scored by the teacher and
back-propagated through the chunked loss; then clip and AdamW. Printed: the models' footprint, and
per phase (sample, score, student forward+backward, optimizer step) the seconds per step and the peak
memory (CUDA: ``torch.cuda.max_memory_allocated`` within the phase; CPU: the peak RSS above the RSS
after loading, polled every 2 ms).

    python benchmarks/gpu_shapes.py                          # a CUDA GPU, the real shapes, 3 steps
    python benchmarks/gpu_shapes.py --loss reverse_kl_full --sampler decode
    python benchmarks/gpu_shapes.py --reduced --device cpu   # tiny shapes on a CPU (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def build_models(args, cfg, device, dtype, tmp_dir: str):
    """Tokenizer, LoRA student and (quantized) teacher of the preset's shapes, random init, loaded the preset's way."""
    import torch
    from transformers import Qwen2ForCausalLM

    from opd_mini.student import load_student
    from opd_mini.teacher import load_teacher

    num_tokens = REDUCED["vocab_size"] - 16 if args.reduced else QWEN25_TOKENS  # a few padding rows either way
    tokenizer = build_tokenizer(num_tokens)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where the model will run: fast on a GPU
        teacher = Qwen2ForCausalLM(qwen2_config(QWEN25_3B, args.reduced)).to(dtype)
    teacher.save_pretrained(tmp_dir)
    del teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    teacher = load_teacher(tmp_dir, quantization=args.teacher_quantization, device=device, compute_dtype=dtype)
    with torch.device(device):
        student = Qwen2ForCausalLM(qwen2_config(QWEN25_0_5B, args.reduced)).to(dtype)
    for model in (student, teacher):
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    student = load_student(student, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, device=device, dtype=dtype,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    return tokenizer, student, teacher


def run(args) -> dict:
    """Load, then ``args.steps`` steps (the first one a warm-up, not timed); returns the figures."""
    import random

    import torch

    from bench_step import PeakMemory
    from opd_mini import registry, sampler
    from opd_mini.config import TrainConfig
    from opd_mini.rollouts import MicroBatch
    from opd_mini.student import loss_and_backward
    from opd_mini.teacher import score, shared_vocab_size

    overrides = dict(loss=args.loss)
    if args.reduced:
        overrides.update(prompts_per_step=4, num_generations=2, grad_accum=2, max_new_tokens=4, loss_chunk_size=2)
    cfg = TrainConfig.from_preset("laptop-gpu", **overrides)
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or cfg.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tokenizer, student, teacher = build_models(args, cfg, device, dtype, tmp_dir)
    V = shared_vocab_size(tokenizer, student, teacher)
    spec, opts = registry.get_loss(cfg.loss), registry.LossOptions(top_k=cfg.top_k, beta=cfg.beta)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mem = PeakMemory(str(device))
    baseline = 0 if device.type == "cuda" else mem.rss()
    footprint = {"student_MB": student.get_memory_footprint() / 2**20,
                 "teacher_MB": teacher.get_memory_footprint() / 2**20,
                 "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        footprint["allocated_after_loading_MB"] = torch.cuda.memory_allocated() / 2**20
    rng = random.Random(0)
    micro_prompts = cfg.prompts_per_step // cfg.grad_accum
    times = {k: [] for k in ("sample", "score", "student", "optimizer")}

    def clock(phase):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for step in range(args.steps):
        prompts = [" ".join(f"t{rng.randrange(len(tokenizer) - 2)}" for _ in range(args.prompt_len))
                   for _ in range(cfg.prompts_per_step)]
        mem.start("sample")
        t0 = clock("sample")
        micro = []
        for i in range(cfg.grad_accum):
            r = sampler.sample(student, tokenizer, prompts[i * micro_prompts:(i + 1) * micro_prompts],
                               num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, use_chat_template=False, seed=step * 100 + i,
                               method=args.sampler).to(device)
            micro.append(MicroBatch(r, registry.LossBatch(tokens_BT=r.completion_ids, mask_BT=r.completion_mask,
                                                          behaviour_logp_BT=r.behaviour_logp)))
        num_tokens = sum(int(b.mask_BT.sum()) for b in micro)
        t_sample = clock("sample") - t0
        mem.stop()
        t_score = t_student = 0.0
        for batch in micro:
            batch.inputs.num_tokens = max(num_tokens, 1)
            mem.start("score")
            t0 = clock("score")
            fused = spec.signal == "full" and cfg.loss_chunk_size > 0
            signal = score(teacher, batch.rollouts, vocab_size=V, top_k=cfg.top_k if spec.signal == "topk" else 0,
                           full=spec.signal == "full" and not fused, keep_hidden=fused,
                           chunk_size=cfg.teacher_chunk_size)
            batch.inputs.teacher_logp_BT = signal.sampled_logp
            batch.inputs.teacher_topk_ids_BTK, batch.inputs.teacher_topk_logp_BTK = signal.topk_ids, signal.topk_logp
            batch.inputs.teacher_logp_BTV = signal.full_logp
            batch.inputs.teacher_logp_fn = signal.full_logp_chunk if signal.hidden is not None else None
            t_score += clock("score") - t0
            mem.stop()
            mem.start("student")
            t0 = clock("student")
            loss_and_backward(student, batch, spec, opts, vocab_size=V, chunk_size=cfg.loss_chunk_size)
            t_student += clock("student") - t0
            mem.stop()
            del signal
        mem.start("optimizer")
        t0 = clock("optimizer")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_opt = clock("optimizer") - t0
        mem.stop()
        del micro
        if step > 0 or args.steps == 1:
            for k, v in zip(times, (t_sample, t_score, t_student, t_opt)):
                times[k].append(v)
    mean = {f"s_{k}": sum(v) / len(v) for k, v in times.items()}
    peaks = {f"peak_{k}_MB": (mem.peaks[k] - baseline) / 2**20 for k in times}
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "loss": cfg.loss, "sampler": args.sampler,
            "teacher_quantization": args.teacher_quantization, "sequences_per_step": cfg.prompts_per_step * cfg.num_generations,
            "grad_accum": cfg.grad_accum, "prompt_len": args.prompt_len, "max_new_tokens": cfg.max_new_tokens,
            **footprint, **mean, "s_step": sum(mean.values()), **peaks,
            "peak_MB": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else max(peaks.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: the preset's (bfloat16)")
    p.add_argument("--loss", default="reverse_kl_topk", help="a registered loss that scores with the teacher")
    p.add_argument("--sampler", default="generate", choices=("generate", "decode"), help="sampler.sample's method")
    p.add_argument("--teacher_quantization", default="4bit", choices=("4bit", "8bit", "none"))
    p.add_argument("--prompt_len", type=int, default=40, help="prompt tokens (the preset's add:4 prompts with "
                   "Qwen's chat template are about 40)")
    p.add_argument("--steps", type=int, default=3, help="steps; the first is a warm-up and is not timed")
    p.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    p.add_argument("--reduced", action="store_true", help="tiny shapes (for a CPU test), the same architecture")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False: use --device cpu (with --reduced)")
    from opd_mini.registry import LOSS_REGISTRY

    if args.loss not in LOSS_REGISTRY or LOSS_REGISTRY[args.loss].signal is None:
        p.error(f"--loss must be a registered loss that scores with the teacher; got {args.loss!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args)
    if args.json:
        print(json.dumps(res))
        return 0
    name = "reduced shapes" if args.reduced else "Qwen2.5-0.5B student (LoRA) + Qwen2.5-3B teacher"
    print(f"laptop-gpu preset step, {name}, random init; {res['device']} {res['dtype']}, teacher "
          f"{res['teacher_quantization']}, loss {res['loss']}, sampler {res['sampler']}; {res['sequences_per_step']} "
          f"sequences per step in {res['grad_accum']} micro-batches, {res['prompt_len']} prompt + "
          f"{res['max_new_tokens']} new tokens")
    print(f"student {res['student_MB']:.1f} MB, teacher {res['teacher_MB']:.1f} MB, "
          f"{res['trainable_params'] / 1e6:.2f} M trainable parameters")
    unit = "max allocated" if res["device"].startswith("cuda") else "RSS above loading"
    print(f"\n| phase | s per step | peak MB ({unit}) |\n|---|---|---|")
    for k in ("sample", "score", "student", "optimizer"):
        print(f"| {k} | {res[f's_{k}']:.2f} | {res[f'peak_{k}_MB']:.0f} |")
    print(f"| step | {res['s_step']:.2f} | {res['peak_MB']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
