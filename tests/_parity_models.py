"""Tiny models for the PEFT parity tests: an MLP with named layers (PEFT's custom-model matrix uses
the same 10 -> 20 -> 2 shape), GPT-2 (Conv1D), an embedding model, a CNN (Conv2d), a Llama with tied
or untied embeddings, and a mixture-of-experts block whose experts live in 3-D Parameters."""

import torch
import torch.nn.functional as F
from torch import nn

from test_families import SmallCNN


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(F.relu(self.lin0(x)))


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lin = nn.Linear(8, 5)

    def forward(self, ids):
        return self.lin(self.emb(ids))


CNN = SmallCNN  # the families tests' CNN (two Conv2d and a head)


class Experts(nn.Module):
    """E experts of a gated MLP in two 3-D Parameters: ``(E, out, in)`` as in transformers' MoE blocks,
    or ``(E, in, out)`` with ``is_transposed`` (PEFT's switch). Tokens ``(N, h)`` with one expert each."""

    def __init__(self, experts=3, hidden=6, ffn=5, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        gu, dn = (experts, hidden, 2 * ffn), (experts, ffn, hidden)
        if not transposed:
            gu, dn = (experts, 2 * ffn, hidden), (experts, hidden, ffn)
        self.gate_up_proj = nn.Parameter(torch.randn(gu) / hidden ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(dn) / ffn ** 0.5)
        self.register_buffer("expert_bias", torch.zeros(experts))  # a buffer: not a target_parameters target

    def _mm(self, x, w):  # x (N, in) by each token's expert weight (N, ...) -> (N, out)
        return torch.einsum("ni,nio->no" if self.is_transposed else "ni,noi->no", x, w)

    def forward(self, x, index):
        gate, up = self._mm(x, self.gate_up_proj[index]).chunk(2, dim=-1)
        return self._mm(F.silu(gate) * up, self.down_proj[index])


class MoE(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.router = nn.Linear(6, 3)
        self.experts = Experts(transposed=transposed)
        self.out = nn.Linear(6, 4)

    def forward(self, x):  # (B, T, 6) -> (B, T, 4); the routing is the base router's
        flat = x.reshape(-1, x.shape[-1])
        return self.out(self.experts(flat, self.router(flat).argmax(-1)).reshape(x.shape))


def seeded(cls, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw).eval()


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(tied=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def ids(vocab, first=(3, 5, 7, 9)):
    """(2, 7) token ids, seeded, whose first row starts with ``first`` (the rows trainable tokens train)."""
    x = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    x[0, : len(first)] = torch.tensor(first)
    return x


def floats(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def out(model, x):
    res = model(x)
    return getattr(res, "logits", res)
