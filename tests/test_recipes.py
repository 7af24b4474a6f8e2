"""The recipes (recipes/*.yaml and recipes/experiments/*.yaml): each equals what it stands for, each runs one step,
flags and --set override any field and the run records what ran, and a bad recipe is one line naming the file and
the line."""

import json
from pathlib import Path

import pytest
import yaml

from opd_mini.config import PRESETS, TrainConfig
from opd_mini.experiments import EXPERIMENTS, toolkit

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_RECIPES = sorted(name for name in EXPERIMENTS if name != "worlds")


def _module(name: str):
    import importlib

    return importlib.import_module(EXPERIMENTS[name][0])


def test_every_preset_and_every_experiment_has_one_recipe_and_nothing_else_does():
    assert sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")) == sorted(PRESETS)
    assert sorted(p.stem for p in (ROOT / "recipes" / "experiments").glob("*.yaml")) == EXPERIMENT_RECIPES


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_recipe_is_its_preset_and_names_what_it_reproduces(name):
    data = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    reproduces = data.pop("reproduces")
    assert data == PRESETS[name]
    assert TrainConfig.from_file(ROOT / "recipes" / f"{name}.yaml") == TrainConfig.from_preset(name)
    committed = reproduces.split()[0]
    assert committed == "nothing" or (ROOT / committed).is_file(), reproduces


@pytest.mark.parametrize("name", EXPERIMENT_RECIPES)
def test_an_experiment_reads_its_settings_from_its_recipe(name):
    """Every key of the recipe is the module's constant of that name, and the committed result it names exists."""
    data = yaml.safe_load(toolkit.recipe_path(name).read_text())
    module = _module(name)
    assert data["experiment"] == name and module.RECIPE == data
    for key, value in data.items():
        if key not in toolkit.RECIPE_META:
            assert getattr(module, key.upper()) is module.RECIPE[key]
    committed = data["reproduces"].split()[0]
    assert (ROOT / committed).is_file() and committed.endswith(f"{getattr(module, 'COMMITTED', name + '.json')}")
    toolkit.check_recipe(name, data, data, toolkit.recipe_path(name), {})


def test_the_tiny_cpu_recipe_runs_a_step_and_flags_override_it(tmp_path):
    from opd_mini.train import main

    out = tmp_path / "run"
    assert main(["--config", str(ROOT / "recipes" / "tiny-cpu.yaml"), "--steps", "1", "--eval_every", "0",
                 "--eval_prompts", "4", "--out_dir", str(out), "--progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 1 and summary["config"]["lr"] == PRESETS["tiny-cpu"]["lr"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "time/step" in line] == [1]


#: The real model's quick scale is itself one step, run by tests/test_real_model.py (loading it takes most of a minute).
ONE_STEP_ELSEWHERE = ("real",)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPERIMENT_RECIPES if n not in ONE_STEP_ELSEWHERE])
def test_every_experiment_recipe_runs_one_step(name, tmp_path):
    """The experiment at its quick scale, one training step per run, one seed: the recipe drives a real run, and
    the result records the recipe that ran. (A budget this small may reach no target: that is exit 2 after the
    results are written, with its one line.)"""
    code = _module(name).main(["--quick", "--steps", "1", "--seeds", "0", "--workers", "1", "--out", str(tmp_path),
                               "--no-progress"])
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert code in (0, 2)
    assert result["recipe"]["values"] == toolkit.recipe(name) and result["recipe"]["set"] == []


def test_set_overrides_a_field_and_the_result_records_it(tmp_path):
    from opd_mini.experiments import along

    before = along.SCALES
    assert along.main(["--quick", "--seeds", "0", "--set", "scales.quick.prompts=4", "--set",
                       "scales.quick.continuations=1", "--out", str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    result = json.loads((tmp_path / "along.json").read_text())
    assert result["prompts"] == 4 and result["recipe"]["values"]["scales"]["quick"]["prompts"] == 4
    assert result["recipe"]["set"] == ["scales.quick.prompts=4", "scales.quick.continuations=1"]
    assert along.SCALES is before and along.SCALES["quick"]["prompts"] != 4  # restored after the run


def test_a_recipe_file_drives_the_run(tmp_path):
    from opd_mini.experiments import along

    data = yaml.safe_load(toolkit.recipe_path("along").read_text())
    data["scales"]["quick"].update(prompts=4, continuations=1)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    assert along.main(["--quick", "--seeds", "0", "--recipe", str(path), "--out", str(tmp_path / "out"),
                       "--no-progress", "--workers", "1"]) == 0
    result = json.loads((tmp_path / "out" / "along.json").read_text())
    assert result["prompts"] == 4 and result["recipe"]["file"] == str(path)


def test_merged_recipe_sets_values_typed_and_adds_methods():
    got = toolkit.merged_recipe("slips", None, ["run.lr=1e-3", "scales.full.slips=[0, 0.1]",
                                                "methods.opd_jsd.loss=jsd", "run.lora=true"])
    assert got["run"]["lr"] == 0.001 and got["scales"]["full"]["slips"] == [0, 0.1] and got["run"]["lora"] is True
    assert got["methods"]["opd_jsd"] == {"loss": "jsd"}
    assert toolkit.recipe("slips")["run"]["lr"] == 0.0005  # the shipped file is untouched


def _bad(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["run"].update(lrr=1), "line {line}: unknown field 'run.lrr'"),
    (lambda d: d["scales"]["quick"].update(stepz=1), "line {line}: unknown field 'scales.quick.stepz'"),
    (lambda d: d["methods"]["bc"].update(los="sft"), "line {line}: unknown field 'methods.bc.los'"),
    (lambda d: d.update(extra=1), "line {line}: unknown field 'extra'"),
    (lambda d: d["scales"]["quick"].pop("steps"), "scales.quick lacks steps"),
    (lambda d: d.pop("methods"), "lacks 'methods'"),
    (lambda d: d.update(experiment="demo"), "is experiment 'demo''s, not 'slips''s"),
])
def test_a_bad_experiment_recipe_is_one_line_with_the_file_and_line(edit, message, tmp_path, capsys):
    from opd_mini.experiments import slips

    data = yaml.safe_load(toolkit.recipe_path("slips").read_text())
    edit(data)
    path = _bad(tmp_path, yaml.safe_dump(data, sort_keys=False))
    bad_line = next((i + 1 for i, line in enumerate(path.read_text().splitlines())
                     if line.strip().startswith(("lrr:", "stepz:", "los:", "extra:"))), None)
    assert slips.main(["--quick", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message.format(line=bad_line) in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope/missing.yaml"], "recipe nope/missing.yaml does not exist"),
    (["--set", "run.lrr=1"], "--set 'run.lrr=1': unknown field 'run.lrr'"),
    (["--set", "nothing.here=1"], "--set 'nothing.here=1': the recipe has no 'nothing'"),
    (["--set", "run.lr"], "is not KEY=VALUE"),
])
def test_bad_recipe_flags_are_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    from opd_mini.experiments import slips

    assert slips.main(["--quick", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_train_recipe_with_an_unknown_field_names_the_file_and_line(tmp_path, capsys):
    from opd_mini.train import main

    path = _bad(tmp_path, (ROOT / "recipes" / "tiny-cpu.yaml").read_text() + "lrr: 0.1\n")
    line = len(path.read_text().splitlines())
    assert main(["--config", str(path), "--out_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"unknown config field 'lrr' in {path}, line {line}: did you mean 'lr'?" in err[0], err
    assert not (tmp_path / "run").exists()
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
