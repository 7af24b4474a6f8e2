"""Student rollouts: sample completions (KV cache, no grad) and record what the loss needs.

The sampler returns a :class:`opd_mini.batch.Batch` (left-padded prompts, right-padded completions, masks;
the layout is described there). Two samplers draw from the same distribution, softmax(logits / temperature)
filtered by top-k and top-p:

* ``method="generate"`` (the readable reference): Hugging Face ``generate``, then one
  chunked forward of the same weights for ``behaviour_logp``
  (:func:`opd_mini.forward.sampled_token_logprobs`), so it equals the trainer's own forward bit for bit.
* ``method="decode"`` (the default, the fast path): :func:`decode`, a KV-cache loop of this module that draws each
  token by inverse-CDF sampling (one uniform number per row and step, a float64 cumulative sum) instead
  of ``torch.multinomial`` (which draws one exponential number per vocabulary entry), and records
  ``behaviour_logp`` while decoding, with no second forward. Its samples for a seed differ from
  ``generate``'s (other random numbers are drawn), and its log-probs equal the forward's to float
  rounding (~1e-6), not bit for bit: where r_t must be exactly 0 (a teacher that is the student's own
  base), pass ``behaviour_logp="forward"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_mini.forward import base_model, project_logits, sampled_token_logprobs
from opd_mini.batch import Batch, completion_mask_from_ids, position_ids_from_mask

#: The samplers of :func:`sample` (see the module docstring).
METHODS = ("generate", "decode")
#: Where ``behaviour_logp`` comes from: a forward pass after sampling, or the logits seen while decoding.
BEHAVIOUR_LOGP = ("forward", "decode")


@dataclass(frozen=True)
class Slip:
    """An environment that slips (the DAgger setting): each emitted token that has a partner in ``swap`` is
    replaced by that partner with probability ``prob``, after the policy has drawn it (``L`` ↔ ``R`` on a walk).
    The completion records the token that was emitted, so the policy reads where it really is; a slipped
    token is not the policy's action, so the loop leaves it out of the loss (``Batch.slipped_BT``). The
    draws come from the sampler's seeded RNG, one uniform number per row and step, after the token's."""

    prob: float
    swap: dict  # token id -> token id (both directions)

    def __post_init__(self):
        if not 0.0 <= self.prob < 1.0:
            raise ValueError(f"the slip probability must lie in [0, 1), got {self.prob}")


def slip_for(tokenizer, moves: tuple[str, str] | None, prob: float) -> Slip | None:
    """The :class:`Slip` that swaps the two ``moves`` (a task's ``slip_moves``, one token each) with probability
    ``prob``; None when ``prob`` is 0. A task without moves, or moves that are not single tokens, is a ValueError."""
    if prob == 0:
        return None
    if moves is None:
        raise ValueError("this task has no moves that can slip (a task's slip_moves, e.g. walk:N and route:N:K): "
                         "drop --slip_prob or use such a task")
    ids = [tokenizer(m, add_special_tokens=False)["input_ids"] for m in moves]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the slip moves {moves} must be one token each for this tokenizer, got {ids}")
    a, b = ids[0][0], ids[1][0]
    return Slip(prob, {a: b, b: a})


def apply_slip(y_B: torch.Tensor, slip: Slip, live_B: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens after the slip, (B,) bool: which slipped); rows not ``live_B`` (ended) never slip."""
    u_B = torch.rand(y_B.shape, dtype=torch.float64, device=y_B.device, generator=generator)
    partner_B = y_B.clone()
    for a, b in slip.swap.items():
        partner_B[y_B == a] = b
    slipped_B = (u_B < slip.prob) & (partner_B != y_B) & live_B
    return torch.where(slipped_B, partner_B, y_B), slipped_B


#: Passed to every ``generate`` call so that a model's own generation defaults (many hub models ship a
#: repetition penalty, min-p or typical-p in ``generation_config.json``) cannot silently change the
#: distribution the rollouts are drawn from: samples come from softmax(logits / temperature) filtered by
#: top-k and top-p only.
NEUTRAL_GENERATION = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
NEUTRAL_SAMPLING = dict(min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)  # only read when sampling


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (some models list several)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if value is None:
            continue
        for i in ([value] if isinstance(value, int) else value):
            if i not in ids:
                ids.append(int(i))
    return ids


def _max_context(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def format_prompts(tokenizer, prompts: list[str], use_chat_template: bool | str = "auto") -> tuple[list[str], bool]:
    """Apply the tokenizer's chat template to each prompt (one user turn + generation prompt) when asked.

    ``use_chat_template``: ``"auto"`` uses it when the tokenizer has one, ``True`` requires one,
    ``False`` feeds the prompts as they are. Returns ``(texts, templated)``.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template == "auto":
        use = has_template
    elif use_chat_template is True or use_chat_template is False:
        use = use_chat_template
    else:
        raise ValueError(f"use_chat_template must be 'auto', True or False, got {use_chat_template!r}")
    if use and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template; use 'auto' or False")
    if not use:
        return list(prompts), False
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return texts, True


def encode_prompts(tokenizer, prompts: list[str], *, use_chat_template: bool | str = "auto",
                   max_length: int | None = None, max_new_tokens: int = 0) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt (chat template applied when asked; see :func:`format_prompts`).

    Raises ValueError for an empty prompt list, an empty prompt, or a prompt whose length plus
    ``max_new_tokens`` exceeds ``max_length`` (the model's context).
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one non-whitespace character")
    texts, templated = format_prompts(tokenizer, prompts, use_chat_template)
    # a chat template writes its own BOS; plain prompts get the tokenizer's usual special tokens
    ids = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"prompt {i} encodes to zero tokens: {prompts[i]!r}")
        if max_length is not None and len(row) + max_new_tokens > max_length:
            raise ValueError(
                f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {max_length} positions: shorten the prompt or lower max_new_tokens"
            )
    return ids, texts


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a (B, P) tensor; returns ``(ids_BP, attention_mask_BP)``."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, P - len(r):] = 1
    return ids, mask


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def _assemble(tokenizer, prompt_ids_BP, prompt_mask_BP, completion_ids_BT, eos_ids, pad_id,
              behaviour_logp_BT, prompt_index_B, prompt_texts) -> Batch:
    completion_mask_BT = completion_mask_from_ids(completion_ids_BT, eos_ids or None)
    completion_ids_BT = torch.where(completion_mask_BT, completion_ids_BT, torch.full_like(completion_ids_BT, pad_id))
    behaviour_logp_BT = torch.where(completion_mask_BT, behaviour_logp_BT, torch.zeros_like(behaviour_logp_BT))
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(completion_ids_BT, completion_mask_BT)],
                                   skip_special_tokens=True)
    return Batch(
        tokens_BT=completion_ids_BT,
        mask_BT=completion_mask_BT,
        input_ids_BL=torch.cat([prompt_ids_BP, completion_ids_BT], dim=1),
        attention_mask_BL=torch.cat([prompt_mask_BP, completion_mask_BT.long()], dim=1),
        prompt_len=prompt_ids_BP.shape[1],
        prompt_index_B=prompt_index_B,
        completions=texts,
        prompt_texts=prompt_texts,
        behaviour_logp_BT=behaviour_logp_BT.float(),
    )


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_generations: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    use_chat_template: bool | str = "auto",
    seed: int | None = None,
    method: str = "decode",
    behaviour_logp: str | None = None,
    slip: Slip | None = None,
) -> Batch:
    """Sample ``num_generations`` completions per prompt from ``model`` (KV cache, no grad).

    ``temperature=0`` decodes greedily; otherwise tokens are drawn from the temperature-scaled
    distribution, filtered by ``top_k`` (0 = off) and ``top_p`` (1 = off). ``behaviour_logp`` is always
    taken from the raw logits (temperature 1, unfiltered), i.e. log π_student(y_t|c_t), so it equals a
    separate forward pass. With ``seed`` the draw is reproducible and the global RNG is left untouched;
    without it the global torch RNG is used (and advanced). The rollouts' tensors live on the model's
    device. The model runs in eval mode (its training
    flag is restored afterwards); the model's own generation defaults are neutralised (see
    :data:`NEUTRAL_GENERATION`, :data:`NEUTRAL_SAMPLING`), and token ids past ``len(tokenizer)``
    (padding rows of an embedding matrix rounded up, e.g. 151,936 rows for 151,665 tokens) are never
    sampled.

    ``method``: ``"generate"`` (Hugging Face ``generate``, the reference) or ``"decode"`` (:func:`decode`,
    the fast loop; other samples for the same seed). ``behaviour_logp``: ``"forward"`` (one forward
    after sampling: bit-identical to the trainer's and the teacher's forward) or ``"decode"`` (recorded
    while decoding; only with ``method="decode"``); None picks ``method``'s own ("forward" for generate,
    "decode" for decode). ``slip``: an environment that swaps some emitted tokens (:class:`Slip`; decode only);
    the batch's ``slipped_BT`` marks them.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not (0.0 < top_p <= 1.0) or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    behaviour_logp = behaviour_logp or ("decode" if method == "decode" else "forward")
    if behaviour_logp not in BEHAVIOUR_LOGP:
        raise ValueError(f"behaviour_logp must be one of {', '.join(BEHAVIOUR_LOGP)}; got {behaviour_logp!r}")
    if behaviour_logp == "decode" and method != "decode":
        raise ValueError("behaviour_logp='decode' needs method='decode' (generate does not keep the log-probs)")
    if slip is not None and method != "decode":
        raise ValueError("slips (--slip_prob) need the decode sampler (--sampler decode): generate cannot swap a token "
                         "after drawing it")
    rows, texts = encode_prompts(tokenizer, prompts, use_chat_template=use_chat_template,
                                 max_length=_max_context(model), max_new_tokens=max_new_tokens)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    device = next(model.parameters()).device

    prompt_ids_BP, prompt_mask_BP = left_pad(rows, pad_id)
    prompt_index_B = torch.arange(len(rows)).repeat_interleave(num_generations)
    prompt_ids_BP, prompt_mask_BP = prompt_ids_BP[prompt_index_B], prompt_mask_BP[prompt_index_B]

    head_rows = getattr(base_model(model).get_output_embeddings(), "out_features", None)
    # padding rows of the head (beyond len(tokenizer)) are never sampled: the distribution is over the tokens
    vocab = min(head_rows, len(tokenizer)) if head_rows is not None else len(tokenizer)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            prompt_ids_BP, prompt_mask_BP = prompt_ids_BP.to(device), prompt_mask_BP.to(device)
            slipped_BT = None
            if method == "decode":
                completion_ids_BT, logp_BT, *slipped = decode(
                    model, prompt_ids_BP, prompt_mask_BP, max_new_tokens=max_new_tokens, vocab_size=vocab, eos_ids=eos_ids,
                    pad_id=pad_id, temperature=temperature, top_p=top_p, top_k=top_k, slip=slip)
                slipped_BT = slipped[0] if slip is not None else None
            else:
                completion_ids_BT = _generate(model, prompt_ids_BP, prompt_mask_BP, max_new_tokens=max_new_tokens,
                                              head_rows=head_rows, vocab_size=vocab, eos_ids=eos_ids, pad_id=pad_id,
                                              temperature=temperature, top_p=top_p, top_k=top_k)
                logp_BT = torch.zeros(completion_ids_BT.shape, device=device)
            rollouts = _assemble(tokenizer, prompt_ids_BP, prompt_mask_BP, completion_ids_BT, eos_ids, pad_id, logp_BT,
                                 prompt_index_B.to(device), texts)
            if slipped_BT is not None:
                rollouts.slipped_BT = slipped_BT & rollouts.mask_BT
            if behaviour_logp == "forward":
                # One chunked no-grad forward of the same weights (still in eval mode) rather than
                # generate(output_logits=True), which would keep T × (B, V) fp32 logits in memory.
                rollouts.behaviour_logp_BT = sampled_token_logprobs(model, rollouts, vocab_size=vocab).float()
    finally:
        model.train(was_training)
    return rollouts


class NotADistributionError(ValueError):
    """The model's logits are NaN or inf where a token must be drawn: a diverged run (exit code 3)."""

    exit_code = 3


#: The message of a sampler that meets logits with no distribution behind them (NaN or inf).
NOT_A_DISTRIBUTION = ("the model's next-token logits are not finite at {where} (NaN or inf), so there is no distribution "
                      "to sample from: its weights have diverged (resume from the last checkpoint known good with a "
                      "lower --lr) or overflow in low precision (try --dtype float32)")


def _generate(model, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens, head_rows, vocab_size, eos_ids, pad_id,
              temperature, top_p, top_k) -> torch.Tensor:
    """Completion ids (B, T) from Hugging Face ``generate``: the reference sampler. Its draw checks the distribution
    (``torch.multinomial`` refuses NaN/inf probabilities); that refusal becomes the same one-line error as decode's."""
    try:
        return _hf_generate(model, prompt_ids_BP, prompt_mask_BP, max_new_tokens=max_new_tokens, head_rows=head_rows,
                            vocab_size=vocab_size, eos_ids=eos_ids, pad_id=pad_id, temperature=temperature,
                            top_p=top_p, top_k=top_k)
    except RuntimeError as e:
        if "probability tensor contains" in str(e):
            raise NotADistributionError(NOT_A_DISTRIBUTION.format(where="a generate step")) from None
        raise


def _hf_generate(model, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens, head_rows, vocab_size, eos_ids, pad_id,
                 temperature, top_p, top_k) -> torch.Tensor:
    greedy = temperature == 0
    gen_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=float(temperature),
                                                            top_p=float(top_p), top_k=int(top_k), **NEUTRAL_SAMPLING)
    if head_rows is not None and head_rows > vocab_size:  # padding rows of the embedding: never sample them
        gen_kwargs["suppress_tokens"] = list(range(vocab_size, head_rows))
    out = model.generate(
        input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
        eos_token_id=eos_ids or None, use_cache=True, return_dict_in_generate=True,
        **NEUTRAL_GENERATION, **gen_kwargs,
    )
    return out.sequences[:, prompt_ids_BP.shape[1]:]


# ---------------------------------------------------------------------------------------------
# the fast path: a KV-cache decode loop with inverse-CDF sampling
# ---------------------------------------------------------------------------------------------


def filter_logits(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling scores: ``logits / temperature``, then top-k, then top-p (−inf outside), as ``generate``'s
    temperature, top-k and top-p warpers compute them (ties at the k-th logit are kept; top-p keeps the
    smallest set of most likely tokens whose mass exceeds ``top_p``, at least one)."""
    scores = logits_BV / temperature if temperature != 1.0 else logits_BV
    if 0 < top_k < scores.shape[-1]:
        kth_B1 = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_B1, float("-inf"))
    if top_p < 1.0:
        scores = scores.masked_fill(~nucleus(scores, top_p), float("-inf"))
    return scores


#: Candidates top-p looks at first; only rows whose nucleus is wider fall back to a sort of the whole vocabulary.
NUCLEUS_CANDIDATES = 64


def nucleus(scores_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: the smallest set of most likely tokens whose mass exceeds ``top_p`` (at least one), the set
    ``generate``'s top-p warper keeps, found without sorting the vocabulary: a token is kept when the mass of
    the tokens more likely than it is below ``top_p``, so the set lies inside the top-k candidates whenever
    their mass reaches ``top_p`` (k = :data:`NUCLEUS_CANDIDATES`). Rows whose candidates hold less (a flat
    distribution) are sorted whole, those rows only: no slower than the warper's sort, however flat."""
    probs_BV = scores_BV.softmax(dim=-1)
    keep_BV = torch.zeros_like(probs_BV, dtype=torch.bool)
    top_BK, idx_BK = probs_BV.topk(min(NUCLEUS_CANDIDATES, probs_BV.shape[-1]), dim=-1)  # descending
    wide_B = top_BK.sum(-1, dtype=torch.float64) < top_p
    for rows, candidates in ((~wide_B, True), (wide_B, False)):
        if not bool(rows.any()):
            continue
        p_BK, i_BK = (top_BK[rows], idx_BK[rows]) if candidates else probs_BV[rows].sort(dim=-1, descending=True)
        before_BK = p_BK.cumsum(-1, dtype=torch.float64) - p_BK  # the mass of the more likely tokens
        keep_rows = before_BK < top_p
        keep_rows[:, 0] = True
        keep_BV[rows] = torch.zeros_like(probs_BV[rows], dtype=torch.bool).scatter(1, i_BK, keep_rows)
    return keep_BV


def inverse_cdf_sample(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs_BV`` (unnormalised, >= 0), by inverse-CDF sampling: the first index whose
    cumulative mass exceeds ``u · total``, ``u ~ U[0, 1)``. The cumulative sum is taken in float64, so a
    token's chance is its probability to ~1e-16, however small. Zero-probability tokens are never drawn."""
    cdf_BV = probs_BV.cumsum(dim=-1, dtype=torch.float64)
    u_B1 = torch.rand((probs_BV.shape[0], 1), dtype=torch.float64, device=probs_BV.device, generator=generator)
    y_B = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True).squeeze(1)
    return y_B.clamp(max=probs_BV.shape[-1] - 1)


@torch.no_grad()
def decode(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, *, max_new_tokens: int,
           vocab_size: int, eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None,
           slip: Slip | None = None) -> tuple[torch.Tensor, ...]:
    """Sample completions with a KV cache; returns ``(completion_ids_BT, behaviour_logp_BT)``, and with a ``slip``
    also ``slipped_BT`` (the tokens the environment swapped after the draw: :class:`Slip`).

    One forward of the decoder over the left-padded prompts fills the cache; then, per new token, the
    output head on the last hidden state (:func:`opd_mini.forward.project_logits`, trimmed to
    ``vocab_size``), the draw (greedy at ``temperature`` 0, otherwise :func:`inverse_cdf_sample` on the
    :func:`filter_logits` scores), and the log-prob of the drawn token under the raw logits
    (temperature 1, unfiltered): what the trainer's forward gives, to float rounding. Rows that produced
    an EOS get ``pad_id`` (log-prob 0) afterwards; the loop stops when every row has ended or after
    ``max_new_tokens``. Position ids are counted over the attention mask, as in ``generate`` and
    :meth:`Batch.position_ids_BL`. ``model`` may be a peft model (its adapters stay as they are).
    """
    from transformers import DynamicCache

    base = base_model(model)
    decoder = getattr(base, base.base_model_prefix)
    B, device = prompt_ids_BP.shape[0], prompt_ids_BP.device
    eos_1E = torch.tensor(eos_ids or [-1], device=device).unsqueeze(0)
    mask_BL = prompt_mask_BP
    cache = DynamicCache(config=base.config)
    out = decoder(input_ids=prompt_ids_BP, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL),
                  past_key_values=cache, use_cache=True)
    ended_B = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, slips = [], [], []
    for t in range(max_new_tokens):
        logits_BV = project_logits(model, out.last_hidden_state[:, -1], vocab_size).float()
        lse_B1 = logits_BV.logsumexp(dim=-1, keepdim=True)
        if not bool(torch.isfinite(lse_B1).all()):  # NaN or inf logits: no distribution to draw from
            raise NotADistributionError(NOT_A_DISTRIBUTION.format(where=f"decoding step {t + 1}"))
        if temperature == 0:
            y_B = logits_BV.argmax(dim=-1)
        elif temperature == 1.0 and top_k == 0 and top_p == 1.0:  # the unfiltered distribution: reuse the logsumexp
            y_B = inverse_cdf_sample((logits_BV - lse_B1).exp_(), generator)
        else:
            y_B = inverse_cdf_sample(filter_logits(logits_BV, temperature, top_k, top_p).softmax(dim=-1), generator)
        if slip is not None:  # the environment may swap the drawn move; the emitted token is what the row reads
            y_B, slipped_B = apply_slip(y_B, slip, ~ended_B, generator)
            slips.append(slipped_B)
        logp_B = (logits_BV.gather(1, y_B.unsqueeze(1)) - lse_B1).squeeze(1)
        y_B = y_B.masked_fill(ended_B, pad_id)
        tokens.append(y_B)
        logps.append(logp_B.masked_fill(ended_B, 0.0))
        ended_B = ended_B | (y_B.unsqueeze(1) == eos_1E).any(dim=1)
        if t == max_new_tokens - 1 or bool(ended_B.all()):
            break
        mask_BL = torch.cat([mask_BL, mask_BL.new_ones(B, 1)], dim=1)
        out = decoder(input_ids=y_B.unsqueeze(1), attention_mask=mask_BL,
                      position_ids=(mask_BL.sum(dim=1, keepdim=True) - 1), past_key_values=cache, use_cache=True)
    out = (torch.stack(tokens, dim=1), torch.stack(logps, dim=1))
    return (out + (torch.stack(slips, dim=1),)) if slip is not None else out


def with_prompts(rollouts: Batch, tokenizer, prompts: list[str], *, use_chat_template: bool | str = "auto",
                 max_length: int | None = None) -> Batch:
    """The same completions behind other prompts (``prompts[i]`` for the rows of ``rollouts.prompt_index_B == i``):
    what a teacher with privileged context reads (on-policy self-distillation, ``teacher_template``).

    The completion part is copied unchanged (ids, mask, behaviour log-probs, attention), so position t of
    the completion is the same token in both and only the prompt, and its length P, differ; a teacher's
    scores of the result line up with the student's token by token. ``max_length`` (the teacher's
    context) is checked against the new prompt plus the completion."""
    rows, texts = encode_prompts(tokenizer, prompts, use_chat_template=use_chat_template)
    ids_BP, mask_BP = left_pad([rows[i] for i in rollouts.prompt_index_B.tolist()], _pad_id(
        tokenizer, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    T = rollouts.tokens_BT.shape[1]
    if max_length is not None and ids_BP.shape[1] + T > max_length:
        longest = max(len(r) for r in rows)
        raise ValueError(f"the teacher's prompt (teacher_template) has up to {longest} tokens; with the {T} completion "
                         f"tokens that exceeds the teacher's context of {max_length} positions: shorten the template "
                         "or lower max_new_tokens")
    P = rollouts.prompt_len
    device = rollouts.input_ids_BL.device
    return rollouts.replace(
        input_ids_BL=torch.cat([ids_BP.to(device), rollouts.input_ids_BL[:, P:]], dim=1),
        attention_mask_BL=torch.cat([mask_BP.to(device), rollouts.attention_mask_BL[:, P:]], dim=1),
        prompt_len=ids_BP.shape[1], prompt_texts=texts)


def build_rollouts(tokenizer, prompts: list[str], completions: list[str], *, use_chat_template: bool | str = "auto",
                   add_eos: bool = True, max_length: int | None = None) -> Batch:
    """A batch from given prompt/completion texts (no sampling): SFT on answers or on teacher samples.

    Each completion is tokenized without special tokens and followed by EOS when ``add_eos``; the
    layout and masks are those of :func:`sample`, and ``behaviour_logp`` is 0. Row i is ``prompts[i]``
    with ``completions[i]`` (``prompt_index`` = arange). ``max_length`` (the model's context) is checked.
    The tensors are on the CPU (use ``.to(device)``; the student and teacher functions also move them).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows, texts = encode_prompts(tokenizer, prompts, use_chat_template=use_chat_template)
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if add_eos and not eos_ids:
        raise ValueError("add_eos=True but the tokenizer has no EOS token")
    pad_id = _pad_id(tokenizer, eos_ids)
    completion_rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + (eos_ids[:1] if add_eos else [])
                       for c in completions]
    T = max(1, max(len(r) for r in completion_rows))
    completion_ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    length_mask_BT = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(completion_rows):
        completion_ids_BT[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        length_mask_BT[i, :len(r)] = True
        if max_length is not None and len(rows[i]) + len(r) > max_length:
            raise ValueError(f"example {i} has {len(rows[i]) + len(r)} tokens, more than the model's context "
                             f"of {max_length}: shorten it")
    prompt_ids_BP, prompt_mask_BP = left_pad(rows, pad_id)
    rollouts = _assemble(tokenizer, prompt_ids_BP, prompt_mask_BP, completion_ids_BT, eos_ids if add_eos else [],
                         pad_id, torch.zeros((len(rows), T)), torch.arange(len(rows)), texts)
    # without EOS the masks come from the lengths alone (padding is masked)
    mask_BT = rollouts.mask_BT & length_mask_BT
    return rollouts.replace(mask_BT=mask_BT, completions=list(completions),
                            attention_mask_BL=torch.cat([prompt_mask_BP, mask_BT.long()], dim=1))
