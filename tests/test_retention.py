"""Retention and recovery on a transformer (python -m opd_mini.experiments retention): the quick run's results,
their consistency, the committed results against the docs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_mini.experiments import retention, toolkit

ROOT = Path(__file__).resolve().parents[1]
#: measured together with the self-distillation part (then parts 1 and 3 of one experiment)
COMMITTED = ROOT / "tutorials" / "results" / "retention.json"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("retention")
    assert retention.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "retention.json").read_text()), out


def test_quick_run_writes_the_issue_schema_and_figures(quick):
    result, out = quick
    assert (out / "retention.png").stat().st_size > 0 and (out / "recovery.png").stat().st_size > 0
    text = (out / "retention.md").read_text()
    assert text.startswith("Retention on a transformer") and "\n\nRecovery (" in text
    for e in result["retention"]:
        assert e["method"].startswith(("sft", "grpo", "opd"))
        assert e["seeds"] == [0, 1, 2]
        for key in ("A_before", "A_at_matched_B", "B_final", "kl_A_at_matched_B"):
            assert key in e
        assert len(e["A_at_matched_B"]) == len(e["B_final"]) == 3
    for e in result["recovery"]:
        for key in ("variant", "seeds", "A_before_B", "A_after_B", "A_recovered", "B_after_B", "B_at_two_thirds", "B_final"):
            assert key in e


def test_every_run_starts_at_pi0_and_the_kl_measures_how_far_it_went(quick):
    result, _ = quick
    setup = result["retention_setup"]
    assert setup["A_start"] >= retention.MIN_A > setup["B_start"]
    for e in result["retention"]:
        # a fresh LoRA adapter is zero: the student is π₀ exactly, so the KL to π₀ is exactly 0 at step 0
        assert all(k[0] == 0.0 for k in e["kl_A_curves"]), e["method"]
        assert all(k[-1] > 0.0 for k in e["kl_A_curves"]), e["method"]
        assert len({c[0] for c in e["A_curves"]}) >= 1 and e["A_before"] == pytest.approx(
            sum(e["A_before_per_seed"]) / 3)
    # across every evaluation of every run, the drop of A tracks KL(π₀ ‖ π) on A's prompts (measured 0.94)
    assert result["retention_correlation"]["every_eval"]["spearman"] > 0.5
    # the quick budget is long enough to learn some B: every seed reaches matched B (measured: B 0.16-0.19 at step
    # 40 against a matched B of 0.15, 0.23-0.26 at step 60) and loses A on the way (A 0.95 -> 0.14-0.56)
    for e in result["retention"]:
        assert None not in e["A_at_matched_B"], e["method"]
        assert all(a < b for a, b in zip(e["A_final"], e["A_before_per_seed"])), e["method"]


def test_recovery_starts_exactly_where_b_left_a_and_gets_a_back(quick):
    result, _ = quick
    for e in result["recovery"]:
        # the same adapter, prompts and sampling seeds: the recovery's first evaluation is the post-B one, exactly
        assert [c[0] for c in e["A_curves"]] == e["A_after_B_per_seed"]
        assert [c[0] for c in e["B_curves"]] == e["B_after_B_per_seed"]
        # OPD with the pre-B model as teacher brings A back in every seed within the quick budget
        assert all(s is not None for s in e["steps_to_two_thirds"]), e["variant"]
        assert all(a > b for a, b in zip(e["A_recovered"], e["A_after_B_per_seed"])), e["variant"]


def test_docs_retention_and_recovery_blocks_match_the_committed_results():
    result = json.loads(COMMITTED.read_text())
    assert toolkit.committed(retention) == result
    blocks = toolkit.blocks(retention, result, "../tutorials/results")
    assert list(blocks) == ["retention", "recovery"]
    for name, section in (("retention", retention.docs_block), ("recovery", retention.recovery_block)):
        assert toolkit.read_block(ROOT / "docs" / "results.md", name) == section(result, "../tutorials/results") \
            == blocks[name], name
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    # the reading under the blocks, statement by statement
    by = {e["method"]: e for e in result["retention"]}
    mean = toolkit.mean
    final_A = {m: mean(e["A_final"]) for m, e in by.items()}
    at_matched = {m: [a for a in e["A_at_matched_B"] if a is not None] for m, e in by.items()}
    opd = [m for m in by if m.startswith("opd")]
    # "every OPD variant that reaches matched B has lost more of A there than SFT has in any seed, every OPD
    # variant loses half of A sooner than SFT and ends with less of it, and sampled-token OPD does not reach
    # matched B within the budget at all"
    reached = [m for m in opd if at_matched[m]]
    assert reached and all(max(at_matched[m]) < min(at_matched["sft"]) for m in reached)
    assert all(final_A[m] < final_A["sft"] for m in opd)
    assert [m for m in opd if not at_matched[m]] == ["opd_sampled"]
    def half_gone(m):  # the first step where A's mean over seeds is below half of where it started
        e = by[m]
        return next(st for i, st in enumerate(e["steps"]) if mean([c[i] for c in e["A_curves"]]) < e["A_before"] / 2)

    assert all(half_gone(m) < half_gone("sft") for m in opd)
    # "GRPO never reaches matched B either and loses A too"
    assert all(x is None for x in by["grpo"]["A_at_matched_B"]) and final_A["grpo"] < mean(by["grpo"]["A_before_per_seed"])
    assert not result["claims"]["opd_drop_at_most_half_of_sft"]["holds"]
    # "across every evaluation of every run, A's drop follows KL(π₀ ‖ π) on A's prompts"
    assert result["retention_correlation"]["every_eval"]["spearman"] > 0.8
    # "the one method that keeps A ... replaying A's prompts ... at the price of learning B more slowly (it ends
    # lower on B than SFT, and not every seed reaches matched B)"
    assert final_A["sft_replay"] == max(final_A.values()) and final_A["sft_replay"] > 0.8 * by["sft_replay"]["A_before"]
    assert mean(by["sft_replay"]["B_final"]) < mean(by["sft"]["B_final"])
    assert None in by["sft_replay"]["steps_to_matched_B"] and None not in by["sft"]["steps_to_matched_B"]
    # recovery: "brings A back within the first evaluation interval in every seed"; "B is not kept within the
    # margin: it falls in both variants, less when B's prompts are distilled from the post-B model"
    rec = {e["variant"]: e for e in result["recovery"]}
    every = result["recovery"][0]["steps"][1]
    assert all(s == every for e in rec.values() for s in e["steps_to_two_thirds"])
    assert not result["claims"]["recovery_two_thirds_B_within_0.05"]["holds"]
    assert all(mean(e["B_final"]) < e["B_after_B"] for e in rec.values())
    assert mean(rec["opd_A+B"]["B_final"]) > mean(rec["opd_A"]["B_final"])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_retention_task_the_student_does_not_know_is_refused(tmp_path, capsys):
    argv = ["--quick", "--parts", "retention", "--retention_task", "add:3", "--out", str(tmp_path), "--no-progress"]
    assert retention.main(argv) == 2
    assert "has not learned the retention task add:3" in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_recovery_teacher_that_does_not_match_the_student_is_refused(tmp_path, capsys):
    from opd_mini.tiny import build_char_tokenizer

    other = build_char_tokenizer()
    other.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    other.save_pretrained(tmp_path / "teacher")
    argv = ["--quick", "--recovery_teacher", str(tmp_path / "teacher"), "--out", str(tmp_path), "--no-progress"]
    assert retention.main(argv) == 2
    assert "does not match the student" in _one_error_line(capsys)
    assert retention.main([*argv[:2], str(tmp_path / "missing"), *argv[3:]]) == 2
    assert "is not a directory" in _one_error_line(capsys)


def test_a_budget_too_small_for_matched_b_writes_not_reached_and_exits_2(tmp_path, capsys):
    argv = ["--quick", "--parts", "retention", "--methods", "grpo", "--seeds", "0", "--steps", "1", "--workers", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert retention.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "no run reached the matched B success" in err[0] and "raise --steps" in err[0]
    result = json.loads((tmp_path / "retention.json").read_text())  # the results are written first
    assert result["parts"] == ["retention"] and "recovery" not in result
    assert result["retention"][0]["A_at_matched_B"] == [None]
    assert "| grpo | not reached (0/1) | not reached (0/1) |" in captured.out
    assert (tmp_path / "retention.png").exists() and not (tmp_path / "recovery.png").exists()


@pytest.mark.parametrize("argv, message", [(["--parts", "recovery"], "needs retention too"),
                                           (["--parts", "nothing"], "--parts must name"),
                                           (["--methods", "opd_full", "--parts", "retention,recovery"], "add sft")])
def test_bad_parts_and_methods_are_one_line(argv, message, tmp_path, capsys):
    assert retention.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in _one_error_line(capsys)
