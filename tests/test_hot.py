"""Hot slots (lorakit.hot): with many adapters resident and a few in the batch, per-row adapters run
over the mix's own factors, copied in once; a change of mix copies only the adapters new to it."""

import pytest
import torch
from torch import nn

import lorakit
import lorakit.hot
import lorakit.mixed
from lorakit import LoRAConfig, disable_adapters, inject, mixed_batch, set_adapter
from lorakit.hot import HotBank
from lorakit.layers import LoRALinear
from conftest import alone_logits, assert_rows_equal_alone, assert_slot_by_hand, slot_by_hand, tiny_llama


def _layer(n: int = 6) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 7))
    for i in range(n):
        layer.add_adapter(f"ad{i}", r=1 + i % 3, lora_alpha=2.0 + i, use_rslora=i == 4, init_lora_weights=False)
    return layer


def _check_slots(hot: HotBank, layer: LoRALinear, names) -> None:
    slots = list(hot.names)
    for n in names:
        assert_slot_by_hand(hot, slots.index(n), layer, n)


def test_a_new_mix_copies_only_adapters_new_to_it():
    layer, hot = _layer(), HotBank()
    slots = hot.admit(layer.bank(["ad0", "ad1"]), ("ad0", "ad1"))
    assert hot.copies == 2 and list(slots) == ["ad0", "ad1"]
    _check_slots(hot, layer, ["ad0", "ad1"])
    where_1 = slots.index("ad1")
    slots = hot.admit(layer.bank(["ad1", "ad2"]), ("ad1", "ad2"))  # ad0 left, ad2 joined: one copy, into ad0's slot
    assert hot.copies == 3 and slots.index("ad1") == where_1 and "ad0" not in slots and len(slots) == 2
    _check_slots(hot, layer, ["ad1", "ad2"])
    hot.admit(layer.bank(["ad2", "ad1"]), ("ad2", "ad1"))  # the same adapters in another order: nothing copied
    assert hot.copies == 3


def test_a_mix_copied_into_scattered_slots_lands_run_by_run():
    """Adapters new to a mix go into the free slots in runs of consecutive slots (one copy per run, one
    slot alone copied directly): slots 0, 2-3 and 5 free, 1 and 4 kept; every slot then holds its adapter's
    A^T and (s·B)^T as computed by hand, the kept ones untouched."""
    layer, hot = _layer(10), HotBank()
    first = ("ad0", "ad1", "ad2", "ad3", "ad4", "ad5")
    slots = hot.admit(layer.bank(list(first)), first)
    kept = {n: slots.index(n) for n in ("ad1", "ad4")}
    before = {n: (hot.a_t[j].clone(), hot.b_t[j].clone()) for n, j in kept.items()}
    mix = ("ad1", "ad4", "ad6", "ad7", "ad8", "ad9")  # r = 1, 2, 1, 2, 3, 1: the slots are rank-padded to 3
    slots = hot.admit(layer.bank(list(mix)), mix)
    assert hot.copies == 10 and {n: slots.index(n) for n in kept} == kept and set(slots) == set(mix)
    assert sorted(slots.index(n) for n in mix[2:]) == [0, 2, 3, 5]
    _check_slots(hot, layer, mix)
    for n, j in kept.items():
        assert torch.equal(hot.a_t[j], before[n][0]) and torch.equal(hot.b_t[j], before[n][1])


def test_slots_grow_shrink_and_follow_changed_factors():
    layer, hot = _layer(), HotBank()
    hot.admit(layer.bank(["ad0"]), ("ad0",))
    names = ("ad1", "ad2", "ad3", "ad4")
    slots = hot.admit(layer.bank(list(names)), names)  # more adapters than slots: the slots grow
    assert len(slots) == 4 and set(slots) == set(names) and hot.copies == 5
    _check_slots(hot, layer, names)
    with torch.no_grad():  # what an optimizer step or a reload does: ad2 changes in place
        layer.lora_weights("ad2")[1].mul_(-3.0)
    hot.admit(layer.bank(list(names)), names)
    assert hot.copies == 6  # ad2 copied afresh, the others kept
    _check_slots(hot, layer, names)
    slots = hot.admit(layer.bank(["ad5"]), ("ad5",))  # 4 slots for a mix of 1: shrunk to it
    assert list(slots) == ["ad5"]
    _check_slots(hot, layer, ["ad5"])


def _many(resident: int = 9):
    m = tiny_llama()
    for i in range(resident):  # different ranks, alphas, rsLoRA; every projection
        cfg = LoRAConfig(r=1 + i % 4, lora_alpha=1.0 + i, use_rslora=i % 3 == 0, target_modules="all-linear",
                         init_lora_weights=False)
        inject(m, cfg, f"t{i}")
    return m


def _slot_counts(monkeypatch) -> list[int]:
    """The slot count of each batched matmul pair from here on (the dense every-adapter form off, so that
    decoding-sized forwards run over slots: the bank's or the hot ones)."""
    monkeypatch.setattr(lorakit.mixed, "DENSE_COLUMNS", 0)
    seen = []
    add_bank = lorakit.mixed.RowRouter._add_bank
    monkeypatch.setattr(lorakit.mixed.RowRouter, "_add_bank", lambda s, x, o, a_t, *r: seen.append(a_t.shape[0])
                        or add_bank(s, x, o, a_t, *r))
    return seen


@pytest.mark.parametrize("beams", [1, 2])
def test_generation_over_hot_slots_equals_each_adapter_alone(beams, monkeypatch):
    model = _many()
    seen = _slot_counts(monkeypatch)
    torch.manual_seed(8)
    ids = torch.randint(1, 64, (4, 5))
    names = ["t2", None, "t7", "t2"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=beams)
    with mixed_batch(model, names), torch.inference_mode():
        got = model.generate(ids, **kw)
    assert seen and max(seen) == 2  # prefill and steps over two hot slots per layer, not the 9 resident
    for i, n in enumerate(names):
        if n is None:
            with disable_adapters(model):
                want = model.generate(ids[i: i + 1], **kw)
        else:
            set_adapter(model, n)
            want = model.generate(ids[i: i + 1], **kw)
        assert torch.equal(got[i], want[0]), (i, n)


@pytest.mark.parametrize("resident, slots", [(5, 5), (6, 4)])
def test_bank_as_it_lies_up_to_a_quarter_spare_then_hot_slots(resident, slots, monkeypatch):
    """Four adapters in the batch: with five resident the decoding step runs over the bank's five slots as
    they lie (one slot has no rows: a quarter more bytes, no copy); with six, over four hot slots (BANK_SPARE
    = 1.25). Either way every row equals its adapter alone."""
    model = _many(resident)
    seen = _slot_counts(monkeypatch)
    torch.manual_seed(11)
    ids = torch.randint(1, 64, (6, 1))
    assert_rows_equal_alone(model, ["t3", "t0", None, "t2", "t1", "t3"], ids)
    assert set(seen) == {slots}
    assert all(layer._hot is None for _, layer in lorakit.lora_layers(model)) == (slots == resident)


def test_decoding_steps_over_hot_slots_and_a_change_of_mix(monkeypatch):
    """Decoding-sized forwards with 9 adapters resident and 2-3 in the batch run over the hot slots
    (not over all 9); the next mix, sharing two adapters, copies only the third."""
    model = _many()
    seen = _slot_counts(monkeypatch)
    torch.manual_seed(9)
    ids = torch.randint(1, 64, (4, 1))  # one token per row: a decoding-sized forward
    layers = [layer for _, layer in lorakit.lora_layers(model)]

    def rows_equal_alone(names):
        assert_rows_equal_alone(model, names, ids)

    rows_equal_alone(["t1", "t5", None, "t1"])
    assert seen and max(seen) == 2  # two hot slots per layer, not nine bank slots
    before = sum(layer._hot.copies for layer in layers)
    rows_equal_alone(["t5", "t8", "t1", "t1"])
    assert sum(layer._hot.copies for layer in layers) - before == len(layers)  # only t8, once per layer
    with torch.no_grad():
        for layer in layers:
            layer.lora_weights("t5")[0].add_(0.25)  # t5 trains in place between blocks
    rows_equal_alone(["t8", "t5", "t5", None])


def test_adapters_injected_and_loaded_under_inference_mode_mix_change_and_train(tmp_path):
    """Adapters injected and loaded inside torch.inference_mode (a server loading one at run time) are
    ordinary tensors: mixed batches over them match each adapter alone, see them change in place, and
    they train (inference tensors have no version counter: the bank raised RuntimeError on them)."""
    model = tiny_llama()
    torch.manual_seed(13)
    ids = torch.randint(1, 64, (4, 1))
    with torch.inference_mode():
        for i in range(3):
            inject(model, LoRAConfig(r=2 + i, lora_alpha=3.0, target_modules="all-linear", init_lora_weights=False), f"t{i}")
        lorakit.save_adapter(model, str(tmp_path / "t1"), adapter_name="t1")
        lorakit.load_adapter(model, str(tmp_path / "t1"), adapter_name="again")
    layers = [layer for _, layer in lorakit.lora_layers(model)]
    assert not any(p.is_inference() for layer in layers for n in ("t0", "again") for p in layer.lora_weights(n))
    model.eval()
    with torch.inference_mode():
        assert_rows_equal_alone(model, ["t0", "again", None, "t2"], ids)
    with torch.no_grad():
        for layer in layers:
            layer.lora_weights("again")[1].mul_(2.0)  # a change after the block: the next block sees it
    assert_rows_equal_alone(model, ["again", "t1", "t1", None], ids)
    set_adapter(model, "t2")
    model.train()
    model(ids).logits.sum().backward()
    assert all(layer.lora_weights("t2")[1].grad is not None for layer in layers)


def test_slots_made_under_inference_mode_take_later_changes_without_it(monkeypatch, tmp_path):
    """A block under torch.inference_mode builds the bank and the hot slots; the next blocks, under
    no_grad, copy other adapters in and rewrite a changed one in place (new user's report)."""
    model = _many()
    monkeypatch.setattr(lorakit.mixed, "DENSE_COLUMNS", 0)
    torch.manual_seed(10)
    ids = torch.randint(1, 64, (4, 1))
    with mixed_batch(model, ["t1", "t2", "t1", None]), torch.inference_mode():
        model(ids)
    assert_rows_equal_alone(model, ["t1", "t3", "t3", None], ids)  # t3 copied into a slot, outside inference mode
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_weights("t1")[1].mul_(-2.0)  # the bank's slot and the hot copy are rewritten
    assert_rows_equal_alone(model, ["t1", "t3", None, "t1"], ids)


def test_bank_and_hot_slots_store_a_as_a_is_and_a_cat_is_a_view():
    """Slots keep each A in its own (r, in) row-major layout (a batched matmul reads it row by row), seen as
    A^T (S, in, r); the bank's every-adapter-side-by-side ``a_cat`` is a view of them, no second copy, so a
    slot rewritten in place (an optimizer step) shows in it at once."""
    layer = _layer(4)
    bank = layer.bank(list(layer.adapter_names))
    s, n_in, r_max = bank.a_t.shape
    assert (s, n_in, r_max) == (4, 5, 3) and bank.a_t.stride() == (r_max * n_in, 1, n_in)
    assert bank.a_cat.shape == (n_in, s * r_max) and bank.a_cat.data_ptr() == bank.a_t.data_ptr()
    with torch.no_grad():
        layer.lora_weights("ad1")[0].mul_(2.0)  # A of ad1 changes in place
    bank = layer.bank(["ad1"])
    a_t, _ = slot_by_hand(layer, "ad1", r_max)
    torch.testing.assert_close(bank.a_cat[:, r_max:2 * r_max].double(), a_t, rtol=1e-6, atol=1e-7)
    hot = HotBank()
    hot.admit(bank, ("ad1",))
    hot.admit(layer.bank(["ad0", "ad1", "ad2"]), ("ad0", "ad1", "ad2"))  # grows from one slot to three
    assert hot.a_t.shape == (3, n_in, r_max) and hot.a_t.stride() == (r_max * n_in, 1, n_in)
    _check_slots(hot, layer, ["ad0", "ad1", "ad2"])


def test_a_new_row_plan_makes_every_layers_slots_hot_before_the_first_layer_adds_its_bypass(monkeypatch):
    """At the first forward of a new row plan (a block, or ``set_rows`` in one), every layer's hot slots
    are filled in one pass before any layer adds a bypass, each layer once; the next decoding step admits
    nothing; rows equal their adapters alone before and after the change."""
    model = _many()
    torch.manual_seed(12)
    ids = torch.randint(1, 64, (4, 1))
    layers = [layer for _, layer in lorakit.lora_layers(model)]
    events, admit, add = [], HotBank.admit, lorakit.mixed.RowRouter.add_bypass
    monkeypatch.setattr(HotBank, "admit", lambda self, bank, names: events.append("admit") or admit(self, bank, names))
    monkeypatch.setattr(lorakit.mixed.RowRouter, "add_bypass",
                        lambda self, layer, x, out: events.append("add") or add(self, layer, x, out))
    mixes = (["t1", "t5", None, "t1"], ["t5", "t8", "t1", "t1"])
    refs = {n: alone_logits(model, n, ids) for n in {n for mix in mixes for n in mix}}
    with torch.no_grad(), mixed_batch(model, mixes[0]):
        for k, names in enumerate(mixes):
            if k:
                lorakit.set_rows(model, names)
            events.clear()
            out = model(ids).logits
            assert events[: len(layers) + 1] == ["add"] + ["admit"] * len(layers)
            assert events.count("admit") == len(layers)
            events.clear()
            again = model(ids).logits
            assert "admit" not in events
            for i, n in enumerate(names):
                torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(again[i], refs[n][i], rtol=1e-5, atol=1e-5)
