"""A teacher close to the student (python -m opd_mini.experiments sdft): SFT on the reference answers
(``--teacher answers``), KL(π₀ ‖ π) on the trained task's prompts and the zero-forcing share against brute force, the
world, the quick run, and the docs made from the committed results."""

import json
from pathlib import Path

import pytest
import torch

from opd_mini.config import TrainConfig
from opd_mini.experiments import sdft, toolkit, worlds
from opd_mini.tasks import Example, get_task
from tests.helpers import loop_args, read_log

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "sdft.json"
DOCS = ROOT / "docs" / "results.md"


def test_teacher_answers_trains_on_exactly_the_reference_answers(tiny_student_dir):
    from opd_mini.models import load_models
    from opd_mini.rollouts import sample_batch

    cfg = TrainConfig(student=tiny_student_dir, teacher="answers", loss="sft", lora=True, device="cpu",
                      dtype="float32", task="reverse:3", num_generations=3).validate()
    m = load_models(cfg, torch.device("cpu"), torch.float32)
    examples = get_task("reverse:3").examples(4, seed=0)
    batch = sample_batch(cfg, m, examples, by_teacher=True, teacher=m.teacher_for("reverse:3"), seed=0)
    assert batch.completions == [e.answer for e in examples for _ in range(3)]
    assert batch.prompt_index_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for b, e in enumerate(e for e in examples for _ in range(3)):  # the answer's characters, then EOS, all trained
        ids = batch.tokens_BT[b][batch.mask_BT[b]].tolist()
        assert ids == m.tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [m.tokenizer.eos_token_id]
        assert batch.prompt_texts[batch.prompt_index_B[b]] == e.prompt


@pytest.mark.parametrize("flags, message", [
    (dict(loss="reverse_kl_full"), "use it with loss=sft"),
    (dict(loss="sft", teacher_template="{prompt} (the answer is {answer})"), "does not apply to teacher='answers'"),
    (dict(loss="sft", teachers="reverse:3=self"), "contradict each other"),
])
def test_teacher_answers_with_what_it_cannot_do_is_one_line_and_exit_code_2(flags, message, tiny_student_dir,
                                                                            tmp_path, capsys):
    from opd_mini import train

    out = tmp_path / "run"
    assert train.main(loop_args(tiny_student_dir, "answers", out, **flags)) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_kl_to_init_on_the_trained_task_matches_a_brute_force_computation(tiny_model_dir, tiny_student_dir):
    """eval/kl_to_init = mean over π₀'s sampled tokens of the eval prompts of log π₀(y_t) − log π(y_t)."""
    from opd_mini.eval import adapter_disabled, evaluate, held_out_examples, held_out_seed
    from opd_mini.forward import sampled_token_logprobs
    from opd_mini.models import TeacherRef, load_models
    from opd_mini.rollouts import sample_batch
    from opd_mini.sampler import sample

    cfg = TrainConfig(student=tiny_student_dir, teacher=tiny_model_dir, lora=True, device="cpu", dtype="float32",
                      eval_kl_to_init=True, max_new_tokens=4)
    m = load_models(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in m.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    base = TeacherRef(m.student, True, "")
    init = lambda prompts, n, seed: sample_batch(cfg, m, [Example(p, "") for p in prompts], by_teacher=True,  # noqa: E731
                                                 teacher=base, seed=seed, num_generations=n, exact=True)
    task = get_task("reverse:3")
    out = evaluate(m.student, m.tokenizer, task, num_prompts=3, num_samples=2, k=1, max_new_tokens=4, sample_init=init)
    prompts = [e.prompt for e in held_out_examples(task, 3, 0)]
    with adapter_disabled(m.student):
        r = sample(m.student, m.tokenizer, prompts, num_generations=2, max_new_tokens=4, temperature=1.0,
                   seed=held_out_seed(0) + 2, behaviour_logp="forward")
        logp0 = sampled_token_logprobs(m.student, r)
    logp = sampled_token_logprobs(m.student, r)
    expected = float(((logp0 - logp)[r.mask_BT]).sum() / r.mask_BT.sum())
    assert out["eval/kl_to_init"] == pytest.approx(expected, abs=1e-6) and expected != 0


def test_forbidden_share_against_a_hand_count():
    from opd_mini.eval import forbidden_share

    r = torch.tensor([[12.0, 1.0, -0.5], [3.0, 20.0, 9.0]])
    logq = torch.tensor([[-11.0, -1.0, -0.1], [-2.0, -25.0, -10.5]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the 9.0 (log q < −10) is padding
    assert forbidden_share(r, logq, mask) == pytest.approx((12.0 + 20.0) / (12.0 + 1.0 - 0.5 + 3.0 + 20.0))
    assert forbidden_share(-r.abs(), logq, mask) == 0.0  # a non-positive estimate has no share to give


def test_the_sdft_world_is_what_its_recipe_says():
    info = worlds.ensure_setting("sdft")["info"]
    final = info["student"]["final"]
    assert info["student"]["reached"] and info["teacher"] is None
    assert final["sampled"] <= 0.3 and final["privileged_sampled"] >= 0.9 and final["mix_sampled"] >= 0.9


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdft")
    assert sdft.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "sdft.json").read_text())


def test_quick_run_starts_at_pi0_and_moves_away_on_both_tasks(quick):
    """At step 0 the adapter is zero, so the KL to π₀ is exactly 0 on both tasks' prompts; 30 steps later every run
    has moved on B's prompts (at this scale 0.3-0.9 nats per token on 3 seeds; the bound is a twentieth of that)."""
    for e in quick["methods"]:
        for s in range(len(e["seeds"])):
            assert e["kl_to_init_curves"][s][0] == 0.0 and e["retention_kl_to_init_curves"][s][0] == 0.0
        assert min(e["kl_B_final"]) > 0.02, e["method"]
    by = {e["method"]: e for e in quick["methods"]}
    assert by["sft_answers"]["forbidden_share_start"] == [None] * 3  # no teacher to forbid anything
    assert all(0 <= x <= 1 for x in by["sdft_full"]["forbidden_share_start"])


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    """The reading after the sdft block in docs/results.md, statement by statement."""
    result = json.loads(COMMITTED.read_text())
    by = {(e["method"], e["lr"]): e for e in result["methods"]}
    lrs = list(dict.fromkeys(e["lr"] for e in result["methods"]))
    high, low = max(lrs), min(lrs)

    def m(key, name, lr):
        got = [x for x in by[(name, lr)][key] if x is not None]
        return toolkit.mean_std(got)[0] if got else None

    sdft_names = [n for n in sdft.METHODS if n.startswith("sdft_")]
    for lr in lrs:  # the privileged teacher is the closer one at the start, and the less zero-forcing
        assert m("kl_to_teacher_start", "sdft_full", lr) < m("kl_to_teacher_start", "opd_expert", lr)
        assert m("forbidden_share_start", "sdft_full", lr) < 0.5 * m("forbidden_share_start", "opd_expert", lr)
        for name in (n for n in sdft_names if (n, lr) in by):  # yet SDFT forgets more, and later
            if m("A_drop_at_matched_B", name, lr) is not None:
                assert m("A_drop_at_matched_B", name, lr) > m("A_drop_at_matched_B", "sft_answers", lr)
                assert m("steps_to_matched_B", name, lr) > m("steps_to_matched_B", "sft_answers", lr)
        reached = [n for n in (*sdft_names, "opd_expert", "grpo") if (n, lr) in by and None not in by[(n, lr)]["A_drop_at_matched_B"]]
        for sft in ("sft_answers", "sft_expert"):  # the Razor between methods
            for name in reached:
                assert m("kl_B_at_matched_B", sft, lr) < m("kl_B_at_matched_B", name, lr), (sft, name, lr)
                assert m("A_drop_at_matched_B", sft, lr) < m("A_drop_at_matched_B", name, lr), (sft, name, lr)
    reach_high = {n: by[(n, high)]["A_drop_at_matched_B"] for n in sdft_names}
    assert [n for n, d in reach_high.items() if any(x is not None for x in d)] == ["sdft_full"]
    assert None in reach_high["sdft_full"]  # not in every seed
    assert all(None not in by[(n, low)]["A_drop_at_matched_B"] for n in ("sdft_full", "sdft_sampled"))
    assert min(sdft_names, key=lambda n: m("B_final", n, high)) == "sdft_moving"
    corr = result["correlation"]
    assert corr["every_eval"]["spearman_kl_A"] > 0.95 and corr["every_eval"]["spearman_kl_B"] < 0.8
    assert all(corr[f"every_eval_lr_{lr:g}"]["spearman_kl_B"] >= 0.8 for lr in lrs)
    assert m("A_drop_final", "control_A", high) < 0 and result["claims"]["control_keeps_A"]["holds"]
    assert not result["claims"]["sdft_drop_at_most_half_of_sft_answers"]["holds"]


def test_committed_results_and_docs_agree():
    """The docs' sdft block is generated from the committed sdft.json: regenerate both with
    `python -m opd_mini.experiments sdft --out tutorials/results`, then `toolkit.write_docs(sdft)`."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "sdft") == sdft.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    assert [e["method"] for e in result["methods"] if e["lr"] == sdft.HEADLINE_LR] == list(sdft.METHODS)


def test_bad_methods_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert sdft.main(["--methods", "sft,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods must name some of" in err[0], err
    assert not any(tmp_path.iterdir())
