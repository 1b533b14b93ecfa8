"""Training on 2 processes with real torchrun (gloo on CPU): 2 ranks × batch b equal 1 process × batch
2b, the ranks end bitwise equal, several adapters and adapters without a gradient on a rank train,
``--nproc`` starts torchrun itself, and a 2-rank run killed with SIGKILL resumes bit for bit, with DDP
and with FSDP (whose checkpoints hold the whole adapter and optimizer state, not rank 0's shards)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import tiny_model_folder, write_jsonl
from lorakit.app import checkpoint as ckpt
from test_resume_cli import records

HERE = Path(__file__).resolve().parent
TIMEOUT = 180
STEPS = 60


def env():
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def lorakit(*args) -> list[str]:
    return [sys.executable, "-m", "lorakit.app.cli", *map(str, args)]


def train_args(out, batch, *extra):
    return ["train", "--model", "model", "--data", "train.jsonl", "--eval-data", "val.jsonl", "--steps", STEPS,
            "--batch-size", batch, "--eval-every", 20, "--no-progress", "--output", out, *extra]


def run(cmd, cwd):
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_model_folder(root / "model")
    write_jsonl(root / "train.jsonl", records())
    write_jsonl(root / "val.jsonl", records(seed=3)[:8])
    return root


@pytest.fixture(scope="module")
def two_ranks(world):
    run(torchrun("-m", "lorakit.app.cli", *train_args("two", 2)), world)
    return world / "two"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def metrics(folder):
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(world):  # checkpoints at 30 and 60: the unsharded anchor of the FSDP checkpoints' contents
    p = run(lorakit(*train_args("one", 4, "--save-every", 30)), world)
    return world / "one", p.stdout


@pytest.fixture(scope="module")
def fsdp_run(world):  # each rank records what it held of the base (_fsdp_probe.py)
    run(torchrun(HERE / "_fsdp_probe.py", world / "fsdp-probe", *train_args("fsdp", 2, "--fsdp", "--save-every", 30)),
        world)
    return world / "fsdp"


def test_two_ranks_equal_one_process_with_twice_the_batch(world, two_ranks, one_process):
    one, stdout = one_process
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two_ranks / "adapter_model.safetensors")
    assert set(a) == set(b) and len(a) == 28
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    m1, m2 = metrics(one), metrics(two_ranks)
    assert [r["step"] for r in m2] == list(range(1, STEPS + 1))  # rank 0 alone logs: one record per step
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(m1, m2)) < 1e-5
    assert [r["step"] for r in m2 if "val_loss" in r] == [20, 40, 60]
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(m1, m2) if "val_loss" in x) < 1e-5
    e1, e2 = json.loads((one / "eval.json").read_text()), json.loads((two_ranks / "eval.json").read_text())
    assert e1["before"] == e2["before"]  # rank 0 evaluates the same base model
    assert abs(e1["after"]["loss"] - e2["after"]["loss"]) < 1e-5
    assert "4x1, max length" in stdout


def test_ranks_end_bitwise_equal_with_several_adapters_and_no_gradient_on_a_rank(world):
    run(torchrun(HERE / "_ddp_worker.py", world / "worker2"), world)
    run([sys.executable, str(HERE / "_ddp_worker.py"), world / "worker1"], world)
    r0, r1 = load_file(world / "worker2" / "rank0.safetensors"), load_file(world / "worker2" / "rank1.safetensors")
    assert len(r0) == 8 and all(torch.equal(r0[k], r1[k]) for k in r0)  # 2 adapters x 2 layers x (A, B)
    ref = load_file(world / "worker1" / "rank0.safetensors")
    assert max(float((ref[k] - r0[k]).abs().max()) for k in ref) < 1e-5
    init_b = [k for k in ref if "adapters.b" in k and k.startswith("2.")]
    assert init_b and all(float(ref[k].abs().max()) > 0 for k in init_b)  # the skipped layer trained too
    l_ref = json.loads((world / "worker1" / "losses0.json").read_text())
    l_two = json.loads((world / "worker2" / "losses0.json").read_text())
    assert len(l_two) == 8 and max(abs(a - b) for a, b in zip(l_ref, l_two)) < 1e-5


def test_nproc_starts_torchrun(world, two_ranks):
    run(lorakit(*train_args("nproc", 2, "--nproc", 2)), world)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (world / "nproc" / name).read_bytes() == (two_ranks / name).read_bytes()


def _kill_after_checkpoint_7(cmd: list, out: Path, world: Path) -> None:
    """Start ``cmd`` (a 2-rank run checkpointing every 7 steps into ``out``), wait for checkpoint-7,
    then SIGKILL the launcher and every worker, and wait until each is gone."""
    p = subprocess.Popen(cmd, cwd=world, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoint-7").is_dir():
        assert p.poll() is None and time.monotonic() < deadline, "no checkpoint-7"
        time.sleep(0.003)
    procs = [p.pid, *descendants(p.pid)]  # torchrun starts its workers in sessions of their own
    assert len(procs) >= 3
    for pid in procs:
        os.kill(pid, signal.SIGKILL)
    p.wait(timeout=TIMEOUT)
    for pid in procs[1:]:
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, f"worker {pid} outlived SIGKILL"
            time.sleep(0.01)


@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_two_rank_sigkill_then_resume_is_byte_identical(world, two_ranks, launcher):
    out = world / f"killed-{launcher}"
    args = train_args(out.name, 2, "--save-every", 7)
    cmd = torchrun("-m", "lorakit", *args) if launcher == "torchrun" else lorakit(*args, "--nproc", 2)
    _kill_after_checkpoint_7(cmd, out, world)
    newest = ckpt.steps_in(out)[-1][0]
    assert newest < STEPS and not (out / "adapter_model.safetensors").exists()
    doc = ckpt.latest(out)[1]
    assert doc["config"]["world_size"] == 2 and len(doc["rng"]) == 2 and doc["data"]["ranks"] == 2
    resume = ["train", "--resume", out.name, "--no-progress"]  # an --nproc run: lorakit starts the processes again
    res = run(torchrun("-m", "lorakit.app.cli", *resume) if launcher == "torchrun" else lorakit(*resume), world)
    assert f"checkpoint-{newest} (step {newest} of {STEPS})" in res.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (two_ranks / name).read_bytes(), name
    assert [(r["step"], r["loss"]) for r in metrics(out)] == [(r["step"], r["loss"]) for r in metrics(two_ranks)]


def test_resume_on_another_number_of_processes_is_refused(world):
    out = world / "refuse"
    run(torchrun("-m", "lorakit.app.cli", *train_args("refuse", 2, "--save-every", 30, "--steps", 30)), world)
    for name in ("adapter_model.safetensors", "adapter_config.json", "lorakit.json", "eval.json"):
        (out / name).unlink()
    p = subprocess.run(lorakit("train", "--resume", "refuse", "--nproc", 1), cwd=world, env=env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 1 and "world_size (2 -> 1)" in p.stderr


def test_ctrl_c_on_torchrun_checkpoints_every_rank_at_one_step(world):
    out = world / "ctrlc"
    p = subprocess.Popen(torchrun("-m", "lorakit.app.cli", *train_args("ctrlc", 2, "--steps", 100000)), cwd=world,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.monotonic() < deadline, "no three steps"
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)  # what Ctrl-C sends to torchrun, which passes SIGTERM on to the workers
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    step = ckpt.steps_in(out)[-1][0]
    doc = ckpt.latest(out)[1]
    assert doc["step"] == step == len(metrics(out)) and len(doc["rng"]) == 2
    assert f"checkpoint saved to '{out.name}/checkpoint-{step}'" in err
    assert "resume with: torchrun --standalone --nproc_per_node 2 -m lorakit train --resume ctrlc" in err
    assert err.count("resume with:") == 1  # rank 0 speaks for all


def test_fsdp_adapter_reloaded_in_one_process_gives_the_unsharded_outputs(world, one_process, fsdp_run):
    from lorakit import load_adapter
    from transformers import AutoModelForCausalLM

    one, fsdp = one_process[0], fsdp_run
    a, b = load_file(one / "adapter_model.safetensors"), load_file(fsdp / "adapter_model.safetensors")
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # whole, not a shard
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for folder in (one, fsdp):
        model = AutoModelForCausalLM.from_pretrained(world / "model").eval()
        load_adapter(model, folder)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    e1, e2 = json.loads((one / "eval.json").read_text()), json.loads((fsdp / "eval.json").read_text())
    assert e1["before"] == e2["before"] and abs(e1["after"]["loss"] - e2["after"]["loss"]) < 1e-5
    assert [r["step"] for r in metrics(fsdp)] == list(range(1, STEPS + 1))


def _tiny_causal_lm(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world / "model").eval()


def test_fsdp_checkpoint_holds_the_whole_adapter_and_optimizer_state(world, one_process, fsdp_run):
    """The shard trap: a checkpoint of rank 0's shards would reload with half of every lora_B row block
    at its initial zeros and half the optimizer moments missing or wrong."""
    from lorakit import load_adapter
    from lorakit.io import adapter_state_dict

    one = one_process[0]
    for step in (30, 60):
        model = _tiny_causal_lm(world)  # one process, no sharding: what a user reloads
        load_adapter(model, fsdp_run / f"checkpoint-{step}")
        got = adapter_state_dict(model)
        ref = load_file(one / f"checkpoint-{step}" / "adapter_model.safetensors")  # the unsharded run's
        assert set(got) == set(ref) and len(got) == 28
        assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-5
        lora_b = [k for k in got if "lora_B" in k]  # initialised to 0: every row trained means no shard left behind
        assert len(lora_b) == 14 and all(bool((got[k].abs().amax(dim=1) > 1e-4).all()) for k in lora_b)
        opt, opt_ref = (load_file(f / f"checkpoint-{step}" / "optimizer.safetensors") for f in (fsdp_run, one))
        assert set(opt) == set(opt_ref) and len(opt) == 3 * 28
        for k in opt_ref:
            assert opt[k].shape == opt_ref[k].shape, k  # whole, not a shard
            # float rounding of the gradient's reduction only (measured: relative error <= 1e-6)
            assert float((opt[k] - opt_ref[k]).norm()) <= 1e-5 * float(opt_ref[k].norm()) and opt_ref[k].any(), k
    final = load_file(fsdp_run / "adapter_model.safetensors")  # gathered without the optimizer state
    last = load_file(fsdp_run / "checkpoint-60" / "adapter_model.safetensors")
    assert set(final) == set(last) and all(torch.equal(final[k], last[k]) for k in final)


def test_fsdp_sigkill_then_resume_is_byte_identical(world, fsdp_run):
    out = world / "fsdp-killed"
    _kill_after_checkpoint_7(lorakit(*train_args(out.name, 2, "--nproc", 2, "--fsdp", "--save-every", 7)), out, world)
    newest = ckpt.steps_in(out)[-1][0]
    assert newest < STEPS and not (out / "adapter_model.safetensors").exists()
    doc = ckpt.latest(out)[1]
    assert doc["config"]["world_size"] == 2 and len(doc["rng"]) == 2 and doc["config"]["run"]["options"]["fsdp"]
    res = run(lorakit("train", "--resume", out.name, "--no-progress"), world)
    assert f"checkpoint-{newest} (step {newest} of {STEPS})" in res.stdout and "(FSDP)" in res.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (fsdp_run / name).read_bytes(), name
    assert [(r["step"], r["loss"]) for r in metrics(out)] == [(r["step"], r["loss"]) for r in metrics(fsdp_run)]


def test_fsdp_needs_several_processes_also_to_resume(world, fsdp_run):
    p = subprocess.run(lorakit(*train_args("fsdp1", 2, "--fsdp")), cwd=world, env=env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 1 and "--fsdp shards the model across processes: add --nproc N" in p.stderr
    assert not (world / "fsdp1").exists()
    _resume_is_refused_untouched(world, fsdp_run, "fsdp-refuse", 1)


def _resume_is_refused_untouched(world, fsdp_run, name: str, nproc: int) -> None:
    """A copy of the 2-rank FSDP run's checkpoint-30 resumed on ``nproc`` processes: refused naming the
    world sizes, the folder untouched."""
    (world / name).mkdir()
    shutil.copytree(fsdp_run / "checkpoint-30", world / name / "checkpoint-30")
    p = subprocess.run(lorakit("train", "--resume", name, "--nproc", nproc), cwd=world, env=env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 1 and f"world_size (2 -> {nproc})" in p.stderr, p.stderr
    assert sorted(x.name for x in (world / name).iterdir()) == ["checkpoint-30"]


def test_fsdp_rank_1_never_holds_the_whole_base(world, one_process, fsdp_run):
    """Sharded loading: rank 0 alone reads the base; rank 1 builds it on the meta device and receives only
    its shards; after each layer's forward no layer stays gathered (evaluation, validation, training)."""
    r0, r1 = (json.loads((world / f"fsdp-probe-rank{k}.json").read_text()) for k in (0, 1))
    assert r0["loads"] == 1 and r1["loads"] == 0
    r = json.loads((fsdp_run / "adapter_config.json").read_text())["r"]
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]  # q k v o gate up down (out, in)
    layer = sum(o * i + r * (o + i) for o, i in shapes) + 2 * 32  # base, lora_B + lora_A, two norms
    assert [c["bytes"] for c in r1["shard_calls"]] == [4 * layer] * 2  # float32, _tiny's 2 layers
    assert all(c["held"] == 0 for c in r1["shard_calls"])  # every layer was on meta when sharded
    assert all(c["held"] == c["bytes"] for c in r0["shard_calls"])  # rank 0: the loaded layer
    assert r0["most_gathered_after_forward"] == r1["most_gathered_after_forward"] == 0
    a, b = load_file(one_process[0] / "adapter_model.safetensors"), load_file(fsdp_run / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_resume_of_a_two_rank_fsdp_run_on_three_is_refused(world, fsdp_run):
    _resume_is_refused_untouched(world, fsdp_run, "fsdp-three", 3)


def test_sigterm_to_the_nproc_launcher_reaches_the_workers(world):
    out = world / "term"
    p = subprocess.Popen(lorakit(*train_args("term", 2, "--steps", 100000, "--nproc", 2)), cwd=world, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.monotonic() < deadline, "no three steps"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)  # the launcher alone, as a job scheduler would
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 143, err
    step = ckpt.steps_in(out)[-1][0]
    assert ckpt.latest(out)[1]["step"] == step and f"resume with: lorakit train --resume {out.name}" in err
    assert not descendants(p.pid)


def test_nproc_user_error_is_one_line(world):
    p = subprocess.run(lorakit(*train_args("err", 2, "--nproc", 2, "--data", "missing.jsonl")), cwd=world, env=env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith(("loading model", "loaded in"))]
    assert p.returncode == 1 and lines == [f"lorakit: error: data file '{world / 'missing.jsonl'}' does not exist"], p.stderr
    assert not (world / "err").exists()


def test_a_rank_killed_mid_run_ends_the_job_with_one_line_errors_and_no_traceback(world):
    """SIGKILL of rank 1 alone: rank 0's collective fails (gloo: connection reset), which it reports in one
    line, as the launcher reports rank 1's status; no traceback."""
    out = world / "rank1-killed"
    p = subprocess.Popen(lorakit(*train_args(out.name, 2, "--nproc", 2, "--save-every", 7)), cwd=world, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoint-7").is_dir():
        assert p.poll() is None and time.monotonic() < deadline, "no checkpoint-7"
        time.sleep(0.003)
    ranks = {}
    for pid in descendants(p.pid):
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        if "RANK" in environ and "lorakit.app.cli" in Path(f"/proc/{pid}/cmdline").read_text():
            ranks[environ["RANK"]] = pid
    assert set(ranks) == {"0", "1"}
    os.kill(ranks["1"], signal.SIGKILL)
    _, err = p.communicate(timeout=TIMEOUT)
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("loading model", "loaded in"))]
    assert p.returncode != 0 and "Traceback" not in err, err
    assert lines and all(l.startswith("lorakit: error: ") for l in lines), err
    assert any("process 1 of 2 exited with status 137" in l or "lost contact with another process" in l
               for l in lines), err
