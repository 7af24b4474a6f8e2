"""What one policy's own samples show, for the experiments that measure recovery: pass@1 and per-token entropy, and
where its samples leave the teacher's path and whether they come back (:func:`deviations`)."""

from __future__ import annotations

import torch

#: A token the teacher gives less than this probability is a deviation from its path.
DEVIATION_P = 0.1
#: Teacher continuations from a deviation's prefix that decide whether it is recoverable.
RECOVERY_CONTINUATIONS = 4


@torch.no_grad()
def policy_stats(model, teacher, tokenizer, task, prompts_examples: list, *, max_new_tokens: int,
                 samples: int = 4, seed: int = 0) -> dict:
    """On ``samples`` temperature-1 samples per prompt of ``model``: pass@1, per-token entropy, and (when a
    ``teacher`` is given) :func:`deviations`."""
    from opd_mini.forward import completion_logits
    from opd_mini.sampler import sample

    prompts = [e.prompt for e in prompts_examples]
    r = sample(model, tokenizer, prompts, num_generations=samples, max_new_tokens=max_new_tokens, temperature=1.0,
               seed=seed, use_chat_template=False)
    paired = [prompts_examples[i] for i in r.prompt_index_B.tolist()]
    rewards = task.rewards(r.completions, paired)
    logp_BTV = torch.log_softmax(completion_logits(model, r).float(), dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    out = {"pass@1": sum(rewards) / len(rewards),
           "entropy": float(entropy_BT[r.mask_BT].mean())}
    if teacher is not None:
        out.update(deviations(r, rewards, paired, teacher, tokenizer, task, max_new_tokens=max_new_tokens, seed=seed))
    return out


@torch.no_grad()
def deviations(r, rewards: list[float], examples: list, teacher, tokenizer, task, *, max_new_tokens: int,
               seed: int) -> dict:
    """Recovery on the student's samples ``r``: a sample **deviates** where it first emits a token that the teacher
    gives probability < :data:`DEVIATION_P` (off the teacher's path); the deviation is **recoverable** when the teacher,
    continuing from the prefix that ends with that token, finishes it correctly in at least one of
    :data:`RECOVERY_CONTINUATIONS` samples (an end-of-sequence token ends the sample: not recoverable). Returns the
    share of samples that deviate, the share whose deviation is recoverable, and the student's own success on those:
    ``recovered``, the success after a recoverable deviation (None when there is none)."""
    from opd_mini.sampler import eos_token_ids, sample
    from opd_mini.teacher import score

    teacher_p_BT = score(teacher, r, vocab_size=len(tokenizer)).teacher_logp_BT.float().exp().cpu()
    off_BT = (teacher_p_BT < DEVIATION_P) & r.mask_BT.cpu()
    eos = set(eos_token_ids(teacher, tokenizer))
    first = {b: int(row.nonzero()[0]) for b, row in enumerate(off_BT) if row.any()}
    open_ = {b: t for b, t in first.items() if int(r.tokens_BT[b, t]) not in eos and t + 1 < max_new_tokens}
    recoverable = set()
    for t in sorted(set(open_.values())):  # one sampling call per prefix length
        rows = [b for b, tt in open_.items() if tt == t]
        heads = [tokenizer.decode(r.tokens_BT[b, :t + 1].tolist()) for b in rows]
        cont = sample(teacher, tokenizer, [examples[b].prompt + h for b, h in zip(rows, heads)],
                      num_generations=RECOVERY_CONTINUATIONS, max_new_tokens=max_new_tokens - t - 1, temperature=1.0,
                      seed=seed * 1_000 + t, use_chat_template=False)
        for k, c in enumerate(cont.completions):
            i = int(cont.prompt_index_B[k])
            if task.reward(heads[i] + c, examples[rows[i]]) > 0:
                recoverable.add(rows[i])
    n, repaired = len(rewards), sum(rewards[b] for b in recoverable)
    return {"deviated": len(first) / n, "recoverable": len(recoverable) / n,
            "recovered": repaired / len(recoverable) if recoverable else None,
            "recoverable_n": len(recoverable), "recovered_n": repaired}
