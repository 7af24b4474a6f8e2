"""The loss zoo of on-policy distillation (OPD): one pure function per variant.

The same functions serve the toy tabular world (``toy/``) and the transformer loop
(``opd_mini/train.py``): they take plain tensors and return ``(loss, metrics)``, where
``loss`` is a scalar float32 tensor to call ``.backward()`` on and ``metrics`` is a dict of
detached scalar tensors with namespaced keys (documented in :data:`METRIC_DOCS`).

Notation (used in every docstring)::

    π_θ        the student (the policy being trained)
    q          the teacher
    c_t        the prefix (prompt + completion tokens before position t)
    y_t        the token the student sampled at position t
    r_t        log π_θ(y_t|c_t) − log q(y_t|c_t)   the per-token log-ratio
               (−r_t is the per-token "reward" of OPD: positive where the teacher likes y_t more)

Shapes carry suffixes: ``B`` batch, ``T`` completion positions, ``V`` vocabulary, ``K`` teacher
top-K support. Inputs named ``*_logits_BTV`` may be logits or log-probabilities (a log-softmax is
applied, which leaves log-probabilities unchanged). Every computation runs in float32, whatever the
input dtype (bf16/fp16 inputs are upcast).

Normalisation, the same for every loss: a per-token mean over the masked-in positions of the
whole batch, ``Σ_{b,t} mask_bt · ℓ_bt / N``. By default ``N = mask.sum()``. When a batch is split
into micro-batches (gradient accumulation), pass the token count of the *full* batch as ``num_tokens``
to every call: the summed micro-batch losses then equal the full-batch loss exactly, and the gradient
does not depend on how the batch was split. The same holds for chunks along the sequence for every
loss whose ℓ_bt depends on position t alone; ``reverse_kl_sampled_token`` with γ > 0 (and
``opd_grpo``) couples each position to the later ones through the return-to-go, so it must see whole
sequences (``opd_mini.student.loss_and_backward`` computes it on all T at once for that reason).

Zero-probability teacher tokens (log q = −inf) never produce NaN, in the value or the gradient:
reverse-KL style terms clamp the teacher's log-probabilities at :data:`LOGP_FLOOR` (−100 nats, below
the smallest normal float32 probability, e^−87), forward-KL style terms drop them (0 · log 0 = 0), and
JSD's mixture skips entries where student and teacher are both zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opd_mini.advantages import grpo_advantages, mix_advantages, return_to_go  # noqa: F401  (part of the zoo's API)
from opd_mini.divergences import divergence
from opd_mini.tensors import (check_bt, check_same_shape, check_unit_interval, denominator, fill_masked, masked_mean,
                              masked_sum)

Metrics = dict[str, torch.Tensor]

#: Teacher log-probabilities are clamped here inside reverse-KL terms (see module docstring).
LOGP_FLOOR = -100.0

#: What each metric key returned by a loss means. ``train.py`` logs these as they are.
METRIC_DOCS: dict[str, str] = {
    "loss/total": "the scalar that was back-propagated (per-token mean over the mask)",
    "kl/reverse_sampled": "mean over tokens of r_t = log π_θ(y_t) − log q(y_t): the one-sample estimate "
    "of the per-token reverse KL on the student's own tokens (before any clipping)",
    "kl/reverse_full": "mean over tokens of the exact reverse KL Σ_v π_θ(v)(log π_θ(v) − log q(v))",
    "kl/forward_full": "mean over tokens of the exact forward KL Σ_v q(v)(log q(v) − log π_θ(v))",
    "kl/jsd": "mean over tokens of the generalized Jensen-Shannon divergence JSD(β)",
    "kl/reverse_topk": "mean over tokens of the reverse KL inside the teacher's top-K support (with the tail "
    "bucket for reverse_kl_topk_tail)",
    "kl/abs_log_ratio": "mean over tokens of |r_t| = |log π_θ(y_t) − log q(y_t)| (before clipping): unlike the mean "
    "r_t it cannot average out to 0 while the two disagree",
    "student/topk_overlap": "fraction of the teacher's top-K tokens that are also among the student's K most likely",
    "opd/neg_reward_frac": "fraction of tokens whose sampled-token reward −r_t is negative (the student "
    "likes y_t more than the teacher): the 'imbalanced signal' of Fu et al. 2026 (before clipping)",
    "opd/clip_frac": "fraction of tokens whose log-ratio r_t was clipped",
    "opd/advantage_mean": "mean per-token advantage used in the policy-gradient loss (after clipping and the return-to-go)",
    "opd/high_entropy_frac": "fraction of tokens where the teacher's entropy exceeds the threshold "
    "(where entropy-aware OPD adds forward KL)",
    "student/topk_mass": "student probability mass inside the teacher's top-K support",
    "teacher/topk_mass": "teacher probability mass inside its own top-K support",
    "teacher/entropy": "mean teacher entropy H(q(·|c_t)) in nats",
    "pg/ratio_mean": "mean importance ratio π_θ(y_t)/π_behaviour(y_t) (1 when fully on-policy)",
    "reward/mean": "mean verifiable reward of the batch",
    "loss/sft": "SFT cross-entropy: mean −log π_θ(y_t) over the target tokens",
}


def _kl_terms(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a(v) (log a(v) − log b(v)) over the last dim, with 0 · anything = 0 where a(v) = 0."""
    p_a = logp_a.exp()
    diff = torch.where(p_a > 0, logp_a - logp_b, torch.zeros((), device=logp_a.device))
    return (p_a * diff).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (−inf at x = 0)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros((), device=logp.device))).sum(-1)


def _teacher_full(teacher_logp_BTV: torch.Tensor, V: int) -> torch.Tensor:
    """The teacher's log-probs in float32, checked against the student's vocabulary (masked-out rows are made
    uniform by :func:`opd_mini.divergences.divergence`)."""
    if teacher_logp_BTV.shape[-1] != V:
        raise ValueError(
            f"teacher_logp_BTV has vocabulary size {teacher_logp_BTV.shape[-1]} but the student has {V}: "
            "student and teacher must share a vocabulary (trim padded embedding rows to the tokenizer length)"
        )
    return teacher_logp_BTV.float()


def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """log π(y_t | c_t) of the given tokens, shape (B, T), in float32.

    Computed as ``logits[y] − logsumexp(logits)`` so no (B, T, V) log-softmax copy is kept.
    """
    if logits_BTV.shape[:2] != tokens_BT.shape:
        raise ValueError(
            f"logits_BTV has shape {tuple(logits_BTV.shape)} but tokens_BT has shape {tuple(tokens_BT.shape)}"
        )
    if tokens_BT.is_floating_point() or tokens_BT.dtype == torch.bool:
        raise ValueError(f"tokens_BT must hold integer token ids, got {tokens_BT.dtype}")
    if tokens_BT.numel() and (tokens_BT.min() < 0 or tokens_BT.max() >= logits_BTV.shape[-1]):
        raise ValueError(f"tokens_BT holds ids outside [0, {logits_BTV.shape[-1]}); replace padding ids (e.g. -100) by a valid id and mask them")
    logits = logits_BTV.float()
    picked = logits.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def mask_special_tokens(mask_BT: torch.Tensor, tokens_BT: torch.Tensor, special_ids) -> torch.Tensor:
    """Modifier: drop positions whose sampled token is a special token from the mask.

    Special tokens (EOS, chat markers) are where student and teacher tokenisations disagree most, and a
    one-token comparison there produces false negatives (Fu et al. 2026, §4.2). Returns a bool mask.
    """
    mask = check_bt(mask_BT, tokens_BT=tokens_BT)
    ids = torch.as_tensor(list(special_ids), dtype=tokens_BT.dtype, device=tokens_BT.device)
    if ids.numel() == 0:
        return mask
    return mask & ~torch.isin(tokens_BT, ids)


# --------------------------------------------------------------------------------------------
# policy-gradient losses (sampled tokens)
# --------------------------------------------------------------------------------------------


def policy_gradient(
    student_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    behaviour_logp_BT: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Importance-weighted policy-gradient loss ``−(1/N) Σ_t ρ_t · A_t``, ``ρ_t = π_θ(y_t)/π_b(y_t)``.

    Its gradient is ``−(1/N) Σ_t ρ_t A_t ∇ log π_θ(y_t|c_t)``: raise the probability of tokens with
    positive advantage. Advantages are treated as constants (stop-gradient). Without
    ``behaviour_logp_BT`` the samples are taken to come from the current student (ρ = 1 in value, and
    the gradient is the on-policy REINFORCE gradient). ``advantages_BT`` may also be (B,) and is then
    broadcast over T. This is the form of the Tinker cookbook's importance-sampling loss.

    Shapes: student_logp_BT (B, T) = log π_θ(y_t|c_t) with grad; behaviour_logp_BT (B, T); mask_BT (B, T).
    """
    if advantages_BT.dim() == 1:
        advantages_BT = advantages_BT.unsqueeze(1).expand(-1, student_logp_BT.shape[1])
    mask = check_bt(mask_BT, student_logp_BT=student_logp_BT, advantages_BT=advantages_BT,
                     behaviour_logp_BT=behaviour_logp_BT)
    logp = fill_masked(student_logp_BT.float(), mask)
    reference = logp.detach() if behaviour_logp_BT is None else fill_masked(behaviour_logp_BT.float(), mask)
    ratio = torch.exp(logp - reference)
    adv = fill_masked(advantages_BT.detach().float(), mask)
    loss = -masked_sum(ratio * adv, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "pg/ratio_mean": masked_mean(ratio, mask),
                  "opd/advantage_mean": masked_mean(adv, mask)}


def reverse_kl_sampled_token(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    behaviour_logp_BT: torch.Tensor | None = None,
    gamma: float = 0.0,
    clip_log_ratio: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Sampled-token reverse KL in policy-gradient form, with the discounted return-to-go family.

    Per-token log-ratio on the student's own sample (stop-gradient, current student)::

        r_t = log π_θ(y_t|c_t) − log q(y_t|c_t)
        A_t = −Σ_{t'≥t} γ^(t'−t) r_t'                      (Fu et al. 2026, §3.1, Eq. 1-3)
        loss = −(1/N) Σ_t ρ_t A_t,  ρ_t = π_θ(y_t)/π_behaviour(y_t)

    * γ = 0: token-level OPD, ``A_t = −r_t`` (Thinking Machines' on-policy distillation / the Tinker
      cookbook). Biased against the sequence-level gradient for T ≥ 2, low variance (worst case O(T²)).
    * γ = 1: the causal sequence-level estimator. With samples from π_θ, ``E[Σ_t −A_t ∇log π_θ(y_t)] =
      ∇ KL(π_θ(y_{1:T}) ‖ q(y_{1:T}))`` exactly — unbiased, variance worst case O(T⁴).
    * ``clip_log_ratio=c`` clips r_t to [−c, c] before the return-to-go (a per-token modifier that
      bounds the update where teacher and student disagree wildly).

    The loss is a per-token mean (see the module docstring): its gradient equals the sequence-level
    gradient above divided by N. Shapes: student_logp_BT (B, T) with grad, teacher_logp_BT (B, T),
    behaviour_logp_BT (B, T) or None, mask_BT (B, T).
    """
    gamma = check_unit_interval("gamma", gamma)
    if clip_log_ratio is not None and not (clip_log_ratio > 0):
        raise ValueError(f"clip_log_ratio must be > 0 or None, got {clip_log_ratio}")
    mask = check_bt(mask_BT, student_logp_BT=student_logp_BT, teacher_logp_BT=teacher_logp_BT,
                     behaviour_logp_BT=behaviour_logp_BT)
    check_same_shape("student_logp_BT", student_logp_BT, "teacher_logp_BT", teacher_logp_BT)
    log_ratio = fill_masked(student_logp_BT.detach().float() - teacher_logp_BT.float().clamp(min=LOGP_FLOOR), mask)
    metrics = {"kl/reverse_sampled": masked_mean(log_ratio, mask), "kl/abs_log_ratio": masked_mean(log_ratio.abs(), mask),
               "opd/neg_reward_frac": masked_mean((log_ratio > 0).float(), mask)}
    if clip_log_ratio is not None:
        metrics["opd/clip_frac"] = masked_mean((log_ratio.abs() > clip_log_ratio).float(), mask)
        log_ratio = log_ratio.clamp(-clip_log_ratio, clip_log_ratio)
    advantages = -return_to_go(log_ratio, mask, gamma)
    loss, pg_metrics = policy_gradient(student_logp_BT, advantages, mask,
                                       behaviour_logp_BT=behaviour_logp_BT, num_tokens=num_tokens)
    return loss, {**pg_metrics, **metrics}


def sft_cross_entropy(student_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Baseline: supervised fine-tuning, ``−(1/N) Σ_t log π_θ(y_t|c_t)`` on target tokens y (off-policy
    when y comes from the teacher). Equals the forward KL KL(data ‖ π_θ) up to the data's entropy.
    Shapes: student_logp_BT (B, T) with grad, mask_BT (B, T)."""
    mask = check_bt(mask_BT, student_logp_BT=student_logp_BT)
    loss = -masked_sum(student_logp_BT.float(), mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "loss/sft": masked_mean(-student_logp_BT.float(), mask)}


# --------------------------------------------------------------------------------------------
# distribution-level losses (exact over the vocabulary or the teacher's top-K support)
# --------------------------------------------------------------------------------------------


def reverse_kl_full(
    student_logits_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Full-vocabulary reverse KL at every visited prefix (mode-seeking)::

        loss = (1/N) Σ_t Σ_v π_θ(v|c_t) (log π_θ(v|c_t) − log q(v|c_t))

    The single-step term of MiniLLM (Gu et al. 2024) and GKD with β = 1 (Agarwal et al. 2024). The
    gradient flows through the student distribution at each prefix (not through the sampling of the
    prefixes). Shapes: student_logits_BTV (B, T, V), teacher_logp_BTV (B, T, V), mask_BT (B, T).
    """
    mask = check_bt(mask_BT, student_logits_BTV=student_logits_BTV, teacher_logp_BTV=teacher_logp_BTV)
    logq = _teacher_full(teacher_logp_BTV, student_logits_BTV.shape[-1])
    kl_BT = divergence(student_logits_BTV, logq, mask, "reverse", floor=LOGP_FLOOR)
    loss = masked_sum(kl_BT, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "kl/reverse_full": masked_mean(kl_BT, mask)}


def forward_kl_full(
    student_logits_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Full-vocabulary forward KL at every visited prefix (mode-covering)::

        loss = (1/N) Σ_t Σ_v q(v|c_t) (log q(v|c_t) − log π_θ(v|c_t))

    Token-level knowledge distillation on student prefixes; GKD with β = 0 (Agarwal et al. 2024).
    Teacher zeros contribute 0. Shapes as :func:`reverse_kl_full`.
    """
    mask = check_bt(mask_BT, student_logits_BTV=student_logits_BTV, teacher_logp_BTV=teacher_logp_BTV)
    kl_BT = divergence(student_logits_BTV, _teacher_full(teacher_logp_BTV, student_logits_BTV.shape[-1]), mask,
                       "forward")
    loss = masked_sum(kl_BT, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "kl/forward_full": masked_mean(kl_BT, mask)}


def generalized_jsd(
    student_logits_BTV: torch.Tensor,
    teacher_logp_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Generalized Jensen-Shannon divergence JSD(β) of GKD (Agarwal et al. 2024, Eq. 1)::

        m = β q + (1 − β) π_θ
        JSD(β) = β KL(q ‖ m) + (1 − β) KL(π_θ ‖ m)

    The limits, stated exactly: JSD(β) → 0 at both ends, but ``JSD(β)/β → KL(q ‖ π_θ)`` (forward KL)
    as β → 0 and ``JSD(β)/(1 − β) → KL(π_θ ‖ q)`` (reverse KL) as β → 1. So that the endpoints mean
    something, β = 0 returns the forward KL and β = 1 the reverse KL (the convention of GKD's code);
    for 0 < β < 1 the unscaled JSD(β) is returned (its size shrinks like β(1 − β) near the ends).
    β = 0.5 is the symmetric Jensen-Shannon divergence. Shapes as :func:`reverse_kl_full`.
    """
    beta = check_unit_interval("beta", beta)
    if beta == 0.0:
        return forward_kl_full(student_logits_BTV, teacher_logp_BTV, mask_BT, num_tokens=num_tokens)
    if beta == 1.0:
        return reverse_kl_full(student_logits_BTV, teacher_logp_BTV, mask_BT, num_tokens=num_tokens)
    mask = check_bt(mask_BT, student_logits_BTV=student_logits_BTV, teacher_logp_BTV=teacher_logp_BTV)
    # log m = log(β q + (1-β) π) with logaddexp (much faster than stack + logsumexp on CPU; see divergences)
    jsd_BT = divergence(student_logits_BTV, _teacher_full(teacher_logp_BTV, student_logits_BTV.shape[-1]), mask,
                        "jsd", beta)
    loss = masked_sum(jsd_BT, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "kl/jsd": masked_mean(jsd_BT, mask)}


def reverse_kl_topk(
    student_logits_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    sampled_ids_BT: torch.Tensor | None = None,
    teacher_sampled_logp_BT: torch.Tensor | None = None,
    renormalize: bool = True,
    tail: bool = False,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Teacher top-K local support matching: reverse KL on the teacher's top-K tokens (Fu et al. 2026, §4.1)::

        S_t = top-K tokens of q(·|c_t)            (optionally ∪ {y_t}, the student's sampled token)
        π_S(v) = π_θ(v|c_t) / Σ_{u∈S_t} π_θ(u|c_t),   q_S likewise
        loss = (1/N) Σ_t Σ_{v∈S_t} π_S(v) (log π_S(v) − log q_S(v))

    Renormalising both distributions inside S_t is what makes this a divergence; without it
    (``renormalize=False``, kept for the ablation) the student can lower the loss by moving mass out of
    S_t, and training collapses (Fu et al. 2026, Table 3). With K = V it equals :func:`reverse_kl_full`.
    K = 1 is rejected when renormalising: both renormalised distributions are then 1 on the single token,
    so the loss and its gradient are identically zero.

    ``tail=True`` keeps the mass outside S_t as one more bucket instead of renormalising (TRL's
    ``loss_add_tail``; top-K + tail distillation)::

        π_tail = 1 − Σ_{v∈S_t} π_θ(v|c_t),   q_tail = 1 − Σ_{v∈S_t} q(v|c_t)
        loss = (1/N) Σ_t [ Σ_{v∈S_t} π(v) (log π(v) − log q(v)) + π_tail (log π_tail − log q_tail) ]

    the exact reverse KL between the two distributions coarsened to S_t ∪ {tail}: a student that puts mass
    where the teacher has none is penalised, which the renormalised loss cannot see. log π_tail is the
    log-sum-exp of the logits outside S_t minus the normaliser, so it stays exact (and its gradient finite)
    when the tail is far below float precision of 1 − Σ π. It needs at least one token outside S_t.

    Shapes: student_logits_BTV (B, T, V); teacher_topk_ids_BTK (B, T, K) int; teacher_topk_logp_BTK
    (B, T, K) = log q(v|c_t) over the full vocabulary; sampled_ids_BT and teacher_sampled_logp_BT (B, T),
    both given to add y_t to the support (a token already in the top-K is not counted twice).
    """
    mask = check_bt(mask_BT, student_logits_BTV=student_logits_BTV, teacher_topk_ids_BTK=teacher_topk_ids_BTK,
                     sampled_ids_BT=sampled_ids_BT, teacher_sampled_logp_BT=teacher_sampled_logp_BT)
    check_same_shape("teacher_topk_ids_BTK", teacher_topk_ids_BTK, "teacher_topk_logp_BTK", teacher_topk_logp_BTK)
    V, K = student_logits_BTV.shape[-1], teacher_topk_ids_BTK.shape[-1]
    if not (1 <= K <= V):
        raise ValueError(f"top-K support size K must satisfy 1 <= K <= V={V}, got K={K}")
    if K == 1 and renormalize and not tail:
        raise ValueError("K=1 is degenerate with renormalisation (the loss is identically 0); use K >= 2")
    if tail and K + (sampled_ids_BT is not None) >= V:
        raise ValueError(f"a tail bucket needs a token outside the support: K={K} (plus the sampled token) must be "
                         f"below V={V}")
    if (sampled_ids_BT is None) != (teacher_sampled_logp_BT is None):
        raise ValueError("pass both sampled_ids_BT and teacher_sampled_logp_BT to add the sampled token, or neither")

    ids = teacher_topk_ids_BTK.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"teacher_topk_ids_BTK holds ids outside [0, {V})")
    logq_k = fill_masked(teacher_topk_logp_BTK.float(), mask).clamp(min=LOGP_FLOOR)
    valid_k = torch.ones_like(ids, dtype=torch.bool)
    if sampled_ids_BT is not None:
        if sampled_ids_BT.numel() and (sampled_ids_BT.min() < 0 or sampled_ids_BT.max() >= V):
            raise ValueError(f"sampled_ids_BT holds ids outside [0, {V}); replace padding ids by a valid id and mask them")
        y = sampled_ids_BT.long().unsqueeze(-1)
        already = (ids == y).any(-1, keepdim=True)
        ids = torch.cat([ids, y], dim=-1)
        logq_k = torch.cat([logq_k, fill_masked(teacher_sampled_logp_BT.float(), mask).clamp(min=LOGP_FLOOR).unsqueeze(-1)], dim=-1)
        valid_k = torch.cat([valid_k, ~already], dim=-1)
    neg_inf = torch.tensor(float("-inf"), device=student_logits_BTV.device)
    # only the support's logits carry the gradient; the normaliser over the whole vocabulary is needed by the
    # loss without renormalisation alone (with it, log π_S = z_S − logsumexp(z_S)), else only by the metric
    z_k = fill_masked(student_logits_BTV.gather(-1, ids).float(), mask)
    exact = tail or not renormalize  # the loss needs log π over the whole vocabulary, with its gradient
    with torch.enable_grad() if exact else torch.no_grad():
        lse_BT1 = fill_masked(torch.logsumexp(student_logits_BTV.float(), -1, keepdim=True), mask)
    logp_k = torch.where(valid_k, z_k - lse_BT1 if exact else z_k - lse_BT1.detach(), neg_inf)
    logq_k = torch.where(valid_k, logq_k, neg_inf)
    student_mass = torch.logsumexp(logp_k.detach(), -1).exp()
    teacher_mass = torch.logsumexp(logq_k, -1).exp()
    with torch.no_grad():
        student_top_BTK = student_logits_BTV.topk(K, dim=-1).indices
        overlap_BT = (teacher_topk_ids_BTK.long().unsqueeze(-1) == student_top_BTK.unsqueeze(-2)).any(-1).float().mean(-1)
    if tail:
        outside = torch.ones_like(student_logits_BTV, dtype=torch.bool).scatter_(-1, ids, False)
        z_out = fill_masked(student_logits_BTV.float().masked_fill(~outside, float("-inf")).logsumexp(-1, keepdim=True),
                            mask)
        logq_in = torch.logsumexp(logq_k, -1, keepdim=True).clamp(max=0.0)
        logq_tail = _log1mexp(logq_in).clamp(min=LOGP_FLOOR)
        logp_k = torch.cat([logp_k, z_out - lse_BT1], dim=-1)
        logq_k = torch.cat([logq_k, logq_tail], dim=-1)
    elif renormalize:
        logp_k = logp_k - torch.logsumexp(logp_k, -1, keepdim=True)
        logq_k = logq_k - torch.logsumexp(logq_k, -1, keepdim=True)
    kl_BT = _kl_terms(logp_k, logq_k)
    loss = masked_sum(kl_BT, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "kl/reverse_topk": masked_mean(kl_BT, mask),
                  "student/topk_mass": masked_mean(student_mass, mask),
                  "teacher/topk_mass": masked_mean(teacher_mass, mask),
                  "student/topk_overlap": masked_mean(overlap_BT, mask)}


def entropy_aware_kl(
    student_logits_BTV: torch.Tensor,
    teacher_logp_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    entropy_threshold: float = 1.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Entropy-aware OPD (Jin et al. 2026, arXiv:2603.07079): reverse KL everywhere, plus forward KL
    where the teacher is uncertain::

        H_t = −Σ_v q(v|c_t) log q(v|c_t)
        loss = (1/N) Σ_t [ KL(π_θ ‖ q)_t + 1[H_t > τ] · KL(q ‖ π_θ)_t ]

    Reverse KL alone is mode-seeking and collapses the student's diversity where the teacher spreads its
    mass; the forward term keeps the student covering those tokens, while low-entropy positions keep
    precise reverse-KL imitation. τ = ``entropy_threshold`` in nats; the test is strict, so τ = 0 adds
    forward KL wherever the teacher's entropy is positive (not where it is one-hot, H = 0), and
    ``inf`` never. Shapes as :func:`reverse_kl_full`.
    """
    if not (entropy_threshold >= 0):
        raise ValueError(f"entropy_threshold must be >= 0 nats, got {entropy_threshold}")
    mask = check_bt(mask_BT, student_logits_BTV=student_logits_BTV, teacher_logp_BTV=teacher_logp_BTV)
    logq = _teacher_full(teacher_logp_BTV, student_logits_BTV.shape[-1])
    with torch.no_grad():
        entropy_BT = _entropy(fill_masked(logq, mask, -math.log(logq.shape[-1])))
    high_BT = entropy_BT > entropy_threshold
    rkl_BT = divergence(student_logits_BTV, logq, mask, "reverse", floor=LOGP_FLOOR)
    fkl_BT = divergence(student_logits_BTV, logq, mask, "forward")
    per_token = rkl_BT + torch.where(high_BT, fkl_BT, torch.zeros((), device=fkl_BT.device))
    loss = masked_sum(per_token, mask) / denominator(mask, num_tokens)
    return loss, {"loss/total": loss.detach(), "kl/reverse_full": masked_mean(rkl_BT, mask),
                  "kl/forward_full": masked_mean(fkl_BT, mask), "teacher/entropy": masked_mean(entropy_BT, mask),
                  "opd/high_entropy_frac": masked_mean(high_BT.float(), mask)}


def opd_grpo(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    behaviour_logp_BT: torch.Tensor,
    rewards_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    group_size: int,
    gamma: float = 0.0,
    clip_log_ratio: float | None = None,
    reward_weight: float = 1.0,
    normalize_std: bool = True,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Sampled-token OPD plus a verifiable reward, one policy-gradient loss with the mixed advantage::

        r_t = log π_behaviour(y_t|c_t) − log q(y_t|c_t)            (taken at sampling time: a fixed reward)
        A_t = −Σ_{t'≥t} γ^(t'−t) clip(r_t') + w · A^GRPO          (A^GRPO: the row's group-normalised reward)
        loss = −(1/N) Σ_t ρ_t A_t

    The OPD part is the dense per-token signal, the reward part the sparse sequence-level one
    (:func:`grpo_advantages` over consecutive groups of ``group_size`` rows, :func:`mix_advantages`).
    ``w = reward_weight`` (0 = OPD with behaviour-time log-ratios); ``clip_log_ratio=c`` clips r_t to
    [−c, c]. Shapes: student_logp_BT (B, T) with grad, teacher_logp_BT and behaviour_logp_BT (B, T),
    rewards_B (B,), mask_BT (B, T).
    """
    mask = check_bt(mask_BT, student_logp_BT=student_logp_BT, teacher_logp_BT=teacher_logp_BT,
                     behaviour_logp_BT=behaviour_logp_BT)
    log_ratio_BT = behaviour_logp_BT - teacher_logp_BT.clamp(min=LOGP_FLOOR)
    abs_log_ratio = log_ratio_BT[mask].abs().mean() if mask.any() else torch.zeros(())
    if clip_log_ratio:
        log_ratio_BT = log_ratio_BT.clamp(-clip_log_ratio, clip_log_ratio)
    opd_adv_BT = -return_to_go(log_ratio_BT, mask, gamma)
    reward_adv_B = grpo_advantages(rewards_B, group_size, normalize_std=normalize_std)
    adv_BT = mix_advantages(opd_adv_BT, reward_adv_B.to(opd_adv_BT.device), reward_weight)
    loss, metrics = policy_gradient(student_logp_BT, adv_BT, mask, behaviour_logp_BT=behaviour_logp_BT,
                                    num_tokens=num_tokens)
    metrics["kl/reverse_sampled"] = log_ratio_BT[mask].mean() if mask.any() else torch.zeros(())
    metrics["kl/abs_log_ratio"] = abs_log_ratio
    return loss, metrics
