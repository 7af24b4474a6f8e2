"""Evaluation on held-out prompts: pass@1 / pass@k by the task's verifier, reverse KL to the teacher,
and a retention task (a second task that is never trained, to measure forgetting).

pass@k uses the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", Eq. 1): with n samples per prompt of which c are correct,

    pass@k = E_prompts[ 1 − C(n − c, k) / C(n, k) ]

so pass@1 = c / n averaged over prompts. The per-token reverse KL to the teacher is the on-policy
sampled estimate

    kl = Σ_{b,t} mask · (log π_θ(y_t|c_t) − log q(y_t|c_t)) / Σ mask,    y ~ π_θ

whose expectation is the sequence-level KL(π_θ ‖ q) divided by the expected number of tokens (exact in
expectation at temperature 1; at other temperatures the samples come from the tempered student).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from opd_mini import forward, sampler
from opd_mini.tasks import Task

#: What each key returned by :func:`evaluate` means (merged into the training loop's glossary).
EVAL_METRIC_DOCS: dict[str, str] = {
    "eval/pass@1": "held-out prompts: fraction of samples the task's verifier accepts (unbiased pass@1, "
    "mean over prompts of c/n)",
    "eval/pass@k": "held-out prompts: unbiased pass@k (k = config.pass_k) from n = config.eval_samples "
    "samples per prompt (Chen et al. 2021)",
    "eval/kl_reverse": "held-out prompts: per-token reverse KL to the teacher, sampled estimate "
    "mean_t log π_θ(y_t) − log q(y_t) on the student's own samples",
    "eval/completion_len": "held-out prompts: mean completion length in tokens (EOS included)",
    "eval/eos_frac": "held-out prompts: fraction of samples that ended with EOS before max_new_tokens",
    "eval/kl_forward": "held-out prompts: per-token forward KL(teacher ‖ student) on the teacher's own samples, "
    "mean_t log q(y_t) − log π_θ(y_t), y ~ q (with --eval_kl_forward; KL(π₀ ‖ π_θ) when the teacher is the "
    "student's own base)",
    "eval/retention_pass@1": "retention task (never trained): pass@1 of the student, to measure forgetting",
    "eval/retention_kl_to_init": "retention task: per-token KL(π₀ ‖ π_θ) on π₀'s own samples of its prompts, π₀ = the "
    "LoRA student's base (adapter disabled) (with --eval_kl_to_init)",
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples of which c are correct: 1 − C(n−c, k)/C(n, k)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # the product form avoids huge binomials: C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def held_out_seed(seed: int) -> int:
    """Seed of the held-out prompts: far from the training prompts' seeds (which count steps)."""
    return 1_000_003 + seed


def held_out_examples(task: Task, num_prompts: int, seed: int, split: str = "eval") -> list:
    """The evaluation prompts :func:`evaluate` uses: ``num_prompts`` examples of ``split`` (capped at the
    split's size for a file task), drawn with :func:`held_out_seed`."""
    size = task.split_size(split)
    if size == 0:
        raise ValueError(f"task {task.name!r} has {task.split_size('all')} example(s), too few to hold any out for "
                         "evaluation: give a larger file, or a separate evaluation file with --eval_task jsonl:PATH")
    return task.examples(num_prompts if size is None else min(num_prompts, size), seed=held_out_seed(seed),
                         split=split)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: Task,
    *,
    num_prompts: int,
    num_samples: int,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    use_chat_template: bool | str = "auto",
    score_teacher: Callable | None = None,
    sample_teacher: Callable | None = None,
    retention_task: Task | None = None,
    sample_init: Callable | None = None,
    prefix: str = "eval/",
    split: str = "eval",
    sampler_options: dict | None = None,
) -> dict[str, float]:
    """Sample ``num_samples`` completions for each of ``num_prompts`` held-out prompts and score them.

    ``score_teacher(rollouts) -> TeacherSignal`` (sampled log-probs only) adds ``eval/kl_reverse``;
    ``sample_teacher(prompts, num_generations, seed) -> Rollouts`` (the teacher's own samples, their
    ``behaviour_logp`` its log-probs) adds ``eval/kl_forward``; ``retention_task`` adds
    ``eval/retention_pass@1``, and with ``sample_init`` (π₀'s samples, like ``sample_teacher``) also
    ``eval/retention_kl_to_init``, KL(π₀ ‖ π_θ) on the retention prompts. Sampling is seeded, so two evaluations of the
    same weights give the same numbers. The prompts come from the task's ``split`` (a file task's held-out
    part by default; at most its size). ``sampler_options`` (``method``, ``behaviour_logp``) go to
    :func:`opd_mini.sampler.sample`. Returns a dict of floats keyed as in :data:`EVAL_METRIC_DOCS`.
    """
    examples = held_out_examples(task, num_prompts, seed, split)
    num_prompts = len(examples)
    rollouts = sampler.sample(model, tokenizer, [e.prompt for e in examples], num_generations=num_samples,
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              use_chat_template=use_chat_template, seed=held_out_seed(seed), **(sampler_options or {}))
    rewards_B = torch.tensor(task.rewards(rollouts.completions, [examples[i] for i in rollouts.prompt_index.tolist()]))
    correct_per_prompt = rewards_B.view(num_prompts, num_samples).sum(1)
    mask_BT = rollouts.completion_mask
    lengths_B = mask_BT.sum(1)
    out = {
        f"{prefix}pass@1": sum(pass_at_k(num_samples, int(c), 1) for c in correct_per_prompt) / num_prompts,
        f"{prefix}pass@k": sum(pass_at_k(num_samples, int(c), k) for c in correct_per_prompt) / num_prompts,
        f"{prefix}completion_len": lengths_B.float().mean().item(),
        f"{prefix}eos_frac": _ended_with_eos(rollouts, tokenizer).float().mean().item(),
    }
    if score_teacher is not None:
        signal = score_teacher(rollouts)
        log_ratio_BT = rollouts.behaviour_logp - signal.sampled_logp.float().cpu()
        out[f"{prefix}kl_reverse"] = (log_ratio_BT[mask_BT].sum() / mask_BT.sum().clamp(min=1)).item()
    if sample_teacher is not None:
        teacher_r = sample_teacher([e.prompt for e in examples], num_samples, held_out_seed(seed) + 1)
        student_logp_BT = forward.sampled_token_logprobs(model, teacher_r).float().cpu()
        mask_BT = teacher_r.completion_mask
        log_ratio_BT = teacher_r.behaviour_logp.float().cpu() - student_logp_BT
        out[f"{prefix}kl_forward"] = (log_ratio_BT[mask_BT].sum() / mask_BT.sum().clamp(min=1)).item()
    if retention_task is not None:
        retained = evaluate(model, tokenizer, retention_task, num_prompts=num_prompts, num_samples=num_samples, k=1,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            use_chat_template=use_chat_template, prefix="retention/", split="all",
                            sample_teacher=sample_init, sampler_options=sampler_options)
        out[f"{prefix}retention_pass@1"] = retained["retention/pass@1"]
        if sample_init is not None:
            out[f"{prefix}retention_kl_to_init"] = retained["retention/kl_forward"]
    return out


def _ended_with_eos(rollouts: sampler.Rollouts, tokenizer) -> torch.Tensor:
    """(B,) bool: the completion's last kept token is EOS (it stopped by itself, not by max_new_tokens)."""
    lengths_B = rollouts.completion_mask.sum(1)
    last_B = rollouts.completion_ids.gather(1, (lengths_B - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lengths_B > 0) & (last_B == tokenizer.eos_token_id)


@contextlib.contextmanager
def adapter_disabled(model, enabled: bool = True):
    """``with adapter_disabled(peft_model):`` runs the base model (self-distillation's teacher)."""
    if enabled:
        with model.disable_adapter():
            yield
    else:
        yield
