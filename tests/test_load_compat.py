"""Loading adapters other tools and versions wrote (issue 15, item 1).

A compatibility matrix of adapters written by PEFT itself with varied configs (PEFT's outputs are the
expected values), plus hand-made files in the legacy layouts PEFT also loads: a 2023
adapter_config.json, keys carrying the adapter name, keys without the ``base_model.model.`` prefix,
and ``torch.compile``'s ``_orig_mod.`` segments. Expected values are computed by hand or by PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import AdapterLoadError, LoRAConfig, LoRAWarning

from test_families import FAMILIES, TOL, out, peft_trained_and_loaded, train

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


# --- PEFT writes, lorakit loads: one row per config ------------------------------------------------

MATRIX = {  # row -> (family, PEFT LoraConfig keywords)
    "r-alpha-dropout": ("llama", dict(r=4, lora_alpha=7, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "rank-alpha-pattern": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         rank_pattern={"v_proj": 5}, alpha_pattern={"q_proj": 9})),
    "regex-targets": ("llama", dict(r=2, lora_alpha=4, target_modules=r".*\.(q|k)_proj")),
    "all-linear": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "exclude-modules": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"])),
    "layers-to-transform": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    "gaussian-init": ("llama", dict(r=2, lora_alpha=4, target_modules=["k_proj"], init_lora_weights="gaussian")),
    "orthogonal-init": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="orthogonal")),
    "eva-init": ("llama", dict(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights="eva")),
    "mica-init": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="mica")),
    "dora": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "lora-bias": ("bert", dict(r=2, lora_alpha=4, target_modules=["query"], lora_bias=True)),
    "bias-all": ("bert", dict(r=2, lora_alpha=4, target_modules=["query"], bias="all")),
    "modules-to-save": ("bert", dict(r=2, lora_alpha=4, target_modules=["value"], modules_to_save=["classifier"],
                                     task_type="SEQ_CLS")),
    "conv1d-embedding": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "wte"], fan_in_fan_out=True)),
    "conv2d": ("cnn", dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])),
    "embedding": ("emb", dict(r=3, lora_alpha=3, target_modules=["emb"])),
}


@pytest.mark.parametrize("row", list(MATRIX))
def test_adapter_written_by_peft_loads_with_peft_outputs(row, tmp_path):
    family, kw = MATRIX[row]
    model, x, expected = peft_trained_and_loaded(family, peft.LoraConfig(**kw), tmp_path / "p")
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)


def test_peft_state_dict_with_adapter_name_infixes_loads(tmp_path):
    """``PeftModel.state_dict()`` holds ``...lora_A.default.weight`` and ``...lora_magnitude_vector.default.weight``."""
    build, x, *_ = FAMILIES["llama"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True,
                                                     init_lora_weights=False)).eval()
    expected = out(pm, x).detach()
    pm.save_pretrained(tmp_path / "p")
    state = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in state) and any("magnitude_vector.default.weight" in k for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "p" / "adapter_model.safetensors")
    model = build()
    lorakit.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)


def test_peft_pickle_adapter_loads_and_the_server_path_refuses_it(tmp_path):
    """``save_pretrained(safe_serialization=False)`` writes ``adapter_model.bin``: it loads as PEFT loads it
    (``torch.load(weights_only=True)``), with PEFT's outputs; ``allow_pickle=False`` refuses it unread."""
    build, x, *_ = FAMILIES["llama"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).eval()
    expected = out(pm, x).detach()
    pm.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / "adapter_model.bin").is_file()
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()
    model = build()
    lorakit.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    with pytest.raises(AdapterLoadError, match="adapter_model.bin is not loaded here"):
        lorakit.read_adapter(tmp_path / "p", allow_pickle=False)
    torch.save([torch.zeros(2)], tmp_path / "p" / "adapter_model.bin")  # a pickle, but not a dict of tensors
    with pytest.raises(AdapterLoadError, match="holds list, not a dict of tensors"):
        lorakit.read_adapter(tmp_path / "p")


def test_pissa_adapter_is_refused_naming_the_conversion_and_loads_once_peft_converted_it(tmp_path):
    """PiSSA rewrites the base (W - s·B0·A0) at init: its raw file is refused with the way out; PEFT's conversion
    (``path_initial_model_for_weight_conversion``: a plain rank-2r adapter on the original base) loads with PEFT's
    outputs."""
    build, x, *_ = FAMILIES["llama"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")
    train(pm, x, [p for p in pm.parameters() if p.requires_grad])
    pm.eval()
    expected = out(pm, x).detach()
    pm.save_pretrained(tmp_path / "raw")
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="raw.adapter_config.json.*init_lora_weights=.pissa.*path_initial_model_for_weight_conversion"):
        lorakit.load_adapter(model, tmp_path / "raw")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lorakit.load_adapter(model, tmp_path / "plain")
    torch.testing.assert_close(out(model.eval(), x), expected, atol=TOL, rtol=0)


class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Stack(nn.Module):
    """No single block list: a top-level ``lin``, a top-level list (``blocks.0.lin``: PEFT's default rule finds
    no block index there) and a nested one (``body.layers.1.lin``: block 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([_Sub(), _Sub()])
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([_Sub(), _Sub()])

    def forward(self, x):
        for m in [self.lin, *self.blocks, *self.body.layers]:
            x = m(x)
        return x


def _adapted(model):
    """Module names holding a lora_A (PEFT: ``base_model.model.X.lora_A.default``; lorakit: ``X.adapters.default.lora_A``)."""
    names = (n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n)
    return sorted({n.split(".adapters.")[0] for n in names})


@pytest.mark.parametrize("kw", [dict(layers_to_transform=[1]), dict(layers_to_transform=1),
                                dict(layers_to_transform=[1], layers_pattern="blocks"),
                                dict(layers_to_transform=[0, 1], layers_pattern=["layers", "blocks"]),
                                dict(layers_to_transform=[])], ids=str)
def test_layers_to_transform_on_a_model_without_one_block_list_selects_what_peft_selects(kw, tmp_path):
    """PEFT 0.21's rule: a name given in full is adapted whatever its block; a suffix match needs a block index
    in the chosen set; [] selects every block. lorakit adapts the same modules and gives PEFT's outputs."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    pm = peft.get_peft_model(Stack(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False, **kw))
    pm.eval()
    expected = pm(x).detach()
    pm.save_pretrained(tmp_path / "p")
    model = Stack()
    lorakit.load_adapter(model, tmp_path / "p")
    assert _adapted(model) == _adapted(pm)
    torch.testing.assert_close(model.eval()(x), expected, atol=TOL, rtol=0)
    fresh = Stack()  # and inject picks the same modules from the same config
    lorakit.inject(fresh, LoRAConfig(r=2, lora_alpha=4, target_modules=["lin"], **kw))
    assert _adapted(fresh) == _adapted(pm)


def test_layers_to_transform_errors_name_the_rule():
    with pytest.raises(lorakit.ConfigError, match=r"layers_to_transform=\[1\] needs target_modules as a list"):
        LoRAConfig(target_modules=".*lin", layers_to_transform=[1])  # PEFT refuses it too
    with pytest.warns(LoRAWarning, match="without layers_to_transform"):
        LoRAConfig(target_modules=["lin"], layers_pattern="layers")
    model = Stack()
    with pytest.raises(lorakit.TargetModuleError, match=r"matches 'blocks.0.lin', with no block index .*layers_pattern"):
        lorakit.inject(model, LoRAConfig(target_modules=["0.lin"], layers_to_transform=[1]))
    assert _adapted(model) == []


# --- hand-made files in legacy layouts -------------------------------------------------------------


def _write(folder, tensors, config):
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def factors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)


LAYOUTS = {
    "legacy-config": (("base_model.model.lin.lora_A.weight", "base_model.model.lin.lora_B.weight"),
                      {"enable_lora": None, "merge_weights": False}),
    "adapter-name-infix": (("base_model.model.lin.lora_A.default.weight", "base_model.model.lin.lora_B.default.weight"), {}),
    "no-prefix": (("lin.lora_A.weight", "lin.lora_B.weight"), {}),
    "no-prefix-and-infix": (("lin.lora_A.my_task.weight", "lin.lora_B.my_task.weight"), {}),
    "compiled": (("base_model.model._orig_mod.lin.lora_A.weight", "base_model.model._orig_mod.lin.lora_B.weight"), {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_legacy_layouts_give_base_plus_two_b_a(layout, factors, tmp_path):
    """r=2, lora_alpha=4 on Linear(4, 4): every layout loads as base + 2·B·A (by hand)."""
    (ka, kb), extra = LAYOUTS[layout]
    a, b = factors
    folder = _write(tmp_path / "a", {ka: a, kb: b},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], **extra})
    net = Net()
    x = torch.randn(3, 4)
    want = net(x) + 2.0 * (x @ a.T @ b.T)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(net, folder)
    torch.testing.assert_close(net(x), want, rtol=0, atol=1e-6)
    named = [str(w.message) for w in caught if issubclass(w.category, LoRAWarning)]
    if layout == "legacy-config":  # named in one warning with the file, not fatal
        assert len(named) == 1 and "'enable_lora'" in named[0] and "'merge_weights'" in named[0]
        assert "adapter_config.json" in named[0]
    else:
        assert not named


def test_legacy_key_that_changes_the_math_is_refused_naming_it(factors, tmp_path):
    a, b = factors
    folder = _write(tmp_path / "a", {"base_model.model.lin.lora_A.weight": a, "base_model.model.lin.lora_B.weight": b},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"],
                     "enable_lora": [True, False, True]})
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"'enable_lora'=\[True, False, True\].*changes the adapter's math"):
        lorakit.load_adapter(net, folder)
    assert not lorakit.list_adapters(net) and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_compiled_model_saves_plain_keys_and_loads_both_ways(tmp_path):
    """``torch.compile(net)`` wraps the model as ``_orig_mod``: files never carry it, and load either way."""
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("to_q", nn.Linear(6, 6))
    net.add_module("to_v", nn.Linear(6, 6))
    plain_copy = nn.Sequential()
    plain_copy.add_module("to_q", nn.Linear(6, 6))
    plain_copy.add_module("to_v", nn.Linear(6, 6))
    plain_copy.load_state_dict(net.state_dict())
    comp = torch.compile(net)
    lorakit.inject(comp, LoRAConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    lorakit.save_adapter(comp, tmp_path / "c")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "c" / "adapter_model.safetensors"))
    assert keys == {"base_model.model.to_q.lora_A.weight", "base_model.model.to_q.lora_B.weight"}
    x = torch.randn(3, 6)
    want = comp._orig_mod(x).detach()  # eager: the same modules, no compilation needed
    lorakit.load_adapter(plain_copy, tmp_path / "c")  # compiled -> plain
    torch.testing.assert_close(plain_copy(x), want, rtol=0, atol=0)
    lorakit.save_adapter(plain_copy, tmp_path / "p")
    # a fresh model with the same base weights, compiled, then the plain model's file loaded into it
    fresh = nn.Sequential()
    fresh.add_module("to_q", nn.Linear(6, 6))
    fresh.add_module("to_v", nn.Linear(6, 6))
    fresh.load_state_dict({"to_q.weight": net.to_q.base_layer.weight, "to_q.bias": net.to_q.base_layer.bias,
                           "to_v.weight": net.to_v.weight, "to_v.bias": net.to_v.bias})
    comp2 = torch.compile(fresh)
    lorakit.load_adapter(comp2, tmp_path / "p")  # plain -> compiled
    torch.testing.assert_close(comp2._orig_mod(x), want, rtol=0, atol=0)


def test_key_mismatch_names_matched_modules_and_quotes_a_file_key_beside_the_nearest(factors, tmp_path):
    a, b = factors
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("v_proj", nn.Linear(4, 4))
    folder = _write(tmp_path / "a", {"base_model.model.q_proj.lora_A.weight": a, "base_model.model.q_proj.lora_B.weight": b,
                                     "base_model.model.vproj.lora_A.weight": a.clone(), "base_model.model.vproj.lora_B.weight": b.clone()},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(AdapterLoadError) as info:
        lorakit.load_adapter(model, folder)
    msg = str(info.value)
    assert "lacks key 'base_model.model.v_proj.lora_A.weight' and 1 more" in msg
    assert "1 of 2 adapted modules matched (missing: lora_A.weight of 1 module, lora_B.weight of 1 module)" in msg
    assert "the file holds e.g. 'base_model.model.vproj.lora_" in msg and "nearest model key 'base_model.model.v_proj.lora_" in msg
    assert not lorakit.list_adapters(model)


def test_two_file_keys_naming_one_tensor_are_refused(factors, tmp_path):
    a, b = factors
    folder = _write(tmp_path / "a", {"base_model.model.lin.lora_A.weight": a, "lin.lora_A.default.weight": a.clone(),
                                     "base_model.model.lin.lora_B.weight": b},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]})
    with pytest.raises(AdapterLoadError, match=r"both name the tensor 'base_model.model.lin.lora_A.weight'"):
        lorakit.load_adapter(Net(), folder)


def test_unload_of_a_compiled_model_gives_the_plain_model():
    torch.manual_seed(2)
    net = Net()
    x = torch.randn(3, 4)
    comp = torch.compile(net)
    lorakit.inject(comp, LoRAConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    want = comp._orig_mod(x).detach()
    lorakit.unload(comp, merge=True)
    assert type(net.lin) is nn.Linear and not lorakit.list_adapters(comp)
    torch.testing.assert_close(net(x), want, rtol=0, atol=1e-6)


def test_float8_weights_and_a_non_path_are_refused_with_load_errors(factors, tmp_path):
    a, b = factors
    folder = _write(tmp_path / "a", {"base_model.model.lin.lora_A.weight": a.to(torch.float8_e4m3fn),
                                     "base_model.model.lin.lora_B.weight": b},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]})
    with pytest.raises(AdapterLoadError, match=r"'base_model.model.lin.lora_A.weight' has dtype torch.float8_e4m3fn"):
        lorakit.load_adapter(Net(), folder)
    with pytest.raises(AdapterLoadError, match="must be a str or os.PathLike folder, got NoneType"):
        lorakit.load_adapter(Net(), None)


def test_fields_a_file_leaves_out_mean_what_peft_fills_in(factors, tmp_path):
    """No ``lora_alpha``: PEFT's default 8 (scaling 8 / r, not lorakit's 16 / r); no or a null ``target_modules``:
    the modules the weight file adapts (PEFT fills a per-architecture list; the keys are what the file holds)."""
    a, b = factors
    tensors = {"base_model.model.lin.lora_A.weight": a, "base_model.model.lin.lora_B.weight": b}
    net = Net()
    x = torch.randn(3, 4)
    want = net(x) + (8 / 2) * (x @ a.T @ b.T)  # r=2: s = 8 / 2 by hand
    for i, config in enumerate([{"r": 2, "target_modules": ["lin"]}, {"r": 2}, {"r": 2, "target_modules": None}]):
        folder = _write(tmp_path / str(i), tensors, {"peft_type": "LORA", **config})
        loaded = Net()
        loaded.load_state_dict(net.state_dict())
        lorakit.load_adapter(loaded, folder)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-6)
        assert lorakit.list_adapters(loaded) == ["default"]
    folder = _write(tmp_path / "none", {}, {"peft_type": "LORA", "r": 2})
    with pytest.raises(AdapterLoadError, match="names no target_modules.*holds no lora_A"):
        lorakit.load_adapter(Net(), folder)
    for key, value in (("layers_to_transform", [0]), ("exclude_modules", ["lin"])):  # they narrow PEFT's own list
        folder = _write(tmp_path / key, tensors, {"peft_type": "LORA", "r": 2, key: value})
        net = Net()
        with pytest.raises(AdapterLoadError, match=f"names no target_modules but sets {key}"):
            lorakit.load_adapter(net, folder)
        assert not lorakit.list_adapters(net)


def test_a_run_folder_given_for_its_adapter_names_the_subfolder(factors, tmp_path):
    a, b = factors
    _write(tmp_path / "run" / "adapter", {"base_model.model.lin.lora_A.weight": a, "base_model.model.lin.lora_B.weight": b},
           {"peft_type": "LORA", "r": 2, "target_modules": ["lin"]})
    with pytest.raises(AdapterLoadError, match=r"run/adapter_config.json' is missing; '.*run/adapter' holds an adapter"):
        lorakit.load_adapter(Net(), tmp_path / "run")


def test_peft_file_without_lora_alpha_or_target_modules_loads_with_peft_outputs(tmp_path):
    build, x, *_ = FAMILIES["llama"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "p")
    cfg = tmp_path / "p" / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    del doc["lora_alpha"], doc["target_modules"]
    cfg.write_text(json.dumps(doc))
    expected = out(peft.PeftModel.from_pretrained(build(), tmp_path / "p").eval(), x).detach()
    model = build()
    lorakit.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(out(model.eval(), x), expected, atol=TOL, rtol=0)


def test_overlapping_patterns_keep_their_order_through_save_and_load(tmp_path):
    """The first ``rank_pattern`` / ``alpha_pattern`` key matching a module wins: the saved file keeps the order, so
    lorakit and PEFT reload the adapter as it was built (layer 1's q_proj: r=2 and alpha 2 from the "q_proj" keys)."""
    build, x, *_ = FAMILIES["llama"]
    patterns = dict(rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
                    alpha_pattern={"q_proj": 2.0, "layers.1.self_attn.q_proj": 50.0})
    model = build()
    lorakit.inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="gaussian",
                                     **patterns))
    layer = model.model.layers[1].self_attn.q_proj.adapter("default")
    assert (layer.r, layer.scaling) == (2, 1.0)  # 2.0 / 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()  # B too: the layers' outputs differ from the base's
    expected = out(model.eval(), x).detach()
    lorakit.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert [list(saved[k]) for k in patterns] == [list(v) for v in patterns.values()]
    again = build()
    lorakit.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(out(again.eval(), x), expected, atol=TOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    torch.testing.assert_close(out(theirs, x), expected, atol=TOL, rtol=0)


def test_a_lora_bias_config_whose_file_has_no_bias_says_which_keys_are_missing(factors, tmp_path):
    """A config with ``lora_bias: true`` over a file without bias keys said "0 of 1 adapted modules matched",
    though lora_A and lora_B were there: the message now names the kind of key missing, and from how many."""
    a, b = factors
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    folder = _write(tmp_path / "a", {"base_model.model.q_proj.lora_A.weight": a, "base_model.model.q_proj.lora_B.weight": b},
                    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_bias": True})
    with pytest.raises(AdapterLoadError, match=r"lacks key 'base_model\.model\.q_proj\.lora_B\.bias'; 0 of 1 adapted "
                                               r"modules matched \(missing: lora_B\.bias of 1 module\)"):
        lorakit.load_adapter(model, folder)
    assert not lorakit.list_adapters(model)
