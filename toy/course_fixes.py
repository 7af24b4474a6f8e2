"""Fu et al.'s practical fixes: clipping the log-ratio where a style token dominates, and the imbalanced signal.

Per-token clipping of the log-ratio (``clip_log_ratio``) in a world whose first token is a *style* token the
teacher and the student disagree about by ~10 nats (:func:`build_style_world`): without clipping the style
position dominates the expected gradient and the content tokens learn slowly. And the "imbalanced one-token
signal" (``opd/neg_reward_frac``), measured exactly along sampled-token OPD training in the world of
:mod:`toy.course_world`.

``python -m toy course-fixes --out DIR`` prints the tables and writes ``DIR/course_fixes.json`` and
``DIR/course_fixes.png``; ``python -m toy.course`` runs it with the other course experiments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from opd_mini.batch import Batch
from opd_mini.losses import LOGP_FLOOR, token_logprobs
from opd_mini.stats import mean_std
from toy.cli import Job
from toy.course_results import course_commands
from toy.course_world import (Config, CourseWorld, all_logprobs, evaluate, method_batch, optimizer_step,
                              seeds_of, shared_jobs, signal_balance, step_loss, warm_up)
from toy.exact import correct_table, enumerate_pairs
from toy.forgetting_world import make_optimizer, trainable_copy
from toy.policies import Policy, TablePolicy, copy_policy, make_student
from toy.report import fmt, pyplot
from toy.world import Task, World

NAME = "course-fixes"
#: the module that runs the course experiments together (``python -m toy`` finishes them through it)
GROUP = "toy.course"
#: the methods whose training it reads, and the keys of each seed's results its JSON keeps
TRAINED = ("opd_sampled",)
RECORD = ("curves",)


@dataclass
class ContentVerifier:
    """y solves p when its content (positions 1 … T−1) is p's answer, whatever its style token (position 0)."""

    answers_PT: torch.Tensor

    def __call__(self, prompts_B: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        return (tokens_BT[:, 1:] == self.answers_PT[prompts_B.long()][:, 1:]).all(-1)


def build_style_world(cfg: Config, seed: int) -> CourseWorld:
    """A world whose first token is *style* (like a greeting): any value is correct, the verifier reads
    positions 1 … T−1 only. The teacher puts its style mass on token 0 (the others ≈ −style_gap nats) and is
    peaked on the answer elsewhere; π₀ prefers style token 1 (margin ``style_prior``) and knows the answers a
    little (an exact SFT warm-up on a prior with peak 0.75). The student's log-ratio on its favourite style
    token is then ≈ style_gap, ten times its content log-ratios.
    """
    g = torch.Generator().manual_seed(seed + 500)
    world = World(cfg.V, cfg.T, cfg.prompts)
    answers_PT = torch.randint(cfg.V, (cfg.prompts, cfg.T), generator=g)
    pos_S = world.state_positions()
    states = torch.arange(world.num_states)

    def table(peak: float, style_token: int, style_margin: float, noise: float) -> torch.Tensor:
        t = torch.randn(world.P, world.num_states, world.V, generator=g) * noise
        for p in range(cfg.prompts):
            t[p, states, answers_PT[p][pos_S]] += peak
        t[:, 0] = 0.0
        t[:, 0, style_token] = style_margin
        return t

    task = Task("content", list(range(cfg.prompts)), answers_PT, verifier=ContentVerifier(answers_PT))
    teacher = TablePolicy(world, table(cfg.teacher_peak, 0, cfg.style_gap, cfg.teacher_noise))
    teacher.requires_grad_(False)
    prior = TablePolicy(world, table(0.75, 1, cfg.style_prior, cfg.teacher_noise))
    student = warm_up(make_student(world, "mlp", g, hidden=cfg.hidden, context=cfg.T - 1), prior, cfg)
    return CourseWorld(world, task, teacher, copy_policy(student), correct_table(task, world))


@torch.no_grad()
def style_stats(student: Policy, cw: CourseWorld) -> dict:
    """Exact content success, the style position's reverse KL (nats) and the student's mass on the
    teacher's style token."""
    logits_PV = student.state_logits()[:, 0] if isinstance(student, TablePolicy) else student.logits(
        torch.arange(cw.world.P), torch.zeros(cw.world.P, cw.world.T, dtype=torch.long))[:, 0]
    logp_PV = torch.log_softmax(logits_PV, -1)
    logq_PV = torch.log_softmax(cw.teacher.table_PSV[:, 0], -1)
    return {"success": evaluate(student, cw)["success"],
            "style_kl": float((logp_PV.exp() * (logp_PV - logq_PV)).sum(-1).mean()),
            "style_mass": float(logp_PV[:, 0].exp().mean())}


def expected_gradient_share(student: Policy, cw: CourseWorld, clip_log_ratio: float = 0.0) -> dict:
    """How much of the expected sampled-token OPD gradient comes from the style position, exactly.

    For every (prompt, sequence) pair the loss of that one sequence is split by position, ``ℓ = Σ_t ℓ_t``;
    the expected gradient of each part is ``g_t = Σ_{p,y} w(p,y) ∇_θ ℓ_t(y)`` with w = π(y|p)/P. Returns
    ‖g_0‖ (style), ‖Σ_{t≥1} g_t‖ (content) and the style share ‖g_0‖² / (‖g_0‖² + ‖g_content‖²).
    """
    prompts_X, tokens_XT = enumerate_pairs(cw.world, cw.task.prompts)
    with torch.no_grad():
        logp_PN = all_logprobs(student, cw.world, student.state_table())
        w_X = logp_PN[cw.task.prompts].reshape(-1).exp() / len(cw.task.prompts)
    params = [p for p in student.parameters() if p.requires_grad]
    logits = student.logits(prompts_X, tokens_XT)
    with torch.no_grad():
        teacher_logits = cw.teacher.logits(prompts_X, tokens_XT)
    T = cw.world.T
    grads = {}
    for name, mask_T in (("style", torch.arange(T) == 0), ("content", torch.arange(T) > 0)):
        mask_XT = mask_T.expand(len(prompts_X), T)
        batch = Batch.from_teacher_logits(tokens_XT, teacher_logits, signal="sampled", mask_BT=mask_XT, num_tokens=1.0)
        logp_XT = token_logprobs(logits, tokens_XT)
        gs = torch.autograd.grad(weighted_sampled_token_loss(logp_XT, batch.teacher_logp_BT, mask_XT, w_X,
                                                             clip_log_ratio), params, retain_graph=True)
        grads[name] = torch.cat([g.reshape(-1) for g in gs])
    s, c = grads["style"].norm(), grads["content"].norm()
    return {"style_norm": float(s), "content_norm": float(c), "style_share": float(s ** 2 / (s ** 2 + c ** 2))}


def weighted_sampled_token_loss(logp_XT: torch.Tensor, teacher_logp_XT: torch.Tensor, mask_XT: torch.Tensor,
                                w_X: torch.Tensor, clip_log_ratio: float = 0.0) -> torch.Tensor:
    """``Σ_x w_x ℓ(x)`` with ℓ(x) = −Σ_t ρ_t A_t the sampled-token loss of row x (γ = 0, on-policy, summed
    over its masked positions): ``A_t = −clip(r_t)`` is a constant and ρ_t = 1 in value, so weighting
    row x by w_x weights its gradient. With w = 1 it equals ``losses.reverse_kl_sampled_token`` with
    ``num_tokens=1`` (the tests check this); with w_x = π(y|p)/P its gradient is the exact expected one."""
    log_ratio = torch.where(mask_XT, logp_XT.detach() - teacher_logp_XT.clamp(min=LOGP_FLOOR), torch.zeros(()))
    if clip_log_ratio:
        log_ratio = log_ratio.clamp(-clip_log_ratio, clip_log_ratio)
    ratio_XT = torch.exp(logp_XT - logp_XT.detach())
    return (w_X.unsqueeze(1) * ratio_XT * log_ratio * mask_XT).sum()


def style_init(cw: CourseWorld) -> dict:
    """π₀'s style statistics and the exact balance of its one-token signal in the style world."""
    return {**style_stats(cw.init, cw), **signal_balance(cw.init, cw.teacher, cw.world, cw.task.prompts)}


def clipping_run(cfg: Config, cw: CourseWorld, seed: int, clip: float) -> list[dict]:
    """Sampled-token OPD in the style world with ``clip_log_ratio=clip`` (0 = off): exact content success and
    style KL every 5 steps, the style share of the expected gradient every 20."""
    student = trainable_copy(cw.init)
    opt = make_optimizer("adam", student, cfg.lr)
    gen = torch.Generator().manual_seed(seed * 1000 + 11)
    rows = []
    for step in range(cfg.clip_steps + 1):
        if step % 5 == 0 or step == cfg.clip_steps:
            row = {"step": step, **style_stats(student, cw)}
            if step % 20 == 0:
                row.update(expected_gradient_share(student, cw, clip_log_ratio=clip))
            rows.append(row)
        if step == cfg.clip_steps:
            break
        prompts_B, tokens_BT = method_batch("opd_sampled", student, cw.teacher, cw.task, cfg.batch, cfg.group_size, gen)
        loss, _ = step_loss("opd_sampled", student, cw.teacher, cw.task, prompts_B, tokens_BT, clip_log_ratio=clip)
        optimizer_step(opt, student, loss, cfg.max_grad_norm)
    return rows


def run_clipping(cfg: Config, seed: int) -> dict:
    """Sampled-token OPD in the style world at each ``clip_values`` (0 = off): exact content success,
    style KL and the style share of the expected gradient along training."""
    cw = build_style_world(cfg, seed)
    return {"seed": seed, "init": style_init(cw), "runs": {str(c): clipping_run(cfg, cw, seed, c)
                                                          for c in cfg.clip_values}}


# --------------------------------------------------------------------------------------------
# the experiment's contract with toy.course_world.finish
# --------------------------------------------------------------------------------------------


def style_key(seed: int) -> str:
    return f"course/style/seed={seed}"


def clip_key(seed: int, clip: float) -> str:
    return f"course/clip/seed={seed}/c={clip}"


def jobs(cfg: Config) -> list[Job]:
    """Each seed's course world and sampled-token OPD trained in it (the signal's balance along training), its
    style world, and one job per clip value."""
    out = shared_jobs(cfg, TRAINED)
    for s in seeds_of(cfg):
        out.append(Job(style_key(s), style_job, (cfg, s), cost=cfg.warmup_steps / 280))
        out += [Job(clip_key(s, c), clip_job, (cfg, s, c), (style_key(s),), cfg.clip_steps / 280)
                for c in cfg.clip_values]
    return out


def style_job(cfg: Config, seed: int) -> dict:
    cw = build_style_world(cfg, seed)
    return {"world": cw, "init": style_init(cw)}


def clip_job(style: dict, cfg: Config, seed: int, clip: float) -> list[dict]:
    return clipping_run(cfg, style["world"], seed, clip)


def add_results(cfg: Config, seeds: list[dict], results: dict) -> dict:
    """The clipping runs of every seed (``clipping_runs``)."""
    return {"clipping_runs": [{"seed": s, "init": results[style_key(s)]["init"],
                               "runs": {str(c): results[clip_key(s, c)] for c in cfg.clip_values}}
                              for s in seeds_of(cfg)]}


def summarise(cfg: Config, seeds: list[dict], results: dict) -> dict:
    """The exact signal balance along opd_sampled training, and the clipping runs (mean ± std over seeds)."""
    clips = add_results(cfg, seeds, results)["clipping_runs"]
    n_rows = len(seeds[0]["curves"]["opd_sampled"])
    neg = {"steps": [row["step"] for row in seeds[0]["curves"]["opd_sampled"]]}
    for key in ("neg_reward_frac", "mean_reward", "neg_part", "pos_part"):
        cols = [mean_std(r["curves"]["opd_sampled"][i][key] for r in seeds) for i in range(n_rows)]
        neg[key] = [m for m, _ in cols]
        neg[key + "_std"] = [s for _, s in cols]
    clip = {}
    for c in cfg.clip_values:
        runs = [x["runs"][str(c)] for x in clips]
        steps = [row["step"] for row in runs[0]]
        clip[str(c)] = {
            "steps": steps,
            "success_mean": [mean_std(col)[0] for col in zip(*[[row["success"] for row in r] for r in runs])],
            "success_std": [mean_std(col)[1] for col in zip(*[[row["success"] for row in r] for r in runs])],
            "style_kl_mean": [mean_std(col)[0] for col in zip(*[[row["style_kl"] for row in r] for r in runs])],
            "final_success": mean_std(r[-1]["success"] for r in runs),
            "final_style_kl": mean_std(r[-1]["style_kl"] for r in runs),
            "steps_to_content_target": [next((row["step"] for row in r if row["success"] >= cfg.content_target), None)
                                        for r in runs],
            "style_share_at_init": mean_std(r[0]["style_share"] for r in runs)}
    clip_init = {k: mean_std(x["init"][k] for x in clips) for k in clips[0]["init"]}
    return {"neg_reward": neg, "clipping": clip, "clipping_init": clip_init}


def print_report(cfg: Config, summary: dict) -> None:
    print(f"\nClipping the log-ratio — style world, sampled-token OPD, {cfg.clip_steps} steps; π₀'s style KL "
          f"{fmt(summary['clipping_init']['style_kl'], 2)} nats")
    for c, r in summary["clipping"].items():
        print(f"clip {c:>4s}: final content success {fmt(r['final_success'])}, style KL {fmt(r['final_style_kl'], 3)}, "
              f"steps to {cfg.content_target} {r['steps_to_content_target']}, style share of the expected "
              f"gradient at π₀ {fmt(r['style_share_at_init'], 2)}")
    neg = summary["neg_reward"]
    pair = {k: ((neg[k][0], neg[k + "_std"][0]), (neg[k][-1], neg[k + "_std"][-1])) for k in ("neg_reward_frac", "mean_reward")}
    print(f"\nImbalanced one-token signal (opd_sampled, exact): neg_reward_frac {fmt(pair['neg_reward_frac'][0])} at π₀, "
          f"{fmt(pair['neg_reward_frac'][1])} after {neg['steps'][-1]} steps; mean reward {fmt(pair['mean_reward'][0])} → "
          f"{fmt(pair['mean_reward'][1])} nats/token")


def figures(cfg: Config, summary: dict, seeds: list[dict], out: str):
    path = os.path.join(out, "course_fixes.png")
    yield path, plot_fixes(cfg, summary, path)


def plot_fixes(cfg: Config, summary: dict, path: str | None = None):
    """Clipping in the style world, and the exact neg_reward_frac along OPD training."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (c, r) in enumerate(summary["clipping"].items()):
        color = "C3" if float(c) == 0 else cmap(i / len(summary["clipping"]))
        label = "no clipping" if float(c) == 0 else f"clip_log_ratio = {float(c):g}"
        axes[0].plot(r["steps"], r["success_mean"], color=color, label=label)
        axes[1].plot(r["steps"], r["style_kl_mean"], color=color, label=label)
    axes[0].set(xlabel="step", ylabel="exact content success", title="the tokens that matter")
    axes[1].set(xlabel="step", ylabel="reverse KL at the style position (nats)", yscale="log",
                title="the style token")
    axes[0].legend(fontsize=7)
    neg = summary["neg_reward"]
    ax = axes[2]
    steps = neg["steps"]
    ax.plot(steps, neg["neg_reward_frac"], "o-", color="C2", label="neg_reward_frac (exact)")
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(xlabel="step (opd_sampled, course world)", ylabel="fraction of tokens with reward −r_t < 0",
           title="the imbalanced one-token signal")
    ax2 = ax.twinx()
    ax2.plot(steps, neg["mean_reward"], "s--", color="C7", label="mean reward = −KL/token")
    ax2.set_ylabel("mean reward (nats/token)")
    ax.fill_between(steps, [m - e for m, e in zip(neg["neg_reward_frac"], neg["neg_reward_frac_std"])],
                    [m + e for m, e in zip(neg["neg_reward_frac"], neg["neg_reward_frac_std"])], color="C2", alpha=0.15, lw=0)
    lines = ax.get_lines()[:1] + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


#: ``run(cfg, out)`` (this experiment alone: ``out/course_fixes.json`` and its figure), ``finish``, and the command
#: line of toy/__main__.py: ``add_arguments(parser)``, ``config_from_args(args)``, ``main(args) -> dict``
run, finish, add_arguments, config_from_args, main = course_commands(__name__)
