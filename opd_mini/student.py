"""The student: load it (LoRA adapters or full fine-tuning), run it over rollouts, save it.

A LoRA student is a peft ``PeftModel``: low-rank adapters ``W + (α/r)·B·A`` on every linear layer of
the decoder by default (``lora_target_modules="all-linear"``; the output head is left alone), with the
base weights frozen. Adapters are saved with ``save_pretrained`` and reload with plain peft::

    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, adapter_path)

Because the base weights stay untouched, the student's own starting point is available as a teacher
for free: score with ``with model.disable_adapter():`` (see :func:`opd_mini.teacher.score`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from opd_mini.losses import token_logprobs
from opd_mini.sampler import Rollouts


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard requirement, but keep the check cheap
        return False
    return isinstance(model, PeftModel)


def base_model(model) -> PreTrainedModel:
    """The underlying ``*ForCausalLM`` (unwraps a peft model; its LoRA layers stay injected)."""
    return model.get_base_model() if _is_peft(model) else model


def load_student(
    name_or_path,
    *,
    lora: bool = True,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: str | list[str] = "all-linear",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    adapter_path: str | os.PathLike | None = None,
    quantization: str = "none",
):
    """Load a causal LM as the student: a peft ``PeftModel`` with fresh LoRA adapters when ``lora``,
    else the plain model with every parameter trainable.

    ``name_or_path``: a hub id or a local ``save_pretrained`` directory (or an already built model).
    ``adapter_path``: resume from saved adapters instead of fresh ones (implies ``lora``).
    ``quantization``: ``"4bit"``/``"8bit"`` loads the frozen base through bitsandbytes (QLoRA; needs
    ``lora``), see :func:`opd_mini.teacher.quantization_config`. The model is returned in train mode.
    """
    if not lora and adapter_path is not None:
        raise ValueError("adapter_path is given but lora=False: adapters need lora=True")
    if quantization != "none" and not lora:
        raise ValueError(f"a {quantization} student cannot be fully fine-tuned: use lora=True (QLoRA) "
                         "or quantization='none'")
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path.to(device=device, dtype=dtype)
    elif quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
    else:
        from opd_mini.teacher import load_teacher

        model = load_teacher(name_or_path, quantization=quantization, device=device, compute_dtype=dtype)

    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        if quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
        else:
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=lora_target_modules, task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def _on_model_device(model, rollouts: Rollouts) -> Rollouts:
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
    rollouts = _on_model_device(model, rollouts)
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


@torch.no_grad()
def sampled_token_logprobs(model, rollouts: Rollouts, vocab_size: int | None = None, chunk_size: int = 64) -> torch.Tensor:
    """log π(y_t|c_t) of the rollouts' completion tokens under ``model``, shape (B, T), no grad; 0 where
    the completion mask is False. One forward of the decoder, then the output head in chunks of
    ``chunk_size`` positions, so the (B, T, V) logits never sit in memory at once."""
    hidden_BTH, _ = completion_hidden(model, rollouts)
    ids_BT = rollouts.completion_ids.to(hidden_BTH.device)
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
    rollouts = _on_model_device(model, rollouts)
    T = rollouts.completion_ids.shape[1]
    out = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                position_ids=rollouts.position_ids(), use_cache=False, logits_to_keep=T + 1)
    logits_BTV = out.logits[:, :-1]  # the last position predicts past the end of the sequence
    return logits_BTV[..., :vocab_size] if vocab_size is not None else logits_BTV


def save_student(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save the student: LoRA adapters only (``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable by ``PeftModel.from_pretrained(base, path)``) or the full model; plus the tokenizer if given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
