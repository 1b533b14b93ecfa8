"""``lorakit train`` options: dataclass defaults < task defaults < config file < flags, one validation."""

import argparse

import pytest

from lorakit import LoRAConfig
from lorakit.app.cli import build_parser
from lorakit.app.loop import TrainConfig
from lorakit.app.options import FIELDS, TrainOptions, train_options
from lorakit.errors import UsageError


def parse(*argv) -> tuple[TrainOptions, frozenset]:
    return train_options(build_parser().parse_args(["train", *map(str, argv)]))


def test_every_field_has_a_flag_defaulting_to_none():
    args = build_parser().parse_args(["train"])
    assert set(FIELDS) <= set(vars(args))
    assert all(getattr(args, name) is None for name in FIELDS)


def test_defaults_are_the_library_and_job_defaults():
    o, given = parse()
    assert given == frozenset()
    assert (o.r, o.lora_alpha, o.lora_dropout) == (16, 32.0, 0.0)  # the built-in job's (benchmarks/quality.py)
    assert parse("--data", "d.jsonl")[0].r == 8 and parse("--r", "4")[0].lora_alpha == 16.0  # LoRAConfig's
    assert (o.batch_size, o.grad_accum, o.lr, o.warmup, o.eval_every, o.seed) == (8, 1, 2e-3, 10, 25, 0)
    assert o.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoRAConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]  # the library's stays
    # the built-in task: 300 steps of 64 tokens
    assert (o.steps, o.epochs, o.max_length, o.model, o.task, o.progress) == (300, None, 64, "default", "g2p", True)
    assert TrainConfig().batch_size == o.batch_size and TrainConfig().eval_every == o.eval_every


def test_user_data_defaults(tmp_path):
    o, _ = parse("--data", tmp_path / "d.jsonl")
    assert (o.steps, o.epochs, o.max_length) == (None, 1.0, 512)


def test_precedence_file_then_flags(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("batch-size: 4\nlr: 1e-3\nr: 2\nsteps: 7\nno_progress: true\ntarget_modules: q_proj, v_proj\n")
    o, given = parse("--config", conf, "--r", 3)
    assert (o.batch_size, o.lr, o.r, o.steps, o.progress) == (4, 1e-3, 3, 7, False)  # "1e-3" read as a number
    assert o.target_modules == ["q_proj", "v_proj"]
    assert given == {"batch_size", "lr", "r", "steps", "progress", "target_modules"}
    o, _ = parse("--config", conf, "--epochs", 2)  # a flag's --epochs replaces the file's --steps
    assert (o.steps, o.epochs) == (None, 2.0)


def test_json_config_and_errors(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text('{"eval_every": 0, "compile": true}')
    o, _ = parse("--config", conf)
    assert o.eval_every == 0 and o.compile is True
    conf.write_text('{"steps": 2, "epochs": 1}')
    with pytest.raises(UsageError, match="give --steps or --epochs, not both"):
        parse("--config", conf)
    conf.write_text('{"task": "summarise"}')
    with pytest.raises(UsageError, match="--task must be one of g2p, classify, got 'summarise'"):
        parse("--config", conf)
    with pytest.raises(UsageError, match="--warmup must be an integer >= 0, got -1"):
        parse("--warmup", -1)
    with pytest.raises(UsageError, match="--eval-data needs --data"):
        parse("--eval-data", conf)
    yml = tmp_path / "c.yaml"
    yml.write_text("target-modules: q_proj\ntarget_modules: v_proj\n")  # one option in both spellings
    with pytest.raises(UsageError, match="sets 'target_modules' twice, as 'target-modules' and 'target_modules'"):
        parse("--config", yml)


def test_classify_task_defaults_and_refused_options():
    o, given = parse("--task", "classify")
    assert given == {"task"}
    assert (o.epochs, o.batch_size, o.max_length, o.target_modules, o.lr, o.r) == (
        3, 32, 64, ["query", "key", "value"], 2e-3, 8)
    o, _ = parse("--task", "classify", "--batch-size", 4, "--epochs", 8)
    assert (o.epochs, o.batch_size) == (8, 4)
    with pytest.raises(UsageError, match="--task classify does not take --grad-accum"):
        parse("--task", "classify", "--grad-accum", 2)
    with pytest.raises(UsageError, match="--epochs must be a whole number for --task classify, got 1.5"):
        parse("--task", "classify", "--epochs", 1.5)


def test_train_options_without_config_attribute():
    o, _ = train_options(argparse.Namespace(steps=3))
    assert o.steps == 3 and o.max_length == 64


def test_gradient_checkpointing_is_on_with_quantize_unless_turned_off(tmp_path):
    """QLoRA's memory recipe (as PEFT's prepare_model_for_kbit_training): --quantize recomputes activations."""
    assert parse()[0].gradient_checkpointing is False
    assert parse("--gradient-checkpointing")[0].gradient_checkpointing is True
    assert parse("--quantize", "nf4")[0].gradient_checkpointing is True
    assert parse("--quantize", "int8", "--no-gradient-checkpointing")[0].gradient_checkpointing is False
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quantize: nf4\ngradient_checkpointing: false\n")
    assert parse("--config", cfg)[0].gradient_checkpointing is False
    assert parse("--config", cfg, "--gradient-checkpointing")[0].gradient_checkpointing is True


def test_split_seed_fixes_the_words_while_seed_varies(tmp_path):
    from types import SimpleNamespace

    from lorakit.app import cmd_train, g2p

    fixed = g2p.g2p_split(0, 5, g2p.G2P_VALIDATION)
    o, _ = parse("--seed", 2, "--split-seed", 0, "--steps", 3, "--test-size", 5)
    train, val, split = cmd_train._read_data(o)
    assert (split.test, split.validation) == (fixed.test, fixed.validation)
    assert [r["prompt"] for r in train.records] == [w for w, _ in fixed.train[:24]]  # 3 steps of 8 words
    meta = cmd_train._metadata(o, SimpleNamespace(reference="default"), train, 3, 1, 1, "cpu")
    assert (meta["g2p"]["seed"], meta["train"]["seed"]) == (0, 2)  # lorakit eval rebuilds split 0's test words
    assert o.train_config().seed == 2  # init and batch order keep --seed
    _, _, own = cmd_train._read_data(parse("--seed", 2, "--steps", 3, "--test-size", 5)[0])
    assert own.test == g2p.g2p_split(2, 5, g2p.G2P_VALIDATION).test != fixed.test  # without it: --seed's split


def test_split_seed_errors(tmp_path):
    with pytest.raises(UsageError, match=r"--split-seed must be an integer >= 0, got -1"):
        parse("--split-seed", -1)
    with pytest.raises(UsageError, match="--split-seed splits the built-in task's words"):
        parse("--split-seed", 0, "--data", tmp_path / "d.jsonl")
    with pytest.raises(UsageError, match="--task classify does not take --split-seed"):
        parse("--task", "classify", "--split-seed", 0)
