"""The committed tutorial notebooks: the numbers their text quotes are checked, and their outputs are a full run's.

Each notebook ends with a code cell tagged ``check``. It recomputes, from the notebook's own variables, every number
the text quotes from a run (``QUOTED``) and every claim the text makes about one (``CLAIMS``), and asserts that they
agree. ``test_notebooks.py`` executes every notebook, so a change to the code that moves a quoted result fails there.
This file reads the committed notebooks without executing anything and checks that

* the check cell covers the text: every decimal number or percentage in a markdown cell (math included, code spans
  and fenced code excluded) appears as a string literal in the check cell, either among ``QUOTED`` (asserted against
  the run) or in ``FIXED`` (a setting, a size, a name or a version, not a result of the run);
* the committed outputs come from one run, top to bottom: code cells numbered 1, 2, 3, ... with no error output,
  and the check cell's output saying that the text agrees with that run;
* every cell that draws a figure (``plt.show()`` or ``display(Image(...))``) has a PNG among its outputs;
* solution cells (tag ``solution``), code and text, are collapsed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "tutorials").glob("*.ipynb"))
# notebooks whose text is not yet covered by a check cell; remove a name once its notebook has one
PENDING_CHECK: set[str] = set()

# a decimal number (0.08, 1.24, 1e-8, 9.5e-07) or a percentage (55%, 2%), not part of a longer number
NUMBER = re.compile(r"(?<![\d.])(\d+\.\d+(?:e[-+−]?\d+)?|\d+(?:\.\d+)?e[-+−]\d+|\d+(?:\.\d+)?%)")
FIGURE = re.compile(r"plt\.show\(\)|display\(Image\(")


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _prose(source: str) -> str:
    """A markdown cell's text without fenced code blocks and code spans (code is not a claim about a run)."""
    source = re.sub(r"```.*?```", " ", source, flags=re.S)
    return re.sub(r"`[^`\n]*`", " ", source)


def quoted_numbers(nb: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell index, number as written) for every decimal number or percentage in the notebook's markdown."""
    return [(i, m) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for m in NUMBER.findall(_prose(cell.source))]


def check_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    cells = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    return cells[-1] if cells else None


def string_literals(source: str) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_text_numbers_are_checked(notebook: Path):
    if notebook.stem in PENDING_CHECK:
        pytest.skip(f"{notebook.name}: no check cell yet (PENDING_CHECK)")
    nb = _read(notebook)
    cell = check_cell(nb)
    assert cell is not None and cell.cell_type == "code", f"{notebook.name}: no code cell tagged 'check'"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cell is code_cells[-1], f"{notebook.name}: the check cell must be the last code cell (it reads every result)"
    literals = string_literals(cell.source)
    for name in ("QUOTED", "CLAIMS", "FIXED"):
        assert re.search(rf"^{name} = \[", cell.source, re.M), f"{notebook.name}: the check cell defines no {name} list"
    unchecked = [f"cell {i}: {number}" for i, number in quoted_numbers(nb) if number not in literals]
    assert not unchecked, (f"{notebook.name}: numbers in the text that the check cell neither asserts (QUOTED) nor lists "
                           f"as settings (FIXED):\n  " + "\n  ".join(unchecked))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_outputs_are_one_run(notebook: Path):
    nb = _read(notebook)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), (
        f"{notebook.name}: committed without a full top-to-bottom run (execution counts {counts})")
    errors = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{notebook.name}: cells {errors} were committed with an error output"
    cell = check_cell(nb)
    if cell is not None:
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "agree with this run" in text, f"{notebook.name}: the check cell's committed output is not a pass: {text!r}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_figures_are_committed(notebook: Path):
    nb = _read(notebook)
    missing = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and FIGURE.search(c.source)
               and not any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert not missing, f"{notebook.name}: cells {missing} draw a figure but have no PNG output committed"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_solutions_are_collapsed(notebook: Path):
    nb = _read(notebook)
    shown = [i for i, c in enumerate(nb.cells) if "solution" in c.metadata.get("tags", [])
             and not c.metadata.get("jupyter", {}).get("source_hidden", False)]
    assert not shown, f"{notebook.name}: solution cells {shown} are not collapsed (metadata jupyter.source_hidden)"


def test_number_pattern():
    text = "success 0.08, 55% of the groups, $H\\approx0.02$, ε = 1e-8, `lr=3e-3` and ```\n0.5\n``` are code, T = 3"
    assert NUMBER.findall(_prose(text)) == ["0.08", "55%", "0.02", "1e-8"]
