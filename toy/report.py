"""The toy experiments' printed tables and figures, apart from the experiments' maths.

Every function takes the rows an experiment computed (and its config) and summarises, prints or draws them;
none computes a result of its own beyond the means, correlations and fractions its tables show.
"""

from __future__ import annotations

import math
import sys

import torch

from opd_mini.stats import mean, pearson, spearman


def fmt(ms, digits=3) -> str:
    """``"m ± s"`` of a (mean, std) pair; ``"—"`` when there is none."""
    m, s = ms
    return "—" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def pyplot():
    """matplotlib's pyplot, on the Agg backend unless pyplot was imported already (a notebook's)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# bias and variance (toy/bias_variance.py)
# --------------------------------------------------------------------------------------------


def print_bias_variance(rows: list[dict], other: list[dict], cfg) -> None:
    """The table of ``python -m toy bias-variance``: bias and variance of each estimator at each horizon."""
    gammas, Ts = list(cfg.gammas), list(cfg.Ts)
    by = {(r["gamma"], r["T"]): r for r in rows}
    print(f"\nBias and variance vs the exact ∇KL(π(y_1:T)‖q(y_1:T)) — V={cfg.V}, P={cfg.P}, sequence scale; "
          f"variance per single sequence (divide by B for a batch of B)")
    head = f"{'T':>3} {'method':>6} {'‖∇KL‖':>9} | " + " ".join(f"{'bias γ=' + str(g):>11}" for g in gammas) + " | " + \
        " ".join(f"{'var γ=' + str(g):>10}" for g in gammas) + f" | {'var1/var0':>9}"
    print(head)
    print("-" * len(head))
    for T in Ts:
        r0, r1 = by[(gammas[0], T)], by[(gammas[-1], T)]
        ratio = r1["variance"] / r0["variance"] if r0["variance"] > 0 else float("nan")
        print(f"{T:>3} {r0['method']:>6} {r0['exact_grad_norm']:>9.4f} | "
              + " ".join(f"{by[(g, T)]['bias_norm']:>11.3e}" for g in gammas) + " | "
              + " ".join(f"{by[(g, T)]['variance']:>10.3e}" for g in gammas) + f" | {ratio:>9.2f}")
    print(f"\nDistribution-level losses on the same sequence scale (teacher top-K with K={cfg.topk}):")
    print(f"{'T':>3} {'estimator':>10} {'bias':>11} {'variance':>11}")
    for r in other:
        print(f"{r['T']:>3} {r['estimator']:>10} {r['bias_norm']:>11.3e} {r['variance']:>11.3e}")


def print_training(records: list[dict], cfg) -> None:
    """The training runs of ``python -m toy bias-variance``: exact KL over steps, mean and range over seeds."""
    for lr in cfg.lrs:
        recs = [r for r in records if r["lr"] == lr]
        print(f"\nTraining (T={cfg.train_T}, {cfg.optimizer}, lr={lr}, batch {cfg.batch_size}, {cfg.train_steps} steps, "
              f"{cfg.train_seeds} seeds): exact KL(π‖q), mean over seeds [min, max]")
        steps = sorted({r["step"] for r in recs})
        marks = [steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]]
        print(f"{'γ':>5} " + " ".join(f"{'step ' + str(s):>24}" for s in marks))
        for g in cfg.gammas:
            cells = []
            for s in marks:
                v = [r["exact_kl"] for r in recs if r["gamma"] == g and r["step"] == s]
                cells.append(f"{sum(v) / len(v):>8.4f} [{min(v):.3f}, {max(v):.3f}]")
            print(f"{g:>5} " + " ".join(f"{c:>24}" for c in cells))


def plot_bias_variance(rows: list[dict], records: list[dict], cfg, path: str) -> None:
    """The panels of ``bias_variance.png``."""
    plt = pyplot()
    gammas, Ts = list(cfg.gammas), list(cfg.Ts)
    by = {(r["gamma"], r["T"]): r for r in rows}
    cmap = plt.get_cmap("viridis")
    colors = {g: cmap(i / max(len(gammas) - 1, 1)) for i, g in enumerate(gammas)}
    lrs = list(cfg.lrs) if records else []  # --train-steps 0: no training panels
    fig, axes = plt.subplots(1, 3 + len(lrs), figsize=(4.7 * (3 + len(lrs)), 4.2))

    ax = axes[0]
    for i, T in enumerate(Ts):
        ax.plot(gammas, [by[(g, T)]["bias_norm"] / max(by[(g, T)]["exact_grad_norm"], 1e-30) for g in gammas],
                "o-", color=plt.get_cmap("plasma")(i / max(len(Ts) - 1, 1)), label=f"T={T}")
    ax.set(xlabel="γ", ylabel="‖E g − ∇KL‖ / ‖∇KL‖", title="relative bias vs γ")
    ax.legend(fontsize=7)

    ax = axes[1]
    for g in gammas:
        ax.semilogy(Ts, [by[(g, T)]["variance"] for T in Ts], "o-", color=colors[g], label=f"γ={g}")
    ax.set(xlabel="T", ylabel="E‖g − E g‖² (one sequence)", title="variance vs T")
    ax.legend(fontsize=7)

    ax = axes[2]
    ratio = [by[(gammas[-1], T)]["variance"] / by[(gammas[0], T)]["variance"] for T in Ts]
    ax.loglog(Ts, ratio, "o-", color="k", label="measured")
    for power, style in ((1, ":"), (2, "--")):  # reference slopes through the first T ≥ 2 point
        T0 = next((i for i, T in enumerate(Ts) if T >= 2), 0)
        ax.loglog(Ts, [ratio[T0] * (T / Ts[T0]) ** power for T in Ts], style, color="gray", label=f"∝ T^{power}")
    ax.legend(fontsize=7)
    ax.set(xlabel="T", ylabel=f"var(γ={gammas[-1]}) / var(γ={gammas[0]})", title="variance ratio vs T")

    for ax, lr in zip(axes[3:], lrs):
        for g in gammas:
            recs = [r for r in records if r["gamma"] == g and r["lr"] == lr]
            steps = sorted({r["step"] for r in recs})
            vals = torch.tensor([[r["exact_kl"] for r in recs if r["step"] == s] for s in steps])
            mean, lo, hi = vals.mean(1), vals.min(1).values, vals.max(1).values
            ax.plot(steps, mean, color=colors[g], label=f"γ={g}")
            ax.fill_between(steps, lo, hi, color=colors[g], alpha=0.2)
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="exact KL(π‖q)",
               title=f"training T={cfg.train_T}, {cfg.optimizer} lr={lr}\n(mean, min–max over {cfg.train_seeds} seeds)")
        ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# self-distillation and forgetting (toy/forgetting.py)
# --------------------------------------------------------------------------------------------


def summarise_self_distill(rows: list[dict], cfg) -> list[dict]:
    """Per (method, lr, schedule) of :func:`toy.forgetting.run_self_distill`'s rows: final KL (mean over seeds),
    Spearman of the seed-mean KL with the step, and the mean change of success over the second half of the run
    (mean over seeds). Methods in the order of the rows, then learning rates and schedules sorted."""
    summary = []
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    keys = sorted({(r["method"], r["lr"], r["schedule"]) for r in rows}, key=lambda k: (order[k[0]], k[1], k[2]))
    for method, lr, schedule in keys:
        sel = [r for r in rows if (r["method"], r["lr"], r["schedule"]) == (method, lr, schedule)]
        steps = sorted({r["step"] for r in sel})
        kl_mean = [mean(r["kl_to_init"] for r in sel if r["step"] == s) for s in steps]
        succ0 = mean(r["success"] for r in sel if r["step"] == 0)
        late = [r["success"] - succ0 for r in sel if r["step"] >= steps[-1] / 2 and r["step"] > 0]
        summary.append({"method": method, "lr": lr, "schedule": schedule, "kl_final": kl_mean[-1],
                        "kl_max": max(kl_mean), "kl_mid": kl_mean[len(kl_mean) // 2],
                        "spearman_kl_step": spearman(steps, kl_mean),
                        "success_change_late": mean(late)})
    return summary


def continual_summary(rows: list[dict], cfg) -> list[dict]:
    """Per lineage (learn method + recovery method) of :func:`toy.forgetting.run_continual`'s rows: success on A
    and B at π₀, after learning B, and after the recovery;
    ``recovered_fraction = (A_recovered − A_after_B) / (A_π₀ − A_after_B)``."""
    out = []
    end_B, end = cfg.cl_steps, cfg.cl_steps + cfg.cl_recover_steps
    for method in dict.fromkeys(r["method"] for r in rows if r["phase"] == "recover_A"):
        learn = method.split("+")[0]
        phase1 = {r["step"]: r for r in rows if r["method"] == learn}
        phase2 = {r["step"]: r for r in rows if r["method"] == method}
        a0, ab, ar = phase1[0]["success_A"], phase1[end_B]["success_A"], phase2[end]["success_A"]
        drop = a0 - ab
        # the first evaluation at which A has recovered two thirds of its drop, and B at that moment
        first = next((r for _, r in sorted(phase2.items()) if drop > 0 and r["success_A"] - ab >= 2 / 3 * drop), None)
        out.append({"method": method, "A_init": a0, "A_after_B": ab, "A_after_recovery": ar,
                    "recovered_fraction": (ar - ab) / drop if drop > 0 else float("nan"),
                    "B_init": phase1[0]["success_B"], "B_after_B": phase1[end_B]["success_B"],
                    "B_after_recovery": phase2[end]["success_B"],
                    "steps_to_two_thirds": None if first is None else first["step"] - end_B,
                    "B_at_two_thirds": None if first is None else first["success_B"]})
    return out


def print_forgetting(cfg, grad_rows, sd_summary, cl_summary, table, details, base, teacher_A_eval, teacher_B_eval) -> None:
    """The tables of ``python -m toy forgetting`` (``teacher_*_eval``: :func:`toy.forgetting.evaluate` of the
    teachers; ``cl_summary``: :func:`toy.forgetting.continual_summary`)."""
    print(f"\nWorld V={cfg.V}, T={cfg.T}, tasks A and B with {cfg.prompts_per_task} prompts each "
          f"({cfg.two_answer_prompts} B prompts with two correct answers); student MLP hidden={cfg.hidden}, "
          f"context={cfg.context}")
    print(f"π₀: success_A={base['success_A']:.3f} (teacher_A {teacher_A_eval['success_A']:.3f}), "
          f"success_B={base['success_B']:.3f} (teacher_B {teacher_B_eval['success_B']:.3f})")

    print("\n[1a] Exact moments of one sample's gradient g(y) on A, teacher π₀, by enumeration: "
          "mean E g and variance E‖g − E g‖², at π = π₀ and at π₀ + 0.1·N(0, 1)")
    print(f"{'point':>9} {'method':>12} {'‖E g‖':>11} {'max|E g|':>11} {'variance':>11}")
    for r in grad_rows:
        print(f"{r['point']:>9} {r['method']:>12} {r['mean_norm']:>11.3e} {r['mean_max_abs']:>11.3e} {r['variance']:>11.3e}")

    print(f"\n[1b] Self-distillation on A, teacher π₀ ({cfg.sd_optimizer}, batch {cfg.sd_batch}, {cfg.sd_steps} steps, "
          f"{cfg.sd_seeds} seeds; fixed set {cfg.sd_fixed_size} samples): exact KL(π₀‖π), mean over seeds")
    print(f"{'method':>12} {'lr':>5} {'schedule':>9} {'KL mid':>10} {'KL final':>10} {'KL max':>10} "
          f"{'ρ(KL,step)':>10} {'Δsuccess late':>13}")
    for s in sd_summary:
        print(f"{s['method']:>12} {s['lr']:>5g} {s['schedule']:>9} {s['kl_mid']:>10.2e} {s['kl_final']:>10.2e} "
              f"{s['kl_max']:>10.2e} {s['spearman_kl_step']:>10.3f} {s['success_change_late']:>+13.4f}")

    print(f"\n[2] Continual learning ({cfg.optimizer}, lr {cfg.lr}): learn B by SFT for {cfg.cl_steps} steps, then "
          f"{cfg.cl_recover_steps} steps of OPD with teacher π₀ on A prompts (+opd_A), or half A prompts (teacher π₀) "
          f"and half B prompts (teacher π_B, the checkpoint after B) (+opd_AB)")
    print(f"{'method':>17} {'A: π₀':>7} {'A: after B':>10} {'A: recovered':>12} {'recovery':>9} "
          f"{'B: π₀':>7} {'B: after B':>10} {'B: recovered':>12} | {'steps→⅔':>7} {'B then':>6}")
    for c in cl_summary:
        two_thirds = "-" if c["steps_to_two_thirds"] is None else str(c["steps_to_two_thirds"])
        b_then = "-" if c["B_at_two_thirds"] is None else f"{c['B_at_two_thirds']:.3f}"
        print(f"{c['method']:>17} {c['A_init']:>7.3f} {c['A_after_B']:>10.3f} {c['A_after_recovery']:>12.3f} "
              f"{c['recovered_fraction']:>9.2f} {c['B_init']:>7.3f} {c['B_after_B']:>10.3f} {c['B_after_recovery']:>12.3f} | "
              f"{two_thirds:>7} {b_then:>6}")
    print("(recovery = (A recovered − A after B) / (A π₀ − A after B); steps→⅔: recovery steps until A has "
          "regained two thirds of its drop, B then: success_B at that moment)")

    print(f"\n[3] Learning B from π₀, {cfg.cmp_steps} steps × {cfg.batch} samples ({cfg.optimizer}, lr {cfg.lr}); "
          f"target success_B ≥ {cfg.target_success}; k = {cfg.pass_k}")
    print(f"{'method':>12} {'samples→tgt':>11} {'success_B':>9} {'retention':>9} {'success_A':>9} "
          f"{'H(B) nats':>9} {'pass@k':>7} {'cover@k':>7} {'KL(π₀‖π) B':>11} {'KL A':>7} | "
          f"{'ret@tgt':>7} {'KL B@tgt':>8}")
    t_ev = teacher_B_eval
    print(f"{'(teacher_B)':>12} {'':>11} {t_ev['success_B']:>9.3f} {'':>9} {'':>9} {t_ev['entropy_B']:>9.3f} "
          f"{t_ev['pass_at_k_B']:>7.3f} {t_ev['coverage_at_k_B']:>7.3f} {t_ev['kl_B']:>11.3f}")
    print(f"{'(π₀)':>12} {'':>11} {base['success_B']:>9.3f} {1.0:>9.3f} {base['success_A']:>9.3f} "
          f"{base['entropy_B']:>9.3f} {base['pass_at_k_B']:>7.3f} {base['coverage_at_k_B']:>7.3f} {0.0:>11.3f}")
    for row, d in zip(table, details):
        stt = "never" if row["samples_to_target"] is None else str(row["samples_to_target"])
        print(f"{row['method']:>12} {stt:>11} {d['success_B']:>9.3f} {row['retention']:>9.3f} {d['success_A']:>9.3f} "
              f"{row['entropy']:>9.3f} {row['pass_at_k']:>7.3f} {d['coverage_at_k_B']:>7.3f} "
              f"{row['kl_to_init']:>11.3f} {d['kl_A']:>7.3f} | {d['retention_at_target']:>7.3f} "
              f"{d['kl_B_at_target']:>8.3f}")
    for when, kl_key, ret_key in (("at the end", None, None), ("at the target", "kl_B_at_target", "retention_at_target")):
        kl = [r["kl_to_init"] for r in table] if kl_key is None else [d[kl_key] for d in details]
        forget = [1 - r["retention"] for r in table] if ret_key is None else [1 - d[ret_key] for d in details]
        for label, skip in (("all methods", ()), ("without grpo", ("grpo",))):
            ok = [i for i, r in enumerate(table)
                  if math.isfinite(kl[i]) and math.isfinite(forget[i]) and r["method"] not in skip]
            print(f"forgetting (1 − retention) vs KL(π₀‖π) on B, {when}, {label}: Spearman "
                  f"{spearman([forget[i] for i in ok], [kl[i] for i in ok]):.3f}, Pearson "
                  f"{pearson([forget[i] for i in ok], [kl[i] for i in ok]):.3f} ({len(ok)} methods)")


def plot_forgetting(cfg, sd_rows, cl_rows, curves, table, details, path: str, self_distill_methods) -> None:
    """The six panels of ``forgetting.png``."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(self_distill_methods)}
    widths = {lr: 0.8 + 1.2 * i for i, lr in enumerate(cfg.sd_lrs)}
    for key, ax in (("kl_to_init", axes[0, 0]), ("success", axes[0, 1])):
        for method, lr, schedule in sorted({(r["method"], r["lr"], r["schedule"]) for r in sd_rows}):
            sel = [r for r in sd_rows if (r["method"], r["lr"], r["schedule"]) == (method, lr, schedule)]
            steps = sorted({r["step"] for r in sel})
            ys = [mean(r[key] for r in sel if r["step"] == s) for s in steps]
            ax.plot(steps, ys, color=colors[method], lw=widths[lr], ls="-" if schedule == "constant" else "--")
        handles = [Line2D([], [], color=c, label=m) for m, c in colors.items()]
        handles += [Line2D([], [], color="gray", lw=w, label=f"lr={lr:g}") for lr, w in widths.items()]
        handles += [Line2D([], [], color="gray", ls="--", label="linear decay")]
        ax.legend(handles=handles, fontsize=7, ncol=2)
    axes[0, 0].set_yscale("symlog", linthresh=1e-4)
    axes[0, 0].set(xlabel="step", ylabel="exact KL(π₀‖π) on A (symlog)",
                   title="[1] self-distillation, teacher π₀: drift (mean over seeds)")
    axes[0, 1].set(xlabel="step", ylabel="exact success on A", title="[1] task success (mean over seeds)")

    ax = axes[0, 2]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in cl_rows)):
        sel = [r for r in cl_rows if r["method"] == method]
        ax.plot([r["step"] for r in sel], [r["success_A"] for r in sel], color=f"C{i}", label=f"{method}: A")
        ax.plot([r["step"] for r in sel], [r["success_B"] for r in sel], color=f"C{i}", ls="--", label=f"{method}: B")
    ax.axvline(cfg.cl_steps, color="k", lw=0.8)
    ax.set(xlabel=f"step (SFT on B until {cfg.cl_steps}, then OPD recovery)", ylabel="exact success (A solid, B dashed)",
           title="[2] continual: learn B by SFT, recover A by OPD")
    ax.legend(fontsize=6, ncol=2)

    ax = axes[1, 0]
    for i, method in enumerate(cfg.methods):
        sel = [c for c in curves if c["method"] == method]
        ax.plot([c["samples"] for c in sel], [c["success_B"] for c in sel], color=f"C{i}", label=method)
    ax.axhline(cfg.target_success, color="k", lw=0.6, ls=":")
    ax.set(xlabel="samples", ylabel="exact success on B", title="[3] learning the new task B")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    for i, (row, d) in enumerate(zip(table, details)):
        ax.scatter(row["kl_to_init"], 1 - row["retention"], color=f"C{i}")
        ax.annotate(row["method"], (row["kl_to_init"], 1 - row["retention"]), fontsize=8)
        ax.scatter(d["kl_B_at_target"], 1 - d["retention_at_target"], facecolors="none", edgecolors=f"C{i}")
    ax.set(xlabel="KL(π₀‖π) on B", ylabel="forgetting: 1 − retention of A",
           title="[3] RL's Razor (filled: end, hollow: at target success)")

    ax = axes[1, 2]
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], [r["entropy"] for r in table], width=0.4, label="entropy on B (nats)")
    ax.bar([i + 0.2 for i in x], [d["coverage_at_k_B"] for d in details], width=0.4, label=f"coverage@{cfg.pass_k} on B")
    ax.set_xticks(list(x), [r["method"] for r in table], rotation=30, fontsize=8)
    ax.set(title="[3] diversity")
    ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
