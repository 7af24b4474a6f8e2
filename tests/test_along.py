"""The teacher along the sequence (python -m opd_mini.experiments along): the gap against brute force, the quick
run, and the docs made from the committed results."""

import json
from pathlib import Path

import pytest

from opd_mini.experiments import along, toolkit

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "along.json"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("along")
    assert along.main(["--quick", "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "along.json").read_text())


def test_quick_run_measures_every_position_it_reports(quick):
    """At the first position every completion is there, and the teacher finishes from the bare prompt about as often as
    its own pass@1 (both tiny teachers are above 0.9 sampled); success rates are rates."""
    for w in quick["worlds"]:
        assert w["positions"][0] == 0 and w["rows"][0] == quick["prompts"] * quick["samples"]
        assert all(r >= along.MIN_ROWS for r in w["rows"])
        assert w["teacher_to_go"][0][0] > 0.8
        assert all(0 <= m <= 1 for key in ("teacher_to_go", "student_to_go") for m, _ in w[key])
        assert all(a >= 0 for a, _ in w["gap_abs"])


def test_the_gap_is_log_pi_minus_log_q_of_the_sampled_token():
    """measure's r_t at position 0, recomputed by hand from full forwards of both models on the same samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.worlds import ensure_setting
    from opd_mini.losses import token_logprobs
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    job = {"world": "counter_example", "seed": 3, "prompts": 6, "samples": 1, "continuations": 1}
    got = along.measure(job)
    paths = ensure_setting("counter_example")
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    ex = held_out_examples(get_task("reverse:5"), 6, 3)
    r = sample(AutoModelForCausalLM.from_pretrained(paths["student"]).eval(), tok, [e.prompt for e in ex],
               max_new_tokens=8, temperature=1.0, seed=3, use_chat_template=False)
    logp = {}
    with torch.no_grad():
        for name in ("student", "teacher"):
            m = AutoModelForCausalLM.from_pretrained(paths[name]).eval()
            logits = m(r.input_ids_BL, attention_mask=r.attention_mask_BL, position_ids=r.position_ids_BL()).logits
            logp[name] = token_logprobs(logits[:, r.prompt_len - 1:-1].float(), r.tokens_BT)
    gap0 = (logp["student"] - logp["teacher"])[:, 0]
    assert got["gap"]["mean"][0] == pytest.approx(float(gap0.mean()), abs=1e-4)
    assert got["gap"]["abs"][0] == pytest.approx(float(gap0.abs().mean()), abs=1e-4)


def test_committed_results_docs_and_reading_agree():
    """The docs' along block is generated from the committed along.json (`python -m opd_mini.experiments along --out
    tutorials/results`, then `toolkit.write_docs(along)`); the reading after it, statement by statement."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(ROOT / "docs" / "results.md", "along") == along.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    w = {x["world"]: x for x in result["worlds"]}
    walk, rev = w["compounding"], w["counter_example"]
    assert walk["spearman_gap_mean"] > 0.8  # the walk: the gap grows with the position
    means = [m for m, _ in rev["gap_mean"]]
    peak = means.index(max(means))
    assert 0 < peak < len(means) - 1 and means[-2] < means[peak] / 4 and abs(rev["spearman_gap_mean"]) < 0.5
    for x in (walk, rev):  # from about its own pass@1 to near zero
        assert x["teacher_to_go"][0][0] > 0.95 and x["teacher_to_go"][-1][0] < 0.25 and x["spearman_teacher_to_go"] < -0.9
    later = [t for t in range(len(rev["positions"])) if rev["positions"][t] >= 4]  # the fifth position on
    assert all(abs(rev["teacher_to_go"][t][0] - rev["student_to_go"][t][0]) < 0.03 for t in later)
