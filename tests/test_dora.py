"""DoRA (Liu et al. 2024, eq. 5): W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c, the norm detached (§4.3).

Values are checked against the formula computed by hand in float64 and against PEFT (the same
weights loaded both ways, every layer family), never against lorakit itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import ConfigError, LoRAConfig

from test_families import FAMILIES, TOL, lk_config, out, peft_config, peft_trained_and_loaded, snapshot, train

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    """PEFT's custom-model MLP (10 -> 20 -> 2)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, dtype=dtype)
        self.lin1 = nn.Linear(20, 2, dtype=dtype)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def randomize_(model, seed=5):
    """Give every adapter tensor (A, B and the magnitude) random values: a 'trained' DoRA adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "magnitude" not in n else 1.0)
                        + (2.0 if "magnitude" in n else 0.0))


def dora_weight(w, a, b, m, s, out_axis=0):
    """m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c by hand in float64, ``w`` laid out (out, in) or (in, out)."""
    delta = s * (b.double() @ a.double())
    v = w.double() + (delta if out_axis == 0 else delta.T)
    norm = v.norm(dim=1 - out_axis, keepdim=True)
    return m.double().reshape(norm.shape) * v / norm


def test_linear_forward_is_the_dora_weight_computed_by_hand_in_float64():
    torch.manual_seed(0)
    model = MLP(torch.float64)
    w0, b0 = model.lin0.weight.detach().clone(), model.lin0.bias.detach().clone()
    lorakit.inject(model, LoRAConfig(r=3, lora_alpha=6, target_modules=["lin0"], use_dora=True))
    layer = model.lin0
    ad = layer.adapter("default")
    # at init B = 0, so m = ‖W‖_c (one value per output feature) and the output is the base output
    torch.testing.assert_close(ad.lora_magnitude_vector, w0.norm(dim=1), rtol=0, atol=1e-12)
    x = torch.randn(7, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w0.T + b0, rtol=0, atol=1e-12)
    randomize_(model)
    a, b, m = ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach()
    expected = x @ dora_weight(w0, a, b, m, 2.0).T + b0  # the bias is not rescaled
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_conv1d_forward_uses_the_column_norm_of_the_stored_in_out_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(12, 6)).double()  # weight stored (in=6, out=12)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=2, target_modules=["0"], use_dora=True))
    ad = model[0].adapter("default")
    assert ad.lora_magnitude_vector.shape == (12,)
    torch.testing.assert_close(ad.lora_magnitude_vector, w0.norm(dim=0), rtol=0, atol=1e-12)
    randomize_(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    wd = dora_weight(w0, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 1.0, out_axis=1)
    torch.testing.assert_close(model(x), x @ wd + b0, rtol=0, atol=1e-12)


def test_embedding_and_conv2d_forward_match_the_formula_in_float64():
    torch.manual_seed(2)
    emb = nn.Sequential(nn.Embedding(9, 5)).double()
    e0 = emb[0].weight.detach().clone()  # (num, dim): a magnitude per embedding dimension
    lorakit.inject(emb, LoRAConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    randomize_(emb)
    ad = emb[0].adapter("default")
    ids = torch.tensor([[1, 4, 8], [0, 2, 2]])
    wd = dora_weight(e0, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0, out_axis=1)
    torch.testing.assert_close(emb(ids), wd[ids], rtol=0, atol=1e-12)

    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    k0, c0 = conv[0].weight.detach().clone(), conv[0].bias.detach().clone()
    lorakit.inject(conv, LoRAConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    ad = conv[0].adapter("default")
    assert ad.lora_magnitude_vector.shape == (1, 4, 1, 1)  # PEFT's shape for convolutions
    randomize_(conv)
    v = k0 + 2.0 * torch.einsum("or,rihw->oihw", ad.lora_B.detach()[:, :, 0, 0], ad.lora_A.detach())
    kd = ad.lora_magnitude_vector.detach().reshape(4, 1, 1, 1) * v / v.flatten(1).norm(dim=1).reshape(4, 1, 1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, kd, c0, padding=1), rtol=0, atol=1e-12)


def test_norm_is_detached_gradients_equal_the_hand_formula():
    """Gradients of A, B and m equal those of m ⊙ V / stopgrad(‖V‖_c), V = W + s·B·A (§4.3), in float64."""
    torch.manual_seed(3)
    model = MLP(torch.float64)
    w0, b0 = model.lin0.weight.detach().clone(), model.lin0.bias.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["lin0"], use_dora=True))
    randomize_(model)
    ad = model.lin0.adapter("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "lin0.adapters.default.lora_A", "lin0.adapters.default.lora_B", "lin0.adapters.default.lora_magnitude_vector"}
    x = torch.randn(5, 10, dtype=torch.float64)
    model.lin0(x).square().sum().backward()
    a, b, m = (t.detach().clone().requires_grad_() for t in (ad.lora_A, ad.lora_B, ad.lora_magnitude_vector))
    v = w0 + 2.0 * b @ a
    wd = m[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    (x @ wd.T + b0).square().sum().backward()
    for got, want in ((ad.lora_A, a), (ad.lora_B, b), (ad.lora_magnitude_vector, m)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_equals_the_float64_dora_weight_and_unmerge_restores_bitwise(dtype):
    torch.manual_seed(4)
    model = MLP(dtype)
    before = snapshot(model)
    lorakit.inject(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], use_dora=True))
    randomize_(model)
    x = torch.randn(6, 10, dtype=dtype)
    unmerged = model(x).detach()
    lorakit.merge(model)
    for name in ("lin0", "lin1"):
        ad = getattr(model, name).adapter("default")
        want = dora_weight(before[f"{name}.weight"], ad.lora_A.detach(), ad.lora_B.detach(),
                           ad.lora_magnitude_vector.detach(), 2.0)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(getattr(model, name).base_layer.weight.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    lorakit.unmerge(model)
    assert all(torch.equal(model.state_dict()[k.replace("weight", "base_layer.weight").replace("bias", "base_layer.bias")], v)
               for k, v in before.items())
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)


def test_two_active_dora_adapters_forward_and_merge_like_peft():
    """Active adapters apply in turn (each rescales the output so far), in PEFT and in lorakit; merge agrees."""
    torch.manual_seed(5)
    base = MLP()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"],
                                                                 use_dora=True, init_lora_weights=False))
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["lin0"], use_dora=True,
                                            init_lora_weights=False))
    randomize_(pm)
    pm.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 10)
    expected = pm(x).detach()
    model = copy.deepcopy(base)
    for name in ("default", "other"):
        cfg = pm.peft_config[name]
        lorakit.inject(model, LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=["lin0"], use_dora=True), name)
        layer, src = model.lin0.adapter(name), pm.base_model.model.lin0
        with torch.no_grad():
            layer.lora_A.copy_(src.lora_A[name].weight)
            layer.lora_B.copy_(src.lora_B[name].weight)
            layer.lora_magnitude_vector.copy_(src.lora_magnitude_vector[name].weight)
    lorakit.set_adapter(model, ["default", "other"])
    torch.testing.assert_close(model(x), expected, rtol=0, atol=TOL)
    lorakit.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_dora_adapter_loads_in_lorakit(name, tmp_path):
    model, x, expected = peft_trained_and_loaded(name, peft_config(name, use_dora=True, init_lora_weights=False),
                                                 tmp_path / "p")  # the magnitudes trained too
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    lorakit.merge(model)
    torch.testing.assert_close(out(model, x), expected, atol=TOL, rtol=0)
    lorakit.unmerge(model)
    lorakit.save_adapter(model, tmp_path / "again")  # key for key and bit for bit PEFT's tensors
    a, b = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    a = {k: v for k, v in a.items() if not k.endswith(".base_layer.weight")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert sum(k.endswith("lora_magnitude_vector") for k in b) > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lorakit_dora_adapter_loads_in_peft(name, tmp_path):
    build, x, *_ = FAMILIES[name]
    model = build()
    lorakit.inject(model, lk_config(name, use_dora=True))
    train(model, x, [p for p in model.parameters() if p.requires_grad])
    expected = out(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "a")
    assert '"use_dora": true' in (tmp_path / "a" / "adapter_config.json").read_text()
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "a")
    torch.testing.assert_close(out(pm, x), expected, atol=TOL, rtol=0)


def test_training_with_dropout_matches_peft_step_for_step():
    """With lora_dropout the base term is recomputed on the dropped input (PEFT's DoRA training path):
    the same masks (same seed) give the same outputs and gradients."""
    base = MLP()
    cfg = dict(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], lora_dropout=0.3, use_dora=True)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    randomize_(pm)
    pm.train()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoRAConfig(**cfg))
    with torch.no_grad():
        for lin in ("lin0", "lin1"):
            src, ad = getattr(pm.base_model.model, lin), getattr(model, lin).adapter("default")
            ad.lora_A.copy_(src.lora_A["default"].weight)
            ad.lora_B.copy_(src.lora_B["default"].weight)
            ad.lora_magnitude_vector.copy_(src.lora_magnitude_vector["default"].weight)
    model.train()
    x = torch.randn(8, 10)
    torch.manual_seed(11)
    y_peft = pm(x)
    torch.manual_seed(11)
    y = model(x)
    torch.testing.assert_close(y, y_peft, rtol=0, atol=TOL)
    y.square().sum().backward()
    y_peft.square().sum().backward()
    m_grad = pm.base_model.model.lin0.lora_magnitude_vector["default"].weight.grad
    torch.testing.assert_close(model.lin0.adapter("default").lora_magnitude_vector.grad, m_grad, rtol=1e-4, atol=1e-6)


def test_half_base_keeps_float32_dora_parameters_and_merges_in_float32():
    torch.manual_seed(6)
    model = MLP().to(torch.bfloat16)
    w0 = model.lin0.weight.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["lin0"], use_dora=True))
    ad = model.lin0.adapter("default")
    assert ad.lora_magnitude_vector.dtype == torch.float32
    randomize_(model)
    model.to(torch.bfloat16)
    assert ad.lora_magnitude_vector.dtype == torch.float32
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    model(x).float().sum().backward()
    assert ad.lora_magnitude_vector.grad is not None and ad.lora_magnitude_vector.grad.dtype == torch.float32
    lorakit.merge(model)
    want = dora_weight(w0, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0)
    torch.testing.assert_close(model.lin0.base_layer.weight.double(), want.to(torch.bfloat16).double(), rtol=0, atol=0)
    lorakit.unmerge(model)
    assert torch.equal(model.lin0.base_layer.weight, w0)


def _eval_dora_mlp(seed):
    """A float64 MLP with a randomised DoRA adapter on lin0, in eval mode: (model, x, lin0, its adapter)."""
    torch.manual_seed(seed)
    model = MLP(torch.float64)
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["lin0"], use_dora=True))
    randomize_(model)
    model.eval()
    return model, torch.randn(3, 10, dtype=torch.float64), model.lin0, model.lin0.adapter("default")


def test_cached_norm_follows_in_place_updates_of_a_b_and_w():
    model, x, layer, ad = _eval_dora_mlp(7)
    for step in range(3):  # an optimizer-like in-place update of B, then of the base weight
        with torch.no_grad():
            (ad.lora_B if step != 2 else layer.base_layer.weight).add_(0.1)
        w = layer.base_layer.weight.detach()
        want = x @ dora_weight(w, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0).T
        torch.testing.assert_close(layer(x), want + layer.base_layer.bias.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_cached_norm_follows_a_fused_optimizer_step(optimizer):
    """A ``fused=True`` step writes A and B without moving their version counters: the eval forward after it
    used the norm of the factors before the step (0.015 off, a new user's report)."""
    model, x, layer, ad = _eval_dora_mlp(9)
    layer(x)  # the norm is cached
    params = [ad.lora_A, ad.lora_B]
    for p in params:
        p.grad = torch.ones_like(p)
    getattr(torch.optim, optimizer)(params, lr=0.1, fused=True).step()
    w = layer.base_layer.weight.detach()
    want = x @ dora_weight(w, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0).T
    torch.testing.assert_close(layer(x), want + layer.base_layer.bias.detach(), rtol=0, atol=1e-12)


def test_norm_cached_under_inference_mode_then_a_backward_in_eval_mode():
    """A forward under torch.inference_mode caches the norm as an inference tensor; the next forward with
    gradients (still in eval mode, so nothing clears the cache) recomputes it and its backward gives
    the hand formula's gradient of m (new user's report: it raised 'Inference tensors cannot be saved')."""
    model, x, layer, ad = _eval_dora_mlp(8)
    with torch.inference_mode():
        layer(x)
    layer(x).square().sum().backward()
    w, a, b = layer.base_layer.weight.detach(), ad.lora_A.detach(), ad.lora_B.detach()
    m = ad.lora_magnitude_vector.detach().clone().requires_grad_()
    v = w + 2.0 * b @ a
    (x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T + layer.base_layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(ad.lora_magnitude_vector.grad, m.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", [["d1", "plain", None, "d2", "d1"], ["d1", "d1", "d2", "d2", "plain"], ["d2"] * 3])
def test_mixed_batch_rows_of_dora_adapters_equal_peft_with_that_adapter_set(rows, tmp_path):
    """PEFT refuses adapter_names with DoRA; lorakit's rows each equal PEFT's output with the row's adapter."""
    from conftest import tiny_llama

    model = tiny_llama(0)
    for name, dora in (("d1", True), ("d2", True), ("plain", False)):
        lorakit.inject(model, LoRAConfig(r=2 if name != "d2" else 3, lora_alpha=4, use_dora=dora,
                                         target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False), name)
    randomize_(model)
    for name in ("d1", "d2", "plain"):
        lorakit.save_adapter(model, tmp_path / name, name)
    model.eval()
    ids = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(3))
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "d1", adapter_name="d1").eval()
    pm.load_adapter(tmp_path / "d2", adapter_name="d2")
    pm.load_adapter(tmp_path / "plain", adapter_name="plain")
    want = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with pm.disable_adapter():
                    want.append(pm(ids[i:i + 1]).logits)
            else:
                pm.set_adapter(name)
                want.append(pm(ids[i:i + 1]).logits)
        for grad in (False, True):  # the decoding forms without grad, one pair per adapter with it
            with torch.set_grad_enabled(grad), lorakit.mixed_batch(model, rows):
                got = model(ids).logits
            torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=TOL)
        with lorakit.mixed_batch(model, rows):  # decoding one token at a time
            step = model(ids[:, :1]).logits
        torch.testing.assert_close(step, torch.cat(want)[:, :1], rtol=0, atol=TOL)


def test_mixed_batch_dora_rows_keep_the_bias_unscaled_float64():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(10, 6)).double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    lorakit.inject(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True), "d")
    randomize_(model)
    model.eval()
    ad = model[0].adapter("d")
    wd = dora_weight(w0, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0)
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    with torch.no_grad(), lorakit.mixed_batch(model, ["d", None, "d"]):
        got = model(x)
    want = torch.stack([x[0] @ wd.T + b0, x[1] @ w0.T + b0, x[2] @ wd.T + b0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_weighted_combination_refuses_dora_naming_why():
    model = MLP()
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["lin0"], use_dora=True), "d")
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["lin0"]), "plain")
    with pytest.raises(ConfigError, match=r"'d' uses DoRA"):
        lorakit.add_weighted_adapter(model, ["d", "plain"], [0.5, 0.5], "sum", combination_type="cat")
    assert lorakit.list_adapters(model) == ["d", "plain"]


def test_use_dora_must_be_a_bool_and_is_written_to_the_config():
    with pytest.raises(ConfigError, match="use_dora must be True or False"):
        LoRAConfig(use_dora="yes")
    assert LoRAConfig(use_dora=True).to_dict()["use_dora"] is True
    assert LoRAConfig.from_dict({"use_dora": True, "r": 4}).use_dora is True


def test_cli_train_dora_saves_a_peft_dora_adapter_that_merges_to_the_same_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from _tiny import G2P_RECORDS, tiny_model_folder, write_jsonl
    from lorakit.app import cli

    model_dir = tiny_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", G2P_RECORDS)
    out_dir, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli.main(["train", "--model", str(model_dir), "--data", str(data), "--steps", "3", "--batch-size", "2",
                     "--lr", "0.01", "--dora", "--output", str(out_dir), "--no-progress"]) == 0
    assert cli.main(["info", str(out_dir)]) == 0
    assert "DoRA" in capsys.readouterr().out
    tensors = load_file(out_dir / "adapter_model.safetensors")
    mags = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert len(mags) == 14  # 7 projections x 2 layers
    assert cli.main(["merge", "--adapter", str(out_dir), "--output", str(merged)]) == 0
    ids = torch.tensor([[5, 9, 20, 31]])
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, pm(ids).logits, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        assert (base(ids).logits - pm(ids).logits).abs().max() > 1e-4  # the adapter trained: the magnitudes moved


def test_plain_then_dora_adapter_on_conv1d_with_gradients_matches_peft(tmp_path):
    """A plain adapter writes the Conv1D output (a view) in place first; DoRA's in-place write after it
    must still work with autograd on, and both together give PEFT's output."""
    build, x, *_ = FAMILIES["gpt2"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                     init_lora_weights=False))
    pm.add_adapter("d", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                        use_dora=True, init_lora_weights=False))
    randomize_(pm)
    pm.save_pretrained(tmp_path / "p")
    pm.base_model.set_adapter(["default", "d"])
    expected = out(pm, x).detach()
    model = build()
    lorakit.load_adapter(model, tmp_path / "p", "default")
    lorakit.load_adapter(model, tmp_path / "p" / "d", "d")
    lorakit.set_adapter(model, ["default", "d"])
    got = out(model, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    got.sum().backward()
    assert model.transformer.h[0].attn.c_attn.adapter("d").lora_magnitude_vector.grad is not None


def test_cached_norm_sees_a_replaced_tensor_and_data_edits_after_eval():
    """The norm cache follows version counters and storage: ``.data = ...`` is seen at once; an in-place
    ``.data`` edit (no version bump) after ``model.eval()`` / ``train()``, which drop the cache."""
    model, x, layer, ad = _eval_dora_mlp(9)

    def want():
        w = layer.base_layer.weight.detach()
        wd = dora_weight(w, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_magnitude_vector.detach(), 2.0)
        return x @ wd.T + layer.base_layer.bias.detach()

    layer(x)
    ad.lora_B.data = ad.lora_B.data + 0.5  # a new tensor
    torch.testing.assert_close(layer(x), want(), rtol=0, atol=1e-12)
    for _ in range(3):  # two new tensors in a row: the second must not pass for the one the norm was cached for
        ad.lora_B.data = ad.lora_B.data * 1.25
        ad.lora_B.data = ad.lora_B.data - 0.125
        torch.testing.assert_close(layer(x), want(), rtol=0, atol=1e-12)
    layer.base_layer.weight.data.mul_(1.5)  # in place, no version bump: seen after eval()
    model.eval()
    torch.testing.assert_close(layer(x), want(), rtol=0, atol=1e-12)


def test_dora_refuses_an_all_zero_output_feature_naming_the_module_and_feature():
    """‖W_i‖ = 0 for an all-zero row i (by hand): m_i / ‖W_i + s·B_i A‖ = 0 / 0 at B = 0, a NaN output (PEFT's
    too); refused before anything changes. Conv1D stores (in, out): its feature 2 is column 2."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), Conv1D(3, 3))
    with torch.no_grad():
        model[2].weight[:, 2] = 0.0
        model[2].weight[1, :] = 0.0  # a zero input row of Conv1D is no zero output feature
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lorakit.TargetModuleError, match=r"'2'.*output feature 2 .*all zeros"):
        lorakit.inject(model, LoRAConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert type(model[0]) is nn.Linear and type(model[2]) is Conv1D and not lorakit.list_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        model[2].weight[0, 2] = 1e-3  # small but not zero: its norm is 1e-3, the output finite
    lorakit.inject(model, LoRAConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert torch.isfinite(model(torch.randn(2, 4))).all()
