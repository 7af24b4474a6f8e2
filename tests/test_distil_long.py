"""Distilling an RL teacher back against the answer's length (toy/distil_long.py): the exact success against an
enumeration of every sequence, the two regimes' π₀, a fast run's bookkeeping, the committed results and their
docs block, and bad options."""

import json
from pathlib import Path

import pytest
import torch

from toy import distil_long as D

ROOT = Path(__file__).resolve().parents[1]


def test_exact_success_is_the_probability_of_the_answer_over_every_sequence():
    from toy.course_world import all_logprobs

    cfg = D.Config(Ns=(3,), prompts=5)
    task, init, _ = D.build(cfg, "same_success", 3, seed=0)
    logp_PX = all_logprobs(init, init.world, init.state_table())  # every (prompt, sequence), by the state table
    index_P = (task.answers_PN * torch.tensor([16, 4, 1])).sum(-1)  # sequences are numbered lexicographically
    brute = logp_PX[torch.arange(5), index_P].exp().mean().item()
    assert D.success(init, task) == pytest.approx(brute, rel=1e-5)
    assert torch.allclose(logp_PX.exp().sum(-1), torch.ones(5, dtype=logp_PX.dtype), atol=1e-5)


def test_the_reward_is_exactly_the_answer():
    task = D.AnswerTask(torch.tensor([[0, 1, 2], [3, 3, 3]]))
    prompts, tokens = torch.tensor([0, 0, 1, 1]), torch.tensor([[0, 1, 2], [0, 1, 3], [3, 3, 3], [0, 1, 2]])
    assert task.is_correct(prompts, tokens).tolist() == [True, False, True, False]


@pytest.mark.parametrize("regime, target", [("same_token", 0.8 ** 8), ("same_success", 0.1)])
def test_pi0_starts_at_the_regime_s_success(regime, target):
    cfg = D.Config()
    task, init, steps = D.build(cfg, regime, 8, seed=1)
    s = D.success(init, task)
    assert steps > 0 and target <= s < 1.5 * target  # the warm-up stops at the first step past the target


def test_a_fast_run_counts_samples_to_the_level_consistently(tmp_path):
    from toy.__main__ import main

    result = main(["distil-long", "--fast", "--no-progress", "--out", str(tmp_path)])["distil-long"]
    cfg = result["config"]
    written = json.loads((tmp_path / "distil_long.json").read_text())
    assert written["summary"] == json.loads(json.dumps(result["summary"])) and (tmp_path / "distil_long.png").exists()
    for run in result["runs"]:
        assert run["level"] == pytest.approx(run["init_success"] + 0.9 * (run["teacher_success"] - run["init_success"]))
        for m, samples in run["samples_to_level"].items():
            assert samples is None or (samples % cfg["batch"] == 0 and samples <= cfg["rl_steps"] * cfg["batch"])
    for e in result["summary"]:
        mine = [r for r in result["runs"] if (r["regime"], r["N"]) == (e["regime"], e["N"])]
        for m in D.DISTIL:
            expected = [r["samples_to_level"]["grpo"] / r["samples_to_level"][m] for r in mine
                        if r["samples_to_level"][m] and r["samples_to_level"]["grpo"]]
            assert e["methods"][m]["grpo_over_method"] == pytest.approx(expected)


def test_committed_results_and_docs_agree():
    """Regenerate with `python -m toy distil-long --out toy/results`, then write the block (see the test's end)."""
    from opd_mini.experiments import toolkit

    result = json.loads((ROOT / "toy" / "results" / "distil_long.json").read_text())
    assert result["config"]["seeds"] >= 3 and not result["config"]["fast"]
    assert toolkit.read_block(ROOT / "docs" / "results.md", "distil-long") == D.docs_block(result)


def test_docs_reading_of_the_distil_long_results_holds():
    """The reading after the block in docs/results.md, statement by statement, on the committed JSON."""
    result = json.loads((ROOT / "toy" / "results" / "distil_long.json").read_text())
    by = {(e["regime"], e["N"]): e for e in result["summary"]}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ratio = {(k, m): e["methods"][m]["grpo_over_method"] for k, e in by.items() for m in D.DISTIL}
    Ns = result["config"]["Ns"]
    assert Ns == [4, 8, 16, 32] and result["config"]["rl_steps"] == 1000
    # same_success: full OPD needs a half to two-fifths of GRPO's samples at every N, not growing with N
    assert all(1.9 < mean(ratio[(("same_success", N), "opd_full")]) < 2.7 for N in Ns)
    assert mean(ratio[(("same_success", 32), "opd_full")]) <= mean(ratio[(("same_success", 4), "opd_full")])
    assert all(1 < mean(ratio[(("same_success", N), "sft")]) < mean(ratio[(("same_success", N), "opd_full")])
               for N in Ns)  # SFT close behind
    # same_token, N <= 16: the lead shrinks as N grows, and GRPO's own level falls
    leads = [mean(ratio[(("same_token", N), "opd_full")]) for N in (4, 8, 16)]
    assert leads == sorted(leads, reverse=True)
    assert by[("same_token", 16)]["teacher_success"][0] < by[("same_token", 4)]["teacher_success"][0]
    # N = 32: one seed of three found an answer (1/16 of the prompts), and there OPD was about 12× faster in
    # samples, about 10× in FLOPs; on the others GRPO ended below π₀
    e = by[("same_token", 32)]
    assert e["teachers_improved"] == 1 and e["methods"]["opd_full"]["reached"] == 1
    runs = [r for r in result["runs"] if (r["regime"], r["N"]) == ("same_token", 32)]
    assert all(0.5e-3 < r["init_success"] < 2e-3 for r in runs)  # once in about a thousand tries
    found = [r for r in runs if r["teacher_improved"]]
    assert len(found) == 1 and round(16 * found[0]["teacher_success"]) == 1
    assert round(e["methods"]["opd_full"]["grpo_over_method"][0]) == 12
    assert round(e["methods"]["opd_full"]["grpo_over_method_flops"][0]) == 10
    assert all(r["teacher_success"] < r["init_success"] for r in runs if not r["teacher_improved"])
    # sampled-token OPD slower than GRPO from N = 8 on (both regimes, where GRPO learns), full twice as fast
    for regime in ("same_token", "same_success"):
        for N in (8, 16) + ((32,) if regime == "same_success" else ()):
            assert mean(ratio[((regime, N), "opd_sampled")]) < 1 < mean(ratio[((regime, N), "opd_full")])


@pytest.mark.parametrize("argv, message", [(["--regimes", "bogus"], "--regimes"), (["--init-token", "1.5"], "(0, 1)"),
                                           (["--batch", "30"], "multiple of --group-size")])
def test_bad_options_are_one_line_and_exit_code_2(argv, message, tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "toy", "distil-long", *argv, "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not list(tmp_path.iterdir())
