"""The one configuration of a training run: a dataclass whose fields document themselves.

Every field is declared once, with its default, its help text and its allowed range::

    lr: float = opt(1e-4, "peak learning rate of AdamW", gt=0)

and from that single declaration come the ``--help`` text of every command, the ``--lr`` flag, the
validation (a ``ValueError`` naming the field, the value and what is allowed).

Three ways to build a config, applied in this order (later wins)::

    TrainConfig()                               # the defaults below
    preset  (--preset tiny-cpu | laptop-gpu)    # a named bundle of overrides, see PRESETS
    file    (--config run.yaml / run.json)      # any subset of the fields, may name a preset too
    flags   (--lr 3e-4 --loss sft ...)          # every field is a flag

From Python: ``TrainConfig(lr=3e-4)``, ``TrainConfig.from_preset("tiny-cpu", steps=10)``,
``TrainConfig.from_file("run.yaml")`` or ``parse_args(["--preset", "tiny-cpu", "--steps", "10"])``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from opd_mini import registry

def opt(default: Any, help: str, *, choices: tuple | Callable[[], tuple] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values stored in ``metadata`` (written once)."""
    return field(default=default, metadata=dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt))


@dataclass
class TrainConfig:
    """Everything one run of ``python -m opd_mini.train`` needs. See ``--help`` for each field."""

    # --- models -----------------------------------------------------------------------------
    student: str = opt("tiny", "student model: a Hugging Face id or a save_pretrained directory; 'tiny' = the "
                       "offline tiny student from opd_mini.tiny (briefly SFT-warm-started, trained locally if missing)")
    teacher: str = opt("tiny", "teacher model: a Hugging Face id or directory; 'tiny' = the offline tiny teacher; "
                       "'self' = the student's own base model (self-distillation: scored with the LoRA adapter "
                       "disabled, or a frozen copy when lora is off); 'none' only for grpo")
    teachers: str = opt("", "one teacher per task, 'TASK=TEACHER;TASK=TEACHER' (a YAML/JSON file may give a mapping): "
                        "each rollout is scored by its task's teacher, e.g. --task 'reverse:5+add:3' --teachers "
                        "'reverse:5=PATH_A;add:3=PATH_B@4bit'; TEACHER is an id or directory, 'self', or either with "
                        "@8bit/@4bit; every task of --task needs one; empty = --teacher scores every task")
    tokenizer: str = opt("", "tokenizer id or directory shared by student and teacher (empty = the student's)")
    tiny_dir: str = opt("", "cache directory of the offline tiny models (empty = opd_mini.tiny's default)")
    check_tokenizers: bool = opt(True, "stop unless the teacher's own tokenizer (when its directory or hub id has "
                                 "one) matches the student's: vocabulary id → token, EOS/BOS/UNK, chat template")
    teacher_quantization: str = opt("none", "load the teacher in 8-bit or 4-bit (NF4, double quant) with "
                                    "bitsandbytes", choices=("none", "8bit", "4bit"))
    lora: bool = opt(True, "train LoRA adapters (true) or all the student's weights (false)")
    lora_r: int = opt(8, "LoRA rank r of the adapter matrices B (d×r) and A (r×d)", ge=1)
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (the update is scaled by alpha / r)", gt=0)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input (0 keeps runs exactly reproducible)", ge=0, lt=1)
    lora_target_modules: str = opt("all-linear", "modules that get adapters: 'all-linear' or a comma-separated "
                                   "list of module names (e.g. q_proj,v_proj)")
    gradient_checkpointing: bool = opt(False, "recompute student activations in backward to save memory")
    init_adapter: str = opt("", "start the LoRA student from this saved adapter (e.g. another run's "
                            "checkpoints/step_000060/model) instead of a fresh one; with --teacher self the teacher "
                            "is still the base without any adapter")

    # --- task -------------------------------------------------------------------------------
    task: str = opt("reverse:5", "prompt source with a verifier: reverse:N, add:N, walk:N, jsonl:PATH or "
                    "hf:DATASET[:split]")
    eval_task: str = opt("", "task whose prompts evaluate the run (e.g. jsonl:eval.jsonl; then the whole training "
                         "file is trained on); empty = the training task's held-out split")
    eval_fraction: float = opt(0.1, "jsonl/hf tasks without --eval_task: fraction of the file held out for "
                               "evaluation and never trained on", ge=0, lt=1)
    retention_task: str = opt("", "a second task evaluated (never trained) to measure forgetting; empty = none")
    use_chat_template: str = opt("auto", "wrap prompts in the tokenizer's chat template: auto (when it has one), "
                                 "yes, no", choices=("auto", "yes", "no"))

    # --- loss -------------------------------------------------------------------------------
    loss: str = opt("reverse_kl_sampled", "training objective, a name in opd_mini.registry.LOSS_REGISTRY (a "
                    "--loss_plugins file may register more); sft and grpo are the baselines", choices=registry.loss_names)
    loss_plugins: str = opt("", "comma-separated Python files (path/to/file.py) or module names imported before the "
                            "run; each may register losses with opd_mini.registry.register")
    loss_args: str = opt("", "options of a user-registered loss as key=value pairs, comma-separated (e.g. "
                         "alpha=0.3); the loss reads them from opts.extra")
    gamma: float = opt(0.0, "reverse_kl_sampled/opd_grpo: discount of the return-to-go of −r_t "
                       "(0 = token-level OPD, low variance; 1 = unbiased sequence-level estimator)", ge=0, le=1)
    clip_log_ratio: float = opt(0.0, "reverse_kl_sampled/opd_grpo: clip the log-ratio r_t to [−c, c] (0 = off)", ge=0)
    beta: float = opt(0.5, "jsd: mixture weight β of JSD(β); β=0 is forward KL, β=1 reverse KL, 0.5 symmetric JSD",
                      ge=0, le=1)
    top_k: int = opt(16, "reverse_kl_topk: size K of the teacher's top-K support (K >= 2)", ge=2)
    add_sampled_token: bool = opt(True, "reverse_kl_topk: add the student's sampled token to the support")
    renormalize: bool = opt(True, "reverse_kl_topk: renormalise both distributions inside the support "
                            "(false collapses; kept for the ablation)")
    entropy_threshold: float = opt(1.0, "entropy_aware: add forward KL where the teacher's entropy exceeds this "
                                   "(nats)", ge=0)
    reward_weight: float = opt(1.0, "opd_grpo: weight w of the GRPO reward advantage added to the OPD advantage",
                               ge=0)
    grpo_normalize_std: bool = opt(True, "grpo/opd_grpo: divide group advantages by the group's std "
                                   "(false = Dr. GRPO, mean baseline only)")
    mask_special_tokens: bool = opt(False, "leave special tokens (EOS, chat markers) out of the loss")

    # --- optimisation -----------------------------------------------------------------------
    steps: int = opt(100, "optimizer steps", ge=1)
    lr: float = opt(1e-4, "peak learning rate of AdamW", gt=0)
    lr_schedule: str = opt("constant", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to lr", ge=0)
    min_lr_ratio: float = opt(0.0, "linear/cosine: final learning rate as a fraction of lr", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)", ge=0)
    prompts_per_step: int = opt(16, "distinct prompts per optimizer step", ge=1)
    num_generations: int = opt(1, "samples per prompt (grpo/opd_grpo need >= 2 for a group baseline)", ge=1)
    grad_accum: int = opt(1, "micro-batches per step and process (prompts_per_step must be divisible by "
                          "num_processes × grad_accum); the loss is normalised by the token count of the whole step",
                          ge=1)
    loss_chunk_size: int = opt(0, "compute the student's per-token losses in chunks of this many positions so "
                               "(B, T, V) fp32 logits never sit in memory at once (0 = one chunk)", ge=0)
    teacher_chunk_size: int = opt(64, "positions per chunk of the teacher's lm_head + log-softmax", ge=1)
    divergence_factor: float = opt(10.0, "stop the run, before applying the step, when the gradient norm exceeds "
                                   "this many times the median of the previous 20 steps (checked from step 11; "
                                   "0 = off)", ge=0)
    max_time_s: float = opt(0.0, "stop after this many seconds of training (sampling + scoring + updates, eval "
                            "excluded); 0 = no limit", ge=0)

    # --- sampling ---------------------------------------------------------------------------
    max_new_tokens: int = opt(16, "maximum completion length in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature of the rollouts (1 = on-policy)", gt=0)
    teacher_sample_pool: int = opt(0, "losses trained on teacher samples (sft): a fixed set of them, this many "
                                   "training prompts sampled once at the start, each step drawing its prompts from "
                                   "the set (a distillation dataset); 0 = fresh teacher samples every step", ge=0)
    lmbda: float = opt(1.0, "GKD's λ (TRL's lmbda): the probability that a step's rollouts are the student's own samples; "
                       "otherwise the teacher samples that step (decided per step from the seed, so resumed runs match); "
                       "below 1 only with a full-distribution loss (reverse_kl_full, forward_kl, jsd, reverse_kl_topk, "
                       "entropy_aware), which compare whole distributions at every visited state", ge=0, le=1)
    teacher_template: str = opt("", "the teacher's prompt, from the example's fields, e.g. '{prompt} (the answer is "
                                "{answer})': the teacher scores the student's completion behind this prompt instead of "
                                "the student's (privileged-context self-distillation, with --teacher self: no second "
                                "copy); empty = the student's prompt")
    sampler: str = opt("generate", "rollout sampler: generate (Hugging Face generate, then one forward for the "
                       "behaviour log-probs; the reference) or decode (the package's KV-cache loop with inverse-CDF "
                       "draws and log-probs recorded while decoding: faster at a large vocabulary, other samples for "
                       "the same seed; with --teacher self the log-probs still come from a forward, so r_t stays "
                       "exactly 0)", choices=("generate", "decode"))
    top_p: float = opt(1.0, "nucleus sampling of the rollouts (1 = off)", gt=0, le=1)
    top_k_sampling: int = opt(0, "sample from the k most likely tokens only (0 = off)", ge=0)

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = opt(50, "evaluate every N steps, and at step 0 and the last step (0 = only those two)", ge=0)
    eval_prompts: int = opt(64, "held-out prompts per evaluation", ge=1)
    eval_samples: int = opt(4, "samples per held-out prompt (n of the unbiased pass@k estimator)", ge=1)
    pass_k: int = opt(4, "k of pass@k (k <= eval_samples)", ge=1)
    eval_temperature: float = opt(1.0, "sampling temperature at evaluation", gt=0)
    eval_kl_forward: bool = opt(False, "also evaluate the forward KL(teacher ‖ student) per token on the teacher's own "
                                "samples of the held-out prompts (eval/kl_forward; one more sampling pass)")
    eval_kl_to_init: bool = opt(False, "also evaluate KL(π₀ ‖ π) per token on the retention task's prompts, π₀ = the "
                                "LoRA student's base (adapter disabled), on π₀'s own samples (eval/retention_kl_to_init)")
    save_every: int = opt(0, "write a checkpoint every N steps, and at the end (0 = only at the end)", ge=0)
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep on disk", ge=1)
    out_dir: str = opt("runs/opd", "directory of the metrics log, checkpoints and final model")
    resume: bool = opt(False, "continue from the last checkpoint in out_dir (model, optimizer, scheduler, RNG, step)")
    progress: bool = opt(True, "show a tqdm progress bar with live metrics")

    # --- hardware and reproducibility -------------------------------------------------------
    seed: int = opt(0, "seed of prompts, sampling and initialisation", ge=0)
    threads: int = opt(0, "CPU threads of torch (0 = torch's default); tiny models run fastest with 1", ge=0)
    device: str = opt("auto", "auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights/compute dtype: auto (bf16 on cuda if supported, else fp32)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    ddp_backend: str = opt("auto", "communication backend of a run started on several processes by accelerate "
                           "launch or torchrun: auto (nccl on cuda, gloo on the cpu), gloo or nccl; unused by one "
                           "process", choices=("auto", "gloo", "nccl"))

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check types, ranges and cross-field rules; raise ValueError naming the field and the value."""
        registry.import_plugins(_coerce(_FIELDS["loss_plugins"], self.loss_plugins))  # before `loss` is checked
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, value := _coerce(f, value))
            m = f.metadata
            choices = _choices(m)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and math.isnan(value):
                    raise ValueError(f"{f.name}=nan is not allowed; {_range_text(m)}")
                bad = ((m["ge"] is not None and value < m["ge"]) or (m["gt"] is not None and value <= m["gt"])
                       or (m["le"] is not None and value > m["le"]) or (m["lt"] is not None and value >= m["lt"]))
                if bad:
                    raise ValueError(f"{f.name}={value!r} is out of range; {_range_text(m)}")
        if self.pass_k > self.eval_samples:
            raise ValueError(f"pass_k={self.pass_k} is out of range; it must be <= eval_samples={self.eval_samples} "
                             "(pass@k needs at least k samples per prompt)")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} is not allowed: it must divide prompts_per_step="
                             f"{self.prompts_per_step} (each micro-batch holds prompts_per_step / grad_accum prompts)")
        spec = registry.get_loss(self.loss)
        registry.parse_loss_args(self.loss_args)
        if self.teacher_sample_pool and self.teacher_sample_pool < self.prompts_per_step:
            raise ValueError(f"teacher_sample_pool={self.teacher_sample_pool} is out of range: a fixed set must hold at "
                             f"least prompts_per_step={self.prompts_per_step} prompts (or 0 for fresh samples)")
        if spec.reward and self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations} is out of range for loss={self.loss}: "
                             "it must be >= 2 (the group baseline needs several samples per prompt)")
        if self.teacher == "none" and (spec.signal is not None or spec.rollouts == "teacher"):
            needs_none = [n for n, s in registry.LOSS_REGISTRY.items() if s.signal is None and s.rollouts == "student"]
            raise ValueError(f"teacher='none' is only allowed with a loss that never calls the teacher "
                             f"({', '.join(needs_none)}), not loss={self.loss}")
        if self.teacher == "self" and self.teacher_quantization != "none":
            raise ValueError(f"teacher_quantization={self.teacher_quantization!r} is not allowed with teacher='self' "
                             "(the student's own base weights are the teacher); use 'none'")
        if not self.task:
            raise ValueError("task='' is not allowed; give a task spec such as reverse:3, add:3 or jsonl:PATH")
        if self.init_adapter and not self.lora:
            raise ValueError(f"init_adapter={self.init_adapter!r} needs lora=true (it is a LoRA adapter)")
        if self.eval_kl_to_init and not (self.lora and self.retention_task):
            raise ValueError("eval_kl_to_init=true needs lora=true (π₀ is the student with its adapter disabled) and a "
                             "--retention_task (whose prompts it is measured on)")
        parse_teachers(self.teachers)  # its syntax; which tasks need one is checked when the task is built
        if self.lmbda < 1 and not (spec.kind == "distribution" and spec.rollouts == "student"):
            ok = [n for n, s in registry.LOSS_REGISTRY.items() if s.kind == "distribution" and s.rollouts == "student"]
            raise ValueError(f"lmbda={self.lmbda:g} is not allowed with loss={self.loss}: steps on teacher samples need a "
                             f"full-distribution loss ({', '.join(ok)}); the sampled-token losses are policy gradients "
                             "that assume the student's own samples")
        template_fields(self.teacher_template)
        return self

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a dict of field values; a 'preset' key applies that preset first."""
        values = dict(values)
        preset = values.pop("preset", None)
        _check_keys(values, source)
        base = preset_values(preset) if preset else {}
        return cls(**{**base, **values})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        return cls.from_dict({"preset": name, **overrides}, source="overrides")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        return cls.from_dict({**load_file(path), **overrides}, source=str(path))


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Offline, on a laptop CPU: the tiny teacher and warm-started student of opd_mini.tiny, fp32.
    "tiny-cpu": dict(
        student="tiny", teacher="tiny", task="reverse:5", device="cpu", dtype="float32", threads=1,
        lora=False, lr=3e-4, steps=100, prompts_per_step=32, num_generations=2, max_new_tokens=8,
        eval_every=20, eval_prompts=128, eval_samples=4, pass_k=4, out_dir="runs/tiny-cpu",
    ),
    # One laptop GPU (about 8 GB): a 0.5B LoRA student and a 3B teacher of the same family in 4-bit.
    "laptop-gpu": dict(
        student="Qwen/Qwen2.5-0.5B-Instruct", teacher="Qwen/Qwen2.5-3B-Instruct", teacher_quantization="4bit",
        task="add:4", retention_task="reverse:6", device="cuda", dtype="bfloat16",
        lora=True, lora_r=16, lora_alpha=32, lr=1e-4, lr_schedule="cosine", warmup_steps=10, steps=200,
        prompts_per_step=16, num_generations=4, grad_accum=4, max_new_tokens=32, loss_chunk_size=32,
        gradient_checkpointing=True, eval_every=25, eval_prompts=128, eval_samples=4, pass_k=4,
        save_every=50, out_dir="runs/laptop-gpu",
    ),
}


def preset_values(name: str) -> dict[str, Any]:
    """The overrides of a named preset (ValueError listing the presets when unknown)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not allowed; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# files and the command line
# ---------------------------------------------------------------------------------------------


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) file holding a mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values, got {type(data).__name__}")
    return data


def build_parser(prog: str = "python -m opd_mini.train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with --preset, --config and one flag per TrainConfig field (help from the field)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=list(PRESETS), help="start from a named bundle of settings")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of field values (flags override it)")
    group = parser.add_argument_group("TrainConfig fields")
    for f in fields(TrainConfig):
        m = f.metadata
        help_text = m["help"] + (f" (default: {f.default!r})" if f.default != "" else " (default: '')")
        choices = _choices(m)
        if _range_text(m) and choices is None:
            help_text += f"; {_range_text(m)}"
        flag = "--" + f.name
        if f.type in (bool, "bool"):
            kwargs = dict(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            kwargs = dict(type=kind, choices=choices, metavar=None if choices else f.name.upper())
        group.add_argument(flag, help=help_text, **kwargs)
        if "_" in f.name:  # --lora-r works as well as --lora_r (not listed in --help)
            group.add_argument(flag.replace("_", "-"), dest=f.name, help=argparse.SUPPRESS, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Precedence: defaults < preset < --config file < flags."""
    given = vars(args).copy()
    preset = given.pop("preset", None)
    file = given.pop("config", None)
    values: dict[str, Any] = {}
    if preset:
        values["preset"] = preset
    if file:
        file_values = load_file(file)
        if "preset" in file_values and preset:  # a preset on the command line wins over one in the file
            file_values.pop("preset")
        values.update(file_values)
    values.update({k: v for k, v in given.items() if k in _FIELD_NAMES})
    return TrainConfig.from_dict(values, source=str(file) if file else "command line")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from command-line arguments. The files of ``--loss_plugins`` (on the command line or in
    the ``--config`` file) are imported first, so ``--loss`` accepts the losses they register."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--loss_plugins", "--loss-plugins", default=None)
    pre.add_argument("--config", default=None)
    argv = join_negative_numbers(sys.argv[1:] if argv is None else argv)
    known, _ = pre.parse_known_args(argv)
    plugins = known.loss_plugins
    if plugins is None and known.config:
        plugins = load_file(known.config).get("loss_plugins", "")
    registry.import_plugins(plugins or "")
    return config_from_args(build_parser().parse_args(argv))


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``["--lr", "-1e-4"]`` → ``["--lr=-1e-4"]``: argparse takes "-1e-4" for an option otherwise, and the range
    check (a clear message) never sees the value."""
    out: list[str] = []
    for item in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.match(item):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body so that bad input ends in one ``error:`` line and exit code 2, never a traceback.

    Bad input is a ValueError, an OSError (a missing file or model, no network), an ImportError (an
    optional package), or an error carrying an ``exit_code`` (a stopped diverging run: 3). Any other
    exception is a bug, and keeps its traceback. Under a launcher's several processes, a process other than
    the main one names itself (``error (process 2/4): …``); each message is written in one piece, so the
    lines of different processes do not interleave.
    """
    try:
        return body()
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        code = getattr(e, "exit_code", None)
        if code is None and isinstance(e, RuntimeError):
            raise
        message = str(e) if code == 3 else " ".join(str(e).split("\n")[0].split()) or type(e).__name__
        world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        who = f" (process {int(rank) + 1}/{world})" if world.isdigit() and rank.isdigit() and rank != "0" else ""
        sys.stderr.write(("\n" if code == 3 else "") + f"error{who}: {message}\n")
        sys.stderr.flush()
        return code or 2


def field_docs() -> dict[str, str]:
    """Field name → help text (the same text as ``--help``)."""
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_FIELD_NAMES = set(_FIELDS)


def _choices(metadata: dict) -> tuple | None:
    """A field's allowed values; a callable is asked each time (the losses registered so far)."""
    choices = metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def _check_keys(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} in {source}; valid fields: "
                         f"preset, {', '.join(sorted(_FIELD_NAMES))}")


def _range_text(m: dict) -> str:
    parts = []
    if m["ge"] is not None:
        parts.append(f">= {m['ge']}")
    if m["gt"] is not None:
        parts.append(f"> {m['gt']}")
    if m["le"] is not None:
        parts.append(f"<= {m['le']}")
    if m["lt"] is not None:
        parts.append(f"< {m['lt']}")
    return ("it must be " + " and ".join(parts)) if parts else ""


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


#: The fields of an example a ``teacher_template`` may name.
TEMPLATE_FIELDS = ("prompt", "answer")


def template_fields(template: str) -> list[str]:
    """The fields ``teacher_template`` names; each must be one of :data:`TEMPLATE_FIELDS`."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"teacher_template={template!r} is not a valid template ({e}); write e.g. "
                         "'{prompt} (the answer is {answer})', with {{ and }} for literal braces") from None
    for name in names:
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"teacher_template={template!r} names the field {{{name}}}, which the task's examples do not "
                             f"have; they have {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    if template and "prompt" not in names and "answer" not in names:
        raise ValueError(f"teacher_template={template!r} names no field: give e.g. '{{prompt}} (the answer is {{answer}})'")
    return names


def parse_teachers(spec: str) -> dict[str, tuple[str, str]]:
    """``teachers`` as {task: (teacher, quantization)}: ``'reverse:5=PATH;add:3=PATH@4bit'`` ->
    ``{'reverse:5': ('PATH', 'none'), 'add:3': ('PATH', '4bit')}``."""
    out: dict[str, tuple[str, str]] = {}
    for item in (x.strip() for x in spec.split(";")):
        if not item:
            continue
        task, eq, teacher = (x.strip() for x in item.partition("="))
        if not eq or not task or not teacher:
            raise ValueError(f"teachers={spec!r}: {item!r} is not TASK=TEACHER; write 'reverse:5=PATH;add:3=PATH@4bit'")
        if task in out:
            raise ValueError(f"teachers={spec!r} names the task {task!r} twice; give each task one teacher")
        path, at, quant = teacher.rpartition("@") if teacher.endswith(("@8bit", "@4bit")) else (teacher, "", "none")
        if quant != "none" and path == "self":
            raise ValueError(f"teachers={spec!r}: 'self' cannot be quantized (the student's own weights are the teacher)")
        out[task] = (path, quant)
    return out


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Accept the obvious spellings from YAML/JSON (1 for 1.0, "true" for True); reject the rest by name."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if f.name == "teachers" and isinstance(value, dict):  # a mapping in a config file
        value = ";".join(f"{k}={v}" for k, v in value.items())
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)):
                return _parse_bool(value)
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{f.name}={value!r} is not allowed; it must be a {kind}") from None
    return value
