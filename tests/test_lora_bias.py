"""PEFT's ``lora_bias=True``: B has a bias, h = W x + b + s·(B A x + b_B); merging adds s·b_B to the base
bias. Checked by hand in float64 and against PEFT both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import ConfigError, LoRAConfig, MergeStateError, TargetModuleError

from test_dora import MLP, randomize_
from test_families import FAMILIES, TOL, out, peft_trained_and_loaded, snapshot, train

peft = pytest.importorskip("peft")

# family -> targets with a bias-capable layer type (no nn.Embedding: PEFT refuses lora_bias there)
TARGETS = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"],
           "cnn": ["conv1", "conv2"]}


def test_forward_and_merge_equal_the_hand_formula_in_float64():
    torch.manual_seed(0)
    model = MLP(torch.float64)
    w0, b0 = model.lin0.weight.detach().clone(), model.lin0.bias.detach().clone()
    lorakit.inject(model, LoRAConfig(r=3, lora_alpha=6, target_modules=["lin0"], lora_bias=True))
    ad = model.lin0.adapter("default")
    assert torch.equal(ad.lora_B_bias, torch.zeros(20, dtype=torch.float64))  # starts at the base output
    assert "lin0.adapters.default.lora_B_bias" in {n for n, p in model.named_parameters() if p.requires_grad}
    randomize_(model)
    a, b, c = ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_B_bias.detach()
    x = torch.randn(5, 10, dtype=torch.float64)
    want = x @ w0.T + b0 + 2.0 * (x @ a.T @ b.T + c)
    torch.testing.assert_close(model.lin0(x), want, rtol=0, atol=1e-12)
    before = model(x).detach()
    lorakit.merge(model)
    torch.testing.assert_close(model.lin0.base_layer.bias, b0 + 2.0 * c, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    lorakit.unmerge(model)
    assert torch.equal(model.lin0.base_layer.bias, b0) and torch.equal(model.lin0.base_layer.weight, w0)


def _config(name, lk=True, **kw):
    _, _, _, saved, task, _ = FAMILIES[name]
    args = dict(r=2, lora_alpha=4, target_modules=TARGETS[name], modules_to_save=saved and list(saved),
                task_type=task, lora_bias=True, **kw)
    return LoRAConfig(**args) if lk else peft.LoraConfig(fan_in_fan_out=(name == "gpt2"), **args)


@pytest.mark.parametrize("name", list(TARGETS))
def test_peft_lora_bias_adapter_loads_in_lorakit_and_back(name, tmp_path):
    model, x, expected = peft_trained_and_loaded(name, _config(name, lk=False, init_lora_weights=False), tmp_path / "p")
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    lorakit.save_adapter(model, tmp_path / "again")
    a, b = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert any(k.endswith("lora_B.bias") for k in b)


@pytest.mark.parametrize("name", list(TARGETS))
def test_lorakit_lora_bias_adapter_loads_in_peft_and_merges(name, tmp_path):
    build, x, *_ = FAMILIES[name]
    model = build()
    lorakit.inject(model, _config(name))
    train(model, x, [p for p in model.parameters() if p.requires_grad])
    expected = out(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "a")
    torch.testing.assert_close(out(pm, x), expected, atol=TOL, rtol=0)
    if name == "llama":  # Llama's projections have no bias: nothing to merge b_B into
        with pytest.raises(MergeStateError, match="no bias"):
            lorakit.merge(model)
        torch.testing.assert_close(out(model, x), expected, atol=0, rtol=0)  # unchanged
        return
    before = snapshot(model)
    lorakit.merge(model)
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    lorakit.unmerge(model)
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mixed_batch_adds_each_rows_bias_and_none_rows_get_the_base(tmp_path):
    torch.manual_seed(1)
    model = MLP(torch.float64)
    base = copy.deepcopy(model)
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], lora_bias=True), "b")
    lorakit.inject(model, LoRAConfig(r=3, lora_alpha=3, target_modules=["lin0", "lin1"]), "plain")
    randomize_(model)
    model.eval()
    x = torch.randn(4, 3, 10, dtype=torch.float64)

    def by_hand(name, xi):
        h = xi
        for lin in ("lin0", "lin1"):
            layer = getattr(model, lin)
            ad = layer.adapter(name)
            w, bias = getattr(base, lin).weight.detach(), getattr(base, lin).bias.detach()
            h_new = h @ w.T + bias + ad.scaling * (h @ ad.lora_A.detach().T @ ad.lora_B.detach().T)
            if ad.lora_B_bias is not None:
                h_new = h_new + ad.scaling * ad.lora_B_bias.detach()
            h = torch.relu(h_new) if lin == "lin0" else h_new
        return h

    rows = ["b", "plain", None, "b"]
    with torch.no_grad():
        for grad in (False, True):
            with torch.set_grad_enabled(grad), lorakit.mixed_batch(model, rows):
                got = model(x)
            want = torch.stack([by_hand(n, x[i]) if n else base(x[i]) for i, n in enumerate(rows)])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_refusals_name_the_option():
    with pytest.raises(ConfigError, match="lora_bias=True does not combine with use_dora=True"):
        LoRAConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights='gaussian'"):
        LoRAConfig(lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(ConfigError, match="lora_bias must be True or False"):
        LoRAConfig(lora_bias=1)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match=r"'0' is a Embedding, which takes no lora_bias"):
        lorakit.inject(model, LoRAConfig(target_modules=["0", "1"], lora_bias=True))
    assert not lorakit.list_adapters(model) and snapshot(model).keys() == before.keys()
    lorakit.inject(model, LoRAConfig(target_modules=["1"], lora_bias=True), "b")
    lorakit.inject(model, LoRAConfig(target_modules=["1"]), "p")
    with pytest.raises(ConfigError, match="'b' has lora_bias=True"):
        lorakit.add_weighted_adapter(model, ["b", "p"], [1.0, 1.0], "sum", combination_type="cat")


def test_merge_and_unload_refuse_before_changing_anything_naming_the_module():
    """One layer can merge its lora_bias, the next has no bias: merge and unload(merge=True) refuse up front."""
    model = nn.Sequential()
    model.add_module("a", nn.Linear(4, 4))
    model.add_module("b", nn.Linear(4, 4, bias=False))
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["a", "b"], lora_bias=True, init_lora_weights=False))
    before = snapshot(model)
    for call in (lorakit.merge, lambda m: lorakit.unload(m, merge=True)):
        with pytest.raises(MergeStateError, match=r"'b' \(Linear\) has no bias"):
            call(model)
        after = snapshot(model)
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert model.a.merged_adapters == [] and model.b.merged_adapters == []
    assert isinstance(model.a, lorakit.LoRALinear) and isinstance(model.b, lorakit.LoRALinear)
