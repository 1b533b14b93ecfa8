import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterLoadError, LoRAConfig, TargetModuleError, inject, load_adapter, save_adapter
from conftest import tiny_llama

CFG = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


@pytest.fixture
def saved(tmp_path):
    model = inject(tiny_llama(), CFG)
    save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def _snapshot(model):
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snap):
    modules, state, grads = _snapshot(model)
    assert modules == snap[0]
    assert list(state) == list(snap[1]) and all(torch.equal(state[k], snap[1][k]) for k in state)
    assert grads == snap[2]


def _assert_refused(model, exc, match, call):
    """``call()`` raises ``exc`` (message matching ``match``) and leaves ``model`` exactly as it was."""
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        call()
    _assert_unchanged(model, snap)


def test_files_use_peft_names_and_only_adapter_weights(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 3 * 2
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    torch.testing.assert_close(a, model.model.layers[0].self_attn.q_proj.lora_weights("default")[0], rtol=0, atol=0)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)


def test_round_trip_reproduces_outputs(saved, ids):
    model, path = saved
    fresh = load_adapter(tiny_llama(), path)
    assert lorakit.list_adapters(fresh) == ["default"]
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_peft_loads_lorakit_adapter(saved, ids):
    peft = pytest.importorskip("peft")
    model, path = saved
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_lorakit_loads_peft_adapter(tmp_path, ids):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def _rewrite(path, fn):
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _rewrite(p, lambda t: t.pop(KEY)), "lacks key .*layers.0.self_attn.q_proj.lora_A"),
        (lambda p: _rewrite(p, lambda t: t.update({"base_model.model.foo.lora_A.weight": torch.zeros(1)})), "foo.lora_A"),
        (lambda p: _rewrite(p, lambda t: t.update({KEY: torch.zeros(3, 32)})), r"q_proj.lora_A.*\[3, 32\].*\[4, 32\]"),
        (lambda p: _rewrite(p, lambda t: t[KEY].__setitem__((0, 0), float("nan"))), "q_proj.lora_A.*NaN"),
        (lambda p: _rewrite(p, lambda t: t[KEY].__setitem__((0, 0), float("inf"))), "q_proj.lora_A.*Inf"),
        (lambda p: _rewrite(p, lambda t: t.update({KEY: torch.zeros(4, 32, dtype=torch.int32)})), "q_proj.lora_A.*dtype"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:500]), "truncated or corrupt"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "truncated or corrupt"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text('{"r": 0}'), "r must be"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json.*missing"),
        (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), "pickle"),
    ],
)
def test_bad_files_raise_naming_the_problem_and_leave_model_unchanged(saved, damage, message):
    _, path = saved
    damage(path)
    for target in (tiny_llama(), inject(tiny_llama(), LoRAConfig(target_modules=["o_proj"]), adapter_name="other")):
        _assert_refused(target, AdapterLoadError, message, lambda: load_adapter(target, path))


def test_missing_folder_and_wrong_architecture(saved):
    _, path = saved
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_adapter(tiny_llama(), path / "nope")
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json' is a file; an adapter is a folder"):
        load_adapter(tiny_llama(), path / "adapter_config.json")  # said "does not exist"
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    _assert_refused(other, TargetModuleError, "q_proj", lambda: load_adapter(other, path))


def test_existing_adapter_with_another_config_is_refused(saved):
    _, path = saved
    for cfg in (LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                LoRAConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])):
        model = inject(tiny_llama(), cfg)
        _assert_refused(model, AdapterLoadError, "'default' already exists with a different config",
                        lambda: load_adapter(model, path))


def test_load_while_merged_is_refused(saved):
    model, path = saved
    lorakit.merge(model)
    _assert_refused(model, lorakit.MergeStateError, None, lambda: load_adapter(model, path, adapter_name="other"))


def test_non_string_adapter_name_changes_nothing(saved):
    _, path = saved
    model = tiny_llama()
    for call in (lambda: inject(model, CFG, adapter_name=5), lambda: load_adapter(model, path, adapter_name=None)):
        _assert_refused(model, lorakit.ConfigError, "adapter name must be a str", call)


def test_reload_into_existing_adapter_replaces_weights(saved, ids):
    model, path = saved
    other = inject(tiny_llama(), CFG)
    load_adapter(other, path)
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_is_atomic(saved, monkeypatch):
    model, path = saved
    before = (path / "adapter_model.safetensors").read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.io.save_file", boom)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_weights("default")[0].add_(1)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_to_a_file_path_is_refused(saved):
    model, path = saved
    target = path.parent / "adapter.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(lorakit.errors.SaveError, match="is a file; save_adapter writes a folder"):
        save_adapter(model, target)
    assert target.read_bytes() == b"keep me"


def test_save_with_given_tensors_writes_them_and_refuses_other_keys(saved, tmp_path):
    model, path = saved
    own = load_file(path / "adapter_model.safetensors")
    given = {k: torch.full_like(t, float(i)) for i, (k, t) in enumerate(sorted(own.items()))}
    save_adapter(model, tmp_path / "given", tensors=given)
    written = load_file(tmp_path / "given" / "adapter_model.safetensors")
    assert set(written) == set(own) and all(torch.equal(written[k], given[k]) for k in own)
    assert (tmp_path / "given" / "adapter_config.json").read_bytes() == (path / "adapter_config.json").read_bytes()
    first = sorted(own)[0]
    for bad, why in (({k: t for k, t in given.items() if k != first}, "missing"),
                     (given | {"base_model.model.extra.lora_A.weight": torch.zeros(1)}, "not in the adapter")):
        with pytest.raises(lorakit.errors.SaveError, match=why):
            save_adapter(model, tmp_path / "bad", tensors=bad)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("offset, ok", [(0.0, True), (1e-3, False)])
def test_full_base_weight_copy_in_the_file_must_equal_the_model(saved, ids, offset, ok):
    """PEFT's save_embedding_layers writes ``<module>.base_layer.weight``: accepted only when it is the model's weight."""
    model, path = saved
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    _rewrite(path, lambda t: t.update({key: tiny_llama().model.layers[0].self_attn.q_proj.weight.detach() + offset}))
    target = tiny_llama()
    if ok:
        torch.testing.assert_close(load_adapter(target, path)(ids).logits, model(ids).logits, rtol=0, atol=0)
    else:
        _assert_refused(target, AdapterLoadError, "full copy of 'model.layers.0.self_attn.q_proj'.*differs",
                        lambda: load_adapter(target, path))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2)).eval()


@pytest.mark.parametrize("bias,trained", [("all", ["0.base_layer.bias", "2.bias"]), ("lora_only", ["0.base_layer.bias"])])
def test_bias_modes_train_save_and_load_as_peft(tmp_path, bias, trained):
    """bias="all" / "lora_only": the chosen model biases are trainable and saved under PEFT's keys;
    PEFT loads lorakit's file and lorakit loads PEFT's, outputs equal."""
    peft = pytest.importorskip("peft")
    ours = _mlp()
    inject(ours, LoRAConfig(r=4, target_modules=["0"], bias=bias, init_lora_weights=False))
    assert [n for n, p in ours.named_parameters() if p.requires_grad and "bias" in n] == trained
    with torch.no_grad():
        for n in trained:
            ours.get_parameter(n).add_(0.5)  # what training does to them
    save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k for k in keys if "bias" in k} == {f"base_model.model.{n}" for n in trained}
    x = torch.randn(3, 10)
    theirs = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-6, atol=1e-6)
    back = load_adapter(_mlp(), tmp_path / "ours")
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)

    peft_model = peft.get_peft_model(_mlp(), peft.LoraConfig(r=4, target_modules=["0"], bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.25)
    peft_model.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(_mlp(), tmp_path / "theirs")
    torch.testing.assert_close(mine(x), peft_model(x), rtol=1e-6, atol=1e-6)
    lorakit.merge(mine)
    torch.testing.assert_close(mine(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_a_bias_all_adapter_loads_whether_or_not_another_adapter_wrapped_its_modules(tmp_path):
    """A bias="all" file names an unadapted module's bias ``2.bias``, or ``2.base_layer.bias`` if another
    adapter had wrapped module 2 when it was saved; loading expected the spelling of the model at hand, so
    a load failed after (or, for the second file, before) another adapter on module 2."""
    ours = _mlp()
    inject(ours, LoRAConfig(r=4, target_modules=["0"], bias="all", init_lora_weights=False), "ball")
    with torch.no_grad():
        ours[2].bias.add_(0.5)
        ours[0].base_layer.bias.add_(0.25)
    save_adapter(ours, tmp_path / "ball", adapter_name="ball")  # ``2.bias``: module 2 not wrapped
    other = _mlp()
    inject(other, LoRAConfig(r=2, target_modules=["2"]), "plain")
    save_adapter(other, tmp_path / "plain", adapter_name="plain")
    load_adapter(other, tmp_path / "ball", adapter_name="ball")  # module 2 wrapped by "plain" now
    assert torch.equal(other[2].base_layer.bias, ours[2].bias) and torch.equal(other[0].base_layer.bias,
                                                                                ours[0].base_layer.bias)
    save_adapter(other, tmp_path / "ball2", adapter_name="ball")  # the same keys as saved alone: PEFT loads it
    assert load_file(tmp_path / "ball2" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "ball" / "adapter_model.safetensors").keys()
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path / "ball2")).eval()
    torch.testing.assert_close(theirs(torch.ones(2, 10)), ours(torch.ones(2, 10)), rtol=1e-6, atol=1e-6)
    save_file({k.replace("2.bias", "2.base_layer.bias"): v  # as PEFT saves it with module 2 wrapped by another
               for k, v in load_file(tmp_path / "ball" / "adapter_model.safetensors").items()},
              tmp_path / "ball2" / "adapter_model.safetensors")
    alone = load_adapter(_mlp(), tmp_path / "ball2", adapter_name="ball")
    assert torch.equal(alone[2].bias, ours[2].bias)
    x = torch.randn(3, 10)
    torch.testing.assert_close(alone(x), ours(x), rtol=0, atol=0)


def test_an_adapter_that_trains_biases_is_not_mixed_or_combined():
    model = tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], bias="lora_only"), "b")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), "plain")
    with pytest.raises(lorakit.MixedBatchError, match="'b' trains the model's own biases"):
        with lorakit.mixed_batch(model, ["b", "plain"]):
            pass
    with lorakit.mixed_batch(model, ["b", "b"]):  # alone it is fine
        pass
    with pytest.raises(lorakit.ConfigError, match="trains base biases"):
        lorakit.add_weighted_adapter(model, ["b", "plain"], [0.5, 0.5], "mix")


def test_a_lora_only_adapter_loads_beside_another_adapter(tmp_path):
    """The biases a bias="lora_only" adapter expects are its own modules', not those of modules another
    adapter wrapped: it loads into a model where "2" already carries an adapter."""
    src = _mlp()
    inject(src, LoRAConfig(r=4, target_modules=["0"], bias="lora_only", init_lora_weights=False))
    with torch.no_grad():
        src.get_parameter("0.base_layer.bias").add_(0.5)
    save_adapter(src, tmp_path)
    dst = _mlp()
    inject(dst, LoRAConfig(r=2, target_modules=["2"]), "other")
    load_adapter(dst, tmp_path, "mine")
    x = torch.randn(3, 10)
    lorakit.set_adapter(dst, "mine")
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_a_failed_save_leaves_the_adapter_folder_as_it_was_and_raises_save_error(tmp_path, monkeypatch):
    """The weights were renamed into place before the config was written: a full disk at the config left
    another adapter's weights beside the old config, which then loaded silently with wrong outputs, and the
    error was a bare OSError. Now both files are written before either is renamed, and the error is typed."""
    import errno

    import lorakit.durable
    from lorakit.errors import LoRAError, SaveError

    model = _mlp()
    inject(model, LoRAConfig(r=4, target_modules=["0"], lora_alpha=8, init_lora_weights=False), "old")
    save_adapter(model, tmp_path / "a", adapter_name="old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    inject(model, LoRAConfig(r=4, target_modules=["0"], lora_alpha=64, init_lora_weights=False), "new")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lorakit.durable.json, "dump", full)
    with pytest.raises(SaveError, match=r"could not write adapter 'new' to '.*a': No space left on device") as e:
        save_adapter(model, tmp_path / "a", adapter_name="new")
    assert isinstance(e.value, LoRAError) and isinstance(e.value, OSError)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # no temporary file either
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError, match="could not write adapter 'new'"):  # NotADirectoryError before
        save_adapter(model, tmp_path / "file" / "sub", adapter_name="new")
