"""Find the modules a ``LoRAConfig`` targets and wrap them with LoRA layers."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dora
from . import modules_to_save as mts
from . import param_wrapper as pw
from . import trainable_tokens as tt
from .adapter import check_adapter_name
from .config import ALL_LINEAR, LoRAConfig, excluded
from .errors import AdapterExistsError, ConfigError, MergeStateError, TargetModuleError
from .layer_types import LoRAConv1D, LoRALinear, conv1d_type, lora_class_for, lora_classes
from .layers import LoRALayer
from .state import AdapterModule
from .tree import (activate, adapter_modules, attach_state, check_new, is_merged, lora_layers, model_state,
                   outside_mixed_batch, set_submodule, walk)


@dataclass(frozen=True)
class Target:
    """One module an adapter will be attached to."""

    name: str  # qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    r: int
    lora_alpha: float
    in_features: int
    out_features: int
    shapes: dict = field(default_factory=dict, compare=False)  # PEFT key suffix -> adapter tensor shape


def _layer_index(name: str, layers_pattern) -> int | None:
    """Block index of ``name``, PEFT's rule: the first ``<list>.<int>.`` after a dot (``model.layers.3.``;
    a top-level list has none), or the index after ``layers_pattern`` if given (``layers.3.`` too)."""
    if layers_pattern:
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALayer) else module


class _Matcher:
    """Decides which module names ``config.target_modules`` (and ``layers_to_transform``) select."""

    def __init__(self, model: nn.Module, config: LoRAConfig, saved: list[str]) -> None:
        self.tm, self.config, self.saved = config.target_modules, config, saved
        self.head = _output_head(model) if self.tm == ALL_LINEAR else None
        classes = lora_classes()
        self.linear_types = tuple(t for t, c in classes.items() if c in (LoRALinear, LoRAConv1D))
        self.used: set[str] = set()  # list entries that matched something
        self.outside: dict[str, tuple[str, int | None]] = {}  # entry -> a match outside layers_to_transform

    def inside_saved(self, name: str) -> bool:
        return any((name + ".").startswith(p + ".") for p in self.saved)

    def __call__(self, name: str, base: nn.Module) -> bool:
        tm = self.tm
        if tm == ALL_LINEAR:
            hit, entries = isinstance(base, self.linear_types) and base is not self.head and not self.inside_saved(name), []
        elif isinstance(tm, str):
            hit, entries = re.fullmatch(tm, name) is not None, []
        else:
            entries = [e for e in tm if name == e or name.endswith("." + e)]
            hit = bool(entries)
        # PEFT's rule: a module named in full is adapted whatever its block; a suffix match must lie
        # in one of layers_to_transform's blocks ([] means every block)
        if hit and self.config.layers_to_transform and name not in entries:
            block = _layer_index(name, self.config.layers_pattern)
            hit = block in self.config.layers_to_transform
            for e in entries:  # for the error if nothing in the chosen blocks matches
                self.outside.setdefault(e, (name, block))
        if hit:
            self.used.update(entries)  # matched, even if excluded below: not a typo in target_modules
        return hit and not excluded(self.config, name)

    def check_all_used(self, linear_names: list[str], names: list[str]) -> None:
        if not isinstance(self.tm, list):
            return
        missing = [e for e in self.tm if e not in self.used]
        if missing:
            sample = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
            lt = self.config.layers_to_transform
            where = f" in layers {lt}" if lt else ""
            near = nearest_names(missing[0], names)
            hint = f"nearest module names: {', '.join(near)}" if near else "no module name is close to it"
            if missing[0] in self.outside:
                name, block = self.outside[missing[0]]
                pattern = self.config.layers_pattern
                found = (f"block {block}" if block is not None else "no block index"
                         + (f" after {pattern!r}" if pattern else " (PEFT's rule reads it from '<parent>.<list>."
                                                                 "<int>.'; set layers_pattern to the list's name)"))
                hint = f"it matches {name!r}, with {found}"
            raise TargetModuleError(
                f"target_modules entry {missing[0]!r} matches no module{where}; {hint}; "
                f"available Linear modules include: {sample or '(none)'}"
            )


def nearest_names(entry: str, names: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` module names closest to ``entry`` (difflib's ratio >= 0.6), compared as the same
    number of trailing dotted parts as ``entry`` has (``"q_prj"`` against ``"q_proj"``), closest first."""
    depth = entry.count(".") + 1
    candidates = sorted({".".join(name.split(".")[-depth:]) for name in names if name})
    return difflib.get_close_matches(entry, candidates, n=n, cutoff=0.6)


def _target(name: str, module: nn.Module, config: LoRAConfig, adapter_name: str, matcher: _Matcher) -> Target:
    """The ``Target`` for a matched module, after checking it can take the adapter."""
    base = _base(module)
    if matcher.inside_saved(name):
        raise TargetModuleError(
            f"target module {name!r} lies in modules_to_save module {matcher.saved[0]!r}: a module is either "
            "adapted with LoRA or saved in full, not both"
        )
    if isinstance(module, mts.ModulesToSaveWrapper):
        raise TargetModuleError(f"target module {name!r} is a modules_to_save module of another adapter")
    cls = type(module) if isinstance(module, LoRALayer) else lora_class_for(base)
    if cls is None:
        raise TargetModuleError(
            f"target module {name!r} is a {type(module).__name__}, which lorakit cannot adapt "
            f"(supported: {', '.join(t.__name__ for t in lora_classes())})"
        )
    cls.check_base(base, name)
    if config.use_dora and not cls.supports_dora:
        raise TargetModuleError(f"target module {name!r} has a quantised base ({type(base).__name__}); DoRA needs the "
                                "dense weight's norm: call lorakit.dequantize(model) first, or use plain LoRA")
    if config.lora_bias and not cls.supports_lora_bias:
        raise TargetModuleError(f"target module {name!r} is a {type(base).__name__}, which takes no lora_bias "
                                "(PEFT neither); leave it out of target_modules or set lora_bias=False")
    if isinstance(module, LoRALayer) and module.has_adapter(adapter_name):
        raise AdapterExistsError(f"adapter {adapter_name!r} is already injected into {name!r}")
    r = config.rank_for(name)
    n_in, n_out = cls.features(base)
    return Target(name, r, config.alpha_for(name), n_in, n_out, cls.peft_shapes(base, r, config.use_dora, config.lora_bias))


def check_dora_norms(model: nn.Module, targets: list[Target]) -> None:
    """Raise ``TargetModuleError`` naming the first target with an all-zero output feature: a fresh DoRA
    adapter (B = 0) starts with ``m = ‖W‖_c = 0`` there and divides 0 by 0 (NaN outputs, as in PEFT)."""
    for t in targets:
        module = model.get_submodule(t.name)
        base = _base(module)
        cls = type(module) if isinstance(module, LoRALayer) else lora_class_for(base)
        zero = (dora.column_norm(base.weight.detach(), cls.weight_out_axis) == 0).nonzero()
        if len(zero):
            raise TargetModuleError(
                f"target module {t.name!r}: output feature {int(zero[0])} of its {type(base).__name__} weight is all "
                f"zeros ({len(zero)} such), so DoRA's magnitude / ‖W‖_c would be 0 / 0 (NaN outputs, as in PEFT); "
                "leave it out of target_modules or use plain LoRA")


def find_targets(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> list[Target]:
    """The modules ``config`` targets in ``model``, without changing anything.

    ``"all-linear"`` covers ``nn.Linear`` and transformers' ``Conv1D`` (as in PEFT), except the
    output head and modules inside ``modules_to_save`` modules.

    Raises:
        TargetModuleError: a ``target_modules`` list entry matches no module (the message lists
            the nearest module names and available Linear names), a regex or
            ``layers_to_transform`` leaves nothing to adapt, a matched module has an unsupported
            type (or is an ``nn.Conv2d`` with groups > 1), or lies in a ``modules_to_save`` module.
        AdapterExistsError: a matched module already has an adapter ``adapter_name``.
    """
    return _targets(model, config, adapter_name, mts.find_modules_to_save(model, config, adapter_name))


def _targets(model: nn.Module, config: LoRAConfig, adapter_name: str, saved: list[str]) -> list[Target]:
    """``find_targets`` given the ``modules_to_save`` modules ``saved`` (found once by the caller)."""
    matcher = _Matcher(model, config, saved)
    targets: list[Target] = []
    linear_names: list[str] = []
    names: list[str] = []
    for name, module in walk(model):  # never enters lorakit's modules: their children are ours
        if not name:
            continue
        names.append(name)
        if isinstance(_base(module), matcher.linear_types):
            linear_names.append(name)
        if matcher(name, _base(module)):
            targets.append(_target(name, module, config, adapter_name, matcher))
    matcher.check_all_used(linear_names, names)
    if not targets and not config.target_parameters:
        but = f" once exclude_modules={config.exclude_modules!r} is applied" if config.exclude_modules else ""
        raise TargetModuleError(f"target_modules={config.target_modules!r} matches no module in "
                                f"{type(model).__name__}{but}")
    return targets


def _shared_weights(model: nn.Module) -> dict[int, tuple[str, ...]]:
    """id(parameter) -> the qualified names of every module owning it, for parameters owned twice or more (tied).

    Only base parameters are looked at (lorakit's modules are entered through their base
    module), so the cost does not grow with the number of resident adapters.
    """
    owners: dict[int, list[str]] = {}
    for name, module in walk(model):
        if isinstance(module, AdapterModule):
            attr = "original_module" if isinstance(module, mts.ModulesToSaveWrapper) else "base_layer"
            module, name = getattr(module, attr), f"{name}.{attr}" if name else attr
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    return {k: tuple(v) for k, v in owners.items() if len(v) > 1}


def _wrap(model: nn.Module, name: str, shared: dict[int, tuple[str, ...]]) -> LoRALayer:
    """The LoRA layer at ``name``, wrapping the plain module there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALayer):
        return module
    owners = shared.get(id(getattr(module, "weight", None)), ())
    tied = tuple(n for n in owners if model.get_submodule(n) is not module)
    layer = lora_class_for(module, tied=bool(tied)).from_base(module)
    layer.train(module.training)  # a new module starts in training mode; the wrapper takes the wrapped one's
    layer.tied_with = tied  # merge unties (LoRALayer.merge)
    set_submodule(model, name, layer)
    return layer


def biases(model: nn.Module, config: LoRAConfig, adapted: set[str]) -> dict[str, nn.Parameter]:
    """The model biases ``config.bias`` trains when the modules ``adapted`` carry the adapter, by their
    names in a model holding this adapter alone (``<module>.base_layer.bias`` for an adapted module, as PEFT
    names them, ``<module>.bias`` for another, even if another adapter wrapped it): none,
    every bias outside lorakit's parts (``bias="all"``), or the adapted modules' (``"lora_only"``).
    ``adapted`` may name modules not wrapped yet (a load checks its keys before injecting)."""
    if config.bias == "none":
        return {}
    skip = [name + "." for name, m in adapter_modules(model) if isinstance(m, mts.ModulesToSaveWrapper)]
    out = {}
    for n, p in model.named_parameters():
        if not (n == "bias" or n.endswith(".bias")) or ".adapters." in n or any(n.startswith(s) for s in skip):
            continue
        owner = n[: -len(".bias")]
        owner = owner[: -len(".base_layer")] if owner.endswith(".base_layer") else owner
        if owner in adapted or config.bias == "all":  # the file's keys do not depend on other adapters
            out[f"{owner}.base_layer.bias" if owner in adapted else f"{owner}.bias"] = p
    return out


def aux_targets(model: nn.Module, config: LoRAConfig, adapter_name: str, lora_names: set[str]) -> tuple[dict, dict]:
    """``(token targets, parameter targets)`` of ``config.trainable_token_indices`` and ``target_parameters``
    (``trainable_tokens.token_targets``, ``param_wrapper.param_targets``), checked against the LoRA targets.

    Raises:
        TargetModuleError: see those two; or a module that is both a LoRA target and one of these.
    """
    tokens = tt.token_targets(model, config, adapter_name)
    params = pw.param_targets(model, config, adapter_name)
    for name in [*tokens, *params]:
        if name in lora_names or (name in tokens and name in params):
            what = "target_modules" if name in lora_names else "trainable_token_indices"
            opt = "trainable_token_indices" if name in tokens and what != "trainable_token_indices" else "target_parameters"
            raise TargetModuleError(f"{name!r} is selected by both {what} and {opt}; a module takes one of them")
    return tokens, params


def aux_shapes(model: nn.Module, config: LoRAConfig, adapter_name: str, lora_names: set[str]) -> dict[str, tuple]:
    """Module-qualified PEFT key -> shape of the trainable-token rows and target_parameters factors an
    injection of ``config`` would create (nothing is changed)."""
    tokens, params = aux_targets(model, config, adapter_name, lora_names)
    return {**tt.token_shapes(model, tokens), **pw.param_shapes(model, params)}


def trained_biases(model: nn.Module, config: LoRAConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    """``biases`` of an injected adapter ``adapter_name``."""
    return biases(model, config, {name for name, layer in lora_layers(model) if layer.has_adapter(adapter_name)})


def _add(model: nn.Module, config: LoRAConfig, adapter_name: str, targets: list[Target], init_lora_weights) -> None:
    """Wrap each target (once) and give it the adapter's A and B."""
    shared = _shared_weights(model)
    for t in targets:
        _wrap(model, t.name, shared).add_adapter(
            adapter_name, r=t.r, lora_alpha=t.lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=init_lora_weights, use_dora=config.use_dora,
            lora_bias=config.lora_bias,
        )


def _check_can_inject(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    """Raise ``inject``'s ConfigError, MergeStateError, MixedBatchError or AdapterExistsError."""
    check_adapter_name(adapter_name)
    if not isinstance(model, nn.Module) or not isinstance(config, LoRAConfig):
        raise ConfigError(f"inject takes an nn.Module and a LoRAConfig, got {type(model).__name__} and "
                          f"{type(config).__name__}")
    config = dataclasses.replace(config)  # validated again: fields may have been set after construction
    if is_merged(model):
        raise MergeStateError("cannot inject an adapter while adapters are merged; call unmerge(model) first")
    outside_mixed_batch(model, "cannot inject or load an adapter inside mixed_batch")
    check_new(model, adapter_name)


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default", *, init_weights: bool = True) -> nn.Module:
    """Freeze ``model`` and attach a LoRA adapter to every module ``config`` targets.

    Each matched module is replaced in place by the LoRA class for its type (``nn.Linear`` ->
    ``LoRALinear``, transformers ``Conv1D`` -> ``LoRAConv1D``, ``nn.Embedding`` ->
    ``LoRAEmbedding``, ``nn.Conv2d`` -> ``LoRAConv2d``); a module already wrapped gets a further
    adapter. Modules in ``config.modules_to_save`` get a full trainable copy for this adapter
    (``lorakit.modules_to_save``); the rows ``config.trainable_token_indices`` names are trained
    in place of the embedding's (``lorakit.trainable_tokens``), and each of
    ``config.target_parameters`` gets a LoRA delta (``lorakit.param_wrapper``). A module whose weight is tied to another module's (GPT-2's
    ``lm_head`` and ``transformer.wte``) is untied while merged, never written through. Every
    parameter that existed before is frozen, the new adapter is the only active one and its A
    and B (and its modules_to_save copies, and the biases ``config.bias`` names) are the only
    trainable parameters. Nothing changes if an error is raised.

    ``init_weights=False`` leaves A and B uninitialised, for callers that copy every adapter
    weight in right after (``load_adapter``).

    Returns:
        the same ``model`` object.

    Raises:
        ConfigError: ``adapter_name`` is not a str, or ``model`` / ``config`` of the wrong type.
        MixedBatchError: called inside ``mixed_batch``.
        AdapterExistsError: the model already has an adapter ``adapter_name`` (on any layer).
        TargetModuleError: see ``find_targets`` and ``aux_targets``; a fresh DoRA adapter on a weight with an
            all-zero output feature (``check_dora_norms``).
        MergeStateError: adapters are merged (unmerge first).
    """
    _check_can_inject(model, config, adapter_name)
    saved = mts.find_modules_to_save(model, config, adapter_name)
    targets = _targets(model, config, adapter_name, saved)
    conv1d = conv1d_type()
    if conv1d is not None and not config.fan_in_fan_out:
        if any(isinstance(_base(model.get_submodule(t.name)), conv1d) for t in targets):
            config = dataclasses.replace(config, fan_in_fan_out=True)  # as PEFT records it for Conv1D models
    tokens, params = aux_targets(model, config, adapter_name, {t.name for t in targets})
    if config.use_dora and init_weights and config.init_lora_weights is not False:  # B = 0: m = ‖W‖_c
        check_dora_norms(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    # never inference tensors, even when injected (or loaded) under torch.inference_mode: those have no
    # version counter, so a mixed batch could not see them change, and they could never be trained
    with torch.inference_mode(False):
        _add(model, config, adapter_name, targets, config.init_lora_weights if init_weights else None)
        mts.add_copies(model, saved, adapter_name)
        tt.add_tokens(model, tokens, adapter_name)
        pw.add_params(model, params, config, adapter_name, config.init_lora_weights if init_weights else None)
    for bias in trained_biases(model, config, adapter_name).values():
        bias.requires_grad_(True)
    state = attach_state(model)
    state.configs[adapter_name] = config
    for _, module in adapter_modules(model):
        module.lora_state = state  # one active set for the whole model
    activate(model, [adapter_name])
    return model
