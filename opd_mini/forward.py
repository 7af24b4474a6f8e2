"""Running a causal LM over rollouts: hidden states, the output head, log-probs of the sampled tokens.

The student (with grad), the teacher and the sampler (without) all run a model the same way, through
these helpers: one forward of the decoder over prompt + completion with the rollouts' attention mask
and position ids, then the output head on the positions that predict completion tokens, in chunks
when the vocabulary is large. Sharing one op path matters: a teacher identical to the student then
gives r_t = 0 exactly. A peft (LoRA) model is unwrapped with :func:`base_model`; its adapters stay
active unless the caller disables them.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from opd_mini.losses import token_logprobs
from opd_mini.batch import Batch


def is_peft(model) -> bool:
    """True for a peft ``PeftModel`` (a LoRA student)."""
    return isinstance(model, PeftModel)


def base_model(model) -> PreTrainedModel:
    """The underlying ``*ForCausalLM`` (unwraps a peft model; its LoRA layers stay injected)."""
    return model.get_base_model() if is_peft(model) else model


def embedding_rows(model) -> int:
    """Number of rows of the model's output head (its logits' size), padding rows included."""
    head = base_model(model).get_output_embeddings()
    rows = getattr(head, "out_features", None)
    return int(rows if rows is not None else model.config.vocab_size)


def on_model_device(model, rollouts: Batch) -> Batch:
    device = next(model.parameters()).device
    return rollouts if rollouts.input_ids_BL.device == device else rollouts.to(device)


def completion_hidden(model, rollouts: Batch) -> tuple[torch.Tensor, torch.nn.Module]:
    """Final hidden states at the positions that predict the completion tokens, and the output head.

    Returns ``(hidden_BTH, lm_head)`` with ``lm_head(hidden_BTH)`` = the logits of
    :func:`completion_logits` (before trimming), so a loss can project the vocabulary in chunks
    along T. Gradients flow. Position t of the result is sequence position P-1+t.
    (Models whose logits are more than ``lm_head(hidden)``, e.g. with final logit soft-capping, need
    :func:`project_logits` instead of calling the head directly.)
    """
    base = base_model(model)
    decoder = getattr(base, base.base_model_prefix)  # e.g. LlamaModel: embeddings, blocks, final norm
    rollouts = on_model_device(model, rollouts)
    P, T = rollouts.prompt_len, rollouts.tokens_BT.shape[1]
    out = decoder(input_ids=rollouts.input_ids_BL, attention_mask=rollouts.attention_mask_BL,
                  position_ids=rollouts.position_ids_BL(), use_cache=False)
    hidden_BTH = out.last_hidden_state[:, P - 1:P + T - 1]
    return hidden_BTH, base.get_output_embeddings()


def project_logits(model, hidden_BTH: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) from final hidden states: the output head, the model's final logit soft-capping
    when its config has one, trimmed to the first ``vocab_size`` entries."""
    base = base_model(model)
    logits_BTV = base.get_output_embeddings()(hidden_BTH)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits_BTV = torch.tanh(logits_BTV / softcap) * softcap
    return logits_BTV[..., :vocab_size] if vocab_size is not None else logits_BTV


#: Elements of the largest logits chunk the no-grad paths (scoring, behaviour log-probs, evaluation) hold at
#: once: 2^22, 16 MB in fp32, e.g. 27 rows × 1 position at V = 151,936, or the whole (B, T) of a small vocabulary.
CHUNK_ELEMENTS = 2 ** 22


def logit_chunks(B: int, T: int, V: int, *, positions: int | None = None,
                 budget: int = CHUNK_ELEMENTS) -> list[tuple[slice, slice]]:
    """(rows, positions) slices covering a (B, T) grid so that each chunk's (R, C, V) logits hold at most
    ``budget`` elements (at least one row × one position): whole rows of several positions while they fit,
    else fewer rows of one position. ``positions`` fixes C instead (all rows per chunk). The same (B, T, V)
    gives the same chunks everywhere, so two sides that score one batch use the same ops on the same shapes."""
    if positions:
        return [(slice(0, B), slice(t, t + positions)) for t in range(0, T, positions)]
    C = min(T, max(1, budget // max(1, B * V)))
    R = B if C > 1 or B * V <= budget else max(1, budget // max(1, V))
    return [(slice(b, b + R), slice(t, t + C)) for b in range(0, B, R) for t in range(0, T, C)]


@torch.no_grad()
def sampled_token_logprobs(model, rollouts: Batch, vocab_size: int | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """log π(y_t|c_t) of the batch's completion tokens under ``model``, shape (B, T), no grad; 0 where the
    mask is False. One forward of the decoder, then the output head chunk by chunk (:func:`logit_chunks`;
    ``chunk_size`` positions of every row when given), so the (B, T, V) logits never sit in memory at once.
    Each position's value does not depend on the chunking."""
    hidden_BTH, _ = completion_hidden(model, rollouts)
    ids_BT = rollouts.tokens_BT.to(hidden_BTH.device)
    B, T = ids_BT.shape
    V = vocab_size or base_model(model).get_output_embeddings().out_features
    logp_BT = torch.zeros(B, T, device=hidden_BTH.device)
    for rows, cols in logit_chunks(B, T, V, positions=chunk_size):
        logits_RCV = project_logits(model, hidden_BTH[rows, cols], vocab_size)
        logp_BT[rows, cols] = token_logprobs(logits_RCV, ids_BT[rows, cols].clamp(max=logits_RCV.shape[-1] - 1))
    return torch.where(rollouts.mask_BT.to(logp_BT.device), logp_BT, torch.zeros_like(logp_BT))


def completion_logits(model, rollouts: Batch, vocab_size: int | None = None) -> torch.Tensor:
    """Student logits (B, T, V) at the positions predicting the completion tokens, with grad.

    One forward over ``input_ids_BL`` (prompt + completion) with the rollouts' attention mask and position
    ids; the logits at sequence positions P-1 .. P+T-2 predict completion tokens 0 .. T-1. Only those
    T positions are projected on the vocabulary (``logits_to_keep``). Trimmed to ``vocab_size``
    (the shared tokenizer length) when given. ``token_logprobs(completion_logits(m, r), r.tokens_BT)``
    reproduces the sampler's ``behaviour_logp_BT`` on the masked-in positions.
    """
    rollouts = on_model_device(model, rollouts)
    T = rollouts.tokens_BT.shape[1]
    out = model(input_ids=rollouts.input_ids_BL, attention_mask=rollouts.attention_mask_BL,
                position_ids=rollouts.position_ids_BL(), use_cache=False, logits_to_keep=T + 1)
    logits_BTV = out.logits[:, :-1]  # the last position predicts past the end of the sequence
    return logits_BTV[..., :vocab_size] if vocab_size is not None else logits_BTV
