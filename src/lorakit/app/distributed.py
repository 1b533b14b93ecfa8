"""Training on several processes with torchrun: DistributedDataParallel over the LoRA parameters.

``torchrun --standalone --nproc_per_node N -m lorakit train ...`` (or ``lorakit train --nproc N``,
which runs torch's elastic launcher itself, ``launch``) sets ``RANK`` / ``WORLD_SIZE``; ``setup``
then joins the process group (gloo on CPU, nccl on GPU). The data is cut so that N ranks with batch b train exactly what one
process with batch N·b trains: every rank walks the same global batch order (``batch_size × N``
examples per micro-batch) and takes its own slice; the loss of each rank is divided by the global
number of loss units, so DDP's gradient average times N is the one-process gradient. DDP syncs only
parameters that require gradients (the adapters); the frozen base is loaded by every rank and never
sent. Every trainable parameter joins every backward (``+ 0·Σp``), so an adapter that gets no
gradient on a rank in a step (an empty slice, a loss that skips part of the model) cannot stall
the reduction. Rank 0 alone evaluates and writes outputs, logs and the progress bar.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import devices


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job.

    Attributes:
        rank: 0..world-1; rank 0 writes the outputs.
        world: number of processes.
        device: ``cuda:LOCAL_RANK`` with nccl, else ``cpu`` (gloo).
        fsdp: shard each decoder layer, frozen base included, with FSDP2 (``shard_blocks``) instead of DDP.
    """

    rank: int
    world: int
    device: torch.device
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (small, picklable values between this job's processes)."""
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def resume_command(folder: str) -> str:
    """How to resume a run in ``folder`` from this process: ``lorakit train --resume`` (which starts
    torchrun again for a ``--nproc`` run), or the torchrun command that started this job."""
    quoted = shlex.quote(str(folder))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "LORAKIT_NPROC" not in os.environ:
        return f"torchrun --standalone --nproc_per_node {world} -m lorakit train --resume {quoted}"
    return f"lorakit train --resume {quoted}"


# FSDP2's sharded loading (``fsdp_load``) builds the other ranks' models on ``meta`` and fills them on the
# CPU; on CUDA it is not built yet (DDP is)
FSDP_CPU_ONLY = "--fsdp runs on the CPU (gloo) in this version; on GPUs use DDP (drop --fsdp) or --device cpu"


WAIT = datetime.timedelta(hours=2)  # how long a rank waits in a collective (rank 0 evaluating, writing)


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def peer_lost(e: BaseException) -> bool:
    """Whether ``e``, raised in a process of a multi-process job, is a collective failing because another
    process died (gloo / NCCL: a reset connection, a closed store)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    return launched() and (isinstance(e, dist_error) or any(w in text for w in ("gloo", "NCCL", "c10d", "Connection")))


def setup(fsdp: bool = False, device: str = "auto") -> Dist | None:
    """Join the torchrun job; None outside one. ``device`` (``devices.resolve``): on ``cuda:LOCAL_RANK``
    with nccl, or on the CPU with gloo.

    Raises:
        UsageError: a device this process cannot take (``devices.resolve``), before joining.
    """
    if not launched():
        return None
    where = devices.select(device, FSDP_CPU_ONLY if fsdp else None, int(os.environ.get("LOCAL_RANK", "0")),
                           int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not dist.is_initialized():  # the others wait while rank 0 evaluates: longer than nccl's 10 minutes
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=WAIT)
    return Dist(dist.get_rank(), dist.get_world_size(), where, fsdp)


def teardown(d: Dist | None) -> None:
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()


def share(batch: list, d: Dist | None) -> tuple[list, bool]:
    """This rank's slice of a global batch: ``(examples, empty)``; an empty slice (a short last batch)
    is the batch's first example, to be weighted 0, so every rank runs the same forward count."""
    if d is None:
        return batch, False
    per = -(-len(batch) // d.world)
    mine = batch[d.rank * per:(d.rank + 1) * per]
    return (mine, False) if mine else (batch[:1], True)


def broadcast_trainable(model: nn.Module) -> None:
    """Rank 0's values of every trainable parameter on every rank (the frozen base is not sent)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)


class _Loss(nn.Module):
    """The task's loss as a module's forward, so that DDP sees the forward (tasks call submodules,
    e.g. the decoder without the LM head, which DDP's own forward would not cover)."""

    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch, weight: float):
        out = self.loss(self.model, batch) * weight
        # every trainable parameter in every backward, with a zero gradient where the loss skipped it
        return out + sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0


class Replica:
    """DDP over a model's trainable parameters and a task's loss."""

    def __init__(self, model: nn.Module, loss, d: Dist) -> None:
        self.d = d
        self.ddp = nn.parallel.DistributedDataParallel(
            _Loss(model, loss), device_ids=[d.device.index] if d.device.type == "cuda" else None,
            forward_sync_buffers=False, init_sync=False)

    def loss(self, batch, weight: float = 1.0) -> torch.Tensor:
        return self.ddp(batch, weight)

    def no_sync(self, skip: bool):
        """Accumulate without the all-reduce (every micro-batch of a step but the last)."""
        return self.ddp.no_sync() if skip else nullcontext()


def without_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` (what each torchrun worker runs)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            out.append(a)
    return out


# glibc's malloc: blocks of 256 KiB and more get their own memory map, returned to the system when
# freed. By default the threshold grows to the largest block freed (up to 32 MiB), so FSDP's per-layer
# gather buffers, allocated and freed every forward, end up in the heap, which fragments and keeps them
# (SmolLM2-135M, 16 test words then 3 steps: rank 1 grew from 1.1 to 1.9 GiB; 0.9 GiB with this).
FSDP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}


def launch(argv: list[str], nproc: int, fsdp: bool = False) -> int:
    """Run ``lorakit <argv>`` on ``nproc`` processes, as ``torchrun --standalone --nproc_per_node nproc``
    does (torch's elastic launcher, in this process); the exit status. ``fsdp``: the workers start
    with ``FSDP_MALLOC`` in their environment (unless set already).

    SIGINT / SIGTERM reach the workers (which checkpoint, then exit); a failing worker stops the others
    and its status is returned (rank 0's message says why; another rank's failure is named here).
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks report for themselves
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets: the ranks share the cores
    os.environ["LORAKIT_NPROC"] = str(nproc)
    for k, v in FSDP_MALLOC.items() if fsdp else ():
        os.environ.setdefault(k, v)  # read by glibc when a worker starts
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "lorakit.app.cli", *argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        own = e.failures.get(0)
        if own is not None and own.exitcode > 0:  # rank 0 failed by itself: it printed why
            return own.exitcode
        rank, failure = e.get_first_failure()
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"lorakit: error: process {rank} of {nproc} exited with status {status}", file=sys.stderr)
        return status
    return 0


def shard_blocks(blocks: list[nn.Module]) -> None:
    """FSDP2 (``fully_shard``) on each block: its parameters, frozen base and adapters alike, are
    split across the ranks and gathered for the block's forward and backward only; the adapters'
    gradients are reduce-scattered (averaged, like DDP's). Parameters outside the blocks (embeddings,
    final norm, LM head) stay whole on every rank. Blocks already sharded are left as they are.

    ``reshard_after_forward=True`` is explicit: each block is its own FSDP root (no sharded parent),
    and torch's default keeps a root gathered after its forward, which would leave every layer whole
    on every rank from the first forward on (evaluation, generation) and through each step's forward.
    The mesh is the CPU's (gloo), named: torch's default is the accelerator's wherever one is visible."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    todo = [b for b in blocks if not isinstance(b, FSDPModule)]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if todo else None
    for b in todo:
        fully_shard(b, mesh=mesh, reshard_after_forward=True)


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole (a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
