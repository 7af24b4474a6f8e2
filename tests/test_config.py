"""TrainConfig: validation names the field, file/CLI precedence, presets, one help text per field."""

import json
from dataclasses import fields

import pytest

from opd_mini.registry import LOSS_REGISTRY
from opd_mini.config import PRESETS, TrainConfig
from opd_mini.cli import build_parser, field_docs, parse_args

BAD_VALUES = [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("steps", 0), ("gamma", 1.5), ("gamma", -0.1),
    ("beta", 2.0), ("top_k", 1), ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0), ("loss", "kl"),
    ("teacher_quantization", "2bit"), ("lr_schedule", "step"), ("device", "tpu"), ("dtype", "int8"),
    ("lora_r", 0), ("lora_dropout", 1.0), ("max_grad_norm", -1.0), ("prompts_per_step", 0),
    ("num_generations", 0), ("grad_accum", 0), ("max_new_tokens", 0), ("eval_prompts", 0),
    ("entropy_threshold", -1.0), ("clip_log_ratio", -2.0), ("min_lr_ratio", 1.5), ("lora", "maybe"),
    ("steps", 2.5), ("seed", -1), ("use_chat_template", "sometimes"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_value_names_field_and_value(name, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{name: value})
    assert name in str(err.value) and repr(value).strip("'") in str(err.value)


@pytest.mark.parametrize("overrides,field", [
    (dict(pass_k=5, eval_samples=4), "pass_k"),
    (dict(prompts_per_step=6, grad_accum=4), "grad_accum"),
    (dict(loss="grpo", num_generations=1), "num_generations"),
    (dict(teacher="none", loss="reverse_kl_sampled"), "teacher"),
    (dict(teacher="self", teacher_quantization="4bit"), "teacher_quantization"),
])
def test_cross_field_rules(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**overrides)


def test_every_field_has_help_and_a_flag():
    docs = field_docs()
    assert set(docs) == {f.name for f in fields(TrainConfig)}
    assert all(len(text) > 10 for text in docs.values())
    help_text = build_parser().format_help()
    for f in fields(TrainConfig):
        assert f"--{f.name}" in help_text


def test_presets_load():
    for name in PRESETS:
        cfg = TrainConfig.from_preset(name)
        assert cfg.validate() is cfg
    tiny = parse_args(["--preset", "tiny-cpu"])
    assert tiny.device == "cpu" and tiny.dtype == "float32" and tiny.student == "tiny"
    gpu = TrainConfig.from_preset("laptop-gpu")
    assert gpu.lora and gpu.teacher_quantization == "4bit" and gpu.dtype == "bfloat16" and gpu.device == "cuda"
    smol = TrainConfig.from_preset("smollm2-cpu")  # a real model on a CPU: context distillation of a short answer
    assert (smol.student, smol.teacher, smol.device, smol.task) == ("smollm2-135m", "self", "cpu", "questions")
    assert "{prompt}" in smol.teacher_template and smol.lora and smol.retention_task == "sums"
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("huge-tpu")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_precedence_default_preset_file_cli(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"preset": "tiny-cpu", "lr": 0.005, "steps": 7, "loss": "sft", "lora": "false"}
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("\n".join(f"{k}: {v}" for k, v in values.items()))
    cfg = parse_args(["--config", str(path), "--steps", "3", "--lora"])
    assert cfg.steps == 3  # flag beats file
    assert cfg.lr == 0.005 and cfg.loss == "sft"  # file beats preset and defaults
    assert cfg.lora is True  # a bare boolean flag means true
    assert cfg.max_new_tokens == PRESETS["tiny-cpu"]["max_new_tokens"]  # preset beats defaults
    assert cfg.top_k == TrainConfig().top_k  # defaults fill the rest
    assert TrainConfig.from_file(path).steps == 7


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    bad_range = tmp_path / "range.json"
    bad_range.write_text(json.dumps({"gamma": 3}))
    with pytest.raises(ValueError, match="gamma=3.0"):
        parse_args(["--config", str(bad_range)])


def test_cli_flags_and_choices():
    cfg = parse_args(["--loss", "jsd", "--beta", "0.1", "--mask_special_tokens", "true", "--lr", "3e-4"])
    assert (cfg.loss, cfg.beta, cfg.mask_special_tokens, cfg.lr) == ("jsd", 0.1, True, 3e-4)
    with pytest.raises(SystemExit):
        parse_args(["--loss", "not_a_loss"])
    assert parse_args(["--teacher-quantization", "4bit", "--lora-r", "4"]).lora_r == 4  # dashed spellings too
    assert set(LOSS_REGISTRY) >= {"reverse_kl_sampled", "reverse_kl_topk", "sft", "grpo", "opd_grpo", "jsd"}
