"""Seconds and peak memory of one on-policy distillation step over a big vocabulary.

Workload: V = 151,936 (the Qwen2 vocabulary), a 2-layer hidden-64 Llama student and teacher (random
init from ``opd_mini.tiny.tiny_config("bench")``, no download), batch 8, 128 prompt + 128 new tokens, fully
on-policy, AdamW on all student weights, any registered loss (``--loss``, default reverse_kl_topk).
Three paths, each in its own subprocess so that its peak memory is measured on its own:

    chunked        the train.py path with --loss_chunk_size C --teacher_chunk_size C: the teacher scored
                   in chunks (top-K, or for a full-vocabulary loss its hidden states, projected again chunk
                   by chunk inside the loss: the fused path), the student's logits in chunks along T
    one-piece      the same teacher side, but the student's (B, T, V) logits in one piece, and for a
                   full-vocabulary loss the teacher's (B, T, V) log-probs (--loss_chunk_size 0, the
                   readable reference path)
    naive          teacher (B, T, V) log-probs in one piece + the full student log-softmax: the same loss,
                   computed the straightforward way

Reported per path: seconds per step for sampling / teacher scoring / student forward+backward+update,
the peak memory of each phase (CPU: resident set size polled every 2 ms, on top of the RSS after loading
the models; CUDA: torch.cuda.max_memory_allocated per phase) and the process's peak RSS. The models'
own footprint (student + teacher weights + AdamW state) is printed for scale.

    python benchmarks/bench_step.py                   # CPU, prints a markdown table
    python benchmarks/bench_step.py --device cuda --steps 5
    python benchmarks/bench_step.py --sampler generate  # the reference sampler (HF generate + a forward)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

PATHS = ("chunked", "one-piece", "naive")


def build_world(vocab_size: int, device: str, seed: int = 0):
    """A word-level tokenizer with ``vocab_size`` tokens ("t0", "t1", …) and random student/teacher."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from opd_mini.tiny import tiny_config

    specials = ["<pad>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        padding_side="left")
    models_ = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        config = tiny_config("bench", vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0,
                             bos_token_id=None, eos_token_id=1)
        model = LlamaForCausalLM(config).float().to(device)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
        models_.append(model)
    student, teacher = models_
    teacher.eval().requires_grad_(False)
    return tokenizer, student, teacher


class PeakMemory:
    """Peak memory of labelled phases: RSS polled by a thread on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.peaks: dict[str, float] = {}
        self.phase, self._stop = None, False
        if not self.cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop:
            if self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())
            time.sleep(0.002)

    def start(self, phase: str) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.phase = phase
        if not self.cuda:
            self.peaks[phase] = max(self.peaks.get(phase, 0), self.rss())

    def stop(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.torch.cuda.max_memory_allocated())
        else:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())
        self.phase = None


def worker(args) -> dict:
    """Run one path for ``args.steps`` steps (after one warm-up step) and return its figures."""
    import random

    import torch

    from opd_mini import losses, registry, sampler, teacher as teacher_lib
    from opd_mini.forward import completion_logits
    from opd_mini.student import loss_and_backward

    torch.set_num_threads(args.threads)
    tokenizer, student, teacher = build_world(args.vocab, args.device)
    V = teacher_lib.shared_vocab_size(tokenizer, student, teacher)
    spec, opts = registry.get_loss(args.loss), registry.LossOptions(top_k=args.top_k)
    from opd_mini import divergences

    divergences.set_backend(args.divergence_backend)
    top_k = args.top_k if spec.signal == "topk" else 0
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    param_bytes = sum(p.numel() * p.element_size() for mod in (student, teacher) for p in mod.parameters())
    adam_bytes = 2 * sum(p.numel() * 4 for p in student.parameters())
    rng = random.Random(0)
    prompts = [" ".join(f"t{rng.randrange(V - 2)}" for _ in range(args.prompt_len)) for _ in range(args.batch)]

    mem = PeakMemory(args.device)
    baseline = mem.rss()
    times = {"sample": [], "score": [], "student": []}
    for step in range(args.steps + 1):  # step 0 warms up (allocator, kernels) and is not timed
        mem.start("sample")
        t0 = time.perf_counter()
        rollouts = sampler.sample(student, tokenizer, prompts, max_new_tokens=args.new_tokens, seed=step,
                                  use_chat_template=False, method=args.sampler).to(args.device)
        t1 = time.perf_counter()
        mem.stop()
        mask_BT = rollouts.mask_BT
        mem.start("score")
        t2 = time.perf_counter()
        full = spec.signal == "full"
        if args.path == "naive":  # (B, T, V) teacher log-probs in one piece; top-K taken from them
            batch = teacher_lib.score(teacher, rollouts, vocab_size=V, full=True, chunk_size=rollouts.tokens_BT.shape[1])
            if top_k:
                batch.teacher_topk_logp_BTK, batch.teacher_topk_ids_BTK = batch.teacher_logp_BTV.topk(top_k, dim=-1)
        else:
            batch = teacher_lib.score(teacher, rollouts, vocab_size=V, top_k=top_k, chunk_size=args.chunk,
                                      full=full and args.path == "one-piece", keep_hidden=full and args.path == "chunked")
        t3 = time.perf_counter()
        mem.stop()
        mem.start("student")
        t4 = time.perf_counter()
        batch = batch.replace(num_tokens=int(mask_BT.sum()))
        if args.path == "naive":  # full student log-softmax kept alongside the teacher's (B, T, V)
            logp_BTV = torch.log_softmax(completion_logits(student, rollouts, V).float(), dim=-1)
            x = losses.token_logprobs(logp_BTV, rollouts.tokens_BT) if spec.kind == "token" else logp_BTV
            loss, _ = spec.fn(x, batch, opts)
            loss.backward()
            del logp_BTV, x
        else:
            loss_and_backward(student, batch, spec, opts, vocab_size=V,
                              chunk_size=args.chunk if args.path == "chunked" else 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t5 = time.perf_counter()
        mem.stop()
        del batch, rollouts
        if step > 0:
            times["sample"].append(t1 - t0)
            times["score"].append(t3 - t2)
            times["student"].append(t5 - t4)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    cuda = args.device.startswith("cuda")
    return {
        "path": args.path, **{f"s_{k}": v for k, v in mean.items()}, "s_step": sum(mean.values()),
        "peak_sample_MB": (mem.peaks["sample"] - (0 if cuda else baseline)) / 2**20,
        "peak_score_MB": (mem.peaks["score"] - (0 if cuda else baseline)) / 2**20,
        "peak_student_MB": (mem.peaks["student"] - (0 if cuda else baseline)) / 2**20,
        "baseline_rss_MB": baseline / 2**20,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_MB": (torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "model_params_MB": param_bytes / 2**20, "adam_state_MB": adam_bytes / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--loss", default="reverse_kl_topk", help="a registered loss (opd_mini.registry)")
    p.add_argument("--top_k", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16, help="positions per chunk (teacher scoring and student loss)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sampler", default="decode", choices=("generate", "decode"),
                   help="sampler.sample's method: generate (HF generate + a forward for the behaviour log-probs) "
                        "or decode (the KV-cache loop, log-probs recorded while decoding)")
    p.add_argument("--divergence_backend", default="fused", choices=("fused", "compiled"),
                   help="how the full-vocabulary losses compute (opd_mini.divergences.set_backend)")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--path", help=argparse.SUPPRESS)  # set in the worker subprocess
    args = p.parse_args()
    from opd_mini.cli import run_cli

    if args.path:  # the worker subprocess: one path; bad settings end in one error line, exit code 2
        sys.exit(run_cli(lambda: print("RESULT " + json.dumps(worker(args))) or 0))
    for name in ("vocab", "batch", "prompt_len", "new_tokens", "top_k", "chunk", "steps", "threads"):
        if getattr(args, name) < (2 if name == "vocab" else 1):
            p.error(f"--{name} must be >= {2 if name == 'vocab' else 1}, got {getattr(args, name)}")
    if args.top_k > args.vocab - 2:
        p.error(f"--top_k must be below --vocab, got {args.top_k} >= {args.vocab}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch.cuda.is_available() is False: use --device cpu")
    from opd_mini.registry import LOSS_REGISTRY

    if args.loss not in LOSS_REGISTRY or LOSS_REGISTRY[args.loss].signal is None:
        p.error(f"--loss must be a registered loss that scores with the teacher, one of "
                f"{', '.join(n for n, s in LOSS_REGISTRY.items() if s.signal is not None)}; got {args.loss!r}")
    unknown = [x for x in args.paths.split(",") if x not in PATHS]
    if unknown:
        p.error(f"--paths must name paths from {', '.join(PATHS)}; got {', '.join(unknown)}")

    # glibc keeps freed heap memory mapped unless big blocks use mmap; a fixed threshold makes RSS track
    # what is actually allocated, so each phase's peak is its own
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode == 2:  # bad settings, e.g. --device cuda without a GPU: the worker's one-line message
            errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
            print(errors[-1] if errors else f"error: the {path} worker failed", file=sys.stderr)
            sys.exit(2)
        if out.returncode or not lines:
            sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"done: {path}", file=sys.stderr)

    r0 = rows[0]
    print(f"loss {args.loss}, sampler {args.sampler}, V={args.vocab}, batch {args.batch}, {args.prompt_len} prompt + {args.new_tokens} new "
          f"tokens, top-K {args.top_k}, chunk {args.chunk}, device {args.device}, {args.steps} timed steps; "
          f"student+teacher weights {r0['model_params_MB']:.0f} MB, AdamW state {r0['adam_state_MB']:.0f} MB, "
          f"RSS after loading {r0['baseline_rss_MB']:.0f} MB")
    mem_note = "above RSS after loading" if args.device == "cpu" else "max allocated"
    print(f"\n| path | sample s | score s | student fwd+bwd+step s | step s | peak MB sample | peak MB score "
          f"| peak MB student | process peak RSS MB |  ({mem_note})")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['s_sample']:.2f} | {r['s_score']:.2f} | {r['s_student']:.2f} | {r['s_step']:.2f} "
              f"| {r['peak_sample_MB']:.0f} | {r['peak_score_MB']:.0f} | {r['peak_student_MB']:.0f} "
              f"| {r['peak_rss_MB']:.0f} |")


if __name__ == "__main__":
    main()
