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
from opd_mini.batch import Batch
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
    "eval/kl_forbidden_share": "held-out prompts: share of the reverse-KL estimate Σ_t r_t (r_t = log π_θ(y_t) − log "
    "q(y_t), the student's samples) that comes from tokens the teacher all but forbids, log q(y_t) < −10 (0 when "
    "Σ r_t <= 0): how much of the loss is zero-forcing",
    "eval/kl_to_init": "held-out prompts of the trained task: per-token KL(π₀ ‖ π_θ) on π₀'s own samples, π₀ = the LoRA "
    "student's base (adapter disabled) (with --eval_kl_to_init): how far training moved the model on the new task",
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


#: Rows of the samples table an evaluation hands a tracker (``samples_out``).
SAMPLE_ROWS = 8
#: A token the teacher gives log q below this is one it all but forbids (``eval/kl_forbidden_share``).
FORBIDDEN_LOGQ = -10.0


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
    samples_out: list | None = None,
) -> dict[str, float]:
    """Sample ``num_samples`` completions for each of ``num_prompts`` held-out prompts and score them.

    ``score_teacher(batch) -> Batch`` (the batch with ``teacher_logp_BT``) adds ``eval/kl_reverse``;
    ``sample_teacher(prompts, num_generations, seed) -> Batch`` (the teacher's own samples, their
    ``behaviour_logp_BT`` its log-probs) adds ``eval/kl_forward``; ``retention_task`` adds
    ``eval/retention_pass@1``. ``sample_init`` (π₀'s samples, like ``sample_teacher``) adds ``eval/kl_to_init``,
    KL(π₀ ‖ π_θ) on the task's prompts, and with a retention task ``eval/retention_kl_to_init`` on its prompts. Sampling is seeded, so two evaluations of the
    same weights give the same numbers. The prompts come from the task's ``split`` (a file task's held-out
    part by default; at most its size). ``sampler_options`` (``method``, ``behaviour_logp``, ``slip``) go to
    :func:`opd_mini.sampler.sample` (the retention task's draws never slip: slips belong to the trained task). Returns a dict of floats keyed as in :data:`EVAL_METRIC_DOCS`;
    ``samples_out``, a list, gets the first few samples (prompt, completion, reward, per-token reverse KL to the
    teacher when scored) for a tracker's table.
    """
    examples = held_out_examples(task, num_prompts, seed, split)
    num_prompts = len(examples)
    rollouts = sample_in_groups(model, tokenizer, [e.prompt for e in examples], num_generations=num_samples,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                use_chat_template=use_chat_template, seed=held_out_seed(seed), **(sampler_options or {}))
    rewards_B = torch.tensor(task.rewards(rollouts.completions, [examples[i] for i in rollouts.prompt_index_B.tolist()]))
    correct_per_prompt = rewards_B.view(num_prompts, num_samples).sum(1)
    mask_BT = rollouts.mask_BT
    lengths_B = mask_BT.sum(1)
    out = {
        f"{prefix}pass@1": sum(pass_at_k(num_samples, int(c), 1) for c in correct_per_prompt) / num_prompts,
        f"{prefix}pass@k": sum(pass_at_k(num_samples, int(c), k) for c in correct_per_prompt) / num_prompts,
        f"{prefix}completion_len": lengths_B.float().mean().item(),
        f"{prefix}eos_frac": _ended_with_eos(rollouts, tokenizer).float().mean().item(),
    }
    if score_teacher is not None:
        scored = score_teacher(rollouts)  # the teacher's fields on the rollouts' device
        teacher_logp_BT = scored.teacher_logp_BT.float()
        r_BT = rollouts.behaviour_logp_BT.float().to(teacher_logp_BT.device) - teacher_logp_BT
        out[f"{prefix}kl_reverse"] = masked_mean(r_BT, mask_BT)
        out[f"{prefix}kl_forbidden_share"] = forbidden_share(r_BT, teacher_logp_BT, mask_BT.to(r_BT.device))
    if samples_out is not None:
        kl_B = ((r_BT * mask_BT.to(r_BT.device)).sum(1).cpu() / lengths_B.clamp(min=1)
                if score_teacher is not None else None)
        for b in range(min(SAMPLE_ROWS, len(rollouts.completions))):
            samples_out.append({"prompt": examples[int(rollouts.prompt_index_B[b])].prompt,
                                "completion": rollouts.completions[b], "reward": float(rewards_B[b]),
                                "kl_per_token": None if kl_B is None else float(kl_B[b])})
    if sample_teacher is not None:
        out[f"{prefix}kl_forward"] = kl_on_own_samples(model, sample_teacher, [e.prompt for e in examples], num_samples,
                                                       held_out_seed(seed) + 1)
    if sample_init is not None:  # KL(π₀ ‖ π_θ) on the trained task's prompts (RL's Razor's quantity)
        out[f"{prefix}kl_to_init"] = kl_on_own_samples(model, sample_init, [e.prompt for e in examples], num_samples,
                                                       held_out_seed(seed) + 2)
    if retention_task is not None:
        retained = evaluate(model, tokenizer, retention_task, num_prompts=num_prompts, num_samples=num_samples, k=1,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            use_chat_template=use_chat_template, prefix="retention/", split="all",
                            sample_teacher=sample_init, sampler_options={**(sampler_options or {}), "slip": None})
        out[f"{prefix}retention_pass@1"] = retained["retention/pass@1"]
        if sample_init is not None:
            out[f"{prefix}retention_kl_to_init"] = retained["retention/kl_forward"]
    return out


def kl_on_own_samples(model, sample_other: Callable, prompts: list[str], num_samples: int, seed: int) -> float:
    """Per-token KL(ρ ‖ π_θ) = mean_t log ρ(y_t) − log π_θ(y_t) on ρ's own samples (``sample_other(prompts, n, seed)``,
    a batch whose ``behaviour_logp_BT`` are ρ's log-probs)."""
    other = sample_other(prompts, num_samples, seed)
    student_logp_BT = forward.sampled_token_logprobs(model, other).float()
    return masked_mean(other.behaviour_logp_BT.float().to(student_logp_BT.device) - student_logp_BT, other.mask_BT)


def forbidden_share(r_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Σ r_t over the masked tokens with log q(y_t) < :data:`FORBIDDEN_LOGQ`, over Σ r_t (0 when Σ r_t <= 0)."""
    total = float(r_BT[mask_BT].sum())
    if total <= 0:
        return 0.0
    return float(r_BT[mask_BT & (teacher_logp_BT < FORBIDDEN_LOGQ)].sum()) / total


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Σ mask · x / Σ mask (0 for an empty mask), computed on ``x_BT``'s device."""
    mask_BT = mask_BT.to(x_BT.device)
    return float(x_BT.float()[mask_BT].sum() / mask_BT.sum().clamp(min=1))


#: Most logits elements one decoding step of evaluation holds (rows × V): 2^24, 64 MB in fp32. Larger
#: evaluations are sampled in groups of prompts, each with its own seed.
EVAL_STEP_ELEMENTS = 2 ** 24


def sample_in_groups(model, tokenizer, prompts: list[str], *, num_generations: int, seed: int, **kwargs) -> Batch:
    """:func:`opd_mini.sampler.sample` over ``prompts``, in groups small enough that one decoding step's
    (rows, V) logits stay within :data:`EVAL_STEP_ELEMENTS` (one group, the plain call, whenever it fits:
    every tiny-world evaluation). Group g is seeded ``seed + g``; the rows come back in prompt order."""
    V = len(tokenizer)
    per_group = max(1, EVAL_STEP_ELEMENTS // max(1, num_generations * V))
    if len(prompts) <= per_group:
        return sampler.sample(model, tokenizer, prompts, num_generations=num_generations, seed=seed, **kwargs)
    parts = [sampler.sample(model, tokenizer, prompts[i:i + per_group], num_generations=num_generations, seed=seed + g,
                            **kwargs) for g, i in enumerate(range(0, len(prompts), per_group))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return concat_batches(parts, list(range(0, len(prompts), per_group)), pad_id)


def concat_batches(parts: list[Batch], offsets: list[int], pad_id: int) -> Batch:
    """Batches of consecutive prompt groups as one (prompt group g starts at prompt ``offsets[g]``): prompts are
    left-padded and completions right-padded to the longest; masks and log-probs follow."""
    P = max(b.prompt_len for b in parts)
    T = max(b.tokens_BT.shape[1] for b in parts)

    def pad(x: torch.Tensor, left: int, right: int, value=0) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    cols = {"input_ids_BL": [], "attention_mask_BL": [], "tokens_BT": [], "mask_BT": [], "behaviour_logp_BT": []}
    for b in parts:
        left, right = P - b.prompt_len, T - b.tokens_BT.shape[1]
        prompt, completion = b.input_ids_BL[:, :b.prompt_len], b.input_ids_BL[:, b.prompt_len:]
        cols["input_ids_BL"].append(torch.cat([pad(prompt, left, 0, pad_id), pad(completion, 0, right, pad_id)], 1))
        cols["attention_mask_BL"].append(torch.cat([pad(b.attention_mask_BL[:, :b.prompt_len], left, 0),
                                                    pad(b.attention_mask_BL[:, b.prompt_len:], 0, right)], 1))
        cols["tokens_BT"].append(pad(b.tokens_BT, 0, right, pad_id))
        cols["mask_BT"].append(pad(b.mask_BT, 0, right, False))
        cols["behaviour_logp_BT"].append(pad(b.behaviour_logp_BT, 0, right))
    return Batch(**{k: torch.cat(v) for k, v in cols.items()}, prompt_len=P,
                 prompt_index_B=torch.cat([b.prompt_index_B + o for b, o in zip(parts, offsets)]),
                 completions=[c for b in parts for c in b.completions],
                 prompt_texts=[t for b in parts for t in b.prompt_texts])


def _ended_with_eos(rollouts: Batch, tokenizer) -> torch.Tensor:
    """(B,) bool: the completion's last kept token is EOS (it stopped by itself, not by max_new_tokens)."""
    lengths_B = rollouts.mask_BT.sum(1)
    last_B = rollouts.tokens_BT.gather(1, (lengths_B - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lengths_B > 0) & (last_B == tokenizer.eos_token_id)


@contextlib.contextmanager
def adapter_disabled(model, enabled: bool = True):
    """``with adapter_disabled(peft_model):`` runs the base model (self-distillation's teacher)."""
    if enabled:
        with model.disable_adapter():
            yield
    else:
        yield
