"""target_parameters: LoRA on 2-D / 3-D nn.Parameter weights (MoE expert stacks), PEFT's ParamWrapper
layout and keys, checked by hand in float64, against PEFT, and for bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterLoadError, ConfigError, LoRAConfig, MixedBatchError, TargetModuleError
from lorakit.param_wrapper import ParamWrapper
from _parity_models import MoE, floats, seeded

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def config(params=PARAMS, **kw):
    kw = {"r": 2, "lora_alpha": 4, "target_modules": [], "init_lora_weights": False, **kw}
    return LoRAConfig(target_parameters=list(params), **kw)


@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_s_B_e_A_e_by_hand_in_float64(transposed):
    """Expert e's delta is s * B[:, e::E] @ A[e*r:(e+1)*r] (PEFT's reshape of (out, r*E) and (r*E, in)),
    stored (E, out, in), or (E, in, out) with is_transposed; forward and merge both use it."""
    model = seeded(MoE, transposed=transposed).double()
    base = {k: v.clone() for k, v in model.experts.named_parameters()}
    lorakit.inject(model, config())
    wrapper = model.experts
    x = floats(2, 5, 6).double()
    expected = {}
    for pname, w in base.items():
        ad = wrapper.adapter("default", pname)
        a, b, e, r = ad.lora_A.detach(), ad.lora_B.detach(), w.shape[0], 2
        deltas = [2.0 * b[:, k::e] @ a[k * r:(k + 1) * r] for k in range(e)]  # s = 4 / 2; each (out, in)
        expected[pname] = w + torch.stack([d.T if transposed else d for d in deltas])
    want = torch.func.functional_call(seeded(MoE, transposed=transposed).double(), {
        f"experts.{k}": v for k, v in expected.items()}, (x,))
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    lorakit.merge(model)
    for pname, w in expected.items():
        torch.testing.assert_close(getattr(wrapper.base_layer, pname), w, rtol=0, atol=1e-14)
    lorakit.unmerge(model)
    assert all(torch.equal(getattr(wrapper.base_layer, k), v) for k, v in base.items())


def test_a_2d_parameter_is_one_expert_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    w = model[0].weight.detach().clone()
    lorakit.inject(model, config(["0.weight"], init_lora_weights=True))
    ad = model[0].adapter("default", "weight")
    assert ad.lora_A.shape == (2, 4) and ad.lora_B.shape == (3, 2) and not ad.lora_B.any()
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    assert ad.lora_B.grad is not None and ad.lora_B.grad.abs().sum() > 0 and model[0].base_layer.weight.grad is None
    with torch.no_grad():
        ad.lora_B.normal_()
    torch.testing.assert_close(model(x), x @ (w + 2.0 * ad.lora_B @ ad.lora_A).T + model[0].bias, rtol=0, atol=1e-6)


def test_keys_nest_one_base_layer_per_later_parameter(tmp_path):
    model = lorakit.inject(seeded(MoE), config())
    lorakit.save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes == {  # gate_up_proj (3, 10, 6) is registered first: the inner wrapper in PEFT
        "base_model.model.experts.base_layer.lora_A.weight": (6, 6),
        "base_model.model.experts.base_layer.lora_B.weight": (10, 6),
        "base_model.model.experts.lora_A.weight": (6, 5),
        "base_model.model.experts.lora_B.weight": (6, 6),
    }


def test_two_adapters_add_and_switch():
    model = seeded(MoE)
    lorakit.inject(model, config(), "a")
    lorakit.inject(model, config(["down_proj"]), "b")
    x = floats(2, 5, 6)
    outs = {}
    for n in ("a", "b"):
        lorakit.set_adapter(model, n)
        outs[n] = model(x)
    lorakit.set_adapter(model, ["a", "b"])
    both = model(x)
    assert not torch.allclose(both, outs["a"]) and not torch.allclose(both, outs["b"])
    lorakit.merge(model)
    torch.testing.assert_close(model(x), both, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(x), seeded(MoE)(x), rtol=0, atol=0)


def test_mixed_batch_and_weighted_combination_are_refused_naming_the_option():
    model = seeded(MoE)
    lorakit.inject(model, config(), "a")
    lorakit.inject(model, config(), "b")
    with pytest.raises(MixedBatchError, match="target_parameters"):
        with lorakit.mixed_batch(model, ["a", "b"]):
            pass
    with pytest.raises(ConfigError, match="target_parameters"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_dropout_is_refused():
    with pytest.raises(ConfigError, match="target_parameters.*lora_dropout=0"):
        config(lora_dropout=0.1)
    with pytest.raises(ConfigError, match="target_parameters must be a list"):
        LoRAConfig(target_parameters="experts.down_proj")


def _snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg, message", [
    (config(["experts.up_proj"]), r"module 'experts' has no attribute 'up_proj' \(its own Parameters: gate_up_proj, "
                                  r"down_proj\)"),
    (config(["experts.expert_bias"]), r"experts.expert_bias is a Tensor, not an nn.Parameter"),
    (config(["router.bias"]), r"'router.bias' has shape \[3\]; only 2-D"),
    (config(["nothing.weight"]), "matches no Parameter of MoE"),
    (config(["out.weight"], target_modules=["out"]), "both target_modules and target_parameters"),
])
def test_bad_targets_name_what_is_there_and_change_nothing(cfg, message):
    model = seeded(MoE)
    snap = _snapshot(model)
    with pytest.raises(TargetModuleError, match=message):
        lorakit.inject(model, cfg)
    after = _snapshot(model)
    assert after[0] == snap[0] and all(torch.equal(after[1][k], snap[1][k]) for k in snap[1])


def test_a_file_with_a_wrong_expert_shape_is_refused_and_the_model_is_unchanged(tmp_path):
    lorakit.save_adapter(lorakit.inject(seeded(MoE), config()), tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.experts.lora_A.weight"] = torch.zeros(4, 5)
    save_file(t, f)
    fresh = seeded(MoE)
    snap = _snapshot(fresh)
    with pytest.raises(AdapterLoadError, match=r"experts.lora_A.weight' has shape \[4, 5\] in the file but the model "
                                               r"needs \[6, 5\]"):
        lorakit.load_adapter(fresh, tmp_path)
    after = _snapshot(fresh)
    assert after[0] == snap[0] and all(torch.equal(after[1][k], snap[1][k]) for k in snap[1])


def test_unload_leaves_plain_module_with_merged_experts():
    model = lorakit.inject(seeded(MoE), config())
    x = floats(2, 5, 6)
    expected = model(x).detach()
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, ParamWrapper) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)
