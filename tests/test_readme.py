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
