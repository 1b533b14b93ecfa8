"""``lorakit train`` on CUDA, run where torch sees a GPU (skipped elsewhere: CI and this project's
machines have none). ``pytest tests/test_gpu.py`` is the GPU check: one process on ``cuda`` trains the
adapter one process on the CPU trains (float32 matmuls; TF32 is off by default), and with two GPUs
2 ranks (nccl) equal 1 process with twice the batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import world  # noqa: F401  (a tiny model folder, train.jsonl and val.jsonl)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 10


def _run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _train(out, batch, *extra):
    return ["train", "--model", "model", "--data", "train.jsonl", "--eval-data", "val.jsonl", "--steps", STEPS,
            "--batch-size", batch, "--no-progress", "--output", out, *map(str, extra)]


def _cli(*args):
    return [sys.executable, "-m", "lorakit.app.cli", *map(str, args)]


def _close(a_dir, b_dir, tol):
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert set(a) == set(b) and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < tol, worst


def test_one_gpu_trains_what_the_cpu_trains(world):
    gpu = _run(_cli(*_train("gpu", 4, "--device", "cuda")), world)
    assert f"device: cuda:0 ({torch.cuda.get_device_name(0)})" in gpu.stdout
    _run(_cli(*_train("cpu", 4, "--device", "cpu")), world)
    _close(world / "gpu", world / "cpu", 1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs a GPU per rank")
def test_two_gpus_with_nccl_equal_one_process_with_twice_the_batch(world):
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "lorakit.app.cli", *_train("nccl", 2, "--device", "cuda")]
    p = _run(run, world)
    assert "device: cuda:LOCAL_RANK (nccl) on each of 2 processes" in p.stdout
    _run(_cli(*_train("one", 4, "--device", "cuda")), world)
    _close(world / "nccl", world / "one", 1e-4)


def test_quantized_base_trains_on_the_gpu(world):
    pytest.importorskip("bitsandbytes")
    p = _run(_cli(*_train("nf4", 4, "--device", "cuda", "--quantize", "nf4")), world)
    assert "device: cuda:0" in p.stdout and (world / "nf4" / "adapter_model.safetensors").is_file()
