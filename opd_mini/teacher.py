"""The teacher: load it (optionally 4-bit/8-bit through bitsandbytes) and score the student's rollouts.

Scoring is one no-grad forward of the teacher's decoder over prompt + completion, followed by the
output head and a log-softmax over the shared vocabulary **in chunks of positions**, so the full
(B, T, V) teacher logits never sit in memory at once (with V = 151,936, B = 8, T = 256 they alone
would be 1.2 GB in float32). Each chunk keeps only what the losses need::

    sampled_logp  (B, T)     log q(y_t | c_t) of the student's sampled tokens
    topk_ids      (B, T, K)  the teacher's K most likely tokens at each position
    topk_logp     (B, T, K)  their log-probabilities (normalised over the full shared vocabulary)
    entropy       (B, T)     H(q(·|c_t)) = −Σ_v q(v|c_t) log q(v|c_t), in nats
    full_logp     (B, T, V)  only with full=True (full-vocabulary losses, the readable reference path)
    hidden        (B, T, H)  only with keep_hidden=True: the fused path of the full-vocabulary losses keeps
                             the teacher's final hidden states and projects them chunk by chunk
                             (:meth:`TeacherSignal.full_logp_chunk`), so no (B, T, V) tensor exists
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from opd_mini.forward import completion_hidden, embedding_rows, is_peft, project_logits
from opd_mini.loading import QuantizationError, load_pretrained, quantization_config
from opd_mini.losses import token_logprobs
from opd_mini.rollouts import Rollouts

#: ``quantization_config`` and ``QuantizationError`` live in :mod:`opd_mini.loading` and are kept here too,
#: next to the teacher that uses them most.
__all__ = ["QuantizationError", "TeacherSignal", "check_same_tokenizer", "load_teacher", "quantization_config",
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


@dataclass
class TeacherSignal:
    """What the losses need from the teacher, per completion position (see the module docstring)."""

    sampled_logp: torch.Tensor  # (B, T) float32: log q(y_t|c_t); 0 where the completion mask is False
    topk_ids: torch.Tensor | None  # (B, T, K) long, or None when top_k = 0
    topk_logp: torch.Tensor | None  # (B, T, K) float32, log-softmax over the full shared vocabulary
    entropy: torch.Tensor  # (B, T) float32: H(q(·|c_t)) in nats; 0 where the completion mask is False
    full_logp: torch.Tensor | None = None  # (B, T, V) float32, only when scored with full=True
    hidden: torch.Tensor | None = None  # (B, T, H) the teacher's final hidden states, only with keep_hidden=True
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # hidden (B, C, H) -> logits (B, C, V)

    def full_logp_chunk(self, s: slice) -> torch.Tensor:
        """log q(·|c_t) at completion positions ``s``, (B, C, V) float32, no grad: a slice of ``full_logp``, or
        the output head and log-softmax applied to the kept hidden states of those positions only."""
        if self.full_logp is not None:
            return self.full_logp[:, s]
        if self.hidden is None:
            raise ValueError("the teacher was scored without full=True or keep_hidden=True")
        with torch.no_grad():
            return F.log_softmax(self.project(self.hidden[:, s]).float(), dim=-1)


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
def score(teacher_model, rollouts: Rollouts, *, vocab_size: int, top_k: int = 0, full: bool = False,
          keep_hidden: bool = False, chunk_size: int = 64, disable_adapter: bool = False) -> TeacherSignal:
    """Score the rollouts under the teacher q, in chunks of ``chunk_size`` completion positions.

    One no-grad forward of the decoder gives hidden states (B, T, H); then for each chunk of C
    positions the output head and a float32 log-softmax over the first ``vocab_size`` logits give
    (B, C, V) log-probabilities, from which the sampled token's log-prob, the top-``top_k`` ids and
    log-probs and the entropy are kept; the chunk is then freed. ``full=True`` also keeps the whole
    (B, T, V) log-probabilities (for full-vocabulary losses); ``keep_hidden=True`` keeps the (B, T, H)
    hidden states instead, from which :meth:`TeacherSignal.full_logp_chunk` projects any chunk on demand
    (the same ops, so the same values). ``disable_adapter=True`` scores a LoRA student with its adapter
    switched off, i.e. its own base model (self-distillation).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not (0 <= top_k <= vocab_size):
        raise ValueError(f"top_k must lie in [0, vocab_size={vocab_size}], got {top_k}")
    if disable_adapter and not is_peft(teacher_model):
        raise ValueError("disable_adapter=True needs a peft (LoRA) model: the teacher would be its base model")
    device = next(teacher_model.parameters()).device
    rollouts = rollouts.to(device)
    ids_BT, mask_BT = rollouts.completion_ids, rollouts.completion_mask
    B, T = ids_BT.shape

    was_training = teacher_model.training
    teacher_model.eval()
    try:
        with teacher_model.disable_adapter() if disable_adapter else nullcontext():
            hidden_BTH, _ = completion_hidden(teacher_model, rollouts)
            sampled, entropy, topk_ids, topk_logp, full_logp = [], [], [], [], []
            for start in range(0, T, chunk_size):
                h_BCH = hidden_BTH[:, start:start + chunk_size]
                logits_BCV = project_logits(teacher_model, h_BCH, vocab_size).float()
                if logits_BCV.shape[-1] != vocab_size:
                    raise ValueError(f"the teacher produces {logits_BCV.shape[-1]} logits, "
                                     f"fewer than vocab_size={vocab_size}")
                y_BC = ids_BT[:, start:start + chunk_size].clamp(max=vocab_size - 1)  # masked pads may exceed it
                # the same op as the student side (losses.token_logprobs), so a teacher identical to the student
                # gives r_t = 0 exactly: an optimizer like Adam would otherwise amplify rounding into real steps
                sampled.append(token_logprobs(logits_BCV, y_BC))
                logp_BCV = F.log_softmax(logits_BCV, dim=-1)
                p_BCV = logp_BCV.exp()
                entropy.append(-(p_BCV * logp_BCV).nan_to_num(0.0).sum(-1))  # 0 · (−inf) = 0
                if top_k > 0:
                    values, indices = logp_BCV.topk(top_k, dim=-1)
                    topk_logp.append(values)
                    topk_ids.append(indices)
                if full:
                    full_logp.append(logp_BCV)
                del logits_BCV, logp_BCV, p_BCV
    finally:
        teacher_model.train(was_training)

    def project(h_BCH: torch.Tensor) -> torch.Tensor:  # the teacher's head, as used above
        with teacher_model.disable_adapter() if disable_adapter else nullcontext():
            return project_logits(teacher_model, h_BCH, vocab_size)

    zero = torch.zeros((), device=device)
    return TeacherSignal(
        sampled_logp=torch.where(mask_BT, torch.cat(sampled, dim=1), zero),
        topk_ids=torch.cat(topk_ids, dim=1) if top_k > 0 else None,
        topk_logp=torch.cat(topk_logp, dim=1) if top_k > 0 else None,
        entropy=torch.where(mask_BT, torch.cat(entropy, dim=1), zero),
        full_logp=torch.cat(full_logp, dim=1) if full else None,
        hidden=hidden_BTH if keep_hidden else None, project=project if keep_hidden else None,
    )
