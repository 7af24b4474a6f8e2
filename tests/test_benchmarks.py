"""The benchmark scripts run at reduced size: the decode profile, the GPU-shapes step on the CPU, the TRL
side-by-side (when trl is installed), and the Qwen2 shapes they are built from."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_shapes  # noqa: E402
import profile_decode  # noqa: E402
import vs_trl  # noqa: E402

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (optional extra)")


def test_qwen2_shapes_are_the_presets_models():
    """Parameter counts of the configs against the published ones: 0.49B (0.36B without the embedding) for
    Qwen2.5-0.5B, 3.09B (2.77B without it) for Qwen2.5-3B; both embeddings tied; vocabulary 151,936."""
    import torch
    from transformers import Qwen2ForCausalLM

    for shape, total, non_embedding in [(gpu_shapes.QWEN25_0_5B, 0.49e9, 0.36e9), (gpu_shapes.QWEN25_3B, 3.09e9, 2.77e9)]:
        config = gpu_shapes.qwen2_config(shape)
        assert config.vocab_size == 151_936 and config.tie_word_embeddings
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        n = sum(p.numel() for p in model.parameters())
        embedding = config.vocab_size * config.hidden_size
        assert abs(n - total) / total < 0.01 and abs(n - embedding - non_embedding) / non_embedding < 0.01, n
    assert gpu_shapes.qwen2_config(gpu_shapes.QWEN25_3B, reduced=True).hidden_size == 64


@pytest.mark.parametrize("extra", [
    ["--teacher_quantization", "none"],
    ["--sampler", "generate", "--loss", "reverse_kl_full"] + (
        [] if importlib.util.find_spec("bitsandbytes") else ["--teacher_quantization", "none"]),
])
def test_gpu_shapes_runs_the_preset_through_the_real_loop_reduced_on_the_cpu(capsys, extra):
    """The benchmark runs train() itself on the preset: its step-0 evaluation, then its steps."""
    assert gpu_shapes.main(["--reduced", "--device", "cpu", "--threads", "1", "--steps", "2", "--json", *extra]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["sequences_per_step"] == 8 and res["grad_accum"] == 2 and res["steps"] == 2 and res["eval_rows"] == 16
    assert res["s_step"] > 0 and res["s_eval_step0"] > 0 and res["dtype"] == "bfloat16"
    assert res["teacher_quantization"] == ("none" if "none" in extra else "4bit")
    assert 0 <= res["final_eval"]["eval/pass@1"] <= 1


def test_gpu_shapes_without_a_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        gpu_shapes.main([])
    assert e.value.code == 2 and "--device cpu" in capsys.readouterr().err


def test_profile_decode_runs_small():
    res = profile_decode.profile(vocab=2048, batch=2, prompt_len=4, new_tokens=4, repeats=2, threads=1)
    assert res["torch.multinomial (generate's draw)"] > 0
    assert res["sample s: decode, log-probs recorded"] > 0 and res["sample s: generate + forward (reference)"] > 0


def test_vs_trl_without_trl_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(vs_trl, "trl_available", lambda: False)
    assert vs_trl.main(["--vocab", "64"]) == 2
    assert "pip install trl" in capsys.readouterr().err


def test_vs_trl_ratio_table_and_floor():
    rows = [{"loss": "jsd", "beta": 0.5, "s_step": 1.0, "s_sample": 0.2, "s_score": 0.3, "s_student": 0.5,
             "peak_sample_MB": 10, "peak_score_MB": 30,
             "peak_student_MB": 20, "peak_rss_MB": 500}]
    trl = {0.5: {"s_step": 4.0, "peak_step_MB": 60, "peak_rss_MB": 600}}
    table = vs_trl.ratio_table(rows, trl, {"s_floor": 0.5})
    assert "| jsd | 0.5 | 1.00 (0.2 + 0.3 + 0.5) | 4.00 | **0.25** | 30 | 60 | **0.50** | 500 | 600 | 2.0 |" in table
    floor = vs_trl.compute_floor(vocab=4096, batch=2, new_tokens=4, hidden=16, threads=1, repeats=1)
    assert floor["s_floor"] > 0 and floor["gflop_step"] == pytest.approx(5 * 2 * 8 * 16 * 4096 / 1e9)


@needs_trl
def test_vs_trl_runs_small(tmp_path):
    """The printed table is the one generated from the JSON it writes (BENCHMARKS.md's is generated likewise)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--vocab", "512", "--prompt_len", "8", "--new_tokens",
                          "4", "--steps", "1", "--threads", "1", "--losses", "reverse_kl_full",
                          "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| reverse_kl_full | 1 |" in out.stdout and "Compute floor" in out.stdout
    assert vs_trl.report(json.loads((tmp_path / "r.json").read_text())) in out.stdout


def test_compile_divergence_runs_small():
    """The torch.compile measurement at a small vocabulary: the three ways' gradients agree."""
    import compile_divergence

    if compile_divergence.shutil.which("g++") is None and compile_divergence.shutil.which("c++") is None:
        pytest.skip("no C++ compiler for inductor")
    res = compile_divergence.measure(vocab=256, batch=2, chunk=3, repeats=1, threads=1, kinds=("reverse", "jsd"))
    for row in res["rows"]:
        assert row["max_rel_grad_diff_fused"] < 1e-4 and row["max_rel_grad_diff_compiled"] < 1e-4, row
        assert row["ms_fused"] > 0 and row["ms_compiled"] > 0
    assert "| jsd |" in compile_divergence.report(res)


def test_cuda_smoke_dry_run_passes_on_the_cpu(tmp_path):
    """The GPU smoke script's checks, run on the CPU in fp32 at reduced shapes, so that it cannot rot between
    the runs on a lent GPU."""
    out = subprocess.run([sys.executable, "benchmarks/cuda_smoke.py", "--dry-run", "--out", str(tmp_path / "s.json")],
                         cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["failed"] == 0 and res["passed"] == len(res["checks"]) >= 15, res["checks"]
    assert all(c["status"] == "PASS" for c in res["checks"].values())


def test_benchmarks_page_tables_are_generated_from_the_committed_measurements():
    """Every table of BENCHMARKS.md with a JSON in benchmarks/results/ is what its script prints from that JSON."""
    import tables

    text = tables.PAGE.read_text()
    blocks = tables.expected()
    assert {"vs_trl", "vs_trl_plain", "compile_divergence", "profile_decode"} <= set(blocks)
    for name, block in blocks.items():
        assert tables.read_block(text, name) == block, f"BENCHMARKS.md's {name} block is stale: python benchmarks/tables.py"
    assert tables.main(["--check"]) == 0
