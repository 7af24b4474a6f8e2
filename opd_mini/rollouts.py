"""A step's micro-batches: who samples them, behind which prompt, with which seed, and what the teacher reads.

    examples ─► sample_batch ─► Batch (the student's samples; or the teacher's, for SFT and GKD's λ < 1 steps)
             ─► rewards, special-token mask
             ─► score_batch ─► Batch with the teacher's fields (behind --teacher_template's prompt if set)

Every sampling seed is a function of (seed, step, micro-batch), so a resumed run, or the same step cut over
several processes, samples exactly the same tokens. With ``teacher_template`` the teacher always reads its
privileged prompt: it scores the student's tokens behind it, and when it samples (SFT, λ < 1, the forward-KL
evaluation) it samples behind it; the student then trains on those tokens behind its own plain prompt.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

from opd_mini import losses
from opd_mini.batch import Batch
from opd_mini.config import ANSWERS, TrainConfig
from opd_mini.eval import adapter_disabled
from opd_mini.models import Models, TeacherRef
from opd_mini.sampler import build_rollouts, eos_token_ids, sample, with_prompts
from opd_mini.tasks import Example, Task, task_of
from opd_mini.teacher import score


def chat(cfg: TrainConfig) -> bool | str:
    """``use_chat_template`` as the sampler takes it."""
    return {"auto": "auto", "yes": True, "no": False}[cfg.use_chat_template]


def sampler_options(cfg: TrainConfig, teacher: TeacherRef | None, slip=None) -> dict:
    """``--sampler``; with the student's own base as the teacher the behaviour log-probs come from a forward
    (bit-identical to the teacher's scoring, so r_t = 0 exactly), not from the decoding loop; ``slip``: the
    environment's (:class:`opd_mini.sampler.Slip`, or None)."""
    return dict(method=cfg.sampler, behaviour_logp="forward" if teacher is not None and teacher.is_student_base else None,
                slip=slip)


def on_policy_step(cfg: TrainConfig, step_index: int) -> bool:
    """GKD's λ: whether step ``step_index`` trains on the student's samples (a function of seed and step)."""
    return cfg.lmbda >= 1 or random.Random(f"lmbda/{cfg.seed}/{step_index}").random() < cfg.lmbda


def teacher_prompts(cfg: TrainConfig, examples: list[Example]) -> list[str]:
    """What the teacher reads in front of a completion: ``teacher_template`` filled from each example, or the
    student's own prompt."""
    if not cfg.teacher_template:
        return [e.prompt for e in examples]
    return [cfg.teacher_template.format(prompt=e.prompt, answer=e.answer, hidden=e.hidden) for e in examples]


def rollout_tokens(cfg: TrainConfig) -> int:
    """The new tokens a training rollout may draw: ``max_new_tokens``, or its first ⌈prefix_fraction × max_new_tokens⌉
    with ``--prefix_fraction`` (the evaluation and the KL estimates sample whole completions)."""
    return max(1, math.ceil(cfg.prefix_fraction * cfg.max_new_tokens - 1e-9))


def sample_seed(seed: int, step_index: int, micro: int) -> int:
    """Sampling seed of one micro-batch: a function of (seed, step, micro-batch), so resumed runs match."""
    return (seed * 1_000_003 + step_index) * 1_009 + micro


def sample_batch(cfg: TrainConfig, m: Models, examples: list[Example], *, by_teacher: bool, teacher: TeacherRef,
                 seed: int, num_generations: int | None = None, exact: bool = False) -> Batch:
    """``num_generations`` samples per example: the student's (on-policy), or with ``by_teacher`` the teacher's,
    drawn behind the teacher's own prompt and returned behind the student's (what the student trains on).
    ``exact``: from the model's own distribution (temperature 1, no top-p or top-k, no slips), as a KL estimate
    needs; otherwise the environment slips (``--slip_prob``) unless ``--slip_train false``."""
    filters = dict(temperature=1.0, top_p=1.0, top_k=0) if exact else dict(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k_sampling)
    slip = m.slip if cfg.slip_train and not exact else None
    kwargs = dict(num_generations=num_generations or cfg.num_generations,
                  max_new_tokens=cfg.max_new_tokens if exact else rollout_tokens(cfg),
                  use_chat_template=chat(cfg), seed=seed, **filters, **sampler_options(cfg, teacher, slip))
    if not by_teacher:
        return sample(m.student, m.tokenizer, [e.prompt for e in examples], **kwargs)
    if teacher.path == ANSWERS:  # the reference answers, each repeated num_generations times
        G = kwargs["num_generations"]
        batch = build_rollouts(m.tokenizer, [e.prompt for e in examples for _ in range(G)],
                               [e.answer for e in examples for _ in range(G)], use_chat_template=chat(cfg))
        return batch.replace(prompt_index_B=torch.arange(len(examples)).repeat_interleave(G),
                             prompt_texts=batch.prompt_texts[::G])  # one text per prompt, as the sampler gives
    with adapter_disabled(m.student, enabled=teacher.is_student_base):
        batch = sample(teacher.model, m.tokenizer, teacher_prompts(cfg, examples), **kwargs)
    if cfg.teacher_template:  # the same tokens behind the student's prompt
        batch = with_prompts(batch, m.tokenizer, [e.prompt for e in examples], use_chat_template=chat(cfg))
    return batch


def teacher_view(cfg: TrainConfig, m: Models, batch: Batch, examples: list[Example], teacher: TeacherRef) -> Batch:
    """What the teacher reads: the batch itself, or with ``teacher_template`` the same completions behind the
    privileged prompt of each row's example (``examples[prompt_index]``), checked against the teacher's context."""
    if not cfg.teacher_template:
        return batch
    config = getattr(teacher.model, "config", None)
    return with_prompts(batch, m.tokenizer, teacher_prompts(cfg, examples), use_chat_template=chat(cfg),
                        max_length=getattr(config, "max_position_embeddings", None))


def score_batch(cfg: TrainConfig, m: Models, batch: Batch, examples: list[Example], teacher: TeacherRef,
                signal: str) -> Batch:
    """The batch with the teacher's fields, keeping only what the loss needs (signal: sampled | topk | full).

    A full-vocabulary loss computed in chunks (``loss_chunk_size`` > 0) gets the teacher's hidden states,
    projected chunk by chunk inside the loss (the fused path); with ``loss_chunk_size`` 0 it gets the
    (B, T, V) log-probabilities in one piece (the readable reference path)."""
    fused = signal == "full" and cfg.loss_chunk_size > 0
    return score(teacher.model, batch, vocab_size=m.vocab_size, top_k=cfg.top_k if signal == "topk" else 0,
                 full=signal == "full" and not fused, keep_hidden=fused, chunk_size=cfg.teacher_chunk_size,
                 disable_adapter=teacher.is_student_base, view=teacher_view(cfg, m, batch, examples, teacher))


def finish_batch(cfg: TrainConfig, m: Models, batch: Batch, examples: list[Example], task: Task,
                 device: torch.device) -> Batch:
    """The loop's fields of a sampled batch: the rewards, the GRPO group, the special-token mask, slipped tokens out
    of the loss; on ``device``."""
    batch = batch.to(device)
    mask_BT = batch.mask_BT
    lengths_B = mask_BT.sum(1)  # the completion up to and including its first EOS
    last_B = batch.tokens_BT.gather(1, (lengths_B - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    eos_B = torch.isin(last_B, torch.tensor(eos_token_ids(m.student, m.tokenizer), device=last_B.device))
    truncated_B = (lengths_B >= rollout_tokens(cfg)) & ~eos_B  # with --prefix_fraction: cut at the prefix
    if cfg.mask_special_tokens:
        mask_BT = losses.mask_special_tokens(mask_BT, batch.tokens_BT, m.tokenizer.all_special_ids)
    if batch.slipped_BT is not None:  # the environment's moves, not the policy's: no loss on them
        mask_BT = mask_BT & ~batch.slipped_BT
    rewards_B = torch.tensor(task.rewards(batch.completions, [examples[j] for j in batch.prompt_index_B.tolist()]))
    return batch.replace(mask_BT=mask_BT, rewards_B=rewards_B.to(device), group_size=cfg.num_generations,
                         truncated_B=truncated_B)


@dataclasses.dataclass
class Piece:
    """One micro-batch of a step, with what scoring it needs: its task's teacher and its examples."""

    batch: Batch
    task: str  # the spec of the task its prompts come from
    teacher: TeacherRef
    examples: list[Example]  # examples[batch.prompt_index_B[b]] is row b's example


def fixed_prompts(cfg: TrainConfig, task: Task, split: str) -> list[Example]:
    """``--train_prompts N``: the N training examples every step draws its prompts from (a function of the seed)."""
    return task.examples(cfg.train_prompts, seed=cfg.seed * 1_000_003 - 2, split=split)


def step_examples(cfg: TrainConfig, task: Task, step_index: int, split: str) -> list[Example]:
    """The prompts of one optimizer step: a function of (seed, step), so resumed runs match. With ``train_prompts``
    they are drawn (with replacement) from a fixed set of that many training prompts, the same at every step."""
    if cfg.train_prompts:
        return random.Random(f"prompts/{cfg.seed}/{step_index}").choices(fixed_prompts(cfg, task, split),
                                                                          k=cfg.prompts_per_step)
    return task.examples(cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step_index, split=split)


def micro_batch_pieces(cfg: TrainConfig, m: Models, task: Task, examples: list[Example], micro: int, step_index: int,
                       *, by_teacher: bool) -> list[Piece]:
    """The samples of one micro-batch's examples; a mixture of tasks is split into one piece per task, so that
    each piece is sampled and scored by its own task's teacher (a single task: one piece)."""
    pieces = []
    for g, name in enumerate(dict.fromkeys(task_of(e, task) for e in examples)):
        ex = [e for e in examples if task_of(e, task) == name]
        teacher = m.teacher_for(name)
        batch = sample_batch(cfg, m, ex, by_teacher=by_teacher, teacher=teacher,
                             seed=sample_seed(cfg.seed, step_index, micro) + 7_919 * g)
        pieces.append(Piece(batch, name, teacher, ex))
    return pieces


class TeacherPool:
    """A fixed set of teacher samples (``teacher_sample_pool`` prompts × ``num_generations``), drawn once at the
    start, from which the steps the teacher samples (SFT, or GKD's λ < 1) draw their prompts: a distillation
    dataset. Seeded, so a resumed run draws the same set and the same prompts."""

    def __init__(self, cfg: TrainConfig, m: Models, task: Task, split: str):
        self.cfg, self.task = cfg, task  # a single task (a mixture is refused with the pool: effective_config)
        self.examples = task.examples(cfg.teacher_sample_pool, seed=cfg.seed * 1_000_003 - 1, split=split)
        self.batch = sample_batch(cfg, m, self.examples, by_teacher=True, teacher=m.teacher_for(task.name),
                                  seed=sample_seed(cfg.seed, -1, 0))

    def piece(self, m: Models, step_index: int, micro: int, n: int) -> Piece:
        """``n`` prompts of the set and all their samples, for one micro-batch: a function of (seed, step,
        micro-batch), so resumed runs match."""
        picked = random.Random(f"pool/{self.cfg.seed}/{step_index}/{micro}").sample(range(len(self.examples)), n)
        G = self.cfg.num_generations
        batch = self.batch.select([j * G + g for j in picked for g in range(G)])
        batch = batch.replace(prompt_index_B=torch.arange(n).repeat_interleave(G))
        return Piece(batch, self.task.name, m.teacher_for(self.task.name), [self.examples[j] for j in picked])
