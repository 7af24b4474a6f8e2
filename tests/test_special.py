"""Special-token masking, measured (python -m opd_mini.experiments special): the share of the update on special tokens
against a brute-force count, the quick run, and the docs made from the committed results."""

import json
from pathlib import Path

import pytest

from opd_mini.experiments import special, toolkit

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "special.json"
DOCS = ROOT / "docs" / "results.md"


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("special")
    assert special.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "special.json").read_text())


def test_quick_run_masks_only_where_asked_and_measures_shares(quick):
    (w,) = quick["worlds"]
    assert w["methods"]["opd_sampled_masked"]["ran_mask"] == [True] and w["methods"]["opd_sampled"]["ran_mask"] == [False]
    for key in ("special_token_share", "special_gap_share"):
        assert all(0 < x < 1 for x in w[key])
    # every reversal completion of the start student ends in one EOS within its budget: about 1 token in 6
    assert 0.1 < _mean(w["special_token_share"]) < 0.25


def test_the_special_share_is_the_eos_share_counted_by_hand():
    """start_job's share of special tokens, against counting EOS positions in the same samples."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.worlds import ensure_setting
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    paths = ensure_setting("counter_example")
    job = {"world": "counter_example", "seed": 1, "eval_prompts": 8, "task": "reverse:5", "max_new_tokens": 8,
           "student": paths["student"], "teacher": paths["teacher"], "tokenizer": paths["tokenizer"]}
    got = special.start_job(job)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    ex = held_out_examples(get_task("reverse:5"), 8, 1)
    r = sample(toolkit.load_frozen(paths["student"]), tok, [e.prompt for e in ex], num_generations=4, max_new_tokens=8,
               temperature=1.0, seed=30)
    n_eos = sum(int(t) == tok.eos_token_id for b in range(r.tokens_BT.shape[0])
                for t, m in zip(r.tokens_BT[b].tolist(), r.mask_BT[b].tolist()) if m)
    assert got["special_token_share"] == pytest.approx(n_eos / int(r.mask_BT.sum()))


def test_committed_results_and_docs_agree():
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "special") == special.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert special.claims(result) == result["claims"]


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    result = json.loads(COMMITTED.read_text())
    w = {x["world"]: x for x in result["worlds"]}
    # the walk: a large share of Σ|r_t| on EOS; masked far below unmasked on every seed
    assert _mean(w["compounding"]["special_gap_share"]) > 0.3
    # reversal: little of Σ|r_t| on EOS at the start, yet the masked students stop early and end near zero
    rev = w["counter_example"]
    assert _mean(rev["special_gap_share"]) < 0.1
    masked, plain = rev["methods"]["opd_sampled_masked"], rev["methods"]["opd_sampled"]
    assert _mean(masked["final_pass@1"]) < 0.05 and _mean(masked["final_len"]) < _mean(plain["final_len"]) - 1
    for x in result["worlds"]:
        assert max(x["gap_masked_minus_unmasked"]) < -0.1
        assert not result["claims"][f"{x['world']}/masking_raises_pass@1"]["holds"]
