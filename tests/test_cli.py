"""The ``lorakit`` CLI end to end on a tiny random Llama and a tiny tokenizer, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny import G2P_RECORDS, tiny_model_folder, write_jsonl
from lorakit.app import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model_folder(root / "model")
    data = write_jsonl(root / "train.jsonl", G2P_RECORDS)
    return root, model, data


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("loading model", "loaded in"))]
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    return lines[0]


def test_end_to_end(tiny, capsys, tmp_path):
    root, model, data = tiny
    out = tmp_path / "adapter"
    code, stdout, _ = run(capsys, "train", "--model", model, "--data", data, "--eval-data", data, "--steps", 3,
                          "--batch-size", 2, "--output", out, "--no-progress", "--eval-every", 2)
    assert code == 0, stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorakit.json", "metrics.jsonl", "eval.json", "loss.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["before"]) == {"loss", "perplexity", "tokens"} and ev["after"]["tokens"] == ev["before"]["tokens"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and len(cfg["target_modules"]) == 7
    meta = json.loads((out / "lorakit.json").read_text())
    assert meta["prompt_format"] == {"type": "plain"} and meta["base_model"] == str(model.resolve())
    # --compile auto: 3 steps never reach the decision after step 4, so every step ran eagerly
    assert meta["train"]["compile"] == "auto" and meta["train"]["compiled_from_step"] is None

    code, stdout, _ = run(capsys, "info", out)
    assert code == 0
    assert "r:             8" in stdout and "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (14 modules)" in stdout
    assert "trainable" in stdout and "% of" in stdout and "file size" in stdout
    assert "rank_pattern" not in stdout and "modules_to_save" not in stdout  # shown only when set
    cfg_file = out / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"rank_pattern": {"k_proj": 8},
                                                                       "alpha_pattern": {"v_proj": 4}}))
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and 'rank_pattern:  {"k_proj": 8}' in stdout and 'alpha_pattern: {"v_proj": 4.0}' in stdout
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"rank_pattern": {}, "alpha_pattern": {}}))

    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--data", data)
    res = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and abs(res["loss"] - ev["after"]["loss"]) < 1e-5  # same numbers as after training

    code, by_adapter, _ = run(capsys, "generate", "--adapter", out, "--prompt", "cat", "--max-new-tokens", 8)
    assert code == 0
    merged = tmp_path / "merged"
    code, _, _ = run(capsys, "merge", "--adapter", out, "--output", merged)
    assert code == 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    code, by_merged, _ = run(capsys, "generate", "--model", merged, "--prompt", "cat", "--max-new-tokens", 8)
    assert code == 0 and by_merged.splitlines()[-1] == by_adapter.splitlines()[-1]

    # plain transformers, no lorakit: same greedy tokens as base + adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert not any("lora" in k for k in plain.state_dict())
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    lorakit.load_adapter(base, out)
    ids = tok("cat", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        g_plain, g_lora = plain.generate(ids, **kw), base.generate(ids, **kw)
    assert torch.equal(g_plain, g_lora)
    assert tok.decode(g_plain[0, ids.shape[1]:], skip_special_tokens=True).strip() == by_adapter.splitlines()[-1]


def test_messages_data_and_config_file(tiny, capsys, tmp_path):
    root, model, _ = tiny
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in G2P_RECORDS
    ])
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {model}\ndata: {data}\nsteps: 5\nr: 2\ntarget-modules: q_proj,v_proj\nno_progress: true\n")
    out = tmp_path / "a"
    code, stdout, err = run(capsys, "train", "--config", conf, "--steps", 2, "--output", out)
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the flag overrides the file
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((out / "lorakit.json").read_text())["prompt_format"] == {"type": "chat", "system": None}


def _bad(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    "make_args, code, pattern",
    [
        (lambda t, m: ["--data", t / "missing.jsonl"], 1, "missing.jsonl' does not exist"),
        (lambda t, m: ["--data", t], 1, "is a folder, not a JSONL file"),
        (lambda t, m: ["--data", _bad(t, "b.jsonl", '{"text": "a"}\n{"text": \n')], 1, r"b.jsonl:2: invalid JSON"),
        (lambda t, m: ["--data", _bad(t, "u.jsonl", '{"question": "a"}\n')], 1, "unknown record shape"),
        (lambda t, m: ["--data", _bad(t, "e.jsonl", "")], 1, "holds no records"),
        (lambda t, m: ["--data", _bad(t, "p.jsonl", '{"prompt": "hello world cat dog", "completion": "x"}\n'),
                       "--max-length", 3], 1,
         r"p.jsonl:1: prompt is (\d+) tokens, which leaves no answer token within --max-length 3 \(it needs more than \1\)"),
        (lambda t, m: ["--model", t / "no-such-model"], 1, "does not exist"),
        (lambda t, m: ["--target-modules", "qkv_proj"], 1, "'qkv_proj' matches no module"),
        (lambda t, m: ["--steps", 0], 2, "--steps must be an integer >= 1"),
        (lambda t, m: ["--bogus"], 2, r"unrecognized arguments: --bogus \(see 'lorakit train --help'\)"),
        (lambda t, m: ["--compile", "auto"], 2, r"unrecognized arguments: auto \(see 'lorakit train --help'\)"),
        (lambda t, m: ["--config", _bad(t, "c.yaml", "stepz: 3\n")], 2, "unknown option 'stepz'"),
        (lambda t, m: ["--lr", "inf"], 2, "--lr must be a finite number > 0"),
        (lambda t, m: ["--r", 0], 2, "r must be an int >= 1"),
        (lambda t, m: ["--lora-dropout", 1], 2, "lora_dropout must be"),
        (lambda t, m: ["--data", t / "bin.jsonl"], 1, r"bin.jsonl:1: the file is UTF-16; save it as UTF-8"),
        (lambda t, m: ["--data", _bad(t, "l1.jsonl", "")], 1, r"l1.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"),
    ],
)
def test_train_bad_input(tiny, capsys, tmp_path, make_args, code, pattern):
    root, model, data = tiny
    args = ["train", "--model", model, "--data", data, "--steps", 1, "--output", tmp_path / "o", "--no-progress"]
    args += [str(a) for a in make_args(tmp_path, model)]
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00not utf-8\n")
    if (tmp_path / "l1.jsonl").exists():  # line 2 holds a Latin-1 byte: 'caf\xe9'
        (tmp_path / "l1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    got, _, err = run(capsys, *args)
    assert got == code
    import re

    assert re.search(pattern, one_error_line(err)), err
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_other_commands_bad_input(tiny, capsys, tmp_path):
    for args in (["info", tmp_path / "nope"], ["eval", "--adapter", tmp_path / "nope"],
                 ["generate", "--adapter", tmp_path / "nope", "--prompt", "x"],
                 ["merge", "--adapter", tmp_path / "nope", "--output", tmp_path / "m"]):
        code, _, err = run(capsys, *args)
        assert code == 1 and "does not exist" in one_error_line(err)
    code, _, err = run(capsys, "generate", "--prompt", "x")
    assert code == 2 and "one of the arguments --adapter --model is required" in one_error_line(err)
    code, _, err = run(capsys, "generate", "--model", tiny[1], "--prompt", " ")
    assert code == 2 and "--prompt is empty" in one_error_line(err)


def test_ctrl_c_leaves_no_adapter(tiny, capsys, tmp_path, monkeypatch):
    import lorakit.app.loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.app.loop, "train", interrupted)
    root, model, data = tiny
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--steps", 2, "--output", tmp_path / "o")
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("how,want", [("flag", True), ("config", True), ("no-flag", False), ("default", "auto"),
                                      ("config-auto", "auto"), ("config-off", False)])
def test_compile_option_reaches_the_trainer(tiny, capsys, tmp_path, monkeypatch, how, want):
    import lorakit.app.loop

    seen = []

    def spy(model, task, cfg, *a, **k):
        seen.append(cfg.compile)
        raise KeyboardInterrupt  # stop before any step: only the config is checked

    monkeypatch.setattr(lorakit.app.loop, "train", spy)
    root, model, data = tiny
    args = ["train", "--model", model, "--data", data, "--steps", 2, "--output", tmp_path / "o"]
    if how == "flag":
        args.append("--compile")
    elif how.startswith("config"):
        value = {"config": "true", "config-auto": "auto", "config-off": "false"}[how]
        (tmp_path / "c.yaml").write_text(f"compile: {value}\n")
        args += ["--config", tmp_path / "c.yaml"]
    elif how == "no-flag":
        args.append("--no-compile")
    code, _, _ = run(capsys, *args)
    assert code == 130 and seen == [want]


def test_console_script_usage_error():
    exe = Path(sys.executable).with_name("lorakit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lorakit.cli"]
    p = subprocess.run(cmd + ["train", "--steps", "x"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["lorakit: error: argument --steps: invalid int value: 'x' (see 'lorakit train --help')"]
    assert "Traceback" not in p.stderr


def test_compile_auto_decision_is_printed(tiny, capsys, tmp_path, monkeypatch):
    """The default --compile (auto) times the first steps, then says whether compiling pays and why;
    tiny steps never repay a compilation, so training stays eager."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # no compile time recorded: the assumed one
    root, model, data = tiny
    code, stdout, _ = run(capsys, "train", "--model", model, "--data", data, "--steps", 6, "--batch-size", 2,
                          "--output", tmp_path / "o", "--no-progress", "--eval-every", 0)
    assert code == 0, stdout
    lines = [line for line in stdout.splitlines() if line.startswith("torch.compile:")]
    assert len(lines) == 1 and lines[0].startswith("torch.compile: off (auto): 2 steps left x "), stdout
    assert lines[0].endswith("to compile (assumed); --compile forces it") or "no C++ compiler" in lines[0]
    code, stdout, _ = run(capsys, "train", "--model", model, "--data", data, "--steps", 6, "--batch-size", 2,
                          "--output", tmp_path / "p", "--no-progress", "--eval-every", 0, "--no-compile")
    assert code == 0 and "torch.compile" not in stdout


@pytest.mark.parametrize("value,shown", [('"yes"', "str 'yes'"), ("3", "int 3"), ('"false"', "str 'false'"),
                                         ("[1]", "list [1]")])
def test_compile_refuses_other_values(tiny, capsys, tmp_path, value, shown):
    """A quoted "false" was refused with "must be true, false or auto", which reads as if it were allowed: the
    message now says a boolean is wanted, unquoted, and shows the type it got."""
    root, model, data = tiny
    (tmp_path / "c.yaml").write_text(f"compile: {value}\n")
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--steps", 2, "--output", tmp_path / "o",
                       "--config", tmp_path / "c.yaml")
    line = one_error_line(err)
    assert code == 2 and line.startswith("lorakit: error: --compile must be the boolean true or false (unquoted in a "
                                         "config file) or the string auto (the default), got " + shown)
