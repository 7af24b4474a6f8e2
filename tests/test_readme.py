"""The README stays true: its two Quickstart commands, the CI script, and the metrics glossary."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_exactly_two_commands_sharing_one_setup():
    main, tests = quickstart_commands()
    setup = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e ."
    assert main.startswith(setup) and tests.startswith(setup)
    assert main.endswith(".venv/bin/python -m toy")
    assert tests.endswith(".venv/bin/python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    _, tests = quickstart_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the test command in README.md and .ci/run must be identical"


def test_requirements_pin_the_cpu_torch():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
    pinned = [line for line in lines if line and not line.startswith("#")]
    assert all("==" in line for line in pinned), "every requirement is pinned"


def test_metrics_glossary_lists_every_logged_metric():
    from opd_mini.losses import METRIC_DOCS

    keys = set(METRIC_DOCS)
    try:
        from opd_mini.train import METRIC_DOCS as TRAIN_DOCS
    except ImportError:  # the loop documents its own keys once it exists
        TRAIN_DOCS = {}
    keys |= set(TRAIN_DOCS)
    glossary = README.split("<!-- metrics:start -->", 1)[1].split("<!-- metrics:end -->", 1)[0]
    missing = sorted(k for k in keys if f"`{k}`" not in glossary)
    assert not missing, f"README metrics glossary lacks {missing}; regenerate it from METRIC_DOCS"


def _blocks(lang: str, section: str | None = None) -> list[str]:
    text = README if section is None else README.split(section, 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_main_job_runs_and_writes_its_figures(tmp_path):
    """The Quickstart's main job, `python -m toy`, run as it is (into a temporary --out)."""
    import sys

    out = _run([sys.executable, "-m", "toy", "--out", str(tmp_path)], cwd=ROOT)
    for name in ("bias_variance.png", "bias_variance.json", "forgetting.png", "forgetting.json"):
        assert (tmp_path / name).exists(), name
    assert "figure" in out and "done in" in out


def test_readme_loop_commands_run(tmp_path):
    """Every `.venv/bin/python -m ...` line of the real-loop section runs (outputs go to runs/, ignored)."""
    import shlex
    import sys

    lines = [line for block in _blocks("bash", "## The real loop") for line in block.splitlines()]
    assert len(lines) == 4
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/python"
        if argv[1:3] == ["-m", "opd_mini.demo"]:  # the demo's defaults take a few minutes: run it small
            argv += ["--quick", "--settings", "compounding", "--methods", "sft,opd_full", "--seeds", "0",
                     "--workers", "1", "--out", str(tmp_path / "demo")]
        elif argv[1:3] == ["-m", "opd_mini.train"]:  # into a fresh directory, so that the test can be rerun
            argv += ["--out_dir", str(tmp_path / f"train{i}")]
        elif argv[1:3] == ["-m", "opd_mini.ablate"]:
            argv += ["--out", str(tmp_path / "ablate")]
        _run([sys.executable, *argv[1:]], cwd=ROOT)


def test_readme_laptop_gpu_command_parses_and_fails_cleanly_without_cuda(capsys):
    import shlex

    import torch

    from opd_mini.config import parse_args
    from opd_mini.train import main

    (line,) = [ln for ln in README.splitlines() if ln.startswith("python -m opd_mini.train --preset laptop-gpu")]
    argv = shlex.split(line)[3:]  # drop "python -m opd_mini.train"
    cfg = parse_args(argv)
    assert cfg.device == "cuda" and cfg.teacher_quantization == "4bit" and cfg.lora
    if not torch.cuda.is_available():
        assert main(argv) == 2
        assert "cuda" in capsys.readouterr().err.lower()


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    (code,) = _blocks("python", "## Public API")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert 0.0 <= namespace["summary"]["final_eval"]["eval/pass@1"] <= 1.0
    assert namespace["logits_BTV"].grad_fn is not None and "kl/reverse_topk" in namespace["metrics"]


def test_benchmark_script_runs_small(tmp_path):
    import sys

    out = _run([sys.executable, "benchmarks/bench_step.py", "--vocab", "512", "--batch", "2", "--prompt_len", "8",
                "--new_tokens", "8", "--steps", "1", "--threads", "1"], cwd=ROOT)
    assert "naive" in out and "topk" in out


def test_readme_own_loss_block_runs(tmp_path, monkeypatch):
    """The "Your own loss" example registers a loss from user code and trains it through `train`."""
    from opd_mini import registry

    (code,) = _blocks("python", "## Your own loss")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "LOSS_REGISTRY", dict(registry.LOSS_REGISTRY))  # leave the table as it was
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["summary"]["steps_done"] == 2 and "mixed_kl" in registry.LOSS_REGISTRY
    log = (tmp_path / "runs" / "readme-mixed" / "metrics.jsonl").read_text().splitlines()
    assert "kl/forward_full" in log[-1]


def test_layout_names_every_module_and_only_existing_ones():
    """The README's one-line-per-file layout lists every module of opd_mini/ and toy/, and nothing that is gone."""
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    listed, section = set(), None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            section = line.split()[0].rstrip("/")
        elif line.strip() and section in ("opd_mini", "toy"):
            listed.add(f"{section}/{line.split()[0]}")
    actual = {f"{p.parent.name}/{p.name}" for d in ("opd_mini", "toy") for p in (ROOT / d).glob("*.py")
              if p.name != "__init__.py"}
    assert actual - listed == set(), f"modules missing from the README layout: {sorted(actual - listed)}"
    gone = {name for name in listed if not (ROOT / name.rstrip("/")).exists()}
    assert not gone, f"the README layout names files that do not exist: {sorted(gone)}"
