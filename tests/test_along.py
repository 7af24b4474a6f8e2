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


def test_the_train_part_reading_agrees_with_the_committed_results():
    """The reading after the along block, on whether clipping or top-K flattens the late update: each number it
    quotes, and each verdict, from the committed along.json (and shortcuts.json for the prefix)."""
    tr = json.loads(COMMITTED.read_text())["train"]
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    by = {e["method"]: e for e in tr["rows"]}
    c = tr["claims"]
    assert tr["steps"] >= 100 and len(tr["seeds"]) >= 3
    assert f"puts {toolkit.fmt(by['opd_sampled']['late_start'], 3)} of its update on positions 7-12" in text
    assert not c["opd_sampled_clip2/flattens"]["holds"] and not c["opd_sampled_clip05/flattens"]["holds"]
    rises = [-c[f"{m}/flattens"]["diff"] for m in ("opd_sampled_clip2", "opd_sampled_clip05")]
    assert all(r > 0 for r in rises) and f"by {rises[0]:.3f} and {rises[1]:.3f}" in text
    assert all(abs(c[f"{m}/flattens"]["diff"]) < c[f"{m}/flattens"]["spread"] for m in ("opd_sampled_clip2",
                                                                                       "opd_sampled_clip05"))
    ends = {m: toolkit.mean(by[m]["final_pass@1"]) for m in by}
    assert not c["opd_sampled_clip2/helps"]["holds"] and not c["opd_sampled_clip05/helps"]["holds"]
    assert f"({ends['opd_sampled_clip2']:.3f} and {ends['opd_sampled_clip05']:.3f} against {ends['opd_sampled']:.3f})" in text
    assert f"ends at {toolkit.fmt(by['opd_sampled_half']['final_pass@1'], 3)}" in text
    assert not c["opd_sampled_half/helps"]["holds"] and ends["opd_sampled_half"] < ends["opd_sampled"]
    for m in ("opd_topk", "opd_topk_tail", "opd_full"):  # the same share late, and higher
        assert not c[f"{m}/flattens"]["holds"] and c[f"{m}/helps"]["holds"], m
    assert f"({ends['opd_topk']:.3f}, {ends['opd_topk_tail']:.3f} and {ends['opd_full']:.3f})" in text
    prefix = next(w for w in json.loads((ROOT / "tutorials" / "results" / "shortcuts.json").read_text())["prefix"]
                  if w["world"] == "compounding")
    half, whole = (toolkit.mean(prefix["variants"][f"F={f}/opd_full"]["final_pass@1"]) for f in ("0.5", "1"))
    assert abs(whole - ends["opd_full"]) < 1e-9  # the same runs: same settings and seeds
    assert f"worth {whole - half:.2f} pass@1" in text and f"{half:.3f} on the first half against {whole:.3f}" in text


def test_the_train_part_runs_and_its_shares_add_up(quick):
    """The quick run's train part: shares are a distribution over positions; the first-half method's are zero past the
    cut; the claims need two seeds (the quick run has one, so it makes none)."""
    tr = quick["train"]
    assert [e["method"] for e in tr["rows"]] == ["opd_sampled", "opd_sampled_clip05"]
    for e in tr["rows"]:
        for when in ("start", "end"):
            shares = [m for m, _ in e[f"shares_{when}"]]
            assert abs(sum(shares) - 1) < 1e-6 and min(shares) >= 0
    assert tr["claims"] == {}


def test_update_shares_equal_per_position_gradients_computed_by_hand():
    """update_shares for full reverse KL, recomputed by hand: the same samples, KL(π‖q) at each position summed over
    the rows that reach it and divided by the batch's token count, the gradient's norm per position, normalised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_mini.config import TrainConfig
    from opd_mini.eval import held_out_examples
    from opd_mini.experiments.worlds import ensure_setting, get_setting
    from opd_mini.sampler import sample
    from opd_mini.tasks import get_task

    paths, setting = ensure_setting("counter_example"), get_setting("counter_example")
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    prompts = [e.prompt for e in held_out_examples(get_task(setting.task), 3, 0)]
    config = {**TrainConfig().to_dict(), "loss": "reverse_kl_full", "max_new_tokens": setting.max_new_tokens}
    got = along.update_shares(student, teacher, tok, prompts, config, seed=5)

    with torch.no_grad():
        r = sample(student, tok, prompts, num_generations=2, max_new_tokens=setting.max_new_tokens, temperature=1.0,
                   seed=5, use_chat_template=False)
    V, n = len(tok), float(r.mask_BT.sum())

    def logp(model):
        out = model(r.input_ids_BL, attention_mask=r.attention_mask_BL, position_ids=r.position_ids_BL()).logits
        return torch.log_softmax(out[:, r.prompt_len - 1:-1, :V].float(), -1)

    with torch.no_grad():
        q = logp(teacher)
    norms = []
    for t in range(setting.max_new_tokens):
        if t >= r.mask_BT.shape[1] or not r.mask_BT[:, t].any():
            norms.append(0.0)
            continue
        student.zero_grad(set_to_none=True)
        p = logp(student)[:, t]
        kl = (p.exp() * (p - q[:, t])).sum(-1)
        (kl[r.mask_BT[:, t]].sum() / n).backward()
        norms.append(float(torch.sqrt(sum((w.grad ** 2).sum() for w in student.parameters() if w.grad is not None))))
    want = [x / sum(norms) for x in norms]
    assert got == pytest.approx(want, abs=1e-5)
    assert sum(got) == pytest.approx(1.0) and sum(x > 0 for x in got) >= 3


def test_an_unknown_part_is_one_line_and_exit_code_2(capsys):
    assert along.main(["--parts", "gap,flat", "--out", "/nonexistent/along", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parts must name some of gap, train" in err[0], err
