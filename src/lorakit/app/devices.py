"""Where ``lorakit train`` runs: ``--device auto|cpu|cuda|cuda:N``.

The model is moved to the chosen device once, after the adapter is injected; everything else
follows the model (``model_device``): batches, evaluation prompts and the loss are put where its
parameters are, so the loop and the tasks never name a device themselves. Under torchrun each
process takes ``cuda:LOCAL_RANK`` (nccl) or the CPU (gloo).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.errors import UsageError

AUTO = "auto"


def check_spec(spec: str) -> str:
    """``spec`` normalised (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), before anything is loaded.

    Raises:
        UsageError: any other value, naming it.
    """
    s = str(spec).strip().lower()
    kind, _, index = s.partition(":")
    if s in (AUTO, "cpu", "cuda") or (kind == "cuda" and index.isascii() and index.isdigit()):
        return s
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve(spec: str, local_rank: int | None = None, cpu_only: str | None = None, local_world: int = 1) -> torch.device:
    """The device of a run: ``auto`` is ``cuda`` where torch sees a CUDA device for each of the node's
    ``local_world`` processes, else the CPU; ``cuda`` under torchrun (``local_rank`` given) is
    ``cuda:LOCAL_RANK``. ``cpu_only``: why this run stays on the CPU (auto then picks it; an explicit CUDA
    device is refused with that reason).

    Raises:
        UsageError: a bad spec; CUDA asked for where torch sees none, or an index past the last device;
            an explicit index under torchrun (each process takes its own); ``cpu_only`` with CUDA asked for.
    """
    s = check_spec(spec)
    if s == AUTO:
        cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        s = "cuda" if cuda and cpu_only is None else "cpu"
    if s == "cpu":
        return torch.device("cpu")
    if cpu_only is not None:
        raise UsageError(f"--device {spec}: {cpu_only}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}); use --device cpu")
    if ":" in s and local_rank is not None:
        raise UsageError(f"--device {spec}: under torchrun each process takes cuda:LOCAL_RANK; give --device cuda")
    index = local_rank if local_rank is not None else int(s.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: cuda:{index} does not exist; torch sees {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return torch.device("cuda", index)


def select(spec: str, cpu_only: str | None = None, local_rank: int | None = None,
           local_world: int = 1) -> torch.device:
    """``resolve``, made torch's current CUDA device where it is one (bitsandbytes' kernels, nccl and
    ``torch.cuda``'s defaults use the current device, not the model's)."""
    device = resolve(spec, local_rank, cpu_only, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def describe(device: torch.device, world: int = 1) -> str:
    """For the log: ``cpu`` or ``cuda:0 (NVIDIA H200)``; under torchrun (``world`` > 1) what every process takes."""
    if world > 1:
        return f"{'cuda:LOCAL_RANK (nccl)' if device.type == 'cuda' else 'cpu (gloo)'} on each of {world} processes"
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


NO_BF16 = {"cuda": "this GPU has no native bfloat16 (compute capability 8.0+)",
           "cpu": "this CPU has no native bfloat16 (avx512_bf16/amx)"}


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: compute capability 8.0+ on CUDA (not torch's
    emulation on older GPUs), AVX512-BF16 or AMX on an x86 CPU (read from /proc/cpuinfo; False where it
    cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any), where its inputs go.
    A sharded (FSDP) parameter's local shard lies on the mesh's device, the one its inputs take."""
    for p in model.parameters():
        return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")


def to_model(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on ``model``'s device (no copy where they are already there)."""
    device = model_device(model)
    return tuple(t.to(device) for t in tensors)
