"""--report_to: each tracker gets the run's config, every metric of every row at its step, and a samples table at
every evaluation. TensorBoard is read back from its event files; trackio and wandb, whose packages are not installed
here, are checked against stand-ins that record the calls (their signatures as in trackio 0.43 and wandb 0.31)."""

import json
import sys
import types

import pytest

from tests.helpers import loop_args, read_log


def _run(tmp_path, tiny_student_dir, tiny_model_dir, kind, **extra):
    from opd_mini import train

    out = tmp_path / "run"
    code = train.main(loop_args(tiny_student_dir, tiny_model_dir, out, report_to=kind, eval_every=1, **extra))
    return code, out


def test_tensorboard_event_files_hold_every_metric_and_the_samples_table(tmp_path, tiny_student_dir, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out = _run(tmp_path, tiny_student_dir, tiny_model_dir, "tensorboard")
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    rows = read_log(out)
    for key in ("loss/total", "eval/pass@1", "eval/kl_reverse", "optim/grad_norm"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        wanted = {r["step"]: r[key] for r in rows if key in r}
        assert logged.keys() == wanted.keys() and all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in wanted.items())
    texts = events.Tags()["tensors"]
    assert "config/text_summary" in texts and "eval/samples/text_summary" in texts
    table = events.Tensors("eval/samples/text_summary")
    assert [t.step for t in table] == [0, 1, 2]  # one table per evaluation
    first = table[0].tensor_proto.string_val[0].decode()
    assert first.startswith("| prompt | completion | reward | kl_per_token |") and first.count("\n") >= 3
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in config


class Recorder(types.ModuleType):
    """A stand-in tracker module: records every call."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))

    class Table:
        def __init__(self, columns=None, data=None):
            self.columns, self.data = columns, data


@pytest.mark.parametrize("kind", ["trackio", "wandb"])
def test_trackio_and_wandb_get_the_config_every_row_and_a_table_per_evaluation(kind, tmp_path, tiny_student_dir,
                                                                               tiny_model_dir, monkeypatch):
    import importlib.util

    fake = Recorder(kind)
    monkeypatch.setitem(sys.modules, kind, fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == kind else real(name, *a))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code, out = _run(tmp_path, tiny_student_dir, tiny_model_dir, kind)
    assert code == 0
    (init, *logs, last) = fake.calls
    assert init[0] == "init" and init[1]["config"]["report_to"] == kind and init[1]["name"] == "run"
    if kind == "wandb":
        assert init[1]["mode"] == "offline" and init[1]["dir"] == str(out)
    assert last == ("finish",)
    rows = read_log(out)
    metrics = [c for c in logs if "eval/samples" not in c[1]]
    assert [c[2] for c in metrics] == [r["step"] for r in rows]  # every row, at its step
    assert metrics[1][1]["loss/total"] == pytest.approx(rows[1]["loss/total"])
    tables = [c for c in logs if "eval/samples" in c[1]]
    assert [c[2] for c in tables] == [0, 1, 2]
    t = tables[0][1]["eval/samples"]
    assert t.columns == ["prompt", "completion", "reward", "kl_per_token"] and len(t.data) >= 2
    assert all(isinstance(row[2], float) and isinstance(row[3], float) for row in t.data)


def test_an_uninstalled_or_unknown_tracker_is_one_line_and_exit_code_2(tmp_path, tiny_student_dir, tiny_model_dir,
                                                                        capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out = _run(tmp_path, tiny_student_dir, tiny_model_dir, "wandb")
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "run `pip install wandb`" in err[0], err
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(SystemExit) as exit_:  # the command line's own check of a choice
        _run(tmp_path, tiny_student_dir, tiny_model_dir, "mlflow")
    assert exit_.value.code == 2 and "argument --report_to: invalid choice: 'mlflow'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
