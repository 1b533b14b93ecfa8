"""``lorakit convert``: mlx-lm and torchtune LoRA adapters -> PEFT format, checked against each format's
documented semantics computed by hand (float64) and against PEFT loading the converted folder.

Layouts built from the formats' own documentation / source:
- mlx-lm: https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/LORA.md (adapters.safetensors +
  adapter_config.json with lora_parameters {rank, scale, dropout}) and mlx_lm/tuner/lora.py (LoRALinear:
  lora_a (input_dims, r), lora_b (r, output_dims), y = linear(x) + scale * (x @ lora_a) @ lora_b).
- torchtune: https://pytorch.org/torchtune/stable/tutorials/lora_finetune.html and
  torchtune/modules/peft/lora.py (LoRALinear: lora_a (rank, in), lora_b (out, rank),
  y = linear(x) + (alpha / rank) * lora_b(lora_a(x))), torchtune/models/convert_weights.py (_FROM_HF module
  names; hf_to_tune permutes q_proj / k_proj rows per head: view(n_heads, 2, head_dim // 2, dim).transpose(1, 2)).
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_llama
from lorakit import load_adapter
from lorakit.app import cli
from lorakit.app.convert import convert_mlx, convert_torchtune
from lorakit.errors import AdapterLoadError, CLIError

torch.set_default_dtype(torch.float32)
N_HEADS, N_KV = 4, 2  # tiny_llama's


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def hand_model(deltas: dict):
    """tiny_llama in float64 with W += delta for each named module (the source format's semantics)."""
    m = tiny_llama(dtype=torch.float64)
    with torch.no_grad():
        for name, d in deltas.items():
            m.get_submodule(name).weight += d.double()
    return m


def peft_logits(folder, ids):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), str(folder)).eval(), ids)


def write_mlx(folder, modules, rank=3, scale=2.5, **extra):
    """An mlx-lm adapter folder (the layout of mlx_lm/tuner: lora_a (in, r), lora_b (r, out))."""
    torch.manual_seed(5)
    base = tiny_llama()
    tensors, deltas = {}, {}
    for m in modules:
        out_f, in_f = base.get_submodule(m).weight.shape
        a, b = torch.randn(in_f, rank) * 0.3, torch.randn(rank, out_f) * 0.3
        tensors[f"{m}.lora_a"], tensors[f"{m}.lora_b"] = a, b
        deltas[m] = scale * (a.double() @ b.double()).T  # y = Wx + scale (x A) B  ->  dW = scale (A B)^T
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapters.safetensors")
    cfg = {"fine_tune_type": "lora", "num_layers": 1, "model": "mlx-community/tiny",
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj",
                                                                                     "self_attn.v_proj"]}, **extra}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return deltas


MLX_MODULES = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_mlx_adapter_converts_with_equal_outputs(tmp_path, ids):
    deltas = write_mlx(tmp_path / "mlx", MLX_MODULES)
    out = convert_mlx(tmp_path / "mlx", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 7.5 and cfg["layers_to_transform"] == [1]
    assert sorted(cfg["target_modules"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    want = logits(hand_model(deltas), ids)
    ours = load_adapter(tiny_llama(dtype=torch.float64), out)
    assert (logits(ours, ids) - want).abs().max() < 1e-5
    assert (peft_logits(out, ids) - want).abs().max() < 1e-5
    assert (want - logits(tiny_llama(dtype=torch.float64), ids)).abs().max() > 1e-2  # the adapter does something


def test_mlx_uneven_modules_use_full_names(tmp_path, ids):
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    deltas = write_mlx(tmp_path / "mlx", mods, rank=2, scale=20.0)
    out = convert_mlx(tmp_path / "mlx", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == sorted(mods)
    assert (peft_logits(out, ids) - logits(hand_model(deltas), ids)).abs().max() < 1e-5


@pytest.mark.parametrize("change, needle", [
    ({"fine_tune_type": "dora"}, "fine_tune_type 'dora'"),
    ({"lora_parameters": {"scale": 1.0}}, "lora_parameters with rank and scale"),
])
def test_mlx_bad_configs_are_refused(tmp_path, change, needle):
    write_mlx(tmp_path / "mlx", MLX_MODULES, **change)
    with pytest.raises(AdapterLoadError, match=needle):
        convert_mlx(tmp_path / "mlx", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_mlx_lone_or_foreign_keys_are_named(tmp_path):
    write_mlx(tmp_path / "mlx", MLX_MODULES)
    f = tmp_path / "mlx" / "adapters.safetensors"
    from safetensors.torch import load_file

    t = load_file(f)
    del t["model.layers.1.self_attn.v_proj.lora_b"]
    save_file(t, f)
    with pytest.raises(AdapterLoadError, match=r"lacks key 'model\.layers\.1\.self_attn\.v_proj\.lora_b'"):
        convert_mlx(tmp_path / "mlx", tmp_path / "peft")
    t["model.layers.1.self_attn.v_proj.m"] = torch.ones(4)
    save_file(t, f)
    with pytest.raises(AdapterLoadError, match=r"v_proj\.m'"):
        convert_mlx(tmp_path / "mlx", tmp_path / "peft")


def interleave_rows(w, n_heads):
    """torchtune's hf_to_tune row order, written out index by index: per head of d rows, tune row 2j + t
    is HF row t * d/2 + j."""
    d = w.shape[0] // n_heads
    idx = [h * d + t * (d // 2) + j for h in range(n_heads) for j in range(d // 2) for t in range(2)]
    return w[idx]


def deinterleave_rows(w, n_heads):
    d = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for j in range(d // 2):
            for t in range(2):
                out[h * d + t * (d // 2) + j] = w[h * d + 2 * j + t]
    return out


def write_torchtune(path, rank=2, alpha=8.0):
    """A torchtune LoRA checkpoint for tiny_llama: tune module names, lora_a (r, in), lora_b (out, r); returns
    the HF-space deltas: the tune-space delta (alpha/r) B A with its rows put back in HF order."""
    torch.manual_seed(7)
    base = tiny_llama()
    names = {"attn.q_proj": ("self_attn.q_proj", N_HEADS), "attn.k_proj": ("self_attn.k_proj", N_KV),
             "attn.output_proj": ("self_attn.o_proj", None), "mlp.w2": ("mlp.down_proj", None)}
    tensors, deltas = {}, {}
    for layer in (0, 1):
        for tune, (hf, heads) in names.items():
            out_f, in_f = base.get_submodule(f"model.layers.{layer}.{hf}").weight.shape
            a, b = torch.randn(rank, in_f) * 0.3, torch.randn(out_f, rank) * 0.3
            tensors[f"layers.{layer}.{tune}.lora_a.weight"] = a
            tensors[f"layers.{layer}.{tune}.lora_b.weight"] = b
            d = alpha / rank * (b.double() @ a.double())
            deltas[f"model.layers.{layer}.{hf}"] = deinterleave_rows(d, heads) if heads else d
    torch.save(tensors, path)
    return deltas


def test_interleave_by_hand_is_the_documented_permutation():
    w = torch.arange(16 * 3).reshape(16, 3)
    doc = w.view(N_HEADS, 2, 2, 3).transpose(1, 2).reshape(16, 3)  # hf_to_tune's _permute, head_dim 4
    assert torch.equal(interleave_rows(w, N_HEADS), doc) and torch.equal(deinterleave_rows(doc, N_HEADS), w)


def test_torchtune_checkpoint_converts_with_equal_outputs(tmp_path, ids):
    tiny_llama().config.save_pretrained(tmp_path / "base")  # config.json only: the head counts
    deltas = write_torchtune(tmp_path / "adapter_0.pt")
    out = convert_torchtune(tmp_path / "adapter_0.pt", tmp_path / "peft", str(tmp_path / "base"), lora_alpha=8.0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 8.0 and cfg["layers_to_transform"] == [0, 1]
    want = logits(hand_model(deltas), ids)
    assert (logits(load_adapter(tiny_llama(dtype=torch.float64), out), ids) - want).abs().max() < 1e-5
    assert (peft_logits(out, ids) - want).abs().max() < 1e-5


def test_torchtune_alpha_from_its_adapter_config_and_errors(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path / "base")
    src = tmp_path / "ckpt"
    src.mkdir()
    write_torchtune(src / "adapter_0.pt", alpha=4.0)
    with pytest.raises(AdapterLoadError, match="--lora-alpha") as e:
        convert_torchtune(src, tmp_path / "peft", str(tmp_path / "base"))
    assert str(e.value).count(str(src)) == 1  # the path was named twice
    (src / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4.0, "target_modules": ["q_proj"]}))
    out = convert_torchtune(src, tmp_path / "peft", str(tmp_path / "base"))
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 4.0
    with pytest.raises(CLIError, match="already exists"):
        convert_torchtune(src, tmp_path / "peft", str(tmp_path / "base"))
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.ones(2, 32), "layers.0.attn.q_proj.lora_b.weight":
                torch.ones(32, 2), "layers.0.attn.qkv.lora_a.weight": torch.ones(2, 32),
                "layers.0.attn.qkv.lora_b.weight": torch.ones(32, 2)}, src / "adapter_0.pt")
    with pytest.raises(AdapterLoadError, match="'layers.0.attn.qkv' is not one of torchtune's"):
        convert_torchtune(src, tmp_path / "other", str(tmp_path / "base"), lora_alpha=1.0)


def test_cli_convert(tmp_path, capsys):
    write_mlx(tmp_path / "mlx", MLX_MODULES)
    assert cli.main(["convert", "--from", "mlx", str(tmp_path / "mlx"), "--output", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert cli.main(["convert", "--from", "mlx", str(tmp_path / "nope"), "--output", str(tmp_path / "p2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope/adapter_config.json' is missing" in err[0]
    assert cli.main(["convert", "--from", "torchtune", str(tmp_path / "x.pt"), "--output", str(tmp_path / "p3")]) == 2


def test_non_finite_weights_and_foreign_files_are_refused_before_anything_is_written(tmp_path, capsys):
    """convert wrote adapters holding NaN / Inf (read_adapter refused them only later), and a ``.pt`` that is not
    a tensor pickle gave a raw UnpicklingError traceback; a missing file said it held none of torchtune's files."""
    from safetensors.torch import load_file

    write_mlx(tmp_path / "mlx", MLX_MODULES)
    f = tmp_path / "mlx" / "adapters.safetensors"
    t = load_file(f)
    t["model.layers.1.self_attn.v_proj.lora_b"][1, 2] = float("nan")
    save_file(t, f)
    with pytest.raises(AdapterLoadError, match=r"'model\.layers\.1\.self_attn\.v_proj\.lora_b' contains NaN or Inf "
                                               r"values \(1 of \d+; first nan at index \[1, 2\]\)"):
        convert_mlx(tmp_path / "mlx", tmp_path / "peft")
    tiny_llama().config.save_pretrained(tmp_path / "base")
    write_torchtune(tmp_path / "adapter_0.pt")
    d = torch.load(tmp_path / "adapter_0.pt")
    d["layers.0.mlp.w2.lora_a.weight"][0, 0] = float("inf")
    torch.save(d, tmp_path / "inf.pt")
    with pytest.raises(AdapterLoadError, match=r"'layers\.0\.mlp\.w2\.lora_a\.weight' contains NaN or Inf"):
        convert_torchtune(tmp_path / "inf.pt", tmp_path / "peft", str(tmp_path / "base"), lora_alpha=8.0)
    (tmp_path / "g.pt").write_bytes(b"garbage\n")
    code = cli.main(["convert", "--from", "torchtune", str(tmp_path / "g.pt"), "--base-model", str(tmp_path / "base"),
                     "--lora-alpha", "8", "--output", str(tmp_path / "peft")])
    err = capsys.readouterr().err
    assert code == 1 and "is not a PyTorch pickle of tensors" in err and "Traceback" not in err
    with pytest.raises(AdapterLoadError, match=r"'.*missing\.pt' does not exist"):
        convert_torchtune(tmp_path / "missing.pt", tmp_path / "peft", str(tmp_path / "base"), lora_alpha=8.0)
    assert not (tmp_path / "peft").exists()
