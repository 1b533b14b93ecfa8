"""The TRL anchor of benchmarks/train_throughput.py: TRL's SFTTrainer, padding-free on lorakit's batches,
reproduces lorakit's per-step training losses (skipped when TRL is not installed: it is a benchmark extra)."""

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from _tiny import tiny_tokenizer  # noqa: E402
from lorakit.app import batches as B  # noqa: E402
from lorakit.app import data as D  # noqa: E402
from lorakit.app import g2p as G  # noqa: E402
from lorakit.app import lm_loss as LL  # noqa: E402
from lorakit.app import loop as LT  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import trl_anchor  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [("cat", "K AE1 T"), ("dog", "D AO1 G"), ("hello", "HH AH0 L OW1"), ("world", "W ER1 L D"),
         ("tiny", "T AY1 N IY0"), ("at", "AE1 T"), ("low", "L OW1"), ("go", "G OW1")]


def _tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_padding_free_on_lorakit_batches_matches_lorakit_step_losses(tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    tok = tiny_tokenizer()
    base = _tiny_lm(tok)
    examples = D.tokenize_dataset(tok, G.g2p_dataset([(w, [p.split()]) for w, p in WORDS]), 64)
    steps, bs = 2, 4
    cfg = LT.TrainConfig(steps=steps, batch_size=bs, lr=1e-2, warmup=0, seed=0)
    stream = B.batch_stream(examples, bs, cfg.seed)
    flat = [e for _ in range(steps) for e in next(stream)]
    assert len({len(e) for e in flat[:bs]}) > 1  # rows of different lengths: padding-free has work to do

    torch.manual_seed(0)
    init = lorakit.inject(copy.deepcopy(base), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=SEVEN,
                                                                  init_lora_weights=False))  # B != 0: step 1 counts
    lorakit.save_adapter(init, str(tmp_path))
    recs = []
    LT.train(init, LL.lm_task(examples, tok.pad_token_id, cfg), cfg, on_log=recs.append, progress=False)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    set_peft_model_state_dict(peft_model, load_file(str(tmp_path / "adapter_model.safetensors")))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=True)
    opt_sched = (opt, LT.schedule(opt, cfg.schedule, cfg.warmup, steps))
    make = trl_anchor.make_batches(peft_model, tok, flat, bs, steps, opt_sched, str(tmp_path / "trl"),
                                   cfg.max_grad_norm)
    stepper = trl_anchor.TrainerStepper("trl", make, steps)
    for _ in range(steps):
        stepper.step()
    stepper.thread.join()
    assert [r["tokens"] for r in stepper.recs] == [sum(len(e) for e in flat[i:i + bs]) for i in (0, bs)]
    for mine, theirs in zip(recs, stepper.recs, strict=True):
        assert abs(mine["loss"] - theirs["loss"]) < 1e-4, (mine, theirs)
    assert abs(recs[1]["loss"] - recs[0]["loss"]) > 1e-3  # the second step sees the first update
