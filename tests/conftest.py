import pytest
import torch
from torch import nn


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, attention_bias: bool = False):
    """A randomly initialised Llama with the SmolLM2 module names, small enough for unit tests
    (``attention_bias``: q/k/v/o with biases, as Qwen2's q/k/v)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=attention_bias,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 7))


def alone_logits(model, name, ids):
    """The logits of ``ids`` with only adapter ``name`` active (None: the base model, adapters disabled)."""
    import lorakit

    if name is None:
        with lorakit.disable_adapters(model):
            return model(ids).logits
    lorakit.set_adapter(model, name)
    return model(ids).logits


def assert_rows_equal_alone(model, names, ids, grad: bool = False):
    """Under ``mixed_batch(model, names)``, row i of the logits equals adapter ``names[i]`` alone (1e-5)."""
    import lorakit

    refs = {n: alone_logits(model, n, ids) for n in set(names)}
    with lorakit.mixed_batch(model, names), torch.set_grad_enabled(grad):
        out = model(ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], refs[n][i], rtol=1e-5, atol=1e-5)


def slot_by_hand(layer, name: str, r_max: int):
    """Adapter ``name`` of ``layer`` as a slot holds it, by hand in float64: A^T (in, r_max) and (s·B)^T
    (r_max, out), zero-padded to ``r_max``, s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    import math

    ad = layer.adapter(name)
    a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
    s = ad.lora_alpha / (math.sqrt(ad.r) if ad.use_rslora else ad.r)
    a_t, b_t = torch.zeros(a.shape[1], r_max, dtype=torch.float64), torch.zeros(r_max, b.shape[0], dtype=torch.float64)
    a_t[:, : ad.r], b_t[: ad.r] = a.t(), s * b.t()
    return a_t, b_t


def assert_slot_by_hand(slots, j: int, layer, name: str) -> None:
    """Slot ``j`` of ``slots`` (an ``AdapterBank`` or a ``HotBank``) holds adapter ``name`` of ``layer``
    (``slot_by_hand``, padded to the slots' rank)."""
    a_t, b_t = slot_by_hand(layer, name, slots.a_t.shape[2])
    torch.testing.assert_close(slots.a_t[j].double(), a_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(slots.b_t[j].double(), b_t, rtol=1e-6, atol=1e-7)
