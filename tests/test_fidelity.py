"""Teacher fidelity (python -m opd_mini.experiments fidelity): the measures against brute force, the rendering
check's errors, the command's quick run and the docs block."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_mini.batch import Batch
from opd_mini.experiments import fidelity, toolkit
from opd_mini.experiments.worlds import ensure_setting
from opd_mini.models import check_rendering
from opd_mini.sampler import sample
from opd_mini.teacher import score
from opd_mini.tiny import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["3>7=", "8>2=", "0>5=", "6>1="]


@pytest.fixture(scope="module")
def world():
    paths = ensure_setting("compounding", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    return paths, tokenizer, student


@pytest.fixture(scope="module")
def rollouts(world):
    _, tokenizer, student = world
    return sample(student, tokenizer, PROMPTS, num_generations=4, max_new_tokens=12, seed=0)


# --- the measures ----------------------------------------------------------------------------------------


def _brute_kl(p_logp, q_logp):
    """Σ_v p(v) (log p(v) − log q(v)) at one position, term by term in Python floats."""
    total = 0.0
    for lp, lq in zip(p_logp.tolist(), q_logp.tolist()):
        if lp != -math.inf:
            total += math.exp(lp) * (lp - lq)
    return total


def test_token_kl_equals_a_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(2, 3, 7, generator=g) * 2, -1)
    q = torch.log_softmax(torch.randn(2, 3, 7, generator=g) * 2, -1)
    p[0, 1, 4] = -math.inf  # p(v) = 0 adds nothing, even where q(v) is tiny
    p[0, 1] = torch.log_softmax(p[0, 1], -1)
    kl = fidelity.token_kl(p, q)
    for b in range(2):
        for t in range(3):
            assert kl[b, t].item() == pytest.approx(_brute_kl(p[b, t], q[b, t]), abs=1e-12)
    assert (fidelity.token_kl(p, p) == 0).all()


def test_compare_signals_on_a_hand_made_pair_equals_brute_force():
    p = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]]))
    q = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]]))
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[True, True, False]])

    def signal(logp):  # the batch as opd_mini.teacher.score(..., full=True) returns it
        return Batch(tokens_BT=ids, mask_BT=mask, teacher_logp_BT=logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1),
                     teacher_logp_BTV=logp)

    out = fidelity.compare_signals(signal(p), signal(q), mask)
    kls = [_brute_kl(p[0, t], q[0, t]) for t in (0, 1)]
    assert out["kl"] == pytest.approx(sum(kls) / 2, abs=1e-7)
    assert out["kl_max"] == pytest.approx(max(kls), abs=1e-7)
    assert out["top1_agreement"] == 0.5  # position 0 agrees (token 0), position 1 not (1 vs 2); 2 is masked out
    assert out["mean_abs_dlogq"] == pytest.approx((abs(math.log(0.6 / 0.7)) + abs(math.log(0.5 / 0.4))) / 2, abs=1e-6)
    assert out["tokens"] == 2 and sum(out["kl_histogram"]) == 2
    with pytest.raises(ValueError, match="selects no token"):
        fidelity.compare_signals(signal(p), signal(q), torch.zeros(1, 3, dtype=torch.bool))


def test_a_model_against_itself_is_exactly_zero_and_agrees_everywhere(world, rollouts):
    paths, tokenizer, student = world
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    V = len(tokenizer)
    out = fidelity.compare_signals(score(teacher, rollouts, vocab_size=V, full=True),
                                   score(teacher, rollouts, vocab_size=V, full=True), rollouts.mask_BT)
    assert out["kl"] == 0.0 and out["kl_max"] == 0.0 and out["top1_agreement"] == 1.0 and out["mean_abs_dlogq"] == 0.0
    assert out["tokens"] == rollouts.num_masked
    # two loads of the same weights through compare_teachers: the reference row and the copy are both exact
    res = fidelity.compare_teachers(paths["teacher"], student, tokenizer, PROMPTS, versions=("none", "none"), seed=0)
    assert res["versions"]["none"]["kl"] == 0.0 and res["versions"]["none"]["top1_agreement"] == 1.0
    assert fidelity.kl_to_teacher(student, student, tokenizer, PROMPTS) == 0.0
    assert fidelity.kl_to_teacher(student, teacher, tokenizer, PROMPTS) > 0.1


# --- does the teacher score what the student generated? ---------------------------------------------------

TEMPLATE_A = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}:{% endif %}"
TEMPLATE_B = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"


def _tokenizer(tmp_path, name, *, chat_template=None, swap=None):
    """The character tokenizer through save_pretrained / from_pretrained, with a chat template, or with the ids of
    the two characters ``swap`` exchanged in its vocabulary."""
    tok = build_char_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    path = tmp_path / name
    tok.save_pretrained(path)
    if swap is not None:
        data = json.loads((path / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = swap
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (path / "tokenizer.json").write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(path)


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_rendering_check_passes_when_teacher_and_student_read_the_same(world, rollouts, tmp_path):
    _, tokenizer, student = world
    check_rendering(tokenizer, tokenizer, rollouts, use_chat_template="auto")
    check_rendering(tokenizer, _tokenizer(tmp_path, "same"), rollouts, use_chat_template="auto", prompts=PROMPTS)
    # a teacher template that is not used (prompts rendered raw on both sides)
    check_rendering(tokenizer, _tokenizer(tmp_path, "b", chat_template=TEMPLATE_B), rollouts,
                             use_chat_template=False)
    # both with the same template: the raw prompts are recovered from the student's rendered ones
    templated = _tokenizer(tmp_path, "a", chat_template=TEMPLATE_A)
    r = sample(student, templated, PROMPTS, num_generations=2, max_new_tokens=6, seed=1)
    assert r.prompt_texts[0] == "[3>7=]:"
    check_rendering(templated, _tokenizer(tmp_path, "a2", chat_template=TEMPLATE_A), r, use_chat_template="auto")


def test_rendering_check_names_a_different_chat_template(world, rollouts, tmp_path):
    _, tokenizer, student = world
    with pytest.raises(ValueError) as e:
        check_rendering(tokenizer, _tokenizer(tmp_path, "b", chat_template=TEMPLATE_B), rollouts,
                                 use_chat_template="auto")
    text = _one_line(e)
    P = rollouts.prompt_len
    assert f"row 0, position {P - 4} (prompt token 0) holds '3'" in text and "has '<'" in text, text
    assert "chat template" in text and "--check_tokenizers false" in text
    # the student rendered with template A, the teacher renders with template B
    templated = _tokenizer(tmp_path, "a", chat_template=TEMPLATE_A)
    r = sample(student, templated, PROMPTS, num_generations=1, max_new_tokens=4, seed=0)
    with pytest.raises(ValueError, match=r"row 0, .*holds '\[' .* has '<' .*another chat template") as e:
        check_rendering(templated, _tokenizer(tmp_path, "b2", chat_template=TEMPLATE_B), r,
                                 use_chat_template="auto")
    _one_line(e)
    with pytest.raises(ValueError, match="cannot render the prompts.*no chat template"):
        check_rendering(templated, tokenizer, r, use_chat_template=True)


def test_rendering_check_names_a_different_vocabulary(world, rollouts, tmp_path):
    _, tokenizer, _ = world
    swapped = _tokenizer(tmp_path, "swapped", swap=("R", "L"))
    assert swapped.convert_tokens_to_ids("R") == tokenizer.convert_tokens_to_ids("L")
    with pytest.raises(ValueError) as e:
        check_rendering(tokenizer, swapped, rollouts, use_chat_template="auto")
    text = _one_line(e)
    # the first row's first completion token is a move, which the swapped vocabulary reads as the other move
    first = tokenizer.convert_ids_to_tokens(int(rollouts.tokens_BT[0, 0]))
    other = {"R": "L", "L": "R"}[first]
    assert first in ("R", "L")
    assert (f"row 0, position {rollouts.prompt_len} (completion token 0) holds '{first}'" in text
            and f"reads id {tokenizer.convert_tokens_to_ids(first)} as '{other}'" in text), text
    assert "give the teacher the student's tokenizer" in text and "--check_tokenizers false" in text


# --- the command ---------------------------------------------------------------------------------------------


def test_quick_command_writes_the_json_the_figure_and_the_table(tmp_path, capsys):
    out = tmp_path / "fidelity"
    assert fidelity.main(["--quick", "--seeds", "0", "--workers", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity.png").stat().st_size > 10_000
    assert {"scale", "setting", "versions", "steps", "seeds", "run", "teachers", "opd", "wall_s"} <= set(result)
    assert result["versions"] == ["none", "8bit", "4bit"] and result["seeds"] == [0]
    t = result["teachers"]["versions"]
    assert t["none"]["kl"] == 0.0 and t["none"]["top1_agreement"] == 1.0 and t["none"]["mean_abs_dlogq"] == 0.0
    # measured: 8-bit ≈ 1e-4 nats, 4-bit ≈ 4e-3 nats per token on the student's rollouts
    assert 0 < t["8bit"]["kl"] < t["4bit"]["kl"] < 0.05
    for v in ("8bit", "4bit"):
        assert 0.9 < t[v]["top1_agreement"] < 1.0 + 1e-12 and t[v]["mean_abs_dlogq"] > 0
        assert {"kl", "kl_max", "kl_quantiles", "kl_histogram", "tokens", "teacher_pass@1"} <= set(t[v])
    for v in result["versions"]:
        o = result["opd"][v]
        assert {"final_pass@1", "kl_to_full", "kl_to_full_start", "pass@1", "steps", "delta_pass@1"} <= set(o)
        assert o["steps"][-1] == result["steps"] and len(o["kl_to_full"]) == 1
    assert result["opd"]["none"]["delta_pass@1"] == [0.0]
    printed = capsys.readouterr().out
    assert fidelity.table(result) in printed and "| 4-bit (NF4) |" in printed
    block = fidelity.docs_block(result, "tutorials/results")
    assert "fidelity.json" in block and "tutorials/results/fidelity.png" in block


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--seeds", "1,1"], "--seeds needs distinct integers"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert fidelity.main([*argv, "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "fidelity.json").exists()


def test_docs_fidelity_block_matches_the_committed_results():
    result = json.loads((ROOT / "tutorials" / "results" / "fidelity.json").read_text())
    block = toolkit.read_block(ROOT / "docs" / "results.md", "fidelity")
    assert block == fidelity.docs_block(result, "../tutorials/results")
    assert len(result["seeds"]) >= 3
