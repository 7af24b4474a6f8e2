"""Top-K as Fu et al. run it (python -m opd_mini.experiments topk): the quick run, the docs made from the committed
results, and a recipe whose K or top-p is out of range."""

import json
from pathlib import Path

import pytest
import yaml

from opd_mini.experiments import topk, toolkit

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "topk.json"
DOCS = ROOT / "docs" / "results.md"


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("topk")
    assert topk.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "topk.json").read_text())


def test_quick_run_has_every_method_at_every_k_and_top_p(quick):
    scale = topk.SCALES["quick"]
    got = {(e["top_p"], e["method"], e["k"]) for e in quick["rows"]}
    want = {(p, m, k) for p in scale["top_ps"] for m in topk.METHODS
            for k in (scale["ks"] if "topk" in topk.METHODS[m]["loss"] else [None])}
    assert got == want and quick["vocab"] == 101
    for e in quick["rows"]:
        assert all(x > 0 for x in e["entropy"]) and all(x is not None and x >= 0 for x in e["grad_norm_cv"])


def test_committed_results_and_docs_agree():
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "topk") == topk.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert topk.claims(result) == result["claims"]


@pytest.mark.parametrize("field, value, message", [
    ("ks", [1, 8], "every K must lie in [2, V=101]"),
    ("ks", [8, 500], "every K must lie in [2, V=101]"),
    ("top_ps", [0.0], "every top-p must lie in (0, 1]"),
    ("top_ps", [1.5], "every top-p must lie in (0, 1]"),
])
def test_a_k_or_top_p_out_of_range_is_one_line_and_exit_code_2(field, value, message, tmp_path, capsys):
    data = yaml.safe_load(toolkit.recipe_path("topk").read_text())
    data["scales"]["quick"][field] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert topk.main(["--quick", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    result = json.loads(COMMITTED.read_text())
    row = {(e["top_p"], e["method"], e["k"]): e for e in result["rows"]}
    ks, tps = result["ks"], result["top_ps"]

    def final(p, m, k=None):
        return _mean(row[(p, m, k)]["final_pass@1"])

    def entropy(p, m, k=None):
        return _mean(row[(p, m, k)]["entropy"])

    big = max(ks)
    for p in tps:
        # at the largest K top-K is above sampled-token by more than the spread; at the smaller ones below it
        assert result["claims"][f"top_p={p:g}/topk_above_sampled"]["holds"]
        assert result["claims"][f"top_p={p:g}/topk_above_sampled"]["k"] == big
        assert final(p, "opd_topk", min(ks)) < final(p, "opd_sampled")
        spread = max(toolkit.mean_std(row[key]["final_pass@1"])[1] for key in ((p, "opd_topk", 8), (p, "opd_sampled", None)))
        assert final(p, "opd_topk", 8) < final(p, "opd_sampled") + spread
        # the smallest renormalised K has the highest entropy of all
        assert entropy(p, "opd_topk", min(ks)) == max(_mean(e["entropy"]) for e in result["rows"] if e["top_p"] == p)
        # the tail: every K about the same (within 0.05), at or above the best renormalised K (within 0.02), lowest
        # entropy of all
        tails = [final(p, "opd_topk_tail", k) for k in ks]
        assert max(tails) - min(tails) < 0.05 and min(tails) > max(final(p, "opd_topk", k) for k in ks) - 0.03
        assert max(entropy(p, "opd_topk_tail", k) for k in ks) < min(
            _mean(e["entropy"]) for e in result["rows"] if e["top_p"] == p and e["method"] != "opd_topk_tail")
    # no stability difference: every grad-norm CV within 0.2 of each other; no run collapsed
    cvs = [_mean(e["grad_norm_cv"]) for e in result["rows"]]
    assert max(cvs) - min(cvs) < 0.2 and all(e["collapsed"] == 0 for e in result["rows"])
    # top-p 0.9 costs sampled-token OPD (lower, higher entropy); top-K at the largest K ends higher with it
    assert final(0.9, "opd_sampled") < final(1.0, "opd_sampled") and entropy(0.9, "opd_sampled") > entropy(1.0, "opd_sampled")
    assert final(0.9, "opd_topk", big) > final(1.0, "opd_topk", big)
