"""Execute every tutorial notebook top to bottom, as a reader would.

Each ``tutorials/*.ipynb`` is one test (its id is the file name without ``.ipynb``). The notebook is
copied to a temporary folder and executed there in memory with nbclient; the committed file is never
rewritten. The kernel runs with its working directory set to ``tutorials/`` (so relative paths behave
as when a reader opens the notebook), ``MPLBACKEND=Agg`` (no display needed), and this checkout first on
``PYTHONPATH``. A cell that raises fails the test with that cell's source and traceback; a notebook that
runs past the time the README's course index states for it ("≤ N min" on 2 cores) fails as well.

The kernel is this interpreter (``sys.executable``): the test writes a ``python3`` kernelspec for it into a
temporary folder placed first on ``JUPYTER_PATH``, so neither an activated environment nor a kernelspec
installed elsewhere (for example in the user's data directory) can swap in another Python.
The executed copy is kept as ``executed_<name>.ipynb`` in pytest's temporary folder for inspection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: A notebook that trains live checks its text against that run (within its sampling error): CI runs it again under a
#: second CPU kernel set (marker ``kernels``). These train nothing and only read committed results: no kernel set can
#: change what they print.
READ_ONLY = {"10_forgetting_on_transformers", "11_scorecard"}
KERNEL_NAME = "python3"


def stated_minutes() -> dict[str, int]:
    """Notebook stem -> the minutes the README's course index states for it (the last column, "≤ N min")."""
    rows = re.findall(r"^\| \[\d\d · [^]]+\]\(tutorials/([\w.]+)\.ipynb\) \|.*\| ≤ (\d+) min \|$",
                      (REPO / "README.md").read_text(), re.M)
    return {stem: int(minutes) for stem, minutes in rows}


def test_the_course_index_lists_every_notebook_with_its_time():
    assert set(stated_minutes()) == {p.stem for p in NOTEBOOKS}


def _prepend_env_path(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> None:
    old = os.environ.get(name)
    monkeypatch.setenv(name, str(path) if not old else str(path) + os.pathsep + old)


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment for the kernel: this interpreter as ``python3``, Agg plots, this checkout importable."""
    jupyter_dir = tmp_path / "jupyter"
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    _prepend_env_path(monkeypatch, "JUPYTER_PATH", jupyter_dir)
    _prepend_env_path(monkeypatch, "PYTHONPATH", REPO)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # a private IPython profile: a reader's startup files must not change what the notebook does
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


def _execute(nb: nbformat.NotebookNode, cwd: Path, timeout_s: float) -> None:
    """Run every cell in ``nb`` (in place, in memory); the whole run gets ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s

    def remaining(cell) -> int:  # nbclient's per-cell timeout, so that the budget covers the notebook
        return max(1, int(deadline - time.monotonic()))

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=int(timeout_s),
        timeout_func=remaining,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


def _case(notebook: Path):
    return pytest.param(notebook, id=notebook.stem, marks=[] if notebook.stem in READ_ONLY else [pytest.mark.kernels])


@pytest.mark.usefixtures("kernel_env")
@pytest.mark.parametrize("notebook", [_case(p) for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path):
    copy = tmp_path / notebook.name
    shutil.copyfile(notebook, copy)
    nb = nbformat.read(copy, as_version=4)
    start, budget_s = time.monotonic(), 60 * stated_minutes().get(notebook.stem, 10)
    try:
        _execute(nb, cwd=TUTORIALS, timeout_s=budget_s)
    except CellExecutionError as err:  # the message holds the failing cell's source and traceback
        pytest.fail(f"{notebook.name}: a cell raised an error\n{err}", pytrace=False)
    except CellTimeoutError as err:
        pytest.fail(f"{notebook.name}: did not finish within the {budget_s} s the README's course index states "
                    f"for it\n{err}", pytrace=False)
    except DeadKernelError as err:
        pytest.fail(f"{notebook.name}: the kernel died\n{err}", pytrace=False)
    finally:
        nbformat.write(nb, tmp_path / f"executed_{notebook.name}")
    print(f"{notebook.name}: executed in {time.monotonic() - start:.1f} s")


@pytest.mark.usefixtures("kernel_env")
def test_kernel_is_this_interpreter(tmp_path: Path):
    """The notebooks run under the interpreter running pytest (the one the package was installed into)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, sys; print(sys.executable); print(os.getcwd())")])
    _execute(nb, cwd=TUTORIALS, timeout_s=120)
    executable, cwd = nb.cells[0].outputs[0]["text"].splitlines()
    assert Path(executable) == Path(sys.executable)
    assert Path(cwd).resolve() == TUTORIALS.resolve()
