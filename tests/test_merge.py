import pytest
import torch

import lorakit
from lorakit import LoRAConfig, LoRALayer, inject, merge, unload, unmerge
from conftest import tiny_llama

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(dtype=torch.float32, rslora=False):
    model = tiny_llama(dtype=dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False, use_rslora=rslora))
    return model, original


def _base_weights(model):
    return {n: layer.base_layer.weight for n, layer in lorakit.lora_layers(model)}


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_output_equals_unmerged(ids, rslora):
    model, _ = _adapted(rslora=rslora)
    out = model(ids).logits
    merge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_second_merge_adds_nothing_and_unmerge_on_unmerged_changes_nothing(ids):
    model, original = _adapted()
    unmerge(model)
    assert all(torch.equal(w, original[f"{n}.weight"]) for n, w in _base_weights(model).items())
    merge(model)
    once = {n: w.clone() for n, w in _base_weights(model).items()}
    merge(model)
    assert all(torch.equal(w, once[n]) for n, w in _base_weights(model).items())
    unmerge(model)
    assert all(torch.equal(w, original[f"{n}.weight"]) for n, w in _base_weights(model).items())


def test_100_bf16_merge_unmerge_cycles_are_bitwise_exact(ids):
    model, original = _adapted(dtype=torch.bfloat16)
    for _ in range(100):
        merge(model)
        unmerge(model)
    for n, w in _base_weights(model).items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, original[f"{n}.weight"]), n


def test_unload_merge_gives_plain_modules_with_merged_weights(ids):
    model, original = _adapted()
    out = model(ids).logits
    deltas = {
        n: 8 / 4 * (layer.lora_weights("default")[1].double() @ layer.lora_weights("default")[0].double())
        for n, layer in lorakit.lora_layers(model)
    }
    plain = unload(model, merge=True)
    assert plain is model
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    assert not any("lora" in n for n, _ in plain.named_parameters())
    state = plain.state_dict()
    assert list(state) == list(original)
    for n, d in deltas.items():
        torch.testing.assert_close(state[f"{n}.weight"].double(), original[f"{n}.weight"].double() + d, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_restores_the_original_bitwise():
    model, original = _adapted()
    merge(model)
    state = unload(model, merge=False).state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_float64_model_merges_in_float64(tmp_path):
    """PEFT's 10 -> 20 -> 2 MLP in float64, adapter on lin0: the merged weight is W + s·B·A computed in
    float64 (no float32 rounding), and merged outputs equal unmerged ones to float64 precision."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2)).double()
    lorakit.inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    a, b = (t.detach() for t in layer.lora_weights("default"))
    assert a.dtype == b.dtype == torch.float64
    expected = layer.base_layer.weight.detach().clone() + 8 / 4 * (b @ a)
    x = torch.randn(7, 10, dtype=torch.float64)
    unmerged = model(x)
    lorakit.merge(model)
    assert layer.base_layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12)


@pytest.mark.parametrize("targets,merged,tied", [(["embed_tokens"], True, False), (["lm_head"], True, False),
                                                 (["q_proj"], True, True), (["embed_tokens"], False, True)])
def test_unload_of_a_tied_pair_says_in_the_config_whether_they_still_share_a_weight(targets, merged, tied):
    """A merged adapter on a tied embedding (or head) leaves the other with the base weight; the config said
    ``tie_word_embeddings: true`` all the same, so a saved checkpoint (and llama.cpp's converter, which reads
    it) gave the head the merged rows. Unmerged, or an adapter elsewhere, the pair stays tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    inject(model, LoRAConfig(r=2, target_modules=targets, init_lora_weights=False))
    unload(model, merge=merged)
    shared = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert shared is tied and model.config.tie_word_embeddings is tied
