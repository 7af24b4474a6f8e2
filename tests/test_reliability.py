"""No silent wrong results and nothing lost, through the real entry point (``opd_mini.train.main``).

Each case checks the exit code, the message, and that earlier checkpoints and metrics rows survive.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opd_mini import runs
from opd_mini.tasks import get_task
from helpers import loop_args, read_log
from opd_mini.train import main


def first_error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error:"))


@pytest.fixture
def pair(tiny_student_dir, tiny_model_dir) -> dict:
    return {"student": tiny_student_dir, "teacher": tiny_model_dir}


# ---------------------------------------------------------------------------------------------
# a teacher with another tokenizer
# ---------------------------------------------------------------------------------------------


def _save_teacher_with_tokenizer(src: str, dst: Path, tokenizer) -> str:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return str(dst)


def _char_tokenizer_with_swapped(a: str, b: str):
    """The character tokenizer of opd_mini.tiny with two characters' ids exchanged: same size, other meaning."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd_mini.tiny import CHARS, SPECIAL_TOKENS

    tokens = list(SPECIAL_TOKENS + CHARS)
    i, j = tokens.index(a), tokens.index(b)
    tokens[i], tokens[j] = tokens[j], tokens[i]
    backend = Tokenizer(models.WordLevel(vocab={t: k for k, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def test_a_teacher_with_another_vocabulary_is_refused(pair, tmp_path, capsys):
    teacher = _save_teacher_with_tokenizer(pair["teacher"], tmp_path / "swapped", _char_tokenizer_with_swapped("1", "2"))
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], teacher, out)) == 2
    line = first_error_line(capsys.readouterr().err)
    assert "tokenizers differ" in line and "'1'" in line and "'2'" in line
    assert not (out / "metrics.jsonl").exists()
    # the check can be switched off by someone who knows the ids mean the same
    assert main(loop_args(pair["student"], teacher, tmp_path / "unchecked", check_tokenizers="false")) == 0


def test_a_teacher_with_another_chat_template_or_eos_is_refused(pair, char_tokenizer, tmp_path, capsys):
    templated = char_tokenizer.__class__.from_pretrained(pair["teacher"])
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    teacher = _save_teacher_with_tokenizer(pair["teacher"], tmp_path / "templated", templated)
    assert main(loop_args(pair["student"], teacher, tmp_path / "a")) == 2
    assert "chat template" in first_error_line(capsys.readouterr().err)
    assert main(loop_args(pair["student"], teacher, tmp_path / "b", use_chat_template="no")) == 0  # not rendered

    other_eos = char_tokenizer.__class__.from_pretrained(pair["teacher"])
    other_eos.eos_token = "<pad>"
    teacher = _save_teacher_with_tokenizer(pair["teacher"], tmp_path / "eos", other_eos)
    assert main(loop_args(pair["student"], teacher, tmp_path / "c")) == 2
    assert "eos_token" in first_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# --resume: every announced change is applied, the rest is refused
# ---------------------------------------------------------------------------------------------


def test_resume_applies_a_changed_learning_rate(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, lr=1e-3)) == 0
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=4, lr=5e-4, weight_decay=0.1,
                         resume="true")) == 0
    err = capsys.readouterr().err
    assert "applied from step 3" in err and "'lr': (0.001, 0.0005)" in err
    rows = read_log(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["optim/lr"] for r in rows[1:]] == [1e-3, 1e-3, 5e-4, 5e-4]
    state = torch.load(runs.checkpoint_dirs(out)[-1] / "trainer_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


def test_resume_refuses_what_cannot_change_and_loses_nothing(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2)) == 0
    before = (out / "metrics.jsonl").read_text()
    for change in (dict(lora="true"), dict(student=pair["teacher"]), dict(dtype="auto")):
        values = {"student": pair["student"], "teacher": pair["teacher"], **change}
        assert main(loop_args(values.pop("student"), values.pop("teacher"), out, steps=3, resume="true", **values)) == 2
        line = first_error_line(capsys.readouterr().err)
        assert "--resume cannot change" in line and next(iter(change)) in line
    assert (out / "metrics.jsonl").read_text() == before
    assert [p.name for p in runs.checkpoint_dirs(out)] == ["step_000002"]


def test_resume_from_a_damaged_checkpoint_falls_back_or_names_the_file(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, save_every=1, keep_checkpoints=2)) == 0
    newest = runs.checkpoint_dirs(out)[-1] / "trainer_state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=3, save_every=1, keep_checkpoints=2,
                         resume="true")) == 0
    err = capsys.readouterr().err
    assert "step_000002" in err and "cannot be read" in err and "resumed from" in err and "step_000001" in err
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]

    only = tmp_path / "only"
    assert main(loop_args(pair["student"], pair["teacher"], only, steps=1)) == 0
    state = runs.checkpoint_dirs(only)[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(loop_args(pair["student"], pair["teacher"], only, steps=2, resume="true")) == 2
    assert str(state) in first_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# evaluation prompts are held out
# ---------------------------------------------------------------------------------------------


def test_file_tasks_hold_out_their_evaluation_prompts(pair, tmp_path, capsys):
    data = tmp_path / "rev.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n:03d}>", "answer": f"{n:03d}"[::-1]}) + "\n" for n in range(40)))
    task = get_task(f"jsonl:{data}")
    train_prompts = {e.prompt for e in task.examples(200, seed=0, split="train")}
    eval_prompts = {e.prompt for e in task.examples(50, seed=1, split="eval")}
    assert len(eval_prompts) == 4 and len(train_prompts) == 36 and not train_prompts & eval_prompts

    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, task=f"jsonl:{data}", steps=3, eval_prompts=50)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_prompts_trained_on"] == 0.0
    assert summary["eval_source"].startswith("4 of the 40 examples") and "never trained on" in printed


def test_a_generated_task_reports_how_many_eval_prompts_were_trained_on(pair, tmp_path):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, task="reverse:1", steps=3, eval_prompts=5)) == 0
    summary = json.loads((out / "summary.json").read_text())  # reverse:1 has only 10 distinct prompts
    from opd_mini.eval import held_out_examples

    task = get_task("reverse:1")
    trained = {e.prompt for step in range(3) for e in task.examples(4, seed=step)}  # seed 0: seed·1_000_003 + step
    held = {e.prompt for e in held_out_examples(task, 5, seed=0)}
    assert 0 < summary["eval_prompts_trained_on"] == len(held & trained) / len(held)
    assert "fresh random prompts" in summary["eval_source"]


def test_a_separate_eval_file(pair, tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text(json.dumps({"prompt": "12>", "answer": "21"}) + "\n")  # one example: trained on whole
    eval_file.write_text("".join(json.dumps({"prompt": f"{n}>", "answer": str(n)[::-1]}) + "\n" for n in (34, 56)))
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, task=f"jsonl:{train_file}",
                         eval_task=f"jsonl:{eval_file}")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_source"].startswith("2 examples of jsonl:") and summary["eval_prompts_trained_on"] == 0.0


# ---------------------------------------------------------------------------------------------
# one run per out_dir
# ---------------------------------------------------------------------------------------------


def test_a_second_run_into_a_live_out_dir_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=1)) == 0
    before = (out / "metrics.jsonl").read_text()
    with runs.locked_out_dir(out):  # a run in progress
        assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, resume="true")) == 2
        line = first_error_line(capsys.readouterr().err)
        assert "is in use by another run" in line and f"pid {os.getpid()}" in line
    assert (out / "metrics.jsonl").read_text() == before


def test_a_killed_run_leaves_no_stale_lock(pair, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from opd_mini.runs import locked_out_dir\n"
                               f"with locked_out_dir({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    time.sleep(0.1)
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=1)) == 0


def test_an_out_dir_that_is_a_file(pair, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert main(loop_args(pair["student"], pair["teacher"], target)) == 2
    assert "not a directory" in first_error_line(capsys.readouterr().err) and target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# divergence is caught before it becomes NaN, and the kept checkpoint is from before it
# ---------------------------------------------------------------------------------------------


def test_a_gradient_spike_stops_the_run_before_the_step_is_applied(pair, tmp_path, monkeypatch, capsys):
    import dataclasses

    from opd_mini import registry

    spec = registry.LOSS_REGISTRY["reverse_kl_sampled"]
    calls = {"n": 0}

    def blows_up_at_step_14(logp_BT, batch, opts):  # what a too-large step looks like from the gradient's side
        calls["n"] += 1
        loss, metrics = spec.fn(logp_BT, batch, opts)
        return (loss * 1e4, metrics) if calls["n"] == 14 else (loss, metrics)

    monkeypatch.setitem(registry.LOSS_REGISTRY, "reverse_kl_sampled", dataclasses.replace(spec, fn=blows_up_at_step_14))
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=20, save_every=5)) == 3
    err = capsys.readouterr().err
    assert "diverging at step 14" in err and "this step was not applied" in err and "step_000010" in err
    assert "--dtype float32" not in err  # the advice fits the run: it is float32 already
    assert max(r["step"] for r in read_log(out)) == 13
    assert [p.name for p in runs.checkpoint_dirs(out)] == ["step_000010"]
    # the detector is off with --divergence_factor 0, and then the spike is simply applied
    calls["n"] = 0
    assert main(loop_args(pair["student"], pair["teacher"], tmp_path / "off", steps=15, divergence_factor=0)) == 0


def test_healthy_runs_do_not_trip_the_divergence_check(pair, tmp_path):
    for loss in ("reverse_kl_sampled", "reverse_kl_topk", "sft", "grpo"):
        out = tmp_path / loss
        assert main(loop_args(pair["student"], pair["teacher"], out, loss=loss, steps=25)) == 0, loss


# ---------------------------------------------------------------------------------------------
# bad input: one `error:` line, exit code 2, no traceback, from every entry point
# ---------------------------------------------------------------------------------------------


def test_bad_settings_and_files_are_one_line_errors(pair, tmp_path, capsys):
    bad_yaml, bad_json = tmp_path / "run.yaml", tmp_path / "run.json"
    bad_yaml.write_text("lr: [1\n")
    bad_json.write_text('{"lr": 1e-3,}')
    cases = {
        "is not valid YAML": ["--config", str(bad_yaml)],
        "is not valid JSON": ["--config", str(bad_json)],
        "lr=-0.0001 is out of range": ["--lr", "-1e-4"],  # a negative number reaches the range check
        "does not exist": ["--student", str(tmp_path / "no_such_model"), "--device", "cpu"],
        "float16": ["--student", pair["student"], "--teacher", pair["teacher"], "--device", "cpu",
                    "--dtype", "float16", "--out_dir", str(tmp_path / "f16")],
        # without `datasets` (not a requirement) the line names the library; with it (trl brings it) the offline hub
        ("needs the `datasets` library" if importlib.util.find_spec("datasets") is None
         else "cannot load the dataset 'some/dataset'"): ["--student", pair["student"], "--teacher", pair["teacher"], "--device",
                                          "cpu", "--task", "hf:some/dataset", "--out_dir", str(tmp_path / "hf")],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = capsys.readouterr().err
        assert expected in first_error_line(err) and "Traceback" not in err, (expected, err)
    assert main(["--config", str(bad_yaml)]) == 2
    assert str(bad_yaml) in first_error_line(capsys.readouterr().err)  # the message names the file


def test_a_damaged_metrics_log_is_named_on_resume(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=1)) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss/to\n')
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, resume="true")) == 2
    line = first_error_line(capsys.readouterr().err)
    assert str(out / "metrics.jsonl") in line and "line 3" in line


@pytest.mark.parametrize("argv, expected", [
    (["-m", "opd_mini.ablate", "--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["-m", "opd_mini.experiments", "demo", "--steps", "0"], "steps=0 is out of range"),
    (["-m", "opd_mini.tiny", "--task", "bogus"], "unknown task 'bogus'"),
    (["-m", "opd_mini.train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["benchmarks/bench_step.py", "--vocab", "1"], "--vocab must be >= 2"),
    (["-m", "toy", "--out", "a_file"], "exists and is not a directory"),
    (["-m", "toy", "bias-variance", "--gammas", "1.5"], "--gammas must lie in [0, 1]"),
    (["-m", "toy", "forgetting", "--methods", "nope"], "unknown method 'nope'"),
    (["-m", "opd_mini.train", "--student", "no-such-org/no-such-model", "--device", "cpu"], "cannot load the tokenizer"),
])
def test_entry_points_end_bad_input_in_one_line(argv, expected, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    (tmp_path / "a_file").write_text("not a directory")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root)  # python -m toy from another directory
    argv = [str(root / a) if a.endswith(".py") else a for a in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# nothing lost: a new run never writes over an earlier one
# ---------------------------------------------------------------------------------------------


def test_a_new_run_into_an_earlier_runs_out_dir_is_refused_unless_overwrite_which_keeps_it(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=1)) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2)) == 2
    line = first_error_line(capsys.readouterr().err)
    assert "holds an earlier run" in line and "--resume true" in line and "--overwrite true" in line
    assert (out / "metrics.jsonl").read_text() == before
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, overwrite="true")) == 0
    moved = list((out / "replaced").iterdir())
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == before
    assert (moved[0] / "checkpoints" / "step_000001").is_dir() and max(r["step"] for r in read_log(out)) == 2
    assert "moved to" in capsys.readouterr().err


def test_resume_with_no_checkpoint_to_continue_from_touches_nothing(pair, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=1)) == 0
    import shutil

    shutil.rmtree(out / "checkpoints")  # the log of a run whose checkpoints are gone
    before = (out / "metrics.jsonl").read_text()
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, resume="true")) == 2
    assert "no checkpoint to continue from" in first_error_line(capsys.readouterr().err)
    assert (out / "metrics.jsonl").read_text() == before
    # a fresh directory with --resume simply starts
    assert main(loop_args(pair["student"], pair["teacher"], tmp_path / "fresh", steps=1, resume="true")) == 0


@pytest.mark.parametrize("flags, message", [
    (dict(out_dir=" "), "out_dir='' is not allowed"),
    (dict(lr=2.0), "lr=2.0 is out of range; it must be > 0 and < 1"),
    (dict(lr="inf"), "lr=inf is not allowed"),
    (dict(temperature=1e-40), "temperature=1e-40 is out of range; it must be >= 0.01"),
    (dict(task="reverse:3*inf+add:1"), "must be a number in (0, 1e+06]"),
    (dict(task="reverse:3*100+add:1"), "gets none of the 4 prompts of a step"),
    (dict(resume="true", overwrite="true"), "contradict each other"),
    (dict(loss="jsd", loss_args="beta=0.0"), "use --beta 0.0"),
    (dict(teacher_sample_pool=8), "would never be used"),
    (dict(loss="reverse_kl_topk", divergence_backend="compiled"), "has no effect with loss=reverse_kl_topk"),
])
def test_settings_that_would_not_do_what_they_say_are_refused_before_anything_is_written(flags, message, pair,
                                                                                      tmp_path, capsys):
    out = tmp_path / "run"
    flags = {"out_dir": str(out), **flags}
    argv = loop_args(pair["student"], pair["teacher"], Path(flags.pop("out_dir")), **flags)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def test_a_yaml_teacher_map_with_an_empty_teacher_names_the_task(pair, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"task: reverse:3+add:1\nteachers:\n  reverse:3: {pair['teacher']}\n  add:1:\n")
    assert main(["--config", str(config), *loop_args(pair["student"], "tiny", tmp_path / "run")]) == 2
    assert "the task add:1 has an empty teacher" in first_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# input the tokenizer or the loader cannot read
# ---------------------------------------------------------------------------------------------


def test_characters_outside_the_char_tokenizer_name_the_file_line_and_character(pair, tmp_path, capsys):
    data = tmp_path / "words.jsonl"
    data.write_text(json.dumps({"prompt": "ab>", "answer": "ba"}) + "\n"
                    + json.dumps({"prompt": "café>", "answer": "éfac"}, ensure_ascii=False) + "\n")
    assert main(loop_args(pair["student"], pair["teacher"], tmp_path / "run", task=f"jsonl:{data}")) == 2
    line = first_error_line(capsys.readouterr().err)
    assert f"{data}, line 2" in line and "'é' (U+00E9)" in line and "unknown token" in line


def test_a_directory_that_is_not_a_model_names_what_it_lacks(pair, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    assert main(loop_args(str(empty), pair["teacher"], tmp_path / "a")) == 2
    line = first_error_line(capsys.readouterr().err)
    assert str(empty) in line and "no config.json" in line
    assert main(loop_args(pair["student"], pair["teacher"], tmp_path / "b", tokenizer=str(empty))) == 2
    line = first_error_line(capsys.readouterr().err)
    assert str(empty) in line and "tokenizer.json" in line


# ---------------------------------------------------------------------------------------------
# plugins, Ctrl-C, a slow death, quiet by default
# ---------------------------------------------------------------------------------------------


def test_a_plugin_that_fails_to_import_or_returns_a_non_scalar_loss_is_one_line(pair, tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    assert main([*loop_args(pair["student"], pair["teacher"], tmp_path / "a"), "--loss_plugins", str(broken)]) == 2
    line = first_error_line(capsys.readouterr().err)
    assert str(broken) in line and "line 1" in line and "SyntaxError" in line
    vector = tmp_path / "vector_loss.py"
    vector.write_text("from opd_mini import registry\n\n"
                      "@registry.register('per_token', kind='token', signal='sampled')\n"
                      "def per_token(logp_BT, batch, opts):\n    return -logp_BT, {}\n")
    assert main([*loop_args(pair["student"], pair["teacher"], tmp_path / "b"), "--loss_plugins", str(vector),
                 "--loss", "per_token"]) == 2
    line = first_error_line(capsys.readouterr().err)
    assert "'per_token'" in line and "not a scalar tensor" in line


def test_a_plugin_that_replaces_a_built_in_loss_says_so_and_the_summary_records_it(pair, tmp_path, capsys):
    from opd_mini import registry

    original = registry.LOSS_REGISTRY["sft"]
    plugin = tmp_path / "my_sft.py"
    plugin.write_text("from opd_mini import losses, registry\n\n"
                      "@registry.register('sft', kind='token', signal=None, rollouts='teacher', replace=True)\n"
                      "def my_sft(logp_BT, batch, opts):\n"
                      "    return losses.sft_cross_entropy(logp_BT, batch.mask_BT, num_tokens=batch.num_tokens)\n")
    try:
        out = tmp_path / "run"
        assert main([*loop_args(pair["student"], pair["teacher"], out), "--loss_plugins", str(plugin), "--loss",
                     "sft"]) == 0
        assert "registered over the built-in opd_mini.registry._sft" in capsys.readouterr().err
        ran = json.loads((out / "summary.json").read_text())["ran"]["loss"]
        assert ran["function"].endswith("my_sft") and ran["file"] == str(plugin.resolve())
        assert ran["replaced"] == "opd_mini.registry._sft"
    finally:
        registry.LOSS_REGISTRY["sft"] = original


def test_ctrl_c_names_the_checkpoint_and_the_resume_command_and_exits_130(pair, tmp_path):
    out = tmp_path / "run"
    argv = loop_args(pair["student"], pair["teacher"], out, steps=400, save_every=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # a shell that starts a job in the background (`cmd &`, as some CI runners do) gives it SIGINT ignored, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt: give the run the terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "opd_mini.train", *argv], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within a minute of Ctrl-C")
    assert proc.returncode == 130, err[-1500:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: the newest checkpoint is") and "--resume true" in last
    assert "Traceback" not in err
    assert main(loop_args(pair["student"], pair["teacher"], out, steps=2, save_every=1, resume="true")) == 0


def test_a_slow_death_is_reported_as_a_warning():
    from opd_mini.guards import SLOW_DEATH_STEPS, slow_death

    healthy = [1.0] * SLOW_DEATH_STEPS + [0.9] * SLOW_DEATH_STEPS
    assert slow_death(healthy, [0.5 - 0.01 * i for i in range(2 * SLOW_DEATH_STEPS)]) is None
    dead = [1.0] * SLOW_DEATH_STEPS + [1e-6] * SLOW_DEATH_STEPS
    message = slow_death(dead, [2.5] * (2 * SLOW_DEATH_STEPS))
    assert message and "stopped learning" in message and "2.5" in message
    assert slow_death(dead, [2.5 - 0.1 * i for i in range(2 * SLOW_DEATH_STEPS)]) is None  # the loss still moves


def test_a_slow_death_warns_through_the_loop(pair, tmp_path, monkeypatch, capsys):
    import dataclasses

    from opd_mini import registry

    spec = registry.LOSS_REGISTRY["reverse_kl_sampled"]
    calls = {"n": 0}

    def fades(logp_BT, batch, opts):  # the gradient vanishes after step 10 while the loss stays at 1
        calls["n"] += 1
        loss, metrics = spec.fn(logp_BT, batch, opts)
        scale = 1.0 if calls["n"] <= 10 else 1e-7
        flat = loss * scale - (loss * scale).detach() + 1.0  # value 1, gradient scale · d(loss)
        return flat, {**metrics, "loss/total": flat.detach()}

    monkeypatch.setitem(registry.LOSS_REGISTRY, "reverse_kl_sampled", dataclasses.replace(spec, fn=fades))
    assert main(loop_args(pair["student"], pair["teacher"], tmp_path / "run", steps=21, divergence_factor=0)) == 0
    assert "warning: step" in capsys.readouterr().err


def test_library_notices_are_filtered_unless_asked_for():
    import logging

    import opd_mini  # noqa: F401  (sets the filters)

    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= logging.ERROR


def test_samplers_refuse_a_distribution_that_is_not_one(tiny_model, char_tokenizer):
    from opd_mini.sampler import NotADistributionError, sample

    with torch.no_grad():
        tiny_model.lm_head.weight.fill_(float("nan"))
    for method in ("generate", "decode"):
        with pytest.raises(NotADistributionError, match="not finite"):
            sample(tiny_model, char_tokenizer, ["12>"], max_new_tokens=3, method=method, seed=0)
