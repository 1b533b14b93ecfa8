"""``lorakit train --quantize nf4|int8`` on a tiny random Llama: recorded in lorakit.json and in the
checkpoint's run options (a resume may not change it); eval rebuilds the same quantised base; merge
writes a float32 checkpoint holding dequant(W) + s·B·A; bad values are refused clearly."""

import json

import bitsandbytes as bnb  # CI installs it (the test extra): missing, this module fails loudly
import pytest
import torch
from safetensors.torch import load_file

from _tiny import G2P_RECORDS, tiny_model_folder, write_jsonl
from lorakit.app import cli
from lorakit.app.options import RESUME_MAY_CHANGE, TrainOptions, resumed_options, run_options
from lorakit.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtiny")
    return tiny_model_folder(root / "model"), write_jsonl(root / "train.jsonl", G2P_RECORDS)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bnb_dequant(w: torch.Tensor, kind: str) -> torch.Tensor:
    """``w`` quantised and dequantised by bitsandbytes itself (NF4 blocks of 64, or int8 rows), float64."""
    if kind == "nf4":
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=False).to("cpu")
        return bnb.functional.dequantize_4bit(p.data, p.quant_state).double()
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return p.data.double() * p.SCB.double()[:, None] / 127


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_train_quantized_then_eval_and_merge(tiny, capsys, tmp_path, kind):
    model, data = tiny
    out = tmp_path / "adapter"
    code, stdout, err = run(capsys, "train", "--model", model, "--data", data, "--eval-data", data, "--steps", 3,
                            "--batch-size", 2, "--lr", "0.05", "--output", out, "--no-progress", "--quantize", kind)
    assert code == 0, stdout + err
    assert f"quantised to {kind}" in err
    assert "gradient checkpointing: activations recomputed" in stdout + err  # QLoRA's recipe
    assert json.loads((out / "lorakit.json").read_text())["quantize"] == kind
    ev = json.loads((out / "eval.json").read_text())
    assert f"linear layers quantised to {kind}" in run(capsys, "info", out)[1]
    code, stdout, _ = run(capsys, "eval", "--adapter", out, "--data", data)
    res = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and abs(res["loss"] - ev["after"]["loss"]) < 1e-5  # the same quantised base, unmerged

    merged = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", "--adapter", out, "--output", merged)
    assert code == 0, stdout
    assert json.loads((merged / "lorakit.json").read_text())["dequantized_from"] == kind
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    w = load_file(merged / "model.safetensors")
    base = load_file(model / "model.safetensors")
    lora = load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = lora[f"base_model.model.{name}.lora_A.weight"].double()
        b = lora[f"base_model.model.{name}.lora_B.weight"].double()
        expected = bnb_dequant(base[f"{name}.weight"], kind) + s * b @ a  # float64, by hand
        assert w[f"{name}.weight"].dtype == torch.float32
        assert torch.allclose(w[f"{name}.weight"].double(), expected, atol=1e-6, rtol=0), name
        assert (b.abs().max() > 0).item()  # trained: the delta is in the checkpoint
    assert torch.equal(w["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # kept full precision


def test_bad_quantize_values_are_refused(tiny, capsys, tmp_path):
    model, data = tiny
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--quantize", "nf3")
    assert code == 2 and "--quantize: invalid choice: 'nf3' (choose from 'nf4', 'int8')" in err
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {model}\ndata: {data}\nquantize: q4\n")
    code, _, err = run(capsys, "train", "--config", conf)
    assert code == 2 and "--quantize must be one of nf4, int8, got 'q4'" in err
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--quantize", "nf4", "--nproc", 2)
    assert code == 2 and "--quantize trains in one process" in err
    code, _, err = run(capsys, "train", "--task", "classify", "--quantize", "nf4")
    assert code == 2 and "--task classify does not take --quantize" in err
    for flag, says in (("--dora", "--dora needs the dense base weight"), ("--full", "--full trains the whole model")):
        code, _, err = run(capsys, "train", "--model", model, "--data", data, "--quantize", "nf4", flag)
        assert code == 2 and says in err and "--quantize" in err  # flags that conflict: a usage error, status 2


def test_eval_refuses_an_unknown_quantize_in_lorakit_json(tiny, capsys, tmp_path):
    model, data = tiny
    out = tmp_path / "adapter"
    assert run(capsys, "train", "--model", model, "--data", data, "--steps", 1, "--batch-size", 2, "--output", out,
               "--no-progress")[0] == 0
    meta = json.loads((out / "lorakit.json").read_text())
    assert meta["quantize"] is None
    (out / "lorakit.json").write_text(json.dumps(meta | {"quantize": "fp4x"}))
    code, _, err = run(capsys, "eval", "--adapter", out, "--data", data)
    assert code == 1 and "lorakit.json" in err and "'fp4x'" in err and "nf4, int8" in err


def test_quantize_is_bound_to_a_checkpoint():
    assert "quantize" not in RESUME_MAY_CHANGE
    run = run_options(TrainOptions(quantize="nf4"))
    assert run["quantize"] == "nf4"
    changeable = {k: v for k, v in vars(TrainOptions()).items() if k not in run}
    for now in (None, "int8"):
        with pytest.raises(CheckpointError, match=r"changed: quantize \('nf4' -> " + repr(now)):
            resumed_options(TrainOptions(quantize=now, resume="runs/x"), frozenset({"quantize", "resume"}), run,
                            changeable)
    kept = resumed_options(TrainOptions(resume="runs/x"), frozenset({"resume"}), run, changeable)
    assert kept.quantize == "nf4"  # not given again: the run's own


def test_merge_to_gguf_dequantizes_the_quantized_base_like_the_transformers_merge(tiny, capsys, tmp_path):
    from gguf import GGUFReader

    model, data = tiny
    out = tmp_path / "adapter"
    assert run(capsys, "train", "--model", model, "--data", data, "--steps", 2, "--batch-size", 2, "--lr", "0.05",
               "--output", out, "--no-progress", "--quantize", "nf4")[0] == 0
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--format", "gguf", "--outtype", "f32",
                            "--output", tmp_path / "m.gguf")
    assert code == 0, stdout + err
    name = "model.layers.1.mlp.down_proj"  # blk.1.ffn_down: not permuted (only q / k rows are)
    lora, cfg = load_file(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())
    a = lora[f"base_model.model.{name}.lora_A.weight"].double()
    b = lora[f"base_model.model.{name}.lora_B.weight"].double()
    w = bnb_dequant(load_file(model / "model.safetensors")[f"{name}.weight"], "nf4")
    expected = w + cfg["lora_alpha"] / cfg["r"] * b @ a  # float64, by hand
    t = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    got = torch.from_numpy(t.data.copy()).double().reshape(expected.shape)
    assert (b.abs().max() > 0).item() and torch.allclose(got, expected, atol=1e-6, rtol=0)
