"""The PEFT parity matrix: one row per LoRA option and layer type, each checked three ways.

1. PEFT builds and saves an adapter (weights moved off their initial values) -> lorakit loads it into a
   fresh base: outputs within TOL of PEFT's.
2. lorakit builds and saves one -> PEFT loads it (``PeftModel.from_pretrained``): outputs within TOL.
3. lorakit merged equals unmerged within TOL, and unmerge restores every base tensor bit for bit.

A row is ``Row(name, build, input, options)``: ``options`` are keyword arguments that mean the same in
``peft.LoraConfig`` and ``lorakit.LoRAConfig``; ``peft_only`` adds PEFT-side ones (GPT-2's
``fan_in_fan_out``). A new option is one more line.
"""

import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import lorakit
from _parity_models import CNN, MLP, MoE, Emb, floats, gpt2, ids, llama, out, seeded

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")

TOL = 1e-5


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable
    x: Callable
    options: dict
    peft_only: dict = field(default_factory=dict)


def mlp():
    return seeded(MLP)


ROWS = [
    Row("linear", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"])),
    Row("conv1d", gpt2, lambda: ids(40), dict(target_modules=["c_attn", "c_fc"]), dict(fan_in_fan_out=True)),
    Row("embedding", lambda: seeded(Emb), lambda: ids(30), dict(target_modules=["emb", "lin"])),
    Row("conv2d", lambda: seeded(CNN), lambda: floats(2, 3, 8, 8), dict(target_modules=["conv1", "conv2"])),
    Row("modules_to_save", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"], modules_to_save=["lin1"])),
    Row("exclude_modules", llama, lambda: ids(64),
        dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"])),
    Row("bias_all", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"], bias="all")),
    Row("bias_lora_only", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"], bias="lora_only")),
    Row("rslora", mlp, lambda: floats(4, 10), dict(target_modules=["lin0", "lin1"], use_rslora=True)),
    Row("rank_alpha_pattern", mlp, lambda: floats(4, 10),
        dict(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 3}, alpha_pattern={"lin0": 7})),
    Row("trainable_tokens_list_tied", lambda: llama(tied=True), lambda: ids(64),
        dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    Row("trainable_tokens_dict", llama, lambda: ids(64),
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [5, 7, 9]})),
    Row("target_parameters", lambda: seeded(MoE), lambda: floats(2, 5, 6),
        dict(target_modules=["out"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
    Row("target_parameters_transposed_pattern", lambda: seeded(MoE, transposed=True), lambda: floats(2, 5, 6),
        dict(target_modules=[], target_parameters=["down_proj"], rank_pattern={"experts.down_proj": 3},
             use_rslora=True)),
    Row("dora", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"], use_dora=True)),
    Row("lora_bias", mlp, lambda: floats(4, 10), dict(target_modules=["lin0"], lora_bias=True)),
]
IDS = [row.name for row in ROWS]


def nudge(params, seed):
    """Move every trainable tensor off its initial value (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)


def lorakit_model(row):
    model = lorakit.inject(row.build(), lorakit.LoRAConfig(r=2, lora_alpha=4, **row.options))
    nudge([p for p in model.parameters() if p.requires_grad], seed=7)
    return model


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_peft_saves_lorakit_loads(row, tmp_path):
    pm = peft.get_peft_model(row.build(), peft.LoraConfig(r=2, lora_alpha=4, **row.options, **row.peft_only)).eval()
    nudge([p for _, p in sorted(pm.named_parameters()) if p.requires_grad], seed=5)
    x = row.x()
    expected = out(pm, x).detach()
    assert not torch.allclose(expected, out(row.build(), x), atol=1e-3), "the adapter changes the output"
    pm.save_pretrained(tmp_path)

    ours = lorakit.load_adapter(row.build(), tmp_path)
    torch.testing.assert_close(out(ours, x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_lorakit_saves_peft_loads(row, tmp_path):
    model = lorakit_model(row)
    x = row.x()
    expected = out(model, x).detach()
    assert not torch.allclose(expected, out(row.build(), x), atol=1e-3), "the adapter changes the output"
    lorakit.save_adapter(model, tmp_path)

    theirs = peft.PeftModel.from_pretrained(row.build(), tmp_path).eval()
    torch.testing.assert_close(out(theirs, x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_merged_equals_unmerged_and_unmerge_is_bitwise(row):
    model = lorakit_model(row)
    x = row.x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = out(model, x).detach()
    lorakit.merge(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "merge wrote the deltas into base weights"
    torch.testing.assert_close(out(model, x).detach(), unmerged, atol=TOL, rtol=TOL)
    lorakit.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
