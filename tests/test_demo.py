"""Smoke test of the demo command: a few steps, one seed, the table's rows and values in [0, 1]."""

import json

from opd_mini.demo import main


def test_demo_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--steps", "2", "--seeds", "0", "--losses", "reverse_kl_sampled,reverse_kl_topk",
                 "--eval_prompts", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == [
        "teacher",
        "student before (SFT warm start)",
        "continued SFT on teacher samples, equal samples",
        "OPD (reverse_kl_sampled), equal samples",
        "OPD (reverse_kl_topk), equal samples",
        "continued SFT on teacher samples, equal wall time (= reverse_kl_sampled's)",
    ]
    for r in result["rows"]:
        assert r["method"] in printed
        for key in ("eval/pass@1", "eval/pass@k"):
            assert 0.0 <= r[key] <= 1.0
        assert r["eval/kl_reverse"] >= 0.0
    assert (out / "demo.md").read_text().startswith("Task ")
