"""The loss registry: one table of every loss a run can name, and the one calling convention they share.

The functions of :mod:`opd_mini.losses` are the maths, each with its own tensor arguments. A
*registered loss* wraps one of them (or any user function) in the convention the training loop and
the toy experiments call::

    kind="token":         fn(student_logp_BT,   batch: LossBatch, opts: LossOptions) -> (loss, metrics)
    kind="distribution":  fn(student_logits_BTV, batch: LossBatch, opts: LossOptions) -> (loss, metrics)

A token loss sees the student only through log π_θ(y_t|c_t) of the sampled tokens (B, T), and may couple
positions (the return-to-go); a distribution loss sees the student's whole next-token distribution and
must be separable along T (the loop may compute it on chunks of positions, with ``batch.slice_T``).
``signal`` says what the loop must ask the teacher for, so it never computes more than the loss reads.

Adding a loss is one function and one registration, from user code, without editing the package::

    from opd_mini import losses, registry

    @registry.register("mixed_kl", kind="distribution", signal="full")
    def mixed_kl(student_logits_BTV, batch, opts):
        alpha = opts.extra.get("alpha", 0.5)
        rev, _ = losses.reverse_kl_full(student_logits_BTV, batch.teacher_logp_BTV, batch.mask_BT,
                                        num_tokens=batch.num_tokens)
        fwd, _ = losses.forward_kl_full(student_logits_BTV, batch.teacher_logp_BTV, batch.mask_BT,
                                        num_tokens=batch.num_tokens)
        loss = (1 - alpha) * rev + alpha * fwd
        return loss, {"loss/total": loss.detach()}

then ``train(TrainConfig(loss="mixed_kl", loss_args="alpha=0.3"))``, or from a shell
``python -m opd_mini.train --loss_plugins my_losses.py --loss mixed_kl --loss_args alpha=0.3``; the
ablation, the demo and the toy experiments read the same table.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from opd_mini import losses
from opd_mini.losses import Metrics


@dataclass
class LossBatch:
    """The inputs a registered loss may read, for B rows of T completion positions.

    Only ``tokens_BT`` and ``mask_BT`` are always set; the teacher's fields are filled according to the
    loss's ``signal`` (``"sampled"``: ``teacher_logp_BT``; ``"topk"``: that and the top-K pair; ``"full"``:
    that and ``teacher_logp_BTV``), the rewards when the loss is registered with ``reward=True``.
    """

    tokens_BT: torch.Tensor  # (B, T) long: the sampled (or, for SFT, the teacher's) completion tokens y_t
    mask_BT: torch.Tensor  # (B, T) bool: positions that count
    num_tokens: float | None = None  # the normaliser N (the whole step's count under accumulation); None = mask.sum()
    behaviour_logp_BT: torch.Tensor | None = None  # (B, T) log π_behaviour(y_t|c_t) at sampling time
    teacher_logp_BT: torch.Tensor | None = None  # (B, T) log q(y_t|c_t)
    teacher_topk_ids_BTK: torch.Tensor | None = None  # (B, T, K) the teacher's K most likely tokens
    teacher_topk_logp_BTK: torch.Tensor | None = None  # (B, T, K) their log q (normalised over the vocabulary)
    teacher_logp_BTV: torch.Tensor | None = None  # (B, T, V) log q(·|c_t), only for signal="full"
    rewards_B: torch.Tensor | None = None  # (B,) verifiable reward of each row
    group_size: int = 1  # rows per prompt, consecutive (the GRPO group)
    # positions s -> teacher_logp_BTV[:, s], computed on demand (the fused path keeps the teacher's hidden
    # states instead of its (B, T, V) log-probs); slice_T fills teacher_logp_BTV of the chunk from it
    teacher_logp_fn: Callable[[slice], torch.Tensor] | None = None

    def slice_T(self, s: slice) -> "LossBatch":
        """The batch restricted to completion positions ``s`` (for distribution losses computed in chunks)."""
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in cut.items():
            if isinstance(value, torch.Tensor) and name.endswith(("_BT", "_BTK", "_BTV")):
                cut[name] = value[:, s]
        if self.teacher_logp_BTV is None and self.teacher_logp_fn is not None:
            cut["teacher_logp_BTV"], cut["teacher_logp_fn"] = self.teacher_logp_fn(s), None
        return LossBatch(**cut)

    @classmethod
    def from_teacher_logits(cls, tokens_BT: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, signal: str | None,
                            top_k: int = 0, mask_BT: torch.Tensor | None = None, **fields_) -> "LossBatch":
        """A batch whose teacher signal comes from the teacher's logits (B, T, V) held in one piece: the toy
        world and tests use it; the transformer loop builds the same fields chunk by chunk
        (:func:`opd_mini.teacher.score`). ``fields_`` sets any other field (``num_tokens``, ``rewards_B`` …)."""
        mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool) if mask_BT is None else mask_BT
        batch = cls(tokens_BT=tokens_BT, mask_BT=mask_BT, **fields_)
        if signal is None:
            return batch
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS} or None, got {signal!r}")
        batch.teacher_logp_BT = losses.token_logprobs(teacher_logits_BTV, tokens_BT)
        if signal == "sampled":
            return batch
        logp_BTV = F.log_softmax(teacher_logits_BTV.float(), dim=-1)
        if signal == "topk":
            batch.teacher_topk_logp_BTK, batch.teacher_topk_ids_BTK = logp_BTV.topk(top_k, dim=-1)
        else:
            batch.teacher_logp_BTV = logp_BTV
        return batch


@dataclass
class LossOptions:
    """Hyperparameters of the registered losses; each loss reads the ones it documents.

    ``TrainConfig`` carries the same fields (with the same defaults and --help text), so a run passes its
    config as ``opts``. ``extra`` holds options of user-registered losses (``--loss_args alpha=0.3``).
    """

    gamma: float = 0.0
    clip_log_ratio: float = 0.0  # 0 = off
    beta: float = 0.5
    top_k: int = 16
    add_sampled_token: bool = True
    renormalize: bool = True
    entropy_threshold: float = 1.0
    reward_weight: float = 1.0
    grpo_normalize_std: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "LossOptions":
        """The options of any object that has these attributes (a ``TrainConfig``, a toy config …);
        a missing attribute keeps its default. ``cfg.loss_args`` (``"k=v,k=v"``) fills ``extra``."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "extra" and hasattr(cfg, f.name)}
        return cls(**values, extra=parse_loss_args(getattr(cfg, "loss_args", "")))


def parse_loss_args(text: str) -> dict[str, float | str]:
    """``"alpha=0.3,name=x"`` → ``{"alpha": 0.3, "name": "x"}`` (numbers become floats)."""
    out: dict[str, float | str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"loss_args item {item!r} is not key=value; write e.g. --loss_args alpha=0.3,tau=2")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


#: What a loss can ask of the teacher, cheapest first.
SIGNALS = ("sampled", "topk", "full")
KINDS = ("token", "distribution")


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: its function and what the loop must provide for it."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    kind: str  # "token" or "distribution" (see the calling convention above)
    signal: str | None  # teacher signal: "sampled", "topk", "full", or None (the teacher is not scored)
    rollouts: str = "student"  # who generates the training samples: "student" (on-policy) or "teacher" (SFT)
    reward: bool = False  # reads batch.rewards_B (the task's verifier); needs num_generations >= 2 for groups

    @property
    def doc(self) -> str:
        """The first line of the function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


#: Every loss a run can name, in registration order: ``python -m opd_mini.train --loss NAME``.
LOSS_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, kind: str, signal: str | None, rollouts: str = "student", reward: bool = False,
             replace: bool = False) -> Callable:
    """Decorator: add ``fn`` to :data:`LOSS_REGISTRY` under ``name`` (the module docstring has an example).

    ``kind``: ``"token"`` or ``"distribution"`` (the calling convention). ``signal``: what the teacher must
    provide in the batch, ``"sampled"`` (``teacher_logp_BT``), ``"topk"`` (and the top-K pair), ``"full"``
    (and ``teacher_logp_BTV``), or None (the teacher is not scored). ``rollouts="teacher"``: the teacher
    generates the training samples (SFT). ``reward=True``: the loss reads ``batch.rewards_B`` and needs
    several samples per prompt. A name already taken by another function is an error unless ``replace``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if signal is not None and signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS} or None, got {signal!r}")
    if rollouts not in ("student", "teacher"):
        raise ValueError(f"rollouts must be 'student' or 'teacher', got {rollouts!r}")
    if kind == "distribution" and signal is None:
        raise ValueError("a distribution loss compares with the teacher: give it signal='topk' or 'full'")

    def add(fn: Callable) -> Callable:
        old = LOSS_REGISTRY.get(name)
        same_source = old is not None and (old.fn.__module__, old.fn.__qualname__) == (fn.__module__, fn.__qualname__)
        if old is not None and not (replace or same_source):  # a re-run notebook cell re-registers its own loss
            raise ValueError(f"a loss named {name!r} is already registered ({old.fn.__module__}.{old.fn.__qualname__}); "
                             "pick another name or pass replace=True")
        LOSS_REGISTRY[name] = LossSpec(name, fn, kind, signal, rollouts, reward)
        return fn

    return add


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; a ValueError listing the known names otherwise."""
    if name not in LOSS_REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(LOSS_REGISTRY)} "
                         "(register your own with opd_mini.registry.register)")
    return LOSS_REGISTRY[name]


def loss_names() -> tuple[str, ...]:
    """The registered loss names, in registration order."""
    return tuple(LOSS_REGISTRY)


def import_plugins(spec: str) -> list[str]:
    """Import user files (``path/to/my_losses.py``) or modules (``my_pkg.losses``), comma-separated, so that
    the losses they register exist; each is imported once per process. Returns the module names."""
    names = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        if item.endswith(".py"):
            path = Path(item).resolve()
            if not path.is_file():
                raise ValueError(f"loss plugin file {item} does not exist")
            name = f"opd_mini_plugin_{path.stem}_{abs(hash(str(path))):x}"
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                try:
                    module_spec.loader.exec_module(module)
                except Exception:
                    del sys.modules[name]
                    raise
        else:
            name = item
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                raise ValueError(f"loss plugin module {item!r} cannot be imported ({e}); give a module on the "
                                 "Python path or a path ending in .py") from None
        names.append(name)
    return names


def compute_loss(name: str, student_logits_BTV: torch.Tensor, batch: LossBatch,
                 opts: LossOptions | None = None) -> tuple[torch.Tensor, Metrics]:
    """A registered loss from the student's logits (B, T, V) in one piece (token losses take the sampled
    tokens' log-probs first). The toy world and tests use this; the loop may chunk along T instead."""
    spec = get_loss(name)
    opts = opts or LossOptions()
    if spec.kind == "token":
        return spec.fn(losses.token_logprobs(student_logits_BTV, batch.tokens_BT), batch, opts)
    return spec.fn(student_logits_BTV, batch, opts)


class MetricMean:
    """Combines the metrics of pieces of one step (micro-batches, chunks along T): ``loss/total`` is summed,
    since each piece is already normalised by the whole step's token count; every other key is averaged,
    weighted by each piece's number of masked-in tokens."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, mets: dict, mask_BT: torch.Tensor | None = None, weight: float | None = None) -> None:
        w = float(mask_BT.sum()) if weight is None else weight
        for k, v in mets.items():
            v = float(v)
            if k == "loss/total":
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.weights[k] = 1.0
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * w
                self.weights[k] = self.weights.get(k, 0.0) + w

    def merge(self, other: "MetricMean") -> None:
        for k in other.sums:
            self.sums[k] = self.sums.get(k, 0.0) + other.sums[k]
            self.weights[k] = 1.0 if k == "loss/total" else self.weights.get(k, 0.0) + other.weights[k]

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] if self.weights[k] else 0.0 for k in self.sums}


def _clip(opts: LossOptions) -> float | None:
    return opts.clip_log_ratio or None


@register("reverse_kl_sampled", kind="token", signal="sampled")
def _reverse_kl_sampled(logp_BT, b: LossBatch, o: LossOptions):
    """Sampled-token reverse KL in policy-gradient form, γ return-to-go (opts: gamma, clip_log_ratio)."""
    return losses.reverse_kl_sampled_token(logp_BT, b.teacher_logp_BT, b.mask_BT, behaviour_logp_BT=b.behaviour_logp_BT,
                                    gamma=o.gamma, clip_log_ratio=_clip(o), num_tokens=b.num_tokens)


@register("reverse_kl_full", kind="distribution", signal="full")
def _reverse_kl_full(logits_BTV, b: LossBatch, o: LossOptions):
    """Exact reverse KL over the vocabulary at every visited prefix."""
    return losses.reverse_kl_full(logits_BTV, b.teacher_logp_BTV, b.mask_BT, num_tokens=b.num_tokens)


@register("forward_kl", kind="distribution", signal="full")
def _forward_kl(logits_BTV, b: LossBatch, o: LossOptions):
    """Exact forward KL over the vocabulary at every visited prefix."""
    return losses.forward_kl_full(logits_BTV, b.teacher_logp_BTV, b.mask_BT, num_tokens=b.num_tokens)


@register("jsd", kind="distribution", signal="full")
def _jsd(logits_BTV, b: LossBatch, o: LossOptions):
    """Generalized Jensen-Shannon divergence JSD(β) (opts: beta; 0 = forward KL, 1 = reverse KL)."""
    return losses.generalized_jsd(logits_BTV, b.teacher_logp_BTV, b.mask_BT, beta=o.beta, num_tokens=b.num_tokens)


@register("reverse_kl_topk", kind="distribution", signal="topk")
def _reverse_kl_topk(logits_BTV, b: LossBatch, o: LossOptions):
    """Reverse KL inside the teacher's top-K support (opts: top_k, add_sampled_token, renormalize)."""
    extra = (dict(sampled_ids_BT=b.tokens_BT, teacher_sampled_logp_BT=b.teacher_logp_BT)
             if o.add_sampled_token else {})
    return losses.reverse_kl_topk(logits_BTV, b.teacher_topk_ids_BTK, b.teacher_topk_logp_BTK, b.mask_BT,
                           renormalize=o.renormalize, num_tokens=b.num_tokens, **extra)


@register("entropy_aware", kind="distribution", signal="full")
def _entropy_aware(logits_BTV, b: LossBatch, o: LossOptions):
    """Reverse KL plus forward KL where the teacher's entropy is high (opts: entropy_threshold)."""
    return losses.entropy_aware_kl(logits_BTV, b.teacher_logp_BTV, b.mask_BT, entropy_threshold=o.entropy_threshold,
                            num_tokens=b.num_tokens)


@register("sft", kind="token", signal=None, rollouts="teacher")
def _sft(logp_BT, b: LossBatch, o: LossOptions):
    """Baseline: the teacher generates, the student does cross-entropy on its samples (off-policy)."""
    return losses.sft_cross_entropy(logp_BT, b.mask_BT, num_tokens=b.num_tokens)


@register("grpo", kind="token", signal=None, reward=True)
def _grpo(logp_BT, b: LossBatch, o: LossOptions):
    """Baseline: RL with the task's verifiable reward, group-normalised advantages (opts: grpo_normalize_std)."""
    advantages_B = losses.grpo_advantages(b.rewards_B, b.group_size, normalize_std=o.grpo_normalize_std)
    return losses.policy_gradient(logp_BT, advantages_B.to(logp_BT.device), b.mask_BT,
                           behaviour_logp_BT=b.behaviour_logp_BT, num_tokens=b.num_tokens)


@register("opd_grpo", kind="token", signal="sampled", reward=True)
def _opd_grpo(logp_BT, b: LossBatch, o: LossOptions):
    """Sampled-token OPD advantage plus reward_weight · GRPO advantage (opts: gamma, clip_log_ratio, reward_weight)."""
    return losses.opd_grpo(logp_BT, b.teacher_logp_BT, b.behaviour_logp_BT, b.rewards_B, b.mask_BT,
                           group_size=b.group_size, gamma=o.gamma, clip_log_ratio=_clip(o),
                           reward_weight=o.reward_weight, normalize_std=o.grpo_normalize_std, num_tokens=b.num_tokens)
