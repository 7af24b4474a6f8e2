"""Where the time of one decode step goes at a big vocabulary, and what each sampler costs in all.

The workload of ``bench_step.py``: V = 151,936, a 2-layer hidden-64 Llama student (random init, no
download), batch 8, 128 prompt + 128 new tokens. Prints, in milliseconds per decode step (the mean of
``--repeats`` calls after one warm-up): the decoder on one new token with a KV cache, the output head,
and each candidate for turning (B, V) logits into a token and its log-prob; then the seconds of
``sampler.sample`` with each method and the second forward that ``method="generate"`` runs for the
behaviour log-probs.

    python benchmarks/profile_decode.py                    # 1 thread
    python benchmarks/profile_decode.py --threads 2 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def profile(vocab: int = 151_936, batch: int = 8, prompt_len: int = 128, new_tokens: int = 128,
            repeats: int = 20, threads: int = 1) -> dict[str, float]:
    """Milliseconds per decode-step op and seconds per ``sample`` call; returns them as a dict."""
    import random

    import torch
    from transformers import DynamicCache

    from bench_step import build_world
    from opd_mini import sampler
    from opd_mini.forward import sampled_token_logprobs

    torch.set_num_threads(threads)
    tokenizer, student, _ = build_world(vocab, "cpu")
    student.eval()
    rng = random.Random(0)
    prompts = [" ".join(f"t{rng.randrange(vocab - 2)}" for _ in range(prompt_len)) for _ in range(batch)]
    ids_BL = torch.randint(2, vocab, (batch, prompt_len + 1))
    mask_BL = torch.ones_like(ids_BL)
    logits_BV = torch.randn(batch, vocab)
    probs_BV = logits_BV.softmax(-1)
    hidden_B1H = torch.randn(batch, 1, student.config.hidden_size)
    out: dict[str, float] = {}
    with torch.no_grad():
        cache = DynamicCache(config=student.config)
        student.model(input_ids=ids_BL[:, :-1], attention_mask=mask_BL[:, :-1], past_key_values=cache, use_cache=True)

        def decoder_step():  # one new token against a 128-token cache (the cache is cropped back after)
            student.model(input_ids=ids_BL[:, -1:], attention_mask=mask_BL, past_key_values=cache, use_cache=True)
            cache.crop(-1)

        out["decoder, 1 token with KV cache"] = _ms(decoder_step, repeats)
        out["output head (B x H) @ (H x V)"] = _ms(lambda: student.lm_head(hidden_B1H), repeats)
        out["softmax"] = _ms(lambda: logits_BV.softmax(-1), repeats)
        out["torch.multinomial (generate's draw)"] = _ms(lambda: torch.multinomial(probs_BV, 1), repeats)
        out["  of which exponential_ noise"] = _ms(lambda: torch.empty_like(probs_BV).exponential_(), repeats)
        out["Gumbel-max (rand, log, log, argmax)"] = _ms(
            lambda: (logits_BV - torch.rand_like(logits_BV).log_().neg_().log_()).argmax(-1), repeats)
        out["logsumexp"] = _ms(lambda: logits_BV.logsumexp(-1, keepdim=True), repeats)
        out["inverse_cdf_sample (f64 cumsum + searchsorted)"] = _ms(lambda: sampler.inverse_cdf_sample(probs_BV), repeats)
        out["decode's draw + log-prob, unfiltered"] = _ms(lambda: sampler.inverse_cdf_sample(
            (logits_BV - logits_BV.logsumexp(-1, keepdim=True)).exp_()), repeats)
        out["filter_logits(top_k=20)"] = _ms(lambda: sampler.filter_logits(logits_BV, 1.0, 20, 1.0), repeats)
        from transformers.generation.logits_process import TopPLogitsWarper

        warper = TopPLogitsWarper(0.9)
        # the random-init model's logits are nearly flat: no row's nucleus fits in the candidates (the worst case);
        # a trained model's are peaked: here 20 tokens 12 nats above the rest hold 99.9 % of the mass
        peaked_BV = logits_BV.clone()
        peaked_BV[:, :20] += 12.0
        for name, scores in (("flat logits", logits_BV), ("peaked logits", peaked_BV)):
            out[f"filter_logits(top_p=0.9), {name} (nucleus)"] = _ms(
                lambda: sampler.filter_logits(scores, 1.0, 0, 0.9), max(2, repeats // 5))
            out[f"generate's TopPLogitsWarper(0.9), {name} (a sort of V)"] = _ms(lambda: warper(None, scores.clone()),
                                                                                max(2, repeats // 5))

    def timed(**kwargs):
        start = time.perf_counter()
        r = sampler.sample(student, tokenizer, prompts, max_new_tokens=new_tokens, seed=0, use_chat_template=False,
                           **kwargs)
        return r, time.perf_counter() - start

    timed(method="decode")  # warm-up
    r, out["sample s: generate + forward (reference)"] = timed(method="generate")
    start = time.perf_counter()
    sampled_token_logprobs(student, r, vocab_size=vocab)
    out["  of which the behaviour-log-prob forward s"] = time.perf_counter() - start
    _, out["sample s: decode, log-probs recorded"] = timed(method="decode")
    _, out["sample s: decode + forward (exact log-probs)"] = timed(method="decode", behaviour_logp="forward")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the figures to this JSON file (BENCHMARKS.md's table is "
                   "generated from benchmarks/results/profile_decode.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = profile(args.vocab, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.threads)
    result = {"settings": {k: getattr(args, k) for k in ("vocab", "batch", "prompt_len", "new_tokens", "repeats",
                                                          "threads")}, "timings": res}
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def report(result: dict) -> str:
    """The printed table, as BENCHMARKS.md shows it (generated from the JSON)."""
    a = result["settings"]
    lines = [f"V={a['vocab']}, batch {a['batch']}, {a['prompt_len']} prompt + {a['new_tokens']} new tokens, "
             f"{a['threads']} thread(s)", "", "| op | time |", "|---|---|"]
    for name, value in result["timings"].items():
        unit = "s" if name.startswith(("sample s", "  of which the")) else "ms"
        lines.append(f"| {name} | {value:.{2 if unit == 's' else 1}f} {unit} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
