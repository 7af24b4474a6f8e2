"""Data-parallel training on several processes: everything that differs from one process, in one place.

    accelerate launch --num_processes 4 -m opd_mini.train --preset laptop-gpu                # 4 GPUs, NCCL
    accelerate launch --multi_gpu --num_processes 2 -m opd_mini.train --preset tiny-cpu      # 2 CPU processes, gloo
    torchrun --nproc_per_node 2 -m opd_mini.train --preset tiny-cpu                         # the same, no accelerate

(On a machine without GPUs ``accelerate launch`` starts one process unless given ``--multi_gpu``, its
switch for "start the processes with torchrun"; the processes still run on the CPU, over gloo.)

Without a launcher (``WORLD_SIZE`` unset or 1), :func:`setup` returns a :class:`Dist` of one process whose
methods hand their inputs back unchanged: the default run never imports accelerate nor communicates.

With W processes and ``grad_accum`` A a step's ``prompts_per_step`` prompts are cut into W·A *global*
micro-batches of equal size, and process r takes the global micro-batches r·A … r·A + A − 1. A
micro-batch's prompts and sampling seed depend only on (seed, step, global micro-batch index), so W
processes with A micro-batches each sample exactly what one process with ``grad_accum`` W·A samples. Then

* the token count N is summed over the processes before any backward pass, so every process divides
  its loss by the *global* N;
* after the step's backward passes the gradients are summed over the processes (one all-reduce per
  bucket). Each process's loss is already Σ(its tokens)/N_global, so the sum is the gradient of the
  global per-token mean: what DDP's average of W · loss/N_global would give, with no model wrapper
  (``generate`` and a LoRA adapter's ``disable_adapter`` see the plain model);
* every process then clips and steps on the same summed gradient, so the weights stay equal (they
  are broadcast from the main process once, after loading);
* the logged metrics are reduced over the processes, and only the main process (rank 0) evaluates,
  logs, shows a progress bar and writes checkpoints. A resumed run loads the checkpoint on every process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from opd_mini.loading import resolve_device
from opd_mini.registry import MetricMean

#: How long a process waits in a collective: the others wait there while the main process evaluates and writes
#: checkpoints (torch's own default is 10 minutes for NCCL).
TIMEOUT = timedelta(hours=1)
#: Elements per gradient all-reduce (64 MB of fp32): large enough to be efficient, small enough not to double memory.
BUCKET_NUMEL = 1 << 24


@dataclass
class Dist:
    """This process's place in the run: ``world`` processes, this one is ``rank`` (0 = the main process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""
    device: torch.device | None = None  # this process's compute device under several processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where the tensors of a collective must live (NCCL: on this process's GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def place(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``; anything else is unchanged."""
        return self.device if self.world > 1 and device.type == "cuda" else device

    def micro_batches(self, grad_accum: int) -> range:
        """Global indices of this process's micro-batches in a step of world · grad_accum micro-batches."""
        return range(self.rank * grad_accum, (self.rank + 1) * grad_accum)

    # --- collectives (each returns its input unchanged on one process) -----------------------
    def sum(self, *values: float) -> list[float]:
        """Sum numbers over the processes (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (so all processes leave a loop together)."""
        return bool(self.sum(float(flag))[0] > 0) if self.world > 1 else flag

    def cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a same-shaped tensor of every process along dim 0, in rank order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x, device=self.comm_device) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.to(self.comm_device))
        return torch.cat(parts).to(x.device)

    def metrics(self, m: MetricMean) -> MetricMean:
        """The step's metrics over all processes: ``loss/total`` summed, the rest token-weighted means."""
        if self.world == 1:
            return m
        keys: list[list[str]] = [[] for _ in range(self.world)]
        torch.distributed.all_gather_object(keys, list(m.sums))
        names = sorted(set().union(*keys))
        t = torch.tensor([[m.sums.get(k, 0.0), m.weights.get(k, 0.0)] for k in names], dtype=torch.float64,
                         device=self.comm_device)
        torch.distributed.all_reduce(t)
        out = MetricMean()
        for k, (total, weight) in zip(names, t.tolist()):
            out.sums[k], out.weights[k] = total, 1.0 if k == "loss/total" else weight
        return out

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over the processes, in place. A parameter without a gradient on some process counts as
        zero there; one without a gradient on every process keeps ``grad=None`` (as on one process)."""
        if self.world == 1:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.comm_device)
        torch.distributed.all_reduce(has)
        grads = []
        for p, n in zip(params, has.tolist()):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        self._in_buckets(grads, lambda flat: torch.distributed.all_reduce(flat))

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Every process takes the main process's values of ``params``."""
        if self.world == 1:
            return
        with torch.no_grad():
            self._in_buckets([p.data for p in params], lambda flat: torch.distributed.broadcast(flat, src=0))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _in_buckets(self, tensors: list[torch.Tensor], op) -> None:
        """Apply the collective ``op`` to ``tensors`` flattened into buckets of one dtype and device."""
        bucket: list[torch.Tensor] = []
        for t in [*tensors, None]:
            if bucket and (t is None or t.dtype != bucket[0].dtype or t.device != bucket[0].device
                           or sum(b.numel() for b in bucket) + t.numel() > BUCKET_NUMEL):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dev = flat.device
                flat = flat.to(self.comm_device)
                op(flat)
                for b, piece in zip(bucket, flat.to(dev).split([b.numel() for b in bucket])):
                    b.copy_(piece.view_as(b))
                bucket = []
            if t is not None:
                bucket.append(t)


_current = Dist()


def current() -> Dist:
    """The :class:`Dist` of this process (one process until :func:`setup` has seen a launcher)."""
    return _current


def world_size() -> int:
    """Processes started by the launcher (``WORLD_SIZE``, set by accelerate launch and torchrun); 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def check(cfg, world: int) -> str:
    """The bad inputs of a data-parallel run, as ValueErrors; returns the backend to use ('' on one process)."""
    per_step = world * cfg.grad_accum
    if cfg.prompts_per_step % per_step:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not allowed with {world} processes × grad_accum="
                         f"{cfg.grad_accum}: it must be divisible by {per_step} (a step is cut into num_processes × "
                         "grad_accum micro-batches of equal size); change --prompts_per_step or --grad_accum")
    if world == 1:
        return ""
    device, _ = resolve_device(cfg.device, cfg.dtype)
    backend = cfg.ddp_backend if cfg.ddp_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not torch.distributed.is_available():
        raise ValueError("this torch build has no torch.distributed: run one process (without a launcher)")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"ddp_backend='nccl' needs one CUDA GPU per process, but device={device.type}: use "
                         "--ddp_backend gloo (or auto) on the CPU")
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise ValueError("ddp_backend='nccl' is not available in this torch build: use --ddp_backend gloo")
    if backend == "gloo" and not torch.distributed.is_gloo_available():
        raise ValueError("ddp_backend='gloo' is not available in this torch build: use --ddp_backend nccl on GPUs")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda" and torch.cuda.device_count() < local_world:
        raise ValueError(f"{local_world} processes on this machine but {torch.cuda.device_count()} CUDA GPU(s): "
                         "start at most one process per GPU (--num_processes)")
    return backend


def setup(cfg) -> Dist:
    """Check the run's settings for the launcher's number of processes; under several, join the process
    group (through accelerate's PartialState) and return this process's :class:`Dist`."""
    global _current
    world = world_size()
    backend = check(cfg, world)
    if world == 1:
        _current = Dist()
        return _current
    from accelerate import PartialState

    state = PartialState(cpu=resolve_device(cfg.device, cfg.dtype)[0].type == "cpu", backend=backend, timeout=TIMEOUT)
    if state.num_processes != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {state.num_processes} process(es): start "
                         "the run with accelerate launch or torchrun")
    _current = Dist(world=world, rank=state.process_index, local_rank=state.local_process_index, backend=backend,
                    device=torch.device(state.device))
    return _current


def close() -> None:
    """Leave the process group at the end of a command (nothing on one process)."""
    global _current
    if _current.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = Dist()
