"""The models of one run: the tokenizer, the student (LoRA or full) and the teacher, from a TrainConfig.

``'tiny'`` names resolve to the offline tiny world of :mod:`opd_mini.tiny`. With a LoRA student whose
teacher is its own base (``teacher='self'``, or the same path unquantized), no second copy is loaded:
the teacher is the student with its adapter disabled.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from opd_mini.config import TrainConfig
from opd_mini.student import load_student
from opd_mini.teacher import check_same_tokenizer, load_teacher, shared_vocab_size
from opd_mini.tiny import ensure_tiny_models


@dataclass
class Models:
    student: Any  # peft PeftModel (lora) or the plain *ForCausalLM, trainable
    teacher: Any  # frozen teacher, or None when the teacher is the student's base ("self" + lora) or "none"
    tokenizer: Any
    vocab_size: int  # shared tokenizer length: logits are trimmed to it
    teacher_is_student_base: bool  # self-distillation: score the student with its adapter disabled
    student_path: str
    teacher_path: str

    @property
    def scorer(self):
        """The model that scores as the teacher (the student itself when its base is the teacher), or None."""
        return self.student if self.teacher_is_student_base else self.teacher


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Models:
    """Tokenizer, student (LoRA or full) and teacher; 'tiny' names resolve to the offline tiny world."""
    paths = {"student": cfg.student, "teacher": cfg.teacher, "tokenizer": cfg.tokenizer or cfg.student}
    if "tiny" in (cfg.student, cfg.teacher):
        tiny = ensure_tiny_models(cfg.tiny_dir or None, task=cfg.task, progress=cfg.progress)
        paths = {k: (str(tiny[k]) if v == "tiny" else v) for k, v in paths.items()}
        if cfg.tokenizer == "" and cfg.student == "tiny":
            paths["tokenizer"] = str(tiny["tokenizer"])
    for role, path in paths.items():
        if role == "teacher" and cfg.teacher in ("self", "none"):
            continue
        looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # a hub id is "org/name"
        if looks_local and not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"the {role} {path} does not exist: give a save_pretrained directory or a Hugging Face "
                             f"model id (--{role})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    except OSError as e:
        raise ValueError(f"cannot load the tokenizer {paths['tokenizer']!r}: give a directory written by "
                         "save_pretrained or a Hugging Face id, which needs a network the first time "
                         f"({' '.join(str(e).split(chr(10))[0].split())})") from None
    student = load_student(
        paths["student"], lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        lora_target_modules=_target_modules(cfg.lora_target_modules), device=device, dtype=dtype,
        gradient_checkpointing=cfg.gradient_checkpointing)
    teacher, self_base = None, False
    same_weights = cfg.teacher == "self" or (paths["teacher"] == paths["student"] and cfg.teacher_quantization == "none")
    if cfg.lora and same_weights:
        self_base = True  # no second copy: the base weights under the adapter are the teacher
    elif cfg.teacher != "none":
        name = paths["student"] if cfg.teacher == "self" else paths["teacher"]
        teacher = load_teacher(name, quantization=cfg.teacher_quantization, device=device, compute_dtype=dtype)
    if teacher is not None and cfg.check_tokenizers:
        check_teacher_tokenizer(tokenizer, paths["teacher"] if cfg.teacher != "self" else paths["student"],
                                chat_template=cfg.use_chat_template != "no")
    vocab_size = shared_vocab_size(tokenizer, student, teacher if teacher is not None else student)
    return Models(student, teacher, tokenizer, vocab_size, self_base, paths["student"], paths["teacher"])


def check_teacher_tokenizer(tokenizer, teacher_path: str, *, chat_template: bool) -> None:
    """Compare the teacher's own tokenizer with the run's (:func:`opd_mini.teacher.check_same_tokenizer`).

    A teacher saved without tokenizer files cannot be checked: that is said on stderr, not guessed."""
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError) as e:
        print(f"warning: the teacher {teacher_path} has no loadable tokenizer ({type(e).__name__}), so its vocabulary "
              "cannot be checked against the student's; make sure they share one", file=sys.stderr)
        return
    check_same_tokenizer(tokenizer, teacher_tokenizer, chat_template=chat_template)


def _target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]
