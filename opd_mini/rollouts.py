"""The data of one batch of rollouts, and the micro-batch the loop trains on.

Layout of a batch of rollouts (B = len(prompts) · num_generations, P = longest prompt, T = new tokens)::

    input_ids       [pad pad p p p p | y y y EOS pad pad]     (B, P+T)
                     left-padded prompt  completion, right-padded
    attention_mask  [ 0   0  1 1 1 1 | 1 1 1  1   0   0 ]     (B, P+T)
    completion_mask                  [ T T T  T   F   F ]     (B, T)  the first EOS is kept and trained

The logits that predict completion token t sit at sequence position P-1+t. Position ids are counted
over the attention mask (``cumsum - 1``), the same way ``generate`` counts them, so a later forward
pass over ``input_ids`` (:func:`opd_mini.forward.completion_logits`) reproduces the sampling-time
log-probabilities exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opd_mini.registry import LossBatch


@dataclass
class Rollouts:
    """A batch of prompt+completion sequences and their masks (see the module docstring for the layout).

    Rows ``i*num_generations .. (i+1)*num_generations-1`` are the samples of ``prompts[i]``.
    """

    input_ids: torch.Tensor  # (B, P+T) long: left-padded prompt + right-padded completion
    attention_mask: torch.Tensor  # (B, P+T) long: 1 on real prompt tokens and completion tokens up to the first EOS
    completion_ids: torch.Tensor  # (B, T) long: input_ids[:, P:]
    completion_mask: torch.Tensor  # (B, T) bool: generated tokens up to and including the first EOS
    behaviour_logp: torch.Tensor  # (B, T) float32: log π_student(y_t|c_t) under the sampling weights (raw logits); 0 where masked
    prompt_len: int  # P
    prompt_index: torch.Tensor  # (B,) long: index into the prompts list
    completions: list[str]  # decoded completion text up to the first EOS (special tokens skipped)
    # the prompt strings as fed to the tokenizer (after any chat template), one per prompt
    prompt_texts: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Number of masked-in completion tokens (the loss normaliser)."""
        return int(self.completion_mask.sum())

    def position_ids(self) -> torch.Tensor:
        """(B, P+T) position ids counted over the attention mask, as ``generate`` counts them."""
        return position_ids_from_mask(self.attention_mask)

    def to(self, device: torch.device | str) -> "Rollouts":
        """A copy with every tensor moved to ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Rollouts(**moved)

    def select(self, rows: slice | torch.Tensor | list[int]) -> "Rollouts":
        """The rollouts of some rows (e.g. a micro-batch); ``prompt_index`` and texts follow the rows."""
        idx = torch.arange(self.input_ids.shape[0])[rows]
        idx_list = idx.tolist()
        return Rollouts(
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
            completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
            behaviour_logp=self.behaviour_logp[idx], prompt_len=self.prompt_len,
            prompt_index=self.prompt_index[idx], completions=[self.completions[i] for i in idx_list],
            prompt_texts=list(self.prompt_texts),
        )


def position_ids_from_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) = number of attended tokens before each position (0 on left padding)."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask_from_ids(completion_ids_BT: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """(B, T) bool: True up to and including the first EOS of each row, False after it.

    Works when the pad token equals EOS (``generate`` then fills finished rows with EOS): only the first
    EOS counts. A row without EOS (cut by ``max_new_tokens``) is True everywhere.
    """
    if eos_token_id is None:
        return torch.ones_like(completion_ids_BT, dtype=torch.bool)
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              device=completion_ids_BT.device)
    is_eos_BT = torch.isin(completion_ids_BT, eos_ids)
    # number of EOS strictly before position t; a position is kept when that number is 0
    eos_before_BT = is_eos_BT.long().cumsum(-1) - is_eos_BT.long()
    return eos_before_BT == 0


@dataclass
class MicroBatch:
    """One micro-batch of a training step: its rollouts (what the student's forward pass reads) and the
    loss inputs (what the registered loss reads; the teacher's fields are filled after scoring)."""

    rollouts: Rollouts
    inputs: LossBatch

    @property
    def mask_BT(self) -> torch.Tensor:
        return self.inputs.mask_BT
