import pytest
import torch

import lorakit
from lorakit import AdapterExistsError, LoRAConfig, LoRALayer, TargetModuleError, inject, trainable_parameters
from conftest import tiny_llama, tiny_mlp


def _wrapped(model):
    return sorted(name for name, _ in lorakit.lora_layers(model))


def _expected_trainable(model, names, r):
    """Sum of r * (in + out) over the adapted layers, from the base shapes."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules() if n in names)


def test_default_targets_attention_and_exact_counts(llama):
    total_before = sum(p.numel() for p in llama.parameters())
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    want = _expected_trainable(llama, expected, 8)
    assert inject(llama, LoRAConfig()) is llama
    assert _wrapped(llama) == sorted(expected)
    trainable, total = trainable_parameters(llama)
    # q,o: 32->32; k,v: 32->16 (2 kv heads of 8) => 8*(64+64+48+48) per layer, 2 layers
    assert trainable == want == 2 * 8 * (64 + 64 + 48 + 48)
    assert total == total_before + trainable
    assert all("lora_" in n for n, p in llama.named_parameters() if p.requires_grad)


def test_inject_freezes_everything_it_did_not_create():
    model = tiny_mlp()
    inject(model, LoRAConfig(r=2, target_modules=["0"]))
    assert trainable_parameters(model)[0] == 2 * (6 + 10)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_entries_match_full_names_or_dotted_suffixes(llama):
    inject(llama, LoRAConfig(target_modules=["model.layers.0.self_attn.q_proj", "mlp.down_proj"]))
    assert _wrapped(llama) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    ]


def test_regex_is_a_full_match(llama):
    inject(llama, LoRAConfig(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    assert _wrapped(llama) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(TargetModuleError):
        inject(tiny_llama(), LoRAConfig(target_modules="q_proj"))  # full match: no module is named just q_proj


def test_all_linear_skips_the_output_head(llama):
    inject(llama, LoRAConfig(target_modules="all-linear"))
    assert len(_wrapped(llama)) == 14 and "lm_head" not in _wrapped(llama)


def test_layers_to_transform_and_patterns(llama):
    cfg = LoRAConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 12},
    )
    inject(llama, cfg)
    assert _wrapped(llama) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    q, v = llama.model.layers[1].self_attn.q_proj, llama.model.layers[1].self_attn.v_proj
    assert (q.adapter("default").r, q.adapter("default").scaling) == (4, 12 / 4)
    assert (v.adapter("default").r, v.adapter("default").scaling) == (2, 16 / 2)
    assert trainable_parameters(llama)[0] == 4 * (32 + 32) + 2 * (32 + 16)


def test_unmatched_entry_is_an_error_listing_linear_names(llama):
    before = _wrapped(llama)
    with pytest.raises(TargetModuleError, match="'qkv'.*available Linear modules include: .*q_proj") as e:
        inject(llama, LoRAConfig(target_modules=["q_proj", "qkv"]))
    assert isinstance(e.value, ValueError)
    assert _wrapped(llama) == before and all(p.requires_grad for p in llama.parameters())


def test_unsupported_module_type_is_named(llama):
    with pytest.raises(TargetModuleError, match="model.layers.0.input_layernorm.*LlamaRMSNorm"):
        inject(llama, LoRAConfig(target_modules=["input_layernorm"]))
    with pytest.raises(TargetModuleError, match="model.layers.0.mlp.*LlamaMLP"):
        inject(llama, LoRAConfig(target_modules=["mlp"]))


def test_injecting_twice_under_one_name_is_an_error(llama, ids):
    inject(llama, LoRAConfig(init_lora_weights=False))
    out = llama(ids).logits
    with pytest.raises(AdapterExistsError, match="default"):
        inject(llama, LoRAConfig(init_lora_weights=False))
    torch.testing.assert_close(llama(ids).logits, out, rtol=0, atol=0)


def test_matching_never_reaches_lora_submodules(llama):
    inject(llama, LoRAConfig(target_modules=r".*q_proj.*"))
    inject(llama, LoRAConfig(target_modules=r".*q_proj.*"), adapter_name="second")
    layers = dict(lorakit.lora_layers(llama))
    assert sorted(layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(isinstance(m.base_layer, torch.nn.Linear) and not isinstance(m.base_layer, LoRALayer) for m in layers.values())
    assert all(m.adapter_names == ["default", "second"] for m in layers.values())


def test_an_adapter_name_is_unique_in_the_model_even_on_other_layers(llama):
    inject(llama, LoRAConfig(r=4, target_modules=["q_proj"]), "a")
    before = {n: p.clone() for n, p in llama.state_dict().items()}
    with pytest.raises(AdapterExistsError, match="'a' already exists in the model"):
        inject(llama, LoRAConfig(r=2, target_modules=["k_proj"]), "a")
    assert llama.lora_state.configs["a"].r == 4
    assert llama.state_dict().keys() == before.keys()


@pytest.mark.parametrize("exclude", [["o_proj"], ["layers.1.self_attn.v_proj", "down_proj"], r".*\.1\..*"])
def test_exclude_modules_selects_what_peft_selects(exclude, tmp_path):
    """exclude_modules with all-linear (PEFT's usual pairing): the same modules as PEFT, and its file loads."""
    peft = pytest.importorskip("peft")
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=exclude, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg)).eval()
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    ours = tiny_llama()
    inject(ours, LoRAConfig(**cfg))
    assert {n for n, _ in lorakit.lora_layers(ours)} == peft_names and peft_names
    theirs.save_pretrained(tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_excluding_every_target_is_an_error():
    with pytest.raises(TargetModuleError, match="once exclude_modules"):
        inject(tiny_llama(), LoRAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_adapters_added_in_eval_mode_drop_nothing_until_train():
    """A new LoRA layer takes its base module's mode and a new adapter its layer's: adapters with
    lora_dropout injected into a model in eval mode (a server loading one at run time) give the eval
    output, W x + b + s·B·A·x with no dropout, computed by hand in float64; model.train() turns it on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5)).double().eval()
    w, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    inject(model, LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False), "a")
    inject(model, LoRAConfig(r=3, lora_alpha=3, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False), "b")
    layer = model[0]
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 6, dtype=torch.float64)
    for name, s in (("a", 4 / 2), ("b", 3 / 3)):
        lorakit.set_adapter(model, name)
        a, b = (t.detach() for t in layer.lora_weights(name))
        torch.testing.assert_close(model(x), x @ w.T + bias + s * (x @ a.T) @ b.T, rtol=0, atol=1e-12)
    model.train()
    assert not torch.equal(model(x), model(x))  # p = 0.5 on the bypass input
