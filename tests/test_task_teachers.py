"""Mixtures of tasks, one teacher per task, starting from a saved adapter, and KL(π₀ ‖ π) on a retention task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_mini.config import TrainConfig, parse_teachers
from opd_mini.tasks import Example, MixTask, get_task, task_of
from opd_mini.train import METRIC_DOCS, main
from tests.helpers import loop_args, read_log


# --------------------------------------------------------------------------------------------
# mixtures
# --------------------------------------------------------------------------------------------


def test_mixture_takes_each_share_by_weight_and_scores_by_the_example_task():
    task = get_task("reverse:3*3+add:1")
    assert isinstance(task, MixTask) and [t.name for t, _ in task.parts] == ["reverse:3", "add:1"]
    for n in range(0, 23):
        counts = task.counts(n)
        assert sum(counts) == n and all(abs(c - n * w / 4) < 1 for c, w in zip(counts, (3, 1)))
    ex = task.examples(8, seed=5)
    assert [e.task for e in ex] == ["reverse:3"] * 6 + ["add:1"] * 2
    # the same draws as the parts alone: a mixture changes nothing of each task's examples
    assert [e.prompt for e in ex[:6]] == [e.prompt for e in get_task("reverse:3").examples(6, seed=5)]
    assert ex == task.examples(8, seed=5) and ex != task.examples(8, seed=6)
    a, b = ex[0], ex[-1]
    assert task.rewards([a.answer, b.answer, b.answer], [a, b, a]) == [1.0, 1.0, 0.0]
    assert task_of(a, task) == "reverse:3" and task_of(Example("1>", "1"), get_task("reverse:1")) == "reverse:1"
    with pytest.raises(ValueError, match="not a part"):
        task.reward("1", Example("12>", "21", task="walk:5"))


@pytest.mark.parametrize("spec, message", [("reverse:3*0+add:1", "must be a number in"), ("reverse:3*inf+add:1", "must be a number in"), ("reverse:3+reverse:3", "twice"),
                                           ("reverse:3+nope:1", "unknown task")])
def test_bad_mixture_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        get_task(spec)


def test_teachers_field_syntax():
    assert parse_teachers("reverse:3=/a/b; add:1=/c@4bit;walk:5=self") == {
        "reverse:3": ("/a/b", "none"), "add:1": ("/c", "4bit"), "walk:5": ("self", "none")}
    assert parse_teachers("") == {}
    # a YAML/JSON mapping becomes the same string
    assert TrainConfig(teachers={"reverse:3": "/a", "add:1": "/b@8bit"}).teachers == "reverse:3=/a;add:1=/b@8bit"
    for bad, message in (("reverse:3", "not TASK=TEACHER"), ("a=1;a=2", "twice"), ("a=self@4bit", "cannot be quantized")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(teachers=bad)


# --------------------------------------------------------------------------------------------
# one teacher per task, through the loop
# --------------------------------------------------------------------------------------------


def test_each_rollout_is_scored_by_its_task_teacher_and_no_teacher_is_loaded_twice(
        tiny_model_dir, tiny_student_dir, tmp_path, monkeypatch, char_tokenizer):
    from opd_mini import models, rollouts as rollouts_mod
    from opd_mini.tiny import build_tiny_model

    other = tmp_path / "other_teacher"
    build_tiny_model("teacher", char_tokenizer, seed=7).save_pretrained(other)
    char_tokenizer.save_pretrained(other)
    loads, scored = [], []
    real_load, real_score = models.load_teacher, rollouts_mod.score
    monkeypatch.setattr(models, "load_teacher", lambda path, **kw: loads.append(path) or real_load(path, **kw))

    def spy(model, batch, *, view=None, **kw):
        scored.append((model.name_or_path, sorted({p.rstrip(">=") for p in (view or batch).prompt_texts})))
        return real_score(model, batch, view=view, **kw)

    monkeypatch.setattr(rollouts_mod, "score", spy)
    teachers = f"reverse:3={tiny_model_dir};add:1={other};walk:5={tiny_model_dir}"
    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, "tiny", out, task="reverse:3+add:1+walk:5", teachers=teachers,
                          prompts_per_step=6, eval_every=1)) == 0
    assert sorted(loads) == sorted([tiny_model_dir, str(other)])  # the shared teacher once
    train_pieces = scored[:len(scored)]
    by_teacher = {}
    for name, prompts in train_pieces:
        by_teacher.setdefault(name, set()).update(prompts)
    # reverse prompts are digits then '>', add prompts 'a+b=', walk prompts 'a>b='
    assert all("+" in p for p in by_teacher[str(other)])
    assert not any("+" in p for p in by_teacher[tiny_model_dir])
    rows = read_log(out)
    for key in ("reward/mean/reverse:3", "reward/mean/add:1", "reward/mean/walk:5"):
        assert key in rows[1]
    evals = [r for r in rows if "eval/pass@1" in r]
    for r in evals:  # the mixture's eval keys are the mean over its tasks
        parts = [r[f"eval/pass@1/{t}"] for t in ("reverse:3", "add:1", "walk:5")]
        assert r["eval/pass@1"] == pytest.approx(sum(parts) / 3)
        assert r["eval/kl_reverse"] == pytest.approx(sum(r[f"eval/kl_reverse/{t}"] for t in ("reverse:3", "add:1",
                                                                                              "walk:5")) / 3)
    documented = {k.rsplit("/", 1)[0] + "/TASK" if k.count("/") >= 2 else k for r in rows for k in r}
    assert documented <= set(METRIC_DOCS), documented - set(METRIC_DOCS)


@pytest.mark.parametrize("teachers, message", [
    ("reverse:3=PATH", "the task add:1 has no teacher in --teachers"),
    ("reverse:3=PATH;add:1=PATH;walk:5=PATH", "names the task walk:5, which is not part of --task"),
])
def test_teacher_map_that_does_not_fit_the_task_is_one_line_and_exit_code_2(
        teachers, message, tiny_model_dir, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = loop_args(tiny_student_dir, "tiny", out, task="reverse:3+add:1", teachers=teachers.replace("PATH", tiny_model_dir))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "checkpoints").exists()


def test_sft_on_a_mixture_takes_each_task_samples_from_its_own_teacher(tiny_model_dir, tiny_student_dir, tmp_path,
                                                                       monkeypatch):
    """sft with a LoRA student: the replay task's samples come from the student's own base (adapter disabled)."""
    from opd_mini import rollouts as rollouts_mod

    calls = []
    real = rollouts_mod.sample

    def spy(model, tokenizer, prompts, **kw):
        calls.append((type(model).__name__, "+" in prompts[0]))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(rollouts_mod, "sample", spy)
    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, "tiny", out, task="reverse:3+add:1", loss="sft", lora="true",
                          teachers=f"reverse:3={tiny_model_dir};add:1=self")) == 0
    train_calls = calls  # eval samples from the student (PeftModel) too; the teacher-sampled pieces are these
    assert ("LlamaForCausalLM", False) in train_calls  # reverse prompts: the separate teacher
    assert ("PeftModelForCausalLM", True) in train_calls  # add prompts: the student's base, adapter disabled


# --------------------------------------------------------------------------------------------
# init_adapter and KL(π₀ ‖ π) on the retention task
# --------------------------------------------------------------------------------------------


def test_init_adapter_continues_exactly_where_the_saved_adapter_was(tiny_model_dir, tiny_student_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = dict(lora="true", retention_task="add:1", eval_kl_to_init="true", lr=1e-2)
    assert main(loop_args(tiny_student_dir, tiny_model_dir, first, **common)) == 0
    adapter = next((first / "checkpoints").iterdir()) / "model"
    assert main(loop_args(tiny_student_dir, tiny_model_dir, second, init_adapter=adapter, steps=1, **common)) == 0
    end, start = read_log(first)[-1], read_log(second)[0]
    for key in ("eval/pass@1", "eval/kl_reverse", "eval/retention_pass@1", "eval/retention_kl_to_init"):
        assert start[key] == end[key], key  # the same weights, prompts and seeds: the same numbers
    assert read_log(first)[0]["eval/retention_kl_to_init"] == 0.0  # a fresh adapter is zero: π = π₀ exactly
    assert end["eval/retention_kl_to_init"] != 0.0  # a sampled estimate: it moved (it may be below 0 on few tokens)


def test_retention_kl_to_init_matches_a_brute_force_computation(tiny_model_dir, tiny_student_dir):
    """eval/retention_kl_to_init = mean over π₀'s sampled tokens of log π₀(y_t) − log π(y_t), π₀ = the adapter off."""
    from opd_mini.eval import adapter_disabled, evaluate
    from opd_mini.models import TeacherRef, load_models
    from opd_mini.sampler import sample
    from opd_mini.forward import sampled_token_logprobs

    cfg = TrainConfig(student=tiny_student_dir, teacher=tiny_model_dir, lora=True, device="cpu", dtype="float32",
                      retention_task="add:1", eval_kl_to_init=True, max_new_tokens=4)
    m = load_models(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in m.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    base = TeacherRef(m.student, True, "")
    from opd_mini.rollouts import sample_batch

    init = lambda prompts, n, seed: sample_batch(cfg, m, [Example(p, "") for p in prompts], by_teacher=True,  # noqa: E731
                                                 teacher=base, seed=seed, num_generations=n, exact=True)
    out = evaluate(m.student, m.tokenizer, get_task("reverse:3"), num_prompts=3, num_samples=2, k=1, max_new_tokens=4,
                   retention_task=get_task("add:1"), sample_init=init)
    from opd_mini.eval import held_out_examples, held_out_seed

    prompts = [e.prompt for e in held_out_examples(get_task("add:1"), 3, 0, "all")]
    with adapter_disabled(m.student):
        r = sample(m.student, m.tokenizer, prompts, num_generations=2, max_new_tokens=4, temperature=1.0,
                   seed=held_out_seed(0) + 1, behaviour_logp="forward")
        logp0 = sampled_token_logprobs(m.student, r)
    logp = sampled_token_logprobs(m.student, r)
    mask = r.mask_BT
    expected = float(((logp0 - logp)[mask]).sum() / mask.sum())
    assert out["eval/retention_kl_to_init"] == pytest.approx(expected, abs=1e-6) and expected != 0  # it moved


@pytest.mark.parametrize("overrides, message", [
    (dict(eval_kl_to_init="true", retention_task="add:1"), "eval_kl_to_init=true needs lora=true"),
    (dict(init_adapter="/nowhere"), "init_adapter='/nowhere' needs lora=true"),
    (dict(lora="true", init_adapter="/nowhere"), "holds no adapter_config.json"),
])
def test_bad_init_adapter_and_kl_to_init_are_one_line_and_exit_code_2(overrides, message, tiny_model_dir,
                                                                       tiny_student_dir, tmp_path, capsys):
    assert main(loop_args(tiny_student_dir, tiny_model_dir, tmp_path / "run", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    import re

    assert re.search(message, err[0]), err[0]


def test_an_adapter_of_another_base_is_refused(tiny_model_dir, tiny_student_dir, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(loop_args(tiny_model_dir, tiny_model_dir, first, lora="true", steps=1)) == 0
    adapter = next((first / "checkpoints").iterdir()) / "model"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(loop_args(tiny_student_dir, tiny_model_dir, tmp_path / "second", lora="true", init_adapter=adapter)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "was trained on the base" in err[-1] and str(Path(tiny_student_dir)) in err[-1]


def test_a_teacher_that_would_read_other_tokens_stops_the_run_before_any_update(tiny_model_dir, tiny_student_dir,
                                                                                  tmp_path, capsys):
    """Same vocabulary, same special tokens, no chat template, but the teacher's tokenizer puts BOS in front
    of every prompt: the vocabulary check passes, the rendering check before the first update does not."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    teacher = tmp_path / "bos_teacher"
    shutil.copytree(tiny_model_dir, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.save_pretrained(teacher)
    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, str(teacher), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the teacher would score other tokens than the student's" in err[0], err
    assert "'<bos>'" in err[0]
    assert not (out / "checkpoints").exists() and not [r for r in read_log(out) if "optim/grad_norm" in r]
    # the same teacher with the check switched off trains
    assert main(loop_args(tiny_student_dir, str(teacher), tmp_path / "run2", check_tokenizers="false")) == 0


def test_a_mixed_evaluation_with_a_teacher_for_only_some_tasks_reports_the_kl_where_there_is_one(
        tiny_model_dir, tiny_student_dir, tmp_path):
    out = tmp_path / "run"
    assert main(loop_args(tiny_student_dir, "tiny", out, task="reverse:3", teachers=f"reverse:3={tiny_model_dir}",
                          eval_task="reverse:3+add:1")) == 0
    first = read_log(out)[0]
    assert "eval/kl_reverse/reverse:3" in first and "eval/kl_reverse/add:1" not in first
    assert "eval/kl_reverse" not in first  # no mean over tasks of which one has no teacher
    assert first["eval/pass@1"] == pytest.approx((first["eval/pass@1/reverse:3"] + first["eval/pass@1/add:1"]) / 2)
