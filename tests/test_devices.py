"""``lorakit train --device``: the spec is checked before anything is read, ``auto`` is the CPU where
torch sees no CUDA device, CUDA asked for where there is none is refused in one line, and batches follow
the model. The CUDA path itself runs in tests/test_gpu.py (skipped without a GPU)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from _tiny import tiny_model_folder, write_jsonl
from lorakit.app import devices, distributed
from lorakit.errors import UsageError
from test_resume_cli import records


@pytest.mark.parametrize("spec,want", [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda:3")])
def test_spec_is_normalised(spec, want):
    assert devices.check_spec(spec) == want


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", ""])
def test_bad_spec_is_refused_naming_it(spec):
    with pytest.raises(UsageError, match=f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}"):
        devices.check_spec(spec)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """What torch reports on a machine with two CUDA devices (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(no_cuda):
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UsageError, match=f"--device {spec}: torch sees no CUDA device .*use --device cpu"):
            devices.resolve(spec)


def test_with_cuda_auto_takes_it_and_an_index_must_exist(two_gpus):
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="cuda:2 does not exist; torch sees 2 CUDA device"):
        devices.resolve("cuda:2")


def test_under_torchrun_each_process_takes_its_local_rank(two_gpus):
    assert devices.resolve("auto", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve("cuda", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(UsageError, match="each process takes cuda:LOCAL_RANK; give --device cuda"):
        devices.resolve("cuda:0", local_rank=1)
    with pytest.raises(UsageError, match="cuda:2 does not exist"):
        devices.resolve("cuda", local_rank=2)  # 3 processes per node on 2 GPUs


def test_fsdp_stays_on_the_cpu(two_gpus, monkeypatch):
    assert devices.resolve("auto", 0, distributed.FSDP_CPU_ONLY) == torch.device("cpu")
    with pytest.raises(UsageError, match="--device cuda: --fsdp runs on the CPU"):
        devices.resolve("cuda", 0, distributed.FSDP_CPU_ONLY)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UsageError, match="--fsdp runs on the CPU"):  # refused before joining any process group
        distributed.setup(fsdp=True, device="cuda")
    assert not torch.distributed.is_initialized()


def test_the_batch_follows_the_model():
    assert devices.model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert devices.model_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    with torch.device("meta"):
        skeleton = nn.Linear(2, 2)
    assert devices.model_device(skeleton) == torch.device("cpu")  # an FSDP skeleton's inputs stay on the host
    x = torch.ones(2)
    (y,) = devices.to_model(nn.Linear(2, 2), x)
    assert y is x  # already there: no copy


def _env():
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    tiny_model_folder(root / "model")
    write_jsonl(root / "train.jsonl", records()[:16])
    return root


def _train(folder, out, *extra):
    cmd = [sys.executable, "-m", "lorakit.app.cli", "train", "--model", "model", "--data", "train.jsonl", "--steps", "3",
           "--batch-size", "4", "--no-progress", "--output", out, *extra]
    return subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")
def test_cli_cpu_is_the_default_and_cuda_is_refused_in_one_line(folder):
    auto, cpu = _train(folder, "auto"), _train(folder, "cpu", "--device", "cpu")
    assert auto.returncode == 0 and cpu.returncode == 0, auto.stderr[-2000:] + cpu.stderr[-2000:]
    assert "device: cpu\n" in auto.stdout and "device: cpu\n" in cpu.stdout
    assert (folder / "auto" / "adapter_model.safetensors").read_bytes() == \
        (folder / "cpu" / "adapter_model.safetensors").read_bytes()
    for extra in (["--device", "cuda"], ["--device", "cuda", "--nproc", "2"]):
        p = _train(folder, "gpu", *extra)
        assert p.returncode == 2, p.stderr[-2000:]
        assert p.stderr.strip().splitlines() == [
            "lorakit: error: --device cuda: torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu"]
        assert not (folder / "gpu").exists()  # refused before any file was written
    p = _train(folder, "tpu", "--device", "tpu")
    assert p.returncode == 2 and "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in p.stderr


@pytest.mark.parametrize("spec", ["cuda:²", "cuda:١"])
def test_only_ascii_digits_name_a_gpu(spec):
    with pytest.raises(UsageError, match="--device must be"):
        devices.check_spec(spec)


def test_auto_takes_the_cpu_where_the_node_has_fewer_gpus_than_processes(two_gpus):
    assert devices.resolve("auto", 1, local_world=2) == torch.device("cuda", 1)
    assert devices.resolve("auto", 2, local_world=3) == torch.device("cpu")
    with pytest.raises(UsageError, match="cuda:2 does not exist"):
        devices.resolve("cuda", 2, local_world=3)


def test_int8_stays_on_the_cpu(two_gpus):
    from lorakit.app.options import INT8_CPU_ONLY

    assert devices.resolve("auto", cpu_only=INT8_CPU_ONLY) == torch.device("cpu")
    with pytest.raises(UsageError, match="--device cuda:1: --quantize int8 quantises on the CPU"):
        devices.resolve("cuda:1", cpu_only=INT8_CPU_ONLY)


def test_metrics_log_is_not_touched_before_its_first_record(tmp_path):
    from lorakit.app.jsonl import RecordLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    with RecordLog(path):  # a run refused before its first record (a --resume that cannot restore)
        pass
    assert path.read_text() == '{"step": 1}\n'
    with RecordLog(path) as log:
        log.write({"step": 1, "loss": 0.5})
        log.write({"step": 2, "loss": 0.25})
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 0.25}']
