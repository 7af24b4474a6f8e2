"""The teacher: load it (optionally 4-bit/8-bit through bitsandbytes) and score the student's rollouts.

Scoring is one no-grad forward of the teacher's decoder over prompt + completion, followed by the
output head and a log-softmax over the shared vocabulary **in chunks of rows and positions**, so the
full (B, T, V) teacher logits never sit in memory at once (with V = 151,936, B = 8, T = 256 they alone
would be 1.2 GB in float32). Each chunk keeps only what the loss needs, in the batch's teacher fields::

    teacher_logp_BT        (B, T)     log q(y_t | c_t) of the student's sampled tokens
    teacher_entropy_BT     (B, T)     H(q(·|c_t)) = −Σ_v q(v|c_t) log q(v|c_t), in nats
    teacher_topk_ids_BTK   (B, T, K)  the teacher's K most likely tokens at each position (top_k > 0)
    teacher_topk_logp_BTK  (B, T, K)  their log-probabilities (normalised over the full shared vocabulary)
    teacher_logp_BTV       (B, T, V)  only with full=True (full-vocabulary losses, the readable reference path)
    teacher_hidden_BTH     (B, T, H)  only with keep_hidden=True: the fused path of the full-vocabulary losses
                                      keeps the teacher's final hidden states and projects them chunk by chunk
                                      (:meth:`opd_mini.batch.Batch.teacher_logp_chunk`): no (B, T, V) tensor
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from opd_mini.forward import completion_hidden, embedding_rows, is_peft, logit_chunks, project_logits
from opd_mini.loading import QuantizationError, load_pretrained, quantization_config
from opd_mini.losses import token_logprobs
from opd_mini.batch import Batch

#: ``quantization_config`` and ``QuantizationError`` live in :mod:`opd_mini.loading` and are kept here too,
#: next to the teacher that uses them most.
__all__ = ["QuantizationError", "check_same_tokenizer", "load_teacher", "quantization_config",
           "score", "shared_vocab_size", "teacher_is_student_base"]


def load_teacher(name_or_path, *, quantization: str = "none", device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype | None = None):
    """Load a frozen teacher (eval mode, no grad) from a hub id or a local ``save_pretrained`` directory.

    ``quantization``: ``"none"`` (weights in ``compute_dtype``), ``"8bit"`` (LLM.int8) or ``"4bit"``
    (NF4 with double quantization) through bitsandbytes. ``compute_dtype`` defaults to bfloat16 on a
    CUDA GPU that supports it and float32 on the CPU. Where bitsandbytes cannot run, a
    :class:`QuantizationError` says why and what to do instead.
    """
    model = load_pretrained(name_or_path, quantization=quantization, device=device, dtype=compute_dtype)
    model.eval()
    model.requires_grad_(False)
    return model


#: Special tokens whose ids must agree: they delimit what the teacher scores.
SPECIAL_TOKEN_ATTRS = ("eos_token", "bos_token", "unk_token")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, *, chat_template: bool = True) -> None:
    """Raise ValueError unless the two tokenizers mean the same thing by every id.

    Compared: the vocabulary (id → token, both ways), the EOS/BOS/UNK tokens and their ids, and, when
    ``chat_template`` (prompts are rendered with it), the chat template. A teacher whose ids mean other
    tokens would score the student's samples as a different text, with no error anywhere downstream,
    so this is checked before any training. Embedding rows past the tokenizer (padding) are not part of
    a tokenizer and are allowed to differ (see :func:`shared_vocab_size`).
    """
    n_s, n_t = len(student_tokenizer), len(teacher_tokenizer)
    fix = "on-policy distillation needs one tokenizer: pick a teacher of the student's model family"
    if n_s != n_t:
        raise ValueError(f"student and teacher tokenizers differ (student {n_s} tokens, teacher {n_t} tokens): {fix}")
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab_s != vocab_t:
        by_id_s = {i: tok for tok, i in vocab_s.items()}
        by_id_t = {i: tok for tok, i in vocab_t.items()}
        first = min(i for i in set(by_id_s) | set(by_id_t) if by_id_s.get(i) != by_id_t.get(i))
        raise ValueError(f"student and teacher tokenizers differ: token id {first} is {by_id_s.get(first)!r} for the "
                         f"student and {by_id_t.get(first)!r} for the teacher (both have {n_s} tokens): {fix}")
    for attr in SPECIAL_TOKEN_ATTRS:
        a, b = getattr(student_tokenizer, attr, None), getattr(teacher_tokenizer, attr, None)
        if a != b:
            raise ValueError(f"student and teacher tokenizers differ in {attr}: student {a!r}, teacher {b!r} "
                             f"(the teacher would score where sequences end differently): {fix}")
    if chat_template:
        a, b = getattr(student_tokenizer, "chat_template", None), getattr(teacher_tokenizer, "chat_template", None)
        if a != b:
            raise ValueError("student and teacher tokenizers have different chat templates, so the teacher would "
                             "score prompts rendered in a format it was not trained on: pick a teacher with the "
                             "student's template, or render prompts without one (--use_chat_template no)")


def shared_vocab_size(tokenizer, student_model, teacher_model, *, teacher_tokenizer=None) -> int:
    """The vocabulary size both models' logits are trimmed to: ``len(tokenizer)``.

    Embedding matrices are often padded past the tokenizer (e.g. 151,936 vs 152,064 rows within one
    model family); the extra rows are never produced by the tokenizer and are dropped. A real mismatch
    raises ValueError naming both sizes: a head smaller than the tokenizer, or (when
    ``teacher_tokenizer`` is given) a teacher tokenizer of a different length or vocabulary.
    """
    n = len(tokenizer)
    s_rows, t_rows = embedding_rows(student_model), embedding_rows(teacher_model)
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer, chat_template=False)
    if s_rows < n or t_rows < n:
        raise ValueError(
            f"vocabulary mismatch: the student's output head has {s_rows} rows and the teacher's {t_rows}, "
            f"but the tokenizer has {n} tokens; both must cover the tokenizer (a difference only in padding rows "
            "above the tokenizer length is fine): pick a teacher and student that share a tokenizer")
    return n


def teacher_is_student_base(student_model, teacher_name_or_path) -> bool:
    """True when ``student_model`` is a LoRA student whose base is ``teacher_name_or_path``: the teacher
    is then the student with its adapter disabled (``score(..., disable_adapter=True)``), no second copy."""
    if not is_peft(student_model) or teacher_name_or_path is None:
        return False
    base = student_model.peft_config[student_model.active_adapter].base_model_name_or_path
    if base is None:
        return False
    same = str(base) == str(teacher_name_or_path)
    if os.path.exists(str(base)) and os.path.exists(str(teacher_name_or_path)):
        same = os.path.realpath(str(base)) == os.path.realpath(str(teacher_name_or_path))
    return same


@torch.no_grad()
def score(teacher_model, batch: Batch, *, vocab_size: int, top_k: int = 0, full: bool = False,
          keep_hidden: bool = False, chunk_size: int = 0, disable_adapter: bool = False,
          view: Batch | None = None) -> Batch:
    """The batch with the teacher's fields filled: q scores the completions ``batch.tokens_BT``.

    ``view`` is what the teacher reads (default: the batch itself; a privileged prompt in front of the same
    completion tokens, :func:`opd_mini.sampler.with_prompts`). One no-grad forward of the decoder gives
    hidden states (B, T, H); then, chunk by chunk (:func:`opd_mini.forward.logit_chunks`: rows and positions,
    at most :data:`~opd_mini.forward.CHUNK_ELEMENTS` logits at once, or ``chunk_size`` positions of every row),
    the output head and a float32 log-softmax over the first ``vocab_size`` logits give (R, C, V)
    log-probabilities, from which the sampled token's log-prob (``teacher_logp_BT``), the entropy
    (``teacher_entropy_BT``) and, with ``top_k`` > 0, the top-K ids and log-probs are kept; the chunk is then
    freed. ``full=True`` also keeps the whole (B, T, V) log-probabilities (``teacher_logp_BTV``, the readable
    reference path of the full-vocabulary losses); ``keep_hidden=True`` keeps the hidden states and the head
    instead (``teacher_hidden_BTH``, ``teacher_head``), from which :meth:`Batch.teacher_logp_chunk` projects any
    chunk on demand (the same ops, so the same values). ``disable_adapter=True`` scores a LoRA student with its
    adapter switched off, i.e. its own base model (self-distillation). The teacher's fields are returned on
    the batch's device.
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = sized by element count), got {chunk_size}")
    if not (0 <= top_k <= vocab_size):
        raise ValueError(f"top_k must lie in [0, vocab_size={vocab_size}], got {top_k}")
    if disable_adapter and not is_peft(teacher_model):
        raise ValueError("disable_adapter=True needs a peft (LoRA) model: the teacher would be its base model")
    device = next(teacher_model.parameters()).device
    seen = (batch if view is None else view).to(device)
    ids_BT, mask_BT = seen.tokens_BT.clamp(max=vocab_size - 1), seen.mask_BT  # masked pads may exceed V
    B, T = ids_BT.shape
    f32 = dict(device=device, dtype=torch.float32)
    sampled_BT, entropy_BT = torch.zeros(B, T, **f32), torch.zeros(B, T, **f32)
    topk_logp_BTK = torch.zeros(B, T, top_k, **f32) if top_k else None
    topk_ids_BTK = torch.zeros(B, T, top_k, device=device, dtype=torch.long) if top_k else None
    full_BTV = torch.zeros(B, T, vocab_size, **f32) if full else None

    was_training = teacher_model.training
    teacher_model.eval()
    try:
        with teacher_model.disable_adapter() if disable_adapter else nullcontext():
            hidden_BTH, _ = completion_hidden(teacher_model, seen)
            for rows, cols in logit_chunks(B, T, vocab_size, positions=chunk_size or None):
                logits_RCV = project_logits(teacher_model, hidden_BTH[rows, cols], vocab_size).float()
                if logits_RCV.shape[-1] != vocab_size:
                    raise ValueError(f"the teacher produces {logits_RCV.shape[-1]} logits, "
                                     f"fewer than vocab_size={vocab_size}")
                # the same op as the student side (losses.token_logprobs), so a teacher identical to the student
                # gives r_t = 0 exactly: an optimizer like Adam would otherwise amplify rounding into real steps
                sampled_BT[rows, cols] = token_logprobs(logits_RCV, ids_BT[rows, cols])
                logp_RCV = F.log_softmax(logits_RCV, dim=-1)
                entropy_BT[rows, cols] = -(logp_RCV.exp() * logp_RCV).nan_to_num(0.0).sum(-1)  # 0 · (−inf) = 0
                if top_k:
                    topk_logp_BTK[rows, cols], topk_ids_BTK[rows, cols] = logp_RCV.topk(top_k, dim=-1)
                if full:
                    full_BTV[rows, cols] = logp_RCV
                del logits_RCV, logp_RCV
    finally:
        teacher_model.train(was_training)

    def head(h_BCH: torch.Tensor) -> torch.Tensor:  # the teacher's head, as used above
        with teacher_model.disable_adapter() if disable_adapter else nullcontext():
            return project_logits(teacher_model, h_BCH, vocab_size)

    out = batch.tokens_BT.device
    move = lambda x: x.to(out) if x is not None else None  # noqa: E731
    keep_BT = mask_BT.to(out)
    return batch.replace(
        teacher_logp_BT=torch.where(keep_BT, move(sampled_BT), 0.0),
        teacher_entropy_BT=torch.where(keep_BT, move(entropy_BT), 0.0),
        teacher_topk_ids_BTK=move(topk_ids_BTK), teacher_topk_logp_BTK=move(topk_logp_BTK),
        teacher_logp_BTV=move(full_BTV),
        teacher_hidden_BTH=move(hidden_BTH) if keep_hidden else None, teacher_head=head if keep_hidden else None)
