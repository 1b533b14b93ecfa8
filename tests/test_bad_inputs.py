"""The bad-input matrix (issue 13, item 7): every file lorakit reads, every configuration value and
flag, through the library and the CLI. Each case asserts

- a typed lorakit error (a ``LoRAError`` subclass; the CLI prints it as one ``lorakit: error:`` line
  and exits 1, or 2 for command-line usage),
- a one-line message naming what is at fault: the file and line, the key, module, shape or value,
- that nothing changed: every model parameter and buffer bitwise equal (and the module tree, the
  adapters and ``requires_grad``), no output folder, every input file byte for byte the same.

The precision cases at the end check the float32-adapter policy through ``.to()`` / ``.half()`` /
``.bfloat16()``: a 1e-4 step changes every element of A (in bfloat16 about 19% of them would move).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from _tiny import G2P_RECORDS, tiny_model_folder, tiny_tokenizer, write_jsonl
from lorakit import LoRAConfig
from lorakit.app import cli
from lorakit.app.data import read_jsonl, tokenize_dataset
from lorakit.errors import (AdapterLoadError, ConfigError, DataError, LoRAError, ModelLoadError,
                            TargetModuleError)

# --- helpers -----------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def snapshot(model: nn.Module) -> tuple:
    """Everything a failed call must leave as it was: module tree, tensors (bit patterns), grads flags."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: (v.dtype, _bits(v).clone()) for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            lorakit.list_adapters(model), lorakit.active_adapters(model))


def assert_unchanged(model: nn.Module, snap: tuple) -> None:
    mods, tensors, grads, names, active = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert list(now) == list(tensors)
    for k, (dtype, bits) in tensors.items():
        assert now[k].dtype == dtype and torch.equal(_bits(now[k]), bits), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorakit.list_adapters(model) == names and lorakit.active_adapters(model) == active


def hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert isinstance(e, LoRAError), type(e)
    assert msg and "\n" not in msg, msg
    return msg


def assert_mentions(msg: str, fragments) -> None:
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


# --- data files: the library (lorakit.app.data.read_jsonl) --------------------------------------

GOOD = b'{"prompt": "cat", "completion": " K AE1 T"}\n'
TWO_MB = 2 * 1024 * 1024


def _utf16(enc: str, bom: bytes = b"") -> bytes:
    return bom + ('{"prompt": "cat", "completion": " K AE1 T"}\n' * 2).encode(enc)


# (id, file bytes, line named or None, fragments the message must hold, besides the file name)
DATA_CASES = [
    ("latin1-line3", GOOD * 2 + b'{"prompt": "caf\xe9", "completion": " K AE1 F EY1"}\n', 3,
     ["not UTF-8", "0xe9"]),
    ("utf16-le-bom", _utf16("utf-16-le", b"\xff\xfe"), 1, ["UTF-16"]),
    ("utf16-be-bom", _utf16("utf-16-be", b"\xfe\xff"), 1, ["UTF-16"]),
    ("utf16-le-no-bom", _utf16("utf-16-le"), 1, ["UTF-16"]),
    ("truncated-last-line", GOOD * 2 + b'{"prompt": "dog", "compl', 3, ["invalid JSON"]),
    ("line-is-array", GOOD + b'["dog", " D AO1 G"]\n', 2, ["JSON array", "object"]),
    ("line-is-number", GOOD + b'42\n', 2, ["JSON number", "object"]),
    ("missing-field-first", b'{"prompt": "cat"}\n' + GOOD, 1, ["'completion'"]),
    ("missing-field-later", GOOD + b'{"prompt": "dog"}\n', 2, ["'completion'"]),
    ("alpaca-missing-output", b'{"instruction": "say", "input": "cat"}\n', 1, ["'output'"]),
    ("empty-completion", GOOD + b'{"prompt": "dog", "completion": ""}\n', 2, ["'completion' is empty"]),
    ("empty-text", b'{"text": "a"}\n{"text": ""}\n', 2, ["'text' is empty"]),
    ("empty-alpaca-output", b'{"instruction": "say", "output": ""}\n', 1, ["'output' is empty"]),
    ("empty-alpaca-instruction", b'{"instruction": "", "output": "K AE1 T"}\n', 1, ["'instruction' is empty"]),
    ("null-prompt", b'{"prompt": null, "completion": "x"}\n', 1, ["'prompt'", "string", "null"]),
    ("number-completion", GOOD + b'{"prompt": "a", "completion": 3}\n', 2, ["'completion'", "string", "number"]),
    ("empty-messages", b'{"messages": []}\n', 1, ["'messages'", "non-empty"]),
    ("messages-no-assistant", b'{"messages": [{"role": "user", "content": "cat"}]}\n', 1, ["no assistant"]),
    ("shape-changes", GOOD + b'{"text": "a"}\n', 2, ["'text'", "'prompt-completion'"]),
    ("two-mb-line", GOOD + b'{"prompt": "' + b"a" * TWO_MB + b'", "completion": "x"}\n', 2, ["MiB"]),
    ("empty-file", b"", None, ["holds no records"]),
    ("blank-lines-only", b"\n  \n\n", None, ["holds no records"]),
]


@pytest.mark.parametrize("content, line, fragments", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_file(tmp_path, content, line, fragments):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    before = hashes(tmp_path)
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    msg = one_line(e.value)
    assert_mentions(msg, [f"{f}:{line}:" if line else str(f), *fragments])
    assert hashes(tmp_path) == before


def test_data_prompt_longer_than_max_length(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [G2P_RECORDS[0], {"prompt": "hello world cat dog tiny", "completion": "x"}])
    before = hashes(tmp_path)
    data = read_jsonl(f)
    tok = tiny_tokenizer()
    n = len(tok("hello world cat dog tiny", add_special_tokens=False).input_ids)  # the prompt's tokens, counted here
    with pytest.raises(DataError) as e:
        tokenize_dataset(tok, data, n - 1)
    assert_mentions(one_line(e.value), [f"{f}:2:", f"prompt is {n} tokens", f"--max-length {n - 1}"])
    assert hashes(tmp_path) == before


def test_data_missing_file_and_folder(tmp_path):
    for path, frag in ((tmp_path / "nope.jsonl", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(DataError) as e:
            read_jsonl(path)
        assert_mentions(one_line(e.value), [str(path), frag])


# --- adapter files: the library (read_adapter, load_adapter) -------------------------------------

A_KEY = "base_model.model.0.lora_A.weight"  # (2, 8) in the files below
B_KEY = "base_model.model.0.lora_B.weight"  # (8, 2)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    m = lorakit.inject(small_model(), LoRAConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    return lorakit.save_adapter(m, tmp_path_factory.mktemp("adapter") / "good")


def _rewrite_header(path: Path, edit) -> None:
    """Edit the JSON header of a safetensors file in place, keeping the data bytes."""
    f = path / "adapter_model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def _set_value(path: Path, key: str, index: tuple, value: float) -> None:
    f = path / "adapter_model.safetensors"
    t = load_file(f)
    t[key][index] = value
    save_file(t, f)


class _Boom:
    """Unpickling this creates a marker folder: proof that a file was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def _pickle_bin(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps({A_KEY: _Boom(str(path.parent / "UNPICKLED"))}))


def _config(path: Path, edit) -> None:
    f = path / "adapter_config.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))


def _truncate(path: Path, n: int) -> None:
    f = path / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:n])


# (id, damage(folder), error class, fragments: "{W}" / "{C}" are the weights / config file paths)
ADAPTER_CASES = [
    ("safetensors-truncated-data", lambda p: _truncate(p, -10), AdapterLoadError, ["{W}", "truncated"]),
    ("safetensors-truncated-header", lambda p: _truncate(p, 40), AdapterLoadError, ["{W}", "truncated"]),
    ("safetensors-empty", lambda p: _truncate(p, 0), AdapterLoadError, ["{W}", "truncated"]),
    ("header-shape-lies-size", lambda p: _rewrite_header(p, lambda h: h[A_KEY].update(shape=[2, 16])),
     AdapterLoadError, ["{W}", A_KEY, "[2, 16]"]),
    ("header-dtype-lies", lambda p: _rewrite_header(p, lambda h: h[A_KEY].update(dtype="F64")),
     AdapterLoadError, ["{W}", A_KEY, "F64"]),
    ("header-shape-lies-same-size", lambda p: _rewrite_header(p, lambda h: h[A_KEY].update(shape=[4, 4])),
     AdapterLoadError, ["{W}", A_KEY, "[4, 4]", "[2, 8]"]),
    ("weight-nan", lambda p: _set_value(p, A_KEY, (1, 3), math.nan), AdapterLoadError,
     ["{W}", A_KEY, "NaN", "[1, 3]"]),
    ("weight-inf", lambda p: _set_value(p, B_KEY, (5, 0), -math.inf), AdapterLoadError,
     ["{W}", B_KEY, "Inf", "[5, 0]"]),
    ("pickle-bin", _pickle_bin, AdapterLoadError, ["adapter_model.bin", "pickle", "weights_only=True"]),
    ("config-not-json", lambda p: (p / "adapter_config.json").write_text('{\n  "r": 2,\n  lora_alpha: 4\n}\n'),
     AdapterLoadError, ["{C}", "not valid JSON", "line 3"]),
    ("config-not-utf8", lambda p: (p / "adapter_config.json").write_bytes(b'{"r": 2, "task_type": "caf\xe9"}'),
     AdapterLoadError, ["{C}", "not UTF-8", "0xe9"]),
    ("config-is-list", lambda p: (p / "adapter_config.json").write_text("[2, 4]"), AdapterLoadError,
     ["{C}", "JSON object", "list"]),
    ("config-r-string", lambda p: _config(p, lambda d: d.update(r="8")), AdapterLoadError, ["{C}", "r must be", "'8'"]),
    ("config-alpha-list", lambda p: _config(p, lambda d: d.update(lora_alpha=[4])), AdapterLoadError,
     ["{C}", "lora_alpha", "[4]"]),
    ("config-targets-int", lambda p: _config(p, lambda d: d.update(target_modules=5)), AdapterLoadError,
     ["{C}", "target_modules", "5"]),
    ("config-rslora-string", lambda p: _config(p, lambda d: d.update(use_rslora="yes")), AdapterLoadError,
     ["{C}", "use_rslora", "'yes'"]),
    ("config-dropout-2", lambda p: _config(p, lambda d: d.update(lora_dropout=2)), AdapterLoadError,
     ["{C}", "lora_dropout", "2"]),
    ("config-missing", lambda p: (p / "adapter_config.json").unlink(), AdapterLoadError, ["{C}", "missing"]),
    ("weights-int-dtype", lambda p: save_file({A_KEY: torch.zeros(2, 8, dtype=torch.int32), B_KEY: torch.zeros(8, 2)},
                                              p / "adapter_model.safetensors"), AdapterLoadError, ["{W}", A_KEY, "int32"]),
    ("weights-missing-key", lambda p: save_file({A_KEY: torch.zeros(2, 8)}, p / "adapter_model.safetensors"),
     AdapterLoadError, ["{W}", B_KEY]),
    ("weights-extra-key", lambda p: save_file({A_KEY: torch.zeros(2, 8), B_KEY: torch.zeros(8, 2),
                                               "base_model.model.9.lora_A.weight": torch.zeros(2, 8)},
                                              p / "adapter_model.safetensors"),
     AdapterLoadError, ["{W}", "base_model.model.9.lora_A.weight"]),
    ("targets-absent", lambda p: _config(p, lambda d: d.update(target_modules=["q_proj"])), TargetModuleError,
     ["'q_proj'", "matches no module"]),
]


def _damaged(good: Path, tmp_path: Path, damage) -> Path:
    path = tmp_path / "adapter"
    shutil.copytree(good, path)
    damage(path)
    return path


def _fill(fragments, path: Path) -> list[str]:
    w, c = str(path / "adapter_model.safetensors"), str(path / "adapter_config.json")
    return [f.replace("{W}", w).replace("{C}", c) for f in fragments]


# each case into a fresh model, and (where the config is the same) over an adapter already loaded
_INTO = [("fresh", c) for c in ADAPTER_CASES] + [("replace", c) for c in ADAPTER_CASES if c[0] != "targets-absent"]


@pytest.mark.parametrize("into, damage, error, fragments", [(i, *c[1:]) for i, c in _INTO],
                         ids=[f"{c[0]}-{i}" for i, c in _INTO])
def test_adapter_file(good_adapter, tmp_path, damage, error, fragments, into):
    path = _damaged(good_adapter, tmp_path, damage)
    model = small_model()
    if into == "replace":  # the model already holds 'default' (same config) and another adapter, merged state off
        lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["2"]), adapter_name="other")
        lorakit.load_adapter(model, good_adapter)
    snap, before = snapshot(model), hashes(tmp_path)
    with pytest.raises(error) as e:
        lorakit.load_adapter(model, path)
    msg = one_line(e.value)
    assert_mentions(msg, _fill(fragments, path))
    assert_unchanged(model, snap)
    assert hashes(tmp_path) == before
    assert not (tmp_path / "UNPICKLED").exists()  # the pickle case: never unpickled


@pytest.mark.parametrize("allow_pickle", [True, False])
def test_read_adapter_refuses_pickle_without_unpickling(good_adapter, tmp_path, allow_pickle):
    """A pickle holding an object that runs code: refused unread (``allow_pickle=False``, the server), or by
    ``torch.load(weights_only=True)``'s restricted unpickler before the object is built."""
    path = _damaged(good_adapter, tmp_path, _pickle_bin)
    with pytest.raises(AdapterLoadError) as e:
        lorakit.read_adapter(path, allow_pickle=allow_pickle)
    assert_mentions(one_line(e.value), ["adapter_model.bin", "pickle"])
    assert not (tmp_path / "UNPICKLED").exists()
    pickle.loads((path / "adapter_model.bin").read_bytes())  # the marker works: unpickling does create it
    assert (tmp_path / "UNPICKLED").is_dir()


# --- configuration: LoRAConfig, inject ------------------------------------------------------------

CONFIG_CASES = [
    ("r-0", dict(r=0), ["r must be", "got 0"]),
    ("r-negative", dict(r=-4), ["r must be", "got -4"]),
    ("r-float", dict(r=2.5), ["r must be", "got 2.5"]),
    ("r-bool", dict(r=True), ["r must be", "got True"]),
    ("alpha-0", dict(lora_alpha=0), ["lora_alpha", "got 0"]),
    ("alpha-inf", dict(lora_alpha=math.inf), ["lora_alpha", "got inf"]),
    ("alpha-nan", dict(lora_alpha=math.nan), ["lora_alpha", "got nan"]),
    ("dropout-1", dict(lora_dropout=1.0), ["lora_dropout", "got 1.0"]),
    ("dropout-negative", dict(lora_dropout=-0.1), ["lora_dropout", "got -0.1"]),
    ("dropout-nan", dict(lora_dropout=math.nan), ["lora_dropout", "got nan"]),
    ("targets-empty-list", dict(target_modules=[]), ["target_modules", "got []"]),
    ("targets-empty-name", dict(target_modules=["q_proj", ""]), ["target_modules", "''"]),
    ("rank-pattern-0", dict(rank_pattern={"q_proj": 0}), ["rank_pattern['q_proj']", "got 0"]),
    ("unknown-option", dict(lora_aplha=8), ["'lora_aplha'", "'lora_alpha'"]),
]


@pytest.mark.parametrize("kwargs, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_lora_config(kwargs, fragments):
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**kwargs)
    assert_mentions(one_line(e.value), fragments)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


INJECT_CASES = [
    # a misspelt name: the nearest module names are listed
    ("target-typo", dict(target_modules=["q_proj", "qkv_proj"]), ["'qkv_proj'", "nearest", "q_proj", "k_proj", "v_proj"]),
    ("target-typo-2", dict(target_modules=["down_prj"]), ["'down_prj'", "nearest", "down_proj"]),
    ("target-regex-nothing", dict(target_modules=r".*\.attn\.q"), [r"'.*\\.attn\\.q'", "matches no module", "LlamaForCausalLM"]),
    ("target-unsupported", dict(target_modules=["input_layernorm"]), ["model.layers.0.input_layernorm", "LlamaRMSNorm"]),
    ("layers-out-of-range", dict(target_modules=["q_proj"], layers_to_transform=[7]), ["'q_proj'", "layers [7]"]),
    ("excluded-everything", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), ["exclude_modules", "q_proj"]),
]


@pytest.mark.parametrize("kwargs, fragments", [c[1:] for c in INJECT_CASES], ids=[c[0] for c in INJECT_CASES])
def test_inject(kwargs, fragments):
    model = lorakit.inject(_llama(), LoRAConfig(r=2, target_modules=["o_proj"]), adapter_name="other")
    snap = snapshot(model)
    with pytest.raises(TargetModuleError) as e:
        lorakit.inject(model, LoRAConfig(**kwargs))
    assert_mentions(one_line(e.value), fragments)
    assert_unchanged(model, snap)


def test_inject_bad_adapter_name_and_types():
    model = small_model()
    snap = snapshot(model)
    for call, frag in ((lambda: lorakit.inject(model, LoRAConfig(target_modules=["0"]), adapter_name=5), "got int 5"),
                       (lambda: lorakit.inject(model, {"r": 8}), "got Sequential and dict")):
        with pytest.raises(ConfigError) as e:
            call()
        assert_mentions(one_line(e.value), [frag])
        assert_unchanged(model, snap)


def test_adapter_verbs_refuse_a_name_that_is_not_a_str(tmp_path):
    """delete_adapter and save_adapter said ``adapter 5 not found`` (AdapterNotFoundError) where inject and
    set_adapter raise ConfigError for the type; set_adapter's message lacked the value."""
    model = lorakit.inject(small_model(), LoRAConfig(target_modules=["0"]))
    snap = snapshot(model)
    for call, frag in ((lambda: lorakit.delete_adapter(model, 5), "got int 5"),
                       (lambda: lorakit.save_adapter(model, tmp_path / "a", adapter_name=5), "got int 5"),
                       (lambda: lorakit.set_adapter(model, 5), "got int 5"),
                       (lambda: lorakit.set_adapter(model, [b"default"]), "got bytes b'default'")):
        with pytest.raises(ConfigError) as e:
            call()
        assert_mentions(one_line(e.value), [frag])
        assert_unchanged(model, snap)
    assert not (tmp_path / "a").exists() and lorakit.list_adapters(model) == ["default"]


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama folder, good training data, and an adapter for that model (with lorakit.json)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    model_dir = tiny_model_folder(root / "model")
    data = write_jsonl(root / "train.jsonl", G2P_RECORDS)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(m, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter = lorakit.save_adapter(m, root / "adapter")
    (adapter / "lorakit.json").write_text(json.dumps({"base_model": str(model_dir), "prompt_format": {"type": "plain"},
                                                      "max_length": 64}))
    return root, model_dir, data, adapter


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("loading model", "loaded in"))]
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    return code, lines[0]


def _write(t: Path, name: str, content: bytes) -> Path:
    (t / name).write_bytes(content)
    return t / name


LONG = b'{"prompt": "hello world cat dog tiny hello world", "completion": " x"}\n'

# (id, extra train args given (tmp_path, tiny), exit status, fragments; "{T}" is tmp_path)
TRAIN_CASES = [
    ("r-0", lambda t, k: ["--r", 0], 2, ["r must be an int >= 1", "got 0"]),
    ("r-negative", lambda t, k: ["--r", -2], 2, ["r must be an int >= 1", "got -2"]),
    ("alpha-0", lambda t, k: ["--lora-alpha", 0], 2, ["lora_alpha", "got 0.0"]),
    ("dropout-1", lambda t, k: ["--lora-dropout", 1], 2, ["lora_dropout", "got 1.0"]),
    ("dropout-negative", lambda t, k: ["--lora-dropout", -0.5], 2, ["lora_dropout", "got -0.5"]),
    ("targets-empty", lambda t, k: ["--target-modules", ","], 2, ["target_modules", "got []"]),
    ("targets-typo", lambda t, k: ["--target-modules", "q_proj,qkv_proj"], 1, ["'qkv_proj'", "nearest", "q_proj"]),
    ("lr-nan", lambda t, k: ["--lr", "nan"], 2, ["--lr must be a finite number > 0", "got nan"]),
    ("lr-inf", lambda t, k: ["--lr", "inf"], 2, ["--lr must be a finite number > 0", "got inf"]),
    ("lr-0", lambda t, k: ["--lr", 0], 2, ["--lr must be a finite number > 0", "got 0.0"]),
    ("steps-0", lambda t, k: ["--steps", 0], 2, ["--steps must be an integer >= 1", "got 0"]),
    ("batch-0", lambda t, k: ["--batch-size", 0], 2, ["--batch-size must be an integer >= 1", "got 0"]),
    ("max-length-under-prompt", lambda t, k: ["--data", _write(t, "long.jsonl", GOOD + LONG), "--max-length", 4], 1,
     ["{T}/long.jsonl:2:", "which leaves no answer token within --max-length 4"]),
    ("data-latin1-line3", lambda t, k: ["--data", _write(t, "l1.jsonl", GOOD * 2 + b'{"prompt": "caf\xe9", "completion": "x"}\n')],
     1, ["{T}/l1.jsonl:3:", "not UTF-8", "0xe9"]),
    ("data-utf16", lambda t, k: ["--data", _write(t, "u16.jsonl", _utf16("utf-16"))], 1, ["{T}/u16.jsonl:1:", "UTF-16"]),
    ("data-array", lambda t, k: ["--data", _write(t, "arr.jsonl", GOOD + b"[1, 2]\n")], 1, ["{T}/arr.jsonl:2:", "JSON array"]),
    ("data-2mb-line", lambda t, k: ["--data", _write(t, "big.jsonl", b'{"text": "' + b"a" * TWO_MB + b'"}\n')], 1,
     ["{T}/big.jsonl:1:", "MiB"]),
    ("data-empty", lambda t, k: ["--data", _write(t, "e.jsonl", b"")], 1, ["{T}/e.jsonl", "holds no records"]),
    ("eval-data-truncated", lambda t, k: ["--eval-data", _write(t, "v.jsonl", GOOD + b'{"prompt": "a", "com')], 1,
     ["{T}/v.jsonl:2:", "invalid JSON"]),
    ("config-bad-yaml", lambda t, k: ["--config", _write(t, "c.yaml", b"steps: 3\nr: [1,\n")], 2, ["{T}/c.yaml", "line 3"]),
    ("config-unknown-key", lambda t, k: ["--config", _write(t, "c.yaml", b"lora_aplha: 3\n")], 2,
     ["{T}/c.yaml", "'lora_aplha'"]),
    ("config-r-0", lambda t, k: ["--config", _write(t, "c.json", b'{"r": 0}')], 2, ["r must be an int >= 1", "got 0"]),
    ("config-not-utf8", lambda t, k: ["--config", _write(t, "c.yaml", b"model: caf\xe9\n")], 2,
     ["{T}/c.yaml", "not UTF-8", "0xe9"]),
]


def _params(cases):
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("make_args, code, fragments", _params(TRAIN_CASES))
def test_cli_train(tiny, capsys, tmp_path, make_args, code, fragments):
    root, model_dir, data, _ = tiny
    out = tmp_path / "out"
    extra = [str(a) for a in make_args(tmp_path, tiny)]
    args = ["train", "--model", model_dir, "--data", data, "--steps", 1, "--output", out, "--no-progress", *extra]
    before = hashes(tmp_path, root)
    got, line = run_cli(capsys, *args)
    assert got == code, line
    assert_mentions(line, [f.replace("{T}", str(tmp_path)) for f in fragments])
    assert not out.exists()  # no partial output folder
    assert hashes(tmp_path, root) == before


# `lorakit info` / `merge` / `eval` / `generate` on damaged adapter folders (copies of a good one)
ADAPTER_CLI_CASES = [
    ("info", "safetensors-truncated-data"), ("info", "header-shape-lies-size"), ("info", "weight-nan"),
    ("info", "pickle-bin"), ("info", "config-not-json"), ("info", "config-is-list"), ("info", "config-r-string"),
    ("merge", "header-dtype-lies"), ("merge", "weight-inf"), ("merge", "config-not-utf8"),
    ("eval", "safetensors-empty"), ("generate", "config-targets-int"),
]
_ADAPTER = {c[0]: c for c in ADAPTER_CASES}


def _tiny_fragments(case: str, path: Path) -> list[str]:
    """The fragments of ``ADAPTER_CASES`` for the tiny model's adapter (its q_proj keys, not '0')."""
    frags = _fill(_ADAPTER[case][3], path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    return [f.replace(A_KEY, key + "A.weight").replace(B_KEY, key + "B.weight").replace("[2, 8]", "[2, 32]")
            for f in frags]


def _tiny_damage(case: str):
    """ADAPTER_CASES' damage, applied to the tiny model's adapter (its first lora_A / lora_B keys)."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    damage = {
        "header-shape-lies-size": lambda p: _rewrite_header(p, lambda h: h[key + "A.weight"].update(shape=[2, 64])),
        "header-dtype-lies": lambda p: _rewrite_header(p, lambda h: h[key + "A.weight"].update(dtype="F64")),
        "weight-nan": lambda p: _set_value(p, key + "A.weight", (1, 3), math.nan),
        "weight-inf": lambda p: _set_value(p, key + "B.weight", (5, 0), -math.inf),
    }
    return damage.get(case, _ADAPTER[case][1])


@pytest.mark.parametrize("command, case", ADAPTER_CLI_CASES, ids=[f"{c}-{k}" for c, k in ADAPTER_CLI_CASES])
def test_cli_adapter_file(tiny, capsys, tmp_path, command, case):
    root, model_dir, data, adapter = tiny
    path = _damaged(adapter, tmp_path, _tiny_damage(case))
    out = tmp_path / "merged"
    argv = {"info": ["info", path], "merge": ["merge", "--adapter", path, "--output", out],
            "eval": ["eval", "--adapter", path, "--data", data],
            "generate": ["generate", "--adapter", path, "--prompt", "cat"]}[command]
    before = hashes(tmp_path, root)
    code, line = run_cli(capsys, *argv)
    assert code == 1, line
    frags = _tiny_fragments(case, path)
    if case.startswith("header-shape"):
        frags = [f.replace("[2, 16]", "[2, 64]") for f in frags]
    assert_mentions(line, frags)
    assert not out.exists() and not (tmp_path / "UNPICKLED").exists()
    assert hashes(tmp_path, root) == before


def test_cli_merge_adapter_that_does_not_fit_the_base(tiny, capsys, tmp_path):
    """Right files, wrong model: the shapes are checked against the base after it loads; no output."""
    root, model_dir, data, adapter = tiny
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    path = _damaged(adapter, tmp_path, lambda p: save_file(
        {**load_file(p / "adapter_model.safetensors"), key: torch.zeros(2, 16)}, p / "adapter_model.safetensors"))
    before = hashes(tmp_path, root)
    code, line = run_cli(capsys, "merge", "--adapter", path, "--output", tmp_path / "merged")
    assert code == 1
    assert_mentions(line, [key, "[2, 16]", "[2, 32]"])
    assert not (tmp_path / "merged").exists()
    assert hashes(tmp_path, root) == before


@pytest.mark.parametrize("content, frag", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"base_model": "caf\xe9"}', "not UTF-8"),
], ids=["lorakit-json-not-json", "lorakit-json-list", "lorakit-json-not-utf8"])
def test_cli_lorakit_json(tiny, capsys, tmp_path, content, frag):
    root, model_dir, data, adapter = tiny
    path = _damaged(adapter, tmp_path, lambda p: (p / "lorakit.json").write_bytes(content))
    before = hashes(tmp_path, root)
    code, line = run_cli(capsys, "merge", "--adapter", path, "--output", tmp_path / "merged")
    assert code == 1
    assert_mentions(line, [str(path / "lorakit.json"), frag])
    assert not (tmp_path / "merged").exists()
    assert hashes(tmp_path, root) == before


# --- precision: float32 adapters on a half-precision base, through .to() / .half() / .bfloat16() --

CASTS = {
    "to-bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to-float16": (lambda m: m.to(torch.float16), torch.float16),
    "to-device-and-dtype": (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
}


def _adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32))
    return lorakit.inject(model, LoRAConfig(r=4, target_modules=["0"], init_lora_weights=False))


@pytest.mark.parametrize("cast", list(CASTS))
def test_precision_adapter_stays_float32(cast):
    fn, half = CASTS[cast]
    model = _adapted()
    a0 = model[0].adapter("default").lora_A.detach().clone()
    fn(model)
    ad = model[0].adapter("default")
    assert model[0].base_layer.weight.dtype == half
    assert ad.lora_A.dtype == torch.float32 and ad.lora_B.dtype == torch.float32
    assert torch.equal(ad.lora_A.detach(), a0)  # not rounded through the half type on the way
    # a small optimizer step changes every element of A, by 1e-4 to float32 rounding (float64 reference)
    ad.lora_A.grad = torch.ones_like(ad.lora_A)
    torch.optim.SGD([ad.lora_A], lr=1e-4).step()
    new = ad.lora_A.detach()
    assert bool((new != a0).all())
    want = a0.double() - 1e-4
    assert float((new.double() - want).abs().max()) <= 2 ** -24  # |A| < 0.18: half an ulp of float32 at 0.25


def test_precision_double_and_device_moves():
    model = _adapted()
    model.double()
    assert model[0].adapter("default").lora_A.dtype == torch.float64  # float64 bases get float64 adapters
    model.bfloat16()
    assert model[0].adapter("default").lora_A.dtype == torch.float32  # a half base: float32, as at inject
    model.to("meta")
    ad = model[0].adapter("default")
    assert ad.lora_A.device.type == "meta" and ad.lora_A.dtype == torch.float32
    assert model[0].base_layer.weight.device.type == "meta" and model[0].base_layer.weight.dtype == torch.bfloat16


def test_precision_grad_stays_float32():
    model = _adapted()
    model(torch.randn(3, 32)).sum().backward()
    model.bfloat16()
    g = model[0].adapter("default").lora_A.grad
    assert g is not None and g.dtype == torch.float32


def _within_rounding(got: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """``got`` (bfloat16) equals ``sum(parts)`` (float64) up to one bfloat16 rounding of each part and of
    the sum: at most 2^-8 of each magnitude (bfloat16 keeps 8 significant bits)."""
    want = sum(parts)
    bound = 2 ** -8 * (sum(p.abs() for p in parts) + want.abs()) + 1e-12
    assert bool(((got.double() - want).abs() <= bound).all()), float((got.double() - want).abs().max())


def _bypass64(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """s·B·A·x of adapter ``name`` in float64."""
    ad = model[0].adapter(name)
    a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
    return ad.scaling * (x.double() @ a.T @ b.T)


def test_precision_forward_merge_mixed_save_load(tmp_path):
    model = _adapted(0)
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False), adapter_name="b")
    model.bfloat16().eval()
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        base = model[0].base_layer(x).double()  # the bfloat16 base output, as the layer computes it
        lorakit.set_adapter(model, "default")
        out = model(x)
        assert out.dtype == torch.bfloat16
        _within_rounding(out, [base, _bypass64(model, x, "default")])
        names = ["default", "b", None, "default"]
        with lorakit.mixed_batch(model, names):
            mixed = model(x)
        for row, n in enumerate(names):
            parts = [base[row]] + ([_bypass64(model, x, n)[row]] if n else [])
            _within_rounding(mixed[row], parts)
    # merge: W + s·B·A rounded once to bfloat16 (float64 reference); unmerge restores W bit for bit
    w0 = model[0].base_layer.weight.detach().clone()
    ad = model[0].adapter("default")
    delta = ad.scaling * ad.lora_B.detach().double() @ ad.lora_A.detach().double()
    lorakit.merge(model)
    want = w0.double() + delta
    got = model[0].base_layer.weight.detach().double()
    assert bool(((got - want).abs() <= 2 ** -8 * want.abs() + 1e-12).all())
    lorakit.unmerge(model)
    assert torch.equal(_bits(model[0].base_layer.weight), _bits(w0))
    # save from the bfloat16 model: float32 tensors; load into a fresh bfloat16 base: float32, bit for bit
    lorakit.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    fresh = nn.Sequential(nn.Linear(32, 32)).bfloat16()
    fresh.load_state_dict({"0.weight": w0, "0.bias": model[0].base_layer.bias.detach()})
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert fresh[0].adapter("default").lora_A.dtype == torch.float32
    assert torch.equal(_bits(fresh[0].adapter("default").lora_A), _bits(ad.lora_A))
    assert torch.equal(_bits(fresh[0].adapter("default").lora_B), _bits(ad.lora_B))
