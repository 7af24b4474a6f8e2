"""Does ``torch.compile`` speed up the loss over the vocabulary on the CPU? One chunk, timed three ways.

The chunk the full-vocabulary losses work on in ``bench_step.py``'s chunked path: (B, C, V) = (8, 8,
151,936) fp32 student logits and teacher log-probs. For each divergence (reverse KL, forward KL, JSD
β = 0.5) it times one forward + backward of the per-position values summed, in milliseconds (best of
``--repeats`` after warm-up), three ways:

    fused       divergences.divergence: the custom autograd function, gradient written out (the default)
    eager       divergences.reference: the plain formula under autograd (the readable reference)
    compiled    torch.compile(divergences.reference): inductor fuses the formula and its autograd backward

with the peak resident memory of each above the memory before it (RSS polled every 2 ms, every block over
128 kB its own mmap so that RSS follows what is allocated), and checks that the three gradients agree.
The first compiled call (compilation) is timed apart. Needs a
C++ compiler for inductor on the CPU; without one the script says so and exits with code 2.

    python benchmarks/compile_divergence.py
    python benchmarks/compile_divergence.py --threads 1 --json benchmarks/results/compile_divergence.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

KINDS = ("reverse", "forward", "jsd")


def _best_ms(fn, repeats: int, mem, label: str) -> tuple[float, float]:
    """Best milliseconds of ``repeats`` calls, and the peak MB above the RSS before them."""
    times = []
    base = mem.rss()
    mem.start(label)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    mem.stop()
    return min(times) * 1000, (mem.peaks[label] - base) / 2**20


def measure(vocab: int = 151_936, batch: int = 8, chunk: int = 8, repeats: int = 5, threads: int = 2,
            kinds=KINDS) -> dict:
    import torch

    from bench_step import PeakMemory
    from opd_mini import divergences

    mem = PeakMemory("cpu")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(batch, chunk, vocab, generator=gen) * 3).requires_grad_()
    logq = torch.log_softmax(torch.randn(batch, chunk, vocab, generator=gen) * 3, -1)
    mask = torch.ones(batch, chunk, dtype=torch.bool)
    mask[0, -1] = False
    compiled = torch.compile(divergences.reference, dynamic=False)
    rows = []
    for kind in kinds:
        def step(fn):
            z.grad = None
            fn(z, logq, mask, kind, 0.5).sum().backward()
            return z.grad.clone()

        g_fused = step(divergences.divergence)
        g_eager = step(divergences.reference)
        start = time.perf_counter()
        g_compiled = step(compiled)
        first_s = time.perf_counter() - start
        scale = g_eager.abs().max().item()
        row = {"kind": kind, "s_first_compiled_call": first_s,
               "max_rel_grad_diff_fused": (g_fused - g_eager).abs().max().item() / scale,
               "max_rel_grad_diff_compiled": (g_compiled - g_eager).abs().max().item() / scale}
        del g_fused, g_eager, g_compiled  # nothing but the inputs held while the peaks are measured
        for name, fn in (("fused", divergences.divergence), ("eager", divergences.reference), ("compiled", compiled)):
            row[f"ms_{name}"], row[f"MB_{name}"] = _best_ms(lambda: step(fn), repeats, mem, f"{kind}/{name}")
        rows.append(row)
        print(f"done: {kind}", file=sys.stderr)
    return {"settings": {"vocab": vocab, "batch": batch, "chunk": chunk, "repeats": repeats, "threads": threads,
                         "torch": torch.__version__}, "rows": rows}


def report(result: dict) -> str:
    a = result["settings"]
    lines = [f"(B, C, V) = ({a['batch']}, {a['chunk']}, {a['vocab']}), fp32, {a['threads']} threads, torch {a['torch']}; "
             f"forward + backward of one chunk, best of {a['repeats']}; peak MB above the RSS before the calls.", "",
             "| divergence | ms: fused / eager formula / compiled formula | **compiled / fused** "
             "| peak MB: fused / eager / compiled | first compiled call s | max grad diff vs eager (fused, compiled) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['ms_fused']:.0f} / {r['ms_eager']:.0f} / {r['ms_compiled']:.0f} "
                     f"| **{r['ms_compiled'] / r['ms_fused']:.2f}** "
                     f"| {r['MB_fused']:.0f} / {r['MB_eager']:.0f} / {r['MB_compiled']:.0f} "
                     f"| {r['s_first_compiled_call']:.1f} "
                     f"| {r['max_rel_grad_diff_fused']:.0e}, {r['max_rel_grad_diff_compiled']:.0e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=8, help="positions per chunk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072" and argv is None:  # exact peaks: rerun with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        print("error: torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH", file=sys.stderr)
        return 2
    result = measure(args.vocab, args.batch, args.chunk, args.repeats, args.threads)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
