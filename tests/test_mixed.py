import pytest
import torch

import lorakit
import lorakit.adapter
import lorakit.bank
import lorakit.hot
from lorakit.adapter import masked_bypass_
from lorakit import (
    AdapterNotFoundError, LoRAConfig, MergeStateError, MixedBatchError, active_adapters, disable_adapters, inject,
    merge, mixed_batch, set_adapter,
)
from conftest import alone_logits as _single, assert_rows_equal_alone, tiny_llama


@pytest.fixture
def model():
    m = tiny_llama()
    inject(m, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(m, LoRAConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear", init_lora_weights=False), "b")
    inject(m, LoRAConfig(r=3, lora_alpha=6, target_modules=["o_proj"], init_lora_weights=False), "c.d")
    return m


FORMS = {  # (DENSE_COLUMNS, DENSE_WORK, BANK_ROWS) that select each form of a batched layer
    "bank": (10 ** 9, 10 ** 9, 0),  # every resident adapter on every row, masked: nothing gathered
    "bank-segments": (0, 0, 10 ** 9),  # every slot's rows padded, one bmm pair over the bank: nothing gathered
    "segments": (0, 0, 0),  # slices when each adapter's rows are consecutive, else the mix's padded segments
}


@pytest.mark.parametrize(
    "names",
    [["a", None, "b", "a"], ["a", "b", "c.d", None], ["b"], ["c.d", "c.d", "c.d", "c.d"], [None, None, None, None],
     ["b", "a", "b", "b", None, "c.d", "b", "a"], ["a", "a", "b", "c.d", "c.d", None]],
)
@pytest.mark.parametrize("grad", [True, False, "inference_mode"])  # no gradients: a batched path
@pytest.mark.parametrize("form", list(FORMS))
def test_each_row_equals_its_adapter_alone(model, names, grad, form, monkeypatch):
    import lorakit.mixed

    calls = []
    for path in ("_add_slots", "_add_bank", "gathered"):
        fn = getattr(lorakit.mixed.RowRouter, path)
        monkeypatch.setattr(lorakit.mixed.RowRouter, path, (lambda f, p: lambda *a: calls.append(p) or f(*a))(fn, path))
    dense = []
    monkeypatch.setattr(lorakit.mixed, "masked_bypass_", lambda *a: dense.append(a[2].shape[1]) or masked_bypass_(*a))
    copy = lorakit.hot.HotBank._copy
    monkeypatch.setattr(lorakit.hot.HotBank, "_copy", lambda *a: calls.append("copy") or copy(*a))
    for name, value in zip(("DENSE_COLUMNS", "DENSE_WORK", "BANK_ROWS"), FORMS[form]):
        monkeypatch.setattr(lorakit.mixed, name, value)
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (len(names), 6))
    refs = {n: _single(model, n, ids) for n in set(names)}
    set_adapter(model, "a")
    mode = torch.inference_mode() if grad == "inference_mode" else torch.set_grad_enabled(grad)
    with mixed_batch(model, names), mode:
        out = model(ids).logits
    present = set(names) - {None}
    several = {"a", "b"} <= present or {"b", "c.d"} <= present  # q/v_proj hold a and b, o_proj b and c.d
    batched = several and grad is not True
    if form == "bank":  # each batched layer: all of its adapters (2 x their ranks' columns), nothing copied
        assert bool(dense) == batched and "copy" not in calls and "_add_slots" not in calls
    elif form == "bank-segments":
        assert not dense and ("_add_bank" in calls) == batched and "copy" not in calls
    else:
        assert not dense
        rows = {n: [i for i, m in enumerate(names) if m == n] for n in present}
        if all(r == list(range(r[0], r[0] + len(r))) for r in rows.values()):  # consecutive rows: slices, no copies
            assert calls == []
        elif names == ["a", None, "b", "a"] and grad is not True:  # padding fits: one bmm pair over the bank's slots
            assert "_add_slots" in calls and "copy" not in calls
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)
    assert active_adapters(model) == ["a"]
    torch.testing.assert_close(model(ids).logits, refs["a"] if "a" in refs else _single(model, "a", ids))


def test_bank_layout_over_slots():
    from lorakit.rows import bank_layout

    lay = bank_layout(["x", "y", "x", None, "y", "y"], ("y", "z", "x"), "cpu")  # y: rows 1, 4, 5; x: rows 0, 2
    assert lay.length == 3 and lay.index.tolist() == [1, 4, 5, 0, 0, 0, 0, 2, 0]
    assert lay.keep.flatten().tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0]  # z's slot and x's third place: padding
    assert lay.inverse.tolist() == [6, 0, 7, 9, 1, 2] and not lay.complete  # row 3 (None) -> the zero row 9
    even = bank_layout(["x", "y", "y", "x"], ("x", "y"), "cpu")
    assert even.keep is None and even.complete and even.inverse.tolist() == [0, 2, 3, 1] and not even.identity
    grouped = bank_layout(["x", "x", "y", "y"], ("x", "y"), "cpu")  # rows already in slot order: nothing to gather
    assert grouped.identity and grouped.index.tolist() == [0, 1, 2, 3]
    assert not bank_layout(["x", "x", "y", None], ("x", "y"), "cpu").identity


def test_rows_grouped_in_slot_order_are_not_gathered(monkeypatch):
    import lorakit.mixed

    m = tiny_llama()
    for name, r in (("p", 2), ("q", 3)):
        inject(m, LoRAConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False), name)
    monkeypatch.setattr(lorakit.mixed, "DENSE_COLUMNS", 0)  # the bank's slots, not the dense form
    gathers = []
    gathered = lorakit.mixed.RowRouter.gathered
    monkeypatch.setattr(lorakit.mixed.RowRouter, "gathered", lambda *a: gathers.append(1) or gathered(*a))
    torch.manual_seed(11)
    ids = torch.randint(0, 64, (4, 3))
    names = ["p", "p", "q", "q"]
    refs = {n: _single(m, n, ids) for n in ("p", "q")}
    with mixed_batch(m, names), torch.no_grad():
        out = m(ids).logits
    assert gathers == []
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("dense_work", [0, 10 ** 9])
def test_generate_with_per_row_adapters(model, beams, dense_work, monkeypatch):
    import lorakit.mixed

    monkeypatch.setattr(lorakit.mixed, "DENSE_WORK", dense_work)
    monkeypatch.setattr(lorakit.mixed, "DENSE_COLUMNS", dense_work)
    torch.manual_seed(4)
    ids = torch.randint(1, 64, (3, 4))
    names = ["b", None, "a"]
    with mixed_batch(model, names):
        got = _generate(model, ids, num_beams=beams)
    for i, n in enumerate(names):
        if n is None:
            with disable_adapters(model):
                want = _generate(model, ids[i : i + 1], num_beams=beams)
        else:
            set_adapter(model, n)
            want = _generate(model, ids[i : i + 1], num_beams=beams)
        assert torch.equal(got[i], want[0]), (i, n)


def test_errors_come_before_any_adapter_compute(model):
    calls = []  # a forward hook fires only after its module's forward returned
    for _, layer in lorakit.lora_layers(model):
        layer.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 64, (3, 5))
    with pytest.raises(AdapterNotFoundError, match="zz"):
        with mixed_batch(model, ["a", "zz", None]):
            model(ids)
    with pytest.raises(MixedBatchError, match="2 adapter names.*batch size 3"):
        with mixed_batch(model, ["a", "b"]):
            model(ids)
    assert lorakit.active_adapters(model) == ["c.d"] and model.lora_state.rows is None  # the block left nothing behind
    with pytest.raises(MixedBatchError):
        with mixed_batch(model, []):
            pass
    assert calls == []
    model.train()
    with pytest.raises(MixedBatchError, match="eval"):
        with mixed_batch(model, ["a", "b", None]):
            pass
    model.eval()
    merge(model)
    with pytest.raises(MergeStateError):
        with mixed_batch(model, ["a", "b", None]):
            pass


def test_context_is_removed_after_exit(model):
    ids = torch.randint(0, 64, (2, 5))
    set_adapter(model, "b")
    before = model(ids).logits
    with mixed_batch(model, ["a", None]):
        model(ids)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_nesting_and_disable_inside_are_refused(model):
    ids = torch.randint(0, 64, (2, 5))
    with mixed_batch(model, ["a", None]):
        with pytest.raises(MixedBatchError, match="nested"):
            with mixed_batch(model, ["b", "b"]):
                pass
        with pytest.raises(MixedBatchError, match="disable_adapters"):
            with disable_adapters(model):
                pass
        out = model(ids).logits  # the outer block still holds
    torch.testing.assert_close(out[0], _single(model, "a", ids)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(MixedBatchError):
        with mixed_batch(model, "ab"):
            pass


def test_layers_reading_one_input_share_its_gather(monkeypatch):
    import lorakit.mixed

    m = tiny_llama()
    for name in ("a", "b"):
        inject(m, LoRAConfig(r=2, target_modules="all-linear", init_lora_weights=False), name)
    monkeypatch.setattr(lorakit.mixed, "DENSE_WORK", 0)  # the padded-segment path, which gathers rows
    gathered, results = lorakit.mixed.RowRouter.gathered, []
    monkeypatch.setattr(lorakit.mixed.RowRouter, "gathered", lambda *a: results.append(gathered(*a)) or results[-1])
    ids = torch.randint(0, 64, (4, 5))
    with mixed_batch(m, ["a", "b", "b", "a"]), torch.no_grad():
        m(ids)
    layers = m.config.num_hidden_layers
    # per decoder layer 7 projections, 4 distinct inputs: q/k/v share one, gate/up another
    assert len(results) == 7 * layers and len({id(x) for x in results}) == 4 * layers


def test_resident_adapters_are_stacked_once_and_follow_changes(model, monkeypatch):
    """A new mix of resident adapters reuses each layer's AdapterBank (no restacking); an in-place change of an
    adapter's factors (an optimizer step, a reload) rewrites its slot; a new adapter restacks that layer once."""
    import lorakit.adapter

    stack, stacks = lorakit.adapter.stack, []
    monkeypatch.setattr(lorakit.adapter, "stack", lambda *a: stacks.append(1) or stack(*a))
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (4, 6))

    def check(names):
        assert_rows_equal_alone(model, names, ids)

    copy, copies = lorakit.hot.HotBank._copy, []
    monkeypatch.setattr(lorakit.hot.HotBank, "_copy", lambda *a: copies.append(1) or copy(*a))
    check(["a", "b", "c.d", None])
    built, copied = len(stacks), len(copies)
    assert built == 3 * model.config.num_hidden_layers  # q/v_proj (a, b) and o_proj (b, c.d) of each block
    check(["c.d", None, "b", "a"])  # the same set of adapters on other rows: nothing copied again
    assert len(copies) == copied
    check(["b", "a", None, "b"])  # other mixes of the same adapters
    check(["c.d", "b", "b", "c.d"])
    assert len(stacks) == built
    with torch.no_grad():  # what an optimizer step does: the factors change in place
        for _, layer in lorakit.lora_layers(model):
            if layer.has_adapter("b"):
                layer.lora_weights("b")[1].add_(0.05)
    check(["a", "b", "b", "a"])
    assert len(stacks) == built  # slots rewritten, nothing restacked
    inject(model, LoRAConfig(r=5, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False), "new")
    check(["new", "a", "b", "new"])
    assert len(stacks) == built + model.config.num_hidden_layers  # q_proj of each block, once


def test_changing_adapters_inside_a_block_or_a_batchless_input_is_refused(model, tmp_path):
    ids = torch.randint(0, 64, (2, 5))
    lorakit.save_adapter(model, tmp_path / "a", adapter_name="a")
    with mixed_batch(model, ["a", "b"]):
        with pytest.raises(MixedBatchError, match="delete adapter 'b' inside mixed_batch"):
            lorakit.delete_adapter(model, "b")
        with pytest.raises(MixedBatchError, match="inside mixed_batch"):
            inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), "late")
        with pytest.raises(MixedBatchError, match="cannot load adapter 'a' inside mixed_batch"):
            lorakit.load_adapter(model, tmp_path / "a", adapter_name="a")  # over an existing name, too
    assert lorakit.list_adapters(model) == ["a", "b", "c.d"]
    layer = model.model.layers[0].self_attn.q_proj
    with mixed_batch(model, ["a", "b"]):
        with pytest.raises(MixedBatchError, match=r"batch dimension; a layer got shape \[32\]"):
            layer(torch.randn(32))
    refs = {n: _single(model, n, ids) for n in ("a", "b")}
    with mixed_batch(model, ["a", "b"]), torch.no_grad():
        model.train()  # after the entry check: the next forward is refused, not run with dropout per row
        with pytest.raises(MixedBatchError, match="training mode inside mixed_batch"):
            model(ids)
        model.eval()
        out = model(ids).logits
    for i, n in enumerate(("a", "b")):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


def test_bank_restacked_for_a_new_adapter_also_takes_in_place_changes(model):
    """Between two blocks an adapter trains in place and another one arrives on the same layers: the
    rows of the changed adapter follow its new factors."""
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (4, 6))

    def rows_equal_alone(names):
        refs = {n: _single(model, n, ids) for n in set(names) - {None}}
        with mixed_batch(model, names), torch.no_grad():
            out = model(ids).logits
        for i, n in enumerate(names):
            if n is not None:
                torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)

    rows_equal_alone(["a", "b", "b", "a"])
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            if layer.has_adapter("a"):
                layer.lora_weights("a")[1].mul_(-2.0)
    inject(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "e")
    rows_equal_alone(["a", "b", "b", "a"])


def test_bank_follows_factors_replaced_through_data(model):
    """``lora_A.data = ...`` gives the Parameter new storage without a version bump; the next block sees it."""
    torch.manual_seed(7)
    ids = torch.randint(0, 64, (4, 6))
    names = ["a", "b", "b", "a"]
    with mixed_batch(model, names), torch.no_grad():
        model(ids)  # stacks the bank
    for _, layer in lorakit.lora_layers(model):
        if layer.has_adapter("b"):
            a = layer.lora_weights("b")[0]
            a.data = torch.randn_like(a)
    refs = {n: _single(model, n, ids) for n in ("a", "b")}
    with mixed_batch(model, names), torch.no_grad():
        out = model(ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


def test_bank_follows_factors_replaced_through_data_twice_in_a_row(model):
    """``p.data = t`` twice between blocks (new user's report): the second tensor used to land at the first
    one's freed address, where the storage check could not tell it from the factors the slot holds."""
    torch.manual_seed(8)
    ids = torch.randint(0, 64, (4, 1))  # decoding-sized: the bank's forms
    names = ["a", "b", None, "b"]
    for _ in range(4):
        with mixed_batch(model, names), torch.no_grad():
            model(ids)
        for _, layer in lorakit.lora_layers(model):
            if layer.has_adapter("b"):
                a = layer.lora_weights("b")[0]
                a.data = torch.randn_like(a)
                a.data = torch.randn_like(a)
        refs = {n: _single(model, n, ids) for n in ("a", "b", None)}
        with mixed_batch(model, names), torch.no_grad():
            out = model(ids).logits
        for i, n in enumerate(names):
            torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", list(FORMS))
def test_set_rows_routes_the_next_forwards_and_checks_no_factor_twice(model, form, monkeypatch):
    """Inside one block, ``set_rows`` changes the rows (other mixes, None rows, another batch size, an
    adapter new to the block): every row equals its adapter alone; the factors the block checked are not
    checked again, an adapter new to the block is, once per layer holding it."""
    import lorakit.mixed

    for name, value in zip(("DENSE_COLUMNS", "DENSE_WORK", "BANK_ROWS"), FORMS[form]):
        monkeypatch.setattr(lorakit.mixed, name, value)
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (6, 5))
    mixes = [["a", "b", None, "a", "b", "b"], ["b", None, "a", "b", "a", "a"], ["a", "a", "b"], ["c.d", "b", "b", "a",
             None, "c.d"]]
    refs = {n: _single(model, n, ids) for n in ("a", "b", "c.d", None)}
    stale, checked = lorakit.bank.AdapterBank._stale, []
    monkeypatch.setattr(lorakit.bank.AdapterBank, "_stale",
                        lambda self, names: checked.extend((id(self), n) for n in names) or stale(self, names))
    with torch.no_grad(), mixed_batch(model, mixes[0]):
        for k, names in enumerate(mixes):
            if k:
                before = len(checked)
                lorakit.set_rows(model, names)
            x = ids[: len(names)]
            out = model(x).logits
            for i, n in enumerate(names):
                torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)
            new = checked[before:] if k else []
            if k in (1, 2):  # the adapters of the first mix again: no slot checked
                assert new == []
            elif k == 3:  # c.d is new to the block: checked in the o_proj layers that hold it
                assert [n for _, n in new].count("c.d") == model.config.num_hidden_layers
    assert len(checked) == len(set(checked))  # no slot of any layer checked twice in the block


def test_set_rows_outside_a_block_or_with_bad_names_changes_nothing(model):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(MixedBatchError, match="inside a mixed_batch block"):
        lorakit.set_rows(model, ["a", "b"])
    with torch.no_grad(), mixed_batch(model, ["a", "b"]):
        before = model(ids).logits
        for bad, err in ((["a", "zz"], AdapterNotFoundError), ("a", MixedBatchError), ([], MixedBatchError)):
            with pytest.raises(err):
                lorakit.set_rows(model, bad)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # the rows stay routed as they were


def test_merge_and_unload_inside_a_block_are_refused(model):
    ids = torch.randint(0, 64, (2, 5))
    set_adapter(model, "a")
    with torch.no_grad(), mixed_batch(model, ["a", "b"]):
        before = model(ids).logits
        for verb in (merge, lorakit.unload):
            with pytest.raises(MixedBatchError, match="inside mixed_batch"):
                verb(model)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # nothing merged, nothing unloaded
    assert lorakit.list_adapters(model) == ["a", "b", "c.d"]


def test_an_input_changed_in_place_between_forwards_is_gathered_again(monkeypatch):
    """Under inference_mode (no version counter) the gathered input of one forward is never reused for the
    next: a caller reusing its input buffer gets rows equal to each adapter alone."""
    import lorakit.mixed

    monkeypatch.setattr(lorakit.mixed, "DENSE_COLUMNS", 0)  # the slots' form, which gathers rows
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).eval()
    for n in ("x1", "x2"):
        inject(net, LoRAConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False), n)
    x = torch.randn(4, 8)
    names = ["x1", None, "x2", "x1"]
    with torch.inference_mode():
        with mixed_batch(net, names):
            net(x)
            x.mul_(2)
            out = net(x)
        for i, n in enumerate(names):
            if n is None:
                with disable_adapters(net):
                    ref = net(x[i:i + 1])
            else:
                set_adapter(net, n)
                ref = net(x[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["a", "b", "a", "b"], ["b", "a", None, "b", "a", None], ["a", None, "b", "a"]])
def test_prefill_results_go_back_by_index_add_where_no_row_is_padding(model, names, monkeypatch):
    import lorakit.mixed

    for name, value in zip(("DENSE_COLUMNS", "DENSE_WORK", "BANK_ROWS"), FORMS["segments"]):
        monkeypatch.setattr(lorakit.mixed, name, value)
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (len(names), 6))
    refs = {n: _single(model, n, ids) for n in set(names)}
    with mixed_batch(model, names), torch.inference_mode():
        gathered = model(ids).logits  # SCATTER_ELEMENTS is far above these outputs: gather and add
    scattered = []
    index_add_ = torch.Tensor.index_add_
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda t, *a: scattered.append(a[1].tolist()) or index_add_(t, *a))
    monkeypatch.setattr(lorakit.mixed, "SCATTER_ELEMENTS", 0)
    with mixed_batch(model, names), torch.inference_mode():
        out = model(ids).logits
    padded = names == ["a", None, "b", "a"]
    assert scattered
    for index in scattered:  # each adapted row once, rows without an adapter never, and no padded slot
        assert len(set(index)) == len(index) and all(names[i] is not None for i in index)
        counts = {names.count(names[i]) for i in index}
        assert len(counts) == 1
    # b has one row where a has two: the layers holding both pad b's slot and gather instead
    assert any({names[i] for i in index} == {"a", "b"} for index in scattered) != padded
    assert torch.equal(out, gathered)  # one add per element either way
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


def test_a_layer_holding_every_adapter_of_the_plan_routes_its_segments_as_they_are(model):
    """q_proj holds a and b: the plan's segments as they are (the same object, one subset test per layer and
    change of mix); o_proj holds b and c.d, not a: only b's segment; a DoRA adapter held, even outside the
    plan, takes the full path again."""
    from lorakit.routes import held_segments
    from lorakit.rows import plan_rows

    plan = plan_rows(["a", "b", None, "a"], rank={"a": 0, "b": 1, "c.d": 2})
    assert plan.segments == (("a", 0, 2), ("b", 2, 3)) and plan.names == ("a", "b")
    q = model.model.layers[0].self_attn.q_proj
    o = model.model.layers[0].self_attn.o_proj
    mine, dora_segs, biased = held_segments(q, plan)
    assert mine is plan.segments and dora_segs == biased == ()
    assert held_segments(o, plan) == ((("b", 2, 3),), (), ())
    inject(model, LoRAConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"], init_lora_weights=False), "e")
    mine, dora_segs, _ = held_segments(q, plan)
    assert mine == plan.segments and mine is not plan.segments and dora_segs == ()


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD", "Adagrad"])
def test_fused_optimizer_steps_between_blocks_are_seen(model, optimizer):
    """torch's ``fused=True`` optimizer steps write the factors without moving their version counters (lorakit's
    training loop uses fused AdamW), so the block after such training served the adapter's slots as they were
    before it (0.41 off, a new user's report). Expected values by hand: a plain copy of the base whose adapted
    weights are W + s·B·A of the row's adapter, in float64."""
    import copy

    torch.manual_seed(6)
    ids = torch.randint(0, 64, (4, 6))
    plain = lorakit.unload(copy.deepcopy(model), merge=False).double()
    with mixed_batch(model, ["a", "b", "c.d", None]), torch.no_grad():
        model(ids)  # the banks hold every adapter's factors now
    set_adapter(model, "a")
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(".a.lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = getattr(torch.optim, optimizer)(params, lr=0.05, fused=True)
    model.train()
    for _ in range(2):
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with mixed_batch(model, ["a", "b", "c.d", None]), torch.no_grad():
        out = model(ids).logits
    for i, name in enumerate(["a", "b", "c.d", None]):
        want = copy.deepcopy(plain)
        with torch.no_grad():
            for path, layer in lorakit.lora_layers(model):
                if name is not None and layer.has_adapter(name):
                    a, b = (t.detach().double() for t in layer.lora_weights(name))
                    want.get_submodule(path).weight += layer.adapter(name).scaling * b @ a
            expected = want(ids[i:i + 1]).logits[0]
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-5, msg=f"row {i} ({name})")
