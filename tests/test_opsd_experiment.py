"""OPSD against OPD against SFT (python -m opd_mini.experiments opsd): the quick run's schema, the measures against
brute force, what the quick run measures, the committed results against the docs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_mini.experiments import opsd, toolkit

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "opsd.json"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("opsd")
    assert opsd.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "opsd.json").read_text()), out


def test_quick_run_writes_the_schema_and_the_figure(quick):
    result, out = quick
    assert (out / "opsd.png").stat().st_size > 0
    assert (out / "opsd.md").read_text() == opsd.docs_block(result, str(out)) + "\n"
    assert [e["method"] for e in result["methods"]] == list(opsd.METHODS)
    assert result["seeds"] == [0, 1, 2] and result["kinds"] == ["answer", "eos", "other"]
    T = result["run"]["max_new_tokens"]
    for e in result["methods"]:
        assert e["seeds"] == [0, 1, 2] and len(e["pass@1_curves"]) == 3
        for when in ("start", "end"):
            for key in ("pass@1", f"pass@{opsd.K}", "entropy", "diversity", "kl"):
                assert len(e[when][key]) == 3, (e["method"], when, key)
            assert all(1 <= d <= result["samples"] for d in e[when]["diversity"])
            assert all(0 <= p <= q <= 1 for p, q in zip(e[when]["pass@1"], e[when][f"pass@{opsd.K}"]))
            for split, n in (("by_position", T), ("by_kind", 3)):
                for key in ("share", "abs_share"):
                    for shares in e[when][split][key]:
                        assert len(shares) == n and sum(shares) == pytest.approx(1.0, abs=1e-9)
            # both splits count the same tokens
            assert [sum(c) for c in e[when]["by_position"]["count"]] == [sum(c) for c in e[when]["by_kind"]["count"]]
    # only the clipped method clips, and it does clip some tokens
    clip = {e["method"]: e["clip_frac"] for e in result["methods"]}
    assert all(x is not None and x > 0 for x in clip["opsd_clipped"])
    assert clip["opsd"] == [None, None, None] or all(x == 0 for x in clip["opsd"])


def test_diversity_against_brute_force():
    completions = ["RR", "RR", "RL", "", "L", "L", "L", "L", "RRR", "LR", "RL", "RRR"]
    index = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # prompt 0: {"RR", "RL", ""} = 3; prompt 1: {"L"} = 1; prompt 2: {"RRR", "LR", "RL"} = 3
    assert opsd.distinct_per_prompt(completions, index) == pytest.approx(7 / 3)
    # order does not matter, and samples of one prompt need not be adjacent
    assert opsd.distinct_per_prompt(completions[::-1], index[::-1]) == pytest.approx(7 / 3)


def test_log_ratio_shares_against_brute_force():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.3
    groups = torch.randint(0, 4, (5, 7), generator=g)
    got = opsd.log_ratio_shares(r, mask, groups, 4)
    for k in range(4):
        s = sum(float(r[b, t]) for b in range(5) for t in range(7) if mask[b, t] and groups[b, t] == k)
        a = sum(abs(float(r[b, t])) for b in range(5) for t in range(7) if mask[b, t] and groups[b, t] == k)
        n = sum(1 for b in range(5) for t in range(7) if mask[b, t] and groups[b, t] == k)
        total = sum(float(r[b, t]) for b in range(5) for t in range(7) if mask[b, t])
        abs_total = sum(abs(float(r[b, t])) for b in range(5) for t in range(7) if mask[b, t])
        assert got["sum"][k] == pytest.approx(s, abs=1e-9) and got["abs_sum"][k] == pytest.approx(a, abs=1e-9)
        assert got["count"][k] == n
        assert got["share"][k] == pytest.approx(s / total, rel=1e-9)
        assert got["abs_share"][k] == pytest.approx(a / abs_total, rel=1e-9)
    # a hand-made case: positions of two completions "RL<eos>" and "R<eos><pad>" with r = (1, −2, 3 | 4, 5, 99)
    r = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pos = opsd.log_ratio_shares(r, mask, torch.arange(3).expand(2, 3), 3)
    assert pos["sum"] == [5.0, 3.0, 3.0] and pos["count"] == [2, 2, 1]
    assert pos["share"] == pytest.approx([5 / 11, 3 / 11, 3 / 11])
    assert pos["abs_share"] == pytest.approx([5 / 15, 7 / 15, 3 / 15])
    # a zero total gives zero shares, not a division by zero
    assert opsd.log_ratio_shares(torch.zeros(2, 3), mask, torch.zeros(2, 3, dtype=torch.long), 2)["share"] == [0.0, 0.0]


def test_token_kinds(char_tokenizer):
    ids = torch.tensor([char_tokenizer("RL", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id],
                        char_tokenizer("R x", add_special_tokens=False)["input_ids"]])
    answer = set(char_tokenizer("LR", add_special_tokens=False)["input_ids"])
    assert opsd.token_kinds(ids, answer, char_tokenizer.eos_token_id).tolist() == [[0, 0, 1], [0, 2, 2]]


def test_measure_against_the_model_itself_gives_zero_log_ratio(tiny_model, char_tokenizer):
    """q = the sampling model itself: r_t = 0 exactly on every token (the log-probs come from the same forward),
    and pass@1, diversity and entropy match a brute-force recount of the same seeded samples."""
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    task = get_task("reverse:3")
    examples = task.examples(4, seed=1)
    m = opsd.measure(tiny_model, char_tokenizer, task, examples, opsd.model_scorer(tiny_model, char_tokenizer),
                     max_new_tokens=5, seed=3)
    assert m["kl"] == 0.0 and all(s == 0.0 for s in m["by_position"]["sum"])
    r = sample(tiny_model, char_tokenizer, [e.prompt for e in examples], num_generations=opsd.SAMPLES,
               max_new_tokens=5, temperature=1.0, seed=3)
    groups = [r.completions[i * opsd.SAMPLES:(i + 1) * opsd.SAMPLES] for i in range(4)]
    assert m["diversity"] == pytest.approx(sum(len(set(x)) for x in groups) / 4)
    assert m["pass@1"] == pytest.approx(sum(task.reward(c, examples[i]) for i, x in enumerate(groups) for c in x) / 32)
    assert sum(m["by_position"]["count"]) == int(r.mask_BT.sum())
    assert m["entropy"] > 0


def test_what_the_quick_run_measures(quick):
    """Facts that do not depend on the training budget, measured on the quick run."""
    result, _ = quick
    chk, ctl = result["privileged_check"]["student"], result["privileged_check"]["control"]
    # the student warm-started with privileged prompts reads the answer off them; the one that never saw them does
    # not: behind the privileged prompt it is much worse (measured 0.27 -> 0.03 sampled pass@1)
    assert chk["privileged_pass@1"] > chk["plain_pass@1"] + 0.1
    assert chk["privileged_answer_logp"] > chk["plain_answer_logp"]
    assert ctl["privileged_pass@1"] < 0.5 * ctl["plain_pass@1"]
    assert ctl["privileged_answer_logp"] < ctl["plain_answer_logp"] - 3
    by = {e["method"]: e for e in result["methods"]}
    # every method starts from the same π₀ with the same samples: the start's pass@1, entropy, diversity agree
    for key in ("pass@1", "entropy", "diversity"):
        assert len({tuple(e["start"][key]) for e in by.values()}) == 1, key
    # the two OPSD methods share the teacher, so their start KL is the same; the separate expert is further from π₀
    # than the student's own base behind the privileged prompt (measured 1.7 against 0.44 nats per token)
    assert by["opsd"]["start"]["kl"] == by["opsd_clipped"]["start"]["kl"]
    assert all(a > b for a, b in zip(by["opd"]["start"]["kl"], by["opsd"]["start"]["kl"]))
    # at the start, OPSD's sampled KL sits on EOS far beyond EOS's share of the tokens (measured 0.75 against 0.24)
    eos = opsd.KINDS.index("eos")
    for share, count in zip(by["opsd"]["start"]["by_kind"]["share"], by["opsd"]["start"]["by_kind"]["count"]):
        assert share[eos] > 2 * count[eos] / sum(count)


def test_committed_results_match_the_docs():
    result = json.loads(COMMITTED.read_text())
    block = toolkit.read_block(ROOT / "docs" / "results.md", "opsd")
    assert block == opsd.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert [e["method"] for e in result["methods"]] == list(opsd.METHODS)
    assert (ROOT / "tutorials" / "results" / "opsd.png").stat().st_size > 0
    from opd_mini.experiments.worlds import get_setting

    assert get_setting(opsd.SETTING).student.p == 0.8  # the block says "four fifths of its prompts privileged"


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--seeds", "1,1"], "--seeds needs distinct integers"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--methods", "opsd,ppo"], "--methods must name some of opsd, opsd_clipped, opd, sft"),
    (["--methods", "opd,sft"], "--methods must include opsd"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert opsd.main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
