"""On-policy distillation of a causal LM, readable top to bottom.

    python -m opd_mini.train --preset tiny-cpu                       # offline, a few minutes on a CPU
    python -m opd_mini.train --preset laptop-gpu --loss reverse_kl_topk
    python -m opd_mini.train --config run.yaml --lr 3e-4 --resume    # flags override the file

One optimizer step, as data flowing (B rows = prompts_per_step · num_generations, T new tokens)::

    prompts ─► sampler.sample(student, no grad) ─► Rollouts (B, P+T), completion_mask (B, T)
            ─► teacher.score(no grad)            ─► TeacherSignal: log q(y_t) (B, T), top-K (B, T, K), or for
                                                    full-vocabulary losses (B, T, V) / hidden states (B, T, H)
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

import dataclasses
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from opd_mini import distributed, losses, registry
from opd_mini.config import TrainConfig, parse_args, run_cli
from opd_mini.eval import EVAL_METRIC_DOCS, adapter_disabled, evaluate, held_out_examples
from opd_mini.loading import resolve_device
from opd_mini.models import Models, TeacherRef, check_teacher_reads_student, load_models
from opd_mini.rollouts import MicroBatch, Rollouts
from opd_mini.runs import (append_log, check_divergence, check_finite, checkpoint_dirs,
                           load_latest_checkpoint, locked_out_dir, read_log, resume_changes, save_checkpoint,
                           saved_config, truncate_log)
from opd_mini.sampler import sample, with_prompts
from opd_mini.student import loss_and_backward
from opd_mini.tasks import MixTask, get_task, task_of
from opd_mini.teacher import TeacherSignal, score

#: What each key the loop itself logs means (the losses' keys are in losses.METRIC_DOCS).
TRAIN_METRIC_DOCS: dict[str, str] = {
    "step": "optimizer steps completed (0 = before training, evaluation only)",
    "optim/lr": "learning rate used for this step",
    "optim/grad_norm": "global gradient norm before clipping",
    "rollout/num_tokens": "masked-in completion tokens of the step (the loss normaliser N)",
    "rollout/completion_len": "mean completion length in tokens (EOS included) of the step's rollouts",
    "time/sample": "seconds spent generating rollouts this step",
    "rollout/on_policy": "with --lmbda below 1: 1 when this step trained on the student's own samples, 0 when the "
    "teacher sampled it",
    "time/score": "seconds spent scoring the rollouts with the teacher this step",
    "time/train": "seconds of student forward + backward + optimizer step this step",
    "time/step": "wall seconds of the whole step (evaluation and checkpoint excluded)",
    "time/train_total": "cumulative seconds of training steps so far (what max_time_s limits)",
    "time/eval": "seconds spent evaluating at this step",
}

#: Evaluation keys also reported per task of a mixture, as ``KEY/TASK`` (e.g. ``eval/pass@1/reverse:5``).
PER_TASK_EVAL_KEYS = ("eval/pass@1", "eval/pass@k", "eval/kl_reverse", "eval/kl_forward")
TRAIN_METRIC_DOCS.update({
    "reward/mean/TASK": "a mixture of tasks (--task A+B): mean reward of this step's rollouts of the task TASK",
    **{f"{k}/TASK": f"a mixture of tasks: {k} of the task TASK alone ({k} itself is the mean over the tasks)"
       for k in PER_TASK_EVAL_KEYS}})

#: The glossary of every key that can appear in metrics.jsonl.
METRIC_DOCS: dict[str, str] = {**TRAIN_METRIC_DOCS, **losses.METRIC_DOCS, **EVAL_METRIC_DOCS}


def metrics_glossary() -> str:
    """METRIC_DOCS as a Markdown table (the README's glossary is generated from this)."""
    rows = [f"| `{key}` | {text} |" for key, text in sorted(METRIC_DOCS.items())]
    return "\n".join(["| key | meaning |", "|---|---|", *rows])


# ---------------------------------------------------------------------------------------------
# the pieces of a step: learning rate, rollouts, teacher signal
# ---------------------------------------------------------------------------------------------


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


def make_rollouts(cfg: TrainConfig, m: Models, spec: registry.LossSpec, prompts: list[str], seed: int,
                  teacher: TeacherRef) -> Rollouts:
    """Sample completions: from the student (on-policy), or from the teacher for losses registered with
    ``rollouts="teacher"`` (the sft baseline)."""
    kwargs = dict(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k_sampling, use_chat_template=_chat(cfg), seed=seed,
                  **sampler_options(cfg, teacher))
    if spec.rollouts == "student":
        return sample(m.student, m.tokenizer, prompts, **kwargs)
    with adapter_disabled(m.student, enabled=teacher.is_student_base):
        return sample(teacher.model, m.tokenizer, prompts, **kwargs)


def teacher_samples(cfg: TrainConfig, m: Models, prompts: list[str], num_generations: int, seed: int,
                    teacher: TeacherRef) -> Rollouts:
    """The teacher's own samples at temperature 1 (``behaviour_logp`` = its log-probs), e.g. for the forward KL."""
    with adapter_disabled(m.student, enabled=teacher.is_student_base):
        return sample(teacher.model, m.tokenizer, prompts, num_generations=num_generations,
                      max_new_tokens=cfg.max_new_tokens, temperature=1.0, use_chat_template=_chat(cfg), seed=seed,
                      **sampler_options(cfg, teacher))


def sampler_options(cfg: TrainConfig, teacher: TeacherRef) -> dict:
    """``--sampler``; with the student's own base as the teacher the behaviour log-probs come from a forward
    (bit-identical to the teacher's scoring, so r_t = 0 exactly), not from the decoding loop."""
    return dict(method=cfg.sampler, behaviour_logp="forward" if teacher.is_student_base else None)


def teacher_signal(cfg: TrainConfig, m: Models, rollouts: Rollouts, kind: str, teacher: TeacherRef) -> TeacherSignal:
    """Score the rollouts with the teacher, keeping only what the loss needs (kind: sampled | topk | full).

    A full-vocabulary loss computed in chunks (``loss_chunk_size`` > 0) gets the teacher's hidden states,
    projected chunk by chunk inside the loss (the fused path); with ``loss_chunk_size`` 0 it gets the
    (B, T, V) log-probabilities in one piece (the readable reference path)."""
    fused = kind == "full" and cfg.loss_chunk_size > 0
    return score(teacher.model, rollouts, vocab_size=m.vocab_size, top_k=cfg.top_k if kind == "topk" else 0,
                 full=kind == "full" and not fused, keep_hidden=fused, chunk_size=cfg.teacher_chunk_size,
                 disable_adapter=teacher.is_student_base)


def teacher_view(cfg: TrainConfig, m: Models, rollouts: Rollouts, examples: list, teacher: TeacherRef) -> Rollouts:
    """What the teacher reads: the rollouts themselves, or with ``teacher_template`` the same completions behind
    the privileged prompt built from each row's example (``examples[prompt_index]``), checked against the
    teacher's context."""
    if not cfg.teacher_template:
        return rollouts
    config = getattr(teacher.model, "config", None)
    return with_prompts(rollouts, m.tokenizer, _teacher_prompts(cfg, examples), use_chat_template=_chat(cfg),
                        max_length=getattr(config, "max_position_embeddings", None))


def on_policy_step(cfg: TrainConfig, step_index: int) -> bool:
    """GKD's λ: whether step ``step_index`` trains on the student's samples (a function of seed and step)."""
    return cfg.lmbda >= 1 or random.Random(f"lmbda/{cfg.seed}/{step_index}").random() < cfg.lmbda


def _teacher_prompts(cfg: TrainConfig, examples: list) -> list[str]:
    if not cfg.teacher_template:
        return [e.prompt for e in examples]
    return [cfg.teacher_template.format(prompt=e.prompt, answer=e.answer) for e in examples]


def _chat(cfg: TrainConfig) -> bool | str:
    return {"auto": "auto", "yes": True, "no": False}[cfg.use_chat_template]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict (final eval, eval history, paths).

    The run holds a lock on ``out_dir`` from start to end, so a second run cannot write into it. Started by
    ``accelerate launch`` or ``torchrun`` on several processes, it trains data-parallel (the lines marked
    ``[dp]``; see :mod:`opd_mini.distributed`)."""
    cfg.validate()
    dist = distributed.setup(cfg)  # [dp] one process unless a launcher started several
    with locked_out_dir(cfg.out_dir) if dist.is_main else nullcontext(Path(cfg.out_dir)) as out_dir:  # [dp]
        return _train(cfg, out_dir)


def _train(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    spec = registry.get_loss(cfg.loss)
    opts = registry.LossOptions.from_config(cfg)
    dist = distributed.current()  # [dp] world 1: every dist.* call below hands its input back
    metrics_path = out_dir / "metrics.jsonl"
    previous = checkpoint_dirs(out_dir)
    if previous and not cfg.resume:
        raise ValueError(f"out_dir {out_dir} already holds checkpoints (last: {previous[-1].name}): pass --resume to "
                         "continue that run, or choose another --out_dir")
    now = {**cfg.to_dict(), "num_processes": dist.world}  # [dp] the checkpoint records its number of processes
    changed = resume_changes(saved_config(previous[-1]), now) if cfg.resume and previous else {}

    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # also the "Loading weights" bars
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    device = dist.place(device)  # [dp] one GPU per process
    m = load_models(cfg, device, dtype)
    task = get_task(cfg.task, eval_fraction=cfg.eval_fraction)
    # evaluation prompts: a file task's held-out split (never trained on), or a separate --eval_task
    eval_task, eval_split, train_split = ((get_task(cfg.eval_task), "all", "all") if cfg.eval_task
                                          else (task, "eval", "train"))
    retention_task = get_task(cfg.retention_task) if cfg.retention_task else None

    params = [p for p in m.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    start_step, train_time, last_good = 0, 0.0, None
    if cfg.resume and previous:
        last_good, start_step, train_time, _ = load_latest_checkpoint(previous, m.student, optimizer, scheduler)
        for group in optimizer.param_groups:  # the restored optimizer carries the old lr: apply this run's
            group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * lr_factor(start_step, cfg))
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        if dist.is_main:  # [dp] the main process alone reports and rewrites the log
            if changed:
                print(f"resuming with changed settings (checkpoint → now), applied from step {start_step + 1}: "
                      f"{changed}", file=sys.stderr)
            truncate_log(metrics_path, start_step)
            print(f"resumed from {last_good} at step {start_step}", file=sys.stderr)
    elif metrics_path.exists() and dist.is_main:  # [dp]
        metrics_path.unlink()
    dist.broadcast_parameters(params)  # [dp] every process starts from the main process's weights
    dist.barrier()  # [dp] the log is truncated before any process reads it

    base = TeacherRef(m.student, True, m.student_path)  # π₀ of eval_kl_to_init: the student, adapter disabled

    def evaluate_task(part, retention) -> dict[str, float]:
        teacher = m.teachers.get(part.name) if m.teachers else (m.teacher_for(part.name) if m.scorer is not None else None)
        shown = held_out_examples(part, cfg.eval_prompts, cfg.seed, eval_split) if cfg.teacher_template else None
        scorer = ((lambda r: teacher_signal(cfg, m, teacher_view(cfg, m, r, shown, teacher), "sampled", teacher))  # noqa: E731
                  if teacher else None)
        sampler = ((lambda prompts, n, seed: teacher_samples(cfg, m, prompts, n, seed, teacher))  # noqa: E731
                   if cfg.eval_kl_forward and teacher else None)
        init = ((lambda prompts, n, seed: teacher_samples(cfg, m, prompts, n, seed, base))  # noqa: E731
                if cfg.eval_kl_to_init and retention is not None else None)
        return evaluate(m.student, m.tokenizer, part, num_prompts=cfg.eval_prompts, num_samples=cfg.eval_samples,
                        k=cfg.pass_k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                        seed=cfg.seed, use_chat_template=_chat(cfg), score_teacher=scorer, sample_teacher=sampler,
                        retention_task=retention, sample_init=init, split=eval_split,
                        sampler_options=sampler_options(cfg, teacher or TeacherRef(None, False, "")))

    def run_eval() -> dict[str, float]:
        """Held-out evaluation; a mixture is evaluated task by task (``eval/pass@1/TASK``, ...) and its
        ``eval/*`` keys are the mean over its tasks."""
        t0 = time.perf_counter()
        if not isinstance(eval_task, MixTask):
            out = evaluate_task(eval_task, retention_task)
        else:
            per = {t.name: evaluate_task(t, retention_task if i == 0 else None) for i, (t, _) in enumerate(eval_task.parts)}
            shared = [k for k in next(iter(per.values())) if "retention" not in k and all(k in r for r in per.values())]
            out = {k: sum(r[k] for r in per.values()) / len(per) for k in shared}  # a KL only where every task has a teacher
            out.update({k: v for k, v in per[eval_task.parts[0][0].name].items() if "retention" in k})
            out.update({f"{k}/{name}": r[k] for name, r in per.items() for k in PER_TASK_EVAL_KEYS if k in r})
        return {**out, "time/eval": time.perf_counter() - t0}

    if not dist.is_main:  # [dp] only the main process evaluates and logs
        history = []
    elif start_step == 0:  # evaluate the starting point
        history = [{"step": 0, **run_eval()}]
        append_log(metrics_path, history[0])
    else:
        history = [r for r in read_log(metrics_path) if "eval/pass@1" in r]

    micro_prompts = cfg.prompts_per_step // (cfg.grad_accum * dist.world)  # [dp] world · grad_accum micro-batches
    pool = _teacher_pool(cfg, m, spec, task, train_split) if cfg.teacher_sample_pool and spec.rollouts == "teacher" else None
    grad_norms = [r["optim/grad_norm"] for r in read_log(metrics_path) if "optim/grad_norm" in r]  # on resume
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"opd {cfg.loss}",
               disable=not cfg.progress or not dist.is_main, dynamic_ncols=True)
    step, checked = start_step, set()
    for step_index in bar:
        step = step_index + 1
        t_step = time.perf_counter()
        examples = _train_examples(cfg, task, step_index, train_split)

        # 1) rollouts for every micro-batch (no grad); the step's token count normalises every piece.
        #    A mixture of tasks is split by task, so that each piece is sampled and scored by its task's teacher.
        t0 = time.perf_counter()
        micro: list[MicroBatch] = []
        tasks, micro_examples = [], []  # the task and the examples of each piece
        on_policy = on_policy_step(cfg, step_index)  # GKD's λ: else the teacher samples this step
        step_spec = spec if on_policy else dataclasses.replace(spec, rollouts="teacher")
        for i in dist.micro_batches(cfg.grad_accum):  # [dp] global indices; range(grad_accum) on one process
            if pool is not None:  # a fixed set of teacher samples: this micro-batch's prompts drawn from it
                pieces = [_from_pool(cfg, pool, step_index, i, micro_prompts)]
            else:
                ex_all = examples[i * micro_prompts:(i + 1) * micro_prompts]
                pieces = []
                for g, name in enumerate(dict.fromkeys(task_of(e, task) for e in ex_all)):
                    ex = [e for e in ex_all if task_of(e, task) == name]
                    teacher = m.teacher_for(name)
                    pieces.append((make_rollouts(cfg, m, step_spec, [e.prompt for e in ex], teacher=teacher,
                                                 seed=_sample_seed(cfg.seed, step_index, i) + 7_919 * g), ex))
                    if name not in checked and step_spec.rollouts == "student" and spec.signal is not None:
                        checked.add(name)  # once per task: does the teacher read exactly the student's tokens?
                        seen = teacher_view(cfg, m, pieces[-1][0], ex, teacher)
                        check_teacher_reads_student(cfg, teacher, m.tokenizer, seen, _teacher_prompts(cfg, ex))
            for r, ex in pieces:
                r = r.to(device)
                mask_BT = r.completion_mask
                if cfg.mask_special_tokens:
                    mask_BT = losses.mask_special_tokens(mask_BT, r.completion_ids, m.tokenizer.all_special_ids)
                rewards_B = torch.tensor(task.rewards(r.completions, [ex[j] for j in r.prompt_index.tolist()]))
                micro.append(MicroBatch(r, registry.LossBatch(tokens_BT=r.completion_ids, mask_BT=mask_BT,
                                                            behaviour_logp_BT=r.behaviour_logp, rewards_B=rewards_B,
                                                            group_size=cfg.num_generations)))
                tasks.append(task_of(ex[0], task))
                micro_examples.append(ex)
        num_tokens = int(dist.sum(sum(int(b.mask_BT.sum()) for b in micro))[0])  # [dp] global N
        t_sample = time.perf_counter() - t0

        # 2) per micro-batch: teacher signal, student forward, loss, backward
        t_score = t_train = 0.0
        step_metrics = registry.MetricMean()
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            t0 = time.perf_counter()
            batch.inputs.num_tokens = max(num_tokens, 1)
            if spec.signal is not None:
                teacher = m.teacher_for(tasks[i])
                seen = teacher_view(cfg, m, batch.rollouts, micro_examples[i], teacher)  # the teacher's prompt
                signal = teacher_signal(cfg, m, seen, spec.signal, teacher)
                batch.inputs.teacher_logp_BT = signal.sampled_logp
                batch.inputs.teacher_topk_ids_BTK, batch.inputs.teacher_topk_logp_BTK = signal.topk_ids, signal.topk_logp
                batch.inputs.teacher_logp_BTV = signal.full_logp
                batch.inputs.teacher_logp_fn = signal.full_logp_chunk if signal.hidden is not None else None
                step_metrics.add({"teacher/entropy": _masked_mean(signal.entropy, batch.mask_BT)}, batch.mask_BT)
            t_score += time.perf_counter() - t0
            t0 = time.perf_counter()
            where = f"step {step}, micro-batch {i + 1}/{len(micro)}"
            check = lambda loss, mets: check_finite({**mets, "loss/total": loss}, cfg=cfg, student=m.student,  # noqa: E731
                                                    where=where, last_good=last_good)
            step_metrics.merge(loss_and_backward(m.student, batch, spec, opts, vocab_size=m.vocab_size,
                                                 chunk_size=cfg.loss_chunk_size, check=check))
            t_train += time.perf_counter() - t0

        # 3) clip, step the optimizer and the schedule
        t0 = time.perf_counter()
        dist.sum_gradients(params)  # [dp] each loss is over the global N, so the sum is the step's gradient
        step_metrics = dist.metrics(step_metrics)  # [dp]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        check_finite({"optim/grad_norm": grad_norm}, cfg=cfg, student=m.student, where=f"step {step}",
                     last_good=last_good)
        check_divergence(float(grad_norm), grad_norms, cfg=cfg, student=m.student, step=step, last_good=last_good)
        grad_norms.append(float(grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        t_train += time.perf_counter() - t0
        step_time = time.perf_counter() - t_step
        train_time += step_time

        all_rewards = dist.cat(torch.cat([b.inputs.rewards_B for b in micro]))  # [dp] every process's rows
        row = {"step": step, **step_metrics.result(), "optim/lr": lr, "optim/grad_norm": float(grad_norm),
               "rollout/num_tokens": num_tokens,
               "rollout/completion_len": num_tokens / all_rewards.shape[0],
               "reward/mean": float(all_rewards.mean()), **_per_task_rewards(micro, tasks, isinstance(task, MixTask)),
               **({"rollout/on_policy": float(on_policy)} if cfg.lmbda < 1 else {}),
               "time/sample": t_sample, "time/score": t_score, "time/train": t_train, "time/step": step_time,
               "time/train_total": train_time}
        out_of_time = dist.any(cfg.max_time_s > 0 and train_time >= cfg.max_time_s)  # [dp] all stop together
        last = step == cfg.steps or out_of_time
        if not dist.is_main:  # [dp] the other processes go on to the next step's first collective
            if out_of_time:
                break
            continue
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluation = run_eval()
            row.update(evaluation)
            history.append({"step": step, **evaluation})
        append_log(metrics_path, row)
        bar.set_postfix(_postfix(row, history))
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            last_good = save_checkpoint(out_dir, m.student, m.tokenizer, optimizer, scheduler, step=step,
                                        train_time=train_time, config=now, keep=cfg.keep_checkpoints)
        if out_of_time:
            break
    bar.close()
    dist.barrier()  # [dp] the other processes wait for the main one's last evaluation and checkpoint

    held_out = {e.prompt for e in held_out_examples(eval_task, cfg.eval_prompts, cfg.seed, eval_split)}
    trained = {e.prompt for i in range(step) for e in _train_examples(cfg, task, i, train_split)}
    summary = {"config": cfg.to_dict(), "steps_done": step, "train_time_s": train_time,
               "eval_source": eval_task.describe_split(eval_split),
               "eval_prompts_trained_on": len(held_out & trained) / max(1, len(held_out)),
               "final_eval": history[-1] if history else {}, "eval_history": history,
               "metrics_path": str(metrics_path), "checkpoint": str(last_good) if last_good else None,
               "out_dir": str(out_dir)}
    if dist.is_main:  # [dp]
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# helpers of the loop and the command line
# ---------------------------------------------------------------------------------------------


def _train_examples(cfg: TrainConfig, task, step_index: int, split: str) -> list:
    """The prompts of one optimizer step: a function of (seed, step), so resumed runs match."""
    return task.examples(cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step_index, split=split)


def _teacher_pool(cfg: TrainConfig, m: Models, spec: registry.LossSpec, task, split: str) -> tuple[list, Rollouts]:
    """The fixed set of teacher samples (``teacher_sample_pool`` prompts × ``num_generations``), drawn once at
    the start; seeded, so a resumed run draws the same set."""
    if isinstance(task, MixTask):
        raise ValueError(f"teacher_sample_pool={cfg.teacher_sample_pool} is not supported with a mixture of tasks "
                         f"({task.name}); use 0 (fresh teacher samples every step)")
    examples = task.examples(cfg.teacher_sample_pool, seed=cfg.seed * 1_000_003 - 1, split=split)
    return examples, make_rollouts(cfg, m, spec, [e.prompt for e in examples], seed=_sample_seed(cfg.seed, -1, 0),
                                   teacher=m.teacher_for(task.name))


def _from_pool(cfg: TrainConfig, pool: tuple[list, Rollouts], step_index: int, micro: int, n: int) -> tuple[Rollouts, list]:
    """``n`` prompts of the fixed set and all their samples, for one micro-batch: a function of (seed, step,
    micro-batch), so resumed runs match."""
    examples, rollouts = pool
    picked = random.Random(f"pool/{cfg.seed}/{step_index}/{micro}").sample(range(len(examples)), n)
    G = cfg.num_generations
    r = rollouts.select([j * G + g for j in picked for g in range(G)])
    r.prompt_index = torch.arange(n).repeat_interleave(G)
    return r, [examples[j] for j in picked]


def _sample_seed(seed: int, step_index: int, micro: int) -> int:
    """Sampling seed of one micro-batch: a function of (seed, step, micro-batch), so resumed runs match."""
    return (seed * 1_000_003 + step_index) * 1_009 + micro


def _per_task_rewards(micro: list[MicroBatch], tasks: list[str], mixture: bool) -> dict[str, float]:
    """``reward/mean/TASK`` of each task of a mixture (this process's rows), else nothing."""
    if not mixture:
        return {}
    out = {}
    for name in dict.fromkeys(tasks):
        rewards = torch.cat([b.inputs.rewards_B for b, t in zip(micro, tasks) if t == name])
        out[f"reward/mean/{name}"] = float(rewards.mean())
    return out


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    return float(x_BT[mask_BT].float().mean()) if mask_BT.any() else 0.0


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
    lines += ["", f"evaluated on: {summary['eval_source']}; {summary['eval_prompts_trained_on']:.0%} of these "
              "prompts were also training prompts",
              f"trained {summary['steps_done']} steps in {summary['train_time_s']:.1f} s",
              f"metrics log:  {summary['metrics_path']}", f"checkpoint:   {summary['checkpoint']}",
              f"summary:      {Path(summary['out_dir']) / 'summary.json'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, 2 for bad input (one ``error:`` line), 3 for a run stopped on NaN/inf
    or divergence (the diagnostic)."""
    def body() -> int:
        summary = train(parse_args(argv))
        if distributed.current().is_main:  # [dp] one report, from the main process
            print(format_summary(summary))
        return 0

    try:
        return run_cli(body)
    finally:
        distributed.close()  # [dp]


if __name__ == "__main__":
    sys.exit(main())
