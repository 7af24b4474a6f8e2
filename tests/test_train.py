"""The training loop through its real entry point (``opd_mini.train.main``), on tiny random-init models."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_mini import train as train_mod
from opd_mini import registry
from opd_mini.config import TrainConfig
from opd_mini.train import METRIC_DOCS, main


@pytest.fixture(scope="session")
def model_paths(tiny_model_dir, tiny_student_dir) -> dict[str, str]:
    """Random-init tiny teacher (2 layers, hidden 64) and student (1 layer, hidden 48) from conftest."""
    return {"student": str(tiny_student_dir), "teacher": str(tiny_model_dir)}


def base_args(paths: dict, out_dir: Path, **overrides) -> list[str]:
    values = dict(student=paths["student"], teacher=paths["teacher"], device="cpu", dtype="float32", steps=2,
                  prompts_per_step=4, num_generations=2, max_new_tokens=5, eval_prompts=3, eval_samples=2,
                  pass_k=2, eval_every=0, progress="false", lora="false", lr=1e-3, out_dir=str(out_dir))
    values.update(overrides)
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def trainable_state(out_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((out_dir / "checkpoints").glob("step_*"))[-1]
    return torch.load(last / "trainer_state.pt", weights_only=False)["trainable"]


# each variant also exercises a different option of the loop
VARIANT_OPTIONS = {
    "reverse_kl_sampled": dict(lora="true", gamma=0.5, clip_log_ratio=5.0, grad_accum=2, lr_schedule="cosine",
                               warmup_steps=1, eval_every=1),
    "reverse_kl_full": dict(loss_chunk_size=2, teacher_chunk_size=3, teacher_quantization="8bit"),
    "forward_kl": dict(mask_special_tokens="true"),
    "jsd": dict(beta=0.3, loss_chunk_size=3, teacher_quantization="4bit"),
    "reverse_kl_topk": dict(top_k=4, loss_chunk_size=2, lora="true"),
    "reverse_kl_topk_tail": dict(top_k=3, add_sampled_token="false", lmbda=0.5),
    "entropy_aware": dict(entropy_threshold=0.5, lr_schedule="linear", divergence_backend="compiled"),
    "sft": dict(grad_accum=2),
    "supervised_kd": dict(loss_chunk_size=2, teacher_sample_pool=4),
    "grpo": dict(num_generations=2, loss_chunk_size=2),
    "opd_grpo": dict(reward_weight=0.5, gamma=1.0, top_p=0.9, top_k_sampling=20),
}


@pytest.mark.parametrize("loss", list(registry.LOSS_REGISTRY))
def test_two_steps_of_each_loss_through_the_cli(loss, model_paths, tmp_path, capsys):
    out = tmp_path / loss
    assert main(base_args(model_paths, out, loss=loss, **VARIANT_OPTIONS[loss])) == 0
    printed = capsys.readouterr().out
    assert "eval/pass@1" in printed and str(out / "metrics.jsonl") in printed
    rows = read_log(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["loss/total"]) and row["rollout/num_tokens"] > 0
        assert {"time/sample", "time/score", "time/train", "optim/lr", "optim/grad_norm"} <= set(row)
        assert 0.0 <= row["rollout/truncated_frac"] <= 1.0
    assert "eval/pass@1" in rows[0] and "eval/pass@1" in rows[-1]
    # every logged key is explained in the glossary
    undocumented = {k for r in rows for k in r} - set(METRIC_DOCS)
    assert not undocumented, f"keys missing from METRIC_DOCS: {undocumented}"
    assert (out / "checkpoints" / "step_000002" / "model").is_dir()


def test_module_entry_point_runs(model_paths, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "opd_mini.train", *base_args(model_paths, out, steps=1)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metrics log" in proc.stdout and (out / "summary.json").is_file()


class Killed(Exception):
    pass


def test_kill_and_resume_matches_uninterrupted_run(model_paths, tmp_path, monkeypatch):
    opts = dict(steps=4, save_every=2, eval_every=2, lora="true", lr=5e-3, lr_schedule="cosine", warmup_steps=1,
                loss="reverse_kl_topk", top_k=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(base_args(model_paths, straight, **opts)) == 0

    from opd_mini import runs

    real_save = runs.save_checkpoint

    def save_then_die(out_dir, *args, **kwargs):
        path = real_save(out_dir, *args, **kwargs)
        if path.name == "step_000002":
            with open(Path(out_dir) / "metrics.jsonl", "a") as f:  # a half-logged step 3 before the kill
                f.write(json.dumps({"step": 3, "loss/total": 123.0}) + "\n")
            raise Killed
        return path

    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(base_args(model_paths, resumed, **opts))
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    assert main(base_args(model_paths, resumed, **opts, resume="true")) == 0

    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    rows_a, rows_b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            if not key.startswith("time/"):
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)


def test_non_finite_loss_stops_with_diagnostic_and_names_the_checkpoint_known_good(model_paths, tmp_path, monkeypatch,
                                                                                  capsys):
    """A NaN at step 3 comes from the weights of step 2: that checkpoint is kept but not called good; the message
    names step 1's, the newest whose next step passed the checks."""
    calls = {"n": 0}
    spec = registry.LOSS_REGISTRY["reverse_kl_sampled"]

    def nan_at_third_step(logp_BT, batch, opts):
        calls["n"] += 1
        loss, metrics = spec.fn(logp_BT, batch, opts)
        return (loss * float("nan"), metrics) if calls["n"] == 3 else (loss, metrics)

    monkeypatch.setitem(registry.LOSS_REGISTRY, "reverse_kl_sampled", dataclasses.replace(spec, fn=nan_at_third_step))
    out = tmp_path / "nan"
    assert main(base_args(model_paths, out, steps=5, save_every=1)) == 3
    err = capsys.readouterr().err
    assert "step 3" in err and "loss/total=nan" in err and "--lr" in err
    assert "checkpoint known good is" in err and "step_000001" in err and "step_000002" not in err
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    state = torch.load(out / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert max(r["step"] for r in read_log(out)) == 2


def test_vocabulary_mismatch_is_a_clear_error(model_paths, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from opd_mini.tiny import tiny_config

    small = tmp_path / "small_vocab_teacher"
    LlamaForCausalLM(tiny_config("teacher", vocab_size=40)).save_pretrained(small)
    assert main(base_args(model_paths, tmp_path / "run", teacher=small)) == 2
    err = capsys.readouterr().err
    assert "vocabulary" in err and "40" in err


def test_bad_inputs_are_clear_errors(model_paths, tmp_path, capsys):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "7" * 500, "answer": "7"}) + "\n" for _ in range(3)))
    assert main(base_args(model_paths, tmp_path / "a", task=f"jsonl:{long_prompts}")) == 2
    assert "context" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "12>", "answer": "21"}) + "\n" + json.dumps({"prompt": "", "answer": "x"}))
    assert main(base_args(model_paths, tmp_path / "b", task=f"jsonl:{empty}")) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(base_args(model_paths, tmp_path / "c", lr=-1)) == 2
    assert "lr=-1.0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base_args(model_paths, tmp_path / "d", device="cuda")) == 2
        assert "cuda" in capsys.readouterr().err


def test_existing_run_needs_resume(model_paths, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(model_paths, out, steps=1)) == 0
    assert main(base_args(model_paths, out, steps=1)) == 2
    assert "--resume" in capsys.readouterr().err


def test_self_distillation_through_disabled_adapter(model_paths, tmp_path):
    """teacher='self' with LoRA: the base model is the teacher, so at step 0 the KL to it is exactly 0."""
    cfg = TrainConfig(student=model_paths["student"], teacher="self", lora=True, device="cpu", dtype="float32",
                      steps=1, prompts_per_step=2, max_new_tokens=4, eval_prompts=2, eval_samples=1, pass_k=1,
                      progress=False, out_dir=str(tmp_path / "self"))
    summary = train_mod.train(cfg)
    assert summary["eval_history"][0]["eval/kl_reverse"] == pytest.approx(0.0, abs=1e-5)


def test_quantization_where_it_cannot_run_is_a_clear_error(model_paths, tmp_path, capsys, monkeypatch):
    """A 4-bit teacher without bitsandbytes: exit code 2 and a message naming the fix, no traceback."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert main(base_args(model_paths, tmp_path / "q", teacher_quantization="4bit")) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes" in err and "teacher_quantization" in err and "Traceback" not in err


def test_self_distillation_stays_at_the_base_model_under_adam(model_paths, tmp_path):
    """OPD with the student's own base as teacher has r_t = 0 exactly, so even AdamW (which rescales tiny
    gradients to full-size steps) must not move the adapters: teacher and student log-probs take one op path."""
    cfg = TrainConfig(student=model_paths["student"], teacher="self", lora=True, device="cpu", dtype="float32",
                      steps=8, lr=3e-3, prompts_per_step=4, num_generations=2, max_new_tokens=6, eval_every=0,
                      eval_prompts=4, eval_samples=1, pass_k=1, progress=False, out_dir=str(tmp_path / "self"))
    summary = train_mod.train(cfg)
    assert summary["final_eval"]["eval/kl_reverse"] == pytest.approx(0.0, abs=1e-7)
    lora_b = [v for k, v in trainable_state(tmp_path / "self").items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) < 1e-6


def test_truncated_fraction_counts_rows_cut_at_max_new_tokens_without_eos():
    """rollout/truncated_frac's rows: a completion that used every token without an EOS is truncated; one whose
    last allowed token is the EOS, or that stopped earlier, is not."""
    import types

    from opd_mini.batch import Batch
    from opd_mini.rollouts import finish_batch
    from opd_mini.tasks import get_task

    eos = 2
    task = get_task("reverse:3")
    examples = task.examples(3, seed=0)
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, 7, eos], [5, eos, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    batch = Batch(tokens_BT=tokens, mask_BT=mask, prompt_index_B=torch.arange(3), completions=["a", "b", "c"])
    m = types.SimpleNamespace(student=types.SimpleNamespace(), tokenizer=types.SimpleNamespace(eos_token_id=eos,
                                                                                             all_special_ids=[eos]))
    cfg = TrainConfig(max_new_tokens=4)
    out = finish_batch(cfg, m, batch, examples, task, torch.device("cpu"))
    assert out.truncated_B.tolist() == [True, False, False]
    cfg = TrainConfig(max_new_tokens=4, mask_special_tokens=True)  # the loss mask drops EOS; the count does not move
    assert finish_batch(cfg, m, batch, examples, task, torch.device("cpu")).truncated_B.tolist() == [True, False, False]
