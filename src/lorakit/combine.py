"""``add_weighted_adapter``: a new adapter whose delta is a weighted sum of others.

Every combination is defined against the exact target, per layer,
``Delta = sum_i w_i * s_i * B_i @ A_i`` (s_i each adapter's own scaling, so
rsLoRA and mixed alphas stay exact). The new adapter stores its factors with
the scaling folded in (lora_alpha = r, s = 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from .adapter import check_adapter_name
from .config import LoRAConfig
from .errors import ConfigError
from .inject import inject
from .layers import LoRALinear
from .tree import check_known, check_new, lora_layers, model_state

COMBINATIONS = ("cat", "svd", "linear")


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
    svd_rank: int | None = None,
) -> dict[str, float]:
    """Add adapter ``adapter_name`` with per-layer delta ``sum_i w_i s_i B_i A_i``.

    combination_type:
        ``"cat"``: exact. A = [A_1; A_2; ...] (rank sum r_i), B = [w_1 s_1 B_1, ...].
        ``"svd"``: the best rank-``svd_rank`` approximation of the exact delta in
            Frobenius norm (Eckart-Young), per layer, computed in float64 from the
            QR factors of the stacked B and A (never forming a full SVD of out x in).
            ``svd_rank`` defaults to the largest r_i.
        ``"linear"``: exact only when, on every layer, all adapters share the same
            A matrix (bitwise); then A is kept and B = sum_i w_i s_i B_i. Same rank
            and same initialisation are not enough once A has been trained:
            anything else raises ``ConfigError`` (use "cat").

    The new adapter targets the union of the source adapters' layers and, like
    every added adapter, becomes the only active one. Only ``nn.Linear`` adapters
    can be combined.

    Returns:
        ``{module_name: relative Frobenius error ||Delta - Delta_new|| / ||Delta||}``
        per layer (0.0 for "cat" and "linear"; for "svd" the norm of the discarded
        singular values over the norm of all of them).

    Raises:
        AdapterNotFoundError: an unknown source adapter.
        AdapterExistsError: ``adapter_name`` already exists.
        ConfigError: mismatched lengths, non-finite weights, unknown
            ``combination_type``, a bad ``svd_rank``, "linear" where it is not exact,
            a source layer that is not ``nn.Linear``, a DoRA or bias-training source adapter, or one
            with ``trainable_token_indices`` or ``target_parameters`` (named).
        MergeStateError: adapters are merged.
    """
    adapters, weights, svd_rank = _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (B (out x k), A (k x in)), float64
    errors: dict[str, float] = {}
    for name, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
        if present:
            factors[name], errors[name] = _combine_layer(name, layer, present, combination_type, svd_rank)
    _add_factors(model, factors, adapter_name, model_state(model).configs[adapters[0]])
    return errors


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank):
    """Validated ``(adapters, weights, svd_rank)``; raises before anything changes."""
    check_adapter_name(adapter_name)
    if isinstance(adapters, str) or isinstance(weights, (str, int, float)):
        raise ConfigError("adapters and weights must be lists (one weight per adapter)")
    adapters = list(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be numbers, got {list(weights)!r}") from None
    if not adapters:
        raise ConfigError("adapters must name at least one adapter")
    check_known(model, adapters)
    check_new(model, adapter_name)
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite, got {weights}")
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r}; expected one of {COMBINATIONS}")
    configs = model_state(model).configs
    trains_bias = [a for a in adapters if configs[a].bias != "none"]
    if trains_bias:  # its biases are the model's own: there is no per-adapter bias to weigh
        raise ConfigError(f"adapter {trains_bias[0]!r} trains base biases (bias={configs[trains_bias[0]].bias!r}); "
                          "add_weighted_adapter combines only bias='none' adapters")
    biased = [a for a in adapters if configs[a].lora_bias]
    if biased:
        raise ConfigError(f"adapter {biased[0]!r} has lora_bias=True; add_weighted_adapter combines only adapters "
                          "without a bias of B")
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:  # W' = m ⊙ (W + ΔW)/‖W + ΔW‖_c is not linear in ΔW: weighted sums of DoRA adapters mean nothing
        raise ConfigError(f"adapter {dora[0]!r} uses DoRA (use_dora=True); its magnitude rescales the weight "
                          "non-linearly, so add_weighted_adapter combines only LoRA adapters")
    for option in ("trainable_token_indices", "target_parameters"):  # replaced rows / expert stacks: no B·A sum here
        uses = [a for a in adapters if getattr(configs[a], option)]
        if uses:
            raise ConfigError(f"adapter {uses[0]!r} uses {option}={getattr(configs[uses[0]], option)!r}; "
                              "add_weighted_adapter combines only LoRA deltas of target_modules")
    if combination_type == "svd":
        svd_rank = max(configs[a].r for a in adapters) if svd_rank is None else svd_rank
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise ConfigError(f"svd_rank must be an int >= 1, got {svd_rank!r}")
    return adapters, weights, svd_rank


def _combine_layer(name, layer, present, combination_type, svd_rank):
    """``((B, A), relative error)`` of one layer's combined delta, in float64."""
    if not isinstance(layer, LoRALinear):
        raise ConfigError(f"cannot combine adapters on {name!r}: only nn.Linear adapters are supported")
    folded = [(layer.adapter(a).folded(torch.float64), w) for a, w in present]  # ((A, s B), w)
    As = [a for (a, _), _ in folded]
    Bs = [sb * w for (_, sb), w in folded]
    if combination_type == "cat":
        return (torch.cat(Bs, 1), torch.cat(As, 0)), 0.0
    if combination_type == "linear":
        if any(not torch.equal(A, As[0]) for A in As[1:]):
            raise ConfigError(
                f"'linear' combination is exact only when all adapters share the same A; they differ on {name!r} "
                "(use combination_type='cat' or 'svd')"
            )
        return (sum(Bs), As[0]), 0.0
    return _truncated_svd(torch.cat(Bs, 1), torch.cat(As, 0), svd_rank)


def _add_factors(model, factors, adapter_name, first: LoRAConfig) -> None:
    """Inject ``adapter_name`` (s = 1: lora_alpha = r per module) holding ``factors``."""
    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    r = max(ranks.values())
    odd = {re.escape(n): k for n, k in ranks.items() if k != r}  # full names as PEFT patterns
    config = LoRAConfig(
        r=r, lora_alpha=r, lora_dropout=first.lora_dropout, target_modules=list(factors),
        rank_pattern=odd, alpha_pattern=dict(odd), init_lora_weights=False,
        base_model_name_or_path=first.base_model_name_or_path, task_type=first.task_type,
    )
    inject(model, config, adapter_name, init_weights=False)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if name in factors:
                B, A = factors[name]
                a, b = layer.lora_weights(adapter_name)
                a.copy_(A)
                b.copy_(B)


def _truncated_svd(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Best rank-k factors of ``B @ A`` (out x R, R x in) and the relative Frobenius error.

    B = Q1 R1 and A^T = Q2 R2 give B A = Q1 (R1 R2^T) Q2^T, so the singular values
    of the small R x R core are those of the delta (Eckart-Young applies to it).
    """
    q1, r1 = torch.linalg.qr(B)
    q2, r2 = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    keep = min(k, s.numel())
    root = s[:keep].sqrt()
    B_new = torch.zeros(B.shape[0], k, dtype=B.dtype)
    A_new = torch.zeros(k, A.shape[1], dtype=A.dtype)
    B_new[:, :keep] = (q1 @ u[:, :keep]) * root
    A_new[:keep] = root[:, None] * (vh[:keep] @ q2.T)
    total = s.square().sum()
    err = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return (B_new, A_new), err
