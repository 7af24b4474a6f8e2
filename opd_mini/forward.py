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
from opd_mini.rollouts import Rollouts


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


def on_model_device(model, rollouts: Rollouts) -> Rollouts:
    device = next(model.parameters()).device
    return rollouts if rollouts.input_ids.device == device else rollouts.to(device)


def completion_hidden(model, rollouts: Rollouts) -> tuple[torch.Tensor, torch.nn.Module]:
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
    P, T = rollouts.prompt_len, rollouts.completion_ids.shape[1]
    out = decoder(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                  position_ids=rollouts.position_ids(), use_cache=False)
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


#: Elements of one (B, C, V) logits chunk when the chunk size is chosen automatically: 2^22 fp32 = 16 MB.
AUTO_CHUNK_ELEMENTS = 2 ** 22


@torch.no_grad()
def sampled_token_logprobs(model, rollouts: Rollouts, vocab_size: int | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """log π(y_t|c_t) of the rollouts' completion tokens under ``model``, shape (B, T), no grad; 0 where
    the completion mask is False. One forward of the decoder, then the output head in chunks of
    ``chunk_size`` positions, so the (B, T, V) logits never sit in memory at once (None: as many positions
    as keep a chunk near :data:`AUTO_CHUNK_ELEMENTS`, e.g. 3 at B = 8, V = 151,936; the whole T for a
    small vocabulary). Each position's value does not depend on the chunking."""
    hidden_BTH, _ = completion_hidden(model, rollouts)
    ids_BT = rollouts.completion_ids.to(hidden_BTH.device)
    if chunk_size is None:
        B, V = ids_BT.shape[0], vocab_size or base_model(model).get_output_embeddings().out_features
        chunk_size = max(1, AUTO_CHUNK_ELEMENTS // max(1, B * V))
    chunks = []
    for start in range(0, ids_BT.shape[1], chunk_size):
        logits_BCV = project_logits(model, hidden_BTH[:, start:start + chunk_size], vocab_size)
        y_BC = ids_BT[:, start:start + chunk_size].clamp(max=logits_BCV.shape[-1] - 1)  # masked pads may exceed V
        chunks.append(token_logprobs(logits_BCV, y_BC))
    logp_BT = torch.cat(chunks, dim=1)
    return torch.where(rollouts.completion_mask.to(logp_BT.device), logp_BT, torch.zeros_like(logp_BT))


def completion_logits(model, rollouts: Rollouts, vocab_size: int | None = None) -> torch.Tensor:
    """Student logits (B, T, V) at the positions predicting the completion tokens, with grad.

    One forward over ``input_ids`` (prompt + completion) with the rollouts' attention mask and position
    ids; the logits at sequence positions P-1 .. P+T-2 predict completion tokens 0 .. T-1. Only those
    T positions are projected on the vocabulary (``logits_to_keep``). Trimmed to ``vocab_size``
    (the shared tokenizer length) when given. ``token_logprobs(completion_logits(m, r), r.completion_ids)``
    reproduces the sampler's ``behaviour_logp`` on the masked-in positions.
    """
    rollouts = on_model_device(model, rollouts)
    T = rollouts.completion_ids.shape[1]
    out = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                position_ids=rollouts.position_ids(), use_cache=False, logits_to_keep=T + 1)
    logits_BTV = out.logits[:, :-1]  # the last position predicts past the end of the sequence
    return logits_BTV[..., :vocab_size] if vocab_size is not None else logits_BTV
