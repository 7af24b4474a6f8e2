"""Data-parallel training under ``accelerate launch`` (gloo, on the CPU) equals one process with grad_accum.

Two processes with ``prompts_per_step`` P take one global micro-batch each; one process with the same P and
``grad_accum`` 2 takes both, with the same prompts and sampling seeds. The token normaliser is the global
count and the gradients are summed over the processes, so every logged number and the final weights must
agree within float32 rounding, also after resuming the two-process run from its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_mini import distributed
from opd_mini.config import TrainConfig
from opd_mini.runs import check_resumed_processes, resume_changes
from opd_mini.train import main

ROOT = Path(__file__).resolve().parents[1]
#: A short run of the shipped tiny pair; every field is a flag of python -m opd_mini.train.
RUN = dict(preset="tiny-cpu", loss="reverse_kl_topk", top_k=4, prompts_per_step=4, num_generations=2,
           max_new_tokens=6, eval_prompts=4, eval_samples=1, pass_k=1, eval_every=0, save_every=1,
           progress="false")
TOL = dict(rel=1e-5, abs=1e-6)  # float32 rounding (on this machine the two runs agree exactly)


def args(out: Path, **overrides) -> list[str]:
    values = {**RUN, "out_dir": str(out), **overrides}
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def launch(tmp_path: Path, argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` of python -m opd_mini.train on ``processes`` CPU processes (gloo). Without GPUs,
    accelerate starts several processes only with --multi_gpu (its switch for torchrun); they stay on the CPU."""
    with socket.socket() as s:  # a free port for the rendezvous, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(tmp_path / "hf_home")}  # no user accelerate config file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "opd_mini.train", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    path = out / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt"
    return torch.load(path, weights_only=False)["trainable"]


def first_error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error"))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum_2_and_resume(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one, steps=3, grad_accum=2)) == 0  # the reference: this process, two micro-batches a step

    proc = launch(tmp_path, args(two, steps=2, grad_accum=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("metrics log:") == 1  # one report, from the main process
    # resumed on two processes from the step-2 checkpoint: step 3 must still match
    proc = launch(tmp_path, args(two, steps=3, grad_accum=1, resume="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr

    a, b = rows(one), rows(two)
    assert sorted(b) == sorted(a) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        assert b[step]["rollout/num_tokens"] == a[step]["rollout/num_tokens"]  # the global N
        for key in ("loss/total", "optim/grad_norm", "kl/reverse_topk", "teacher/entropy", "reward/mean",
                    "rollout/completion_len"):
            assert b[step][key] == pytest.approx(a[step][key], **TOL), (step, key)
        assert {k for k in b[step] if "eval" not in k} == {k for k in a[step] if "eval" not in k}
    for name, value in weights(one, 3).items():
        torch.testing.assert_close(weights(two, 3)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    saved = json.loads((two / "checkpoints" / "step_000003" / "trainer_config.json").read_text())
    assert saved["num_processes"] == 2

    # the two-process checkpoint resumed on one process: refused when num_processes × grad_accum changes ...
    capsys.readouterr()
    assert main(args(two, steps=4, grad_accum=1, resume="true")) == 2
    assert first_error_line(capsys.readouterr().err) == (
        "error: --resume on 1 process(es) with grad_accum=1 cannot continue a run checkpointed on 2 with grad_accum=1: "
        "num_processes × grad_accum must stay 2 (the step's micro-batches and their sampling seeds); resume with "
        "--grad_accum 2 on 1 process(es), or on 2, or start a new run in another --out_dir")
    assert sorted(rows(two)) == [0, 1, 2, 3]
    # ... allowed with grad_accum 2 (the same two micro-batches a step)
    assert main(args(two, steps=4, grad_accum=2, resume="true")) == 0
    assert sorted(rows(two)) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_bad_input_under_the_launcher_is_one_error_line_per_process_and_exit_code_2(tmp_path):
    proc = launch(tmp_path, args(tmp_path / "bad", steps=1, prompts_per_step=3))
    assert proc.returncode != 0  # the launcher's own status: torchrun reports a failed process as 1
    assert "exitcode  : 2" in proc.stderr  # each process ended with the bad-input code
    assert "prompts_per_step=3 is not allowed with 2 processes × grad_accum=1" in proc.stderr
    assert str(ROOT / "opd_mini") not in proc.stderr  # no traceback through opd_mini: only the launcher's report


@pytest.fixture
def two_processes(monkeypatch):
    """The environment a launcher gives the main process of two; the checks run before any rendezvous."""
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)


def test_prompts_per_step_must_split_over_processes_and_micro_batches(two_processes, tmp_path, capsys):
    assert main(args(tmp_path / "a", steps=1, prompts_per_step=6, grad_accum=2)) == 2
    line = first_error_line(capsys.readouterr().err)
    assert line == ("error: prompts_per_step=6 is not allowed with 2 processes × grad_accum=2: it must be divisible "
                    "by 4 (a step is cut into num_processes × grad_accum micro-batches of equal size); change "
                    "--prompts_per_step or --grad_accum")
    assert not (tmp_path / "a").exists()


def test_an_unsupported_backend(two_processes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a flag outside its choices: argparse's one-line usage error
        main(args(tmp_path / "a", steps=1, ddp_backend="mpi"))
    assert exit_.value.code == 2
    assert "argument --ddp_backend: invalid choice: 'mpi'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ddp_backend='mpi' is not allowed; choose one of auto, gloo, nccl"):
        TrainConfig(ddp_backend="mpi")  # the same from a --config file or from Python
    assert main(args(tmp_path / "b", steps=1, ddp_backend="nccl", device="cpu")) == 2
    assert first_error_line(capsys.readouterr().err) == (
        "error: ddp_backend='nccl' needs one CUDA GPU per process, but device=cpu: use --ddp_backend gloo (or auto) "
        "on the CPU")


def test_a_non_main_process_names_itself_in_its_error(two_processes, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(args(tmp_path / "a", steps=1, prompts_per_step=3)) == 2
    assert first_error_line(capsys.readouterr().err).startswith("error (process 2/2): prompts_per_step=3")


def test_resume_on_another_number_of_processes():
    """Allowed when num_processes × grad_accum stays the same (the same micro-batches and seeds: the run goes
    on as it would have); refused otherwise, naming the grad_accum that keeps it."""
    saved = {"grad_accum": 1, "num_processes": 2}
    assert resume_changes(saved, {"grad_accum": 2, "num_processes": 1}) == {"grad_accum": (1, 2),
                                                                          "num_processes": (2, 1)}
    check_resumed_processes({"grad_accum": 4}, {"grad_accum": 1, "num_processes": 4})  # old checkpoints: 1 process
    with pytest.raises(ValueError, match=r"× grad_accum must stay 2 .* resume with --grad_accum 2 on 1 "):
        check_resumed_processes(saved, {"grad_accum": 1, "num_processes": 1})
    with pytest.raises(ValueError, match=r"must stay 2 .* resume on 2 process\(es\)"):
        check_resumed_processes(saved, {"grad_accum": 1, "num_processes": 4})
    check_resumed_processes({"grad_accum": 1, "num_processes": 1}, {"grad_accum": 2, "num_processes": 1})  # as before


def test_one_process_is_untouched():
    """Without a launcher nothing is set up: every collective hands its input back."""
    d = distributed.Dist()
    assert d.world == 1 and d.is_main and list(d.micro_batches(3)) == [0, 1, 2]
    assert d.sum(5) == [5] and d.any(False) is False
    x = torch.arange(3.0)
    assert d.cat(x) is x
    assert distributed.current().world == 1
