"""The "student = teacher" self-test: every registered loss with the teacher equal to the student.

    python -m opd_mini.selftest                           # a table; exit code 1 if a check fails
    python -m opd_mini.selftest --loss_plugins my_loss.py # your registered losses too

Distillation's first debugging step ("student = teacher ⇒ loss ≈ 0") as a command. It builds a random
batch in which the teacher's logits are the student's and the behaviour log-probs are the student's own
(on-policy), then computes every registered loss at the default options. At π = q each distillation loss
must be 0 up to float rounding, and so must its gradient. The two baselines do not read the teacher and
have their own documented value: ``sft`` is the student's cross-entropy on the tokens (mean −log π(y_t)),
and ``grpo`` with the same reward in every row has zero advantages, so 0. A plugin loss that reads the
teacher is held to 0 as well.
"""

from __future__ import annotations

import argparse
import sys

import torch

from opd_mini import registry
from opd_mini.batch import Batch
from opd_mini.losses import token_logprobs

#: |value| and max |gradient| below this count as zero (float32 sums over a few hundred terms)
TOLERANCE = 1e-5


def batch_at_pi_equals_q(B: int = 4, T: int = 6, V: int = 50, top_k: int = 16, seed: int = 0):
    """(student logits, a Batch whose teacher is the student) for every signal at once."""
    g = torch.Generator().manual_seed(seed)
    z_BTV = torch.randn(B, T, V, generator=g) * 2
    tokens_BT = torch.distributions.Categorical(logits=z_BTV).sample()
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    mask_BT[0, -2:] = False  # a shorter completion
    full = Batch.from_teacher_logits(tokens_BT, z_BTV, signal="full", mask_BT=mask_BT, group_size=2,
                                     rewards_B=torch.ones(B), behaviour_logp_BT=token_logprobs(z_BTV, tokens_BT))
    topk = Batch.from_teacher_logits(tokens_BT, z_BTV, signal="topk", top_k=top_k, mask_BT=mask_BT)
    full.teacher_topk_ids_BTK, full.teacher_topk_logp_BTK = topk.teacher_topk_ids_BTK, topk.teacher_topk_logp_BTK
    return z_BTV, full


def expected(name: str, z_BTV: torch.Tensor, batch: Batch) -> tuple[float, str]:
    """The value a loss must take at π = q, and why."""
    if name == "sft":
        logp = token_logprobs(z_BTV, batch.tokens_BT)
        return float(-(logp[batch.mask_BT]).mean()), "the student's cross-entropy on the tokens"
    if name == "grpo":
        return 0.0, "equal rewards: zero advantages"
    return 0.0, "π = q"


def run(seed: int = 0, names: list[str] | None = None) -> list[dict]:
    """One row per registered loss (or per name of ``names``): its value, its largest gradient entry, what it
    must be, and the verdict. A loss that raises is a failing row that says why."""
    z_BTV, batch = batch_at_pi_equals_q(seed=seed)
    opts = registry.LossOptions()
    rows = []
    for name in names or list(registry.LOSS_REGISTRY):
        z = z_BTV.clone().requires_grad_()
        want, why = expected(name, z_BTV, batch)
        try:
            loss, _ = registry.compute_loss(name, z, batch, opts)
            loss.backward()
        except (ValueError, RuntimeError, TypeError) as e:
            rows.append({"loss": name, "value": float("nan"), "expected": want, "why": f"raised {e}".split("\n")[0],
                         "max_abs_grad": float("nan"), "ok": False})
            continue
        value = float(loss.detach()) + 0.0  # no "-0"
        grad = float(z.grad.abs().max())
        zero_grad = name == "sft" or grad < TOLERANCE  # SFT's gradient at π = q is zero only in expectation
        rows.append({"loss": name, "value": value, "expected": want, "why": why, "max_abs_grad": grad,
                     "ok": abs(value - want) < TOLERANCE and zero_grad})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss_plugins", default="", help="Python files or modules that register losses (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from opd_mini.cli import run_cli

    def go() -> int:
        if args.loss_plugins:
            registry.import_plugins(args.loss_plugins)
        rows = run(args.seed)
        print("| loss | value at π = q | must be | max |∂/∂z| | ok |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['loss']} | {r['value']:.3g} | {r['expected']:.3g} ({r['why']}) | {r['max_abs_grad']:.1e} "
                  f"| {'yes' if r['ok'] else 'NO'} |")
        failed = [r["loss"] for r in rows if not r["ok"]]
        print(f"{len(rows) - len(failed)} of {len(rows)} losses pass" + (f"; failing: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
