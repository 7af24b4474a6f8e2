"""The loss registry: one table of every loss a run can name, and the one calling convention they share.

The functions of :mod:`opd_mini.losses` are the maths, each with its own tensor arguments. A
*registered loss* wraps one of them (or any user function) in the convention the training loop and
the toy experiments call::

    kind="token":         fn(student_logp_BT,   batch: Batch, opts: LossOptions) -> (loss, metrics)
    kind="distribution":  fn(student_logits_BTV, batch: Batch, opts: LossOptions) -> (loss, metrics)

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from opd_mini import losses
from opd_mini.batch import SIGNALS, Batch
from opd_mini.losses import Metrics
from opd_mini.options import check_fields, opt


@dataclass
class LossOptions:
    """Hyperparameters of the built-in losses; each loss reads the ones it documents.

    Each is declared here once, with its default, its help text and its range; ``TrainConfig`` inherits
    these fields, so they are also its fields and flags (``--beta 0.3``). ``loss_args`` carries the options
    of user-registered losses (``--loss_args alpha=0.3``), read as ``opts.extra``.
    """

    gamma: float = opt(0.0, "reverse_kl_sampled/opd_grpo: discount of the return-to-go of −r_t "
                       "(0 = token-level OPD, low variance; 1 = unbiased sequence-level estimator)", ge=0, le=1)
    clip_log_ratio: float = opt(0.0, "reverse_kl_sampled/opd_grpo: clip the log-ratio r_t to [−c, c] (0 = off)", ge=0)
    beta: float = opt(0.5, "jsd: mixture weight β of JSD(β); β=0 is forward KL, β=1 reverse KL, 0.5 symmetric JSD",
                      ge=0, le=1)
    top_k: int = opt(16, "reverse_kl_topk, reverse_kl_topk_tail: size K of the teacher's top-K support (K >= 2)", ge=2)
    add_sampled_token: bool = opt(True, "reverse_kl_topk, reverse_kl_topk_tail: add the student's sampled token to "
                                  "the support")
    renormalize: bool = opt(True, "reverse_kl_topk: renormalise both distributions inside the support "
                            "(false collapses; kept for the ablation)")
    entropy_threshold: float = opt(1.0, "entropy_aware: add forward KL where the teacher's entropy exceeds this "
                                   "(nats)", ge=0)
    reward_weight: float = opt(1.0, "opd_grpo: weight w of the GRPO reward advantage added to the OPD advantage",
                               ge=0)
    grpo_normalize_std: bool = opt(True, "grpo/opd_grpo: divide group advantages by the group's std "
                                   "(false = Dr. GRPO, mean baseline only)")
    loss_args: str = opt("", "options of a user-registered loss as key=value pairs, comma-separated (e.g. "
                         "alpha=0.3); the loss reads them from opts.extra")

    def __post_init__(self) -> None:
        check_fields(self)
        self.extra  # noqa: B018  (its syntax, and no built-in option under another name)

    @property
    def extra(self) -> dict[str, float | str]:
        """``loss_args`` parsed: ``"alpha=0.3,name=x"`` → ``{"alpha": 0.3, "name": "x"}``."""
        out = parse_loss_args(self.loss_args)
        builtin = [k for k in out if k in LOSS_OPTION_NAMES]
        if builtin:
            raise ValueError(f"loss_args={self.loss_args!r} sets {builtin[0]}, a built-in option that loss_args does "
                             f"not change: use --{builtin[0]} {out[builtin[0]]}")
        return out

    @classmethod
    def from_config(cls, cfg) -> "LossOptions":
        """The options of any object that has these attributes (a ``TrainConfig``, a toy config …);
        a missing attribute keeps its default."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


#: The built-in options (every field but ``loss_args``): a ``loss_args`` key may not take one of these names.
LOSS_OPTION_NAMES = tuple(f.name for f in fields(LossOptions) if f.name != "loss_args")


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
    replaced: str = ""  # the function this registration replaced under the same name (replace=True), if any

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
        was = f"{old.fn.__module__}.{old.fn.__qualname__}" if old is not None and not same_source else ""
        LOSS_REGISTRY[name] = LossSpec(name, fn, kind, signal, rollouts, reward, was)
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


def import_plugins(spec: str, what: str = "loss") -> list[str]:
    """Import user files (``path/to/my_losses.py``) or modules (``my_pkg.losses``), comma-separated, so that
    the losses (or tasks) they register exist; each is imported once per process. Returns the module names.
    A file that is missing or fails to import is a ValueError naming the file and the error."""
    names = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        if item.endswith(".py"):
            path = Path(item).resolve()
            if not path.is_file():
                raise ValueError(f"{what} plugin file {item} does not exist")
            name = f"opd_mini_plugin_{path.stem}_{abs(hash(str(path))):x}"
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                try:
                    module_spec.loader.exec_module(module)
                except Exception as e:
                    del sys.modules[name]
                    where = f", line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
                    raise ValueError(f"{what} plugin file {item}{where} failed to import: {type(e).__name__}: "
                                     f"{' '.join(str(e).split())}") from None
        else:
            name = item
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                raise ValueError(f"{what} plugin module {item!r} cannot be imported ({e}); give a module on the "
                                 "Python path or a path ending in .py") from None
            except Exception as e:
                raise ValueError(f"{what} plugin module {item!r} failed to import: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())}") from None
        names.append(name)
    return names


def compute_loss(name: str, student_logits_BTV: torch.Tensor, batch: Batch,
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
def _reverse_kl_sampled(logp_BT, b: Batch, o: LossOptions):
    """Sampled-token reverse KL in policy-gradient form, γ return-to-go (opts: gamma, clip_log_ratio)."""
    return losses.reverse_kl_sampled_token(logp_BT, b.teacher_logp_BT, b.mask_BT, behaviour_logp_BT=b.behaviour_logp_BT,
                                    gamma=o.gamma, clip_log_ratio=_clip(o), num_tokens=b.num_tokens)


@register("reverse_kl_full", kind="distribution", signal="full")
def _reverse_kl_full(logits_BTV, b: Batch, o: LossOptions):
    """Exact reverse KL over the vocabulary at every visited prefix."""
    return losses.reverse_kl_full(logits_BTV, b.teacher_logp_BTV, b.mask_BT, num_tokens=b.num_tokens)


@register("forward_kl", kind="distribution", signal="full")
def _forward_kl(logits_BTV, b: Batch, o: LossOptions):
    """Exact forward KL over the vocabulary at every visited prefix."""
    return losses.forward_kl_full(logits_BTV, b.teacher_logp_BTV, b.mask_BT, num_tokens=b.num_tokens)


@register("jsd", kind="distribution", signal="full")
def _jsd(logits_BTV, b: Batch, o: LossOptions):
    """Generalized Jensen-Shannon divergence JSD(β) (opts: beta; 0 = forward KL, 1 = reverse KL)."""
    return losses.generalized_jsd(logits_BTV, b.teacher_logp_BTV, b.mask_BT, beta=o.beta, num_tokens=b.num_tokens)


@register("reverse_kl_topk", kind="distribution", signal="topk")
def _reverse_kl_topk(logits_BTV, b: Batch, o: LossOptions):
    """Reverse KL inside the teacher's top-K support (opts: top_k, add_sampled_token, renormalize)."""
    extra = (dict(sampled_ids_BT=b.tokens_BT, teacher_sampled_logp_BT=b.teacher_logp_BT)
             if o.add_sampled_token else {})
    return losses.reverse_kl_topk(logits_BTV, b.teacher_topk_ids_BTK, b.teacher_topk_logp_BTK, b.mask_BT,
                           renormalize=o.renormalize, num_tokens=b.num_tokens, **extra)


@register("reverse_kl_topk_tail", kind="distribution", signal="topk")
def _reverse_kl_topk_tail(logits_BTV, b: Batch, o: LossOptions):
    """Reverse KL over the teacher's top-K support plus one bucket for the mass outside it (opts: top_k,
    add_sampled_token): the student is penalised for mass where the teacher has little."""
    extra = (dict(sampled_ids_BT=b.tokens_BT, teacher_sampled_logp_BT=b.teacher_logp_BT)
             if o.add_sampled_token else {})
    return losses.reverse_kl_topk(logits_BTV, b.teacher_topk_ids_BTK, b.teacher_topk_logp_BTK, b.mask_BT,
                                  renormalize=False, tail=True, num_tokens=b.num_tokens, **extra)


@register("entropy_aware", kind="distribution", signal="full")
def _entropy_aware(logits_BTV, b: Batch, o: LossOptions):
    """Reverse KL plus forward KL where the teacher's entropy is high (opts: entropy_threshold)."""
    return losses.entropy_aware_kl(logits_BTV, b.teacher_logp_BTV, b.mask_BT, entropy_threshold=o.entropy_threshold,
                            num_tokens=b.num_tokens)


@register("supervised_kd", kind="distribution", signal="full", rollouts="teacher")
def _supervised_kd(logits_BTV, b: Batch, o: LossOptions):
    """Baseline: supervised KD, the forward KL to the teacher's whole distribution on the teacher's own samples
    (word-level KD; GKD with λ = 0): dense like OPD, off-policy like SFT."""
    return losses.forward_kl_full(logits_BTV, b.teacher_logp_BTV, b.mask_BT, num_tokens=b.num_tokens)


@register("sft", kind="token", signal=None, rollouts="teacher")
def _sft(logp_BT, b: Batch, o: LossOptions):
    """Baseline: the teacher generates, the student does cross-entropy on its samples (off-policy)."""
    return losses.sft_cross_entropy(logp_BT, b.mask_BT, num_tokens=b.num_tokens)


@register("grpo", kind="token", signal=None, reward=True)
def _grpo(logp_BT, b: Batch, o: LossOptions):
    """Baseline: RL with the task's verifiable reward, group-normalised advantages (opts: grpo_normalize_std)."""
    advantages_B = losses.grpo_advantages(b.rewards_B, b.group_size, normalize_std=o.grpo_normalize_std)
    return losses.policy_gradient(logp_BT, advantages_B.to(logp_BT.device), b.mask_BT,
                           behaviour_logp_BT=b.behaviour_logp_BT, num_tokens=b.num_tokens)


@register("opd_grpo", kind="token", signal="sampled", reward=True)
def _opd_grpo(logp_BT, b: Batch, o: LossOptions):
    """Sampled-token OPD advantage plus reward_weight · GRPO advantage (opts: gamma, clip_log_ratio, reward_weight)."""
    return losses.opd_grpo(logp_BT, b.teacher_logp_BT, b.behaviour_logp_BT, b.rewards_B, b.mask_BT,
                           group_size=b.group_size, gamma=o.gamma, clip_log_ratio=_clip(o),
                           reward_weight=o.reward_weight, normalize_std=o.grpo_normalize_std, num_tokens=b.num_tokens)
