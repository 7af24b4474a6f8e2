"""The world of the forgetting experiments: two tasks sharing one student, their teachers, and π₀.

Task A's prompts and task B's prompts share every parameter of a :class:`toy.world.MLPPolicy` but a
per-prompt embedding, so learning B moves A. B has prompts with two correct answers, between which its
teacher splits its mass (so that entropy and coverage measure diversity). π₀ is the student after an
exact SFT warm-up. Also here: each method's loss (every loss is a registered one of
:mod:`opd_mini.registry`, fed as the transformer loop feeds it), the training helpers, and the exact
mean and variance of one sample's gradient (:func:`expected_gradient`).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

import torch

from opd_mini import registry
from opd_mini.batch import Batch
from opd_mini.losses import token_logprobs
from toy.exact import (all_sequence_logprobs, correct_table, entropy_from_logprobs, enumerate_pairs,
                       kl_from_logprobs, sequence_ids, table_logprobs)
from toy.policies import MLPPolicy, Policy, TablePolicy, copy_policy, make_student, make_teacher
from toy.world import Task, World, make_tasks

#: The methods' names in the toy experiments → the registered losses they train with. Any other name
#: is looked up in :data:`opd_mini.registry.LOSS_REGISTRY` as it is, so a user's registered loss runs too.
METHOD_LOSSES = {"sft": "sft", "sft_fresh": "sft", "sft_fixed": "sft", "sft_replay": "sft", "grpo": "grpo",
                 "opd_sampled": "reverse_kl_sampled", "opd_full": "reverse_kl_full", "opd_topk": "reverse_kl_topk",
                 "forward_kl": "forward_kl", "jsd": "jsd"}


# --------------------------------------------------------------------------------------------
# tasks with several correct answers, and their teacher (built on the public API of toy.world)
# --------------------------------------------------------------------------------------------


def make_multi_answer_task(name: str, answer_sets: dict[int, torch.Tensor]) -> Task:
    """A :class:`toy.world.Task` whose prompt p accepts any sequence in ``answer_sets[p]`` ((M_p, T)).

    ``task.answers_KT`` holds each prompt's first answer; the verifier checks all of them.
    """
    prompts = sorted(answer_sets)
    M = max(len(a) for a in answer_sets.values())
    T = answer_sets[prompts[0]].shape[1]
    answers_KMT = torch.full((len(prompts), M, T), -1, dtype=torch.long)  # −1 never matches a token
    for k, p in enumerate(prompts):
        answers_KMT[k, : len(answer_sets[p])] = answer_sets[p]
    verifier = AnswerSetVerifier(answers_KMT, {p: k for k, p in enumerate(prompts)})
    return Task(name=name, prompts=prompts, answers_KT=answers_KMT[:, 0], verifier=verifier)


def answer_set(first_T: torch.Tensor, second: bool, V: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's answers (M, T) and their equal weights (M,): ``first_T`` and, with ``second``, another
    answer drawn uniformly until it differs from the first."""
    answers = [first_T]
    if second:
        other = torch.randint(V, first_T.shape, generator=generator)
        while torch.equal(other, answers[0]):
            other = torch.randint(V, first_T.shape, generator=generator)
        answers.append(other)
    return torch.stack(answers), torch.full((len(answers),), 1.0 / len(answers))


@dataclass
class AnswerSetVerifier:
    """y solves p when it equals one of p's answers ``answers_KMT[row_of[p]]`` (rows padded with −1).
    A class rather than a closure, so that a task can be sent to a worker process."""

    answers_KMT: torch.Tensor
    row_of: dict[int, int]

    def __call__(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        rows_B = torch.tensor([self.row_of[int(p)] for p in prompts_B.tolist()], dtype=torch.long)
        return (tokens_BT.long().unsqueeze(1) == self.answers_KMT[rows_B]).all(-1).any(-1)  # (B,)


def make_multi_answer_teacher(world: World, answer_sets: dict[int, torch.Tensor], weights: dict[int, torch.Tensor],
                              peak: float, noise: float, generator: torch.Generator | None = None) -> TablePolicy:
    """A table teacher that puts weight ``w_a`` on each correct answer a of a prompt.

    At a prefix u of length t, let C be the answers whose first t tokens are u (all of the prompt's
    answers when none is — the teacher steers back after a mistake) and ``m_v = Σ_{a∈C, a_t=v} w_a /
    Σ_{a∈C} w_a`` their mixture over the next token. Then::

        logits_v = noise · N(0, 1) + log(1 + (e^peak − 1) · m_v)

    With one answer this is ``toy.world.make_teacher`` (+peak on the right token); with two answers
    that part at position t, each gets ≈ peak − log 2, so q(a|p) ≈ w_a · (single-answer success).
    Prompts without answers get ``noise · N(0, 1)`` logits.
    """
    table_PSV = torch.randn(world.P, world.num_states, world.V, generator=generator) * noise
    prefixes_ST, pos_S = world.state_prefixes(), world.state_positions()
    before_ST = torch.arange(world.T) < pos_S.unsqueeze(1)  # the positions of each state's prefix
    for p, answers_MT in answer_sets.items():
        # C per state: the answers that agree with the prefix (all of them where none does)
        consistent_SM = ((answers_MT.unsqueeze(0) == prefixes_ST.unsqueeze(1)) | ~before_ST.unsqueeze(1)).all(-1)
        consistent_SM |= ~consistent_SM.any(-1, keepdim=True)
        next_SM = answers_MT[:, pos_S].T  # each answer's token after each prefix
        mix_SV = torch.zeros(world.num_states, world.V).scatter_add_(1, next_SM, weights[p].float() * consistent_SM)
        table_PSV[p] += torch.log1p(math.expm1(peak) * mix_SV / mix_SV.sum(-1, keepdim=True))
    return TablePolicy(world, table_PSV)


# --------------------------------------------------------------------------------------------
# the shared setup: tasks A and B, their teachers, π₀, and exact evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The world, the two tasks, their teachers and the initial student π₀ shared by the experiments."""

    world: World
    task_A: Task
    task_B: Task
    answer_sets_B: dict[int, torch.Tensor]
    teacher_A: TablePolicy
    teacher_B: TablePolicy
    init: MLPPolicy  # π₀, frozen
    correct_A_KN: torch.Tensor
    correct_B_KN: torch.Tensor
    init_logp_A_KN: torch.Tensor
    init_logp_B_KN: torch.Tensor
    answer_ids_B: list[torch.Tensor] = field(init=False, repr=False)  # each B prompt's answers' sequence ids

    def __post_init__(self):
        self.answer_ids_B = [sequence_ids(self.answer_sets_B[p], self.world.V) for p in self.task_B.prompts]


@torch.no_grad()
def evaluate(policy: Policy, setup: Setup, pass_k: int = 4) -> dict[str, float]:
    """Exact success on A and B, KL(π₀‖π) on A and on B, entropy, pass@k and coverage@k on B."""
    w = setup.world
    table_PSV = policy.state_table()  # the same log-probabilities, by lookup
    logp_A_KN = table_logprobs(table_PSV, w, setup.task_A.prompts)
    logp_B_KN = table_logprobs(table_PSV, w, setup.task_B.prompts)
    succ_A_K = (logp_A_KN.exp() * setup.correct_A_KN).sum(-1)
    succ_B_K = (logp_B_KN.exp() * setup.correct_B_KN).sum(-1)
    coverage_K = torch.stack([(1 - (1 - logp_B_KN[k, ids].exp()) ** pass_k).mean()
                              for k, ids in enumerate(setup.answer_ids_B)])
    return {"success_A": float(succ_A_K.mean()), "success_B": float(succ_B_K.mean()),
            "kl_A": float(kl_from_logprobs(setup.init_logp_A_KN, logp_A_KN)),
            "kl_B": float(kl_from_logprobs(setup.init_logp_B_KN, logp_B_KN)),
            "entropy_B": float(entropy_from_logprobs(logp_B_KN)),
            "pass_at_k_B": float((1 - (1 - succ_B_K) ** pass_k).mean()),
            "coverage_at_k_B": float(coverage_K.mean())}


def build_setup(cfg) -> Setup:
    """Tasks A and B, their teachers, and π₀: an MLP student warmed up by exact SFT (``cfg``: a
    :class:`toy.forgetting.Config`).

    The warm-up minimises the exact forward KL ``KL(q_A‖π)`` on A prompts plus ``KL(q_B⁰‖π)`` on B
    prompts (the expected SFT loss on teacher samples, without sampling noise), where q_B⁰ is a weak
    B teacher (peak ``init_B_peak``): π₀ is peaked on A's answers as q_A is, and knows B only a little.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    world = World(cfg.V, cfg.T, 2 * cfg.prompts_per_task)
    task_A, single_B = make_tasks(world, 2, g)
    # task B: the first `two_answer_prompts` prompts get a second, different answer, weighted 50/50
    answer_sets, weights = {}, {}
    for k, p in enumerate(single_B.prompts):
        answer_sets[p], weights[p] = answer_set(single_B.answers_KT[k], k < cfg.two_answer_prompts, cfg.V, g)
    task_B = make_multi_answer_task("B", answer_sets)
    teacher_A = make_teacher(world, [task_A], peak=cfg.teacher_peak, noise=cfg.teacher_noise, generator=g)
    teacher_B = make_multi_answer_teacher(world, answer_sets, weights, cfg.teacher_peak, cfg.teacher_noise, g)
    for teacher in (teacher_A, teacher_B):
        teacher.requires_grad_(False)

    prior_B = make_multi_answer_teacher(world, answer_sets, weights, cfg.init_B_peak, cfg.teacher_noise, g)

    student = make_student(world, "mlp", g, hidden=cfg.hidden, context=cfg.context)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.warmup_lr)
    with torch.no_grad():
        target_logp_KN = torch.cat([all_sequence_logprobs(teacher_A, task_A.prompts),
                                    all_sequence_logprobs(prior_B, task_B.prompts)])
    prompts_AB = task_A.prompts + task_B.prompts
    for _ in range(cfg.warmup_steps):
        loss = kl_from_logprobs(target_logp_KN, all_sequence_logprobs(student, prompts_AB))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    init = copy_policy(student)
    with torch.no_grad():
        init_logp_A, init_logp_B = (all_sequence_logprobs(init, t.prompts) for t in (task_A, task_B))
    return Setup(world, task_A, task_B, answer_sets, teacher_A, teacher_B, init,
                 correct_table(task_A, world), correct_table(task_B, world), init_logp_A, init_logp_B)


# --------------------------------------------------------------------------------------------
# losses (registered ones, fed as the transformer loop feeds them) and training helpers
# --------------------------------------------------------------------------------------------


def method_spec(method: str) -> registry.LossSpec:
    """The registered loss a method trains with (see :data:`METHOD_LOSSES`); a ValueError lists the names."""
    name = METHOD_LOSSES.get(method, method)
    if name not in registry.LOSS_REGISTRY:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHOD_LOSSES)} or a registered loss "
                         f"({', '.join(registry.LOSS_REGISTRY)})")
    return registry.LOSS_REGISTRY[name]


def loss_from_logits(method: str, student_logits_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                     teacher_logits_BTV: torch.Tensor | None = None, *, rewards_B: torch.Tensor | None = None,
                     group_size: int = 8, topk: int = 2, jsd_beta: float = 0.5,
                     num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one method on a batch of sequences (B, T), from logits: the method's registered loss
    (:func:`method_spec`), with the teacher's signal built from its logits. Every loss is a per-token mean
    over the B·T tokens (or a sum over sequences of per-sequence means with ``num_tokens=T``).

    The built-in methods: ``sft`` (also ``sft_fresh``/``sft_fixed``) cross-entropy on the given tokens;
    ``grpo`` group-normalised rewards over consecutive groups of ``group_size``; ``opd_sampled`` the
    sampled-token reverse KL (γ = 0); ``opd_full`` the full reverse KL; ``opd_topk`` the reverse KL inside
    the teacher's top-K ∪ {y_t}, both renormalised (with the sampled token in the support, mass the student
    puts on a token the teacher dislikes is penalised even outside the top-K); ``forward_kl``; ``jsd``
    JSD(β). Shapes: student_logits_BTV (B, T, V) with grad; tokens_BT (B, T); teacher_logits_BTV (B, T, V).
    """
    spec = method_spec(method)
    if spec.signal is not None and teacher_logits_BTV is None:
        raise ValueError(f"method {method!r} compares with a teacher: pass teacher_logits_BTV")
    batch = Batch.from_teacher_logits(tokens_BT, teacher_logits_BTV, signal=spec.signal, top_k=topk,
                                                   num_tokens=num_tokens, rewards_B=rewards_B, group_size=group_size)
    if spec.reward and spec.signal is not None and batch.behaviour_logp_BT is None:  # the hybrid (opd_grpo): on-policy
        batch.behaviour_logp_BT = token_logprobs(student_logits_BTV.detach(), tokens_BT)
    return registry.compute_loss(spec.name, student_logits_BTV, batch,
                                 loss_options(top_k=topk, beta=jsd_beta, add_sampled_token=True))


@functools.lru_cache(maxsize=64)
def loss_options(**values) -> registry.LossOptions:
    """``registry.LossOptions(**values)``, built once per setting: its values are checked on construction, which
    a training loop need not repeat at every step. The options are shared: do not change them."""
    return registry.LossOptions(**values)


def method_loss(method: str, student: Policy, teacher: Policy, prompts_B: torch.Tensor, tokens_BT: torch.Tensor, *,
                task: Task | None = None, num_tokens: float | None = None, **kwargs) -> tuple[torch.Tensor, dict]:
    """:func:`loss_from_logits` on a batch, as the transformer loop computes it: the student's logits
    with grad, the teacher's logits without (when the loss reads a teacher signal), and the rewards
    ``1[y correct]`` of ``task`` (when it reads rewards)."""
    spec = method_spec(method)
    student_logits_BTV = student.logits(prompts_B, tokens_BT)
    teacher_logits_BTV = rewards_B = None
    if spec.reward:
        rewards_B = task.is_correct(prompts_B, tokens_BT).float()
    if spec.signal is not None:
        with torch.no_grad():
            teacher_logits_BTV = teacher.logits(prompts_B, tokens_BT)
    return loss_from_logits(method, student_logits_BTV, tokens_BT, teacher_logits_BTV, rewards_B=rewards_B,
                            num_tokens=num_tokens, **kwargs)


def trainable_copy(policy: Policy) -> Policy:
    """A deep copy of ``policy`` with every parameter trainable (the student starting at π₀)."""
    student = copy.deepcopy(policy)
    student.requires_grad_(True)
    return student


def make_optimizer(name: str, policy: Policy, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(policy.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(policy.parameters(), lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def random_prompts(prompts: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """n prompts drawn uniformly (with replacement) from ``prompts``, shape (n,)."""
    return torch.tensor(prompts, dtype=torch.long)[torch.randint(len(prompts), (n,), generator=generator)]


# --------------------------------------------------------------------------------------------
# the exact gradient at π₀ (mean and variance of one sample's gradient, by enumeration)
# --------------------------------------------------------------------------------------------


def per_sequence_gradients(method: str, student: Policy, teacher: Policy, prompts_N: torch.Tensor,
                           tokens_NT: torch.Tensor) -> torch.Tensor:
    """``g_n = ∇_θ ℓ(y_n)`` for each sequence, where ℓ(y) is the method's loss on the single sequence y
    (a per-token mean over its T tokens), shape (N, D) over the student's trainable parameters.

    Two passes of autograd: (1) the batch loss with ``num_tokens=T`` is ``Σ_n ℓ(y_n)`` and each
    ℓ(y_n) depends only on its own logits, so its gradient with respect to the logits holds each
    sequence's own ``δ_n = ∂ℓ(y_n)/∂logits_n`` (N, T, V); (2) one batched vector-Jacobian product pulls
    every δ_n back to the parameters, ``g_n = J_nᵀ δ_n`` (``is_grads_batched``).
    """
    N, T = tokens_NT.shape
    params = [p for p in student.parameters() if p.requires_grad]
    logits_NTV = student.logits(prompts_N, tokens_NT)
    with torch.no_grad():
        teacher_logits_NTV = teacher.logits(prompts_N, tokens_NT)
    leaf_NTV = logits_NTV.detach().requires_grad_(True)
    loss, _ = loss_from_logits(method, leaf_NTV, tokens_NT, teacher_logits_NTV, num_tokens=T)
    (delta_NTV,) = torch.autograd.grad(loss, leaf_NTV)
    one_hot_rows_NNTV = torch.eye(N).view(N, N, 1, 1) * delta_NTV.unsqueeze(0)  # batch n: δ_n in row n, 0 elsewhere
    grads = torch.autograd.grad(logits_NTV, params, grad_outputs=one_hot_rows_NNTV, is_grads_batched=True)
    return torch.cat([g.reshape(N, -1) for g in grads], dim=1)


def expected_gradient(method: str, student: Policy, teacher: Policy, prompts: list[int], *,
                      sampler: Policy | None = None) -> dict[str, float]:
    """Mean and variance of one sequence's gradient of a method's loss, exactly::

        g(y) = ∇_θ ℓ(y),      mean = E_{p, y∼sampler(·|p)} g(y),      variance = E ‖g(y) − mean‖²

    The sampler is the student for on-policy methods and the data distribution for SFT. Every
    (prompt, sequence) pair is enumerated with weight ``sampler(y|p)/|prompts|``.
    Returns ``mean_norm`` = ‖mean‖, ``mean_max_abs`` = ‖mean‖_∞ and ``variance`` (float64 sums).
    """
    sampler = student if sampler is None else sampler
    w = student.world
    with torch.no_grad():
        weight_X = all_sequence_logprobs(sampler, prompts).double().exp().reshape(-1) / len(prompts)
    prompts_X, tokens_XT = enumerate_pairs(w, prompts)
    g_XD = per_sequence_gradients(method, student, teacher, prompts_X, tokens_XT).double()
    mean_D = weight_X @ g_XD
    second_moment = float(weight_X @ g_XD.pow(2).sum(1))
    return {"mean_norm": float(mean_D.norm()), "mean_max_abs": float(mean_D.abs().max()),
            "variance": max(second_moment - float(mean_D.pow(2).sum()), 0.0)}


def perturbed_copy(policy: Policy, scale: float, generator: torch.Generator) -> Policy:
    """A trainable copy of ``policy`` with ``scale · N(0, 1)`` added to every parameter."""
    student = trainable_copy(policy)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return student


def gradient_check(setup: Setup, perturbation: float = 0.1, seed: int = 0) -> list[dict]:
    """Exact gradient moments on task A with π₀ as the teacher, for SFT on samples of π₀ and for OPD,
    at π = π₀ and at a perturbed student π₀ + ε (where OPD's mean gradient is a restoring force and
    SFT's equals ∇KL(π₀‖π)/T)."""
    rows = []
    points = {"init": trainable_copy(setup.init),
              "perturbed": perturbed_copy(setup.init, perturbation, torch.Generator().manual_seed(seed))}
    for point, student in points.items():
        for method in ("sft_fresh", "opd_sampled", "opd_full"):
            sampler = setup.init if method == "sft_fresh" else student
            rows.append({"point": point, "method": method,
                         **expected_gradient(method, student, setup.init, setup.task_A.prompts, sampler=sampler)})
    return rows
