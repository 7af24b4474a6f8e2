"""Two cheap versions of OPD (python -m opd_mini.experiments shortcuts): --prefix_fraction and --train_prompts in the
loop, the quick run, the docs made from the committed results, and the bad input."""

import json
import math
from pathlib import Path

import pytest

from opd_mini.config import TrainConfig
from opd_mini.experiments import shortcuts, toolkit
from opd_mini.rollouts import fixed_prompts, rollout_tokens, step_examples
from opd_mini.tasks import get_task
from tests.helpers import loop_args, read_log

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "shortcuts.json"
DOCS = ROOT / "docs" / "results.md"


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]


@pytest.mark.parametrize("T", [1, 5, 8, 12, 32])
def test_the_prefix_budget_is_the_ceiling_of_the_fraction(T):
    for k in range(1, 21):
        f = k / 20
        cfg = TrainConfig(max_new_tokens=T, prefix_fraction=f)
        assert rollout_tokens(cfg) == max(1, min(T, math.ceil(round(f * T, 9))))
    assert rollout_tokens(TrainConfig(max_new_tokens=T)) == T


def test_train_prompts_draws_every_step_from_one_fixed_set():
    task = get_task("reverse:5")
    cfg = TrainConfig(train_prompts=3, prompts_per_step=16, seed=4)
    fixed = {e.prompt for e in fixed_prompts(cfg, task, "train")}
    steps = [[e.prompt for e in step_examples(cfg, task, i, "train")] for i in range(5)]
    assert len(fixed) == 3 and all(len(s) == 16 and set(s) <= fixed for s in steps)
    assert set().union(*map(set, steps)) == fixed  # 80 draws from 3 prompts reach all of them
    assert steps == [[e.prompt for e in step_examples(cfg, task, i, "train")] for i in range(5)]  # a resumed run: the same
    assert {e.prompt for e in fixed_prompts(cfg.replace(seed=5), task, "train")} != fixed
    one = TrainConfig(train_prompts=1, prompts_per_step=8)
    assert len({e.prompt for e in step_examples(one, task, 7, "train")}) == 1
    held_out = {e.prompt for e in task.examples(200, seed=1, split="eval")}
    assert not fixed & held_out  # drawn from the training split


def test_a_prefix_run_trains_on_the_prefix_and_evaluates_whole_completions(tiny_student_dir, tiny_model_dir, tmp_path):
    from opd_mini.train import main

    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, tiny_model_dir, out, loss="reverse_kl_full", max_new_tokens=8,
                          prefix_fraction=0.25, eval_every=2)) == 0
    rows = read_log(out)
    steps = [r for r in rows if "time/step" in r]
    assert all(r["rollout/completion_len"] <= 2 for r in steps)  # ceil(0.25 × 8) = 2 tokens a rollout
    assert json.loads((out / "summary.json").read_text())["ran"]["prefix_tokens"] == 2
    assert all(r["eval/completion_len"] > 2 for r in rows if "eval/completion_len" in r)  # whole completions


@pytest.mark.parametrize("flags, message", [
    (dict(prefix_fraction=0), "prefix_fraction=0.0 is out of range; it must be > 0 and <= 1"),
    (dict(prefix_fraction=1.5), "prefix_fraction=1.5 is out of range"),
    (dict(prefix_fraction=0.5, loss="grpo", teacher="none"), "cuts the completions the verifier scores"),
    (dict(train_prompts=-1), "train_prompts=-1 is out of range"),
    (dict(train_prompts=3, task="{FILE}"), "has only 2 training prompt(s)"),
])
def test_bad_input_is_one_line_and_exit_code_2(flags, message, tiny_student_dir, tiny_model_dir, tmp_path, capsys):
    from opd_mini.train import main

    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}>", "answer": str(i)}) + "\n" for i in range(3)))
    flags = {k: (f"jsonl:{data}" if v == "{FILE}" else v) for k, v in flags.items()}
    out = tmp_path / "run"
    teacher = flags.pop("teacher", tiny_model_dir)
    assert main(loop_args(tiny_student_dir, teacher, out, eval_fraction=0.34, **flags)) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortcuts")
    assert shortcuts.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "shortcuts.json").read_text()), out


def test_quick_run_writes_both_parts(quick):
    result, out = quick
    scale = shortcuts.SCALES["quick"]
    assert (out / "shortcuts.png").stat().st_size > 0
    (prefix,), (one,) = result["prefix"], result["one_prompt"]
    full, half = prefix["variants"]["F=1/opd_full"], prefix["variants"]["F=0.5/opd_full"]
    assert _mean(half["tokens"]) < _mean(full["tokens"])  # the prefix draws fewer tokens
    assert _mean(half["truncated"]) > 0.9  # nearly every training rollout is cut at the prefix
    assert set(one["variants"]) == {f"{shortcuts._variant_name('one_prompt', n)}/{m}" for n in scale["train_prompts"]
                                    for m in scale["one_prompt_methods"]}
    assert 0.9 <= prefix["teacher_pass@1"] <= 1.0


def test_committed_results_and_docs_agree():
    """The docs' shortcuts block is generated from the committed shortcuts.json: regenerate both with
    `python -m opd_mini.experiments shortcuts --out tutorials/results`, then `toolkit.write_docs(shortcuts)`."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "shortcuts") == shortcuts.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert shortcuts.claims(result) == result["claims"]


@pytest.mark.parametrize("argv, message", [
    (["--parts", "prefix,nope"], "--parts must name some of"),
    (["--worlds", "nope"], "--worlds must name some of"),
])
def test_bad_experiment_flags_are_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert shortcuts.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    """The docs' (number-free) reading of the shortcuts, statement by statement against shortcuts.json."""
    result = json.loads(COMMITTED.read_text())
    prefix = {w["world"]: w for w in result["prefix"]}

    def final(w, key):
        return _mean(w["variants"][key]["final_pass@1"])

    # reversal: the half prefix ends level with the whole completion for about a third fewer tokens; the quarter loses
    # most of what OPD gains
    rev = prefix["counter_example"]
    assert result["claims"]["counter_example/half_prefix_within_0.05"]["holds"]
    tokens = {k: _mean(v["tokens"]) for k, v in rev["variants"].items()}
    assert 0.6 < tokens["F=0.5/opd_full"] / tokens["F=1/opd_full"] < 0.75
    start = _mean(rev["variants"]["F=1/opd_full"]["start_pass@1"])
    assert final(rev, "F=0.25/opd_full") - start < 0.5 * (final(rev, "F=1/opd_full") - start)
    # the walk: the penalty grows along the completion, and every cut costs, more the shorter the prefix
    walk = prefix["compounding"]
    assert walk["along_abs_gap"][-1] > walk["along_abs_gap"][0]
    finals = [final(walk, f"F={f}/opd_full") for f in ("0.25", "0.5", "1")]
    assert finals == sorted(finals) and finals[1] < finals[2] - 0.05
    assert not result["claims"]["compounding/half_prefix_within_0.05"]["holds"]
    # one prompt or four: below the start on held-out prompts, with OPD and with SFT, in both worlds
    for w in result["one_prompt"]:
        for key, v in w["variants"].items():
            if not key.startswith("all/"):
                assert _mean(v["final_pass@1"]) < _mean(v["start_pass@1"]), (w["world"], key)
        assert not result["claims"][f"{w['world']}/one_prompt_80pct_of_gain"]["holds"]
