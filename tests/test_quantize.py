"""LoRA on a quantised base (QLoRA): ``quantize_base`` (bitsandbytes NF4 / int8), float32 adapters that
alone train, forward and gradients against float64 sums over dequant(W), PEFT parity both ways on the
same bitsandbytes base, merges refused until ``dequantize``, mixed batches, save / load.

bitsandbytes is imported at the top on purpose: CI installs it (the ``test`` extra), so a missing
library fails this module loudly instead of skipping it."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit import LoRAConfig, LoRAQuantLinear, QuantizedBaseError

KINDS = ["nf4", "int8"]
PROJ = ["q_proj", "v_proj", "down_proj"]


def bnb_layer(lin: nn.Linear, kind: str) -> nn.Module:
    """``lin`` quantised with bitsandbytes directly (the anchor's base): NF4 blocks of 64 without double
    quantisation, or int8 rows without outlier columns, as lorakit.quantize_base documents."""
    if kind == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                              compute_dtype=torch.float32, compress_statistics=False)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    q.support_avx512bf16_for_cpu = False  # bitsandbytes' bf16 eval layout on AVX512-BF16 CPUs (see qlinear)
    return q


def bnb_llama(kind: str, seed: int = 0, attention_bias: bool = False):
    """tiny_llama with every Linear but lm_head quantised by bitsandbytes directly, flagged for PEFT."""
    m = tiny_llama(seed, attention_bias=attention_bias)
    for name, mod in list(m.named_modules()):
        if type(mod) is nn.Linear and name != "lm_head":
            m.set_submodule(name, bnb_layer(mod, kind))
    setattr(m, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)  # PEFT's bnb dispatch
    return m


def dequant(layer) -> torch.Tensor:
    """dequant(W) by bitsandbytes' own functions, float64."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).double()
    scb = w.SCB if w.SCB is not None else layer.state.SCB  # bitsandbytes moves it to the state on a forward
    return w.data.double() * scb.double()[:, None] / 127


def trained(model, steps: int = 3, seed: int = 0):
    """A few SGD steps of the trainable parameters on a random next-token loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 7), generator=g)
        loss = nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_takes_float32_adapters_that_alone_train(kind):
    m = lorakit.quantize_base(tiny_llama(), kind)
    assert lorakit.quantization(m) == kind and type(m.lm_head) is nn.Linear  # head kept full precision
    lorakit.inject(m, LoRAConfig(r=4, target_modules="all-linear"))
    layers = dict(lorakit.lora_layers(m))
    assert len(layers) == 14 and all(type(l) is LoRAQuantLinear for l in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.base_layer.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if "lora_" in n)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # r·(in + out) per adapted module, summed by hand: 4 attention (32x32, kv 32->16) and 3 MLP (32<->48) per layer
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32)) + 4 * ((32 + 48) * 2 + (48 + 32))
    assert lorakit.trainable_parameters(m)[0] == 2 * per_layer


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients_match_float64_over_dequantized_weights(kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    model = nn.Sequential(bnb_layer(lin, kind))  # lorakit wraps what bitsandbytes built
    lorakit.inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    x = torch.randn(5, 64, requires_grad=True)
    out = model(x)
    out.pow(2).sum().backward()
    # float64 by hand: h = dequant(W) x + b + s·B A x, loss = sum h², dL/dh = 2h
    w, b = dequant(layer.base_layer), lin.bias.detach().double()
    a, bb = layer.adapter("default").lora_A.detach().double(), layer.adapter("default").lora_B.detach().double()
    s, x64 = 8 / 4, x.detach().double()
    h = x64 @ w.T + b + s * (x64 @ a.T) @ bb.T
    gh = 2 * h
    assert torch.allclose(out.double(), h, atol=1e-5)
    assert torch.allclose(x.grad.double(), gh @ (w + s * bb @ a), atol=1e-4)  # flows through the quantised base
    assert torch.allclose(layer.adapter("default").lora_B.grad.double(), s * gh.T @ (x64 @ a.T), atol=1e-4)
    assert torch.allclose(layer.adapter("default").lora_A.grad.double(), s * (gh @ bb).T @ x64, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_lorakit_adapter_on_quantized_base_loads_in_peft(kind, tmp_path):
    from peft import PeftModel

    ours = trained(lorakit.inject(lorakit.quantize_base(tiny_llama(), kind),
                                  LoRAConfig(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights=False)))
    lorakit.save_adapter(ours, tmp_path)
    base = bnb_llama(kind)
    for name, layer in lorakit.lora_layers(ours):  # the same quantised base on both sides
        assert torch.equal(dequant(layer.base_layer), dequant(base.get_submodule(name)))
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = peft_model(ids).logits, ours(ids).logits
    with lorakit.disable_adapters(ours), torch.no_grad():
        assert (ours(ids).logits - out).abs().max() > 1e-3  # the trained adapter changes the outputs
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)  # stated tolerance: 1e-5 absolute on the logits


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_on_quantized_base_loads_in_lorakit(kind, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(bnb_llama(kind), LoraConfig(r=4, lora_alpha=8, target_modules=PROJ,
                                                            init_lora_weights=False))
    trained(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(lorakit.quantize_base(tiny_llama(), kind), tmp_path)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=0)
    ours.train(), peft_model.train()  # bitsandbytes' training path too (int8: dequant + matmul)
    assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_base_with_biases_trains_as_with_peft(kind):
    """bitsandbytes returns a view when its layer has a bias (q/k/v/o here, as Qwen2's q/k/v), which autograd
    forbids changing in place: the same training steps as PEFT's (which adds out of place), adapters within 1e-5."""
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights="gaussian")
    ours = lorakit.inject(lorakit.quantize_base(tiny_llama(attention_bias=True), kind), LoRAConfig(**kw))
    theirs = get_peft_model(bnb_llama(kind, attention_bias=True), LoraConfig(**kw))
    assert ours.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    with torch.no_grad():  # the same starting adapter, B nonzero so that every factor gets a gradient
        for name, layer in lorakit.lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            ad = layer.adapter("default")
            ad.lora_B.normal_(generator=torch.Generator().manual_seed(1))
            peft_layer.lora_A["default"].weight.copy_(ad.lora_A)
            peft_layer.lora_B["default"].weight.copy_(ad.lora_B)
    trained(ours), trained(theirs)
    for name, layer in lorakit.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.adapter("default").lora_A, peft_layer.lora_A["default"].weight,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.adapter("default").lora_B, peft_layer.lora_B["default"].weight,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_until_dequantized_then_exact(kind):
    m = lorakit.quantize_base(tiny_llama(), kind)
    lorakit.inject(m, LoRAConfig(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights=False))
    m.train()  # int8's training path multiplies by dequant(W); its eval path is LLM.int8() (activations in int8)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids).logits
    for verb in (lorakit.merge, lambda model: lorakit.unload(model, merge=True)):
        with pytest.raises(QuantizedBaseError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*lorakit\.dequantize"):
            verb(m)
    with torch.no_grad():  # nothing changed
        assert torch.equal(m(ids).logits, before) and len(dict(lorakit.lora_layers(m))) == 6
    layer = m.get_submodule("model.layers.1.mlp.down_proj")
    w = dequant(layer.base_layer)
    a, b = (t.detach().double() for t in layer.lora_weights("default"))
    lorakit.dequantize(m)
    assert lorakit.quantization(m) is None and type(layer.base_layer) is nn.Linear
    assert layer.base_layer.weight.dtype == torch.float32 and torch.allclose(layer.base_layer.weight.double(), w, atol=0)
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, before, atol=1e-5)  # the quantised forward multiplies by dequant(W)
    merged = lorakit.unload(m, merge=True)
    lin = merged.get_submodule("model.layers.1.mlp.down_proj")
    assert type(lin) is nn.Linear and torch.allclose(lin.weight.double(), w + (8 / 4) * b @ a, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, before, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_and_set_adapter_on_quantized_base(kind):
    m = lorakit.quantize_base(tiny_llama(), kind)
    lorakit.inject(m, LoRAConfig(r=4, target_modules=PROJ, init_lora_weights=False), "a")
    lorakit.inject(m, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), "b")
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            lorakit.set_adapter(m, name)
            single[name] = m(ids).logits
        with lorakit.disable_adapters(m):
            single[None] = m(ids).logits
        with lorakit.mixed_batch(m, ["b", None, "a"]):
            mixed = m(ids).logits
    assert (single["a"] - single["b"]).abs().max() > 1e-3
    for row, name in enumerate(["b", None, "a"]):
        assert torch.allclose(mixed[row], single[name][row], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_on_quantized_base(kind, tmp_path):
    m = trained(lorakit.inject(lorakit.quantize_base(tiny_llama(), kind),
                               LoRAConfig(r=4, target_modules=PROJ, init_lora_weights=False)))
    lorakit.save_adapter(m, tmp_path)
    fresh = lorakit.load_adapter(lorakit.quantize_base(tiny_llama(), kind), tmp_path)
    for (n, l1), (_, l2) in zip(lorakit.lora_layers(m), lorakit.lora_layers(fresh)):
        assert all(torch.equal(t1, t2) for t1, t2 in zip(l1.lora_weights("default"), l2.lora_weights("default"))), n
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, fresh(ids).logits)


def test_quantize_base_refuses_bad_input_and_changes_nothing():
    m = tiny_llama()
    with pytest.raises(lorakit.ConfigError, match="one of nf4, int8, got 'nf3'"):
        lorakit.quantize_base(m, "nf3")
    with pytest.raises(lorakit.TargetModuleError, match="'q_prj' matches no module.*q_proj"):
        lorakit.quantize_base(m, "nf4", skip=["q_prj"])
    with pytest.raises(lorakit.TargetModuleError, match="no nn.Linear to quantise"):
        lorakit.quantize_base(nn.Sequential(nn.Linear(4, 4)), "nf4", skip=["0"])
    assert lorakit.quantization(m) is None
    lorakit.inject(m, LoRAConfig(r=2))
    with pytest.raises(QuantizedBaseError, match="before inject"):
        lorakit.quantize_base(m, "int8")
    assert lorakit.quantization(m) is None


def test_skip_keeps_modules_full_precision():
    m = lorakit.quantize_base(tiny_llama(), "nf4", skip=["down_proj", "model.layers.0.self_attn.q_proj"])
    kinds = {n: type(mod).__name__ for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert kinds["model.layers.0.self_attn.q_proj"] == kinds["model.layers.1.mlp.down_proj"] == "Linear"
    assert kinds["model.layers.1.self_attn.q_proj"] == "Linear4bit"
    assert sum(v == "Linear4bit" for v in kinds.values()) == 2 * 7 - 3
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)


def test_dora_on_a_quantized_base_is_refused_naming_the_module_and_nothing_changes():
    from lorakit import LoRAConfig, TargetModuleError, inject, list_adapters, quantize_base

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize_base(model, "nf4", skip=[])
    before = [type(m) for m in model]
    with pytest.raises(TargetModuleError, match=r"target module '0' has a quantised base.*DoRA"):
        inject(model, LoRAConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert [type(m) for m in model] == before and not list_adapters(model)


def two_linears(dtype2=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64).to(dtype2))


def unchanged(model: nn.Sequential, before: dict) -> bool:
    """Same module types (no quantised layer) and the same tensors, bit for bit."""
    after = model.state_dict()
    return (lorakit.quantization(model) is None and all(type(m) in (nn.Linear, nn.ReLU) for m in model)
            and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before))


@pytest.mark.parametrize("call, match", [
    (lambda m: lorakit.quantize_base("model", "nf4"), r"model must be a torch\.nn\.Module, got str"),
    (lambda m: lorakit.quantize_base(m, "nf4", skip=[0]), r"skip entries must be module names \(str\), got 0"),
    (lambda m: lorakit.quantize_base(m, "nf4", skip=42), r"skip must be a module name or a list of them, got int 42"),
    (lambda m: lorakit.quantize_base(m, "nf4", skip=[], compute_dtype="float16"),
     r"compute_dtype must be torch\.float16, torch\.bfloat16 or torch\.float32, got 'float16'"),
    (lambda m: lorakit.quantize_base(m, "nf4", skip=[], compute_dtype=torch.int8), r"compute_dtype .* got torch\.int8"),
])
def test_quantize_base_refuses_wrong_argument_types_naming_them(call, match):
    m = two_linears()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(lorakit.ConfigError, match=match):
        call(m)
    assert unchanged(m, before)


def test_skip_given_as_one_string_is_one_module_name():
    m = lorakit.quantize_base(two_linears(), "nf4", skip="2")  # not the characters of "2"
    assert type(m[0]) is bnb.nn.Linear4bit and type(m[2]) is nn.Linear
    with pytest.raises(lorakit.TargetModuleError, match=r"skip entry 'lin' matches no module"):
        lorakit.quantize_base(two_linears(), "nf4", skip="lin")


def test_nf4_refuses_a_float64_layer_before_quantising_any_naming_it():
    m = two_linears(torch.float64)  # bitsandbytes' 4-bit quantiser takes 16- and 32-bit floats only
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(QuantizedBaseError, match=r"quantise '2' to nf4: it holds a torch\.float64 weight.*float32"):
        lorakit.quantize_base(m, "nf4", skip=[])
    assert unchanged(m, before)  # layer '0' (float32) was not quantised either


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16"])
def test_dequantize_refuses_a_dtype_that_is_not_floating_and_changes_nothing(dtype):
    m = lorakit.quantize_base(two_linears(), "int8", skip=[])
    codes = m[0].weight.data.clone()
    with pytest.raises(lorakit.ConfigError, match=r"dtype must be a floating torch\.dtype, got " + repr(dtype)):
        lorakit.dequantize(m, dtype)
    assert type(m[0]) is bnb.nn.Linear8bitLt and torch.equal(m[0].weight.data, codes)


def test_skip_naming_a_module_keeps_the_linears_inside_it_full_precision():
    m = lorakit.quantize_base(tiny_llama(), "nf4", skip=["mlp", "model.layers.0"])
    full = {n for n, mod in m.named_modules() if type(mod) is nn.Linear}
    assert full == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")} | {
        f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {"lm_head"}


@pytest.mark.parametrize("layer, says", [(lambda: nn.Linear(64, 64, device="meta"), r"\(64, 64\) is on the meta device"),
                                         (lambda: nn.Linear(0, 64), r"\(64, 0\) is empty")])
def test_a_weight_that_cannot_be_quantised_is_refused_before_any_layer_changes(layer, says):
    for kind in KINDS:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), layer())
        first = m[0].weight.detach().clone()
        with pytest.raises(QuantizedBaseError, match=r"cannot quantise '2': its weight " + says):
            lorakit.quantize_base(m, kind, skip=[])
        assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear and torch.equal(m[0].weight, first)


def test_quantising_twice_says_so():
    m = lorakit.quantize_base(tiny_llama(), "nf4")
    with pytest.raises(lorakit.TargetModuleError, match=r"no nn.Linear to quantise.*already quantised \(nf4\)"):
        lorakit.quantize_base(m, "int8")


@pytest.mark.parametrize("kind", KINDS)
def test_modules_to_save_on_a_quantized_layer_is_refused_before_anything_changes(kind):
    m = lorakit.quantize_base(tiny_llama(), kind)
    types = [type(x) for x in m.modules()]
    with pytest.raises(lorakit.TargetModuleError, match=r"'q_proj' matches 'model.layers.0.self_attn.q_proj', whose "
                                                        r"parameter 'weight' is torch\.u?int8 \(quantised\)"):
        lorakit.inject(m, LoRAConfig(r=4, target_modules=["v_proj"], modules_to_save=["q_proj"]))
    assert [type(x) for x in m.modules()] == types and not lorakit.list_adapters(m)


def test_nf4_weights_count_as_the_weights_they_stand_for():
    """PEFT counts a packed 4-bit byte as two weights; lorakit the quantised shape (out x in): equal here."""
    from peft import LoraConfig, get_peft_model

    total = lorakit.trainable_parameters(tiny_llama())[1]
    for kind in KINDS:
        m = lorakit.inject(lorakit.quantize_base(tiny_llama(), kind), LoRAConfig(r=4, target_modules=PROJ))
        trainable, ours = lorakit.trainable_parameters(m)
        theirs = get_peft_model(bnb_llama(kind), LoraConfig(r=4, target_modules=PROJ)).get_nb_trainable_parameters()
        assert ours - trainable == total and (trainable, ours) == theirs, kind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_keeps_a_half_precision_model_in_its_dtype(dtype):
    m = lorakit.inject(lorakit.quantize_base(tiny_llama(dtype=dtype), "nf4"), LoRAConfig(r=4, target_modules=PROJ))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = m(ids).logits
    lorakit.dequantize(m)
    assert m.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    assert m.model.layers[0].self_attn.q_proj.adapter("default").lora_A.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, before, atol=0, rtol=0)  # the same dequant(W), the same dtype


def test_dequantize_drops_transformers_quantization_config(tmp_path):
    """A model loaded with BitsAndBytesConfig, dequantised and unloaded, saves a config that loads as float weights."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    m = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc, dtype=torch.float32,
                                         device_map="cpu").eval()
    assert getattr(m.config, "quantization_config", None) is not None
    lorakit.inject(m, LoRAConfig(r=4, target_modules=PROJ, init_lora_weights="gaussian"))
    plain = lorakit.unload(lorakit.dequantize(m), merge=True)
    assert getattr(plain.config, "quantization_config", None) is None and not getattr(plain, "is_loaded_in_4bit", False)
    plain.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(again.model.layers[0].self_attn.q_proj) is nn.Linear
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, plain(ids).logits, atol=0, rtol=0)


def test_bitsandbytes_failing_on_a_layer_is_a_typed_error_naming_it(monkeypatch):
    """What bitsandbytes itself raises (out of memory, say) is named with the layer; the layers before it stay
    quantised, since their float weights are freed one by one (one layer's extra memory at a time)."""
    import lorakit.quantize as Q

    real, calls = Q._quantized, []

    def failing_second(bnb_, lin, kind, compute_dtype):
        calls.append(lin)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(bnb_, lin, kind, compute_dtype)

    monkeypatch.setattr(Q, "_quantized", failing_second)
    m = two_linears()
    with pytest.raises(QuantizedBaseError, match=r"cannot quantise '2' \(64 -> 64\) to nf4: RuntimeError: out of "
                                                 r"memory; the 1 layer\(s\) before it are quantised"):
        lorakit.quantize_base(m, "nf4", skip=[])
    assert type(m[0]) is bnb.nn.Linear4bit and type(m[2]) is nn.Linear
