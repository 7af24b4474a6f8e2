"""The glossary of every key a run writes to ``metrics.jsonl``: the loop's own, the losses' and the evaluation's.

Each key is documented once, where it is computed (:data:`TRAIN_METRIC_DOCS` here, ``losses.METRIC_DOCS``,
``eval.EVAL_METRIC_DOCS``); :data:`METRIC_DOCS` merges them, and ``docs/metrics.md`` is generated from it
(:func:`metrics_glossary`), with a test that keeps the two equal.
"""

from __future__ import annotations

from opd_mini import losses
from opd_mini.eval import EVAL_METRIC_DOCS

#: What each key the loop itself logs means (the losses' keys are in losses.METRIC_DOCS).
TRAIN_METRIC_DOCS: dict[str, str] = {
    "step": "optimizer steps completed (0 = before training, evaluation only)",
    "optim/lr": "learning rate used for this step",
    "optim/grad_norm": "global gradient norm before clipping",
    "rollout/num_tokens": "masked-in completion tokens of the step (the loss normaliser N)",
    "rollout/completion_len": "mean completion length in tokens (EOS included) of the step's rollouts",
    "rollout/truncated_frac": "fraction of the step's rollouts cut at max_new_tokens without an EOS (TRL's "
    "completions/clipped_ratio; with --prefix_fraction, cut at the prefix)",
    "rollout/slipped_frac": "with --slip_prob: fraction of the emitted tokens of the step's rollouts that the "
    "environment swapped (left out of the loss)",
    "time/sample": "seconds spent generating rollouts this step",
    "rollout/on_policy": "with --lmbda below 1: 1 when this step trained on the student's own samples, 0 when the "
    "teacher sampled it",
    "time/score": "seconds spent scoring the rollouts with the teacher this step",
    "time/train": "seconds of student forward + backward + optimizer step this step",
    "time/step": "wall seconds of the whole step (evaluation and checkpoint excluded)",
    "time/train_total": "cumulative seconds of training steps so far (what max_time_s limits)",
    "time/eval": "seconds spent evaluating at this step",
    "memory/peak_allocated_GB": "on a CUDA device: the largest memory allocated by tensors during this step (sampling, "
    "scoring, forward, backward, optimizer; evaluation excluded), in GiB",
    "memory/peak_reserved_GB": "on a CUDA device: the largest memory the caching allocator held during this step, GiB",
    "memory/eval_peak_allocated_GB": "on a CUDA device: the largest memory allocated during this step's evaluation, GiB",
    "memory/eval_peak_reserved_GB": "on a CUDA device: the largest memory the allocator held during the evaluation, GiB",
}

#: Evaluation keys also reported per task of a mixture, as ``KEY/TASK`` (e.g. ``eval/pass@1/reverse:5``).
PER_TASK_EVAL_KEYS = ("eval/pass@1", "eval/pass@k", "eval/kl_reverse", "eval/kl_forward")
TRAIN_METRIC_DOCS.update({
    "reward/mean/TASK": "a mixture of tasks (--task A+B): mean reward of this step's rollouts of the task TASK, over "
    "every process",
    **{f"{k}/TASK": f"a mixture of tasks: {k} of the task TASK alone ({k} itself is the mean over the tasks)"
       for k in PER_TASK_EVAL_KEYS}})

#: The glossary of every key that can appear in metrics.jsonl.
METRIC_DOCS: dict[str, str] = {**TRAIN_METRIC_DOCS, **losses.METRIC_DOCS, **EVAL_METRIC_DOCS}


def metrics_glossary() -> str:
    """METRIC_DOCS as a Markdown table (docs/metrics.md is generated from this)."""
    rows = [f"| `{key}` | {text} |" for key, text in sorted(METRIC_DOCS.items())]
    return "\n".join(["| key | meaning |", "|---|---|", *rows])


def cuda_memory(device, prefix: str = "memory/") -> dict[str, float]:
    """On a CUDA device: the peak allocated and reserved memory since the last call (GiB), then the peaks are
    reset; elsewhere nothing."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return {}
    out = {f"{prefix}peak_allocated_GB": torch.cuda.max_memory_allocated(device) / 2**30,
           f"{prefix}peak_reserved_GB": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out
