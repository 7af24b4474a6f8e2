"""--report_to: each tracker gets the run's config, every metric of every row at its step, and a samples table at
every evaluation. Each is read back from what it wrote: TensorBoard's event files, trackio's local store, wandb's offline
run file; trackio and wandb also against stand-ins that record the calls (their signatures as in trackio 0.43 and
wandb 0.31), which run where they are not installed."""

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


def _wandb_records(path) -> list:
    """The records of a wandb run file (``run-ID.wandb``): a 7-byte header, then 32 KiB blocks of chunks, each
    a CRC (4 bytes), a length (2) and a type (1: whole, 2: first, 3: middle, 4: last), each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in this block for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
    return records


@pytest.mark.parametrize("kind", ["trackio", "wandb"])
def test_the_real_trackers_store_every_row_and_a_table_per_evaluation(kind, tmp_path, tiny_student_dir,
                                                                      tiny_model_dir, monkeypatch):
    """The installed trackio and wandb (offline), read back from what they wrote: trackio's local SQLite store, the
    wandb run file and its table files."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # before the import: trackio reads it then
    pytest.importorskip(kind)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code, out = _run(tmp_path, tiny_student_dir, tiny_model_dir, kind)
    assert code == 0
    rows = read_log(out)
    wanted = {}  # step -> every numeric metric logged at that step
    for r in rows:
        wanted.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"
                                                 and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if kind == "trackio":
        import sqlite3

        db = sqlite3.connect(tmp_path / "trackio" / "opd_mini.db")
        logged, tables = {}, []
        for step, metrics in db.execute("select step, metrics from metrics where run_name = 'run' order by id"):
            metrics = json.loads(metrics)
            if "eval/samples" in metrics:
                tables.append((step, metrics["eval/samples"]["_value"]))
            else:
                logged.setdefault(step, {}).update(metrics)
        config = json.loads(db.execute("select config from configs where run_name = 'run'").fetchone()[0])
        assert config["report_to"] == "trackio"
        first_table = tables[0][1]
        assert set(first_table[0]) == {"prompt", "completion", "reward", "kl_per_token"}
    else:
        (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        logged, config = {}, None
        for record in _wandb_records(run_file):
            which = record.WhichOneof("record_type")
            if which == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged.setdefault(record.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_") and k != "eval/samples"})
            elif which == "run":
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        assert config["report_to"] == "wandb"
        files = sorted((out / "wandb").glob("offline-run-*/files/media/table/eval/samples_*.table.json"),
                       key=lambda p: int(p.name.split("_")[1]))
        tables = [(int(p.name.split("_")[1]), json.loads(p.read_text())) for p in files]
        first_table = tables[0][1]
        assert first_table["columns"] == ["prompt", "completion", "reward", "kl_per_token"]
    assert [step for step, _ in tables] == [0, 1, 2]  # one table per evaluation
    assert len(first_table["data"] if kind == "wandb" else first_table) >= 2
    assert logged.keys() == wanted.keys()
    for step, metrics in wanted.items():
        assert logged[step].keys() >= metrics.keys(), (step, sorted(metrics.keys() - logged[step].keys()))
        assert all(logged[step][k] == pytest.approx(v, rel=1e-6) for k, v in metrics.items()), step
