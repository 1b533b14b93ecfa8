"""adapter.py on its own: the scaling, PEFT's initialisation, ``LoRAAdapter`` built directly, the
delta in a requested dtype and the stacked factors, each against values written by hand."""

import math

import torch

from lorakit import LoRAAdapter
from lorakit.adapter import init_factors, scaling, stack


def test_scaling_by_hand():
    assert scaling(4, 8.0) == 2.0  # alpha / r unless rsLoRA is asked for
    assert scaling(4, 8.0, use_rslora=False) == 2.0
    assert scaling(4, 8.0, use_rslora=True) == 4.0  # alpha / sqrt(r)


def _factors(r=3, n_in=5, n_out=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g, dtype=dtype), torch.randn(n_out, r, generator=g, dtype=dtype)


def test_adapter_built_directly_has_plain_scaling_and_no_dropout():
    a, b = _factors(r=4)
    ad = LoRAAdapter("n", a.clone(), b.clone(), r=4, lora_alpha=8.0)
    assert ad.scaling == 8.0 / 4 and ad.use_rslora is False
    ad.train()  # the default dropout is p = 0: training mode changes nothing
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = ad.bypass(x, lambda x, a: x @ a.T, lambda h, b: h @ b.T)
    want = 2.0 * (x @ a.double().T @ b.double().T)
    # float32 factors against a float64 reference: float32's rounding, 1e-5 (one AMD CPU was 2e-6 off)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    rs = LoRAAdapter("n", a.clone(), b.clone(), r=4, lora_alpha=8.0, use_rslora=True)
    assert rs.use_rslora is True and rs.scaling == 8.0 / math.sqrt(4)


def test_delta_is_formed_in_the_requested_dtype():
    a, b = _factors(r=3)  # float32 factors
    ad = LoRAAdapter("n", a.clone(), b.clone(), r=3, lora_alpha=5.0)
    d = ad.delta(lambda b, a: b @ a, torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, 5.0 / 3 * b.double() @ a.double(), rtol=1e-12, atol=1e-12)


def test_stack_pads_ranks_and_folds_the_scaling_in_the_requested_dtype():
    a1, b1 = _factors(r=1, seed=1)
    a2, b2 = _factors(r=3, seed=2)
    ads = [LoRAAdapter("x", a1.clone(), b1.clone(), r=1, lora_alpha=3.0),  # s = 3
           LoRAAdapter("y", a2.clone(), b2.clone(), r=3, lora_alpha=5.0)]  # s = 5/3
    a_t, b_t = stack(ads, torch.float64)
    assert a_t.dtype == b_t.dtype == torch.float64
    assert a_t.shape == (2, 5, 3) and b_t.shape == (2, 3, 4)
    assert torch.equal(a_t[0, :, :1], a1.double().T) and torch.equal(a_t[1], a2.double().T)
    assert torch.equal(b_t[0, :1], (b1.double() * 3.0).T) and torch.equal(b_t[1], (b2.double() * (5.0 / 3)).T)
    assert torch.count_nonzero(a_t[0, :, 1:]) == 0 and torch.count_nonzero(b_t[0, 1:]) == 0  # rank padding
    one_a, one_b = stack(ads[1:], torch.float64)  # a single adapter stacks too
    assert torch.equal(one_a, a_t[1:]) and torch.equal(one_b, b_t[1:])


def test_init_factors_draws_peft_kaiming_bounds():
    """Kaiming-uniform with a = sqrt(5) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the draws are replayed by hand."""
    r, n_in, n_out = 4, 50, 30
    for init, b_random in ((True, False), (False, True)):
        a, b = torch.empty(r, n_in), torch.empty(n_out, r)
        torch.manual_seed(7)
        init_factors(a, b, r, init)
        torch.manual_seed(7)
        want_a = torch.empty(r, n_in).uniform_(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
        torch.testing.assert_close(a, want_a, rtol=1e-6, atol=0)
        if b_random:  # False: B too, fan_in = r
            want_b = torch.empty(n_out, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
            torch.testing.assert_close(b, want_b, rtol=1e-6, atol=0)
        else:
            assert torch.count_nonzero(b) == 0
