"""The blog's plateau protocol (python -m opd_mini.experiments plateau): its fits against brute force, its quick run,
the docs made from the committed results, and its bad input."""

import json
import math
from pathlib import Path

import pytest

from opd_mini.experiments import plateau, toolkit

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "plateau.json"
DOCS = ROOT / "docs" / "results.md"


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]


def test_the_log_linear_fit_is_least_squares_and_its_inverse_extrapolates():
    """Exact data a + b·ln N is recovered with r² = 1; noisy data gives the normal equations' solution (brute force
    over a fine grid of (a, b) finds no smaller squared error); the extrapolation inverts the fit; flat data never
    reaches a higher level."""
    n = [64, 128, 256, 512]
    fit = plateau.fit_log_linear(n, [0.1 + 0.05 * math.log(v) for v in n])
    assert fit["a"] == pytest.approx(0.1) and fit["b"] == pytest.approx(0.05) and fit["r2"] == pytest.approx(1.0)
    assert plateau.extrapolate(fit, 0.1 + 0.05 * math.log(3000)) == pytest.approx(3000)
    y = [0.40, 0.52, 0.55, 0.71]
    fit = plateau.fit_log_linear(n, y)

    def sse(a, b):
        return sum((v - a - b * math.log(u)) ** 2 for u, v in zip(n, y))

    best = min(sse(fit["a"] + i * 1e-3, fit["b"] + j * 1e-4) for i in range(-20, 21) for j in range(-20, 21))
    assert sse(fit["a"], fit["b"]) <= best + 1e-12
    assert plateau.extrapolate(plateau.fit_log_linear(n, [0.3] * 4), 0.9) is None


def test_the_plateau_is_the_last_evaluations_and_the_slope_is_per_100_steps():
    curve = {"steps": list(range(0, 110, 10)), "pass@1": [0.2 + 0.001 * s for s in range(0, 110, 10)]}
    got = plateau.plateau_of(curve)
    assert got["slope_per_100"] == pytest.approx(0.1)
    assert got["level"] == pytest.approx(sum(curve["pass@1"][-plateau.PLATEAU_EVALS:]) / plateau.PLATEAU_EVALS)


def test_a_pool_pays_no_sampler_and_fresh_sft_pays_the_teachers():
    kw = dict(tokens=100.0, n_sequences=10, prompt_len=5.0, p_student=1000, p_teacher=3000)
    total = 100 + 10 * 5
    assert plateau.flops_per_step("sft_fresh", **kw) == 2 * 3000 * total + 6 * 1000 * total
    assert plateau.flops_per_step("sft_pool", **kw) == 6 * 1000 * total
    assert plateau.flops_per_step("opd_full", **kw) == 2 * 1000 * total + 2 * 3000 * total + 6 * 1000 * total
    assert plateau.flops_per_step("grpo", **kw) == 2 * 1000 * total + 6 * 1000 * total


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("plateau")
    assert plateau.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "plateau.json").read_text()), out


def test_quick_run_writes_every_part(quick):
    result, out = quick
    scale = plateau.SCALES["quick"]
    assert (out / "plateau.png").stat().st_size > 0 and "plateau" in (out / "plateau.md").read_text()
    assert list(result["sources"]) == list(scale["sources"]) and result["pools"] == list(scale["pools"])
    for r in result["sources"].values():
        for w in r["warm"].values():
            assert len(w["curves"]) == len(result["seeds"]) and w["steps"][-1] == scale["warm_steps"]
        assert list(r["methods"]) == list(scale["methods"])
        for v in r["methods"].values():
            assert v["steps"][-1] == scale["steps"] and v["steps"][1] - v["steps"][0] <= scale["steps"] / 10
            # every method continues from the same plateau student: the same first evaluation per seed
            assert [c[0] for c in v["curves"]] == r["start_pass@1"]


def test_quick_run_opd_recovers_from_slips_that_bc_data_never_shows(quick):
    """From the BC plateau, fresh clean walks teach no recovery and OPD does: success after a slip at this scale was
    0.15 for SFT and 0.47 ± 0.12 for OPD (2 seeds), so a 0.1 margin on the means."""
    result, _ = quick
    by = result["sources"]["bc"]["methods"]
    assert _mean(by["opd_full"]["success_after_slip"]) > _mean(by["sft_fresh"]["success_after_slip"]) + 0.1


def test_committed_results_and_docs_agree():
    """The docs' plateau block is generated from the committed plateau.json: regenerate both with
    `python -m opd_mini.experiments plateau --out tutorials/results`, then `toolkit.write_docs(plateau)`."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "plateau") == plateau.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert plateau.claims(result) == result["claims"]


@pytest.mark.parametrize("argv, message", [
    (["--pools", "8,16"], "--pools needs at least two sizes, each >= 16"),
    (["--pools", "32"], "--pools needs at least two sizes"),
    (["--pools", "a,b"], "--pools must be comma-separated whole numbers"),
    (["--warm_steps", "3"], "--warm_steps=3 is out of range"),
    (["--sources", "bc,nope"], "--sources must name some of"),
    (["--methods", "nope"], "--methods must name some of"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert plateau.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    """The docs' (number-free) reading of the plateau protocol, statement by statement against plateau.json."""
    result = json.loads(COMMITTED.read_text())
    bc, dart = result["sources"]["bc"], result["sources"]["dart"]
    start = _mean(result["world_student_pass@1"])

    def reached(entry, method, f):
        return [x is not None for x in entry["methods"][method][f"sequences_to_{f}"]]

    # clean walks leave the student where it started, at every pool size, and fresh ones do not help
    assert all(abs(_mean(w["level"]) - start) < 0.1 for w in bc["warm"].values())
    for m in ("sft_pool", "sft_fresh"):
        assert not any(reached(bc, m, "0.5"))
        assert abs(_mean(bc["methods"][m]["final_pass@1"]) - _mean(bc["start_pass@1"])) < 0.1
    # OPD reaches 80 % on every seed; the fit's slope is almost flat (low r²) and the claim holds by the fit
    assert all(reached(bc, "opd_full", "0.8")) and bc["fit"]["r2"] < 0.5
    assert result["claims"]["bc_opd_3x_fewer_than_sft"]["holds"]
    assert result["claims"]["bc_opd_3x_fewer_than_sft"]["sft_source"] == "fit"
    # GRPO: half the gap on every seed, 80 % on some but not all; the GRPO aim does not hold
    assert all(reached(bc, "grpo", "0.5")) and 0 < sum(reached(bc, "grpo", "0.8")) < len(result["seeds"])
    assert not result["claims"]["bc_opd_3x_fewer_than_grpo"]["holds"]
    # walks through the slips: the plateau climbs with the pool (a clean fit) and leaves a small gap
    levels = [_mean(w["level"]) for w in dart["warm"].values()]
    assert levels == sorted(levels) and dart["fit"]["r2"] > 0.7
    assert _mean(result["teacher_pass@1"]) - _mean(dart["start_pass@1"]) < 0.2
    # there, by the fit, more data is cheaper than OPD's rollouts; neither reaches 80 % on every seed
    ratio = result["claims"]["dart_opd_3x_fewer_than_sft"]["ratio"]
    assert ratio is not None and ratio < 1
    assert not all(reached(dart, "opd_full", "0.8")) and not all(reached(dart, "sft_fresh", "0.8"))
    opd, sft = dart["methods"]["opd_full"]["sequences_to_0.5"], dart["methods"]["sft_fresh"]["sequences_to_0.5"]
    assert None not in opd and None not in sft  # both reach half the gap on every seed
