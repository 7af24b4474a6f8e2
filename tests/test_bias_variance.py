"""Claims of the bias/variance reproduction (Fu et al. 2026, §3.1) in the exact toy world, on fixed seeds.

Gradients are on the sequence scale: T × the gradient of the per-token-mean loss of one sequence, so
the γ = 1 estimator's mean is ∇ KL(π(y_1:T) ‖ q(y_1:T)) itself.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy.__main__ as toy_main
from toy.cli import Job, run_jobs
from toy.bias_variance import Config, estimator_moments, exact_gradient, make_pair, per_sequence_gradients
from toy.world import sample, sequence_kl

REPO = Path(__file__).resolve().parents[1]
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CFG = Config(V=3, Ts=(1, 2, 3, 4, 5), P=2, seed=0)
SPECS = [("sampled_token", g) for g in GAMMAS] + [("full", None)]


@pytest.fixture(scope="module")
def moments():
    """{T: (exact gradient (P, S, V), {spec: moments})} for every horizon of CFG, by enumeration."""
    torch.set_num_threads(1)
    out = {}
    for T in CFG.Ts:
        teacher, student = make_pair(CFG, T)
        out[T] = (exact_gradient(student, teacher).double(), estimator_moments(student, teacher, SPECS))
    return out


def rel_bias(moments, T, spec):
    grad, m = moments[T]
    return float((m[spec]["mean_PSV"] - grad).norm() / grad.norm())


def test_gamma_one_is_unbiased(moments):
    for T in CFG.Ts:
        assert rel_bias(moments, T, ("sampled_token", 1.0)) < 1e-5, T


def test_gamma_zero_is_biased_for_T_at_least_two(moments):
    assert rel_bias(moments, 1, ("sampled_token", 0.0)) < 1e-5  # one token: all γ coincide
    for T in CFG.Ts[1:]:
        assert rel_bias(moments, T, ("sampled_token", 0.0)) > 0.05, T


def test_bias_decreases_to_zero_as_gamma_rises(moments):
    for T in CFG.Ts[1:]:
        biases = [rel_bias(moments, T, ("sampled_token", g)) for g in GAMMAS]
        assert all(a > b for a, b in zip(biases, biases[1:])), (T, biases)


def test_variance_non_decreasing_in_gamma(moments):
    for T in CFG.Ts:
        var = [moments[T][1][("sampled_token", g)]["variance"] for g in GAMMAS]
        assert all(b >= a * (1 - 1e-6) for a, b in zip(var, var[1:])), (T, var)


def test_variance_ratio_grows_with_T(moments):
    ratio = [moments[T][1][("sampled_token", 1.0)]["variance"] / moments[T][1][("sampled_token", 0.0)]["variance"]
             for T in CFG.Ts]
    assert abs(ratio[0] - 1) < 1e-5
    assert all(b > a for a, b in zip(ratio, ratio[1:])), ratio


def test_full_reverse_kl_is_rao_blackwellised_gamma_zero(moments):
    """Same mean as token-level OPD (γ = 0), never more variance."""
    for T in CFG.Ts:
        m = moments[T][1]
        torch.testing.assert_close(m[("full", None)]["mean_PSV"], m[("sampled_token", 0.0)]["mean_PSV"],
                                   rtol=1e-5, atol=1e-7)
        assert m[("full", None)]["variance"] <= m[("sampled_token", 0.0)]["variance"] + 1e-9


def test_exact_moments_agree_with_monte_carlo(moments):
    """Mean (projected on a random direction) and second moment of g, and the sequence KL itself, by
    Monte Carlo within 4 standard errors of the exact values."""
    T, M = 4, 20_000
    teacher, student = make_pair(CFG, T)
    w = student.world
    g = torch.Generator().manual_seed(123)
    u_PSV = torch.randn(w.P, w.num_states, w.V, generator=g, dtype=torch.float64)
    prompts_M = torch.randint(w.P, (M,), generator=g)
    tokens_MT = sample(student, prompts_M, g)
    states_MT = w.state_index(tokens_MT)
    grad, exact = moments[T]
    for gamma in (0.0, 1.0):
        g_MTV = per_sequence_gradients(student, teacher, prompts_M, tokens_MT, "sampled_token", gamma).double()
        proj_M = (g_MTV * u_PSV[prompts_M.unsqueeze(1), states_MT]).sum((1, 2))
        sq_M = g_MTV.pow(2).sum((1, 2))
        m = exact[("sampled_token", gamma)]
        exact_proj = float((m["mean_PSV"] * u_PSV).sum())
        exact_sq = m["variance"] + float(m["mean_PSV"].pow(2).sum())
        for samples, target in ((proj_M, exact_proj), (sq_M, exact_sq)):
            se = float(samples.std() / M ** 0.5)
            assert abs(float(samples.mean()) - target) < 4 * se, (gamma, float(samples.mean()), target, se)
    # the sequence KL: E_π[Σ_t r_t]
    with torch.no_grad():
        r_M = (torch.log_softmax(student.logits(prompts_M, tokens_MT), -1) - torch.log_softmax(teacher.logits(prompts_M, tokens_MT), -1)
               ).gather(-1, tokens_MT.unsqueeze(-1)).squeeze(-1).sum(-1).double()
    kl = float(sequence_kl(student, teacher).detach())
    assert abs(float(r_M.mean()) - kl) < 4 * float(r_M.std() / M ** 0.5)
    # and the Monte Carlo route of estimator_moments
    mc = estimator_moments(student, teacher, [("sampled_token", 1.0)], method="mc", num_samples=M,
                           generator=torch.Generator().manual_seed(5))[("sampled_token", 1.0)]
    assert abs(mc["variance"] / exact[("sampled_token", 1.0)]["variance"] - 1) < 0.1


def check_schema(path):
    data = json.loads(path.read_text())
    assert {"estimators", "training", "config"} <= set(data)
    for row in data["estimators"]:
        assert {"gamma", "T", "bias_norm", "variance", "exact_grad_norm", "method"} <= set(row)
        assert row["method"] in ("exact", "mc")
    for row in data["training"]:
        assert {"gamma", "seed", "step", "exact_kl"} <= set(row)
    return data


def test_cli_fast_writes_json_and_figure(tmp_path, capsys):
    out = tmp_path / "bv"
    result = toy_main.main(["bias-variance", "--fast", "--no-progress", "--out", str(out)])
    data = check_schema(out / "bias_variance.json")
    assert (out / "bias_variance.png").stat().st_size > 10_000
    assert {r["gamma"] for r in data["estimators"]} == set(GAMMAS)
    assert data["config"]["fast"] is True
    printed = capsys.readouterr().out
    assert "wall time" in printed and "bias" in printed
    # γ = 0 training lowers the exact KL at every learning rate
    for lr in data["config"]["lrs"]:
        kl = {r["step"]: r["exact_kl"] for r in data["training"] if r["gamma"] == 0.0 and r["seed"] == 0 and r["lr"] == lr}
        assert kl[max(kl)] < kl[0]
    assert result["bias-variance"]["figures"]


def test_runner_runs_every_experiment_and_lets_import_errors_through(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy_main, "EXPERIMENTS", {"bias-variance": "toy.bias_variance"})
    monkeypatch.setattr(toy_main, "EVERYTHING", ("bias-variance",))
    real_defaults = toy_main.defaults_for

    def fast_defaults(module, out):
        args = real_defaults(module, out)
        args.fast, args.no_progress = True, True
        return args

    monkeypatch.setattr(toy_main, "defaults_for", fast_defaults)
    results = toy_main.main(["--out", str(tmp_path), "--no-progress"])
    assert set(results) == {"bias-variance"}
    printed = capsys.readouterr().out
    assert "done in" in printed and "bias_variance.png" in printed
    check_schema(tmp_path / "bias_variance.json")

    # an ImportError raised inside an existing experiment module is not swallowed
    (tmp_path / "broken_experiment.py").write_text("import a_package_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(toy_main, "EXPERIMENTS", {"broken": "broken_experiment"})
    sys.modules.pop("broken_experiment", None)
    with pytest.raises(ModuleNotFoundError):
        toy_main.load_experiment("broken")


def _add(*values):
    return sum(values)


def _fail():
    raise ValueError("a bad setting")


def test_jobs_run_once_after_the_jobs_they_need_whatever_the_number_of_workers():
    jobs = [Job("a", _add, (1,)), Job("b", _add, (2,), ("a",)), Job("c", _add, (3,), ("a", "b")),
            Job("a", _add, (100,))]  # the same key again: the same job
    for workers in (1, 2):
        results, timing = run_jobs(jobs, workers)
        assert results == {"a": 1, "b": 3, "c": 7} and timing.workers == workers
        assert timing.ended["a"] <= timing.ended["b"] <= timing.ended["c"] == timing.wall()
    with pytest.raises(ValueError, match="a bad setting"):
        run_jobs([Job("x", _fail), Job("y", _add, (1,))], 2)
    with pytest.raises(KeyError):
        run_jobs([Job("x", _add, needs=("missing",))], 1)


def test_every_experiment_module_is_listed_and_run_and_an_unknown_one_is_one_error_line():
    """``python -m toy --list`` names every module of toy/ that has the experiment contract, one line each;
    ``python -m toy`` runs all of them; an unknown name is one error line."""
    contract = ("NAME", "add_arguments", "config_from_args", "jobs", "finish", "main")
    modules = [importlib.import_module(f"toy.{p.stem}") for p in sorted((REPO / "toy").glob("*.py"))
               if not p.stem.startswith("__")]
    found = {m.NAME: m.__name__ for m in modules if all(hasattr(m, a) for a in contract)}
    assert found == toy_main.EXPERIMENTS
    assert set(toy_main.EVERYTHING) == set(found)
    listed = subprocess.run([sys.executable, "-m", "toy", "--list"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(toy_main.EXPERIMENTS)
    bad = subprocess.run([sys.executable, "-m", "toy", "no-such-experiment", "--out", "/nonexistent"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert "no-such-experiment" in lines[0] and all(name in lines[0] for name in found)


def test_a_registered_user_loss_is_measured_next_to_the_built_in_estimators(monkeypatch):
    """Config.extra_losses measures any registered loss on the same scale: a copy of the full reverse KL
    has exactly the full estimator's bias and variance."""
    from opd_mini import registry
    from toy.bias_variance import measure_estimators

    monkeypatch.setattr(registry, "LOSS_REGISTRY", dict(registry.LOSS_REGISTRY))

    @registry.register("user_full", kind="distribution", signal="full")
    def user_full(student_logits_BTV, batch, opts):
        return registry.LOSS_REGISTRY["reverse_kl_full"].fn(student_logits_BTV, batch, opts)

    cfg = Config(V=3, Ts=(2, 3), gammas=(0.0, 1.0), extra_losses=("user_full",)).validate()
    _, other = measure_estimators(cfg, progress=False)
    for T in cfg.Ts:
        full, user = ({k: v for k, v in r.items() if k != "estimator"} for r in other
                      if r["T"] == T and r["estimator"] in ("full", "user_full"))
        assert full == user
    with pytest.raises(ValueError, match="extra-losses"):
        Config(extra_losses=("sft",)).validate()  # not an on-policy distillation loss


def test_docs_tail_bucket_bullet_holds_on_the_committed_results():
    """docs/results.md §1, the top-K-with-a-tail bullet, against toy/results/bias_variance.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "toy" / "results" / "bias_variance.json").read_text())
    rows = {(r["T"], r["estimator"]): r for r in data["other_estimators"]}
    Ts = data["config"]["Ts"]

    def rel(T, name):
        return rows[(T, name)]["bias_norm"] / rows[(T, name)]["exact_grad_norm"]

    cut = [1 - rel(T, "top2_tail") / rel(T, "top2") for T in Ts]
    assert round(min(cut) * 100) == 29 and round(max(cut) * 100) == 41
    assert (round(min(rel(T, "top2_tail") for T in Ts), 2), round(max(rel(T, "top2_tail") for T in Ts), 2)) == (0.71, 0.78)
    assert (round(min(rel(T, "top2") for T in Ts), 2), round(max(rel(T, "top2") for T in Ts), 2)) == (1.08, 1.19)
    ratio = {T: rows[(T, "top2_tail")]["variance"] / max(rows[(T, "top2")]["variance"], 1e-30) for T in Ts}
    assert all(ratio[T] < 1 for T in Ts if T <= 4) and round((max(ratio[T] for T in Ts if T > 4) - 1) * 100) <= 9
    assert all(rel(T, "full") < rel(T, "top2_tail") for T in Ts) and round(max(rel(T, "full") for T in Ts), 2) == 0.39


def test_docs_k_much_smaller_than_v_bullet_holds_and_reruns_in_seconds(tmp_path):
    """docs/results.md §1, the K ≪ V bullet, against toy/results/V32/bias_variance.json; the command reruns it (the
    quantities are exact: every sequence enumerated) and agrees to float round-off. With --train-steps 0 no training
    table is built (a 32^6-state table at the default --train-T would not fit in memory)."""
    import json
    from pathlib import Path

    from toy.__main__ import main

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "toy" / "results" / "V32" / "bias_variance.json").read_text())
    live = main(["bias-variance", "--V", "32", "--Ts", "1", "2", "3", "--gammas", "0", "1", "--topk", "4",
                 "--train-steps", "0", "--workers", "1", "--no-progress", "--out", str(tmp_path)])["bias-variance"]
    assert live["training"] == [] and data["training"] == []
    for a, b in zip(live["other_estimators"], data["other_estimators"]):
        assert a["estimator"] == b["estimator"] and a["bias_norm"] == pytest.approx(b["bias_norm"], rel=1e-4, abs=1e-6)
    rows = {(r["T"], r["estimator"]): r for r in data["other_estimators"]}
    sampled = {(r["T"], r["gamma"]): r for r in data["estimators"]}
    Ts = data["config"]["Ts"]

    def rel(T, name):
        return rows[(T, name)]["bias_norm"] / rows[(T, name)]["exact_grad_norm"]

    def span(values, digits=2):
        return round(min(values), digits), round(max(values), digits)

    assert span([rel(T, "top4") for T in Ts]) == (1.87, 1.99) and min(rel(T, "top4") for T in Ts) > 1.19
    assert all(abs(rel(T, "top4_tail") - 0.91) < 0.01 for T in Ts)
    assert all(rel(T, "top4_tail") < 0.55 * rel(T, "top4") for T in Ts)  # about halved
    varied = [T for T in Ts if T >= 2]  # at T = 1 every distribution-level loss is deterministic
    assert span([rows[(T, "top4_tail")]["variance"] for T in varied], 3) == (0.013, 0.023)
    assert span([rows[(T, "full")]["variance"] for T in varied]) == (0.12, 0.25)
    assert span([sampled[(T, 0.0)]["variance"] for T in varied], 1) == (3.7, 5.9)
    assert all(rows[(T, "top4_tail")]["variance"] < min(rows[(T, n)]["variance"] for n in ("full", "top4"))
               for T in varied)
    assert all(rows[(T, "full")]["bias_norm"] == pytest.approx(sampled[(T, 0.0)]["bias_norm"], rel=1e-4, abs=1e-7)
               for T in Ts)
    assert span([rel(T, "full") for T in varied]) == (0.24, 0.27)


def test_tables_too_large_for_memory_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match=r"--train-T 6 with V=32.*--train-steps 0"):
        Config(V=32, Ts=(1, 2)).validate()
    with pytest.raises(ValueError, match=r"--Ts 6 with V=32"):
        Config(V=32, Ts=(1, 6), train_steps=0).validate()
    Config(V=32, Ts=(1, 2, 3), train_steps=0).validate()  # the K ≪ V measurement fits
