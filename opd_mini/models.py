"""The models of one run: the tokenizer, the student (LoRA or full) and the teacher, from a TrainConfig.

``'tiny'`` names resolve to the offline tiny world of :mod:`opd_mini.tiny`. With a LoRA student whose
teacher is its own base (``teacher='self'``, or the same path unquantized), no second copy is loaded:
the teacher is the student with its adapter disabled. With ``teachers`` (one teacher per task), each
distinct (path, quantization) is loaded once, and :meth:`Models.teacher_for` names the one of a task.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer

from opd_mini.config import ANSWERS, MOVING, TrainConfig, parse_teachers
from opd_mini.gguf_models import is_gguf_spec
from opd_mini.gguf_models import resolve as resolve_gguf
from opd_mini.layer_drop import drop_layers
from opd_mini.student import load_student
from opd_mini.tasks import MixTask, get_task
from opd_mini.sampler import encode_prompts, format_prompts
from opd_mini.teacher import check_same_tokenizer, load_teacher, shared_vocab_size
from opd_mini.tiny import ensure_tiny_models


@dataclass
class TeacherRef:
    """One teacher as the loop uses it: the model that scores, and whether it is the student's own base
    (then it scores with the LoRA adapter disabled)."""

    model: Any
    is_student_base: bool
    path: str
    is_student: bool = False  # the student itself as it trains, adapter on (a moving teacher, --teacher student)


@dataclass
class Models:
    student: Any  # peft PeftModel (lora) or the plain *ForCausalLM, trainable
    teacher: Any  # frozen teacher, or None when the teacher is the student's base ("self" + lora) or "none"
    tokenizer: Any
    vocab_size: int  # shared tokenizer length: logits are trimmed to it
    teacher_is_student_base: bool  # self-distillation: score the student with its adapter disabled
    student_path: str
    teacher_path: str
    teachers: dict[str, TeacherRef] = field(default_factory=dict)  # task spec -> its teacher (--teachers)
    slip: Any = None  # the environment's slip on this tokenizer (opd_mini.sampler.Slip, --slip_prob); None: no slips
    teacher_is_student: bool = False  # a moving teacher: the student itself, adapter on (--teacher student)

    @property
    def scorer(self):
        """The model that scores as the teacher (the student itself when its base is the teacher), or None."""
        return self.student if self.teacher_is_student_base or self.teacher_is_student else self.teacher

    @property
    def has_teacher(self) -> bool:
        return bool(self.teachers) or self.scorer is not None

    def teacher_for(self, task: str) -> TeacherRef | None:
        """The teacher of the task ``task`` (its spec): its entry in ``teachers`` (None for a task without one,
        e.g. an evaluation-only task), else the one teacher."""
        if self.teachers:
            return self.teachers.get(task)
        return TeacherRef(self.scorer, self.teacher_is_student_base, self.teacher_path, self.teacher_is_student)

    def describe(self, spec) -> dict:
        """What was loaded and what trains, read off the models themselves (the summary's ``ran``): the student
        (its adapter's real shape), each task's teacher (its real quantization), the loss function and its file."""
        refs = self.teachers or ({"*": self.teacher_for("*")} if self.has_teacher or self.teacher_path == ANSWERS else {})
        return {"student": self.student_path, "student_layers": getattr(self.student.config, "num_hidden_layers", None),
                "adapter": adapter_shape(self.student),
                "teachers": {task: {"path": ref.path, "student_base": ref.is_student_base,
                                    "quantization": "none" if ref.is_student_base else loaded_quantization(ref.model)}
                             for task, ref in refs.items()},
                "loss": describe_loss(spec)}


def adapter_shape(model) -> dict | None:
    """The LoRA adapter's real shape (r, alpha, dropout, target modules), from peft's own config; None when the
    student is trained in full."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None:
        return None
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def loaded_quantization(model) -> str:
    """``4bit``, ``8bit`` or ``none``: how the model's weights are actually stored."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    return "none"


def describe_loss(spec) -> dict:
    """The loss that trains: its name, its function and file, and the built-in it replaced (a plugin)."""
    import inspect

    try:
        source = inspect.getsourcefile(spec.fn)
    except TypeError:
        source = None
    return {"name": spec.name, "function": f"{spec.fn.__module__}.{spec.fn.__qualname__}", "file": source,
            "replaced": spec.replaced or None}


def effective_config(cfg: TrainConfig, task) -> TrainConfig:
    """The run's effective config, resolved once before anything loads: every path reads it, and it is what the
    run records. An ``init_adapter`` keeps its own LoRA shape: fields left at their defaults take the adapter's
    values, and a value given that differs from the adapter's is refused. A mixture whose part would get no
    prompt in a step is refused."""
    from dataclasses import fields as dc_fields

    from opd_mini.config import template_fields
    from opd_mini.tasks import MixTask

    if cfg.slip_prob > 0 and task.slip_moves is None:
        raise ValueError(f"slip_prob={cfg.slip_prob}: task {task.name} has no moves that can slip (walk:N and route:N:K "
                         "have; a mixture only when every part has the same): drop --slip_prob or change --task")
    if "hidden" in template_fields(cfg.teacher_template):
        parts = [t for t, _ in task.parts] if isinstance(task, MixTask) else [task]
        if any(t.visible_context for t in parts):
            raise ValueError(f"teacher_template={cfg.teacher_template!r} reads {{hidden}}, but task {task.name} already shows "
                             "the flag in the student's prompt (visible:RHO:SPEC): drop {hidden} from the template, or "
                             "use hidden:RHO:SPEC")
        if not all(t.hidden_context for t in parts):
            raise ValueError(f"teacher_template={cfg.teacher_template!r} reads {{hidden}}, but the examples of task "
                             f"{task.name} carry no hidden context: use a hidden:RHO:SPEC task, or drop {{hidden}}")
    if isinstance(task, MixTask) and cfg.train_prompts:
        raise ValueError(f"train_prompts={cfg.train_prompts} is not supported with a mixture of tasks ({task.name}): a "
                         "fixed set of prompts could leave a task out; train one task, or use 0")
    if isinstance(task, MixTask) and cfg.teacher_sample_pool:
        raise ValueError(f"teacher_sample_pool={cfg.teacher_sample_pool} is not supported with a mixture of tasks "
                         f"({task.name}); use 0 (fresh teacher samples every step)")
    if isinstance(task, MixTask):
        counts = task.counts(cfg.prompts_per_step)
        for (part, weight), n in zip(task.parts, counts):
            if n == 0:
                raise ValueError(f"task {part.name} (weight {weight:g} in --task {cfg.task!r}) gets none of the "
                                 f"{cfg.prompts_per_step} prompts of a step: raise --prompts_per_step or its weight")
    if not cfg.init_adapter:
        return cfg
    shape = _saved_adapter_shape(cfg.init_adapter)
    defaults = {f.name: f.default for f in dc_fields(cfg)}
    changes = {}
    for name, value in shape.items():
        given = getattr(cfg, name)
        same = (_targets(given) == _targets(value)) if name == "lora_target_modules" else given == value
        if same:
            continue
        if given != defaults[name]:
            raise ValueError(f"--{name} {given} does not match init_adapter={cfg.init_adapter!r}, whose {name} is "
                             f"{value}: a saved adapter keeps its own shape; drop --{name} or give {value}")
        changes[name] = value
    return cfg.replace(**changes) if changes else cfg


def _saved_adapter_shape(adapter_dir: str) -> dict:
    config = os.path.join(os.path.expanduser(adapter_dir), "adapter_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"init_adapter={adapter_dir!r} holds no adapter_config.json: give a LoRA adapter directory "
                         "(a run's checkpoints/step_XXXXXX/model)")
    saved = json.loads(open(config).read())
    targets = saved.get("target_modules")
    targets = ",".join(sorted(targets)) if isinstance(targets, (list, tuple)) else str(targets)
    return {"lora_r": int(saved["r"]), "lora_alpha": float(saved["lora_alpha"]),
            "lora_dropout": float(saved.get("lora_dropout", 0.0)), "lora_target_modules": targets}


def _targets(spec: str) -> set[str] | str:
    return spec if spec == "all-linear" else {m.strip() for m in spec.split(",") if m.strip()}


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Models:
    """Tokenizer, student (LoRA or full) and teacher; 'tiny' names resolve to the offline tiny world."""
    teacher = "none" if cfg.teachers else cfg.teacher  # with one teacher per task, --teacher is not used
    paths = {"student": cfg.student, "teacher": teacher, "tokenizer": cfg.tokenizer or cfg.student}
    if "tiny" in (cfg.student, teacher):
        tiny = ensure_tiny_models(cfg.tiny_dir or None, task=cfg.task, progress=cfg.progress)
        paths = {k: (str(tiny[k]) if v == "tiny" else v) for k, v in paths.items()}
        if cfg.tokenizer == "" and cfg.student == "tiny":
            paths["tokenizer"] = str(tiny["tokenizer"])
    paths = {k: (resolve_gguf(v, progress=cfg.progress) if is_gguf_spec(v) else v) for k, v in paths.items()}
    if cfg.student_drop_layers:  # a smaller student cut from the (resolved) student
        paths["student"] = drop_layers(paths["student"], cfg.student_drop_layers, progress=cfg.progress)
    for role, path in paths.items():
        if role == "teacher" and teacher in ("self", "none", ANSWERS, MOVING):
            continue
        check_model_path(role, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    except OSError as e:
        raise ValueError(f"cannot load the tokenizer {paths['tokenizer']!r}: give a directory written by "
                         "save_pretrained or a Hugging Face id, which needs a network the first time "
                         f"({' '.join(str(e).split(chr(10))[0].split())})") from None
    if cfg.init_adapter:
        check_adapter_base(cfg.init_adapter, paths["student"], cfg.student_drop_layers)
    student = load_student(
        paths["student"], lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        lora_target_modules=_target_modules(cfg.lora_target_modules), device=device, dtype=dtype,
        gradient_checkpointing=cfg.gradient_checkpointing, adapter_path=cfg.init_adapter or None)
    if cfg.teachers:
        teachers = load_task_teachers(cfg, student, tokenizer, paths["student"], device, dtype)
        vocab = {shared_vocab_size(tokenizer, student, t.model) for t in teachers.values()}
        return Models(student, None, tokenizer, min(vocab), False, paths["student"], "", teachers)
    teacher, self_base = None, False
    same_weights = cfg.teacher == "self" or (paths["teacher"] == paths["student"] and cfg.teacher_quantization == "none")
    if cfg.lora and same_weights:
        self_base = True  # no second copy: the base weights under the adapter are the teacher
    elif cfg.teacher not in ("none", ANSWERS, MOVING):
        name = paths["student"] if cfg.teacher == "self" else paths["teacher"]
        teacher = load_teacher(name, quantization=cfg.teacher_quantization, device=device, compute_dtype=dtype)
    if teacher is not None and cfg.check_tokenizers:
        check_teacher_tokenizer(tokenizer, paths["teacher"] if cfg.teacher != "self" else paths["student"],
                                chat_template=cfg.use_chat_template != "no")
    vocab_size = shared_vocab_size(tokenizer, student, teacher if teacher is not None else student)
    return Models(student, teacher, tokenizer, vocab_size, self_base, paths["student"], paths["teacher"],
                  teacher_is_student=cfg.teacher == MOVING)


def load_task_teachers(cfg: TrainConfig, student, tokenizer, student_path: str, device, dtype) -> dict[str, TeacherRef]:
    """``cfg.teachers`` loaded: {task spec: TeacherRef}, each distinct (path, quantization) once. Every task of
    ``cfg.task`` (each part of a mixture) must have a teacher, and every teacher a task of ``cfg.task``."""
    wanted = parse_teachers(cfg.teachers)
    task = get_task(cfg.task, eval_fraction=cfg.eval_fraction)
    names = [t.name for t, _ in task.parts] if isinstance(task, MixTask) else [task.name]
    for name in names:
        if name not in wanted:
            raise ValueError(f"the task {name} has no teacher in --teachers ({cfg.teachers!r}); add '{name}=PATH'")
    for name in wanted:
        if name not in names:
            raise ValueError(f"--teachers names the task {name}, which is not part of --task {cfg.task!r} "
                             f"(its tasks: {', '.join(names)})")
    loaded: dict[tuple[str, str], TeacherRef] = {}
    for path, quant in dict.fromkeys(wanted.values()):
        source = student_path if path == "self" else resolve_gguf(path, progress=cfg.progress) if is_gguf_spec(path) else path
        if cfg.lora and quant == "none" and (path == "self" or _same_path(source, student_path)):
            loaded[(path, quant)] = TeacherRef(student, True, student_path)  # no second copy
            continue
        check_model_path("teacher", source)
        model = load_teacher(source, quantization=quant, device=device, compute_dtype=dtype)
        if cfg.check_tokenizers:
            check_teacher_tokenizer(tokenizer, source, chat_template=cfg.use_chat_template != "no")
        loaded[(path, quant)] = TeacherRef(model, False, source)
    return {name: loaded[wanted[name]] for name in names}


#: What a directory written by save_pretrained holds: a model its config, a tokenizer one of these files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_path(role: str, path: str) -> None:
    """A local path given as the student, teacher or tokenizer must exist and hold what that role loads; a
    ValueError names the path and what it lacks. Hub ids ("org/name") are left to the hub."""
    local = os.path.expanduser(path)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.isdir(local)  # a hub id: org/name
    if not looks_local:
        return
    if not os.path.exists(local):
        raise ValueError(f"the {role} {path} does not exist: give a save_pretrained directory or a Hugging Face "
                         f"model id (--{role})")
    if not os.path.isdir(local):
        raise ValueError(f"the {role} {path} is a file, not a directory: give the directory save_pretrained wrote")
    if role == "tokenizer" and not any(os.path.isfile(os.path.join(local, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"the tokenizer directory {path} holds none of {', '.join(TOKENIZER_FILES)}: give the "
                         "directory a tokenizer's save_pretrained wrote (--tokenizer)")
    if role != "tokenizer" and not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(f"the {role} {path} is not a model directory: it holds no config.json (a directory written "
                         f"by save_pretrained holds config.json and the weights; --{role})")


def check_adapter_base(adapter_dir: str, student_path: str, dropped: str = "") -> None:
    """An adapter to start from must exist, hold weights for no decoder layer the student lacks (a student cut
    by ``--student_drop_layers`` has fewer), and have been trained on this student's base model."""
    _saved_adapter_shape(adapter_dir)
    layers, student_layers = _adapter_layers(adapter_dir), _config_layers(student_path)
    if layers and student_layers and layers > student_layers:
        cut = f" (--student_drop_layers {dropped} cut it)" if dropped else ""
        raise ValueError(f"init_adapter={adapter_dir!r} holds LoRA weights for {layers} decoder layers, but the student "
                         f"{student_path}{cut} has {student_layers}: give an adapter trained on this student"
                         f"{', or drop --student_drop_layers' if dropped else ''}")
    config = os.path.join(os.path.expanduser(adapter_dir), "adapter_config.json")
    base = json.loads(open(config).read()).get("base_model_name_or_path")
    if base and not _same_path(str(base), student_path):
        raise ValueError(f"init_adapter={adapter_dir!r} was trained on the base {base}, but the student is "
                         f"{student_path}: give --student {base}, or an adapter of this student")


def _adapter_layers(adapter_dir: str) -> int:
    """1 + the highest decoder-layer index among a saved adapter's weights (0 if none can be read)."""
    import re

    from safetensors import safe_open

    path = os.path.join(os.path.expanduser(adapter_dir), "adapter_model.safetensors")
    if not os.path.isfile(path):
        return 0
    with safe_open(path, framework="pt") as f:
        found = [int(m.group(1)) for k in f.keys() for m in [re.search(r"\.layers\.(\d+)\.", k)] if m]
    return max(found) + 1 if found else 0


def _config_layers(model_path: str) -> int:
    """num_hidden_layers of a local model directory's config.json (0 if it has none, e.g. a hub id)."""
    path = os.path.join(os.path.expanduser(model_path), "config.json")
    if not os.path.isfile(path):
        return 0
    config = json.loads(open(path).read())
    return int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers") or 0)


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_teacher_reads_student(cfg: TrainConfig, teacher: TeacherRef, tokenizer, rollouts, prompts: list[str]) -> None:
    """Before the first update: the teacher, rendering the raw prompts its own way (its tokenizer and chat
    template), reads exactly the tokens the student generated (:func:`check_rendering`).
    Skipped for the student's own base (the same tokenizer by construction) and a teacher without
    tokenizer files (:func:`check_teacher_tokenizer` has already said so)."""
    if teacher.is_student_base or teacher.is_student or not cfg.check_tokenizers:
        return
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher.path)
    except (OSError, ValueError):
        return
    check_rendering(tokenizer, teacher_tokenizer, rollouts, use_chat_template={"auto": "auto", "yes": True, "no": False}[
        cfg.use_chat_template], prompts=prompts)


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


_SENTINEL = "\u2063opd-mini-prompt\u2063"


def _raw_prompts(tokenizer, rollouts, use_chat_template) -> list[str]:
    """The prompts before the student's chat template, recovered from ``rollouts.prompt_texts``."""
    if not rollouts.prompt_texts:
        raise ValueError("the rollouts carry no prompt texts: pass the raw prompts (prompts=...)")
    (probe,), templated = format_prompts(tokenizer, [_SENTINEL], use_chat_template)
    if not templated:
        return list(rollouts.prompt_texts)
    head, _, tail = probe.partition(_SENTINEL)
    raw = []
    for text in rollouts.prompt_texts:
        if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
            raise ValueError("cannot recover the raw prompts from the student's rendered ones (its chat template "
                             "changes the prompt text): pass the raw prompts (prompts=...)")
        raw.append(text[len(head):len(text) - len(tail)])
    return raw


def _tok(tokenizer, token_id: int | None) -> str:
    return "nothing" if token_id is None else f"{tokenizer.convert_ids_to_tokens(int(token_id))!r} (id {int(token_id)})"


def check_rendering(tokenizer, teacher_tokenizer, rollouts, *, use_chat_template: bool | str = "auto",
                    prompts: list[str] | None = None) -> None:
    """Raise ValueError unless the teacher, rendering each rollout itself, would read exactly the tokens it is
    given: the student's ``rollouts.input_ids_BL`` at the masked-in positions.

    Per row: the raw prompt (``prompts[prompt_index]``, or recovered from ``rollouts.prompt_texts`` by undoing
    the student's chat template) is rendered as the teacher would render it (its own tokenizer and chat
    template under ``use_chat_template``, as :func:`opd_mini.sampler.encode_prompts` does) and compared id
    by id with the student's prompt; the completion (the student's tokens up to and including the first
    EOS, decoded by the student's tokenizer) is re-tokenized by the teacher's and compared the same way. A
    completion the teacher's tokenizer splits otherwise but decodes to the same text passes: a sampled
    completion may be a non-canonical split of its text, and the teacher then reads the same text.

    The error is one line: the first differing row and position, both tokens, and what to change.
    """
    raw = list(prompts) if prompts is not None else _raw_prompts(tokenizer, rollouts, use_chat_template)
    try:
        teacher_ids, teacher_texts = encode_prompts(teacher_tokenizer, raw, use_chat_template=use_chat_template)
    except ValueError as e:
        raise ValueError(f"the teacher's tokenizer cannot render the prompts ({e}): give the teacher the student's "
                         "tokenizer and chat template, or --check_tokenizers false") from None
    student_texts = (list(rollouts.prompt_texts) if rollouts.prompt_texts
                     else format_prompts(tokenizer, raw, use_chat_template)[0])
    P = rollouts.prompt_len
    template_fix = ("the teacher renders prompts with another chat template: give the teacher the student's tokenizer "
                    "and chat template (or render prompts without one, --use_chat_template no), or --check_tokenizers false")
    vocab_fix = ("the teacher's tokenizer gives the same text other ids: give the teacher the student's tokenizer "
                 "(a teacher of the student's model family), or --check_tokenizers false")
    for b in range(rollouts.input_ids_BL.shape[0]):
        i = int(rollouts.prompt_index_B[b])
        prompt = rollouts.input_ids_BL[b, :P][rollouts.attention_mask_BL[b, :P].bool()].tolist()
        mine = teacher_ids[i]
        for j in range(max(len(prompt), len(mine))):
            s = prompt[j] if j < len(prompt) else None
            t = mine[j] if j < len(mine) else None
            if s != t:
                fix = template_fix if teacher_texts[i] != student_texts[i] else vocab_fix
                raise ValueError(f"the teacher would score other tokens than the student's: row {b}, position "
                                 f"{P - len(prompt) + j} (prompt token {j}) holds {_tok(tokenizer, s)} where the "
                                 f"teacher's rendering of prompt {i} has {_tok(teacher_tokenizer, t)}: {fix}")
        completion = rollouts.tokens_BT[b][rollouts.mask_BT[b].to(rollouts.tokens_BT.device)].tolist()
        text = tokenizer.decode(completion, skip_special_tokens=False)
        mine = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if mine == completion or teacher_tokenizer.decode(completion, skip_special_tokens=False) == text:
            continue
        # the first id the two tokenizers read differently, else the first id of the teacher's split that differs
        t = next((k for k, c in enumerate(completion)
                  if tokenizer.convert_ids_to_tokens(c) != teacher_tokenizer.convert_ids_to_tokens(c)), None)
        if t is None:
            t = next(k for k in range(max(len(completion), len(mine)))
                     if (completion[k] if k < len(completion) else None) != (mine[k] if k < len(mine) else None))
        s = completion[t] if t < len(completion) else None
        reads = f" and reads id {s} as {teacher_tokenizer.convert_ids_to_tokens(s)!r}" if s is not None else ""
        raise ValueError(f"the teacher would score other tokens than the student's: row {b}, position {P + t} "
                         f"(completion token {t}) holds {_tok(tokenizer, s)} where the teacher's tokenizer writes the "
                         f"student's text {text!r} with {_tok(teacher_tokenizer, mine[t] if t < len(mine) else None)}"
                         f"{reads}: {vocab_fix}")


def _target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]
