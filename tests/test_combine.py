import pytest
import torch

import lorakit
from lorakit import ConfigError, LoRAConfig, add_weighted_adapter, inject, load_adapter, save_adapter
from conftest import tiny_llama


@pytest.fixture
def model():
    m = tiny_llama()
    inject(m, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(m, LoRAConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["v_proj", "o_proj"], init_lora_weights=False), "b")
    return m


# scaling of each source adapter, by hand from the fixture's configs: a: 8/4; b (rsLoRA): 5/sqrt(2)
SCALING = {"a": 8 / 4, "b": 5 / 2 ** 0.5}


def _exact(model, weights, scaling=SCALING):
    """Per layer: sum_i w_i s_i B_i A_i in float64."""
    out = {}
    for name, layer in lorakit.lora_layers(model):
        terms = [
            w * scaling[a] * (layer.lora_weights(a)[1].detach().double() @ layer.lora_weights(a)[0].detach().double())
            for a, w in weights.items() if layer.has_adapter(a)
        ]
        if terms:
            out[name] = sum(terms)
    return out


def _delta(model, name):
    """The new adapter's delta by hand from its stored factors: s B A with s = alpha / r = 1."""
    out = {}
    for n, l in lorakit.lora_layers(model):
        if l.has_adapter(name):
            a, b = (t.detach().double() for t in l.lora_weights(name))
            assert l.adapter(name).lora_alpha == l.adapter(name).r  # scaling folded into the factors
            out[n] = b @ a
    return out


def test_cat_is_exact_with_rslora_and_mixed_alphas(model, tmp_path):
    want = _exact(model, {"a": 0.7, "b": -1.3})
    errors = add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "ab", "cat")
    got = _delta(model, "ab")
    assert sorted(got) == sorted(want) and set(errors.values()) == {0.0}
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
    v = model.model.layers[0].self_attn.v_proj
    assert v.adapter("ab").r == 6 and model.model.layers[0].self_attn.q_proj.adapter("ab").r == 4
    assert lorakit.active_adapters(model) == ["ab"]
    # per-layer ranks survive a save/load round trip, in lorakit and in PEFT
    save_adapter(model, tmp_path, adapter_name="ab")
    ids = torch.randint(0, 64, (2, 5))
    out = model(ids).logits
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path)(ids).logits, out, rtol=1e-6, atol=1e-6)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(ids).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_is_the_best_rank_k_approximation(model, k):
    want = _exact(model, {"a": 1.0, "b": 0.5})
    errors = add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "s", "svd", svd_rank=k)
    got = _delta(model, "s")
    for n, d in want.items():
        s = torch.linalg.svdvals(d)
        discarded = s[k:].square().sum().sqrt()
        assert errors[n] == pytest.approx((discarded / s.square().sum().sqrt()).item(), rel=1e-6, abs=1e-9)
        assert torch.linalg.norm(got[n] - d) == pytest.approx(discarded.item(), rel=1e-4, abs=1e-6)
    assert all(l.adapter("s").r == k for _, l in lorakit.lora_layers(model) if l.has_adapter("s"))


def test_linear_only_where_exact(model):
    with pytest.raises(ConfigError, match="same A"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "lin", "linear")
    assert "lin" not in lorakit.list_adapters(model)
    inject(model, LoRAConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a2")
    with torch.no_grad():
        for _, l in lorakit.lora_layers(model):
            if l.has_adapter("a2"):
                l.lora_weights("a2")[0].copy_(l.lora_weights("a")[0])
    want = _exact(model, {"a": 2.0, "a2": 3.0}, {"a": 8 / 4, "a2": 2 / 4})
    errors = add_weighted_adapter(model, ["a", "a2"], [2.0, 3.0], "lin", "linear")
    assert sorted(errors) == sorted(want) and set(errors.values()) == {0.0}  # exact: no error reported
    for n, d in _delta(model, "lin").items():
        torch.testing.assert_close(d, want[n], rtol=1e-6, atol=1e-7)


def test_bad_arguments(model):
    with pytest.raises(lorakit.AdapterNotFoundError):
        add_weighted_adapter(model, ["a", "zz"], [1, 1], "n")
    with pytest.raises(ConfigError, match="2 adapters"):
        add_weighted_adapter(model, ["a", "b"], [1], "n")
    with pytest.raises(ConfigError, match="combination_type"):
        add_weighted_adapter(model, ["a"], [1], "n", "ties")
    with pytest.raises(lorakit.AdapterExistsError):
        add_weighted_adapter(model, ["a"], [1], "b")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_default_combination_is_the_exact_cat(model):
    want = _exact(model, {"a": 0.5, "b": 2.0})
    errors = add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "d")
    assert set(errors.values()) == {0.0}
    assert model.model.layers[0].self_attn.v_proj.adapter("d").r == 4 + 2  # ranks concatenated
    for n, d in _delta(model, "d").items():
        torch.testing.assert_close(d, want[n], rtol=1e-6, atol=1e-7)


def test_single_source_and_settings_come_from_the_first_adapter(tmp_path):
    import json

    m = tiny_llama()
    inject(m, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["q_proj"], init_lora_weights=True,
                         base_model_name_or_path="org/first", task_type="FEATURE_EXTRACTION"), "a")
    with torch.no_grad():  # init True leaves B = 0: give it values
        for _, l in lorakit.lora_layers(m):
            l.lora_weights("a")[1].normal_()
    inject(m, LoRAConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj"], init_lora_weights=False,
                         base_model_name_or_path="org/second", task_type="SEQ_CLS"), "b")
    want = _exact(m, {"a": 2.0}, {"a": 8 / 4})
    add_weighted_adapter(m, ["a"], [2.0], "one")
    for n, d in _delta(m, "one").items():
        torch.testing.assert_close(d, want[n], rtol=1e-6, atol=1e-7)
    add_weighted_adapter(m, ["a", "b"], [1.0, 1.0], "ab")
    q = m.model.layers[0].self_attn.q_proj
    assert q.adapter("ab").lora_dropout.p == 0.25  # the first adapter's dropout
    save_adapter(m, tmp_path, adapter_name="ab")
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["lora_dropout"], cfg["base_model_name_or_path"], cfg["task_type"]) == (0.25, "org/first", "FEATURE_EXTRACTION")
    assert cfg["init_lora_weights"] is False  # the stored factors are combined weights, not an initialisation


def test_existing_name_is_refused_even_on_other_layers(model):
    inject(model, LoRAConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), "k")
    with pytest.raises(lorakit.AdapterExistsError):
        add_weighted_adapter(model, ["k"], [1.0], "a")  # "a" lives on q_proj/v_proj, "k" only on k_proj
    assert lorakit.list_adapters(model) == ["a", "b", "k"]
    assert model.lora_state.configs["a"].r == 4 and not model.model.layers[0].self_attn.k_proj.has_adapter("a")


@pytest.mark.parametrize("adapters, weights", [("a", [1.0]), (["a"], 1.0), (["a", "b"], ["x", 1.0])])
def test_adapters_and_weights_must_be_lists_of_names_and_numbers(model, adapters, weights):
    with pytest.raises(ConfigError):
        add_weighted_adapter(model, adapters, weights, "n")
    assert lorakit.list_adapters(model) == ["a", "b"]


@pytest.mark.parametrize("svd_rank", [0, -1, 2.0, True, "2"])
def test_svd_rank_must_be_a_positive_int(model, svd_rank):
    with pytest.raises(ConfigError, match="svd_rank"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "n", "svd", svd_rank=svd_rank)
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_svd_rank_defaults_to_the_largest_source_rank(model):
    want = _exact(model, {"a": 1.0, "b": 1.0})
    errors = add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "s", "svd")
    assert {l.adapter("s").r for _, l in lorakit.lora_layers(model) if l.has_adapter("s")} == {4}  # max(4, 2)
    for n, d in want.items():
        s = torch.linalg.svdvals(d)
        assert errors[n] == pytest.approx((s[4:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-6, abs=1e-9)


def test_svd_error_of_a_zero_delta_is_zero_and_of_a_small_one_is_relative():
    m = tiny_llama()
    inject(m, LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=True), "z")  # B = 0: zero delta
    errors = add_weighted_adapter(m, ["z"], [1.0], "zz", "svd", svd_rank=1)
    assert errors and set(errors.values()) == {0.0}
    for d in _delta(m, "zz").values():
        assert torch.count_nonzero(d) == 0
    inject(m, LoRAConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    w = 1e-3  # ||Delta||_F^2 < 1; the relative error does not depend on the scale
    want = _exact(m, {"a": w}, {"a": 4 / 4})
    errors = add_weighted_adapter(m, ["a"], [w], "small", "svd", svd_rank=1)
    for n, d in want.items():
        s = torch.linalg.svdvals(d)
        assert s.square().sum() < 1 and s[1:].square().sum() > 0
        assert errors[n] == pytest.approx((s[1:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-6)


def test_svd_on_a_float64_model_keeps_float64_precision():
    m = tiny_llama(dtype=torch.float64)
    inject(m, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(m, LoRAConfig(r=2, lora_alpha=3, target_modules=["v_proj"], init_lora_weights=False), "b")
    want = _exact(m, {"a": 1.0, "b": 0.5}, {"a": 8 / 4, "b": 3 / 2})
    add_weighted_adapter(m, ["a", "b"], [1.0, 0.5], "s", "svd", svd_rank=6)  # rank 6 >= rank of every delta: exact
    for n, d in _delta(m, "s").items():
        torch.testing.assert_close(d, want[n], rtol=0, atol=1e-12)
