"""trainable_token_indices: PEFT's trainable tokens (rows of an embedding replaced, tied heads follow),
checked by hand, against PEFT, and for bad input."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterLoadError, ConfigError, LoRAConfig, MixedBatchError, TargetModuleError
from lorakit.trainable_tokens import TrainableTokensWrapper
from _parity_models import ids, llama

KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def tokens(tti, target_modules=("q_proj",), **kw):
    return LoRAConfig(r=2, target_modules=list(target_modules), trainable_token_indices=tti, **kw)


def set_rows(model, name="default", seed=4):
    """Give adapter ``name``'s rows known values; returns {row index: value}."""
    wrapper = model.model.embed_tokens
    idx, rows = wrapper.rows(name)
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)))
    return dict(zip(idx, rows.detach().clone()))


def test_rows_replace_embedding_rows_by_hand_and_only_they_train():
    base = llama(tied=True)
    w = base.model.embed_tokens.weight.detach().clone()
    model = lorakit.inject(llama(tied=True), tokens([3, 5]))
    assert torch.equal(model.model.embed_tokens(ids(64)), F.embedding(ids(64), w)), "fresh rows are the base rows"
    new = set_rows(model)
    expected_w = w.clone()
    for i, v in new.items():
        expected_w[i] = v
    x = ids(64)
    assert torch.equal(model.model.embed_tokens(x), F.embedding(x, expected_w))
    h = model.model(x).last_hidden_state
    torch.testing.assert_close(model(x).logits, h @ expected_w.T, rtol=1e-6, atol=1e-6)  # the tied head follows
    # (logits near 30: float32 rounding of another product order is a few 1e-6 absolute)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {"model.embed_tokens.trainable_tokens_delta.default"}
    model(x).logits.sum().backward()
    grad = model.model.embed_tokens.rows("default")[1].grad
    assert grad is not None and grad.abs().sum() > 0 and model.model.embed_tokens.base_layer.weight.grad is None


def test_tied_head_saves_once_merges_once_and_retied_after(tmp_path):
    model = lorakit.inject(llama(tied=True), tokens([3, 5, 7]))
    set_rows(model)
    assert isinstance(model.lm_head, TrainableTokensWrapper) and model.lm_head.leader is model.model.embed_tokens
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert [k for k in keys if "lora_" not in k] == [KEY]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == [3, 5, 7]
    x = ids(64)
    unmerged = model(x).logits.detach()
    lorakit.merge(model)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight
    torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=1e-5)
    plain = lorakit.unload(model, merge=True)
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain(x).logits, unmerged, rtol=0, atol=1e-5)


def test_tied_modules_given_other_rows_each_keep_their_own_and_merge_untied():
    model = lorakit.inject(llama(tied=True), tokens({"embed_tokens": [3, 5], "lm_head": [7]}))
    shared = model.model.embed_tokens.base_layer.weight
    assert model.lm_head.leader is None and model.lm_head.base_layer.weight is shared
    with torch.no_grad():
        for w in (model.model.embed_tokens, model.lm_head):
            w.rows("default")[1].add_(1.0)
    x = ids(64)
    unmerged = model(x).logits.detach()
    before = shared.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    assert model.lm_head.base_layer.weight is shared and torch.equal(shared, before)


def test_peft_mixed_batch_and_lorakit_mixed_batch_agree(tmp_path):
    peft = pytest.importorskip("peft")
    warnings.filterwarnings("ignore", module="peft")
    x = ids(64).repeat(2, 1)
    x[2, :2] = torch.tensor([9, 11])
    model = llama(tied=True)
    for name, tti, seed in (("a", [3, 5], 4), ("b", [9, 11, 5], 6)):
        lorakit.inject(model, tokens(tti, init_lora_weights=False), name)
        set_rows(model, name, seed)
        lorakit.save_adapter(model, tmp_path / name, name)
    names = ["a", None, "b", "a"]
    with lorakit.mixed_batch(model, names):
        mixed = model(x).logits
    pm = peft.PeftModel.from_pretrained(llama(tied=True), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    theirs = pm.eval()(x, adapter_names=["a", "__base__", "b", "a"]).logits
    torch.testing.assert_close(mixed, theirs, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(names):  # and each row equals the model with only its adapter
        with lorakit.disable_adapters(model) if n is None else _active(model, n):
            torch.testing.assert_close(mixed[i], model(x[i:i + 1]).logits[0], rtol=0, atol=1e-5)


def test_mixed_batch_runs_the_base_and_each_adapter_on_their_own_rows_only():
    """The base embedding and each adapter's rows see only their rows of the batch (the base ran on every row
    before, then each adapter's rows again); values by hand: F.embedding with the adapter's rows written in."""
    model = llama(tied=True)
    w = model.model.embed_tokens.weight.detach().clone()
    want_w = {None: w}
    for name, tti, seed in (("a", [3, 5], 4), ("b", [9, 11], 6)):
        lorakit.inject(model, tokens(tti, init_lora_weights=False), name)
        want_w[name] = w.clone()
        for i, v in set_rows(model, name, seed).items():
            want_w[name][i] = v
    emb = model.model.embed_tokens
    seen = []
    emb.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    x = ids(64).repeat(3, 1)  # 6 rows
    x[:, :2] = torch.tensor([3, 9])  # a row of each adapter in every row
    for names, base_calls in ((["b", None, "a", "b", None, "a"], [2, 2, 2]), (["a", "b", "a", "b", "a", "b"], [3, 3]),
                              (["b"] * 6, [6])):
        seen.clear()
        with lorakit.mixed_batch(model, names):
            got = emb(x)
        assert seen == base_calls, names  # functional_call runs the base module once per group, on its rows
        for i, n in enumerate(names):
            assert torch.equal(got[i], F.embedding(x[i], want_w[n])), (names, i)


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        lorakit.set_adapter(self.model, self.name)

    def __exit__(self, *exc):
        return False


def test_overlapping_active_adapters_and_weighted_combination_are_refused():
    model = llama()
    lorakit.inject(model, tokens([3, 5]), "a")
    lorakit.inject(model, tokens([5, 8]), "b")
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.raises(ConfigError, match=r"'a' and 'b' both replace row 5 of 'model.embed_tokens'"):
        model(ids(64))
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_delete_adapter_unwraps_and_second_adapter_shares_the_wrapper():
    model = llama(tied=True)
    lorakit.inject(model, tokens([3]), "a")
    lorakit.inject(model, tokens([4]), "b")
    assert model.model.embed_tokens.adapter_names == ["a", "b"] == model.lm_head.adapter_names
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tti, exc, message", [
    ([3, 3], ConfigError, "lists row 3 twice"),
    ([-1], ConfigError, "row indices >= 0"),
    ("3", ConfigError, "list of row indices"),
    ({"embed_tokens": []}, ConfigError, r"trainable_token_indices\['embed_tokens'\]"),
    ({1: [3]}, ConfigError, "map module names"),
])
def test_bad_indices_are_config_errors(tti, exc, message):
    with pytest.raises(exc, match=message):
        tokens(tti)


def _snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg, message", [
    (tokens([3, 64]), r"row 64 is out of range for 'model.embed_tokens', which has 64 rows"),
    (tokens({"embed_tokenz": [1]}), "entry 'embed_tokenz' matches no module"),
    (tokens([1], target_modules=["q_proj", "embed_tokens"]), "both target_modules and trainable_token_indices"),
    (tokens({"embed_tokens": [1]}, modules_to_save=["embed_tokens"]), "both in modules_to_save"),
    (tokens({"norm": [1]}), "without a 2-D weight"),
])
def test_bad_targets_name_the_module_and_change_nothing(cfg, message):
    model = llama()
    snap = _snapshot(model)
    with pytest.raises(TargetModuleError, match=message):
        lorakit.inject(model, cfg)
    after = _snapshot(model)
    assert after[0] == snap[0] and all(torch.equal(after[1][k], snap[1][k]) for k in snap[1])


def test_a_file_with_wrong_row_shape_is_refused_and_the_model_is_unchanged(tmp_path):
    model = lorakit.inject(llama(tied=True), tokens([3, 5]))
    lorakit.save_adapter(model, tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    t[KEY] = torch.zeros(3, 32)
    save_file(t, f)
    fresh = llama(tied=True)
    snap = _snapshot(fresh)
    with pytest.raises(AdapterLoadError, match=r"trainable_tokens_delta' has shape \[3, 32\] in the file but the "
                                               r"model needs \[2, 32\]"):
        lorakit.load_adapter(fresh, tmp_path)
    after = _snapshot(fresh)
    assert after[0] == snap[0] and all(torch.equal(after[1][k], snap[1][k]) for k in snap[1])
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_mixed_batch_still_needs_a_batch_that_fits():
    model = lorakit.inject(llama(), tokens([3]))
    with lorakit.mixed_batch(model, ["default", None, None]):
        with pytest.raises(MixedBatchError, match="batch size 2"):
            model(ids(64))


def test_compiled_rows_and_modules_to_save_trace_without_a_cached_key_lookup():
    """The forward of trainable tokens and of a modules_to_save copy looks its adapter up without
    ``adapter_key``'s ``lru_cache``, at which Dynamo warned under ``--compile``; the compiled model gives
    the logits of a plain model with those rows and that norm weight written in."""
    model = lorakit.inject(llama(), tokens([3, 5], modules_to_save=["norm"]))
    new = set_rows(model)
    norm = torch.randn(32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.model.norm.copy_for("default").weight.copy_(norm)
    expected = llama()
    with torch.no_grad():
        for i, v in new.items():
            expected.model.embed_tokens.weight[i] = v
        expected.model.norm.weight.copy_(norm)
    x = ids(64)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            logits = torch.compile(model, backend="eager")(x).logits
    finally:
        torch._dynamo.reset()
    assert not [w for w in said if "lru_cache" in str(w.message)]
    torch.testing.assert_close(logits, expected(x).logits, rtol=0, atol=1e-6)


def test_compiled_model_with_escaped_names_serves_one_adapter_and_a_mixed_batch():
    """Under ``torch.compile``: adapter names that need an escaped key were looked up through
    ``adapter_key``'s ``lru_cache`` (Dynamo warned), and a ``mixed_batch`` forward failed inside Dynamo;
    the row bookkeeping now runs eagerly. Values: a plain model with each adapter's LoRA delta
    ``s·B A`` (s = 4 / 2), rows and norm weight written in by hand."""
    model, names = llama(), ["a.b", "keys"]
    expected = {None: llama()}
    for i, n in enumerate(names):
        cfg = tokens([3, 5], lora_alpha=4, modules_to_save=["norm"], init_lora_weights=False)
        lorakit.inject(model, cfg, adapter_name=n)
        rows = set_rows(model, n, seed=10 + i)
        norm = torch.randn(32, generator=torch.Generator().manual_seed(20 + i))
        with torch.no_grad():
            model.model.norm.copy_for(n).weight.copy_(norm)
        plain = expected[n] = llama()
        with torch.no_grad():
            for i_row, v in rows.items():
                plain.model.embed_tokens.weight[i_row] = v
            plain.model.norm.weight.copy_(norm)
            for layer, mine in zip(plain.model.layers, model.model.layers):
                ad = mine.self_attn.q_proj.adapter(n)
                layer.self_attn.q_proj.weight.add_(2.0 * ad.lora_B @ ad.lora_A)
    x = ids(64)[:1].repeat(3, 1)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            lorakit.set_adapter(model, "a.b")
            single = compiled(x).logits
            with lorakit.mixed_batch(model, ["keys", None, "a.b"]):
                mixed = compiled(x).logits
    finally:
        torch._dynamo.reset()
    assert not [w for w in said if "lru_cache" in str(w.message)]
    torch.testing.assert_close(single, expected["a.b"](x).logits, rtol=0, atol=1e-5)
    for i, n in enumerate(["keys", None, "a.b"]):
        torch.testing.assert_close(mixed[i], expected[n](x[i:i + 1]).logits[0], rtol=0, atol=1e-5, msg=f"row {i} ({n})")


@pytest.mark.parametrize("padding_row", [False, True])
def test_the_replaced_rows_alone_give_what_the_whole_replaced_weight_gives_in_float64(padding_row, monkeypatch):
    """Embedding and tied head compute with the replaced rows only (no copy of the whole weight): outputs and the
    rows' gradients equal the module run with ``W'`` (``weight_with``) in float64; with a padding row among the
    replaced ones (whose gradient F.embedding drops) the embedding takes ``W'`` as before."""
    model = llama(tied=True).double()
    if padding_row:
        model.model.embed_tokens.padding_idx = 5
    lorakit.inject(model, tokens([3, 5, 60], init_lora_weights=False), "a")
    lorakit.inject(model, tokens([7], init_lora_weights=False), "b")
    lorakit.set_adapter(model, ["a", "b"])
    for name, seed in (("a", 4), ("b", 6)):
        set_rows(model, name, seed)
    x = ids(64)
    emb, head = model.model.embed_tokens, model.lm_head

    def run(whole: bool):
        for n in ("a", "b"):
            emb.rows(n)[1].grad = None
        if whole:  # the module with W' = W with the rows copied in, as before
            with monkeypatch.context() as m:
                m.setattr(TrainableTokensWrapper, "_plain", lambda self: False)
                logits = model(x).logits
        else:
            logits = model(x).logits
        logits.pow(2).mean().backward()
        return logits.detach(), [emb.rows(n)[1].grad.clone() for n in ("a", "b")]

    calls = []
    real = TrainableTokensWrapper.weight_with
    monkeypatch.setattr(TrainableTokensWrapper, "weight_with", lambda self, names: calls.append(self) or real(self, names))
    fast, fast_grads = run(False)
    assert calls == ([emb] if padding_row else [])  # the head never copies the weight; the embedding unless padding
    calls.clear()
    whole, whole_grads = run(True)
    assert calls == [emb, head]
    torch.testing.assert_close(fast, whole, rtol=0, atol=1e-12)
    for g, h in zip(fast_grads, whole_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, h, rtol=0, atol=1e-12)
