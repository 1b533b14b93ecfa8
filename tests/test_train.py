"""Label-position loss equals the full loss; training changes only LoRA; schedule values (lorakit.app.loop,
lm_loss, packing)."""

import math

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.app.batches import collate
from lorakit.app.data import IGNORE, Example
from lorakit.app.lm_loss import label_loss, lm_task, mean_loss
from lorakit.app.loop import TrainConfig, schedule, set_checkpointing, train
from lorakit.errors import ConfigError

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch():
    torch.manual_seed(0)
    ex = []
    for n, p in [(9, 4), (5, 2), (12, 7)]:
        ids = torch.randint(0, 64, (n,)).tolist()
        ex.append(Example(ids, [IGNORE] * p + ids[p:]))
    return collate(ex, pad_id=0)


def test_label_loss_equals_full_loss():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    ids, mask, labels = _batch()
    loss_sum, n = label_loss(model, ids, mask, labels)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers shifts internally
    assert n == int((labels[:, 1:] != IGNORE).sum()) == 5 + 3 + 5
    assert abs(float(loss_sum.detach()) / n - float(full.detach())) < 1e-6
    # the gradients agree too
    (loss_sum / n).backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    g2 = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def _lrs(kind: str, warmup: int = 4, total: int = 14) -> list[float]:
    """The lr at steps 0..total of ``schedule`` with peak lr 1."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = schedule(opt, kind, warmup, total)
    out = []
    for _ in range(total + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_lr_schedule():
    # transformers: s / warmup during warmup (0 at step 0), then with p = (s - 4) / 10:
    # cosine 0.5 * (1 + cos(pi * p)), linear 1 - p
    cos = _lrs("cosine")
    assert cos[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isclose(cos[6], 0.9045084971874737)  # p = 0.2: 0.5 * (1 + 0.8090169943749475)
    assert math.isclose(cos[9], 0.5)  # half way through the cosine
    assert math.isclose(cos[12], 0.09549150281252629, abs_tol=1e-12)  # p = 0.8: 0.5 * (1 - 0.8090169943749475)
    assert cos[14] == 0.0
    lin = _lrs("linear")
    assert lin[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lin[6], 0.8) and math.isclose(lin[9], 0.5) and lin[14] == 0.0
    with pytest.raises(ConfigError, match="unknown schedule 'step'"):
        _lrs("step")


def test_train_config_defaults_match_the_cli():
    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.eval_every, cfg.lr, cfg.warmup, cfg.max_grad_norm) == (8, 25, 2e-3, 10, 1.0)


def test_total_steps():
    assert TrainConfig(steps=7).total_steps(1000) == 7
    assert TrainConfig(epochs=2, batch_size=4, grad_accum=2).total_steps(20) == 6  # ceil(20/8) * 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_changes_only_lora_and_learns(checkpointing):
    model = tiny_llama()
    with torch.no_grad():  # init std 0.02 caps |logits| near 0.6, so no model could fit; widen the head
        model.lm_head.weight.mul_(50)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL7))
    if checkpointing:  # embeddings are frozen: LoRA must still get gradients
        set_checkpointing(model, True)
    ids = torch.arange(1, 11).tolist()
    ex = [Example(ids, [IGNORE] * 3 + ids[3:])] * 8
    before = mean_loss(model, ex, pad_id=0)[0]
    logs = []
    cfg = TrainConfig(steps=15, batch_size=4, lr=5e-2, warmup=2, eval_every=5)
    summary = train(model, lm_task(ex, 0, cfg, val_examples=ex[:2]), cfg, on_log=logs.append, progress=False)
    after = mean_loss(model, ex, pad_id=0)[0]
    assert after < 0.7 * before
    assert [r["step"] for r in logs] == list(range(1, 16))
    assert [r["step"] for r in logs if "val_loss" in r] == [5, 10, 15]
    assert summary["tokens"] == 15 * 4 * 10 and summary["tokens_per_s"] > 0
    lorakit.unload(model, merge=False)
    for k, v in model.state_dict().items():  # the base weights never moved
        assert torch.equal(v, base[k]), k


def _prefix_batch(prefix=6, with_pad=True):
    torch.manual_seed(0)
    pre = torch.randint(0, 64, (prefix,)).tolist()
    ex = []
    for n, p in [(5, 2), (9, 4), (3, 1)] if with_pad else [(5, 2), (5, 3), (5, 1)]:
        s = torch.randint(0, 64, (n,)).tolist()
        ex.append(Example(pre + s, [IGNORE] * (prefix + p) + s[p:]))
    return collate(ex, pad_id=0)


def _assert_same_loss_and_grads(model, batch, **kw):
    """label_loss(pack=True) equals the padded batch's loss and gradients (1e-6)."""
    params = [p for p in model.parameters() if p.requires_grad]
    a, na = label_loss(model, *batch)
    b, nb = label_loss(model, *batch, pack=True)
    assert na == nb and abs(float(a.detach()) - float(b.detach())) / na < 1e-6
    ga = torch.autograd.grad(a / na, params)  # the mean over label tokens, as train() steps on
    gb = torch.autograd.grad(b / nb, params)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


@pytest.mark.parametrize("with_pad", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_label_loss(with_pad, attn):
    from lorakit.app.packing import pack, shared_prefix_len

    model = tiny_llama()
    model.config._attn_implementation = attn
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    ids, mask, labels = batch = _prefix_batch(with_pad=with_pad)
    sel = labels[:, 1:] != IGNORE
    assert shared_prefix_len(ids, mask, sel) >= 6  # there is a prefix to share
    packed = pack(ids, mask, sel)
    # one packed row: the 6 shared tokens once, then each row's other tokens but its last (which
    # predicts nothing); no padding
    assert packed.input_ids.shape == (1, 6 + int((mask.sum(1) - 7).sum()))
    assert packed.position_ids[0].tolist() == list(range(6)) + [
        t for n in mask.sum(1).tolist() for t in range(6, n - 1)]
    _assert_same_loss_and_grads(model, batch)


def test_packing_leaves_out_unscored_tail():
    from lorakit.app.packing import pack

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    ids, mask, labels = _prefix_batch()
    labels[0, 9:] = IGNORE  # row 0 (11 tokens): only token 8 is scored, so positions 8.. are not needed
    labels[2, 6:] = IGNORE  # row 2: no label at all
    packed = pack(ids, mask, labels[:, 1:] != IGNORE)
    # the prefix, row 0 up to position 7 (it predicts token 8), row 1 up to its next-to-last, row 2 nothing
    assert packed.position_ids[0].tolist() == list(range(6)) + [6, 7] + list(range(6, 14))
    _assert_same_loss_and_grads(model, (ids, mask, labels))


def test_packed_rows_split_at_max_tokens():
    from lorakit.app.packing import pack

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    ids, mask, labels = batch = _batch()  # no common prefix: packing only drops the padding
    packed = pack(ids, mask, labels[:, 1:] != IGNORE, max_tokens=14)
    assert packed.input_ids.shape == (2, 12)  # rows of 8 + 4 tokens (their last dropped), then 11 (+ 1 padding)
    assert not packed.allowed[1, 0, :11, 11:].any()  # real tokens never see the padding
    import lorakit.app.packing as T

    old, T.PACK_TOKENS = T.PACK_TOKENS, 14  # label_loss packs with the module default
    try:
        assert T.pack(ids, mask, labels[:, 1:] != IGNORE).input_ids.shape == (2, 12)
        _assert_same_loss_and_grads(model, batch)
    finally:
        T.PACK_TOKENS = old


def test_packing_falls_back():
    from lorakit.app.packing import pack, packable

    model = tiny_llama()
    ids = _batch()[0]
    left = collate([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5])], pad_id=0, left=True)
    assert pack(*left[:2], left[2][:, 1:] != IGNORE) is None  # left padding: not packed
    same = collate([Example([1, 2, 3, 4], [IGNORE] * 3 + [4])] * 2, pad_id=0)
    assert pack(*same[:2], same[2][:, 1:] != IGNORE) is not None  # equal rows: the prefix is shared
    rows = collate([Example(list(range(i, i + 5)), list(range(i, i + 5))) for i in (1, 6, 11)], pad_id=0)
    assert pack(*rows[:2], rows[2][:, 1:] != IGNORE, max_tokens=9) is None  # 2 x 8 tokens: nothing saved
    assert packable(model, ids.shape[1])
    model.config.sliding_window = 4  # a window shorter than the batch: the custom mask would drop it
    assert not packable(model, ids.shape[1]) and packable(model, 4)
    model.config.sliding_window = None
    model.config._attn_implementation = "flex_attention"
    assert not packable(model, ids.shape[1])
    model.config._attn_implementation = "sdpa"
    a, _ = label_loss(model, *_batch())
    set_checkpointing(model, True)  # packing works under activation checkpointing too
    model.train()
    b, _ = label_loss(model, *_batch(), pack=True)
    model.eval()
    set_checkpointing(model, False)
    assert abs(float(a.detach()) - float(b.detach())) < 1e-5


def test_compiled_blocks_train_like_eager():
    import copy

    from lorakit.app.loop import blocks

    torch.manual_seed(0)
    model = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL7))
    assert blocks(model) == list(model.model.layers)  # the decoder layers, not the 7-projection lists
    compiled = copy.deepcopy(model)
    torch.manual_seed(1)
    ex = [Example(torch.randint(1, 64, (n,)).tolist(), [IGNORE] * 4 + torch.randint(1, 64, (n - 4,)).tolist())
          for n in (9, 12, 7, 10, 11, 8, 9, 12)]
    from torch._dynamo.utils import counters

    runs = {}
    for name, m, on in (("eager", model, False), ("compiled", compiled, True)):
        counters.clear()
        logs = []
        cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup=1, eval_every=2, compile=on)
        summary = train(m, lm_task(ex, 0, cfg, val_examples=ex[:3]), cfg, on_log=logs.append, progress=False)
        runs[name] = logs
        assert summary["compile"] is on and summary["compiled_from_step"] == (1 if on else None)
        assert (counters["stats"]["unique_graphs"] > 0) == on  # the blocks ran compiled, or not at all
        assert all(b._compiled_call_impl is None for b in blocks(m))  # eager again after training
    for a, b in zip(runs["eager"], runs["compiled"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    for p, q in zip(model.parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
