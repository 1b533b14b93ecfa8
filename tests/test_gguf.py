"""GGUF export for llama.cpp: LoRA adapters (``lorakit export --format gguf``), their import back to PEFT
(``lorakit convert --from gguf``) and merged models (``lorakit merge --format gguf``), read back with the
``gguf`` package's GGUFReader and, for merged models, loaded by transformers' own GGUF loader.

Format references: llama.cpp convert_lora_to_gguf.py (general.type = adapter, adapter.type = lora,
adapter.lora.alpha, "<name>.weight.lora_a" / ".lora_b"), src/llama-adapter.cpp (lora_a ne [in, r], lora_b ne
[r, out], scale alpha / r with r = lora_b's ne[0]), convert_hf_to_gguf.py (LlamaModel.permute of q/k rows).
"""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from _tiny import tiny_model_folder
from conftest import tiny_llama
from lorakit import LoRAConfig, inject, load_adapter, merge, read_adapter, save_adapter, unload
from lorakit.app import cli
from lorakit.app.gguf_adapter import export_gguf_adapter, import_gguf_adapter
from lorakit.app.models import default_gguf
from lorakit.app.rope_layout import to_interleaved
from lorakit.errors import AdapterLoadError, CLIError

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_HEADS, N_KV = 4, 2  # tiny_llama's


def interleave_by_hand(w, n_heads):
    """llama.cpp's q/k row order written index by index: per head of d rows, GGUF row 2j + t = HF row t*d/2 + j."""
    d = w.shape[0] // n_heads
    return w[[h * d + t * (d // 2) + j for h in range(n_heads) for j in range(d // 2) for t in range(2)]]


def tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]), t.tensor_type


def field(reader, key):
    return reader.fields[key].contents()


# --- the permutation, established on the default model's own GGUF ------------------------------------


def test_default_gguf_q_k_rows_are_the_interleaved_order_of_what_transformers_loaded():
    from safetensors import safe_open

    from lorakit.app.models import _gguf_cache_dir, load_model

    cached = _gguf_cache_dir(default_gguf()) / "model.safetensors"
    if not cached.is_file():
        load_model()  # transformers dequantises the GGUF (about 40 s once) and lorakit caches the result
    reader = GGUFReader(default_gguf())
    heads = {"attn_q": field(reader, "llama.attention.head_count"),
             "attn_k": field(reader, "llama.attention.head_count_kv")}
    with safe_open(cached, "pt") as f:
        for gname, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            for layer in (0, 29):
                loaded = f.get_tensor(f"model.layers.{layer}.self_attn.{hf}.weight")
                g, _ = tensor(reader, f"blk.{layer}.{gname}.weight")
                g = torch.from_numpy(np.array(g))
                assert not torch.allclose(loaded, g)  # the two orders differ
                assert torch.allclose(interleave_by_hand(loaded, heads[gname]), g, atol=1e-6)
                assert torch.equal(to_interleaved(loaded, heads[gname]), interleave_by_hand(loaded, heads[gname]))


# --- adapters ------------------------------------------------------------------------------------------


def make_adapter(tmp_path, **cfg):
    """A random adapter on tiny_llama saved in PEFT format, and a base folder holding its config.json."""
    base = tmp_path / "base"
    model = tiny_llama()
    model.config.save_pretrained(base)
    inject(model, LoRAConfig(target_modules=ALL7, init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **cfg}))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", base


@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True},
                                 {"alpha_pattern": {"v_proj": 3.0}, "rank_pattern": {"down_proj": 2}}])
def test_exported_adapter_holds_the_permuted_deltas(tmp_path, cfg):
    adapter, base = make_adapter(tmp_path, **cfg)
    out = export_gguf_adapter(str(adapter), str(tmp_path / "a.gguf"), base_model=str(base))
    r = GGUFReader(out)
    assert field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
    assert field(r, "general.architecture") == "llama" and field(r, "adapter.lora.alpha") == 8.0
    config, tensors = read_adapter(adapter)
    assert len(r.tensors) == 2 * 2 * 7
    for layer in (0, 1):
        for hf, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down")]:
            key = f"base_model.model.model.layers.{layer}.{hf}"
            a, b = tensors[key + ".lora_A.weight"].double(), tensors[key + ".lora_B.weight"].double()
            rank = a.shape[0]
            alpha = 3.0 if (hf.endswith("v_proj") and cfg.get("alpha_pattern")) else 8.0
            s = alpha / rank ** 0.5 if cfg.get("use_rslora") else alpha / rank
            want = s * b @ a  # PEFT's delta, by hand
            if hf.endswith("q_proj"):
                want = interleave_by_hand(want, N_HEADS)
            elif hf.endswith("k_proj"):
                want = interleave_by_hand(want, N_KV)
            ga, _ = tensor(r, f"blk.{layer}.{g}.weight.lora_a")
            gb, _ = tensor(r, f"blk.{layer}.{g}.weight.lora_b")
            assert ga.shape == (rank, a.shape[1]) and gb.shape == (b.shape[0], rank)
            # llama.cpp: alpha / r, r from lora_b
            got = 8.0 / gb.shape[1] * torch.from_numpy(np.array(gb)).double() @ torch.from_numpy(np.array(ga)).double()
            assert (got - want).abs().max() < 1e-5, (layer, hf)


def test_export_types_and_round_trip(tmp_path, ids):
    adapter, base = make_adapter(tmp_path)
    f16 = GGUFReader(export_gguf_adapter(str(adapter), str(tmp_path / "h.gguf"), "f16", str(base)))
    assert {t.tensor_type for t in f16.tensors} == {GGMLQuantizationType.F16}
    q8 = GGUFReader(export_gguf_adapter(str(adapter), str(tmp_path / "q.gguf"), "q8_0", str(base)))
    types = {t.name: t.tensor_type for t in q8.tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == GGMLQuantizationType.Q8_0  # rows of 32: whole blocks
    assert types["blk.0.attn_q.weight.lora_b"] == GGMLQuantizationType.F16  # rows of r = 4: f16 fallback
    with pytest.raises(CLIError, match="already exists"):
        export_gguf_adapter(str(adapter), str(tmp_path / "q.gguf"), "q8_0", str(base))

    export_gguf_adapter(str(adapter), str(tmp_path / "a.gguf"), "f32", str(base))
    back = import_gguf_adapter(str(tmp_path / "a.gguf"), str(tmp_path / "back"), str(base))
    c0, t0 = read_adapter(adapter)
    c1, t1 = read_adapter(back)
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert (c1.r, c1.lora_alpha) == (c0.r, c0.lora_alpha)


def test_round_trip_of_rslora_and_patterns_keeps_outputs(tmp_path, ids):
    adapter, base = make_adapter(tmp_path, use_rslora=True, rank_pattern={"down_proj": 2},
                                 alpha_pattern={"v_proj": 3.0})
    export_gguf_adapter(str(adapter), str(tmp_path / "a.gguf"), "f32", str(base))
    back = import_gguf_adapter(str(tmp_path / "a.gguf"), str(tmp_path / "back"), str(base))
    with torch.no_grad():
        want = load_adapter(tiny_llama(), adapter)(ids).logits
        got = load_adapter(tiny_llama(), back)(ids).logits
    assert (want - got).abs().max() < 1e-5


def test_export_refusals(tmp_path):
    adapter, base = make_adapter(tmp_path, use_dora=True)
    with pytest.raises(AdapterLoadError, match="DoRA"):
        export_gguf_adapter(str(adapter), str(tmp_path / "a.gguf"), base_model=str(base))
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(AdapterLoadError, match="general.type='model'"):
        import_gguf_adapter(str(default_gguf()), str(tmp_path / "x"), str(base))
    adapter, _ = make_adapter(tmp_path / "plain")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 4, "n_layer": 2}))
    from lorakit.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="describes a 'gpt2' model .*: not a Llama-style base"):  # named no arch
        export_gguf_adapter(str(adapter), str(tmp_path / "b.gguf"), base_model=str(gpt2))
    with pytest.raises(CLIError, match="is a folder; --output names the .gguf file"):  # named a temporary file
        export_gguf_adapter(str(adapter), str(gpt2), base_model=str(tmp_path / "plain" / "base"), overwrite=True)
    assert (gpt2 / "config.json").is_file()


def test_import_names_tensors_it_cannot_hold(tmp_path):
    import gguf

    _, base = make_adapter(tmp_path)
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((32, 4), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(AdapterLoadError, match="'blk.0.attn_norm.weight' is not a lora_a / lora_b pair"):
        import_gguf_adapter(str(tmp_path / "x.gguf"), str(tmp_path / "back"), str(base))
    assert not (tmp_path / "back").exists()


def test_cli_export_and_convert_back(tmp_path, capsys):
    adapter, base = make_adapter(tmp_path)
    assert cli.main(["export", "--adapter", str(adapter), "--format", "gguf", "--output", str(tmp_path / "a.gguf"),
                     "--base-model", str(base)]) == 0
    assert cli.main(["convert", "--from", "gguf", str(tmp_path / "a.gguf"), "--output", str(tmp_path / "back"),
                     "--base-model", str(base)]) == 0
    assert cli.main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "a.gguf"),
                     "--base-model", str(base)]) == 1
    assert "already exists" in capsys.readouterr().err
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    assert cli.main(["export", "--adapter", str(adapter), "--output", str(weights), "--base-model", str(base),
                     "--overwrite"]) == 1  # wrote GGUF bytes over the adapter it read
    assert "refusing to overwrite" in capsys.readouterr().err and weights.read_bytes() == before
    assert cli.main(["export", "--adapter", str(adapter), "--output", str(adapter / "a.gguf"),
                     "--base-model", str(base)]) == 0  # a new file beside the input is fine


def test_merge_refuses_outputs_over_the_base_model_it_read(tmp_path, capsys):
    """Without a lorakit.json the base came from adapter_config.json and was not guarded: ``merge --output
    BASE_PARENT --overwrite`` removed the base model, and ``--format gguf --output BASE/model.safetensors``
    overwrote its weights."""
    folder = tiny_model_folder(tmp_path / "parent" / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=str(folder)))
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in folder.iterdir())
    for extra in (["--output", str(tmp_path / "parent")], ["--output", str(folder)],
                  ["--format", "gguf", "--output", str(folder / "model.safetensors")]):
        assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--overwrite", *extra]) == 1, extra
        assert "refusing to" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == files
    AutoModelForCausalLM.from_pretrained(folder)  # still loads


# --- merged models -------------------------------------------------------------------------------------


def saved_adapter(root, targets, seed: int, scale: float):
    """A tiny model folder under ``root`` and a random adapter on ``targets`` saved in ``root / "adapter"``
    (its lorakit.json naming that base): ``(model folder, the adapted model)``."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_folder(root / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * scale)
    save_adapter(model, root / "adapter")
    (root / "adapter" / "lorakit.json").write_text(json.dumps({"base_model": str(folder)}))
    return folder, model


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    _, model = saved_adapter(root, ALL7, 4, 0.2)
    merge(model)
    return root, unload(model, merge=True).eval()


@pytest.mark.parametrize("outtype, tol", [("f32", 1e-4), ("f16", 5e-2)])
def test_merged_gguf_loads_in_transformers_with_equal_logits(tiny_adapter, outtype, tol, capsys):
    from transformers import AutoModelForCausalLM

    root, merged = tiny_adapter
    out = root / f"merged-{outtype}.gguf"
    assert cli.main(["merge", "--adapter", str(root / "adapter"), "--output", str(out), "--format", "gguf",
                     "--outtype", outtype, "--overwrite"]) == 0
    r = GGUFReader(out)
    assert field(r, "general.architecture") == "llama" and field(r, "llama.attention.head_count_kv") == 2
    assert "output.weight" not in {t.name for t in r.tensors}  # tied head: llama.cpp reuses token_embd
    loaded = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        diff = (loaded(ids).logits - merged(ids).logits).abs().max()
    assert diff < tol


def test_merged_gguf_q8_0_types(tiny_adapter):
    root, _ = tiny_adapter
    out = root / "merged-q8.gguf"
    assert cli.main(["merge", "--adapter", str(root / "adapter"), "--output", str(out), "--format", "gguf",
                     "--outtype", "q8_0"]) == 0
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert cli.main(["merge", "--adapter", str(root / "adapter"), "--output", str(out), "--format", "gguf"]) == 1
    assert cli.main(["merge", "--adapter", str(root / "adapter"), "--output", str(root / "m"), "--outtype", "q8_0"]) == 2


def test_merging_an_adapter_on_a_tied_embedding_writes_the_head_apart(tmp_path, capsys):
    """An adapter on a tied input embedding, merged: the head keeps the base embedding. The GGUF held no
    ``output.weight``, so llama.cpp used the merged embedding as its head (logits 25.8 off), and the folder's
    config still said ``tie_word_embeddings``. Expected: PEFT's unmerged outputs, from both files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model = saved_adapter(tmp_path, ["embed_tokens", "q_proj"], 5, 0.3)
    assert model.config.tie_word_embeddings
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = peft(ids).logits
    base_embedding = AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight.detach()

    out = tmp_path / "merged.gguf"
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(out), "--format", "gguf",
                     "--outtype", "f32"]) == 0
    head, _ = tensor(GGUFReader(out), "output.weight")
    torch.testing.assert_close(torch.from_numpy(np.asarray(head)), base_embedding, rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=str(out), dtype=torch.float32).eval()
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        for got in (loaded(ids).logits, plain(ids).logits):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
