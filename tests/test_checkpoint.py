"""Checkpoints of the training loop in one process: bitwise resume, the files, keep-K, refused
resumes, non-finite steps and failing writes (the killed-process tests are in test_resume_cli.py)."""

import errno
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit.app import checkpoint as ckpt
from lorakit.app.checkpoint import Checkpointing
from lorakit.app.data import IGNORE, Example
from lorakit.app.lm_loss import lm_task
from lorakit.app.loop import TrainConfig, train
from lorakit.errors import CheckpointError, LoRAError, NonFiniteError, SaveError

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EXAMPLES, BATCH = 10, 2  # 5 batches per epoch


def examples(n=N_EXAMPLES):
    rng = random.Random(1)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, 64) for _ in range(rng.randrange(6, 14))]
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return out


def adapted(seed=0, r=4, dropout=0.1):
    model = tiny_llama()
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.LoRAConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules=ALL7))
    return model


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model, folder=None, steps=12, every=0, keep=None, resume=False, config=None, **kw):
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-2, warmup=3, eval_every=4, **kw)
    ex = examples()
    logs = []
    ck = None if folder is None else Checkpointing(folder, every, keep, config or {"data": "x"}, resume)
    summary = train(model, lm_task(ex, 0, cfg, val_examples=ex[:3]), cfg, on_log=logs.append, progress=False,
                    checkpoints=ck)
    return summary, logs


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted 12-step run with dropout: its final LoRA weights and step records."""
    model = adapted()
    _, logs = run(model)
    return lora_state(model), logs


@pytest.mark.parametrize("from_step", [3, 5, 10])  # mid-epoch, epoch boundary, mid-epoch of the third epoch
def test_resume_is_bitwise(tmp_path, reference, from_step):
    ref_weights, ref_logs = reference
    first = adapted()
    run(first, tmp_path, steps=12, every=1)
    for step, path in ckpt.steps_in(tmp_path):
        if step > from_step:  # as if the process had died right after checkpoint-from_step
            import shutil
            shutil.rmtree(path)
    torch.manual_seed(1234)  # the resumed process starts from other generator states
    random.seed(99)
    np.random.seed(7)
    resumed = adapted(seed=5)  # another initialisation: the checkpoint must overwrite it
    summary, logs = run(resumed, tmp_path, steps=12, every=1, resume=True)
    assert summary["resumed_from"] == from_step
    assert [r["step"] for r in logs] == list(range(1, 13))
    assert [r["loss"] for r in logs] == [r["loss"] for r in ref_logs]
    assert [r.get("val_loss") for r in logs] == [r.get("val_loss") for r in ref_logs]
    got = lora_state(resumed)
    assert all(torch.equal(got[k], ref_weights[k]) for k in ref_weights)


def test_checkpoint_files_and_state(tmp_path):
    model = adapted()
    random.seed(11)
    np.random.seed(12)
    run(model, tmp_path, steps=7, every=3)
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [3, 6]
    path = tmp_path / "checkpoint-6"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "trainer_state.json"]  # JSON and safetensors only: nothing to unpickle
    doc = json.loads((path / "trainer_state.json").read_text())
    assert doc["step"] == 6 and doc["adapters"] == ["default"]
    # 6 micro-batches of 5 per epoch: epoch 1, one batch into it
    assert doc["data"] == {"epoch": 1, "batches_in_epoch": 1, "micro_batches": 6, "order_seed": 0, "ranks": 1}
    assert doc["config"]["run"] == {"data": "x"} and doc["config"]["train"]["lr"] == 1e-2
    assert doc["config"]["adapters"]["default"]["r"] == 4
    assert len(doc["config_hash"]) == 64 and [r["step"] for r in doc["log_history"]] == list(range(1, 7))
    assert doc["scheduler"]["last_epoch"] == 6
    assert doc["rng"][0]["python"][1] == list(random.getstate()[1])  # nothing in training draws from Python's
    assert doc["rng"][0]["numpy"][1] == np.random.get_state()[1].tolist()
    assert set(ckpt.load_file(str(path / "rng.safetensors"))) == {"rank0.torch"}
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8  # the adapter in PEFT's format
    weights = ckpt.load_file(str(path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    opt = ckpt.load_file(str(path / "optimizer.safetensors"))
    n_params = len(doc["optimizer"]["parameters"])
    assert n_params == 2 * 7 * 2 and set(opt) == {f"{i}.{k}" for i in range(n_params)
                                                  for k in ("step", "exp_avg", "exp_avg_sq")}
    assert float(opt["0.step"]) == 6.0


def test_keep_newest(tmp_path):
    run(adapted(), tmp_path, steps=10, every=2, keep=2)
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [8, 10]


@pytest.mark.parametrize("change, key", [
    (dict(lr=2e-2), "train.lr"),
    (dict(batch=3), "train.batch_size"),
    (dict(r=8), "adapters.default.r"),
    (dict(config={"data": "y"}), "run.data"),
])
def test_resume_with_another_configuration_is_refused(tmp_path, change, key):
    run(adapted(), tmp_path, steps=4, every=2)
    model = adapted(r=change.get("r", 4))
    before = lora_state(model)
    cfg = TrainConfig(steps=4, batch_size=change.get("batch", BATCH), lr=change.get("lr", 1e-2), warmup=3,
                      eval_every=4)
    ck = Checkpointing(tmp_path, 2, None, change.get("config", {"data": "x"}), resume=True)
    with pytest.raises(CheckpointError) as e:
        train(model, lm_task(examples(), 0, cfg), cfg, progress=False, checkpoints=ck)
    assert key in str(e.value) and "checkpoint-4" in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in lora_state(model).items())  # nothing loaded


def test_resume_without_a_complete_checkpoint(tmp_path):
    (tmp_path / ".checkpoint-3.abc").mkdir()  # what a crash during a write leaves
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        run(adapted(), tmp_path, steps=4, resume=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        run(adapted(), tmp_path / "missing", steps=4, resume=True)


def test_damaged_newest_checkpoint_is_skipped(tmp_path, capsys):
    run(adapted(), tmp_path, steps=4, every=2)
    f = tmp_path / "checkpoint-4" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-8])  # truncated after it was written
    path, doc = ckpt.latest(tmp_path)
    assert path.name == "checkpoint-2" and doc["step"] == 2
    assert "lorakit: note: skipping damaged checkpoint" in capsys.readouterr().err and "optimizer.safetensors" in str(f)
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{")  # every checkpoint damaged now
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoint\(s\), all damaged; the newest: .*checkpoint-4"
                                              r".*optimizer.safetensors' is missing or does not match"):
        ckpt.latest(tmp_path, log=lambda *_: None)


def nan_at(step_no, where):
    """A Task loss that poisons ``where`` (a parameter name) with NaN at optimizer step ``step_no``."""
    def wrap(task, model, cfg):
        calls = {"n": 0}
        inner = task.loss

        def loss(m, batch):
            calls["n"] += 1
            if calls["n"] == step_no * cfg.grad_accum:
                with torch.no_grad():
                    dict(m.named_parameters())[where].view(-1)[0] = math.nan
            return inner(m, batch)
        task.loss = loss
        return task
    return wrap


POISONED = "model.layers.1.self_attn.v_proj.adapters.default.lora_A"


def test_nonfinite_stops_with_step_and_parameter(tmp_path):
    model = adapted(dropout=0.0)
    cfg = TrainConfig(steps=6, batch_size=BATCH, lr=1e-2, warmup=1, eval_every=0)
    task = nan_at(4, POISONED)(lm_task(examples(), 0, cfg), model, cfg)
    with pytest.raises(NonFiniteError) as e:
        train(model, task, cfg, progress=False, checkpoints=Checkpointing(tmp_path, every=1))
    msg = str(e.value)
    assert msg.startswith("step 4: ") and f"{POISONED} (value)" in msg and "checkpoint-3" in msg
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [1, 2, 3]  # the last good one kept, no bad one
    # the weights are step 3's except the poisoned element (the optimizer never ran)
    saved = ckpt.load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    got = dict(model.named_parameters())[POISONED].detach()
    assert math.isnan(got.view(-1)[0]) and torch.equal(got.view(-1)[1:], saved[key].view(-1)[1:])


def test_nonfinite_gradient_names_the_first_parameter():
    model = adapted(dropout=0.0)
    cfg = TrainConfig(steps=2, batch_size=BATCH, lr=1e-2, warmup=1, eval_every=0)
    task = lm_task(examples(), 0, cfg)
    inner = task.loss
    task.loss = lambda m, b: inner(m, b) * torch.tensor(math.inf)  # every gradient inf or NaN
    with pytest.raises(NonFiniteError) as e:
        train(model, task, cfg, progress=False)
    first = next(n for n, p in model.named_parameters() if p.requires_grad)
    assert str(e.value).startswith("step 1: ") and f"{first} (gradient)" in str(e.value)


def test_nonfinite_skip_drops_the_update_and_counts_it():
    model = adapted(dropout=0.0)
    cfg = TrainConfig(steps=5, batch_size=BATCH, lr=1e-2, warmup=0, eval_every=0, on_nonfinite="skip")
    task = lm_task(examples(), 0, cfg)
    inner, calls, snapshots = task.loss, {"n": 0}, []

    def loss(m, b):
        calls["n"] += 1
        snapshots.append(lora_state(m))
        out = inner(m, b)
        return out * torch.tensor(math.nan) if calls["n"] in (2, 4) else out
    task.loss = loss
    logs = []
    summary = train(model, task, cfg, on_log=logs.append, progress=False)
    assert summary["skipped_steps"] == 2
    assert [r.get("skipped", False) for r in logs] == [False, True, False, True, False]
    assert [r["loss"] is None for r in logs] == [False, True, False, True, False]
    assert [r.get("skipped_steps", 0) for r in logs] == [0, 1, 1, 2, 2]
    # a skipped step changes no weight: the weights before step 3 equal those before step 2
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])
    assert not all(torch.equal(snapshots[1][k], snapshots[0][k]) for k in snapshots[0])


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, "safetensors"])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, err):
    from safetensors import SafetensorError
    real = ckpt.save_file
    calls = {"n": 0}

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint's optimizer file (two files per checkpoint)
            if err == "safetensors":  # how safetensors reports a full disk
                raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
            raise OSError(err, "injected", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing)
    model = adapted()
    with pytest.raises(SaveError) as e:
        run(model, tmp_path, steps=6, every=1)
    assert isinstance(e.value, LoRAError) and isinstance(e.value, OSError)
    assert str(tmp_path / "checkpoint-3") in str(e.value) and "\n" not in str(e.value)
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [1, 2]
    assert ckpt.latest(tmp_path)[1]["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_untracked_trainable_parameter_is_refused(tmp_path):
    model = adapted()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        run(model, tmp_path, steps=2, every=1)


def test_auto_compile_decision_is_checkpointed_and_resumed(tmp_path, monkeypatch):
    """--compile auto decides after step 4; checkpoints keep the decision (None before it, 0 for eager), and a
    resumed run takes it back instead of timing steps again."""
    from lorakit.app import autocompile

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    run(adapted(), tmp_path / "a", steps=7, every=3, compile="auto")  # tiny steps: eager
    docs = {s: json.loads((p / "trainer_state.json").read_text()) for s, p in ckpt.steps_in(tmp_path / "a")}
    assert docs[3]["compile_from"] is None and docs[6]["compile_from"] == autocompile.OFF
    seen = []
    real = autocompile.CompileSwitch.__init__
    monkeypatch.setattr(autocompile.CompileSwitch, "__init__",
                        lambda self, *a, **k: seen.append(a[4] if len(a) > 4 else k.get("decision")) or real(self, *a, **k))
    run(adapted(), tmp_path / "a", steps=7, every=3, compile="auto", resume=True)
    assert seen == [autocompile.OFF]
