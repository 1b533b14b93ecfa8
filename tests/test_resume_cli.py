"""``lorakit train --save-every / --resume`` with real processes on a tiny model: killed with SIGKILL
and resumed, the adapter is byte-identical to an uninterrupted run's; SIGINT / SIGTERM checkpoint and
print the resume command; resumes with changed options or files are refused; a failed final write
leaves the previous adapter as it was."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _tiny import tiny_model_folder, write_jsonl
from lorakit.app import checkpoint as ckpt
from lorakit.app import cli

N_RECORDS, BATCH, STEPS = 40, 2, 120  # 20 batches per epoch
TIMEOUT = 120


def records(seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randrange(3, 8))) for _ in range(N_RECORDS)]
    return [{"prompt": w, "completion": " ".join(c.upper() + "1" for c in w)} for w in words]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_model_folder(root / "model")
    write_jsonl(root / "train.jsonl", records())
    return root


def argv(out, *extra, steps=STEPS):
    return ["train", "--model", "model", "--data", "train.jsonl", "--steps", str(steps), "--batch-size", str(BATCH),
            "--lora-dropout", "0.1", "--eval-every", "0", "--no-progress", "--output", str(out), *map(str, extra)]


def start(root, args):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lorakit.app.cli", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p):
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, out, err


def wait_for(cond, p, what):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert p.poll() is None, f"the run ended before {what}: {p.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.003)


def losses(folder):
    return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def metric_lines(folder):
    f = folder / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.fixture(scope="module")
def reference(world):
    code, out, err = finish(start(world, argv("ref")))
    assert code == 0, err
    return world / "ref"


@pytest.mark.parametrize("every, kill_after, boundary", [(7, 14, False), (20, 20, True)],
                         ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_then_resume_is_byte_identical(world, reference, every, kill_after, boundary):
    out = world / f"killed-{every}"
    p = start(world, argv(out, "--save-every", every))
    wait_for(lambda: (out / f"checkpoint-{kill_after}").is_dir(), p, f"checkpoint-{kill_after}")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=TIMEOUT)
    assert not (out / "adapter_model.safetensors").exists()
    newest = ckpt.steps_in(out)[-1][0]
    assert newest < STEPS and (newest % (N_RECORDS // BATCH) == 0) == boundary
    code, stdout, err = finish(start(world, ["train", "--resume", out, "--no-progress"]))
    assert code == 0, err
    assert f"checkpoint-{newest} (step {newest} of {STEPS})" in stdout
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert losses(out) == losses(reference)


def test_sigint_and_sigterm_checkpoint_and_print_the_resume_command(world):
    out = world / "signals"
    long = argv(out, steps=100000)
    p = start(world, long)
    wait_for(lambda: metric_lines(out) >= 3, p, "three steps")
    p.send_signal(signal.SIGINT)
    code, _, err = finish(p)
    assert code == 130, err
    step = ckpt.steps_in(out)[-1][0]
    assert step == metric_lines(out) and step >= 3
    assert f"SIGINT at step {step} of 100000: checkpoint saved to '{out}/checkpoint-{step}'" in err
    assert f"resume with: lorakit train --resume {out}" in err

    p = start(world, ["train", "--resume", out, "--no-progress"])
    wait_for(lambda: metric_lines(out) >= step + 3, p, "three more steps")
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p)
    assert code == 143, err
    assert ckpt.steps_in(out)[-1][0] > step and "SIGTERM" in err
    assert ckpt.latest(out)[1]["step"] == ckpt.steps_in(out)[-1][0]


def test_second_sigint_exits_at_once_leaving_a_valid_checkpoint(world):
    out = world / "twice"
    p = start(world, argv(out, "--save-every", 2, steps=100000))
    wait_for(lambda: (out / "checkpoint-4").is_dir(), p, "checkpoint-4")
    p.send_signal(signal.SIGINT)
    time.sleep(0.005)  # the first one handled (signals sent together may count once), the step not yet done
    p.send_signal(signal.SIGINT)
    code, _, err = finish(p)
    # 130 from KeyboardInterrupt; -SIGINT if it landed while the interpreter was already exiting
    assert code in (130, -signal.SIGINT), err
    path, doc = ckpt.latest(out)  # verifies every file's SHA-256
    assert doc["step"] >= 4 and not (out / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def crashed(world):
    """A run that checkpointed at steps 2 and 4, then 'died' before writing its adapter."""
    out = world / "crashed"
    cwd = os.getcwd()
    os.chdir(world)
    try:
        assert cli.main(argv("crashed", "--save-every", 2, steps=4)) == 0
    finally:
        os.chdir(cwd)
    for name in ("adapter_model.safetensors", "adapter_config.json", "lorakit.json", "eval.json"):
        (out / name).unlink()
    return out


def in_world(world, args, capsys):
    cwd = os.getcwd()
    os.chdir(world)
    try:
        code = cli.main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = [l for l in err.splitlines() if l.startswith("lorakit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, key", [
    (["--lr", "0.1"], "lr (0.002 -> 0.1)"),
    (["--r", "4"], "r (8 -> 4)"),
    (["--target-modules", "q_proj,v_proj"], "target_modules"),
    (["--batch-size", "3"], "batch_size (2 -> 3)"),
    (["--model", "model2"], "/model' -> '"),  # paths are kept absolute, so a resume works from any folder
    (["--data", "other.jsonl"], "/train.jsonl' -> '"),
])
def test_resume_with_changed_options_is_refused(world, crashed, capsys, flags, key):
    if "model2" in flags and not (world / "model2").exists():
        tiny_model_folder(world / "model2", seed=1)
    write_jsonl(world / "other.jsonl", records(seed=1))
    before = {p: p.read_bytes() for p in crashed.rglob("*") if p.is_file()}
    code, _, err = in_world(world, ["train", "--resume", "crashed", *flags], capsys)
    line = one_line(err)
    assert code == 1 and "changed" in line and key in line, line
    assert {p: p.read_bytes() for p in crashed.rglob("*") if p.is_file()} == before  # nothing written


def test_resume_with_changed_data_file_is_refused(world, crashed, capsys):
    data = world / "train.jsonl"
    original = data.read_bytes()
    try:
        write_jsonl(data, records(seed=2))  # same name, other content
        code, _, err = in_world(world, ["train", "--resume", "crashed"], capsys)
    finally:
        data.write_bytes(original)
    line = one_line(err)
    assert code == 1 and "data_sha256.data" in line and "checkpoint-4" in line


@pytest.mark.parametrize("make, says", [
    ("missing", "does not exist"), ("a-file", "is not a folder"), ("empty", "no complete checkpoint"),
    ("partial-only", "no complete checkpoint"), ("finished", "finished run"), ("a-checkpoint", "give its run folder"),
])
def test_resume_without_a_complete_checkpoint(world, reference, crashed, capsys, tmp_path, make, says):
    target = tmp_path / "run"
    if make == "a-file":
        target.write_text("x")
    elif make == "empty":
        target.mkdir()
    elif make == "partial-only":
        (target / ".checkpoint-6.x1y2").mkdir(parents=True)
    elif make == "finished":
        shutil.copytree(reference, target)
    elif make == "a-checkpoint":
        target = crashed / "checkpoint-4"
    code, _, err = in_world(world, ["train", "--resume", target], capsys)
    line = one_line(err)
    assert code == 1 and str(target) in line and says in line, line


def test_resume_refuses_an_edited_base_model_of_the_same_size(world, crashed, capsys):
    f = world / "model" / "config.json"
    before, stat = f.read_bytes(), f.stat()
    try:
        edited = before.replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 2e-06')
        assert edited != before
        f.write_bytes(edited)
        assert f.stat().st_size == stat.st_size
        code, _, err = in_world(world, ["train", "--resume", "crashed"], capsys)
    finally:
        f.write_bytes(before)
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    line = one_line(err)
    assert code == 1 and "model_files.config.json" in line


def test_hand_edited_trainer_state_counts_as_damage(world, crashed, capsys):
    import json as _json
    state = crashed / "checkpoint-4" / "trainer_state.json"
    original = state.read_text()
    try:
        doc = _json.loads(original)
        doc["step"] = 3
        state.write_text(_json.dumps(doc))
        path, got = ckpt.latest(crashed)
    finally:
        state.write_text(original)
    assert path.name == "checkpoint-2" and got["step"] == 2
    assert "was changed after it was written" in capsys.readouterr().err


def test_resume_from_another_folder(world, crashed, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(crashed, copy)
    state = copy / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 3'))  # damaged: the run goes back to step 2
    cwd = os.getcwd()
    os.chdir(tmp_path)  # neither model nor train.jsonl is here: the run recorded absolute paths
    try:
        code = cli.main(["train", "--resume", str(copy), "--no-progress"])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (copy / "adapter_model.safetensors").is_file()
    assert "lorakit: note: skipping damaged checkpoint" in err and "checkpoint-4" in err  # a diagnostic: stderr
    assert f"resuming from {copy / 'checkpoint-2'} (step 2 of" in out


def test_new_run_refuses_a_folder_with_checkpoints(world, crashed, capsys):
    code, _, err = in_world(world, argv("crashed", steps=4), capsys)
    assert code == 1 and "--resume" in one_line(err) and "checkpoints of an earlier run" in one_line(err)


@pytest.mark.parametrize("as_safetensors", [False, True])
def test_full_disk_on_the_final_adapter_keeps_the_previous_one(world, reference, capsys, monkeypatch, tmp_path,
                                                               as_safetensors):
    out = tmp_path / "done"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("adapter", "lorakit"))}

    def full(*a, **k):  # safetensors reports a full disk as its own error, not an OSError
        if as_safetensors:
            from safetensors import SafetensorError
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorakit.io.save_file", full)
    code, _, err = in_world(world, argv(out, "--overwrite", steps=2), capsys)
    line = one_line(err)
    assert code == 1 and str(out) in line and "No space left on device" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("adapter", "lorakit"))} == before
