"""Bias and variance of OPD gradient estimators against the exact sequence-level reverse-KL gradient.

Reproduces Fu et al. 2026 ("Revisiting On-Policy Distillation", §3.1, App. B-C) in the exact
tabular world of :mod:`toy.world`. With the per-token log-ratio on a student sample
``r_t = log π(y_t|c_t) − log q(y_t|c_t)`` and the discounted return-to-go
``G_t^γ = Σ_{t'≥t} γ^(t'−t) r_t'``, the single-sequence estimator is::

    g^γ(y) = Σ_t G_t^γ ∇_θ log π(y_t | c_t),          y ∼ π(·|p)

γ = 1 is unbiased for ``∇_θ KL(π(y_1:T) ‖ q(y_1:T))``; γ = 0 is token-level OPD.

How g is computed: from :func:`opd_mini.losses.reverse_kl_sampled_token`, fed exactly as the
transformer loop feeds it (student log-probs from ``losses.token_logprobs(student.logits(...))``,
teacher log-probs, an all-ones mask). That loss is a per-token mean, so its gradient on one sequence
is ``g / T``; we multiply by T, so every number here is on the *sequence* scale (E g^1 = ∇ KL_seq).
For a batch of B sequences, ``T · ∇loss_batch = (1/B) Σ_b g(y_b)``, whose variance is the
single-sequence variance / B.

The student is a :class:`toy.world.TablePolicy` (θ = the logit table), so the per-sequence gradient
with respect to θ is the gradient of the loss with respect to the logits of each position,
scattered into that position's prefix state. Each position of a sequence is a different state, so
``‖g(y)‖² = Σ_t ‖∂/∂logits_t‖²`` and no per-sample Jacobian is needed. Then, exactly by enumeration
(weight π(y|p)/P on each (prompt, sequence)) or by Monte Carlo when V^T is too large::

    bias_norm      = ‖E g − ∇ KL_seq‖          (∇ KL_seq by autograd through the exact DP value)
    variance       = E ‖g − E g‖²              (total variance, trace of the covariance, one sequence)
    exact_grad_norm = ‖∇ KL_seq‖

Besides the γ family, three distribution-level losses are measured on the same scale:
``reverse_kl_full`` (per-token reverse KL over the whole vocabulary on the sampled prefixes — the
Rao-Blackwellised γ = 0: same mean, lower variance), ``reverse_kl_topk`` (teacher top-K support, renormalised)
and ``reverse_kl_topk_tail`` (the same support plus one bucket for the mass outside it).

Training: the student is trained with each γ from the same initial table (same optimizer, learning
rate, steps, batch; seeds change the samples only) at each learning rate in ``Config.lrs``, and the
exact sequence KL is recorded along the way (training records carry an extra "lr" key).

``python -m toy bias-variance --out DIR`` prints the table and the wall time, saves
``DIR/bias_variance.png`` and writes ``DIR/bias_variance.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from opd_mini import losses, registry
from opd_mini.batch import Batch
from toy import report
from toy.cli import Job, Timing, check, experiment_commands, run_experiment, torch_threads
from toy.exact import sequence_kl
from toy.policies import TablePolicy, sample
from toy.world import ENUM_BATCH, World, can_enumerate

NAME = "bias-variance"
ESTIMATORS = ("sampled_token", "full", "topk", "topk_tail")
#: The most logits one table (teacher or student: one vector per prompt and prefix) may hold: 5e7 (200 MB).
MAX_TABLE = 50_000_000
#: The estimators' names → the registered losses that compute them; any other registered loss name is
#: measured as it is (``Config.extra_losses``), on the same sequence scale.
ESTIMATOR_LOSSES = {"sampled_token": "reverse_kl_sampled", "full": "reverse_kl_full", "topk": "reverse_kl_topk",
                    "topk_tail": "reverse_kl_topk_tail"}


@dataclass
class Config:
    """Settings of the bias/variance reproduction (every field is a command-line option)."""

    V: int = 4
    """vocabulary size"""
    Ts: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10)
    """horizons T at which the estimators are measured"""
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """discounts γ of the return-to-go estimator"""
    P: int = 1
    """number of prompts (uniform prompt distribution)"""
    teacher_scale: float = 1.0
    """teacher logits are i.i.d. N(0, teacher_scale²) at every prefix"""
    student_scale: float = 1.0
    """initial student logits are i.i.d. N(0, student_scale²), independent of the teacher"""
    topk: int = 2
    """K of the teacher top-K estimators (reverse_kl_topk, renormalised; reverse_kl_topk_tail, with a tail bucket)"""
    seed: int = 0
    """seed of the teacher and the initial student"""
    enum_limit: int = 300_000
    """enumerate exactly when P · V^T is at most this; otherwise Monte Carlo (V=4: T ≤ 9 exact)"""
    mc_samples: int = 50_000
    """sequences per Monte Carlo estimate (only for T beyond enum_limit)"""
    batch_size: int = 16
    """sequences per training step"""
    train_T: int = 6
    """horizon of the training runs"""
    train_steps: int = 300
    """optimizer steps per training run"""
    lrs: tuple[float, ...] = (1.0, 30.0)
    """learning rates; every γ is trained at each of them (a small step, where bias matters most, and a
    large one, where variance does)"""
    optimizer: str = "sgd"
    """'sgd' (plain SGD on the per-token-mean loss) or 'adam'"""
    train_seeds: int = 3
    """sampling seeds per γ"""
    eval_every: int = 10
    """steps between exact-KL evaluations"""
    threads: int = 1
    """torch CPU threads while running: the tensors are tiny, and on a shared 2-core machine one thread
    was 3-30× faster than two (thread start-up and contention dominate)"""
    extra_losses: tuple[str, ...] = ()
    """registered losses (opd_mini.registry, e.g. your own) measured next to full and top-K"""
    fast: bool = False
    """small settings for tests (overrides the sizes above)"""

    def apply_fast(self) -> "Config":
        if self.fast:
            self.V, self.Ts, self.enum_limit, self.mc_samples = 3, (1, 2, 3, 4), 2_000_000, 4_000
            self.train_T, self.train_steps, self.train_seeds, self.eval_every = 3, 40, 2, 10
        return self

    def validate(self) -> "Config":
        """A ValueError naming the option and what is allowed, for any setting out of range."""
        check(self.V >= 2 and self.P >= 1, f"--V must be >= 2 and --P >= 1, got V={self.V}, P={self.P}")
        check(bool(self.Ts) and all(T >= 1 for T in self.Ts), f"--Ts must be horizons >= 1, got {self.Ts}")
        check(bool(self.gammas) and all(0 <= g <= 1 for g in self.gammas),
              f"--gammas must lie in [0, 1], got {self.gammas}")
        check(2 <= self.topk <= self.V, f"--topk must lie in [2, V={self.V}], got {self.topk}")
        check(self.teacher_scale >= 0 and self.student_scale >= 0, "--teacher-scale and --student-scale must be >= 0")
        check(bool(self.lrs) and all(lr > 0 for lr in self.lrs), f"--lrs must be > 0, got {self.lrs}")
        check(self.optimizer in ("sgd", "adam"), f"--optimizer must be sgd or adam, got {self.optimizer!r}")
        for what, T in [*(("--Ts", T) for T in self.Ts), *([("--train-T", self.train_T)] if self.train_steps else [])]:
            size = self.P * World(self.V, T).num_states * self.V  # the teacher's and the student's logit tables
            check(size <= MAX_TABLE, f"{what} {T} with V={self.V}, P={self.P} needs tables of {size:.2e} logits each "
                  f"(over {MAX_TABLE:.0e}, {4 * size / 1e9:.1f} GB): lower {what}, --V or --P"
                  + (", or --train-steps 0 to measure the estimators only" if what == "--train-T" else ""))
        check(min(self.batch_size, self.train_T, self.train_seeds, self.eval_every, self.threads) >= 1
              and self.train_steps >= 0 and self.mc_samples >= 2 and self.enum_limit >= 1,
              "--batch-size, --train-T, --train-seeds, --eval-every, --threads must be >= 1, --train-steps >= 0, "
              "--mc-samples >= 2")
        for name in self.extra_losses:
            spec = registry.LOSS_REGISTRY.get(name)
            check(spec is not None and spec.signal is not None and not spec.reward and spec.rollouts == "student",
                  f"--extra-losses: {name!r} is not a registered on-policy distillation loss; registered: "
                  f"{', '.join(registry.LOSS_REGISTRY)}")
        return self


# --------------------------------------------------------------------------------------------
# per-sequence gradients of the estimators
# --------------------------------------------------------------------------------------------


def per_sequence_gradients(student: TablePolicy, teacher: TablePolicy, prompts_N: torch.Tensor, tokens_NT: torch.Tensor,
                           estimator: str = "sampled_token", gamma: float | None = 0.0, topk: int = 2) -> torch.Tensor:
    """Sequence-scale gradient of an estimator for each sequence, with respect to the student's logits
    at each position: ``g_NTV[n, t] = T · ∂ loss(y_n) / ∂ logits(p_n, c_t(y_n))``, shape (N, T, V).

    The loss is a registered one of ``opd_mini.registry`` (``estimator``: ``sampled_token`` with ``gamma``,
    ``full``, ``topk`` or ``topk_tail`` without the sampled token, or any registered name) evaluated on the batch with
    ``num_tokens=T``, so the batch
    loss is the *sum* of the one-sequence losses and the gradient of each sequence's logits is that
    sequence's own. For a table student, ``g_NTV[n, t]`` is the gradient with respect to
    ``table_PSV[p_n, s_t(y_n)]``.
    """
    name = ESTIMATOR_LOSSES.get(estimator, estimator)
    if name not in registry.LOSS_REGISTRY:
        raise ValueError(f"estimator must be one of {ESTIMATORS} or a registered loss "
                         f"({', '.join(registry.LOSS_REGISTRY)}), got {estimator!r}")
    T = tokens_NT.shape[1]
    logits_NTV = student.logits(prompts_N, tokens_NT).detach().requires_grad_(True)
    with torch.no_grad():
        teacher_logits_NTV = teacher.logits(prompts_N, tokens_NT).float()
    batch = Batch.from_teacher_logits(tokens_NT, teacher_logits_NTV, signal=registry.get_loss(name).signal,
                                                   top_k=topk, num_tokens=T)
    opts = registry.LossOptions(gamma=0.0 if gamma is None else gamma, top_k=topk, add_sampled_token=False)
    loss, _ = registry.compute_loss(name, logits_NTV, batch, opts)
    (grad_NTV,) = torch.autograd.grad(loss, logits_NTV)
    return grad_NTV * T


def exact_gradient(student: TablePolicy, teacher: TablePolicy) -> torch.Tensor:
    """∇_θ KL(π(y_1:T) ‖ q(y_1:T)) (averaged over prompts) by autograd through the exact DP value, (P, S, V)."""
    kl = sequence_kl(student, teacher, method="dp")
    (grad,) = torch.autograd.grad(kl, student.table_PSV)
    return grad


def estimator_moments(student: TablePolicy, teacher: TablePolicy, specs: list[tuple[str, float]], *, topk: int = 2,
                      method: str = "exact", num_samples: int = 50_000, generator: torch.Generator | None = None,
                      batch_size: int = ENUM_BATCH, progress: bool = False) -> dict[tuple[str, float], dict]:
    """Mean and total variance of each estimator ``(name, gamma)`` in ``specs``.

    ``method="exact"``: enumerate every (prompt, sequence), weight π(y|p)/P. ``method="mc"``: draw
    ``num_samples`` sequences from the student, weight 1/M; the variance is then the unbiased
    sample estimate and the mean carries noise of variance ``variance / M``.

    Returns ``{spec: {"mean_PSV": (P, S, V) float64, "variance": float, "num": int}}``.
    """
    w = student.world
    sums = {spec: torch.zeros(w.P, w.num_states, w.V, dtype=torch.float64) for spec in specs}
    sq = {spec: 0.0 for spec in specs}

    def chunks():
        if method == "exact":
            for p in range(w.P):
                for _, tok in w.iter_sequences(batch_size):
                    prompts_N = torch.full((len(tok),), p, dtype=torch.long)
                    with torch.no_grad():
                        logp_N = losses.token_logprobs(student.logits(prompts_N, tok), tok).sum(-1)
                    yield prompts_N, tok, logp_N.double().exp() / w.P
        elif method == "mc":
            done = 0
            while done < num_samples:
                n = min(batch_size, num_samples - done)
                prompts_N = torch.randint(w.P, (n,), generator=generator)
                yield prompts_N, sample(student, prompts_N, generator), torch.full((n,), 1.0 / num_samples, dtype=torch.float64)
                done += n
        else:
            raise ValueError(f"method must be 'exact' or 'mc', got {method!r}")

    total = w.P * w.num_sequences if method == "exact" else num_samples
    bar = tqdm(total=total, desc=f"moments T={w.T} ({method})", disable=not progress, leave=False, unit="seq")
    for prompts_N, tok, weight_N in chunks():
        states_NT = w.state_index(tok)
        p_NT = prompts_N.unsqueeze(1).expand_as(states_NT)
        for spec in specs:
            g_NTV = per_sequence_gradients(student, teacher, prompts_N, tok, spec[0], spec[1], topk).double()
            sums[spec].index_put_((p_NT, states_NT), weight_N[:, None, None] * g_NTV, accumulate=True)
            sq[spec] += float((weight_N * g_NTV.pow(2).sum((1, 2))).sum())  # positions are distinct states
        bar.update(len(tok))
    bar.close()

    out = {}
    for spec in specs:
        mean = sums[spec]
        var = sq[spec] - float(mean.pow(2).sum())
        if method == "mc":
            var *= num_samples / (num_samples - 1)
        out[spec] = {"mean_PSV": mean, "variance": max(var, 0.0), "num": total}
    return out


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------


def _nested_table(world: World, scale: float, seed: int) -> TablePolicy:
    """A table with i.i.d. ``N(0, scale²)`` logits drawn level by level: the logits of all prefixes of
    length t come from a generator seeded by ``(seed, t)`` alone, so the world at horizon T is exactly
    the first T steps of the world at any larger horizon, whatever horizons a run asks for."""
    blocks = []
    for t in range(world.T):
        g = torch.Generator().manual_seed(seed * 1_000 + t)
        blocks.append(torch.randn(world.P, world.V ** t, world.V, generator=g) * scale)
    return TablePolicy(world, torch.cat(blocks, dim=1))  # states are numbered by prefix length


def make_pair(cfg: Config, T: int) -> tuple[TablePolicy, TablePolicy]:
    """Teacher and initial student of horizon T, independent random tables (teacher logits
    ``N(0, teacher_scale²)``, student ``N(0, student_scale²)``), nested across horizons (see
    :func:`_nested_table`)."""
    w = World(cfg.V, T, cfg.P)
    return _nested_table(w, cfg.teacher_scale, 2 * cfg.seed), _nested_table(w, cfg.student_scale, 2 * cfg.seed + 1)


def horizon_rows(cfg: Config, T: int) -> tuple[list[dict], list[dict]]:
    """The rows of horizon T: one per γ ("estimators") and one per distribution-level loss ("other")."""
    specs = [("sampled_token", g) for g in cfg.gammas] + [(name, None) for name in ("full", "topk", "topk_tail",
                                                                                     *cfg.extra_losses)]
    threads = torch_threads(cfg.threads)
    try:
        teacher, student = make_pair(cfg, T)
        teacher.requires_grad_(False)
        grad = exact_gradient(student, teacher).double()
        method = "exact" if can_enumerate(student.world, limit=cfg.enum_limit) else "mc"
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + T)
        moments = estimator_moments(student, teacher, specs, topk=cfg.topk, method=method,
                                    num_samples=cfg.mc_samples, generator=gen)
    finally:
        torch_threads(threads)
    rows, other = [], []
    for (name, gamma), m in moments.items():
        err2 = float((m["mean_PSV"] - grad).pow(2).sum())
        if method == "mc":  # remove the mean's own sampling noise E‖ḡ − E g‖² = variance / M
            err2 = max(err2 - m["variance"] / m["num"], 0.0)
        row = {"T": T, "bias_norm": math.sqrt(err2), "variance": m["variance"],
               "exact_grad_norm": float(grad.norm()), "method": method}
        if name == "sampled_token":
            rows.append({"gamma": gamma, **row})
        else:
            label = {"topk": f"top{cfg.topk}", "topk_tail": f"top{cfg.topk}_tail"}.get(name, name)
            other.append({"estimator": label, **row})
    return rows, other


def measure_estimators(cfg: Config, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows for the γ family ("estimators") and for the distribution-level losses ("other_estimators"),
    every horizon of ``cfg.Ts`` in turn (:func:`horizon_rows`)."""
    rows, other = [], []
    for T in tqdm(cfg.Ts, desc="horizons", disable=not progress):
        r, o = horizon_rows(cfg, T)
        rows += r
        other += o
    return rows, other


def train_runs(cfg: Config, lr: float, gamma: float) -> list[dict]:
    """Train copies of the initial student with one γ at one learning rate, one run per sampling seed, and
    record the exact sequence KL(π‖q) every ``eval_every`` steps."""
    teacher, student0 = make_pair(cfg, cfg.train_T)
    w = student0.world
    mask_BT = torch.ones(cfg.batch_size, w.T, dtype=torch.bool)
    opts = registry.LossOptions(gamma=gamma)
    with torch.no_grad():  # log q(v|s) at every state: the teacher's log-prob of any sampled token is a lookup
        teacher_logp_PSV = teacher.table_PSV - torch.logsumexp(teacher.table_PSV, -1, keepdim=True)
    records = []
    threads = torch_threads(cfg.threads)
    try:
        for seed in range(cfg.train_seeds):
            student = TablePolicy(w, student0.table_PSV.data)
            opt = (torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam)(student.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(10_000 + seed)
            for step in range(cfg.train_steps + 1):
                if step % cfg.eval_every == 0 or step == cfg.train_steps:
                    with torch.no_grad():
                        kl = float(sequence_kl(student, teacher, method="dp"))
                    records.append({"gamma": gamma, "seed": seed, "step": step, "exact_kl": kl, "lr": lr})
                if step == cfg.train_steps:
                    break
                prompts_B = torch.randint(w.P, (cfg.batch_size,), generator=gen)
                tokens_BT = sample(student, prompts_B, gen)
                states_BT = w.state_index(tokens_BT)
                prompts_B1 = prompts_B.unsqueeze(1)
                batch = Batch(tokens_BT=tokens_BT, mask_BT=mask_BT,
                              teacher_logp_BT=teacher_logp_PSV[prompts_B1, states_BT, tokens_BT])
                loss, _ = registry.compute_loss("reverse_kl_sampled", student.table_PSV[prompts_B1, states_BT], batch,
                                                opts)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch_threads(threads)
    return records


def train_curves(cfg: Config, progress: bool = True) -> list[dict]:
    """Train a copy of the initial student with each γ at each learning rate (:func:`train_runs`) and record
    the exact sequence KL(π‖q)."""
    runs = [(lr, g) for lr in cfg.lrs for g in cfg.gammas]
    return [r for lr, g in tqdm(runs, desc=f"training T={cfg.train_T}", disable=not progress)
            for r in train_runs(cfg, lr, g)]


def jobs(cfg: Config) -> list[Job]:
    """One job per horizon and one per (learning rate, γ) training (its seeds)."""
    return ([Job(f"bias-variance/T={T}", horizon_rows, (cfg, T), cost=2e-5 * min(cfg.P * cfg.V ** T, cfg.mc_samples))
             for T in cfg.Ts]
            + [Job(f"bias-variance/train/lr={lr}/gamma={g}", train_runs, (cfg, lr, g),
                   cost=cfg.train_seeds * cfg.train_steps * cfg.train_T / 4000) for lr in cfg.lrs for g in cfg.gammas
               if cfg.train_steps > 0])  # --train-steps 0: the estimators only


def finish(cfg: Config, results: dict, out: str, timing: Timing) -> dict:
    """Print the tables, save ``out/bias_variance.png`` and write ``out/bias_variance.json`` from the results
    of :func:`jobs` (``timing``: how they ran)."""
    os.makedirs(out, exist_ok=True)
    wall = timing.wall(NAME)
    rows = [r for T in cfg.Ts for r in results[f"bias-variance/T={T}"][0]]
    other = [r for T in cfg.Ts for r in results[f"bias-variance/T={T}"][1]]
    records = [r for lr in cfg.lrs for g in cfg.gammas for r in results.get(f"bias-variance/train/lr={lr}/gamma={g}", [])]
    report.print_bias_variance(rows, other, cfg)
    if records:
        report.print_training(records, cfg)
    fig_path = os.path.join(out, "bias_variance.png")
    report.plot_bias_variance(rows, records, cfg, fig_path)
    config = {**asdict(cfg), "Ts": list(cfg.Ts), "gammas": list(cfg.gammas), "lrs": list(cfg.lrs),
              "extra_losses": list(cfg.extra_losses),
              "gradient_scale": "sequence: T × gradient of the per-token-mean loss on one sequence (E g = ∇KL_seq at γ=1)",
              "variance_per": "single sequence; a batch of B sequences has variance / B",
              "mc_bias_note": "for method 'mc' the bias norm is sqrt(max(‖ḡ − ∇KL‖² − variance/M, 0))",
              "student": "TablePolicy", "wall_time_s": wall}
    result = {"estimators": rows, "training": records, "config": config}
    with open(os.path.join(out, "bias_variance.json"), "w") as f:
        json.dump({**result, "other_estimators": other}, f, indent=1)
    print(f"\nwrote {os.path.join(out, 'bias_variance.json')} and {fig_path}; wall time {wall:.1f} s")
    return {**result, "other_estimators": other, "figures": [fig_path]}


def run(cfg: Config, out: str, progress: bool = True, workers: int | None = None) -> dict:
    """Run the whole reproduction (its jobs in ``workers`` processes, default one per core), write
    ``out/bias_variance.json`` and ``out/bias_variance.png``."""
    return run_experiment(sys.modules[__name__], cfg, out, progress, workers)


# --------------------------------------------------------------------------------------------
# command line (the contract of toy/__main__.py)
# --------------------------------------------------------------------------------------------


#: ``add_arguments(parser)``, ``config_from_args(args)`` and ``main(args) -> dict``, the contract of toy/__main__.py
add_arguments, config_from_args, main = experiment_commands(Config, run)
