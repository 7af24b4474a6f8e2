"""Tasks: built-in synthetic tasks, exact-match rewards, JSONL files, Hugging Face datasets, spec errors."""

import json
import sys
import types

import pytest

from opd_mini.tasks import Example, ListTask, exact_match, get_task, load_hf_dataset


def test_reverse_task_examples_and_reward():
    task = get_task("reverse:5")
    examples = task.examples(50, seed=0)
    assert len(examples) == 50 and examples == task.examples(50, seed=0)  # deterministic in the seed
    assert examples != task.examples(50, seed=1)
    for e in examples:
        digits = e.prompt[:-1]
        assert e.prompt.endswith(">") and len(digits) == 5 and digits.isdigit()
        assert e.answer == digits[::-1]
        assert task.reward(e.answer, e) == 1.0
        assert task.reward(e.answer[:-1], e) == 0.0
    e = Example("0412>", "2140")
    assert task.reward(" 2140 ", e) == 1.0  # surrounding whitespace is ignored
    assert task.reward("2140<eos>junk", e) == 1.0  # cut at the first EOS marker
    assert task.reward("21400", e) == 0.0
    assert task.rewards(["2140", "0412"], [e, e]) == [1.0, 0.0]


def test_add_task_examples_and_reward():
    task = get_task("add:3")
    for e in task.examples(100, seed=3):
        a, b = e.prompt[:-1].split("+")
        assert e.prompt.endswith("=") and len(a) == 3 and len(b) == 3  # no leading zeros
        assert int(e.answer) == int(a) + int(b)
        assert task.reward(e.answer, e) == 1.0
        assert task.reward(str(int(e.answer) + 1), e) == 0.0
    assert get_task("add:1").examples(20, seed=0)[0].prompt.count("+") == 1


def test_exact_match_stop_strings():
    assert exact_match("42</s>", "42") == 1.0
    assert exact_match("42<|im_end|>\nmore", "42") == 1.0
    assert exact_match("", "42") == 0.0


@pytest.mark.parametrize("spec", ["nope", "reverse", "reverse:x", "add:", "jsonl:", "hf:", "multiply:3"])
def test_unknown_or_malformed_spec_is_a_clear_error(spec):
    with pytest.raises(ValueError) as err:
        get_task(spec)
    assert spec in str(err.value) or "reverse:N" in str(err.value)


def test_unknown_spec_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"reverse:N, add:N, walk:N, jsonl:PATH, hf:NAME\[:SPLIT\]"):
        get_task("copy:3")
    with pytest.raises(ValueError, match="N >= 1"):
        get_task("reverse:0")


def test_jsonl_task(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i}>", "answer": str(i)[::-1], "extra": 1} for i in range(10, 17)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    task = get_task(f"jsonl:{path}")
    assert isinstance(task, ListTask) and len(task) == 7
    once = task.examples(7, seed=0)  # a permutation of all examples
    assert sorted(e.prompt for e in once) == sorted(r["prompt"] for r in rows)
    assert once == task.examples(7, seed=0)
    more = task.examples(15, seed=1)  # cycles through reshuffled passes
    assert len(more) == 15 and {e.prompt for e in more[:7]} == {r["prompt"] for r in rows}
    assert task.reward("71", Example("17>", "71")) == 1.0


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "a>", "answer": "a"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a>"}', "missing key 'answer'"),
    ('{"answer": "a"}', "missing key 'prompt'"),
    ('{"prompt": "a>", "answer": 3}', "'answer' must be a string"),
    ('{"prompt": "", "answer": "a"}', "empty prompt"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "ab>", "answer": "ba"})
    path.write_text("\n".join([good, "", good, bad_line, good]) + "\n")
    with pytest.raises(ValueError) as err:
        get_task(f"jsonl:{path}")
    text = str(err.value)
    assert str(path) in text and "line 4" in text and message in text


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        get_task(f"jsonl:{empty}")


def test_hf_task_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets") as err:
        get_task("hf:gsm8k")
    assert "network" in str(err.value)


def test_hf_task_with_configurable_columns(monkeypatch):
    calls = []

    class FakeDataset(list):
        column_names = ["question", "solution"]

    def load_dataset(name, config_name=None, split="train"):
        calls.append((name, config_name, split))
        return FakeDataset([{"question": "1+1=", "solution": 2}, {"question": "2+2=", "solution": 4}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_hf_dataset("someone/arith", "test", prompt_column="question", answer_column="solution")
    assert calls == [("someone/arith", None, "test")]
    assert sorted(task.examples(2, seed=0), key=lambda e: e.prompt) == [Example("1+1=", "2"), Example("2+2=", "4")]
    with pytest.raises(ValueError, match="no column 'prompt'.*question"):
        get_task("hf:someone/arith")


def test_the_shipped_prompt_sets_for_real_chat_models():
    """``questions`` (64 everyday questions, one-word answers) and ``sums`` (the 100 single-digit sums): named by
    their kind alone, with a held-out split that does not depend on where the package is installed."""
    questions, sums = get_task("questions", eval_fraction=0.25), get_task("sums")
    assert (len(questions), questions.split_size("eval"), len(sums)) == (64, 16, 100)
    assert questions.name == "questions" and questions.splits == get_task("questions", eval_fraction=0.25).splits
    every = sums.examples(100, seed=0, split="all")
    assert sorted((e.prompt, e.answer) for e in every) == sorted(
        (f"What is {a} + {b}? Reply with only the number.", str(a + b)) for a in range(10) for b in range(10))
    assert all(len(e.answer.split()) == 1 for e in questions.examples(64, seed=0, split="all"))
    with pytest.raises(ValueError, match="takes no argument; write --task sums"):
        get_task("sums:3")
