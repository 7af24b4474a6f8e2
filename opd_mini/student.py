"""The student: load it (LoRA adapters or full fine-tuning), its loss and backward pass, save it.

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

from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from opd_mini.forward import completion_hidden, completion_logits, project_logits
from opd_mini.loading import load_pretrained
from opd_mini.losses import token_logprobs
from opd_mini.batch import Batch
from opd_mini.registry import LossOptions, LossSpec, MetricMean


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
    ``lora``), see :func:`opd_mini.loading.quantization_config`. The model is returned in train mode.
    """
    if not lora and adapter_path is not None:
        raise ValueError("adapter_path is given but lora=False: adapters need lora=True")
    if quantization != "none" and not lora:
        raise ValueError(f"a {quantization} student cannot be fully fine-tuned: use lora=True (QLoRA) "
                         "or quantization='none'")
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path.to(device=device, dtype=dtype)
    else:
        model = load_pretrained(name_or_path, quantization=quantization, device=device, dtype=dtype)
        if quantization != "none":
            model.requires_grad_(False)  # the frozen 4/8-bit base of QLoRA

    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
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


def loss_and_backward(model, batch: Batch, spec: LossSpec, opts: LossOptions, *, vocab_size: int,
                      chunk_size: int = 0, check: Callable | None = None) -> MetricMean:
    """Student forward, the registered loss ``spec``, backward, for one micro-batch; returns its metrics.

    Simple path (``chunk_size`` = 0): logits (B, T, V) in one piece. Chunked path: one forward of the
    decoder gives hidden states (B, T, H); the output head runs on C positions at a time, so at most
    (B, C, V) logits exist at once, and their gradient is accumulated into the hidden states, which are
    back-propagated through the decoder once at the end. A distribution loss whose teacher arrives as
    hidden states (``batch.teacher_hidden_BTH``) has the teacher's head projected for the same C positions
    only (:meth:`Batch.slice_T`): no (B, T, V) tensor of either model exists. Token losses take two passes
    over the chunks: the first (no grad) gives log π_θ(y_t) for all T (the loss may couple positions, e.g.
    γ > 0), the loss's gradient w.r.t. those log-probs is then pushed through each chunk in the second.
    ``check(loss, metrics)`` runs before each backward (the loop's non-finite diagnostic).
    """
    check = _scalar_check(spec, check or (lambda loss, metrics: None))
    ids_BT, metrics = batch.tokens_BT, MetricMean()
    if chunk_size == 0:  # ------------------------------------------------------------ simple path
        inputs = batch.slice_T(slice(None))  # a teacher kept as hidden states is projected in one piece here
        logits_BTV = completion_logits(model, batch, vocab_size)
        x = token_logprobs(logits_BTV, ids_BT.to(logits_BTV.device)) if spec.kind == "token" else logits_BTV
        loss, mets = spec.fn(x, inputs, opts)
        check(loss, mets)
        loss.backward()
        metrics.add(mets, inputs.mask_BT)
        return metrics

    hidden_BTH, _ = completion_hidden(model, batch)  # ------------------------------------- chunked path
    h_BTH = hidden_BTH.detach().requires_grad_()
    ids_BT = ids_BT.to(h_BTH.device)
    T = ids_BT.shape[1]
    spans = [slice(s, min(s + chunk_size, T)) for s in range(0, T, chunk_size)]

    def chunk_logits(s: slice) -> torch.Tensor:  # (B, C, V)
        return project_logits(model, h_BTH[:, s], vocab_size)

    if spec.kind == "token":
        with torch.no_grad():
            logp_BT = torch.cat([token_logprobs(chunk_logits(s), ids_BT[:, s]) for s in spans], dim=1)
        logp_BT.requires_grad_()
        loss, mets = spec.fn(logp_BT, batch, opts)
        check(loss, mets)
        loss.backward()  # dloss/dlogp_BT into logp_BT.grad
        for s in spans:
            token_logprobs(chunk_logits(s), ids_BT[:, s]).backward(logp_BT.grad[:, s])
        metrics.add(mets, batch.mask_BT)
    else:
        for s in spans:
            loss, mets = spec.fn(chunk_logits(s), batch.slice_T(s), opts)
            check(loss, mets)
            loss.backward()
            metrics.add(mets, batch.mask_BT[:, s])
    hidden_BTH.backward(h_BTH.grad)
    return metrics


def _scalar_check(spec: LossSpec, check: Callable) -> Callable:
    """The loss must return a scalar tensor and a dict of scalars (a registered user loss may not)."""
    def checked(loss, metrics):
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the loss {spec.name!r} ({spec.fn.__module__}.{spec.fn.__qualname__}) returned {shape}, "
                             "not a scalar tensor: reduce it to the per-token mean over the mask (see opd_mini.losses)")
        bad = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() != 1]
        if bad:
            raise ValueError(f"the loss {spec.name!r} returned the metric {bad[0]!r} of shape "
                             f"{tuple(metrics[bad[0]].shape)}: each metric must be one number")
        check(loss, metrics)
    return checked


def save_student(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save the student: LoRA adapters only (``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable by ``PeftModel.from_pretrained(base, path)``) or the full model; plus the tokenizer if given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
