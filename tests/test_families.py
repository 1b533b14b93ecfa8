"""Model families beyond nn.Linear: GPT-2 (Conv1D), BERT + classifier (modules_to_save), Llama,
a CNN (nn.Conv2d), an nn.Embedding target. PEFT is the oracle for layouts, keys and outputs."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterLoadError, ConfigError, LoRAConfig, TargetModuleError
from lorakit import LoRAConv1D, LoRAConv2d, LoRAEmbedding, ModulesToSaveWrapper, TiedLoRALinear

from conftest import tiny_llama

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")

# PEFT's own merge test (tests/testing_common.py, _test_merge_layers) allows atol=0.3, rtol=0.01 for
# LoRA on Conv2d models; lorakit's convolutions are checked far tighter, at CONV_TOL.
TOL = 1e-5
CONV_TOL = 1e-5


# --- tiny models ---------------------------------------------------------------------------------


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, (3, 2), stride=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))  # (N, 6, 3, 4)
        return self.head(h.mean(dim=(2, 3)))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.lin = nn.Linear(8, 5)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval()


def emb(seed=0):
    torch.manual_seed(seed)
    return EmbModel().eval()


def llama(seed=0):
    return tiny_llama(seed)


def ids(vocab):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (2, 7), generator=g)


# name -> (builder, input, target_modules, modules_to_save, task_type, exact trainable count for r=2)
# Counts by hand: Linear/Conv1D r*(in+out); Embedding r*(num+dim); Conv2d r*in*kh*kw + out*r; copies in full.
FAMILIES = {
    # c_attn 16->48 (x2 layers): 2*64*2 = 256; c_fc 16->64: 2*80*2 = 320; wte 40x16: 2*56 = 112
    "gpt2": (gpt2, ids(40), ["c_attn", "c_fc", "wte"], None, None, 256 + 320 + 112),
    # query, value 16->16: 2*32 * 2 * 2 layers = 256; classifier copy 3*16 + 3 = 51
    "bert": (bert, ids(50), ["query", "value"], ["classifier"], "SEQ_CLS", 256 + 51),
    # q_proj 32->32: 128, v_proj 32->16: 96, two layers: 448; lm_head 32->64: 192
    "llama": (llama, ids(64), ["q_proj", "v_proj", "lm_head"], None, None, 448 + 192),
    # conv1 3->4 k3x3: 2*3*9 + 4*2 = 62; conv2 4->6 k3x2: 2*4*6 + 6*2 = 60; head copy 6*5 + 5 = 35
    "cnn": (cnn, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), ["conv1", "conv2"], ["head"], None, 157),
    # emb 30x8: 2*38 = 76; lin 8->5: 2*13 = 26
    "emb": (emb, ids(30), ["emb", "lin"], None, None, 102),
}


def out(model, x):
    res = model(x)
    return getattr(res, "logits", res)


def lk_config(name, **kw):
    _, _, targets, saved, task, _ = FAMILIES[name]
    return LoRAConfig(r=2, lora_alpha=4, target_modules=list(targets), modules_to_save=saved and list(saved), task_type=task, **kw)


def peft_config(name, **kw):
    _, _, targets, saved, task, _ = FAMILIES[name]
    return peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=list(targets), modules_to_save=saved and list(saved), task_type=task,  # PEFT appends to it
        fan_in_fan_out=(name == "gpt2"), **kw,
    )


def train(model, x, params, steps=3, seed=3):
    """A few Adam steps on a fixed random projection of the output."""
    torch.manual_seed(seed)
    w = torch.randn_like(out(model, x))
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (out(model, x) * w).sum().backward()
        opt.step()


def peft_trained_and_loaded(name, config, folder):
    """PEFT trains an adapter on family ``name`` (a few Adam steps) and saves it to ``folder``; lorakit loads it
    into a fresh base. Returns ``(lorakit model in eval mode, input, PEFT's output)``."""
    build, x, *_ = FAMILIES[name]
    pm = peft.get_peft_model(build(), config)
    train(pm, x, [p for p in pm.parameters() if p.requires_grad])  # LoRA, magnitudes, biases, modules_to_save copies
    pm.eval()
    expected = out(pm, x).detach()
    pm.save_pretrained(folder)
    model = build()
    lorakit.load_adapter(model, folder)
    return model.eval(), x, expected


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- per family: train, save, PEFT loads; PEFT saves, lorakit loads; merge; counts ----------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_train_save_and_peft_loads_it(name, tmp_path):
    build, x, *_ , count = FAMILIES[name]
    model = build()
    base_state = snapshot(model)
    lorakit.inject(model, lk_config(name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert lorakit.trainable_parameters(model) == (count, sum(v.numel() for k, v in base_state.items()
                                                              if not k.endswith("num_batches_tracked")) - _tied_extra(name) + count)
    before = [p.detach().clone() for p in trainable]
    train(model, x, trainable)
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable)), "every adapter tensor trains"
    frozen = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and ".modules_to_save." not in k}
    for k, v in frozen.items():  # base weights (and the modules_to_save originals) are bitwise unchanged
        orig = k.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(v, base_state[orig]), k
    expected = out(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "a")

    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "a")
    torch.testing.assert_close(out(pm, x), expected, atol=TOL, rtol=0)
    assert pm.get_nb_trainable_parameters()[0] == 0  # inference mode; the count below is PEFT's for training
    pm_train = peft.get_peft_model(build(), peft_config(name))
    assert pm_train.get_nb_trainable_parameters()[0] == count


def _tied_extra(name):
    return 40 * 16 if name == "gpt2" else 0  # GPT-2's lm_head.weight is wte.weight: one tensor in the state dict twice


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lorakit_loads_peft_adapter_with_trained_heads(name, tmp_path):
    model, x, expected = peft_trained_and_loaded(name, peft_config(name, init_lora_weights=False), tmp_path / "p")
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    # and back: lorakit's save of it is key-for-key and bit-for-bit PEFT's file, less the full copies of base
    # weights PEFT adds when lm_head/embed_tokens is a target (lorakit checked they equal the model's)
    lorakit.save_adapter(model, tmp_path / "again")
    a, b = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    copies = {k for k in a if k.endswith(".base_layer.weight")}
    assert copies == ({"base_model.model.lm_head.base_layer.weight"} if name == "llama" else set())
    assert a.keys() - copies == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_merge_equals_unmerged_and_unmerge_is_bitwise(name):
    build, x, *_ = FAMILIES[name]
    model = build()
    lorakit.inject(model, lk_config(name, init_lora_weights=False))
    before = snapshot(model)
    unmerged = out(model, x).detach()
    lorakit.merge(model)
    merged = out(model, x).detach()
    assert not torch.equal(before_w(model, before), current_w(model)), "merge changed a base weight"
    torch.testing.assert_close(merged, unmerged, atol=CONV_TOL if name == "cnn" else TOL, rtol=0)
    lorakit.unmerge(model)
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, lorakit.LoRALayer) for m in plain.modules())
    torch.testing.assert_close(out(plain, x), merged, atol=TOL, rtol=0)


def before_w(model, before):
    name, layer = next(iter(lorakit.lora_layers(model)))
    return before[f"{name}.base_layer.weight"]


def current_w(model):
    return next(iter(lorakit.lora_layers(model)))[1].base_layer.weight.detach()


# --- hand computations in float64 -------------------------------------------------------------------


def test_conv1d_matches_hand_computation_and_fused_delta_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 4).double()  # weight stored (in=4, out=12): non-square, fused like c_attn
    layer = LoRAConv1D(base)
    layer.add_adapter("a", r=3, lora_alpha=6.0, init_lora_weights=False)
    layer.set_adapter("a")
    a, b = layer.lora_weights("a")
    x = torch.randn(5, 4, dtype=torch.float64)
    want = x @ base.weight + base.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    assert layer.delta_weight("a").shape == (4, 12)
    torch.testing.assert_close(layer.delta_weight("a").double(), (2.0 * b @ a).T.float().double(), atol=1e-6, rtol=0)


def test_embedding_matches_hand_computation_and_peft_init():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0).double()
    layer = LoRAEmbedding(base)
    layer.add_adapter("init", r=2, lora_alpha=2.0)  # PEFT: A zeros, B ~ N(0, 1)
    a0, b0 = layer.lora_weights("init")
    assert a0.shape == (2, 10) and b0.shape == (4, 2)
    assert torch.count_nonzero(a0) == 0 and torch.count_nonzero(b0) == 8
    layer.add_adapter("a", r=2, lora_alpha=3.0, init_lora_weights=False)
    layer.set_adapter("a")
    a, b = layer.lora_weights("a")
    x = torch.tensor([[0, 3, 9], [1, 1, 2]])
    want = base.weight[x] + 1.5 * (a.T[x] @ b.T)
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.delta_weight("a").double(), (1.5 * b @ a).T.double(), atol=1e-6, rtol=0)


def test_conv2d_bypass_equals_merged_kernel_in_float64():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)).double()
    layer = LoRAConv2d(base)
    layer.add_adapter("a", r=2, lora_alpha=3.0, init_lora_weights=False)
    layer.set_adapter("a")
    a, b = layer.lora_weights("a")
    assert a.shape == (2, 3, 3, 2) and b.shape == (5, 2, 1, 1)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    kw = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    want = F.conv2d(x, base.weight, base.bias, **kw) + 1.5 * F.conv2d(F.conv2d(x, a, **kw), b)
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    merged_kernel = base.weight + 1.5 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    torch.testing.assert_close(layer(x), F.conv2d(x, merged_kernel, base.bias, **kw), atol=1e-12, rtol=0)


def test_grouped_conv_is_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    state = snapshot(model)
    with pytest.raises(TargetModuleError, match=r"'0' is an nn.Conv2d with groups=2"):
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["0", "1"]))
    assert type(model[1]) is nn.Conv2d and model.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in model.parameters())


# --- tied weights -----------------------------------------------------------------------------------


def test_tied_head_is_untied_while_merged_and_retied_after():
    model = gpt2()
    x = FAMILIES["gpt2"][1]
    wte = model.transformer.wte.weight
    wte_before = wte.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["lm_head", "wte"], init_lora_weights=False))
    assert isinstance(model.lm_head, TiedLoRALinear) and model.lm_head.tied_with == ("transformer.wte",)
    assert model.transformer.wte.tied_with == ("lm_head",)
    unmerged = out(model, x).detach()
    lorakit.merge(model)
    assert torch.equal(wte, wte_before), "the shared tensor is never written"
    assert model.lm_head.base_layer.weight is not wte and model.transformer.wte.base_layer.weight is not wte
    torch.testing.assert_close(out(model, x), unmerged, atol=TOL, rtol=0)
    lorakit.unmerge(model)
    assert model.lm_head.base_layer.weight is wte and model.transformer.wte.base_layer.weight is wte
    assert torch.equal(wte, wte_before) and torch.equal(out(model, x), unmerged)
    plain = lorakit.unload(model, merge=True)
    assert torch.equal(wte, wte_before) and plain.lm_head.weight is not plain.transformer.wte.weight
    torch.testing.assert_close(out(plain, x), unmerged, atol=TOL, rtol=0)


def test_tied_head_adapter_alone_leaves_the_input_embedding_alone():
    model = gpt2()
    x = FAMILIES["gpt2"][1]
    wte_before = model.transformer.wte.weight.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    unmerged = out(model, x).detach()
    lorakit.merge(model)
    assert torch.equal(model.transformer.wte.weight, wte_before)
    torch.testing.assert_close(out(model, x), unmerged, atol=TOL, rtol=0)


# --- patterns on every family, per-module ranks survive a reload ---------------------------------------


PATTERNS = {
    # name -> (config kwargs, {module: expected rank}, {module: expected alpha}, modules that must stay plain)
    "gpt2": (
        dict(target_modules=r"transformer\.(h\.\d+\.attn\.c_attn|wte)", rank_pattern={"h.1.attn.c_attn": 4, "wte": 3},
             alpha_pattern={"c_attn": 8}),
        {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.attn.c_attn": 4, "transformer.wte": 3},
        {"transformer.h.0.attn.c_attn": 8.0, "transformer.wte": 4.0}, ["transformer.h.0.mlp.c_fc"],
    ),
    "gpt2_layers": (
        dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1], rank_pattern={"mlp.c_proj": 3}),
        {"transformer.h.1.attn.c_attn": 2, "transformer.h.1.attn.c_proj": 2, "transformer.h.1.mlp.c_proj": 3},
        {}, ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"],
    ),
    "bert": (
        dict(target_modules=["query", "key"], layers_to_transform=[0], rank_pattern={"key": 3},
             modules_to_save=["classifier"], task_type="SEQ_CLS"),
        {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.key": 3},
        {}, ["bert.encoder.layer.1.attention.self.query"],
    ),
    "llama": (
        dict(target_modules=["q_proj", "embed_tokens"], rank_pattern={"layers.1.self_attn.q_proj": 5}, alpha_pattern={"embed_tokens": 1}),
        {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 5, "model.embed_tokens": 2},
        {"model.embed_tokens": 1.0}, [],
    ),
    "cnn": (
        dict(target_modules=r"conv\d", rank_pattern={"conv2": 3}, modules_to_save=["head"]),
        {"conv1": 2, "conv2": 3}, {}, [],
    ),
    "emb": (
        dict(target_modules=["emb", "lin"], rank_pattern={"emb": 4}, alpha_pattern={"lin": 6}),
        {"emb": 4, "lin": 2}, {"lin": 6.0}, [],
    ),
}


@pytest.mark.parametrize("case", list(PATTERNS))
def test_patterns_and_per_module_ranks_reload(case, tmp_path):
    name = case.split("_")[0]
    build, x, *_ = FAMILIES[name]
    kwargs, ranks, alphas, plain = PATTERNS[case]
    model = build()
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs))
    layers = dict(lorakit.lora_layers(model))
    assert {n: l.adapter("default").r for n, l in layers.items()} == ranks
    for n, a in alphas.items():
        assert layers[n].adapter("default").lora_alpha == a
    for n in plain:
        assert not isinstance(model.get_submodule(n), lorakit.LoRALayer)
    expected = out(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "a")

    again = build()
    lorakit.load_adapter(again, tmp_path / "a")
    assert {n: l.adapter("default").r for n, l in lorakit.lora_layers(again)} == ranks
    torch.testing.assert_close(out(again, x), expected, atol=TOL, rtol=0)
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "a")
    torch.testing.assert_close(out(pm, x), expected, atol=TOL, rtol=0)


# --- modules_to_save ----------------------------------------------------------------------------------


def test_modules_to_save_layout_keys_and_original_untouched(tmp_path):
    model = bert()
    original = model.classifier
    lorakit.inject(model, lk_config("bert"))
    w = model.classifier
    assert isinstance(w, ModulesToSaveWrapper) and w.original_module is original
    keys = [k for k in model.state_dict() if k.startswith("classifier.")]
    assert keys == ["classifier.original_module.weight", "classifier.original_module.bias",
                    "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"]
    assert not any(p.requires_grad for p in original.parameters())
    assert w.weight is w.modules_to_save["default"].weight  # attribute reads go to the copy in use
    lorakit.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k for k in saved if "classifier" in k} == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"


def test_modules_to_save_follow_the_active_set():
    model = bert()
    x = FAMILIES["bert"][1]
    base = out(model, x).detach()
    lorakit.inject(model, lk_config("bert", init_lora_weights=False))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    adapted = out(model, x).detach()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["key"]), adapter_name="other")  # no copy of classifier
    assert model.classifier.active_adapters == []
    lorakit.set_adapter(model, "default")
    torch.testing.assert_close(out(model, x), adapted, atol=0, rtol=0)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(out(model, x), base, atol=0, rtol=0)
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    lorakit.delete_adapter(model, "other")
    plain = lorakit.unload(model, merge=True)
    assert isinstance(plain.classifier, nn.Linear)
    torch.testing.assert_close(out(plain, x), adapted, atol=TOL, rtol=0)


def test_delete_adapter_drops_its_copy_and_unwraps():
    model = bert()
    original = model.classifier
    lorakit.inject(model, lk_config("bert"))
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["key"]), adapter_name="other")
    lorakit.delete_adapter(model, "default")
    assert model.classifier is original


def test_modules_to_save_errors_leave_model_unchanged():
    model = bert()
    keys = list(model.state_dict())
    with pytest.raises(TargetModuleError, match="modules_to_save entry 'head' matches no module"):
        lorakit.inject(model, LoRAConfig(target_modules=["query"], modules_to_save=["head"]))
    with pytest.raises(TargetModuleError, match="either adapted with LoRA or saved in full"):
        lorakit.inject(model, LoRAConfig(target_modules=["classifier"], modules_to_save=["classifier"]))
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="modules_to_save must be a list"):
        LoRAConfig(modules_to_save="classifier")


def test_failed_load_of_modules_to_save_leaves_model_as_it_was(tmp_path):
    model = bert()
    lorakit.inject(model, lk_config("bert"))
    lorakit.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.classifier.weight"] = torch.zeros(4, 16)
    save_file(t, f)
    fresh = bert()
    keys = list(fresh.state_dict())
    with pytest.raises(AdapterLoadError, match=r"classifier.weight' has shape \[4, 16\] in the file but the model needs \[3, 16\]"):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert list(fresh.state_dict()) == keys and isinstance(fresh.classifier, nn.Linear)


# --- config round trip with PEFT ---------------------------------------------------------------------


def test_config_round_trips_peft_gpt2_and_seq_cls_configs(tmp_path):
    pm = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    pm.save_pretrained(tmp_path / "g")
    d = json.load(open(tmp_path / "g" / "adapter_config.json"))
    cfg = LoRAConfig.from_dict(d)
    assert cfg.fan_in_fan_out is True
    back = cfg.to_dict()
    assert back["fan_in_fan_out"] is True and peft.LoraConfig.from_peft_type(**back).fan_in_fan_out is True
    d2 = dict(d, modules_to_save=["classifier", "classifier", "score"], task_type="SEQ_CLS")
    assert LoRAConfig.from_dict(d2).modules_to_save == ["classifier", "score"]
    # lorakit sets the flag itself when it adapts a Conv1D, as PEFT records it
    model = gpt2()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["c_attn"]))
    assert model.lora_state.configs["default"].fan_in_fan_out is True


# --- layer types on their own ----------------------------------------------------------------------


def test_conv1d_wrapper_refuses_any_other_module():
    with pytest.raises(TypeError, match="Conv1D"):
        LoRAConv1D(nn.Linear(4, 12))  # transformers is loaded here, so Conv1D is known


def test_registry_without_transformers(monkeypatch):
    """In a process that never imported transformers there is no Conv1D: the registry has the three torch types."""
    import sys

    from lorakit import LoRALinear, layer_types

    monkeypatch.delitem(sys.modules, "transformers.pytorch_utils")
    monkeypatch.setattr(layer_types, "LORA_CLASSES", {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d})
    assert layer_types.conv1d_type() is None
    assert layer_types.lora_classes() == {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}
    assert layer_types.lora_class_for(nn.Linear(2, 2)) is LoRALinear
    assert layer_types.lora_class_for(nn.Linear(2, 2), tied=True) is TiedLoRALinear
    with pytest.raises(TypeError, match="Conv1D"):
        LoRAConv1D(nn.Linear(4, 12))


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_embedding_init_replays_peft_draws(init):
    """PEFT's Embedding init: True or "gaussian": A zeros, B ~ N(0, 1); False: A then B ~ N(0, 1)."""
    layer = LoRAEmbedding(nn.Embedding(10, 4))
    torch.manual_seed(5)
    layer.add_adapter("a", r=2, lora_alpha=2.0, init_lora_weights=init)
    a, b = layer.lora_weights("a")
    torch.manual_seed(5)
    want_a = torch.zeros(2, 10) if init is not False else torch.empty(2, 10).normal_(0.0, 1.0)
    want_b = torch.empty(4, 2).normal_(0.0, 1.0)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)


def test_embedding_bypass_renormalises_a_like_the_base_with_max_norm_and_norm_type():
    """F.embedding with max_norm rescales each looked-up row to norm <= max_norm (norm_type's p-norm), in A^T too."""
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, max_norm=0.5, norm_type=1.0).double()
    layer = LoRAEmbedding(base)
    layer.add_adapter("a", r=2, lora_alpha=3.0, init_lora_weights=False)
    layer.set_adapter("a")
    w0 = base.weight.detach().clone()
    a0, b0 = (t.detach().clone() for t in layer.lora_weights("a"))
    x = torch.tensor([[1, 4, 4], [9, 0, 2]])

    def renorm(rows):  # torch's embedding_renorm_: scale by max_norm / (norm + 1e-7) where norm > max_norm
        n = rows.abs().sum(-1, keepdim=True)  # p = 1
        return torch.where(n > 0.5, rows * (0.5 / (n + 1e-7)), rows)

    assert (a0.T[x].abs().sum(-1) > 0.5).any()  # the renormalisation changes some rows of A^T
    want = renorm(w0[x]) + 1.5 * renorm(a0.T[x]) @ b0.T
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


def test_embedding_bypass_gradient_skips_padding_and_scales_by_frequency():
    """padding_idx gets no gradient; scale_grad_by_freq divides each row's gradient by its count in the batch."""
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0, scale_grad_by_freq=True).double()
    layer = LoRAEmbedding(base)
    layer.add_adapter("a", r=2, lora_alpha=3.0, init_lora_weights=False)
    layer.set_adapter("a")
    x = torch.tensor([[0, 3, 3, 5], [3, 0, 7, 5]])
    g = torch.randn(2, 4, 4, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    a, b = layer.lora_weights("a")
    # d loss / d A^T[i] = sum over positions p with x_p = i of s * g_p @ B, divided by count(i); none for padding 0
    flat_x, flat_g = x.reshape(-1), g.reshape(-1, 4)
    want = torch.zeros(10, 2, dtype=torch.float64)
    for i in (3, 5, 7):
        hits = flat_x == i
        want[i] = 1.5 * (flat_g[hits] @ b.detach()).sum(0) / hits.sum()
    torch.testing.assert_close(a.grad, want.T, rtol=0, atol=1e-12)


def test_sparse_embedding_trains_its_adapter():
    """A sparse base embedding keeps its sparse forward; the adapter's gradient is dense: for s = 2 / 2,
    dL/dA[:, t] = s * B^T summed over the positions holding token t (L = sum of outputs), by hand."""
    torch.manual_seed(0)
    layer = LoRAEmbedding(nn.Embedding(6, 3, sparse=True).double())
    layer.add_adapter("a", r=2, lora_alpha=2.0, init_lora_weights=False)
    layer.set_adapter("a")
    x = torch.tensor([[1, 4, 4]])
    layer(x).sum().backward()
    a, b = layer.lora_weights("a")
    want = torch.zeros_like(a)
    for t in x.flatten().tolist():
        want[:, t] += 1.0 * b.detach().sum(0)
    torch.testing.assert_close(a.grad, want, rtol=0, atol=1e-12)


# --- modules_to_save with several adapters ------------------------------------------------------------


def _bert_with_heads(names, seed=3):
    """bert() with adapters ``names`` (LoRA B = 0, so only the heads differ), each one's classifier copy set to
    known random weights; returns the model and ``{name: (weight, bias)}``."""
    model, heads = bert(), {}
    gen = torch.Generator().manual_seed(seed)
    for n in names:
        lorakit.inject(model, lk_config("bert"), adapter_name=n)
        copy = model.classifier.copy_for(n)
        heads[n] = (torch.randn(copy.weight.shape, generator=gen), torch.randn(copy.bias.shape, generator=gen))
        with torch.no_grad():
            copy.weight.copy_(heads[n][0])
            copy.bias.copy_(heads[n][1])
    return model, heads


def _plain_bert_with_head(head):
    """A plain bert() with ``head`` (weight, bias) written into its classifier, or as it is for None."""
    plain = bert()
    if head is not None:
        with torch.no_grad():
            plain.classifier.weight.copy_(head[0])
            plain.classifier.bias.copy_(head[1])
    return plain


def test_two_adapters_with_copies_of_one_module_load_into_a_fresh_model(tmp_path):
    """The second adapter's load read the keys of the wrapper the first one had put there
    (``original_module.weight``) instead of the module's own."""
    model, heads = _bert_with_heads(["a", "b"])
    for n in heads:
        lorakit.save_adapter(model, tmp_path / n, adapter_name=n)
    fresh = bert()
    x = FAMILIES["bert"][1]
    for n in heads:
        lorakit.load_adapter(fresh, tmp_path / n, adapter_name=n)
    for n, head in heads.items():
        lorakit.set_adapter(fresh, n)
        torch.testing.assert_close(out(fresh, x), out(_plain_bert_with_head(head), x), atol=1e-6, rtol=0)


def test_mixed_batch_runs_each_row_through_its_own_adapters_copy():
    """Every row went through the active adapter's copy, whatever its own adapter (PEFT runs each row
    through its adapter's copy): rows of an adapter without a copy and None rows get the original."""
    model, heads = _bert_with_heads(["a", "b"])
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["key"]), adapter_name="plain")  # no copy of classifier
    lorakit.set_adapter(model, "b")
    x = torch.randint(1, 50, (4, 7), generator=torch.Generator().manual_seed(4))
    rows = ["a", None, "b", "plain"]
    with lorakit.mixed_batch(model, rows):
        got = out(model, x)
    for i, n in enumerate(rows):
        want = out(_plain_bert_with_head(heads.get(n)), x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-6, rtol=0, msg=f"row {i} ({n})")
    assert lorakit.active_adapters(model) == ["b"]


def test_mixed_batch_runs_each_modules_to_save_module_on_its_own_rows_only():
    """The original and each copy see only their rows (the original ran on every row before, so a large head
    was computed twice for rows with a copy); one adapter on every row calls its copy as an unmixed forward."""
    model, heads = _bert_with_heads(["a", "b"])
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["key"]), adapter_name="plain")  # no copy of classifier
    seen = {}
    for name, m in [("original", model.classifier.original_module)] + [(n, model.classifier.copy_for(n)) for n in "ab"]:
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].shape[0]))
    x = torch.randint(1, 50, (6, 7), generator=torch.Generator().manual_seed(5))
    for rows, want_seen in ((["b", None, "a", "plain", "b", "a"], {"original": [2], "a": [2], "b": [2]}),
                            (["a", "b", "b", "a", "b", "a"], {"a": [3], "b": [3]}),
                            (["b"] * 6, {"b": [6]}), ([None, "plain"] * 3, {"original": [6]})):
        seen.clear()
        with lorakit.mixed_batch(model, rows):
            got = out(model, x)
        assert seen == want_seen, rows
        for i, n in enumerate(rows):
            want = out(_plain_bert_with_head(heads.get(n)), x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, atol=1e-6, rtol=0, msg=f"row {i} ({n}) of {rows}")


def test_modules_to_save_on_a_module_holding_trainable_tokens_is_refused():
    """The reverse order was refused already; this one deep-copied the trainable-tokens wrapper, another
    adapter's rows with it."""
    model = tiny_llama()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5]), adapter_name="a")
    keys = list(model.state_dict())
    with pytest.raises(TargetModuleError, match="'model.embed_tokens', which holds a TrainableTokensWrapper"):
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                       adapter_name="b")
    assert list(model.state_dict()) == keys and lorakit.list_adapters(model) == ["a"]
    model = bert()  # a module holding them: BERT's embeddings, around the word embeddings' rows
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["query"], trainable_token_indices={"word_embeddings": [1, 2]}),
                   adapter_name="a")
    keys = list(model.state_dict())
    with pytest.raises(TargetModuleError, match="'bert.embeddings', which holds a TrainableTokensWrapper"):
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["value"], modules_to_save=["embeddings"]), adapter_name="b")
    assert list(model.state_dict()) == keys and lorakit.list_adapters(model) == ["a"]
    model = bert()  # the other order: the rows' module lies inside another adapter's copied module
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["value"], modules_to_save=["embeddings"]), adapter_name="b")
    keys = list(model.state_dict())
    with pytest.raises(TargetModuleError, match="'word_embeddings' matches no module in BertForSequenceClassification: "
                                                "it lies inside 'bert.embeddings'"):
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["query"], trainable_token_indices={"word_embeddings": [1]}),
                       adapter_name="a")
    assert list(model.state_dict()) == keys and lorakit.list_adapters(model) == ["b"]


def test_modules_to_save_entries_match_name_ends_as_peft_does(tmp_path):
    """PEFT matches a modules_to_save entry against the end of a module's name as a plain string, so
    ``"norm"`` takes Llama's ``model.norm`` and every ``input_layernorm`` / ``post_attention_layernorm``;
    lorakit took ``model.norm`` only, and the files of the two did not load into each other."""
    cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=["norm"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if type(m).__name__ == "ModulesToSaveWrapper"}
    assert len(wrapped) == 5  # model.norm and two per block
    ours = lorakit.inject(tiny_llama(), LoRAConfig(**cfg))
    assert {n for n, m in ours.named_modules() if isinstance(m, ModulesToSaveWrapper)} == wrapped
    with torch.no_grad():
        for n, m in theirs.named_modules():
            if type(m).__name__ == "ModulesToSaveWrapper":
                m.modules_to_save["default"].weight.normal_(generator=torch.Generator().manual_seed(len(n)))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "peft")
    x = FAMILIES["llama"][1]
    torch.testing.assert_close(out(loaded, x), out(theirs.eval(), x), atol=TOL, rtol=0)
    lorakit.save_adapter(loaded, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(out(again, x), out(theirs, x), atol=TOL, rtol=0)


def test_a_classifier_adapter_without_the_head_saved_loads_in_peft(tmp_path):
    """save_adapter wrote task_type SEQ_CLS for any *ForSequenceClassification model; PEFT then adds the head to
    modules_to_save and fails on the file that holds no head weights. SEQ_CLS is now written only when the head
    is among modules_to_save; both files load in PEFT with lorakit's outputs."""
    peft = pytest.importorskip("peft")
    x = FAMILIES["bert"][1]
    for saved, task in (([], None), (["classifier"], "SEQ_CLS")):
        model = bert()
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["query"], modules_to_save=saved, init_lora_weights=False))
        folder = tmp_path / str(task)
        lorakit.save_adapter(model, folder)
        assert json.load(open(folder / "adapter_config.json"))["task_type"] == task
        theirs = peft.PeftModel.from_pretrained(bert(), str(folder)).eval()
        torch.testing.assert_close(out(theirs, x), out(model, x), rtol=1e-5, atol=1e-5)
