"""On-policy distillation of a causal LM, readable top to bottom.

    python -m opd_mini.train --preset tiny-cpu                       # offline, a few minutes on a CPU
    python -m opd_mini.train --preset laptop-gpu --loss reverse_kl_topk
    python -m opd_mini.train --config run.yaml --lr 3e-4 --resume    # flags override the file

One optimizer step, as data flowing (B rows = prompts_per_step · num_generations, T new tokens)::

    prompts ─► sampler.sample(student, no grad) ─► Rollouts (B, P+T), completion_mask (B, T)
            ─► teacher.score(no grad)            ─► TeacherSignal: log q(y_t) (B, T), top-K (B, T, K) or (B, T, V)
            ─► student forward (grad)            ─► logits (B, T, V), or chunks of them
            ─► opd_mini.losses                   ─► loss = per-token mean over the whole step's mask
            ─► backward ─► clip grad norm ─► AdamW step ─► LR scheduler step

With ``grad_accum`` > 1 the step's prompts are split into micro-batches: all are sampled first (so the
token count N of the whole step is known), then each is scored and back-propagated with the loss
normalised by N, so the gradient does not depend on the split. The same loop runs the baselines:
``sft`` (the teacher generates, the student does cross-entropy on its samples) and ``grpo`` (RL with
the task's verifiable reward). Every step appends one line to ``out_dir/metrics.jsonl``; every key
is explained in :data:`METRIC_DOCS`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from opd_mini import losses, sampler, student as student_lib, teacher as teacher_lib
from opd_mini.config import TEACHER_SIGNAL, TrainConfig, parse_args
from opd_mini.eval import EVAL_METRIC_DOCS, adapter_disabled, evaluate
from opd_mini.tasks import get_task

#: What each key the loop itself logs means (the losses' keys are in losses.METRIC_DOCS).
TRAIN_METRIC_DOCS: dict[str, str] = {
    "step": "optimizer steps completed (0 = before training, evaluation only)",
    "optim/lr": "learning rate used for this step",
    "optim/grad_norm": "global gradient norm before clipping",
    "rollout/num_tokens": "masked-in completion tokens of the step (the loss normaliser N)",
    "rollout/completion_len": "mean completion length in tokens (EOS included) of the step's rollouts",
    "time/sample": "seconds spent generating rollouts this step",
    "time/score": "seconds spent scoring the rollouts with the teacher this step",
    "time/train": "seconds of student forward + backward + optimizer step this step",
    "time/step": "wall seconds of the whole step (evaluation and checkpoint excluded)",
    "time/train_total": "cumulative seconds of training steps so far (what max_time_s limits)",
    "time/eval": "seconds spent evaluating at this step",
}

#: The glossary of every key that can appear in metrics.jsonl.
METRIC_DOCS: dict[str, str] = {**TRAIN_METRIC_DOCS, **losses.METRIC_DOCS, **EVAL_METRIC_DOCS}


def metrics_glossary() -> str:
    """METRIC_DOCS as a Markdown table (the README's glossary is generated from this)."""
    rows = [f"| `{key}` | {text} |" for key, text in sorted(METRIC_DOCS.items())]
    return "\n".join(["| key | meaning |", "|---|---|", *rows])


#: Losses that only need the student's log-prob of each completion token (the rest need (B, T, V) logits).
TOKEN_LOSSES = ("reverse_kl_sampled", "opd_grpo", "grpo", "sft")


class NonFiniteLossError(RuntimeError):
    """Raised when a loss, a metric or the gradient norm is NaN or inf; the message is the diagnostic."""


# ---------------------------------------------------------------------------------------------
# setup: devices, models, tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass
class Models:
    student: Any  # peft PeftModel (lora) or the plain *ForCausalLM, trainable
    teacher: Any  # frozen teacher, or None when the teacher is the student's base ("self" + lora) or "none"
    tokenizer: Any
    vocab_size: int  # shared tokenizer length: logits are trimmed to it
    teacher_is_student_base: bool  # self-distillation: score the student with its adapter disabled
    student_path: str
    teacher_path: str


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False: use --device cpu (or auto)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, cfg.dtype)


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Models:
    """Tokenizer, student (LoRA or full) and teacher; 'tiny' names resolve to the offline tiny world."""
    from transformers import AutoTokenizer

    paths = {"student": cfg.student, "teacher": cfg.teacher, "tokenizer": cfg.tokenizer or cfg.student}
    if "tiny" in (cfg.student, cfg.teacher):
        from opd_mini.tiny import ensure_tiny_models

        tiny = ensure_tiny_models(cfg.tiny_dir or None, task=cfg.task, progress=cfg.progress)
        paths = {k: (str(tiny[k]) if v == "tiny" else v) for k, v in paths.items()}
        if cfg.tokenizer == "" and cfg.student == "tiny":
            paths["tokenizer"] = str(tiny["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = student_lib.load_student(
        paths["student"], lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        lora_target_modules=_target_modules(cfg.lora_target_modules), device=device, dtype=dtype,
        gradient_checkpointing=cfg.gradient_checkpointing)
    teacher, self_base = None, False
    same_weights = cfg.teacher == "self" or (paths["teacher"] == paths["student"] and cfg.teacher_quantization == "none")
    if cfg.lora and same_weights:
        self_base = True  # no second copy: the base weights under the adapter are the teacher
    elif cfg.teacher != "none":
        name = paths["student"] if cfg.teacher == "self" else paths["teacher"]
        teacher = teacher_lib.load_teacher(name, quantization=cfg.teacher_quantization, device=device, compute_dtype=dtype)
    vocab_size = (teacher_lib.shared_vocab_size(tokenizer, student, teacher) if teacher is not None
                  else teacher_lib.shared_vocab_size(tokenizer, student, student))
    return Models(student, teacher, tokenizer, vocab_size, self_base, paths["student"], paths["teacher"])


def _target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def _chat(cfg: TrainConfig) -> bool | str:
    return {"auto": "auto", "yes": True, "no": False}[cfg.use_chat_template]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warmup, then constant/linear/cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.lr_schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# ---------------------------------------------------------------------------------------------
# the three stages of a step: rollouts, teacher signal, student loss
# ---------------------------------------------------------------------------------------------


def make_rollouts(cfg: TrainConfig, m: Models, prompts: list[str], seed: int) -> sampler.Rollouts:
    """Sample completions: from the student (on-policy), or from the teacher for the sft baseline."""
    kwargs = dict(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k_sampling, use_chat_template=_chat(cfg), seed=seed)
    if cfg.loss != "sft":
        return sampler.sample(m.student, m.tokenizer, prompts, **kwargs)
    if m.teacher_is_student_base:
        with adapter_disabled(m.student):
            return sampler.sample(m.student, m.tokenizer, prompts, **kwargs)
    return sampler.sample(m.teacher, m.tokenizer, prompts, **kwargs)


def teacher_signal(cfg: TrainConfig, m: Models, rollouts, kind: str | None) -> teacher_lib.TeacherSignal | None:
    """Score the rollouts with the teacher, keeping only what the loss needs (kind: sampled | topk | full)."""
    if kind is None:
        return None
    model = m.student if m.teacher_is_student_base else m.teacher
    return teacher_lib.score(model, rollouts, vocab_size=m.vocab_size, top_k=cfg.top_k if kind == "topk" else 0,
                             full=kind == "full", chunk_size=cfg.teacher_chunk_size,
                             disable_adapter=m.teacher_is_student_base)


def token_loss(cfg: TrainConfig, logp_BT: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Losses that see the student only through log π_θ(y_t|c_t) of the completion tokens, (B, T)."""
    mask, n = batch["mask_BT"], batch["num_tokens"]
    if cfg.loss == "reverse_kl_sampled":
        return losses.reverse_kl_sampled_token(
            logp_BT, batch["teacher_logp_BT"], mask, behaviour_logp_BT=batch["behaviour_logp_BT"], gamma=cfg.gamma,
            clip_log_ratio=cfg.clip_log_ratio or None, num_tokens=n)
    if cfg.loss == "sft":
        return losses.sft_cross_entropy(logp_BT, mask, num_tokens=n)
    if cfg.loss == "grpo":
        return losses.policy_gradient(logp_BT, batch["reward_adv_B"], mask, behaviour_logp_BT=batch["behaviour_logp_BT"],
                                      num_tokens=n)
    # opd_grpo: A_t = −Σ γ^(t'−t) r_t' + w · A^reward, with r_t taken at sampling time (behaviour log-probs)
    log_ratio_BT = batch["behaviour_logp_BT"] - batch["teacher_logp_BT"].clamp(min=losses.LOGP_FLOOR)
    if cfg.clip_log_ratio:
        log_ratio_BT = log_ratio_BT.clamp(-cfg.clip_log_ratio, cfg.clip_log_ratio)
    opd_adv_BT = -losses.return_to_go(log_ratio_BT, mask, cfg.gamma)
    adv_BT = losses.mix_advantages(opd_adv_BT, batch["reward_adv_B"], cfg.reward_weight)
    loss, metrics = losses.policy_gradient(logp_BT, adv_BT, mask, behaviour_logp_BT=batch["behaviour_logp_BT"],
                                           num_tokens=n)
    metrics["kl/reverse_sampled"] = log_ratio_BT[mask].mean() if mask.any() else torch.zeros(())
    return loss, metrics


def distribution_loss(cfg: TrainConfig, logits_BTV: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Losses over the student's whole next-token distribution at each position; separable along T."""
    mask, n = batch["mask_BT"], batch["num_tokens"]
    if cfg.loss == "reverse_kl_topk":
        extra = (dict(sampled_ids_BT=batch["ids_BT"], teacher_sampled_logp_BT=batch["teacher_logp_BT"])
                 if cfg.add_sampled_token else {})
        return losses.reverse_kl_topk(logits_BTV, batch["topk_ids_BTK"], batch["topk_logp_BTK"], mask,
                                      renormalize=cfg.renormalize, num_tokens=n, **extra)
    full_BTV = batch["teacher_full_BTV"]
    if cfg.loss == "reverse_kl_full":
        return losses.reverse_kl_full(logits_BTV, full_BTV, mask, num_tokens=n)
    if cfg.loss == "forward_kl":
        return losses.forward_kl_full(logits_BTV, full_BTV, mask, num_tokens=n)
    if cfg.loss == "jsd":
        return losses.generalized_jsd(logits_BTV, full_BTV, mask, beta=cfg.beta, num_tokens=n)
    return losses.entropy_aware_kl(logits_BTV, full_BTV, mask, entropy_threshold=cfg.entropy_threshold, num_tokens=n)


def loss_and_backward(cfg: TrainConfig, m: Models, batch: dict, check) -> "MetricMean":
    """Student forward, loss, backward for one micro-batch; returns its metrics.

    Simple path (loss_chunk_size = 0): logits (B, T, V) in one piece. Chunked path: one forward of the
    decoder gives hidden states (B, T, H); the output head runs on C positions at a time, so at most
    (B, C, V) logits exist at once, and their gradient is accumulated into the hidden states, which are
    back-propagated through the decoder once at the end. Token losses take two passes over the chunks:
    the first (no grad) gives log π_θ(y_t) for all T (the loss may couple positions, e.g. γ > 0), the
    loss's gradient w.r.t. those log-probs is then pushed through each chunk in the second.
    """
    model, V, ids_BT, rollouts = m.student, m.vocab_size, batch["ids_BT"], batch["rollouts"]
    is_token_loss = cfg.loss in TOKEN_LOSSES
    metrics = MetricMean()
    if cfg.loss_chunk_size == 0:  # ------------------------------------------------ simple path
        logits_BTV = student_lib.completion_logits(model, rollouts, V)
        if is_token_loss:
            loss, mets = token_loss(cfg, losses.token_logprobs(logits_BTV, ids_BT), batch)
        else:
            loss, mets = distribution_loss(cfg, logits_BTV, batch)
        check(loss, mets)
        loss.backward()
        metrics.add(mets, batch["mask_BT"])
        return metrics

    hidden_BTH, _ = student_lib.completion_hidden(model, rollouts)  # ---------------- chunked path
    h_BTH = hidden_BTH.detach().requires_grad_()
    T, C = ids_BT.shape[1], cfg.loss_chunk_size
    spans = [slice(s, min(s + C, T)) for s in range(0, T, C)]

    def chunk_logits(s: slice) -> torch.Tensor:  # (B, C, V)
        return student_lib.project_logits(model, h_BTH[:, s], V)

    if is_token_loss:
        with torch.no_grad():
            logp_BT = torch.cat([losses.token_logprobs(chunk_logits(s), ids_BT[:, s]) for s in spans], dim=1)
        logp_BT.requires_grad_()
        loss, mets = token_loss(cfg, logp_BT, batch)
        check(loss, mets)
        loss.backward()  # dloss/dlogp_BT into logp_BT.grad
        for s in spans:
            losses.token_logprobs(chunk_logits(s), ids_BT[:, s]).backward(logp_BT.grad[:, s])
        metrics.add(mets, batch["mask_BT"])
    else:
        for s in spans:
            loss, mets = distribution_loss(cfg, chunk_logits(s), _slice_T(batch, s))
            check(loss, mets)
            loss.backward()
            metrics.add(mets, batch["mask_BT"][:, s])
    hidden_BTH.backward(h_BTH.grad)
    return metrics


def _slice_T(batch: dict, s: slice) -> dict:
    """The batch restricted to completion positions ``s`` (tensors with a T axis at dim 1)."""
    return {k: (v[:, s] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in batch.items()}


class MetricMean:
    """Token-weighted means of metrics over micro-batches and chunks; ``loss/total`` is summed (each piece
    is already normalised by the whole step's token count)."""

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


# ---------------------------------------------------------------------------------------------
# checkpoints: out_dir/checkpoints/step_000040/{model/, trainer_state.pt}, written atomically
# ---------------------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary directories are ignored)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_checkpoint(cfg: TrainConfig, m: Models, optimizer, scheduler, step: int, train_time: float) -> Path:
    """Write to a temporary directory, then rename it into place: a crash never leaves a half checkpoint,
    and older checkpoints are deleted only after the new one exists."""
    root = Path(cfg.out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    student_lib.save_student(m.student, tmp / "model", tokenizer=m.tokenizer)  # loadable by plain peft / HF
    state = {
        "step": step, "train_time": train_time, "config": cfg.to_dict(),
        "trainable": {n: p.detach().cpu().clone() for n, p in m.student.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(cfg.out_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, m: Models, optimizer, scheduler) -> tuple[int, float, dict]:
    """Restore weights, optimizer, scheduler and RNG states; return (step, train_time, saved config)."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    params = dict(m.student.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["train_time"], state["config"]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict (final eval, eval history, paths)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    previous = checkpoint_dirs(out_dir)
    if previous and not cfg.resume:
        raise ValueError(f"out_dir {out_dir} already holds checkpoints (last: {previous[-1].name}): pass --resume to "
                         "continue that run, or choose another --out_dir")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # also the "Loading weights" bars
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg)
    m = load_models(cfg, device, dtype)
    task = get_task(cfg.task)
    retention_task = get_task(cfg.retention_task) if cfg.retention_task else None
    signal_kind = TEACHER_SIGNAL[cfg.loss]

    params = [p for p in m.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    start_step, train_time = 0, 0.0
    if cfg.resume and previous:
        start_step, train_time, saved_cfg = load_checkpoint(previous[-1], m, optimizer, scheduler)
        changed = {k: (saved_cfg[k], v) for k, v in cfg.to_dict().items()
                   if k in saved_cfg and saved_cfg[k] != v and k not in ("resume", "progress")}
        if changed:
            print(f"resuming with changed settings (checkpoint → now): {changed}", file=sys.stderr)
        _truncate_log(metrics_path, start_step)
        print(f"resumed from {previous[-1]} at step {start_step}", file=sys.stderr)
    elif metrics_path.exists():
        metrics_path.unlink()

    def run_eval() -> dict[str, float]:
        score = None
        if m.teacher is not None or m.teacher_is_student_base:
            score = lambda r: teacher_signal(cfg, m, r, "sampled")  # noqa: E731
        t0 = time.perf_counter()
        out = evaluate(m.student, m.tokenizer, task, num_prompts=cfg.eval_prompts, num_samples=cfg.eval_samples,
                       k=cfg.pass_k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                       seed=cfg.seed, use_chat_template=_chat(cfg), score_teacher=score, retention_task=retention_task)
        return {**out, "time/eval": time.perf_counter() - t0}

    if start_step == 0:  # evaluate the starting point
        history = [{"step": 0, **run_eval()}]
        _log(metrics_path, history[0])
    else:
        history = [r for r in _read_log(metrics_path) if "eval/pass@1" in r]

    last_good = previous[-1] if (cfg.resume and previous) else None
    micro_prompts = cfg.prompts_per_step // cfg.grad_accum
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"opd {cfg.loss}",
               disable=not cfg.progress, dynamic_ncols=True)
    step = start_step
    for step_index in bar:
        step = step_index + 1
        t_step = time.perf_counter()
        examples = task.examples(cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step_index)

        # 1) rollouts for every micro-batch (no grad); the step's token count normalises every piece
        t0 = time.perf_counter()
        micro = []
        for i in range(cfg.grad_accum):
            ex = examples[i * micro_prompts:(i + 1) * micro_prompts]
            r = make_rollouts(cfg, m, [e.prompt for e in ex], seed=_sample_seed(cfg.seed, step_index, i)).to(device)
            rewards_B = torch.tensor(task.rewards(r.completions, [ex[j] for j in r.prompt_index.tolist()]))
            mask_BT = r.completion_mask
            if cfg.mask_special_tokens:
                mask_BT = losses.mask_special_tokens(mask_BT, r.completion_ids, m.tokenizer.all_special_ids)
            micro.append({"rollouts": r, "ids_BT": r.completion_ids, "mask_BT": mask_BT, "rewards_B": rewards_B,
                          "behaviour_logp_BT": r.behaviour_logp})
        num_tokens = sum(int(b["mask_BT"].sum()) for b in micro)
        t_sample = time.perf_counter() - t0

        # 2) per micro-batch: teacher signal, student forward, loss, backward
        t_score = t_train = 0.0
        step_metrics = MetricMean()
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            t0 = time.perf_counter()
            signal = teacher_signal(cfg, m, batch["rollouts"], signal_kind)
            t_score += time.perf_counter() - t0
            t0 = time.perf_counter()
            batch["num_tokens"] = max(num_tokens, 1)
            if signal is not None:
                batch.update(teacher_logp_BT=signal.sampled_logp, topk_ids_BTK=signal.topk_ids,
                             topk_logp_BTK=signal.topk_logp, teacher_full_BTV=signal.full_logp)
                step_metrics.add({"teacher/entropy": _masked_mean(signal.entropy, batch["mask_BT"])}, batch["mask_BT"])
            if cfg.loss in ("grpo", "opd_grpo"):
                batch["reward_adv_B"] = losses.grpo_advantages(batch["rewards_B"], cfg.num_generations,
                                                               normalize_std=cfg.grpo_normalize_std).to(device)
            check = lambda loss, mets: _check_finite(cfg, m, step, i, last_good, {**mets, "loss/total": loss})  # noqa: E731
            step_metrics.merge(loss_and_backward(cfg, m, batch, check))
            t_train += time.perf_counter() - t0

        # 3) clip, step the optimizer and the schedule
        t0 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        _check_finite(cfg, m, step, None, last_good, {"optim/grad_norm": grad_norm})
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        t_train += time.perf_counter() - t0
        step_time = time.perf_counter() - t_step
        train_time += step_time

        all_rewards = torch.cat([b["rewards_B"] for b in micro])
        row = {"step": step, **step_metrics.result(), "optim/lr": lr, "optim/grad_norm": float(grad_norm),
               "rollout/num_tokens": num_tokens,
               "rollout/completion_len": num_tokens / sum(b["mask_BT"].shape[0] for b in micro),
               "reward/mean": float(all_rewards.mean()),
               "time/sample": t_sample, "time/score": t_score, "time/train": t_train, "time/step": step_time,
               "time/train_total": train_time}
        out_of_time = cfg.max_time_s > 0 and train_time >= cfg.max_time_s
        last = step == cfg.steps or out_of_time
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluation = run_eval()
            row.update(evaluation)
            history.append({"step": step, **evaluation})
        _log(metrics_path, row)
        bar.set_postfix(_postfix(row, history))
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            last_good = save_checkpoint(cfg, m, optimizer, scheduler, step, train_time)
        if out_of_time:
            break
    bar.close()

    summary = {"config": cfg.to_dict(), "steps_done": step, "train_time_s": train_time,
               "final_eval": history[-1] if history else {}, "eval_history": history,
               "metrics_path": str(metrics_path), "checkpoint": str(last_good) if last_good else None,
               "out_dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# helpers of the loop
# ---------------------------------------------------------------------------------------------


def _sample_seed(seed: int, step_index: int, micro: int) -> int:
    """Sampling seed of one micro-batch: a function of (seed, step, micro-batch), so resumed runs match."""
    return (seed * 1_000_003 + step_index) * 1_009 + micro


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    return float(x_BT[mask_BT].float().mean()) if mask_BT.any() else 0.0


def _check_finite(cfg: TrainConfig, m: Models, step: int, micro: int | None, last_good: Path | None,
                  values: dict) -> None:
    """Raise NonFiniteLossError with a diagnostic when any of ``values`` (loss, metrics) is NaN or inf."""
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if not bad:
        return
    weights_bad = any(not torch.isfinite(p).all() for p in m.student.parameters() if p.requires_grad)
    where = f"step {step}" + (f", micro-batch {micro + 1}/{cfg.grad_accum}" if micro is not None else "")
    kept = (f"the last good checkpoint is kept at {last_good} (continue from it with --resume after changing "
            "the settings below)") if last_good else "no checkpoint was written yet (set --save_every to keep one)"
    raise NonFiniteLossError(
        f"non-finite values at {where} with loss={cfg.loss}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
        + f"; the student's trainable weights are {'NOT ' if weights_bad else ''}finite.\n"
        f"Training stopped; {kept}.\nLikely causes and what to change:\n"
        f"  - learning rate too high (lr={cfg.lr}): lower --lr, add --warmup_steps, keep --max_grad_norm > 0 "
        f"(now {cfg.max_grad_norm})\n"
        f"  - low-precision overflow (weights in {next(m.student.parameters()).dtype}): try --dtype float32\n"
        f"  - the teacher gives ~zero probability to sampled tokens (huge log-ratios): set --clip_log_ratio "
        f"(e.g. 10) or --mask_special_tokens true\n"
        f"  - a diverging run: look at the last lines of {Path(cfg.out_dir) / 'metrics.jsonl'} "
        f"(kl/…, optim/grad_norm) to see where it started")


def _log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    rows = [r for r in _read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _postfix(row: dict, history: list[dict]) -> dict[str, str]:
    post = {"loss": f"{row.get('loss/total', float('nan')):.4f}"}
    for k in ("kl/reverse_sampled", "kl/reverse_topk", "kl/reverse_full", "kl/forward_full", "kl/jsd", "loss/sft"):
        if k in row:
            post[k.split("/")[1]] = f"{row[k]:.3f}"
            break
    if history:
        post["pass@1"] = f"{history[-1]['eval/pass@1']:.3f}"
    return post


def format_summary(summary: dict) -> str:
    """The end-of-run report: evaluation table (first vs last) and where the files are."""
    hist = summary["eval_history"]
    keys = [k for k in EVAL_METRIC_DOCS if any(k in h for h in hist)]
    first, last = hist[0], hist[-1]
    lines = [f"| metric | step {first['step']} | step {last['step']} |", "|---|---|---|"]
    lines += [f"| {k} | {first.get(k, float('nan')):.4f} | {last.get(k, float('nan')):.4f} |" for k in keys]
    lines += ["", f"trained {summary['steps_done']} steps in {summary['train_time_s']:.1f} s",
              f"metrics log:  {summary['metrics_path']}", f"checkpoint:   {summary['checkpoint']}",
              f"summary:      {Path(summary['out_dir']) / 'summary.json'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 3
    except (ValueError, teacher_lib.QuantizationError) as e:  # bad settings/inputs: the message says what to change
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
