"""The scorecard, ``tutorials/11_scorecard.ipynb``, read without executing it.

Its tables hold one row per claim of the sources: the claim and its source, a verdict, the key numbers (mean ± std
over seeds), the experiment's own tests (``experiment:claim`` with ✓ or ✗) and the notebook or page that shows it.
``test_notebook_prose.py`` already checks that every number of the text is a literal of the check cell and that the
committed outputs are one passing run; this file checks what is particular to the scorecard:

* every row links to a notebook or a docs page that exists;
* every ``mean ± std`` of a row's key numbers is one ``pair(...)`` of the check cell's ``QUOTED`` list (the two
  numbers asserted together, against the same per-seed values); every other number there is quoted too, or is a
  setting of the check cell's ``FIXED`` list written as one (``ε = 0.2``, ``lr 0.001``);
* every experiment's test a row names exists in that experiment's committed JSON, with the mark (✓/✗) its ``holds``
  gives, and the verdict agrees with the marks: a plain **holds** only over ✓, **does not hold** and **refuted here**
  only over ✗ (the qualified verdicts, **holds only where** and **holds in part**, may mix them);
* a row that does not hold names what the setting is missing; every claim names its source; methods go by the
  course's labels, not by their code names.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

from test_notebook_prose import NUMBER, _prose, check_cell

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOK = TUTORIALS / "11_scorecard.ipynb"
RESULTS = TUTORIALS / "results"

COLUMNS = ["#", "claim (source)", "verdict", "key numbers: mean ± std over seeds", "the experiment's own test",
           "shown in"]
VERDICTS = ("holds", "holds only where", "holds in part", "does not hold", "refuted here")
SOURCES = ("the blog", "Thinking Machines", "Fu et al.", "RL's Razor", "SDFT", "OPSD", "the sources", "DAgger",
           "Yue et al.", "context distillation", "this project", "practice")
MARKS = {"✓": True, "✗": False}
NAMED = re.compile(r"`(\w+):([^`]+)` ([✓✗])")
LINK = re.compile(r"\[[^\]]+\]\(([^)\s#]+)(?:#[^)]*)?\)")
MEAN_STD = re.compile(r"(?<![\d.])([+-]?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")
SETTING = re.compile(r"(?:= |lr |top-p |to )$")  # how a row writes a setting: ε = 0.2, lr 0.001, top-p 0.9, to 80%
CODE_NAME = re.compile(r"\b(?:opd|sft|grpo|opsd|sdft)_\w+")


@pytest.fixture(scope="module")
def nb() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def rows(nb) -> list[dict[str, str]]:
    """Every row of the notebook's scorecard tables, as {column: text}."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = [line for line in cell.source.splitlines() if line.startswith("|")]
        if not lines:
            continue
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        assert header == COLUMNS, f"a table with other columns: {header}"
        assert set(lines[1].replace("|", "").strip()) <= {"-"}, f"no separator under the header: {lines[1]}"
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == len(COLUMNS), f"a row with {len(cells)} cells, not {len(COLUMNS)}: {line[:80]}"
            out.append(dict(zip(COLUMNS, cells)))
    return out


@pytest.fixture(scope="module")
def check(nb) -> dict:
    """The check cell's QUOTED pairs ('mean ± std' as the text writes it), QUOTED literals and FIXED literals."""
    cell = check_cell(nb)
    assert cell is not None, "the scorecard has no check cell"
    tree = ast.parse(cell.source)
    lists = {node.targets[0].id: node.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
             and node.targets[0].id in ("QUOTED", "FIXED")}
    assert set(lists) == {"QUOTED", "FIXED"}, f"the check cell lacks {({'QUOTED', 'FIXED'} - set(lists))}"

    def literals(node):
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    pairs = set()
    for call in ast.walk(lists["QUOTED"]):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "pair":
            sign = next((k.value.value for k in call.keywords if k.arg == "sign"), "")
            pairs.add(f"{sign}{call.args[1].value} ± {call.args[2].value}")
    return {"pairs": pairs, "quoted": literals(lists["QUOTED"]), "fixed": literals(lists["FIXED"])}


def test_the_scorecard_has_its_rows_numbered(rows):
    assert 15 <= len(rows) <= 25, f"{len(rows)} rows: the scorecard keeps 15 to 25 claims"
    assert [r["#"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)], "rows are numbered 1, 2, 3, ..."


def test_every_row_links_to_a_page_that_exists(rows):
    for r in rows:
        targets = LINK.findall(r["shown in"])
        assert targets, f"row {r['#']} links to no notebook or page"
        for target in targets:
            path = (TUTORIALS / target).resolve()
            assert path.suffix in (".ipynb", ".md") and path.is_file(), f"row {r['#']}: {target} does not exist"


def test_every_mean_and_spread_is_one_quoted_pair(rows, check):
    for r in rows:
        text = _prose(r["key numbers: mean ± std over seeds"])
        for m, s in MEAN_STD.findall(text):
            assert f"{m} ± {s}" in check["pairs"], (
                f"row {r['#']}: '{m} ± {s}' is not asserted as one pair(...) of the check cell's QUOTED")
        for m in NUMBER.finditer(text):
            if m.group(1) in check["quoted"]:
                continue
            assert m.group(1) in check["fixed"], f"row {r['#']}: {m.group(1)} is neither quoted nor fixed"
            assert SETTING.search(text[:m.start()]), f"row {r['#']}: {m.group(1)} is fixed but not written as a setting"
        assert "±" in text or "exact" in text or "Spearman" in text, (
            f"row {r['#']}: key numbers with no spread over seeds, and not exact or a correlation")


def test_the_other_columns_quote_or_fix_their_numbers(rows, check):
    for r in rows:
        for column in ("claim (source)", "verdict"):
            loose = [n for n in NUMBER.findall(_prose(r[column])) if n not in check["quoted"] | check["fixed"]]
            assert not loose, f"row {r['#']}, {column}: numbers neither quoted nor fixed: {loose}"


def _verdict(row) -> str:
    m = re.match(r"\*\*([^*]+)\*\*", row["verdict"])
    assert m and m.group(1) in VERDICTS, f"row {row['#']}: the verdict does not start with one of {VERDICTS}"
    return m.group(1)


def test_the_named_tests_are_the_experiments_own(rows):
    results: dict[str, dict] = {}
    for r in rows:
        column = r["the experiment's own test"]
        named = NAMED.findall(column)
        assert named or column == "—", f"row {r['#']}: write `experiment:claim` ✓/✗, or — when there is none"
        for experiment, claim, mark in named:
            path = RESULTS / f"{experiment}.json"
            assert path.is_file(), f"row {r['#']}: no result {path.name}"
            results.setdefault(experiment, json.loads(path.read_text()))
            claims = results[experiment].get("claims", {})
            assert claim in claims, f"row {r['#']}: {path.name} records no claim {claim!r}"
            assert claims[claim]["holds"] is MARKS[mark], (
                f"row {r['#']}: {experiment}:{claim} is marked {mark}, but its holds is {claims[claim]['holds']}")


def test_the_verdict_agrees_with_the_marks(rows):
    for r in rows:
        verdict = _verdict(r)
        marks = [MARKS[mark] for *_, mark in NAMED.findall(r["the experiment's own test"])]
        if verdict == "holds":
            assert all(marks), f"row {r['#']} says holds, yet names a test that does not"
        if verdict in ("does not hold", "refuted here"):
            assert not any(marks), f"row {r['#']} says {verdict}, yet names a test that holds"
            assert "Missing" in r["verdict"], f"row {r['#']} says {verdict} without naming what the setting is missing"


def test_every_claim_names_its_source(rows):
    for r in rows:
        source = re.findall(r"\(([^()]*)\)\s*$", r["claim (source)"])
        assert source and any(s in source[0] for s in SOURCES), f"row {r['#']}: the claim ends with no (source)"


def test_methods_go_by_their_labels(rows):
    for r in rows:
        names = CODE_NAME.findall(" ".join(_prose(text) for text in r.values()))
        assert not names, f"row {r['#']} names methods by their code names {names}: use METHOD_STYLE's labels"
