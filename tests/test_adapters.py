import pytest
import torch

import lorakit
from lorakit import (
    AdapterNotFoundError, LoRAConfig, MergeStateError, active_adapters, delete_adapter, disable_adapters, inject,
    list_adapters, load_adapter, merge, save_adapter, set_adapter, trainable_parameters, unmerge,
)
from conftest import tiny_llama

NAMES = ["foo", "foobar", "x.y", "a/b"]
CONFIGS = [
    LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    LoRAConfig(r=2, lora_alpha=5, use_rslora=True, target_modules="all-linear", init_lora_weights=False),
    LoRAConfig(r=3, lora_alpha=3, target_modules=["v_proj", "down_proj"], init_lora_weights=False),
    LoRAConfig(r=1, lora_alpha=16, target_modules=["o_proj"], init_lora_weights=False),
]


@pytest.fixture
def multi():
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for n, c in zip(NAMES, CONFIGS):
        inject(model, c, adapter_name=n)
    return model, base


def _single_reference(model, name, tmp_path, ids):
    """Output of a fresh base model carrying only adapter ``name`` (via its saved files)."""
    save_adapter(model, tmp_path / "one", adapter_name=name)
    return load_adapter(tiny_llama(), tmp_path / "one")(ids).logits


def _base_weights(model):
    return {n: layer.base_layer.weight.clone() for n, layer in lorakit.lora_layers(model)}


def test_each_adapter_alone_equals_its_single_adapter_reference(multi, tmp_path, ids):
    model, _ = multi
    assert list_adapters(model) == NAMES
    assert active_adapters(model) == ["a/b"]  # the newest added adapter is the only active one
    for n in NAMES:
        set_adapter(model, n)
        torch.testing.assert_close(model(ids).logits, _single_reference(model, n, tmp_path, ids), rtol=1e-5, atol=1e-5)


def test_saved_files_hold_only_that_adapter(multi, tmp_path):
    model, _ = multi
    save_adapter(model, tmp_path / "s", adapter_name="x.y")
    cfg = lorakit.read_adapter(tmp_path / "s")[0]
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (3, 3.0, ["v_proj", "down_proj"])


def test_several_active_adapters_add_their_deltas(multi, ids):
    model, _ = multi
    layer = model.model.layers[0].self_attn.v_proj  # has foo, foobar, x.y
    x = torch.randn(3, 32)
    set_adapter(model, ["foo", "x.y"])
    # by hand in float64: W x + b + s_foo B A x + s_xy B A x (foo: 8/4; x.y: 3/3)
    want = layer.base_layer.weight.double() @ x.double().T
    want = want.T + layer.base_layer.bias.double() if layer.base_layer.bias is not None else want.T
    for name, s in (("foo", 8 / 4), ("x.y", 3 / 3)):
        A, B = (t.detach().double() for t in layer.lora_weights(name))
        want = want + s * x.double() @ A.T @ B.T
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-6, atol=1e-6)
    out = model(ids).logits
    merge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_requires_grad_and_counts_follow_the_active_set(multi):
    model, _ = multi
    set_adapter(model, "x.y")
    # x.y: v_proj (32->16) and down_proj (48->32) in 2 layers, r=3
    assert trainable_parameters(model)[0] == 2 * 3 * ((32 + 16) + (48 + 32))
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(lorakit.adapter.adapter_key("x.y") in n and ("lora_A" in n or "lora_B" in n) for n in grads)
    set_adapter(model, ["foo", "x.y"])
    assert trainable_parameters(model)[0] == 2 * 3 * 128 + 2 * 4 * ((32 + 32) + (32 + 16))


def test_disable_adapters_gives_base_outputs_nested_and_on_exception(multi, ids):
    model, _ = multi
    with disable_adapters(model):
        base_out = model(ids).logits
    reference = tiny_llama()(ids).logits
    torch.testing.assert_close(base_out, reference, rtol=0, atol=0)
    set_adapter(model, ["foo", "foobar"])
    out = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            with disable_adapters(model):
                torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
            torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
            raise RuntimeError("boom")
    assert active_adapters(model) == ["foo", "foobar"]
    torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)


def test_disable_while_merged_unmerges_and_remerges_bitwise(multi, ids):
    model, base = multi
    merge(model)
    merged = _base_weights(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)
    assert all(torch.equal(w, merged[n]) for n, w in _base_weights(model).items())


def test_switching_while_merged_is_refused(multi):
    model, _ = multi
    merge(model)
    with pytest.raises(MergeStateError):
        set_adapter(model, "foo")
    with pytest.raises(MergeStateError):
        inject(model, LoRAConfig(), adapter_name="new")
    assert active_adapters(model) == ["a/b"]
    set_adapter(model, "a/b")  # same set: allowed


def test_delete_touches_only_that_adapter(multi, tmp_path, ids):
    model, _ = multi
    set_adapter(model, "foobar")
    want = model(ids).logits
    set_adapter(model, ["foo", "foobar"])
    delete_adapter(model, "foo")  # active: removed from the active set too
    assert list_adapters(model) == ["foobar", "x.y", "a/b"] and active_adapters(model) == ["foobar"]
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    assert all(not layer.has_adapter("foo") for _, layer in lorakit.lora_layers(model))
    with pytest.raises(AdapterNotFoundError):
        delete_adapter(model, "foo")
    merge(model)
    with pytest.raises(MergeStateError, match="foobar"):
        delete_adapter(model, "foobar")
    assert "foobar" in list_adapters(model)


def test_base_weights_bitwise_unchanged_after_any_sequence(multi, ids):
    model, base = multi
    for step in [["foo"], ["foobar", "x.y"], ["a/b"], NAMES]:
        set_adapter(model, step)
        model(ids)
        merge(model)
        with disable_adapters(model):
            model(ids)
        unmerge(model)
    for n, layer in lorakit.lora_layers(model):
        assert torch.equal(layer.base_layer.weight, base[f"{n}.weight"]), n


def test_load_beside_existing_adapters(multi, tmp_path, ids):
    model, _ = multi
    save_adapter(model, tmp_path / "foo", adapter_name="foo")
    load_adapter(model, tmp_path / "foo", adapter_name="foo.copy")
    assert active_adapters(model) == ["foo.copy"]
    out = model(ids).logits
    set_adapter(model, "foo")
    torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)
    with pytest.raises(AdapterNotFoundError):
        set_adapter(model, "nope")


def test_repeated_names_are_active_once_and_deleted_names_stay_deleted(multi, ids):
    model, _ = multi
    set_adapter(model, "foo")
    once = model(ids).logits
    set_adapter(model, ["foo", "foo"])
    assert active_adapters(model) == ["foo"]
    torch.testing.assert_close(model(ids).logits, once, rtol=0, atol=0)
    set_adapter(model, ["foo", "x.y"])
    with disable_adapters(model):
        delete_adapter(model, "x.y")
    assert active_adapters(model) == ["foo"]
    torch.testing.assert_close(model(ids).logits, once, rtol=0, atol=0)
