"""On-policy distillation of a causal LM, readable top to bottom.

    python -m opd_mini.train --preset tiny-cpu                       # offline, a few minutes on a CPU
    python -m opd_mini.train --preset laptop-gpu --loss reverse_kl_topk
    python -m opd_mini.train --config run.yaml --lr 3e-4 --resume    # flags override the file

One optimizer step, as one micro-batch type (:class:`opd_mini.batch.Batch`) flowing through it
(B rows = prompts · num_generations, T new tokens)::

    examples ─► rollouts.sample_batch (student, no grad) ─► Batch: tokens_BT, mask_BT, behaviour_logp_BT
             ─► rollouts.finish_batch                     ─► + rewards_B, group_size, the special-token mask
             ─► rollouts.score_batch (teacher, no grad)   ─► + teacher_logp_BT, and teacher_topk_*_BTK or the
                                                             (B, T, V) log-probs / hidden states the loss needs
             ─► student.loss_and_backward (grad)          ─► the registered loss over the whole step's N tokens
             ─► clip grad norm ─► AdamW step ─► LR scheduler step

With ``grad_accum`` > 1 the step's prompts are split into micro-batches: all are sampled first (so the
token count N of the whole step is known), then each is scored and back-propagated with the loss
normalised by N, so the gradient does not depend on the split. The same loop runs the baselines:
``sft`` (the teacher generates, the student does cross-entropy on its samples) and ``grpo`` (RL with
the task's verifiable reward). Every step appends one line to ``out_dir/metrics.jsonl``; every key
is explained in :data:`opd_mini.metrics.METRIC_DOCS`. The lines marked ``[dp]`` are what changes under
several processes (:mod:`opd_mini.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
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

from opd_mini import distributed, divergences, registry, runs
from opd_mini.cli import parse_args, run_cli
from opd_mini.config import TrainConfig
from opd_mini.eval import evaluate, held_out_examples
from opd_mini.loading import resolve_device
from opd_mini.metrics import METRIC_DOCS, PER_TASK_EVAL_KEYS, cuda_memory  # noqa: F401  (the glossary, kept here too)
from opd_mini.models import TeacherRef, check_teacher_reads_student, effective_config, load_models
from opd_mini.trackers import open_tracker
from opd_mini.rollouts import (Piece, TeacherPool, chat, finish_batch, fixed_prompts, micro_batch_pieces,
                               on_policy_step, rollout_tokens, sample_batch, sampler_options, score_batch, step_examples, teacher_prompts,
                               teacher_view)
from opd_mini.sampler import slip_for
from opd_mini.student import loss_and_backward
from opd_mini.tasks import Example, MixTask, Task, check_vocabulary, get_task


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict (final eval, eval history, paths).

    Every check of the settings runs before ``out_dir`` is touched. The run holds a lock on ``out_dir`` from
    start to end, so a second run cannot write into it."""
    cfg.validate()
    dist = distributed.setup(cfg)  # [dp] one process unless a launcher started several
    runs.check_out_dir(cfg, main=dist.is_main)
    with runs.locked_out_dir(cfg.out_dir) if dist.is_main else nullcontext(Path(cfg.out_dir)) as out_dir, \
            divergences.backend(cfg.divergence_backend):  # [dp]
        return _train(cfg, out_dir)


@dataclasses.dataclass
class Run:
    """What the loop holds: the effective config, the models, the tasks and the optimizer."""

    cfg: TrainConfig
    m: Models
    task: Task
    eval_task: Task
    eval_split: str
    train_split: str
    retention_task: Task | None
    spec: registry.LossSpec
    opts: registry.LossOptions
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    samples: list = dataclasses.field(default_factory=list)  # the last evaluation's samples table (--report_to)


def _setup(cfg: TrainConfig, out_dir: Path) -> tuple[Run, runs.Progress]:
    """Models, tasks, optimizer; every setting resolved and checked; then the resumed state, or a fresh log."""
    dist = distributed.current()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # also the "Loading weights" bars
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if not cfg.lora:  # full fine-tuning keeps float32 weights (bf16 weights would lose small updates)
        dtype = torch.float32
    device = dist.place(device)  # [dp] one GPU per process
    task = get_task(cfg.task, eval_fraction=cfg.eval_fraction)
    cfg = effective_config(cfg, task)  # what every path below reads, and what the run records
    m = load_models(cfg, device, dtype)
    check_vocabulary(task, m.tokenizer)
    # evaluation prompts: a file task's held-out split (never trained on), or a separate --eval_task
    eval_task, eval_split, train_split = ((get_task(cfg.eval_task), "all", "all") if cfg.eval_task
                                          else (task, "eval", "train"))
    if cfg.train_prompts and (size := task.split_size(train_split)) is not None and cfg.train_prompts > size:
        raise ValueError(f"train_prompts={cfg.train_prompts}: task {task.name} has only {size} training prompt(s); give "
                         f"at most {size}, or 0 for all of them")
    if cfg.slip_prob > 0 and eval_task.slip_moves != task.slip_moves:
        raise ValueError(f"slip_prob={cfg.slip_prob}: the evaluation task {eval_task.name} does not slip the moves of "
                         f"{task.name} ({task.slip_moves}); evaluate on a task with the same moves")
    m.slip = slip_for(m.tokenizer, task.slip_moves, cfg.slip_prob)
    params = [p for p in m.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if registry.get_loss(cfg.loss).replaced and dist.is_main:
        spec = registry.get_loss(cfg.loss)
        print(f"notice: the loss {cfg.loss!r} is {spec.fn.__module__}.{spec.fn.__qualname__}, registered over the "
              f"built-in {spec.replaced}", file=sys.stderr)
    run = Run(cfg, m, task, eval_task, eval_split, train_split,
              get_task(cfg.retention_task) if cfg.retention_task else None, registry.get_loss(cfg.loss),
              registry.LossOptions.from_config(cfg), params, optimizer, scheduler, device)
    previous = runs.checkpoints_to_resume(cfg, out_dir) if dist.is_main or cfg.resume else []  # [dp]
    progress = runs.start_or_resume(cfg, out_dir, previous, m.student, optimizer, scheduler, main=dist.is_main)
    if progress.step:  # the restored optimizer carries the old lr: apply this run's
        for group in optimizer.param_groups:
            group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * lr_factor(progress.step, cfg))
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    dist.broadcast_parameters(params)  # [dp] every process starts from the main process's weights
    dist.barrier()  # [dp] the log is truncated before any process reads it
    return run, progress


def _train(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    run, progress = _setup(cfg, out_dir)
    tracker = open_tracker(run.cfg.report_to, out_dir, run.cfg.to_dict()) if distributed.current().is_main else None
    try:
        return _loop(run, progress, out_dir, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _loop(run: Run, progress: runs.Progress, out_dir: Path, tracker) -> dict[str, Any]:
    cfg, m, dist = run.cfg, run.m, distributed.current()

    def record(step: int, row: dict, evaluated: bool) -> None:  # the log, and the tracker if there is one
        progress.record(step, row, evaluated=evaluated)
        if tracker is not None:
            tracker.log(row, step)
            if evaluated and run.samples:
                tracker.table(run.samples, step)

    cuda_memory(run.device)  # on a GPU: reset the peaks, loading is no step's
    if dist.is_main and progress.step == 0:  # [dp] the main process evaluates the starting point
        record(0, {"step": 0, **run_eval(run)}, evaluated=True)
    pool = TeacherPool(cfg, m, run.task, run.train_split) if cfg.teacher_sample_pool else None
    micro_prompts = cfg.prompts_per_step // (cfg.grad_accum * dist.world)  # [dp] world · grad_accum micro-batches
    checked: set[str] = set()
    bar = tqdm(range(progress.step, cfg.steps), initial=progress.step, total=cfg.steps, desc=f"opd {cfg.loss}",
               disable=not cfg.progress or not dist.is_main, dynamic_ncols=True)
    for step_index in bar:
        step, t_step = step_index + 1, time.perf_counter()

        # 1) sample every micro-batch (no grad); the step's token count N normalises every piece
        t0 = time.perf_counter()
        on_policy = on_policy_step(cfg, step_index)  # GKD's λ: else the teacher samples this step
        by_teacher = run.spec.rollouts == "teacher" or not on_policy
        examples = step_examples(cfg, run.task, step_index, run.train_split)
        pieces: list[Piece] = []
        for i in dist.micro_batches(cfg.grad_accum):  # [dp] global indices; range(grad_accum) on one process
            if by_teacher and pool is not None:  # a fixed set of teacher samples
                pieces.append(pool.piece(m, step_index, i, micro_prompts))
            else:
                pieces += micro_batch_pieces(cfg, m, run.task, examples[i * micro_prompts:(i + 1) * micro_prompts],
                                             i, step_index, by_teacher=by_teacher)
        for p in pieces:
            p.batch = finish_batch(cfg, m, p.batch, p.examples, run.task, run.device)
            if p.task not in checked and not by_teacher and run.spec.signal is not None:
                checked.add(p.task)  # once per task: does the teacher read exactly the student's tokens?
                check_teacher_reads_student(cfg, p.teacher, m.tokenizer, teacher_view(cfg, m, p.batch, p.examples,
                                                                                      p.teacher),
                                            teacher_prompts(cfg, p.examples))
        num_tokens = int(dist.sum(sum(p.batch.num_masked for p in pieces))[0])  # [dp] global N
        t_sample = time.perf_counter() - t0

        # 2) per micro-batch: the teacher's fields, then the student's forward, loss and backward
        t_score = t_train = 0.0
        metrics = registry.MetricMean()
        run.optimizer.zero_grad(set_to_none=True)
        for i, p in enumerate(pieces):
            t0 = time.perf_counter()
            batch = p.batch.replace(num_tokens=max(num_tokens, 1))
            if run.spec.signal is not None:
                batch = score_batch(cfg, m, batch, p.examples, p.teacher, run.spec.signal)
                metrics.add({"teacher/entropy": _masked_mean(batch.teacher_entropy_BT, batch.mask_BT)}, batch.mask_BT)
            t_score += time.perf_counter() - t0
            t0 = time.perf_counter()
            check = runs.finite_check(cfg, m.student, f"step {step}, micro-batch {i + 1}/{len(pieces)}", progress)
            metrics.merge(loss_and_backward(m.student, batch, run.spec, run.opts, vocab_size=m.vocab_size,
                                            chunk_size=cfg.loss_chunk_size, check=check))
            t_train += time.perf_counter() - t0

        # 3) clip, step the optimizer and the schedule
        t0 = time.perf_counter()
        dist.sum_gradients(run.params)  # [dp] each loss is over the global N, so the sum is the step's gradient
        metrics = dist.metrics(metrics)  # [dp]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf")))
        runs.check_step(cfg, m.student, step, grad_norm, metrics.result(), progress)  # NaN, a spike, a slow death
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.scheduler.step()
        t_train += time.perf_counter() - t0
        step_time = time.perf_counter() - t_step
        progress.step, progress.train_time = step, progress.train_time + step_time

        rewards_B = dist.cat(torch.cat([p.batch.rewards_B for p in pieces]).cpu())  # [dp] every process's rows
        truncated_B = dist.cat(torch.cat([p.batch.truncated_B for p in pieces]).float().cpu())  # [dp]
        row = {"step": step, **metrics.result(), "optim/lr": lr, "optim/grad_norm": grad_norm,
               "rollout/num_tokens": num_tokens, "rollout/completion_len": num_tokens / rewards_B.shape[0],
               "rollout/truncated_frac": float(truncated_B.mean()), **_slipped(m, pieces),
               "reward/mean": float(rewards_B.mean()), **_per_task_rewards(run, pieces),
               **({"rollout/on_policy": float(on_policy)} if cfg.lmbda < 1 else {}),
               "time/sample": t_sample, "time/score": t_score, "time/train": t_train, "time/step": step_time,
               "time/train_total": progress.train_time, **cuda_memory(run.device)}
        out_of_time = dist.any(cfg.max_time_s > 0 and progress.train_time >= cfg.max_time_s)  # [dp] all stop together
        last = step == cfg.steps or out_of_time
        if dist.is_main:  # [dp] the other processes go on to the next step's first collective
            evaluated = (cfg.eval_every and step % cfg.eval_every == 0) or last
            record(step, {**row, **(run_eval(run) if evaluated else {})}, evaluated)
            bar.set_postfix(_postfix(row, progress.history))
            if (cfg.save_every and step % cfg.save_every == 0) or last:
                progress.save_checkpoint(out_dir, m, run.optimizer, run.scheduler, step)
        if out_of_time:
            break
    bar.close()
    if dist.is_main:  # [dp]
        progress.finish()
    dist.barrier()  # [dp] the other processes wait for the main one's last evaluation and checkpoint
    return _summary(run, out_dir, progress)


# ---------------------------------------------------------------------------------------------
# evaluation and the summary
# ---------------------------------------------------------------------------------------------


def run_eval(run: Run) -> dict[str, float]:
    """Held-out evaluation; a mixture is evaluated task by task (``eval/pass@1/TASK``, ...) and its ``eval/*``
    keys are the mean over its tasks (a KL only where every task has a teacher)."""
    t0 = time.perf_counter()
    run.samples.clear()
    if not isinstance(run.eval_task, MixTask):
        out = _evaluate_task(run, run.eval_task, run.retention_task)
    else:
        parts = [t for t, _ in run.eval_task.parts]
        per = {t.name: _evaluate_task(run, t, run.retention_task if i == 0 else None) for i, t in enumerate(parts)}
        shared = [k for k in per[parts[0].name] if "retention" not in k and all(k in r for r in per.values())]
        out = {k: sum(r[k] for r in per.values()) / len(per) for k in shared}
        out.update({k: v for k, v in per[parts[0].name].items() if "retention" in k})
        out.update({f"{k}/{name}": r[k] for name, r in per.items() for k in PER_TASK_EVAL_KEYS if k in r})
    return {**out, "time/eval": time.perf_counter() - t0, **cuda_memory(run.device, "memory/eval_")}


def _evaluate_task(run: Run, part: Task, retention: Task | None) -> dict[str, float]:
    cfg, m = run.cfg, run.m
    teacher = m.teacher_for(part.name) if m.has_teacher else None
    shown = held_out_examples(part, cfg.eval_prompts, cfg.seed, run.eval_split)
    by_prompt = {e.prompt: e for e in shown}

    def examples_of(prompts: list[str]) -> list:
        return [by_prompt[p] for p in prompts]

    scorer = sampler = init = None
    if teacher is not None:
        scorer = lambda b: score_batch(cfg, m, b, shown, teacher, "sampled")  # noqa: E731
        if cfg.eval_kl_forward:  # the teacher's own samples (behind its template), at temperature 1
            sampler = lambda prompts, n, seed: sample_batch(  # noqa: E731
                cfg, m, examples_of(prompts), by_teacher=True, teacher=teacher, seed=seed, num_generations=n,
                exact=True)
    if cfg.eval_kl_to_init:  # π₀'s own samples of the eval (and retention) prompts (no template)
        base = TeacherRef(m.student, True, m.student_path)
        plain = copy.copy(cfg)  # π₀ reads the student's own prompt (not validated again: only the sampler reads it)
        plain.teacher_template = ""
        init = lambda prompts, n, seed: sample_batch(  # noqa: E731
            plain, m, [_bare(p) for p in prompts], by_teacher=True, teacher=base, seed=seed, num_generations=n,
            exact=True)
    return evaluate(m.student, m.tokenizer, part, num_prompts=cfg.eval_prompts, num_samples=cfg.eval_samples,
                    k=cfg.pass_k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                    seed=cfg.seed, use_chat_template=chat(cfg), score_teacher=scorer, sample_teacher=sampler,
                    retention_task=retention, sample_init=init, split=run.eval_split,
                    samples_out=run.samples if run.cfg.report_to != "none" and not run.samples else None,
                    sampler_options=sampler_options(cfg, teacher, m.slip))


def _slipped(m, pieces: list[Piece]) -> dict[str, float]:
    """``rollout/slipped_frac`` with slips in the training rollouts (this process's rows)."""
    if not any(p.batch.slipped_BT is not None for p in pieces):
        return {}
    slipped = sum(int(p.batch.slipped_BT.sum()) for p in pieces if p.batch.slipped_BT is not None)
    emitted = sum(int((p.batch.mask_BT | p.batch.slipped_BT).sum()) if p.batch.slipped_BT is not None
                  else p.batch.num_masked for p in pieces)
    return {"rollout/slipped_frac": slipped / max(1, emitted)}


def _bare(prompt: str) -> Example:
    return Example(prompt=prompt, answer="")


def _summary(run: Run, out_dir: Path, progress: runs.Progress) -> dict[str, Any]:
    """The run's summary: what ran (the effective config, the models as loaded), the evaluations, the paths."""
    cfg = run.cfg
    held_out = {e.prompt for e in held_out_examples(run.eval_task, cfg.eval_prompts, cfg.seed, run.eval_split)}
    trained = {e.prompt for i in range(progress.step) for e in step_examples(cfg, run.task, i, run.train_split)}
    ran = run.m.describe(run.spec)
    if run.m.slip is not None:
        ran["slip"] = {"prob": run.m.slip.prob, "moves": list(run.task.slip_moves), "training_rollouts": cfg.slip_train}
    if cfg.train_prompts:  # the fixed set every step drew from
        ran["train_prompts"] = [e.prompt for e in fixed_prompts(cfg, run.task, run.train_split)]
    if cfg.prefix_fraction < 1:
        ran["prefix_tokens"] = rollout_tokens(cfg)
    summary = {"config": cfg.to_dict(), "ran": ran, "steps_done": progress.step,
               "train_time_s": progress.train_time, "eval_source": run.eval_task.describe_split(run.eval_split),
               "eval_prompts_trained_on": len(held_out & trained) / max(1, len(held_out)),
               "final_eval": progress.history[-1] if progress.history else {}, "eval_history": progress.history,
               "metrics_path": str(out_dir / "metrics.jsonl"),
               "checkpoint": str(progress.newest) if progress.newest else None, "out_dir": str(out_dir)}
    if distributed.current().is_main:  # [dp]
        runs.write_json(out_dir / "summary.json", summary)
    return summary


def _per_task_rewards(run: Run, pieces: list[Piece]) -> dict[str, float]:
    """``reward/mean/TASK`` of each task of a mixture, over the rows of every process; else nothing."""
    if not isinstance(run.task, MixTask):
        return {}
    names = [t.name for t, _ in run.task.parts]
    sums = [float(sum(p.batch.rewards_B.sum() for p in pieces if p.task == n)) for n in names]
    counts = [float(sum(p.batch.rewards_B.numel() for p in pieces if p.task == n)) for n in names]
    totals = distributed.current().sum(*sums, *counts)  # [dp]
    return {f"reward/mean/{n}": totals[i] / totals[len(names) + i] for i, n in enumerate(names)
            if totals[len(names) + i] > 0}


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
    from opd_mini.eval import EVAL_METRIC_DOCS

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
    or divergence (the diagnostic), 130 when interrupted (Ctrl-C: the line says how to resume)."""
    def body() -> int:
        cfg = parse_args(argv)
        try:
            summary = train(cfg)
        except KeyboardInterrupt:
            return runs.interrupted(cfg)
        if distributed.current().is_main:  # [dp] one report, from the main process
            print(format_summary(summary))
        return 0

    try:
        return run_cli(body)
    finally:
        distributed.close()  # [dp]


if __name__ == "__main__":
    sys.exit(main())
