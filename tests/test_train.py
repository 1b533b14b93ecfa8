"""Label-position loss equals the full loss; training changes only LoRA; schedule values."""

import math

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.data import IGNORE, Example, collate
from lorakit.train import TrainConfig, label_loss, lr_lambda, mean_loss, set_checkpointing, train

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


def test_lr_schedule():
    f = lr_lambda(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(f(9), 0.5)  # half way through the cosine
    assert f(14) == 0.0


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
    summary = train(model, ex, TrainConfig(steps=15, batch_size=4, lr=5e-2, warmup=2, eval_every=5), 0,
                    val_examples=ex[:2], on_log=logs.append, progress=False)
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


@pytest.mark.parametrize("with_pad", [True, False])
def test_shared_prefix_loss_equals_label_loss(with_pad):
    from lorakit.train import _shared_prefix_len

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    ids, mask, labels = _prefix_batch(with_pad=with_pad)
    assert _shared_prefix_len(ids, mask, labels[:, 1:] != IGNORE) >= 6  # there is a prefix to share
    params = [p for p in model.parameters() if p.requires_grad]
    a, na = label_loss(model, ids, mask, labels)
    b, nb = label_loss(model, ids, mask, labels, share_prefix=True)
    assert na == nb and abs(float(a.detach()) - float(b.detach())) / na < 1e-6
    ga = torch.autograd.grad(a / na, params)  # the mean over label tokens, as train() steps on
    gb = torch.autograd.grad(b / nb, params)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_shared_prefix_falls_back():
    from lorakit.train import _shared_prefix_len

    model = tiny_llama()
    ids, mask, labels = _batch()  # random rows: no common prefix
    assert _shared_prefix_len(ids, mask, labels[:, 1:] != IGNORE) < 2
    a, _ = label_loss(model, ids, mask, labels)
    b, _ = label_loss(model, ids, mask, labels, share_prefix=True)
    assert float(a.detach()) == float(b.detach())
    set_checkpointing(model, True)  # the cache is off under checkpointing: plain path, same value
    model.train()
    ids, mask, labels = _prefix_batch()
    c, _ = label_loss(model, ids, mask, labels, share_prefix=True)
    model.eval()
    set_checkpointing(model, False)
    assert abs(float(c.detach()) - float(label_loss(model, ids, mask, labels)[0].detach())) < 1e-5
