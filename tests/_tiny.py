"""Tiny offline fixtures for CLI and data tests: a byte-level BPE tokenizer with a ChatML
template (SmolLM2's special tokens) and a random Llama sized to it."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "cat K AE1 T", "dog D AO1 G", "hello HH AH0 L OW1", "world W ER1 L D", "tiny T AY1 N IY0",
    "Give the ARPAbet pronunciation.", "Below is an instruction that describes a task.",
    "### Instruction: ### Input: ### Response:", "user assistant system", "abcdefghijklmnopqrstuvwxyz",
]


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE (~300 tokens), ChatML specials, chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_folder(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a random 2-layer Llama (SmolLM2 module names, tied embeddings) and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


G2P_RECORDS = [
    {"prompt": w, "completion": p}
    for w, p in [("cat", "K AE1 T"), ("dog", "D AO1 G"), ("hello", "HH AH0 L OW1"), ("world", "W ER1 L D"),
                 ("tiny", "T AY1 N IY0"), ("cats", "K AE1 T S")]
]
