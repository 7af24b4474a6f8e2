"""The hidden-flag teacher (python -m opd_mini.experiments hidden): the flag tasks, the refusals, the geometric and
arithmetic means against brute force, the quick run, and the docs made from the committed results.

The quick run's assertions were chosen against the seed spread measured at this scale, each with its margin
in the comment beside it."""

import json
import math
from pathlib import Path

import pytest
import torch

from opd_mini.experiments import hidden, toolkit, worlds
from opd_mini.tasks import FlagTask, get_task
from tests.helpers import loop_args

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "hidden.json"
DOCS = ROOT / "docs" / "results.md"


def test_flags_are_drawn_per_example_at_rate_rho_and_shared_by_the_visible_control():
    h, v = get_task("hidden:0.3:walk:10"), get_task("visible:0.3:walk:10")
    a, b = h.examples(4000, seed=1, split="train"), v.examples(4000, seed=1, split="train")
    rate = sum(e.hidden == FlagTask.FLAG for e in a) / len(a)
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    for x, y in zip(a, b):  # the same flags; the control shows them in the prompt, the hidden task does not
        assert y.prompt == x.hidden + x.prompt and y.hidden == "" and not x.prompt.startswith(FlagTask.FLAG)
        assert h.reward(x.answer, x) == v.reward(y.answer, y) == 1.0
    # the same prompt text is flagged in some draws and not in others: the flag is not a function of the prompt
    by_prompt: dict[str, set] = {}
    for e in a:
        by_prompt.setdefault(e.prompt, set()).add(e.hidden)
    assert sum(len(s) == 2 for s in by_prompt.values()) > len(by_prompt) / 2
    assert get_task("hidden:0:walk:10").examples(50, seed=0)[0].hidden == ""
    assert all(e.hidden == FlagTask.FLAG for e in get_task("hidden:1:walk:10").examples(50, seed=0))


@pytest.mark.parametrize("spec, message", [("hidden:1.5:walk:10", "0 <= RHO <= 1"), ("hidden:walk:10", "hidden:RHO:SPEC"),
                                           ("visible:0.5", "visible:RHO:SPEC")])
def test_bad_flag_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_task(spec)


def test_the_teacher_template_reads_the_hidden_flag(tiny_student_dir, tiny_model_dir, tmp_path, monkeypatch):
    from opd_mini import rollouts, train

    seen = []
    real = rollouts.score

    def score(model, batch, *, view=None, **kw):
        seen.extend((view or batch).prompt_texts)
        return real(model, batch, view=view, **kw)

    monkeypatch.setattr(rollouts, "score", score)
    out = tmp_path / "run"
    assert train.main(loop_args(tiny_student_dir, tiny_model_dir, out, task="hidden:0.5:walk:10",
                                teacher_template="{hidden}{prompt}", loss="reverse_kl_full")) == 0
    flagged = [p for p in seen if p.startswith(FlagTask.FLAG)]
    assert flagged and len(flagged) < len(seen)  # about half of the teacher's prompts carry the flag
    assert json.loads((out / "summary.json").read_text())["config"]["teacher_template"] == "{hidden}{prompt}"


@pytest.mark.parametrize("flags, message", [
    (dict(task="walk:10", teacher_template="{hidden}{prompt}"), "carry no hidden context"),
    (dict(task="visible:0.5:walk:10", teacher_template="{hidden}{prompt}"), "already shows the flag"),
])
def test_a_flag_the_setting_cannot_hide_is_refused(flags, message, tiny_student_dir, tiny_model_dir, tmp_path, capsys):
    from opd_mini import train

    out = tmp_path / "run"
    assert train.main(loop_args(tiny_student_dir, tiny_model_dir, out, **flags)) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_means_against_brute_force():
    """The geometric and arithmetic means means_kl builds, on a 3-token example by hand."""
    clean, flagged, rho = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.5, 0.4, 0.1]), 0.5
    g = clean ** (1 - rho) * flagged ** rho
    g = g / g.sum()
    a = (1 - rho) * clean + rho * flagged
    log_g = torch.log_softmax((1 - rho) * clean.log() + rho * flagged.log(), -1)
    log_a = torch.logaddexp(clean.log() + math.log(1 - rho), flagged.log() + math.log(rho))
    assert torch.allclose(log_g.exp(), g) and torch.allclose(log_a.exp(), a)
    # the geometric mean drops the flagged teacher's error further than the arithmetic mean does
    assert g[1] < a[1] and g[0] > a[0]


def test_the_hidden_flag_worlds_are_what_their_recipes_say():
    for name, eta in (("hidden_flag", 0.3), ("hidden_flag_mild", 0.15)):
        info = worlds.ensure_setting(name)["info"]
        assert info["teacher"]["reached"] and info["teacher"]["recipe"]["p"] == eta
        final = info["teacher"]["final"]
        assert final["sampled"] >= 0.95 and final["flagged_sampled"] <= final["sampled"] - 0.25


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("hidden")
    assert hidden.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "hidden.json").read_text())


@pytest.mark.kernels
def test_quick_run_opd_lands_on_the_geometric_mean_and_sft_on_the_arithmetic(quick):
    """Quick scale (ρ = 0.5, η = 0.3, 60 steps; measured on 2 seeds): OPD ends 0.26-0.38 above SFT, so the bound 0.15
    holds with a margin of several seed spreads; per token, OPD's student is nearer the geometric mean than the
    arithmetic one (0.35-0.39 against 0.41-0.46) and SFT's the other way round (0.72-0.74 against 0.59)."""
    (cell,) = quick["cells"]
    opd, sft = cell["methods"]["opd_full"], cell["methods"]["sft"]
    for a, b in zip(opd["pass@1"], sft["pass@1"]):
        assert a - b > 0.15, (opd["pass@1"], sft["pass@1"])
    assert all(g < a for g, a in zip(opd["kl_to_geometric"], opd["kl_to_arithmetic"]))
    assert all(a < g for g, a in zip(sft["kl_to_geometric"], sft["kl_to_arithmetic"]))


def test_committed_results_and_docs_agree():
    """The docs' hidden block is generated from the committed hidden.json: regenerate both with
    `python -m opd_mini.experiments hidden --out tutorials/results`, then `toolkit.write_docs(hidden)`."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "hidden") == hidden.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 5


@pytest.mark.parametrize("argv, message", [
    (["--rhos", "0"], "--rhos needs shares in (0, 1]"),
    (["--rhos", "1.2"], "--rhos needs shares in (0, 1]"),
    (["--etas", "0.2"], "--etas must be some of"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert hidden.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    """The docs' (number-free) reading of hidden.json, statement by statement."""
    result = json.loads(COMMITTED.read_text())
    cells = {(c["rho"], c["eta"]): c for c in result["cells"]}
    head = cells[hidden.HEADLINE]
    # above the teacher at the headline cell on every seed, SFT below it; SFT below the teacher in every cell
    assert min(head["methods"]["opd_full"]["margin_over_teacher"]) > 0
    assert max(head["methods"]["sft"]["margin_over_teacher"]) < 0
    assert all(toolkit.mean_std(c["methods"]["sft"]["margin_over_teacher"])[0] < 0 for c in result["cells"])
    # the mechanism: OPD nearer the geometric mean, SFT nearer the arithmetic one, wherever 0 < rho < 1
    for c in result["cells"]:
        if 0 < c["rho"] < 1:
            opd, sft = c["methods"]["opd_full"], c["methods"]["sft"]
            assert _mean(opd["kl_to_geometric"]) < _mean(opd["kl_to_arithmetic"]), c
            assert _mean(sft["kl_to_arithmetic"]) < _mean(sft["kl_to_geometric"]), c
    # where it vanishes: at rho = 1 no method ends above the teacher by more than a seed standard deviation;
    # at rho = 0.25 the OPD margin is smaller than at 0.5
    for c in result["cells"]:
        if c["rho"] == 1:
            for m in c["methods"].values():
                mean, sd = toolkit.mean_std(m["margin_over_teacher"])
                assert mean <= sd, (c["eta"], m)
    for eta in result["etas"]:
        margin = {rho: _mean(cells[(rho, eta)]["methods"]["opd_full"]["margin_over_teacher"]) for rho in (0.25, 0.5)}
        assert margin[0.25] < margin[0.5], (eta, margin)
    # the control: above the teacher at the headline cell (the aim of "within 0.05" does not hold), level with the
    # hidden-flag OPD student (their means within the larger seed standard deviation)
    visible = head["methods"]["opd_full_visible"]
    assert not result["claims"]["visible_control_within_0.05_of_teacher"]["holds"]
    assert _mean(visible["margin_over_teacher"]) > 0.05
    sd = max(toolkit.mean_std(v)[1] for v in (visible["pass@1"], head["methods"]["opd_full"]["pass@1"]))
    assert abs(_mean(visible["pass@1"]) - _mean(head["methods"]["opd_full"]["pass@1"])) < sd


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]
