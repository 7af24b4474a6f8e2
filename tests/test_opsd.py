"""Privileged-context self-distillation (teacher_template) and GKD's λ (lmbda) through the loop."""

from __future__ import annotations

import pytest
import torch

from opd_mini import train as train_mod
from opd_mini.config import TrainConfig
from opd_mini.train import main
from tests.helpers import loop_args, read_log


def test_the_teacher_reads_the_same_completion_tokens_behind_its_own_prompt(tiny_model, char_tokenizer):
    """with_prompts keeps the completion token for token: the teacher's log-probs of the completion equal a
    brute-force forward over each row's own unpadded 'privileged prompt + completion'."""
    from opd_mini.sampler import sample, with_prompts
    from opd_mini.teacher import score

    prompts = ["12>", "345>"]
    r = sample(tiny_model, char_tokenizer, prompts, num_generations=2, max_new_tokens=5, seed=3)
    privileged = ["12> (the answer is 21)", "345> (the answer is 543)"]
    seen = with_prompts(r, char_tokenizer, privileged, use_chat_template="auto")
    assert torch.equal(seen.tokens_BT, r.tokens_BT) and torch.equal(seen.mask_BT, r.mask_BT)
    assert seen.prompt_len > r.prompt_len
    V = len(char_tokenizer)
    got = score(tiny_model, seen, vocab_size=V).teacher_logp_BT
    for b in range(r.tokens_BT.shape[0]):
        prompt_ids = char_tokenizer(privileged[int(r.prompt_index_B[b])])["input_ids"]
        n = int(r.mask_BT[b].sum())
        completion = r.tokens_BT[b, :n].tolist()
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt_ids + completion])).logits[0].float()
        logp = torch.log_softmax(logits[:, :V], -1)
        expected = torch.stack([logp[len(prompt_ids) - 1 + t, completion[t]] for t in range(n)])
        assert torch.allclose(got[b, :n], expected, atol=1e-5), b
        assert (got[b, n:] == 0).all()
    # the student's own prompt as the template gives exactly the signal without one
    same = with_prompts(r, char_tokenizer, prompts, use_chat_template="auto")
    assert torch.equal(same.input_ids_BL, r.input_ids_BL) and torch.equal(same.attention_mask_BL, r.attention_mask_BL)


def test_opsd_with_a_lora_student_scores_its_base_behind_the_privileged_prompt(tiny_student_dir, tmp_path, monkeypatch):
    from opd_mini import rollouts as rollouts_mod

    seen_prompts = []
    real = rollouts_mod.score

    def spy(model, batch, *, view=None, **kwargs):
        seen_prompts.extend((view or batch).prompt_texts)
        return real(model, batch, view=view, **kwargs)

    monkeypatch.setattr(rollouts_mod, "score", spy)
    plain, opsd = tmp_path / "plain", tmp_path / "opsd"
    common = dict(lora="true", task="reverse:3", eval_every=1)
    assert main(loop_args(tiny_student_dir, "self", plain, **common)) == 0
    seen_prompts.clear()
    assert main(loop_args(tiny_student_dir, "self", opsd, teacher_template="{prompt} (the answer is {answer})",
                          **common)) == 0
    assert seen_prompts and all("(the answer is " in p for p in seen_prompts)
    # the same weights behind the student's own prompt: r_t = 0 exactly; behind the privileged one it is not
    assert read_log(plain)[0]["eval/kl_reverse"] == 0.0
    assert read_log(opsd)[0]["eval/kl_reverse"] != 0.0
    assert read_log(opsd)[1]["loss/total"] != 0.0


@pytest.mark.parametrize("template, message", [
    ("{prompt} hint: {hint}", "names the field {hint}, which the task's examples do not have"),
    ("{prompt}" + "x" * 200, "exceeds the teacher's context of 128 positions"),
])
def test_bad_templates_are_one_line_and_exit_code_2(template, message, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, "self", out, lora="true", teacher_template=template)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "checkpoints").exists()


def test_lmbda_picks_per_step_who_samples_and_is_a_function_of_seed_and_step(tiny_model_dir, tiny_student_dir,
                                                                           tmp_path, monkeypatch):
    who = []
    real = train_mod.micro_batch_pieces

    def spy(*args, by_teacher, **kwargs):
        who.append("teacher" if by_teacher else "student")
        return real(*args, by_teacher=by_teacher, **kwargs)

    monkeypatch.setattr(train_mod, "micro_batch_pieces", spy)
    out = tmp_path / "gkd0"
    assert main(loop_args(tiny_student_dir, tiny_model_dir, out, loss="jsd", lmbda=0.0, steps=3)) == 0
    rows = [r for r in read_log(out) if "optim/grad_norm" in r]
    assert [r["rollout/on_policy"] for r in rows] == [0.0, 0.0, 0.0]
    assert who == ["teacher"] * 3  # λ = 0: the teacher samples every step
    who.clear()
    assert main(loop_args(tiny_student_dir, tiny_model_dir, tmp_path / "gkd1", loss="jsd", steps=3)) == 0
    assert who == ["student"] * 3 and "rollout/on_policy" not in read_log(tmp_path / "gkd1")[1]
    flags = [train_mod.on_policy_step(TrainConfig(lmbda=0.5, loss="jsd", seed=1), i) for i in range(200)]
    assert flags == [train_mod.on_policy_step(TrainConfig(lmbda=0.5, loss="jsd", seed=1), i) for i in range(200)]
    assert 70 < sum(flags) < 130
    assert all(train_mod.on_policy_step(TrainConfig(), i) for i in range(20))
    out = tmp_path / "gkd_half"
    assert main(loop_args(tiny_student_dir, tiny_model_dir, out, loss="jsd", lmbda=0.5, steps=6, seed=1)) == 0
    assert [r["rollout/on_policy"] for r in read_log(out) if "optim/grad_norm" in r] == [float(f) for f in flags[:6]]


def test_lmbda_below_one_with_a_sampled_token_loss_is_refused(tiny_model_dir, tiny_student_dir, tmp_path, capsys):
    assert main(loop_args(tiny_student_dir, tiny_model_dir, tmp_path / "run", lmbda=0.5)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lmbda=0.5 is not allowed with loss=reverse_kl_sampled" in err[0]
