"""Helpers shared by the tests that drive the training loop through its command line."""

from __future__ import annotations

import json
from pathlib import Path


def loop_args(student: str, teacher: str, out: Path, **overrides) -> list[str]:
    """Command-line arguments of a 2-step run on tiny models (any flag can be overridden)."""
    values = dict(student=student, teacher=teacher, device="cpu", dtype="float32", steps=2, prompts_per_step=4,
                  num_generations=2, max_new_tokens=5, eval_prompts=3, eval_samples=2, pass_k=2, eval_every=0,
                  progress="false", lora="false", lr=1e-3, out_dir=str(out))
    values.update(overrides)
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def read_log(out: Path) -> list[dict]:
    """The rows of ``out/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
