"""The one configuration of a training run: a dataclass whose fields document themselves.

Every field is declared once (:func:`opd_mini.options.opt`), with its default, its help text and its
allowed range; the loss hyperparameters are declared in :class:`opd_mini.registry.LossOptions`, which
``TrainConfig`` extends. Three ways to build a config, applied in this order (later wins)::

    TrainConfig()                               # the defaults below
    preset  (--preset tiny-cpu | smollm2-cpu | laptop-gpu)    # a named bundle of overrides, see PRESETS
    file    (--config run.yaml / run.json)      # any subset of the fields, may name a preset too
    flags   (--lr 3e-4 --loss sft ...)          # every field is a flag (opd_mini.cli)

From Python: ``TrainConfig(lr=3e-4)``, ``TrainConfig.from_preset("tiny-cpu", steps=10)``,
``TrainConfig.from_file("run.yaml")`` or ``opd_mini.cli.parse_args(["--preset", "tiny-cpu", "--steps", "10"])``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from opd_mini import registry
from opd_mini.layer_drop import parse_range
from opd_mini.options import check_fields, coerce, opt
from opd_mini.registry import LossOptions
from opd_mini.trackers import TRACKERS, check_installed


#: ``--teacher answers``: the task's reference answers stand in for the teacher's samples (SFT on the data).
ANSWERS = "answers"
#: ``--teacher student``: the student itself as it trains (a moving teacher; with --teacher_template, OPSD's).
MOVING = "student"


@dataclass
class TrainConfig(LossOptions):
    """Everything one run of ``python -m opd_mini.train`` needs: the loss options of ``LossOptions`` (``gamma``,
    ``beta``, ``top_k`` …) and the fields below. See ``--help`` for each."""

    # --- models -----------------------------------------------------------------------------
    student: str = opt("tiny", "student model: a Hugging Face id or a save_pretrained directory; 'tiny' = the "
                       "offline tiny student from opd_mini.tiny (briefly SFT-warm-started, trained locally if missing)")
    teacher: str = opt("tiny", "teacher model: a Hugging Face id or directory; 'tiny' = the offline tiny teacher; "
                       "'self' = the student's own base model (self-distillation: scored with the LoRA adapter "
                       "disabled, or a frozen copy when lora is off); 'answers' = the task's reference answers as the "
                       "teacher's samples (sft on the data); 'student' = the student itself as it trains, behind "
                       "--teacher_template (a moving teacher); 'none' only for grpo")
    teachers: str = opt("", "one teacher per task, 'TASK=TEACHER;TASK=TEACHER' (a YAML/JSON file may give a mapping): "
                        "each rollout is scored by its task's teacher, e.g. --task 'reverse:5+add:3' --teachers "
                        "'reverse:5=PATH_A;add:3=PATH_B@4bit'; TEACHER is an id or directory, 'self', or either with "
                        "@8bit/@4bit; every task of --task needs one; empty = --teacher scores every task")
    tokenizer: str = opt("", "tokenizer id or directory shared by student and teacher (empty = the student's)")
    student_drop_layers: str = opt("", "a smaller student: without the decoder layers FIRST-LAST (from 0, e.g. 12-17), "
                                   "written once into a cache folder; empty = all layers")
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
    task: str = opt("reverse:5", "prompt source with a verifier: reverse:N, add:N, walk:N, jsonl:PATH, "
                    "hf:DATASET[:split], a task a --task_plugins file registers, or a mixture A+B (A*3+B weighted)")
    task_plugins: str = opt("", "comma-separated Python files (path/to/file.py) or module names imported before the "
                            "run; each may register tasks with opd_mini.tasks.register")
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
    mask_special_tokens: bool = opt(False, "leave special tokens (EOS, chat markers) out of the loss")

    # --- optimisation -----------------------------------------------------------------------
    steps: int = opt(100, "optimizer steps", ge=1)
    lr: float = opt(1e-4, "peak learning rate of AdamW (AdamW moves each weight by about lr per step, so 1 or more "
                    "only destroys the model)", gt=0, lt=1)
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
    teacher_chunk_size: int = opt(0, "positions per chunk of the teacher's head + log-softmax (0 = sized by element "
                                  "count: at most 2^22 logits, 16 MB in fp32, per chunk of rows and positions)", ge=0)
    divergence_backend: str = opt("fused", "how the full-vocabulary losses (reverse_kl_full, forward_kl, jsd, "
                                  "entropy_aware) compute the divergence at each position: fused (the gradient "
                                  "written out, opd_mini.divergences) or compiled (torch.compile of the plain formula: "
                                  "faster and smaller on the CPU as measured in BENCHMARKS.md; needs a C++ compiler, and "
                                  "each new shape compiles once, seconds each)", choices=("fused", "compiled"))
    divergence_factor: float = opt(10.0, "stop the run, before applying the step, when the gradient norm exceeds "
                                   "this many times the median of the previous 20 steps (checked from step 11; "
                                   "0 = off)", ge=0)
    max_time_s: float = opt(0.0, "stop after this many seconds of training (sampling + scoring + updates, eval "
                            "excluded); 0 = no limit", ge=0)

    # --- sampling ---------------------------------------------------------------------------
    max_new_tokens: int = opt(16, "maximum completion length in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature of the rollouts (1 = on-policy; below 0.01 logits / "
                             "temperature overflow)", ge=0.01, le=100)
    teacher_sample_pool: int = opt(0, "losses trained on teacher samples (sft): a fixed set of them, this many "
                                   "training prompts sampled once at the start, each step drawing its prompts from "
                                   "the set (a distillation dataset); 0 = fresh teacher samples every step", ge=0)
    train_prompts: int = opt(0, "train on a fixed set of this many training prompts, drawn once from the seed: every "
                             "step's prompts_per_step prompts are drawn from it (1 = one prompt, sampled prompts_per_step "
                             "× num_generations times a step); 0 = a fresh draw from the whole training split every step",
                             ge=0)
    prefix_fraction: float = opt(1.0, "distil a prefix: the training rollouts stop after ceil(prefix_fraction × "
                                 "max_new_tokens) new tokens, the teacher scores those and the loss reads them; the "
                                 "evaluation still samples whole completions; 1 = whole completions", gt=0, le=1)
    lmbda: float = opt(1.0, "GKD's λ (TRL's lmbda): the probability that a step's rollouts are the student's own samples; "
                       "otherwise the teacher samples that step (decided per step from the seed, so resumed runs match); "
                       "below 1 only with a full-distribution loss (reverse_kl_full, forward_kl, jsd, reverse_kl_topk(_tail), "
                       "entropy_aware), which compare whole distributions at every visited state", ge=0, le=1)
    teacher_template: str = opt("", "the teacher's prompt, from the example's fields, e.g. '{prompt} (the answer is "
                                "{answer})': the teacher scores the student's completion behind this prompt instead of "
                                "the student's (privileged-context self-distillation, with --teacher self: no second "
                                "copy), or '{hidden}{prompt}' with a hidden:RHO:SPEC task (a flag only the teacher reads); "
                                "empty = the student's prompt")
    sampler: str = opt("decode", "rollout sampler: decode (the package's KV-cache loop: inverse-CDF draws, top-p "
                       "without a full sort, log-probs recorded while decoding; the fast path) or generate (Hugging "
                       "Face generate, then one forward for the behaviour log-probs; the readable reference, other "
                       "samples for the same seed); with --teacher self the log-probs come from a forward either way, "
                       "so r_t stays exactly 0", choices=("decode", "generate"))
    top_p: float = opt(1.0, "nucleus sampling of the rollouts (1 = off)", gt=0, le=1)
    top_k_sampling: int = opt(0, "sample from the k most likely tokens only (0 = off)", ge=0)
    slip_prob: float = opt(0.0, "an environment that slips (the DAgger setting): each emitted move of a task with "
                           "slip_moves (walk:N, route:N:K: L <-> R) is swapped with this probability after the policy "
                           "drew it, in the training rollouts and at evaluation alike; a slipped token is left out of "
                           "the loss (decode sampler only; 0 = off)", ge=0, lt=1)
    slip_train: bool = opt(True, "with --slip_prob: whether the training rollouts slip too (false: clean training "
                           "walks, e.g. behaviour cloning on clean teacher walks, while evaluation still slips)")

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = opt(50, "evaluate every N steps, and at step 0 and the last step (0 = only those two)", ge=0)
    eval_prompts: int = opt(64, "held-out prompts per evaluation", ge=1)
    eval_samples: int = opt(4, "samples per held-out prompt (n of the unbiased pass@k estimator)", ge=1)
    pass_k: int = opt(4, "k of pass@k (k <= eval_samples)", ge=1)
    eval_temperature: float = opt(1.0, "sampling temperature at evaluation", ge=0.01, le=100)
    eval_kl_forward: bool = opt(False, "also evaluate the forward KL(teacher ‖ student) per token on the teacher's own "
                                "samples of the held-out prompts (eval/kl_forward; one more sampling pass)")
    eval_kl_to_init: bool = opt(False, "also evaluate KL(π₀ ‖ π) per token on the evaluation prompts (eval/kl_to_init) and "
                                "on the retention task's (eval/retention_kl_to_init), π₀ = the LoRA student's base "
                                "(adapter disabled), on π₀'s own samples")
    save_every: int = opt(0, "write a checkpoint every N steps, and at the end (0 = only at the end)", ge=0)
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep on disk", ge=1)
    out_dir: str = opt("runs/opd", "directory of the metrics log, checkpoints and final model")
    resume: bool = opt(False, "continue from the last checkpoint in out_dir (model, optimizer, scheduler, RNG, step)")
    overwrite: bool = opt(False, "start a new run in an out_dir that holds an earlier one, moving the earlier files "
                          "to out_dir/replaced/TIMESTAMP/ (without it such a run is refused)")
    progress: bool = opt(True, "show a tqdm progress bar with live metrics")
    report_to: str = opt("none", "also send the config, every metric and a table of evaluation samples to a tracker: "
                         "tensorboard (OUT/tensorboard), trackio (its local store) or wandb (OUT/wandb, offline unless "
                         "WANDB_MODE says otherwise); each is a separate pip install", choices=TRACKERS)

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
        if isinstance(self.teachers, dict):  # a mapping in a config file
            empty = [k for k, v in self.teachers.items() if v is None or not str(v).strip()]
            if empty:
                raise ValueError(f"teachers: the task {empty[0]} has an empty teacher; give a model directory, a hub "
                                 "id or 'self' (e.g. reverse:5: runs/teacher)")
            self.teachers = ";".join(f"{k}={v}" for k, v in self.teachers.items())
        registry.import_plugins(coerce(_FIELDS["loss_plugins"], self.loss_plugins))  # before `loss` is checked
        registry.import_plugins(coerce(_FIELDS["task_plugins"], self.task_plugins), what="task")
        check_fields(self)
        if self.pass_k > self.eval_samples:
            raise ValueError(f"pass_k={self.pass_k} is out of range; it must be <= eval_samples={self.eval_samples} "
                             "(pass@k needs at least k samples per prompt)")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} is not allowed: it must divide prompts_per_step="
                             f"{self.prompts_per_step} (each micro-batch holds prompts_per_step / grad_accum prompts)")
        spec = registry.get_loss(self.loss)
        self.extra  # noqa: B018  (loss_args: its syntax, and no built-in option under another name)
        if self.teacher_sample_pool and spec.rollouts == "student" and self.lmbda >= 1:
            raise ValueError(f"teacher_sample_pool={self.teacher_sample_pool} would never be used: loss={self.loss} trains "
                             "on the student's own samples at every step; use it with a loss trained on teacher samples "
                             "(sft) or with --lmbda below 1 (GKD: the teacher's steps draw from the pool)")
        if self.prefix_fraction < 1 and spec.reward:
            raise ValueError(f"prefix_fraction={self.prefix_fraction} cuts the completions the verifier scores, and "
                             f"loss={self.loss} learns from that reward: distil a prefix with a loss that reads only the "
                             "teacher, or leave prefix_fraction at 1")
        if self.prefix_fraction < 1 and self.teacher == ANSWERS:
            raise ValueError(f"prefix_fraction={self.prefix_fraction} does not apply to teacher='answers' (reference "
                             "answers are not sampled): drop --prefix_fraction")
        if self.train_prompts and self.teacher_sample_pool:
            raise ValueError(f"train_prompts={self.train_prompts} and teacher_sample_pool={self.teacher_sample_pool} "
                             "both fix the prompts a run trains on: give one")
        if self.teacher_sample_pool and self.teacher_sample_pool < self.prompts_per_step:
            raise ValueError(f"teacher_sample_pool={self.teacher_sample_pool} is out of range: a fixed set must hold at "
                             f"least prompts_per_step={self.prompts_per_step} prompts (or 0 for fresh samples)")
        if self.divergence_backend != "fused" and spec.signal != "full":
            raise ValueError(f"divergence_backend={self.divergence_backend!r} has no effect with loss={self.loss}, which "
                             "computes no full-vocabulary divergence: use it with reverse_kl_full, forward_kl, jsd or "
                             "entropy_aware, or leave it at 'fused'")
        if self.divergence_backend == "compiled" and self.device != "cuda" and not _cxx_compiler():
            raise ValueError("divergence_backend='compiled' needs a C++ compiler on the CPU (torch.compile's inductor "
                             "builds its kernels with one): install g++ or clang++, or leave it at 'fused'")
        if not self.slip_train and self.slip_prob == 0:
            raise ValueError("slip_train=false has no effect without slips: give --slip_prob above 0, or drop it")
        if self.slip_prob > 0 and self.sampler != "decode":
            raise ValueError(f"slip_prob={self.slip_prob} needs --sampler decode (generate cannot swap a token after "
                             "drawing it)")
        if spec.reward and self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations} is out of range for loss={self.loss}: "
                             "it must be >= 2 (the group baseline needs several samples per prompt)")
        if self.teacher == "none" and (spec.signal is not None or spec.rollouts == "teacher"):
            needs_none = [n for n, s in registry.LOSS_REGISTRY.items() if s.signal is None and s.rollouts == "student"]
            raise ValueError(f"teacher='none' is only allowed with a loss that never calls the teacher "
                             f"({', '.join(needs_none)}), not loss={self.loss}")
        if self.teacher == ANSWERS:
            if not (spec.rollouts == "teacher" and spec.signal is None):
                raise ValueError(f"teacher='answers' (the task's reference answers) has no distribution to score with: use "
                                 f"it with loss=sft, not loss={self.loss}")
            for name, value, default in (("teacher_template", self.teacher_template, ""),
                                         ("teacher_quantization", self.teacher_quantization, "none"),
                                         ("eval_kl_forward", self.eval_kl_forward, False)):
                if value != default:
                    raise ValueError(f"{name}={value!r} does not apply to teacher='answers' (reference answers are no "
                                     f"model): drop --{name}")
            if self.teachers:
                raise ValueError("teacher='answers' and --teachers contradict each other: give one")
            if self.slip_prob > 0 and self.slip_train:
                raise ValueError("the reference answers of teacher='answers' do not slip: give --slip_train false (slips "
                                 "in evaluation only), or drop --slip_prob")
        if self.teacher == MOVING:
            if not self.teacher_template:
                raise ValueError("teacher='student' (the student itself as it trains) teaches nothing behind the student's "
                                 "own prompt (r_t = 0): give --teacher_template, e.g. '{prompt} (the answer is {answer})'")
            if self.teacher_quantization != "none" or self.teachers:
                raise ValueError("teacher='student' is the training student itself: it cannot be quantized or combined "
                                 "with --teachers")
        if self.teacher == "self" and self.teacher_quantization != "none":
            raise ValueError(f"teacher_quantization={self.teacher_quantization!r} is not allowed with teacher='self' "
                             "(the student's own base weights are the teacher); use 'none'")
        if not self.task:
            raise ValueError("task='' is not allowed; give a task spec such as reverse:3, add:3 or jsonl:PATH")
        if not self.out_dir.strip():
            raise ValueError("out_dir='' is not allowed (an unset shell variable?); give a directory, e.g. runs/opd")
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: --resume continues the earlier run, "
                             "--overwrite moves it aside and starts over; give one")
        if self.teachers and self.teacher_quantization != "none":
            raise ValueError(f"teacher_quantization={self.teacher_quantization!r} does not apply to --teachers: write the "
                             "quantization of each teacher there, e.g. 'reverse:5=PATH@4bit'")
        if not self.lora and self.dtype in ("bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} with lora=false is not allowed: full fine-tuning in {self.dtype} keeps "
                             "no float32 master weights, so small updates are lost; use --dtype float32 (or auto on "
                             "a CPU), or LoRA (--lora true)")
        if self.student_drop_layers:
            parse_range(self.student_drop_layers)
        if self.init_adapter and not self.lora:
            raise ValueError(f"init_adapter={self.init_adapter!r} needs lora=true (it is a LoRA adapter)")
        if self.eval_kl_to_init and not self.lora:
            raise ValueError("eval_kl_to_init=true needs lora=true (π₀ is the student with its adapter disabled)")
        check_installed(self.report_to)  # an uninstalled tracker: one line naming the pip command
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
    # SmolLM2-135M-Instruct on a CPU, offline, learns from itself behind an instruction (context distillation).
    "smollm2-cpu": dict(
        student="smollm2-135m", teacher="self", teacher_template="Answer in one short sentence. {prompt}",
        task="questions", eval_fraction=0.25, retention_task="sums", eval_kl_to_init=True, loss="reverse_kl_full", device="cpu",
        dtype="float32", threads=2, lora=True, lora_target_modules="q_proj,v_proj", lr=2e-3, warmup_steps=0, out_dir="runs/smollm2-cpu",
        steps=12, prompts_per_step=4, num_generations=2, max_new_tokens=32, eval_every=6, eval_prompts=8, eval_samples=2, pass_k=1,
    ),
    # One laptop GPU (about 8 GB): a 0.5B LoRA student and a 3B teacher of the same family in 4-bit.
    "laptop-gpu": dict(
        student="Qwen/Qwen2.5-0.5B-Instruct", teacher="Qwen/Qwen2.5-3B-Instruct", teacher_quantization="4bit",
        task="add:4", retention_task="reverse:6", device="cuda", dtype="bfloat16",
        lora=True, lora_r=16, lora_alpha=32, lr=1e-4, lr_schedule="cosine", warmup_steps=10, steps=200,
        prompts_per_step=16, num_generations=4, grad_accum=4, max_new_tokens=32, loss_chunk_size=8,
        gradient_checkpointing=True, eval_every=25, eval_prompts=128, eval_samples=4, pass_k=4,
        save_every=50, out_dir="runs/laptop-gpu",
    ),
}


def _cxx_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, if there is one on PATH."""
    import shutil

    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def preset_values(name: str) -> dict[str, Any]:
    """The overrides of a named preset (ValueError listing the presets when unknown)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not allowed; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


#: Keys a config file may hold besides the fields: a recipe (recipes/*.yaml) says what result it reproduces.
RECIPE_KEYS = ("reproduces",)


def key_lines(text: str, suffix: str) -> dict[tuple, int]:
    """The 1-based line of every key of a YAML or JSON mapping, by its path (``("scales", "full", "steps")``);
    for JSON, the top-level keys' first occurrence."""
    if suffix == ".json":
        return {(m.group(1),): text.count("\n", 0, m.start()) + 1
                for m in reversed(list(re.finditer(r'"([^"\\]+)"\s*:', text)))}
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))

    walk(yaml.compose(text), ())
    return lines


def read_mapping(path: str | Path, what: str = "config file") -> tuple[dict[str, Any], dict[tuple, int]]:
    """A YAML (.yaml/.yml) or JSON (.json) file holding a mapping, and the line of each of its keys."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"{what} {path} must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping of field names to values, got {type(data).__name__}")
    return data, key_lines(text, path.suffix)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) file holding a mapping of field names to values (and, for a
    recipe, :data:`RECIPE_KEYS`); an unknown field is named with the file and its line."""
    data, lines = read_mapping(path)
    for key in data:
        if key not in FIELD_NAMES and key != "preset" and key not in RECIPE_KEYS:
            raise ValueError(f"unknown config field {key!r} in {path}, line {lines.get((key,), '?')}: "
                             f"{_did_you_mean(key, FIELD_NAMES)}valid fields: preset, {', '.join(sorted(FIELD_NAMES))}")
    return {k: v for k, v in data.items() if k not in RECIPE_KEYS}


def _did_you_mean(key: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(names), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


#: The fields of an example a ``teacher_template`` may name.
TEMPLATE_FIELDS = ("prompt", "answer", "hidden")


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
        if path in (ANSWERS, MOVING):
            raise ValueError(f"teachers={spec!r}: '{path}' is a --teacher of its own, not a per-task teacher")
        if quant != "none" and path == "self":
            raise ValueError(f"teachers={spec!r}: 'self' cannot be quantized (the student's own weights are the teacher)")
        out[task] = (path, quant)
    return out



_FIELDS = {f.name: f for f in fields(TrainConfig)}
FIELD_NAMES = tuple(_FIELDS)


def _check_keys(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} in {source}; valid fields: "
                         f"preset, {', '.join(sorted(FIELD_NAMES))}")
