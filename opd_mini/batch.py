"""The micro-batch: one type that carries a batch from the sampler, through the teacher, to the loss.

Every field has one name from start to end, with its shape in the suffix (``B`` rows, ``T`` completion
positions, ``L`` = P + T sequence positions, ``V`` vocabulary, ``K`` the teacher's top-K, ``H`` hidden)::

    sampler  (opd_mini.sampler.sample)      input_ids_BL, attention_mask_BL, prompt_len, prompt_index_B,
                                            tokens_BT, mask_BT, behaviour_logp_BT, completions, prompt_texts,
                                            slipped_BT (with --slip_prob)
    loop     (opd_mini.train)               rewards_B, group_size, num_tokens  (and mask_BT narrowed by
                                            --mask_special_tokens and by slipped_BT)
    teacher  (opd_mini.teacher.score)       teacher_logp_BT, teacher_entropy_BT, and what the loss asks for:
                                            teacher_topk_ids_BTK / teacher_topk_logp_BTK, or teacher_logp_BTV,
                                            or teacher_hidden_BTH + teacher_head (the fused path)
    loss     (opd_mini.registry)            reads any of the above

Each stage returns a new ``Batch`` with its fields set (``dataclasses.replace``): the teacher's fields are
part of the batch it returns, not written into an existing one. The layout of the sequence fields::

    input_ids_BL       [pad pad p p p p | y y y EOS pad pad]     (B, P+T)
                        left-padded prompt  completion, right-padded
    attention_mask_BL  [ 0   0  1 1 1 1 | 1 1 1  1   0   0 ]     (B, P+T)
    mask_BT                             [ T T T  T   F   F ]     (B, T)  the first EOS is kept and trained

The logits that predict completion token t sit at sequence position P-1+t. Position ids are counted
over the attention mask (``cumsum - 1``), the same way ``generate`` counts them, so a later forward
pass over ``input_ids_BL`` (:func:`opd_mini.forward.completion_logits`) reproduces the sampling-time
log-probabilities exactly. The toy world (``toy/``) has no token sequences: it builds batches of
``tokens_BT`` and the teacher's fields only (:meth:`Batch.from_teacher_logits`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from opd_mini.losses import token_logprobs

#: What a loss can ask of the teacher, cheapest first (see :meth:`Batch.from_teacher_logits`).
SIGNALS = ("sampled", "topk", "full")


@dataclass
class Batch:
    """One micro-batch of B rows (see the module docstring for who fills which field)."""

    tokens_BT: torch.Tensor  # (B, T) long: the completion tokens y_t (the student's samples; the teacher's for SFT)
    mask_BT: torch.Tensor  # (B, T) bool: positions that count: tokens up to and including the first EOS
    # --- the token sequences (the transformer loop; None in the toy world) --------------------------------
    input_ids_BL: torch.Tensor | None = None  # (B, P+T) long: left-padded prompt + right-padded completion
    attention_mask_BL: torch.Tensor | None = None  # (B, P+T) long: 1 on prompt tokens and kept completion tokens
    prompt_len: int = 0  # P
    prompt_index_B: torch.Tensor | None = None  # (B,) long: row b is a sample of prompts[prompt_index_B[b]]
    completions: list[str] = field(default_factory=list)  # decoded completion text up to the first EOS
    prompt_texts: list[str] = field(default_factory=list)  # the prompts as fed to the tokenizer, one per prompt
    behaviour_logp_BT: torch.Tensor | None = None  # (B, T) log π_behaviour(y_t|c_t) at sampling time; 0 where masked
    slipped_BT: torch.Tensor | None = None  # (B, T) bool: the environment swapped this token (--slip_prob): not the
    #                                        policy's action, so the loop leaves it out of mask_BT; None: no slips
    # --- the loop ----------------------------------------------------------------------------------------
    rewards_B: torch.Tensor | None = None  # (B,) the task's verifiable reward of each row
    group_size: int = 1  # rows per prompt, consecutive (the GRPO group)
    num_tokens: float | None = None  # the loss normaliser N (the whole step's count); None = mask_BT.sum()
    truncated_B: torch.Tensor | None = None  # (B,) bool: the completion reached max_new_tokens without an EOS
    # --- the teacher -------------------------------------------------------------------------------------
    teacher_logp_BT: torch.Tensor | None = None  # (B, T) log q(y_t|c_t); 0 where masked
    teacher_entropy_BT: torch.Tensor | None = None  # (B, T) H(q(·|c_t)) in nats; 0 where masked
    teacher_topk_ids_BTK: torch.Tensor | None = None  # (B, T, K) the teacher's K most likely tokens
    teacher_topk_logp_BTK: torch.Tensor | None = None  # (B, T, K) their log q (normalised over the vocabulary)
    teacher_logp_BTV: torch.Tensor | None = None  # (B, T, V) log q(·|c_t) (full-vocabulary losses)
    teacher_hidden_BTH: torch.Tensor | None = None  # (B, T, H) the teacher's final hidden states (the fused path)
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # hidden (B, C, H) -> logits (B, C, V)

    # ------------------------------------------------------------------------------------------------------
    @property
    def num_masked(self) -> int:
        """Masked-in completion tokens of this micro-batch."""
        return int(self.mask_BT.sum())

    def position_ids_BL(self) -> torch.Tensor:
        """(B, P+T) position ids counted over the attention mask, as ``generate`` counts them."""
        return position_ids_from_mask(self.attention_mask_BL)

    def replace(self, **changes) -> "Batch":
        """A copy with some fields changed (the tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor moved to ``device`` (a no-op copy when they are there already)."""
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in fields(self)}
        return Batch(**moved)

    def select(self, rows: slice | torch.Tensor | list[int]) -> "Batch":
        """The batch restricted to some rows; ``prompt_index_B`` and the texts follow the rows."""
        idx = torch.arange(self.tokens_BT.shape[0])[rows]
        idx_list = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and f.name.endswith(("_B", "_BT", "_BL", "_BTK", "_BTV", "_BTH")):
                v = v[idx.to(v.device)]
            elif f.name == "completions":
                v = [v[i] for i in idx_list] if v else []
            elif f.name == "prompt_texts":
                v = list(v)
            out[f.name] = v
        return Batch(**out)

    def slice_T(self, s: slice) -> "Batch":
        """The batch restricted to completion positions ``s`` (a distribution loss computed in chunks); a teacher
        kept as hidden states is projected on those positions only (``teacher_logp_BTV`` of the chunk)."""
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in cut.items():
            if isinstance(value, torch.Tensor) and name.endswith(("_BT", "_BTK", "_BTV", "_BTH")):
                cut[name] = value[:, s]
        if self.teacher_logp_BTV is None and self.teacher_hidden_BTH is not None:
            cut["teacher_logp_BTV"] = self._project(cut["teacher_hidden_BTH"])
            cut["teacher_hidden_BTH"] = cut["teacher_head"] = None
        return Batch(**cut)

    def teacher_logp_chunk(self, s: slice) -> torch.Tensor:
        """log q(·|c_t) at completion positions ``s``, (B, C, V) float32, no grad: a slice of ``teacher_logp_BTV``,
        or the teacher's head and a log-softmax applied to its kept hidden states of those positions only."""
        if self.teacher_logp_BTV is not None:
            return self.teacher_logp_BTV[:, s]
        if self.teacher_hidden_BTH is None:
            raise ValueError("the batch carries no full teacher distribution: score it with signal 'full'")
        return self._project(self.teacher_hidden_BTH[:, s])

    def _project(self, hidden_BCH: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(self.teacher_head(hidden_BCH).float(), dim=-1)

    @classmethod
    def from_teacher_logits(cls, tokens_BT: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, signal: str | None,
                            top_k: int = 0, mask_BT: torch.Tensor | None = None, **fields_) -> "Batch":
        """A batch whose teacher fields come from the teacher's logits (B, T, V) held in one piece: the toy
        world and the tests use it; the transformer loop fills the same fields chunk by chunk
        (:func:`opd_mini.teacher.score`). ``fields_`` sets any other field (``num_tokens``, ``rewards_B`` …)."""
        mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool) if mask_BT is None else mask_BT
        batch = cls(tokens_BT=tokens_BT, mask_BT=mask_BT, **fields_)
        if signal is None:
            return batch
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS} or None, got {signal!r}")
        batch.teacher_logp_BT = token_logprobs(teacher_logits_BTV, tokens_BT)
        if signal == "sampled":
            return batch
        logp_BTV = F.log_softmax(teacher_logits_BTV.float(), dim=-1)
        if signal == "topk":
            batch.teacher_topk_logp_BTK, batch.teacher_topk_ids_BTK = logp_BTV.topk(top_k, dim=-1)
        else:
            batch.teacher_logp_BTV = logp_BTV
        return batch


def position_ids_from_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) = number of attended tokens before each position (0 on left padding)."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask_from_ids(tokens_BT: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """(B, T) bool: True up to and including the first EOS of each row, False after it.

    Works when the pad token equals EOS (``generate`` then fills finished rows with EOS): only the first
    EOS counts. A row without EOS (cut by ``max_new_tokens``) is True everywhere.
    """
    if eos_token_id is None:
        return torch.ones_like(tokens_BT, dtype=torch.bool)
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              device=tokens_BT.device)
    is_eos_BT = torch.isin(tokens_BT, eos_ids)
    # number of EOS strictly before position t; a position is kept when that number is 0
    eos_before_BT = is_eos_BT.long().cumsum(-1) - is_eos_BT.long()
    return eos_before_BT == 0
