"""A layer's AdapterBank (lorakit.bank), the resident pool of per-row adapters: adapters added or deleted
are written or freed slot by slot, never by restacking every resident adapter; a larger rank, or many
free slots, restacks."""

import torch
from torch import nn

import lorakit
import lorakit.adapter
from lorakit import LoRAConfig, inject
from lorakit.hot import EmptySlot
from lorakit.layers import LoRALinear
from conftest import assert_rows_equal_alone, assert_slot_by_hand, tiny_llama


def _check(layer: LoRALinear) -> None:
    """Every adapter of the layer in its slot, exactly as by hand; every free slot all zeros."""
    bank = layer._bank
    assert set(bank.slots) == set(layer.adapter_names)
    for j, n in enumerate(bank.names):
        if isinstance(n, EmptySlot):
            assert not bank.a_t[j].any() and not bank.b_t[j].any()
            continue
        assert bank.slots[n] == j
        assert_slot_by_hand(bank, j, layer, n)
    s_, n_in, r = bank.a_t.shape  # the dense views see the same slots
    assert torch.equal(bank.a_cat.t().reshape(s_, r, n_in), bank.a_t.transpose(1, 2))
    assert torch.equal(bank.b_cat.view(s_, r, -1), bank.b_t)


def _layer(n: int) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5))
    for i in range(n):
        layer.add_adapter(f"ad{i}", r=2 + i % 2, lora_alpha=1.0 + i, use_rslora=i == 3, init_lora_weights=False)
    return layer


def _counting_stack(monkeypatch) -> list[int]:
    stack, calls = lorakit.adapter.stack, []
    monkeypatch.setattr(lorakit.adapter, "stack", lambda ads, dtype: calls.append(len(ads)) or stack(ads, dtype))
    return calls


def test_an_added_adapter_takes_a_new_slot_and_the_others_keep_theirs(monkeypatch):
    layer, calls = _layer(8), _counting_stack(monkeypatch)
    bank = layer.bank(layer.adapter_names)
    assert calls == [8] and bank.a_t.shape[0] == 8
    _check(layer)
    before = {n: (bank.a_t[j].clone(), bank.b_t[j].clone(), bank.slot_gen[j]) for n, j in bank.slots.items()}
    layer.add_adapter("new", r=3, lora_alpha=5.0, init_lora_weights=False)  # r <= the bank's 3: no restack
    bank = layer.bank(["new", "ad1"])
    # storage for a quarter more slots (10), the view over the 9 held: a pass over the bank reads no spare slot
    assert calls == [8] and bank.a_t.shape[0] == 9 and bank.slots["new"] == 8 and bank._a_full.shape[0] == 10
    for n, (a, b, gen) in before.items():  # untouched: the hot copies made from them stay valid
        j = bank.slots[n]
        assert torch.equal(bank.a_t[j], a) and torch.equal(bank.b_t[j], b) and bank.slot_gen[j] == gen
    _check(layer)
    storage = bank._a_full.data_ptr()
    layer.add_adapter("next", r=2, lora_alpha=2.0, init_lora_weights=False)  # into the spare capacity: no copy
    bank = layer.bank(["next"])
    assert calls == [8] and bank.a_t.shape[0] == 10 and bank.slots["next"] == 9 and bank._a_full.data_ptr() == storage
    _check(layer)
    layer.delete_adapter("next")  # the last slot freed: it leaves the view, the next adapter takes it again
    assert layer.bank([]).a_t.shape[0] == 9
    _check(layer)
    layer.add_adapter("again", r=1, lora_alpha=1.0, init_lora_weights=False)
    bank = layer.bank(["again"])
    assert bank.slots["again"] == 9 and bank._a_full.data_ptr() == storage and calls == [8]
    _check(layer)


def test_a_deleted_adapter_frees_its_slot_for_the_next_one(monkeypatch):
    layer, calls = _layer(8), _counting_stack(monkeypatch)
    layer.bank([])
    gone = layer._bank.slots["ad2"]
    layer.delete_adapter("ad2")
    bank = layer.bank(["ad5"])
    assert calls == [8] and isinstance(bank.names[gone], EmptySlot) and "ad2" not in bank.slots
    _check(layer)  # the freed slot is zeros: a dense product over every slot adds nothing there
    layer.add_adapter("ad2", r=2, lora_alpha=7.0, init_lora_weights=False)  # the name again, new factors
    bank = layer.bank(["ad2"])
    assert calls == [8] and bank.slots["ad2"] == gone and bank.a_t.shape[0] == 8
    _check(layer)


def test_a_larger_rank_or_many_free_slots_restack(monkeypatch):
    layer, calls = _layer(8), _counting_stack(monkeypatch)
    layer.bank([])
    layer.add_adapter("wide", r=6, lora_alpha=3.0, init_lora_weights=False)  # above the bank's rank 3
    assert layer.bank(["wide"]).a_t.shape == (9, 6, 6) and calls == [8, 9]
    _check(layer)
    for n in ("ad0", "ad1", "ad3"):  # 3 of 9 slots free would be more than a quarter: compacted
        layer.delete_adapter(n)
    assert layer.bank([]).a_t.shape[0] == 6 and calls == [8, 9, 6]
    _check(layer)


def test_rows_follow_adapters_loaded_and_deleted_between_blocks(tmp_path):
    """The serving case: adapters loaded and deleted between mixed batches (hot slots and the bank as it
    lies); every row equals its adapter alone, the re-loaded name its new factors."""
    model = tiny_llama()
    for i in range(4):
        inject(model, LoRAConfig(r=2, lora_alpha=2.0 + i, target_modules="all-linear", init_lora_weights=False), f"t{i}")
    torch.manual_seed(3)
    ids = torch.randint(1, 64, (4, 1))
    assert_rows_equal_alone(model, ["t0", "t1", None, "t3"], ids)
    lorakit.save_adapter(model, str(tmp_path / "t1"), adapter_name="t1")
    inject(model, LoRAConfig(r=1, lora_alpha=4.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "t4")
    lorakit.delete_adapter(model, "t2")
    assert_rows_equal_alone(model, ["t4", "t1", "t4", "t0"], ids)
    lorakit.delete_adapter(model, "t0")
    lorakit.load_adapter(model, str(tmp_path / "t1"), adapter_name="t0")  # t1's factors under t0's name
    assert_rows_equal_alone(model, ["t0", "t3", "t4", None], ids)
    for _, layer in lorakit.lora_layers(model):
        if layer._bank is not None:
            _check(layer)
