"""The demo (python -m opd_mini.experiments demo) at --quick scale, its worlds, the docs block made from its
results, and the experiments package as a whole (its command, and a library that never imports it).

The quick run is shared by the tests of this module (one run of under a minute on 2 cores: the two walk
settings, whose claims they check). Its qualitative assertions were chosen against the seed spread measured
at this scale (three seeds), each with its margin in the comment beside it.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd_mini.experiments import EXPERIMENTS, demo, toolkit, worlds
from opd_mini.tasks import get_task

#: the quick demo trains live and checks its claims within the seed spread: CI runs it again under a second
#: CPU kernel set
pytestmark = pytest.mark.kernels

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "demo.json"
DOCS = ROOT / "docs" / "results.md"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "demo.json").read_text()), out


def _method(setting: dict, name: str) -> dict:
    return next(m for m in setting["methods"] if m["method"] == name)


def _mean(values: list) -> float:
    return toolkit.mean_std(values)[0]


def _stdev(values: list) -> float:
    return toolkit.mean_std(values)[1]


def test_quick_demo_writes_the_promised_json_table_and_figure(quick):
    result, out = quick
    assert [s["name"] for s in result["settings"]] == list(demo.SCALES["quick"]["settings"])
    for s in result["settings"]:
        assert 0.0 <= s["teacher_pass@1"] <= 1.0
        for m in s["methods"]:
            assert m["method"].split("_")[0] in ("sft", "grpo", "opd")
            assert m["seeds"] == [0, 1, 2]
            assert len(m["samples_to_target"]) == len(m["final_pass@1"]) == 3
            for x in m["samples_to_target"]:  # a number of sequences, or None for "never reached"
                assert x is None or (isinstance(x, int) and x % 64 == 0 and x > 0)
            assert all(0.0 <= p <= 1.0 for p in m["final_pass@1"])
    assert (out / "demo.png").stat().st_size > 10_000
    # the docs block and the full tables (seconds and FLOPs too): one table per setting each
    text = (out / "demo.md").read_text()
    assert text.count("| method | sequences to target | final pass@1 |") == len(result["settings"])
    assert text.count("| method | sequences to target | seconds to target |") == len(result["settings"])


def test_quick_demo_teachers_are_what_the_settings_promise(quick):
    result, _ = quick
    by = {s["name"]: s for s in result["settings"]}
    assert by["compounding"]["teacher_pass@1"] > 0.95
    assert 0.6 <= by["noisy_teacher"]["teacher_pass@1"] <= 0.78  # built to 0.6-0.75 on other prompts
    assert by["noisy_teacher"]["teacher_entropy"] > 5 * by["compounding"]["teacher_entropy"]
    # the settings the quick run leaves out, as the full run measured them (the same shipped models)
    full = {s["name"]: s for s in json.loads(COMMITTED.read_text())["settings"]}
    assert full["counter_example"]["teacher_pass@1"] > 0.95
    assert full["capacity"]["student_params"] < full["capacity"]["teacher_params"] / 10


def test_quick_demo_grpo_does_not_depend_on_the_teacher(quick):
    """compounding and noisy_teacher share their student; GRPO never calls the teacher, so its runs are equal."""
    result, _ = quick
    by = {s["name"]: s for s in result["settings"]}
    assert _method(by["compounding"], "grpo")["final_pass@1"] == _method(by["noisy_teacher"], "grpo")["final_pass@1"]


def test_quick_demo_noisy_teacher_sft_copies_its_noise_and_opd_does_not(quick):
    """With a stochastic teacher, SFT on its samples learns its spread (higher entropy, lower pass@1) while
    full reverse KL on the student's own samples stays sharper. Measured at this scale (3 seeds, two builds of the
    library's sampler): entropy 0.615 ± 0.021 and 0.618 ± 0.006 (SFT) vs 0.513 ± 0.018 and 0.508 ± 0.017 (full),
    pass@1 0.358 ± 0.035 and 0.401 ± 0.029 vs 0.528 ± 0.044 and 0.549 ± 0.027; full reached the 30 % target on
    every seed, SFT on none. Each gap must exceed two seed standard deviations."""
    result, _ = quick
    s = next(s for s in result["settings"] if s["name"] == "noisy_teacher")
    sft, full = _method(s, "sft"), _method(s, "opd_full")
    for key, sign in (("entropy", -1), ("final_pass@1", +1)):
        spread = max(_stdev(full[key]), _stdev(sft[key]))
        assert sign * (_mean(full[key]) - _mean(sft[key])) > 2 * spread, key
    reached = [sum(x is not None for x in m["samples_to_target"]) for m in (full, sft)]
    assert reached[0] > reached[1]


@pytest.mark.parametrize("argv, message", [
    (["--settings", "nope"], "--settings must name"),
    (["--methods", "sft,dagger"], "--methods must name"),
    (["--seeds", "a,b"], "--seeds must be"),
    (["--seeds", "0,0"], "--seeds needs distinct integers"),
    (["--steps", "0"], "steps=0 is out of range"),
    (["--lr", "2"], "lr"),
])
def test_demo_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert demo.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_demo_reports_never_reached_as_such_and_exits_2_when_nothing_reaches(tmp_path, capsys):
    """One step cannot reach any target: the table says "never" (not a number), the JSON holds null, exit 2."""
    out = tmp_path / "d"
    code = demo.main(["--settings", "compounding", "--methods", "sft", "--seeds", "0", "--steps", "1", "--quick",
                      "--workers", "1", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and "no method reached its target" in captured.err and "raise --steps" in captured.err
    result = json.loads((out / "demo.json").read_text())
    assert result["settings"][0]["methods"][0]["samples_to_target"] == [None]
    assert "| sft | never |" in captured.out


def test_to_target_and_flops_by_hand():
    run = {"evals": [{"step": 0, "eval/pass@1": 0.9}, {"step": 2, "eval/pass@1": 0.4}, {"step": 4, "eval/pass@1": 0.7}],
           "step_seconds": [1.0, 2.0, 3.0, 4.0]}
    got = demo.to_target(run, 0.6, 64, [10.0, 20.0, 30.0, 40.0])
    assert got == {"sequences": 256, "seconds": 10.0, "flops": 100.0}  # step 0 does not count
    assert demo.to_target(run, 0.8, 64, [1.0] * 4) == {"sequences": None, "seconds": None, "flops": None}
    # 10 completion tokens + 2 sequences × 3 prompt tokens = 16 tokens, each passed through:
    # SFT: the teacher samples (2·Pt per token, the prompt's prefill included), the student trains (6·Ps)
    assert demo.flops_per_step("sft", 10, 2, 3, 5, 7) == 2 * 7 * 16 + 6 * 5 * 16
    # OPD: the student samples, the teacher scores prompt + completion
    assert demo.flops_per_step("opd_full", 10, 2, 3, 5, 7) == 2 * 5 * 16 + 2 * 7 * 16 + 6 * 5 * 16
    assert demo.flops_per_step("grpo", 10, 2, 3, 5, 7) == 2 * 5 * 16 + 6 * 5 * 16


def test_walk_task_accepts_any_walk_that_ends_on_the_goal():
    task = get_task("walk:10")
    for e in task.examples(50, seed=3):
        assert task.reward(e.answer, e) == 1.0
        assert task.reward("RL" + e.answer, e) == 1.0 and task.reward("LR" + e.answer + "<eos>junk", e) == 1.0
        assert task.reward(e.answer + e.answer[:1], e) == 0.0 and task.reward("x", e) == 0.0
    with pytest.raises(ValueError, match="2 <= N <= 10"):
        get_task("walk:11")


def test_repair_data_trains_only_on_the_way_back():
    task = get_task("walk:10")
    recipe = worlds.Recipe(data="repair", p=1.0)
    prompts, completions, skip = worlds.training_batch(task, recipe, 64, seed=0)
    for prompt, completion, skipped in zip(prompts, completions, skip):
        k = len(skipped)
        assert 1 <= k <= 3 and skipped == list(range(k))  # the leading random moves, no loss on them
        assert task.end_position(prompt, completion) == int(prompt[2])  # the repaired walk ends on the goal
        back = completion[k:]
        assert len(set(back)) <= 1  # the part with loss is the direct path from wherever the prefix led


def test_noisy_data_flips_characters_at_the_given_rate():
    task = get_task("reverse:5")
    _, noisy, _ = worlds.training_batch(task, worlds.Recipe(data="noisy", p=0.2), 2000, seed=0)
    clean = [e.answer for e in task.examples(2000, seed=0, split="train")]
    flipped = sum(a != b for x, y in zip(noisy, clean) for a, b in zip(x, y)) / (5 * 2000)
    assert abs(flipped - 0.2) < 0.02


def test_shipped_worlds_match_their_recipes():
    for name in worlds.SETTINGS:
        paths = worlds.ensure_setting(name)
        info = paths["info"]
        roles = [r for r in ("teacher", "student") if getattr(worlds.SETTINGS[name], r) is not None]
        assert info["version"] == worlds.WORLDS_VERSION and Path(paths[roles[0]], "config.json").exists()
        for role in roles:  # a setting may be a student alone (continual: the forgetting experiment's start)
            assert info[role]["reached"], (name, role)
        if "teacher" not in roles:
            assert paths["teacher"] is None and info["teacher"] is None


def test_committed_results_and_docs_agree():
    """The docs' demo block is generated from the committed demo.json: regenerate both with
    `python -m opd_mini.experiments demo --out tutorials/results`, then `toolkit.write_docs(demo)`."""
    result = json.loads(COMMITTED.read_text())
    assert toolkit.read_block(DOCS, "demo") == demo.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3


def test_docs_reading_of_the_results_holds_on_the_committed_json():
    """The docs' (number-free) reading of the demo, checked statement by statement against demo.json."""
    result = json.loads(COMMITTED.read_text())
    by = {s["name"]: s for s in result["settings"]}

    def final(s, m):
        return _mean(_method(by[s], m)["final_pass@1"])

    def samples(s, m):
        v = _method(by[s], m)["samples_to_target"]
        return None if None in v else _mean(v)

    names = [m["method"] for m in by["counter_example"]["methods"]]

    def std(s, m):
        return _stdev(_method(by[s], m)["final_pass@1"])

    # counter_example: SFT and JSD highest, within each other's spread; full next; sampled, GRPO, the mix hardly move
    top = sorted(names, key=lambda m: -final("counter_example", m))
    assert set(top[:2]) == {"sft", "opd_jsd"} and set(top[2:4]) == {"opd_topk_tail", "opd_full"}
    assert abs(final("counter_example", "sft") - final("counter_example", "opd_jsd")) < max(
        std("counter_example", "sft"), std("counter_example", "opd_jsd"))
    start = by["counter_example"]["student_start_pass@1"]
    assert all(abs(final("counter_example", m) - start) < 0.05 for m in ("opd_sampled", "grpo", "opd_grpo"))
    assert by["counter_example"]["student_start_recoverable_total"] == 0  # a wrong digit is never recoverable
    assert all(_mean(m["recoverable"]) < 0.005 for m in by["counter_example"]["methods"])
    # compounding: full and JSD within one evaluation interval of SFT, and level at the end; the others slower
    every = by["compounding"]["methods"][0]["curve"]["sequences"][1]  # sequences between two evaluations
    for m in ("opd_full", "opd_jsd"):
        assert samples("compounding", m) <= samples("compounding", "sft") + every
        assert abs(final("compounding", m) - final("compounding", "sft")) < 0.05
    for m in ("opd_sampled", "opd_topk", "opd_grpo"):
        assert samples("compounding", m) > samples("compounding", "sft")
    assert 0 < _method(by["compounding"], "grpo")["samples_to_target"].count(None) < len(result["seeds"])
    # recovery: most start samples deviate, about a fifth recoverably, almost none repaired; every method deviates
    # less, none repairs more than about one in eight, no OPD variant above SFT by more than the seed spread
    c = by["compounding"]
    assert c["student_start_deviated"] > 0.5 and 0.1 < c["student_start_recoverable"] < 0.3
    assert c["student_start_recovered_pooled"] < 0.1
    assert all(_mean(m["deviated"]) < c["student_start_deviated"] for m in c["methods"])
    assert all(m["recovered_pooled"] < 0.15 for m in c["methods"])

    def repaired(m):
        return [x for x in _method(c, m)["recovered"] if x is not None]

    for m in (n for n in names if n.startswith("opd")):
        assert _mean(repaired(m)) - _mean(repaired("sft")) < max(_stdev(repaired(m)), _stdev(repaired("sft"))), m
    # noisy_teacher: full needs fewer than half of SFT's samples, lower entropy, ends within the spread;
    # GRPO and the mix highest on average; nobody above the teacher
    budget = result["steps"] * result["run"]["prompts_per_step"] * result["run"]["num_generations"]
    sft_censored = _mean([budget if x is None else x for x in _method(by["noisy_teacher"], "sft")["samples_to_target"]])
    assert samples("noisy_teacher", "opd_full") < sft_censored / 2
    assert _mean(_method(by["noisy_teacher"], "opd_full")["entropy"]) < _mean(_method(by["noisy_teacher"], "sft")["entropy"])
    assert abs(final("noisy_teacher", "opd_full") - final("noisy_teacher", "sft")) < max(
        std("noisy_teacher", "opd_full"), std("noisy_teacher", "sft"))
    ranked = sorted(names, key=lambda m: -final("noisy_teacher", m))
    assert set(ranked[:2]) == {"grpo", "opd_grpo"}
    assert not result["claims"]["opd_above_noisy_teacher_every_seed"]["holds"]
    assert all(_mean(m["entropy"]) > by["noisy_teacher"]["teacher_entropy"] for m in by["noisy_teacher"]["methods"])
    assert by["noisy_teacher"]["student_start_recoverable"] < 0.02
    assert all(_mean(m["recoverable"]) < 0.02 for m in by["noisy_teacher"]["methods"])
    # capacity: nobody reaches the target; highest and lowest (GRPO, top-K) about two seed stds apart, others less
    assert all(samples("capacity", m) is None for m in names)
    cap = by["capacity"]  # the capacity student keeps visiting recoverable states; OPD repairs more of them than SFT
    assert 0.2 < cap["student_start_recoverable"] < 0.3
    assert all(0.15 < _mean(m["recoverable"]) < 0.35 for m in cap["methods"])
    fixed = {m["method"]: [x for x in m["recovered"] if x is not None] for m in cap["methods"]}
    for m in (n for n in names if n.startswith("opd")):
        assert _mean(fixed[m]) - _mean(fixed["sft"]) > max(_stdev(fixed[m]), _stdev(fixed["sft"])), m
        assert _method(cap, m)["recovered_pooled"] < 0.1, m
    spread = max(std("capacity", m) for m in names)
    ranked = sorted(names, key=lambda m: -final("capacity", m))
    assert (ranked[0], ranked[-1]) == ("grpo", "opd_topk")
    assert 1.5 * spread < final("capacity", "grpo") - final("capacity", "opd_topk") < 2.5 * spread
    assert all(abs(final("capacity", a) - final("capacity", b)) < 2 * spread
               for a in names for b in names if {a, b} != {"grpo", "opd_topk"})
    # top-K: the highest student entropy in every setting
    for s in result["settings"]:
        assert max(s["methods"], key=lambda m: _mean(m["entropy"]))["method"] == "opd_topk", s["name"]
    # the tail bucket: entropy down to full reverse KL's (within a seed sd), final pass@1 above the renormalised top-K's
    for s in by:
        tail, full = _method(by[s], "opd_topk_tail")["entropy"], _method(by[s], "opd_full")["entropy"]
        assert abs(_mean(tail) - _mean(full)) < max(_stdev(tail), _stdev(full)), s
        assert final(s, "opd_topk_tail") > final(s, "opd_topk"), s


# --------------------------------------------------------------------------------------------
# the experiments package
# --------------------------------------------------------------------------------------------


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a source file: ``import X``, ``from X import Y`` (X and
    X.Y), relative ones resolved against the file's package, and ``importlib.import_module("X")`` / ``__import__``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            out += [(node.lineno, a.value) for a in node.args[:1] if isinstance(a, ast.Constant)]
    return out


def test_the_library_never_imports_the_experiments():
    """opd_mini (outside opd_mini/experiments) imports nothing from opd_mini.experiments, in any form."""
    library = [p for p in sorted((ROOT / "opd_mini").rglob("*.py")) if "experiments" not in p.parts]
    assert len(library) > 10  # the scan sees the library
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in library
                 for line, name in _imported_names(path)
                 if name == "opd_mini.experiments" or name.startswith("opd_mini.experiments.")]
    assert not offenders, offenders
    # and the scan would see one: this package's own entry point imports it
    assert any(n == "opd_mini.experiments" for _, n in _imported_names(ROOT / "opd_mini/experiments/__main__.py"))


def test_every_experiment_is_listed_and_follows_the_template():
    import importlib

    done = subprocess.run([sys.executable, "-m", "opd_mini.experiments"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.split("experiments:", 1)[1].splitlines() if line.strip()]
    assert listed == list(EXPERIMENTS)
    for name, (module_name, about) in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        assert about and callable(module.main), name
        if name != "worlds":  # the worlds' builder has its own command; every other entry is an experiment
            assert module.NAME == name
            for attr in ("add_arguments", "run", "docs_block", "figure"):
                assert callable(getattr(module, attr)), (name, attr)


def test_an_unknown_experiment_is_one_error_line_naming_the_known_ones():
    done = subprocess.run([sys.executable, "-m", "opd_mini.experiments", "demoo", "--quick"], capture_output=True,
                          text=True, cwd=ROOT)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), done.stderr
    assert "demoo" in err[0] and all(name in err[0] for name in EXPERIMENTS)


def test_deviations_against_a_token_by_token_reference():
    """demo.deviations on the compounding student's samples, against a reference that feeds each sample alone
    (prompt + completion, no padding) through the teacher and walks its tokens; recoverable deviations are a subset of
    those, and the teacher's own samples hardly deviate from its path."""
    import torch
    from transformers import AutoTokenizer

    from opd_mini.eval import held_out_examples
    from opd_mini.sampler import eos_token_ids, sample

    setting, paths = worlds.get_setting("compounding"), worlds.ensure_setting("compounding", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    teacher, student = toolkit.load_frozen(paths["teacher"]), toolkit.load_frozen(paths["student"])
    task, T = get_task(setting.task), setting.max_new_tokens
    examples = held_out_examples(task, 24, 0)
    with torch.no_grad():
        r = sample(student, tokenizer, [e.prompt for e in examples], num_generations=2, max_new_tokens=T,
                   temperature=1.0, seed=5, use_chat_template=False)
    rows = [examples[i] for i in r.prompt_index_B.tolist()]
    rewards = task.rewards(r.completions, rows)
    got = demo.deviations(r, rewards, rows, teacher, tokenizer, task, max_new_tokens=T, seed=5)
    eos, first = set(eos_token_ids(teacher, tokenizer)), {}
    for b, e in enumerate(rows):
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        tokens = r.tokens_BT[b][r.mask_BT[b]].tolist()
        with torch.no_grad():
            p = teacher(torch.tensor([prompt + tokens])).logits[0].float().softmax(-1)
        for t, y in enumerate(tokens):
            if p[len(prompt) + t - 1, y] < demo.DEVIATION_P:
                first[b] = (t, y)
                break
    n = len(rewards)
    assert abs(got["deviated"] * n - len(first)) <= 1  # one token may sit at the threshold under another padding
    assert 0 < len(first) < n  # the student both stays on and leaves the teacher's path here
    assert got["recoverable_n"] == round(got["recoverable"] * n) <= len(first)
    assert got["recoverable_n"] <= sum(1 for t, y in first.values() if y not in eos and t + 1 < T)
    assert 0 <= got["recovered_n"] <= got["recoverable_n"]
    with torch.no_grad():
        own = sample(teacher, tokenizer, [e.prompt for e in examples], num_generations=2, max_new_tokens=T,
                     temperature=1.0, seed=5, use_chat_template=False)
    own_rows = [examples[i] for i in own.prompt_index_B.tolist()]
    assert demo.deviations(own, task.rewards(own.completions, own_rows), own_rows, teacher, tokenizer, task,
                           max_new_tokens=T, seed=5)["deviated"] < 0.1
