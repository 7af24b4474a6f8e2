"""Merging experts (python -m opd_mini.experts): the quick run's JSON, what it measured, the README block
and bad input."""

import json
from pathlib import Path

import pytest

from opd_mini import experts

ROOT = Path(__file__).resolve().parents[1]
TASKS = (experts.REVERSE, experts.ADD)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m opd_mini.experts --quick`` (3 seeds) into a temporary directory: (JSON, printed text, out)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("experts")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert experts.main(["--quick", "--seeds", "0,1,2", "--no-progress", "--out", str(out)]) == 0
    return json.loads((out / "experts.json").read_text()), buf.getvalue(), out


def test_quick_run_schema(quick):
    result, printed, out = quick
    assert (out / "experts.png").stat().st_size > 0
    assert result["seeds"] == [0, 1, 2] and result["scale"] == "quick" and result["tasks"] == list(TASKS)
    assert [e["method"] for e in result["methods"]] == list(experts.METHODS)
    for e in result["methods"]:
        assert e["seeds"] == [0, 1, 2] and e["steps"][0] == 0 and e["steps"][-1] == result["steps"]
        for t in TASKS:
            assert len(e["pass@1"][t]) == 3 and all(0 <= x <= 1 for x in e["pass@1"][t])
            assert len(e["kl"][t]) == 3 and all(x > -0.05 for x in e["kl"][t])  # a sampled estimate
            assert all(len(c) == len(e["steps"]) for c in e["curves"]["pass@1"][t])
            # the loop's KL to an expert exists exactly for the tasks the run trains on
            has = all(v is not None for c in e["curves"]["kl"][t] for v in c)
            assert has == (t in e["trained_on"])
        # the final post-hoc evaluation uses the loop's prompts and seeds: it repeats the loop's last numbers
        for t in TASKS:
            assert e["pass@1"][t] == pytest.approx([c[-1] for c in e["curves"]["pass@1"][t]], abs=1e-9)
            for t2 in e["trained_on"]:
                assert e["kl"][t2] == pytest.approx([c[-1] for c in e["curves"]["kl"][t2]], abs=1e-4)
    for t in TASKS:
        assert result["experts"][t]["pass@1"] > 0.9
        assert len(result["start"]["pass@1"][t]) == 3 and len(result["start"]["kl"][t]) == 3
    assert set(result["claims"]) == {"two_teachers_beat_single_on_unseen_task",
                                     "two_teachers_within_0.05_of_single_on_its_task",
                                     "two_teachers_beat_sft_mixture_pass@1", "two_teachers_lower_kl_than_sft_mixture"}
    assert experts.table(result) in printed
    block = experts.readme_section(result, "tutorials/results")
    assert "tutorials/results/experts.json" in block and "tutorials/results/experts.png" in block


def test_quick_run_measured_facts(quick):
    """What the quick run measured (3 seeds, 16 steps; the student knows reversal well, addition weakly)."""
    result, _, _ = quick
    by = {e["method"]: e for e in result["methods"]}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    two, start = by["opd_two_teachers"], result["start"]
    # the two-teacher student beats each single-teacher run on the task that run did not train on
    assert result["claims"]["two_teachers_beat_single_on_unseen_task"]["holds"]
    # distilling addition alone erodes reversal: lower pass@1 than the two-teacher student, KL to the reversal
    # expert above the start's; the two-teacher student keeps reversal while it learns addition
    assert mean(by["opd_add_only"]["pass@1"][experts.REVERSE]) < mean(two["pass@1"][experts.REVERSE])
    assert mean(by["opd_add_only"]["kl"][experts.REVERSE]) > mean(start["kl"][experts.REVERSE])
    # each single-teacher run moves toward its own expert on its own task
    for name, t in (("opd_reverse_only", experts.REVERSE), ("opd_add_only", experts.ADD)):
        assert mean(by[name]["kl"][t]) < mean(start["kl"][t])
    # the two-teacher student moves toward both experts at once
    for t in TASKS:
        assert mean(two["kl"][t]) < mean(start["kl"][t])


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--seeds", "1,1"], "--seeds needs distinct integers"),
    (["--seeds", "-1"], "--seeds needs distinct integers"),
    (["--methods", "opd_two_teachers,magic"], "--methods must name some of"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert experts.main([*argv, "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "experts.json").exists()


def test_readme_experts_block_matches_the_committed_results():
    result = json.loads((ROOT / "tutorials" / "results" / "experts.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- experts:start -->\n", 1)[1].split("\n<!-- experts:end -->", 1)[0]
    assert block == experts.readme_section(result)
    assert len(result["seeds"]) >= 3 and result["scale"] == "full"
