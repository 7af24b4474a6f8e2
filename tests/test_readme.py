"""The README and the docs stay true: the two Quickstart commands, every command and code block they show, the
file tree, and the blocks generated from committed results."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def _blocks(text: str, lang: str, section: str | None = None) -> list[str]:
    if section is not None:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


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


def test_the_readme_is_a_front_door():
    """About 200 lines: what it is, the two commands, the course, your own loss and task, the tree, the links."""
    assert len(README.splitlines()) <= 230
    for heading in ("## Quickstart", "## What you will see", "## The course", "## Your own loss", "## Your own task",
                    "## Layout", "## More"):
        assert heading in README, heading


def test_every_link_of_the_readme_and_the_docs_exists():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_metrics_glossary_is_generated_from_the_metric_docs():
    from opd_mini.metrics import METRIC_DOCS, metrics_glossary

    glossary = (DOCS / "metrics.md").read_text().split("<!-- metrics:start -->\n", 1)[1].split("\n<!-- metrics:end", 1)[0]
    assert glossary == metrics_glossary(), "docs/metrics.md is stale: regenerate it from opd_mini.metrics"
    assert all(f"`{k}`" in glossary for k in METRIC_DOCS)


def test_main_job_runs_every_toy_experiment_and_writes_its_figures(tmp_path):
    """The Quickstart's main job, `python -m toy`, run as it is (into a temporary --out)."""
    from toy.__main__ import EXPERIMENTS

    out = _run([sys.executable, "-m", "toy", "--out", str(tmp_path)], cwd=ROOT)
    assert len(list(tmp_path.glob("*.png"))) >= len(EXPERIMENTS) and len(list(tmp_path.glob("*.json"))) >= len(
        EXPERIMENTS)
    assert "done in" in out


def test_readme_loop_commands_run(tmp_path):
    """Every `.venv/bin/python -m ...` line of the real-loop section runs (into temporary directories)."""
    import shlex

    lines = [line for block in _blocks(README, "bash", "## The real loop") for line in block.splitlines()]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/python"
        if argv[1:3] == ["-m", "opd_mini.train"]:  # into a fresh directory, so that the test can be rerun
            argv += ["--out_dir", str(tmp_path / f"train{i}")]
        elif argv[1:3] == ["-m", "opd_mini.ablate"]:
            argv += ["--out", str(tmp_path / "ablate")]
        out = _run([sys.executable, *argv[1:]], cwd=ROOT)
        if argv[1:3] == ["-m", "opd_mini.experiments"]:
            from opd_mini.experiments import EXPERIMENTS

            assert all(name in out for name in EXPERIMENTS)


def test_readme_laptop_gpu_command_parses_and_fails_cleanly_without_cuda(capsys):
    import shlex

    import torch

    from opd_mini.cli import parse_args
    from opd_mini.train import main

    (line,) = [ln for ln in README.splitlines() if ln.startswith("python -m opd_mini.train --preset laptop-gpu")]
    argv = shlex.split(line)[3:]  # drop "python -m opd_mini.train"
    cfg = parse_args(argv)
    assert cfg.device == "cuda" and cfg.teacher_quantization == "4bit" and cfg.lora
    if not torch.cuda.is_available():
        assert main(argv) == 2
        assert "cuda" in capsys.readouterr().err.lower()


def test_the_pieces_by_hand_block_runs(tmp_path, monkeypatch):
    (code,) = _blocks((DOCS / "losses.md").read_text(), "python", "## The pieces by hand")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/losses.md", "exec"), namespace)
    assert 0.0 <= namespace["summary"]["final_eval"]["eval/pass@1"] <= 1.0
    assert namespace["logits_BTV"].grad_fn is not None and "kl/reverse_topk" in namespace["metrics"]


def test_benchmark_script_runs_small(tmp_path):
    out = _run([sys.executable, "benchmarks/bench_step.py", "--vocab", "512", "--batch", "2", "--prompt_len", "8",
                "--new_tokens", "8", "--steps", "1", "--threads", "1"], cwd=ROOT)
    assert "naive" in out and "topk" in out


def test_readme_own_loss_block_runs(tmp_path, monkeypatch):
    """The "Your own loss" example registers a loss from user code and trains it through `train`."""
    from opd_mini import registry

    (code,) = _blocks(README, "python", "## Your own loss")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "LOSS_REGISTRY", dict(registry.LOSS_REGISTRY))  # leave the table as it was
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["summary"]["steps_done"] == 2 and "mixed_kl" in registry.LOSS_REGISTRY
    log = (tmp_path / "runs" / "readme-mixed" / "metrics.jsonl").read_text().splitlines()
    assert "kl/forward_full" in log[-1]


def test_readme_own_task_trains_from_a_plugin_file_for_one_step(tmp_path, capsys):
    """The "Your own task" block, saved as a file, is loaded with --task_plugins and trains one step."""
    from opd_mini import tasks
    from opd_mini.train import main

    (code,) = _blocks(README, "python", "## Your own task")
    plugin = tmp_path / "my_tasks.py"
    plugin.write_text(code)
    before = dict(tasks.TASK_REGISTRY)
    try:
        out = tmp_path / "run"
        assert main(["--preset", "tiny-cpu", "--task_plugins", str(plugin), "--task", "upper:4", "--steps", "1",
                     "--eval_prompts", "4", "--progress", "false", "--out_dir", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["eval_source"] == "fresh random prompts of upper:4" and summary["steps_done"] == 1
        example = tasks.get_task("upper:4").examples(1, seed=0)[0]
        assert example.prompt.endswith(">") and example.answer == example.prompt[:-1].upper()
        assert main(["--preset", "tiny-cpu", "--task", "nope:3", "--out_dir", str(tmp_path / "x")]) == 2
        assert "unknown task 'nope:3'" in capsys.readouterr().err
    finally:
        tasks.TASK_REGISTRY.clear()
        tasks.TASK_REGISTRY.update(before)


def test_layout_names_every_file_and_only_existing_ones():
    """The README's one-line-per-file tree lists every module of opd_mini/, opd_mini/experiments/, toy/ and
    benchmarks/, and the README links every notebook and doc page; nothing it names is gone."""
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    listed, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:depth] + [name.rstrip("/")]
        listed.add("/".join(stack))
    wanted = {str(p.relative_to(ROOT)) for d in ("opd_mini", "opd_mini/experiments", "toy", "benchmarks")
              for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"}
    assert wanted - listed == set(), f"files missing from the README layout: {sorted(wanted - listed)}"
    pages = {str(p.relative_to(ROOT)) for d in ("tutorials", "docs") for p in (ROOT / d).glob("*.*")
             if p.suffix in (".ipynb", ".md")}
    assert not [p for p in pages if f"]({p})" not in README], "the README links every notebook and doc page"
    gone = {name for name in listed if not (ROOT / name).exists()}
    assert not gone, f"the README layout names files that do not exist: {sorted(gone)}"


def test_laptop_gpu_page_is_generated_from_the_committed_smoke_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cuda_smoke

    page = (DOCS / "laptop-gpu.md").read_text()
    block = page.split("<!-- laptop_gpu:start -->\n", 1)[1].split("\n<!-- laptop_gpu:end", 1)[0]
    result = json.loads((ROOT / "benchmarks" / "results" / "cuda_smoke_h200.json").read_text())
    assert block == cuda_smoke.docs_block(result), "docs/laptop-gpu.md is stale: regenerate it from the JSON"
