"""opd_mini's on-policy distillation step side by side with TRL's ``DistillationTrainer``.

The workload of ``bench_step.py`` (V = 151,936, a 2-layer hidden-64 Llama student and teacher, random
init, batch 8, 128 prompt + 128 new tokens, fully on-policy, AdamW on all student weights, fp32 on the
CPU). Each run is a subprocess of its own, so each peak is its own:

    opd_mini  bench_step.py's "chunked" path (what train.py runs with --loss_chunk_size C
              --teacher_chunk_size C) for each loss, with the sampler of --sampler
    TRL       DistillationTrainer with the generalized JSD of the matching β (reverse KL β = 1, forward KL
              β = 0, JSD β = 0.5; the sampled-token and top-K losses, which TRL does not have, are set
              against its reverse KL), its own generate, no gradient checkpointing, fp32, no vLLM

and prints one table of seconds per step, peak memory and the ratios opd_mini / TRL, then the compute
floor: the output-head matrix products a step cannot avoid (one (B·H)·(H·V) product per decoded token,
and four (B·T·H)·(H·V) products: the teacher's forward, the student's forward and its two backward
products), timed on this machine at their own shapes. It needs ``trl`` (an optional extra, never a
requirement: ``pip install trl``); without it the script says so and exits with code 2.

    python benchmarks/vs_trl.py --steps 2
    python benchmarks/vs_trl.py --losses reverse_kl_full,jsd --steps 2 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: TRL's generalized-JSD β set against each opd_mini loss.
TRL_BETA = {"reverse_kl_sampled": 1.0, "reverse_kl_topk": 1.0, "reverse_kl_full": 1.0, "forward_kl": 0.0, "jsd": 0.5}
DEFAULT_LOSSES = ",".join(TRL_BETA)
#: The losses that compute a full-vocabulary divergence (the ones --divergence_backend changes).
FULL_LOSSES = ("reverse_kl_full", "forward_kl", "jsd")


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


class PromptDataset:
    """A map-style dataset of ``{"prompt": text}`` rows (a plain list: no ``datasets`` hashing needed)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}


def trl_worker(args) -> dict:
    """TRL's DistillationTrainer for ``args.steps`` timed steps after one warm-up step; its figures."""
    import random
    import tempfile

    import torch
    from transformers import TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DistillationConfig, DistillationTrainer

    from bench_step import PeakMemory, build_world

    torch.set_num_threads(args.threads)
    tokenizer, student, teacher = build_world(args.vocab, "cpu")
    rng = random.Random(0)
    prompts = [" ".join(f"t{rng.randrange(args.vocab - 2)}" for _ in range(args.prompt_len)) for _ in range(args.batch)]
    dataset = PromptDataset(prompts * (args.steps + 1))
    mem = PeakMemory("cpu")
    baseline = mem.rss()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, *a, **k):
            mem.start("step")
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.t0)
            mem.stop()

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DistillationConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant", beta=args.trl_beta,
            max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, logging_steps=10_000, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_pin_memory=False, seed=0)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    timed = timer.seconds[1:]
    return {"s_step": sum(timed) / len(timed), "peak_step_MB": (mem.peaks["step"] - baseline) / 2**20,
            "baseline_rss_MB": baseline / 2**20,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compute_floor(vocab: int, batch: int, new_tokens: int, hidden: int, threads: int, repeats: int = 3) -> dict:
    """Seconds of the output-head products one step cannot avoid, timed here (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    W_VH = torch.randn(vocab, hidden) * 0.02

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    h_BH = torch.randn(batch, hidden)
    rows = batch * new_tokens
    chunk = min(rows, max(1, 2**22 // vocab))  # a 16 MB (rows, V) block at a time, as the chunked paths do
    h_NH = torch.randn(rows, hidden)
    g_CV = torch.randn(chunk, vocab)
    starts = range(0, rows, chunk)
    t_decode = best(lambda: h_BH @ W_VH.T)
    t_fwd = best(lambda: [h_NH[i:i + chunk] @ W_VH.T for i in starts])
    t_bwd = best(lambda: [(g_CV[:len(h)] @ W_VH, g_CV[:len(h)].T @ h) for h in (h_NH[i:i + chunk] for i in starts)])
    sample_s = new_tokens * t_decode
    floor = sample_s + 2 * t_fwd + t_bwd
    flops = 2 * rows * hidden * vocab
    return {"s_floor": floor, "s_sample_floor": sample_s, "s_projection": t_fwd,
            "gflops_projection": flops / t_fwd / 1e9, "gflop_step": 5 * flops / 1e9}


def _run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ratio_table(rows: list[dict], trl: dict[float, dict], floor: dict) -> str:
    """The printed Markdown table (one row per opd_mini loss, with TRL's matching β)."""
    lines = ["| loss | TRL β | opd_mini step s (sample + score + student) | TRL step s | **step ratio** "
             "| opd_mini peak MB | TRL peak MB | **peak ratio** | opd_mini process RSS MB | TRL process RSS MB "
             "| step s / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = trl[r["beta"]]
        ours_peak = max(r["peak_sample_MB"], r["peak_score_MB"], r["peak_student_MB"])
        phases = f" ({r['s_sample']:.1f} + {r['s_score']:.1f} + {r['s_student']:.1f})" if "s_sample" in r else ""
        label = r["loss"] + (f" ({r['divergence_backend']})" if r.get("divergence_backend", "fused") != "fused" else "")
        lines.append(f"| {label} | {r['beta']:g} | {r['s_step']:.2f}{phases} | {t['s_step']:.2f} "
                     f"| **{r['s_step'] / t['s_step']:.2f}** | {ours_peak:.0f} | {t['peak_step_MB']:.0f} "
                     f"| **{ours_peak / t['peak_step_MB']:.2f}** | {r['peak_rss_MB']:.0f} | {t['peak_rss_MB']:.0f} "
                     f"| {r['s_step'] / floor['s_floor']:.1f} |")
    for beta, t in sorted(trl.items()):
        lines.append(f"| (TRL alone) | {beta:g} | | {t['s_step']:.2f} | | | {t['peak_step_MB']:.0f} | | "
                     f"| {t['peak_rss_MB']:.0f} | {t['s_step'] / floor['s_floor']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", default=DEFAULT_LOSSES, help=f"opd_mini losses, from {', '.join(TRL_BETA)}")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8, help="positions per chunk of opd_mini's teacher and loss")
    p.add_argument("--top_k", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampler", default="decode", choices=("generate", "decode"), help="opd_mini's sampler method")
    p.add_argument("--divergence_backends", default="fused",
                   help="how opd_mini's full-vocabulary losses compute (--divergence_backend of the loop): fused, "
                        "compiled, or both (fused,compiled: a row per backend for reverse_kl_full, forward_kl and jsd)")
    p.add_argument("--plain_malloc", action="store_true",
                   help="leave glibc's malloc settings alone: the times of a normal run (by default every block "
                        "over 128 kB is mmap'd so that RSS tracks what is allocated, which makes the peaks exact "
                        "but costs page faults on every big temporary: sampling ~2x slower)")
    p.add_argument("--json", default="", help="also write every figure to this JSON file (BENCHMARKS.md's table is "
                   "generated from benchmarks/results/vs_trl.json)")
    p.add_argument("--trl_beta", type=float, help=argparse.SUPPRESS)  # set in a TRL worker subprocess
    args = p.parse_args(argv)
    if args.trl_beta is not None:
        print("RESULT " + json.dumps(trl_worker(args)))
        return 0
    losses = [x for x in args.losses.split(",") if x]
    unknown = [x for x in losses if x not in TRL_BETA]
    if unknown or not losses:
        p.error(f"--losses must name losses from {', '.join(TRL_BETA)}; got {args.losses!r}")
    backends = [x for x in args.divergence_backends.split(",") if x]
    if not backends or any(b not in ("fused", "compiled") for b in backends):
        p.error(f"--divergence_backends must name fused and/or compiled; got {args.divergence_backends!r}")
    if not trl_available():
        print("error: trl is not installed; this comparison needs it: pip install trl (an optional extra of "
              "opd_mini, not in requirements.txt)", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if not args.plain_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    common = ["--vocab", str(args.vocab), "--batch", str(args.batch), "--prompt_len", str(args.prompt_len),
              "--new_tokens", str(args.new_tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
    rows = []
    for backend in backends:
        for loss in losses:
            if backend != "fused" and loss not in FULL_LOSSES:
                continue  # no full-vocabulary divergence to compute another way
            r = _run([sys.executable, os.path.join(HERE, "bench_step.py"), *common, "--loss", loss, "--chunk",
                      str(args.chunk), "--top_k", str(args.top_k), "--sampler", args.sampler, "--divergence_backend",
                      backend, "--path", "chunked"], env)
            rows.append({**r, "loss": loss, "beta": TRL_BETA[loss], "divergence_backend": backend})
            print(f"done: opd_mini {loss} ({backend})", file=sys.stderr)
    trl = {}
    for beta in sorted({TRL_BETA[x] for x in losses}):
        trl[beta] = _run([sys.executable, os.path.abspath(__file__), *common, "--trl_beta", str(beta)], env)
        print(f"done: TRL beta={beta:g}", file=sys.stderr)
    from bench_step import build_world  # noqa: F401  (the same shapes)
    from opd_mini.tiny import tiny_config

    floor = compute_floor(args.vocab, args.batch, args.new_tokens, tiny_config("bench").hidden_size, args.threads)
    import trl as trl_module

    result = {"settings": {k: getattr(args, k) for k in ("vocab", "batch", "prompt_len", "new_tokens", "chunk", "top_k",
                                                          "steps", "threads", "sampler", "plain_malloc",
                                                          "divergence_backends")},
              "trl_version": trl_module.__version__, "cpus": os.cpu_count(), "opd_mini": rows,
              "trl": {str(k): v for k, v in trl.items()}, "floor": floor}
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def report(result: dict) -> str:
    """The table and the compute floor, as printed and as BENCHMARKS.md shows them (generated from the JSON)."""
    a, floor = result["settings"], result["floor"]
    head = (f"V={a['vocab']}, batch {a['batch']}, {a['prompt_len']} prompt + {a['new_tokens']} new tokens, "
            f"{a['threads']} threads, {a['steps']} timed steps per run; opd_mini chunk {a['chunk']}, top-K "
            f"{a['top_k']}, sampler {a['sampler']}, divergences {a.get('divergence_backends', 'fused')}; TRL "
            f"{result['trl_version']}; malloc "
            f"{'glibc defaults' if a['plain_malloc'] else 'mmap above 128 kB'}. Peaks: RSS above the RSS after "
            "loading (opd_mini: its largest phase).")
    tail = (f"Compute floor {floor['s_floor']:.2f} s per step: {floor['s_sample_floor']:.2f} s for the decode steps' "
            f"head products + 4 × {floor['s_projection']:.2f} s full projections ({floor['gflop_step']:.0f} GFLOP in "
            f"all; {floor['gflops_projection']:.0f} GFLOP/s measured for a full projection).")
    trl = {float(k): v for k, v in result["trl"].items()}
    return "\n\n".join([head, ratio_table(result["opd_mini"], trl, floor), tail, aims(result)])


#: The aims: every loss at most this fraction of TRL's step time and peak memory; the full reverse-KL step
#: within this multiple of the compute floor.
AIM_TIME, AIM_MEMORY, AIM_FLOOR = 0.5, 0.55, 1.6


def aims(result: dict) -> str:
    """One line per aim: how many losses meet it, and the measured ratios."""
    trl = {float(k): v for k, v in result["trl"].items()}
    rows = result["opd_mini"]
    def label(r):
        return r["loss"] + (f" ({r['divergence_backend']})" if r.get("divergence_backend", "fused") != "fused" else "")

    time_r = {label(r): r["s_step"] / trl[r["beta"]]["s_step"] for r in rows}
    mem_r = {label(r): max(r["peak_sample_MB"], r["peak_score_MB"], r["peak_student_MB"]) / trl[r["beta"]]["peak_step_MB"]
             for r in rows}

    def line(name, ratios, aim):
        met = [k for k, v in ratios.items() if v <= aim]
        worst = max(ratios, key=ratios.get)
        return (f"- {name} ≤ {aim}× TRL's: **{len(met)} of {len(ratios)} losses** (ratios "
                f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}; the furthest, {worst}, at {ratios[worst]:.2f}×)")

    out = ["Against the aims:", line("step time", time_r, AIM_TIME), line("peak memory", mem_r, AIM_MEMORY)]
    for full in (r for r in rows if r["loss"] == "reverse_kl_full"):
        ratio = full["s_step"] / result["floor"]["s_floor"]
        out.append(f"- the full reverse-KL step ({full.get('divergence_backend', 'fused')}) within {AIM_FLOOR}× of the "
                   f"compute floor: **{'met' if ratio <= AIM_FLOOR else 'not met'}** ({ratio:.1f}×)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
