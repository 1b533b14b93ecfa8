"""``LoRAConfig``: the hyper-parameters of one adapter, in PEFT's field names.

``to_dict`` / ``from_dict`` read and write the ``adapter_config.json`` of PEFT's
on-disk format, so an adapter saved by lorakit loads in PEFT and vLLM and back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .adapter import scaling
from .errors import ConfigError, LoRAWarning
from .fields import (ALL_LINEAR, check_alpha, check_excludes, check_layers, check_parameters, check_rank,
                     check_targets, check_tokens)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEFT_LORA_ALPHA = 8.0  # PEFT's LoraConfig default: what a file that leaves lora_alpha out means
BIAS_MODES = ("none", "all", "lora_only")

# PEFT keys that only describe where the adapter came from; kept, never refused.
_METADATA_KEYS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode",
}

# PEFT LoraConfig keys lorakit does not implement, with the values that mean
# "feature off". A loaded config is accepted only if each is at one of these.
_NEUTRAL = {
    "megatron_config": (None,),
    "megatron_core": ("megatron.core", None),
    # settings of an initialisation, read only with that init_lora_weights (checked in _loaded_init)
    "loftq_config": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "qalora_group_size": None,  # any value: only read when use_qalora is true
    "monteclora_config": (None,),
    "layer_replication": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "ensure_weight_tying": (False,),
    "runtime_config": None,  # runtime-only options (e.g. GPU offload), no effect on weights
}

# Keys of older PEFT versions (2023: loralib-era MergedLinear), with the values that leave the math
# unchanged (None: any value). Files carrying them load with a warning, as in PEFT.
_LEGACY = {
    "enable_lora": (None,),  # which of q/k/v a fused layer adapted; set, it changes the math
    "merge_weights": None,  # loralib's merge-on-eval switch: no effect on the weights
}


@dataclass
class LoRAConfig:
    """Hyper-parameters of one LoRA adapter (Hu et al. 2021, "LoRA", eq. 3).

    The adapted layer computes ``h = W x + s * B A x`` with ``A`` (r x in_features),
    ``B`` (out_features x r) and scaling ``s = lora_alpha / r``, or
    ``s = lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, "A Rank
    Stabilization Scaling Factor for Fine-Tuning with LoRA", Thm. 3.2).

    Attributes:
        r: rank of the bypass, int >= 1.
        lora_alpha: scaling numerator, float > 0.
        lora_dropout: dropout probability on the bypass input, 0 <= p < 1.
        use_rslora: use ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        use_dora: DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5):
            ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c`` with a trainable magnitude ``m`` per output
            feature, initialised to the weight's norm; the norm is detached (§4.3). Saved as PEFT's
            ``lora_magnitude_vector``. Such adapters merge and unmerge exactly and mix per row
            (``mixed_batch``), but are not combined (``add_weighted_adapter`` refuses them).
        lora_bias: PEFT's option: B gets a bias, ``h = W x + s·(B A x + b_B)``, saved as
            ``lora_B.bias``; merging adds ``s·b_B`` to the base bias (a base layer without a bias
            cannot merge it). Not with DoRA, ``init_lora_weights="gaussian"`` or on nn.Embedding
            (as in PEFT).
        target_modules: list of module names (an entry matches a module whose
            qualified name equals it or ends with ``"." + entry``), a string taken
            as a full-match regex over qualified names, or ``"all-linear"``
            (every ``nn.Linear`` except the model's output head).
        exclude_modules: modules never adapted even when ``target_modules`` selects them: a
            list (an entry matches a module whose qualified name equals it or ends with
            ``"." + entry``) or a full-match regex string (PEFT's rule); None for none.
        layers_to_transform: block indices (an int or a list; None or [] for all) restricting the
            modules a list ``target_modules`` matches by suffix, as PEFT: the index is the first
            ``<list>.<int>.`` after a dot in the module's name (``model.layers.3.``), or the one
            after ``layers_pattern``; a module without one is not adapted, a module named in full
            is adapted whatever its block. Not with a string ``target_modules`` (ConfigError).
        layers_pattern: name(s) of the block list, e.g. ``"layers"`` or ``"h"`` (needed for a
            top-level list, ``layers.3.``).
        rank_pattern / alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}``
            overrides; a pattern matches when it matches the end of a module name
            (PEFT's ``(.*\\.)?(pattern)$`` rule); the first matching key wins.
        init_lora_weights: True (A Kaiming-uniform with a=sqrt(5), B zeros),
            ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or False (both random; for tests).
        bias: ``"none"`` (base biases frozen), ``"all"`` (every bias of the model trained and saved
            with the adapter) or ``"lora_only"`` (the biases of the adapted modules), as PEFT: the
            biases are the model's own, so loading such an adapter overwrites them, and its rows
            cannot be mixed with other adapters' in ``mixed_batch``.
        base_model_name_or_path, task_type, revision: metadata PEFT stores.
        modules_to_save: module names that are trained in full: each gets a trainable copy per
            adapter, saved with the adapter under PEFT's keys (``lorakit.modules_to_save``). An entry
            matches every module whose name ends with it as a plain string (PEFT's rule: ``"norm"``
            also matches ``input_layernorm``). None or [] for none.
        fan_in_fan_out: PEFT's flag for base weights stored (in, out), as in
            transformers' ``Conv1D`` (GPT-2). lorakit reads the layout from the
            module type, as PEFT ends up doing (it corrects the flag per layer with a
            warning); ``inject`` sets it True when a ``Conv1D`` is adapted so the saved
            config matches PEFT's.
        trainable_token_indices: embedding rows trained in full (PEFT's trainable tokens): a list of
            row indices of the input embedding, or ``{module_name: [indices]}``; rows are replaced,
            not added to, and saved as ``<module>.token_adapter.trainable_tokens_delta``
            (``lorakit.trainable_tokens``). None for none.
        target_parameters: ``"<module>.<parameter>"`` names of 2-D or 3-D ``nn.Parameter`` weights
            (MoE expert stacks) given a LoRA delta each, PEFT's ``ParamWrapper``
            (``lorakit.param_wrapper``); needs ``lora_dropout=0``. None or [] for none; with it,
            ``target_modules`` may be [] (or None).

    Raises:
        ConfigError (a ValueError): a field has an invalid value; the message
            names the field and the value.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    bias: str = "none"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    revision: str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        self.r = check_rank("r", self.r)
        self.lora_alpha = check_alpha("lora_alpha", self.lora_alpha)
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"lora_dropout must be a number with 0 <= p < 1, got {p!r}")
        self.lora_dropout = float(p)
        for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.trainable_token_indices = check_tokens(self.trainable_token_indices)
        self.target_parameters = check_parameters(self.target_parameters, self.lora_dropout)
        if self.target_parameters and (self.use_dora or self.lora_bias):  # PEFT's ParamWrapper refuses both
            raise ConfigError(f"target_parameters={self.target_parameters!r} does not combine with "
                              f"{'use_dora' if self.use_dora else 'lora_bias'}=True (PEFT neither)")
        if self.target_parameters and self.target_modules in (None, [], ()):
            self.target_modules = []  # PEFT: target_parameters alone is enough
        else:
            self.target_modules = check_targets(self.target_modules)
        self.exclude_modules = check_excludes(self.exclude_modules)
        self.layers_to_transform = check_layers(self.layers_to_transform)
        self._check_patterns()
        self._check_layer_options()
        for name in ("base_model_name_or_path", "task_type", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.lora_bias and (self.use_dora or self.init_lora_weights == "gaussian"):
            clash = "use_dora=True" if self.use_dora else "init_lora_weights='gaussian'"
            raise ConfigError(f"lora_bias=True does not combine with {clash} (PEFT refuses it too)")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        ms = self.modules_to_save
        if ms is not None:
            if isinstance(ms, str) or not isinstance(ms, (list, tuple)) or not all(isinstance(m, str) and m for m in ms):
                raise ConfigError(f"modules_to_save must be a list of module names or None, got {ms!r}")
            self.modules_to_save = list(dict.fromkeys(ms)) or None  # PEFT writes duplicates; [] means none

    def _check_patterns(self) -> None:
        """``rank_pattern`` / ``alpha_pattern`` (regex keys, valid values) and ``layers_pattern``."""
        if not isinstance(self.rank_pattern, dict) or not isinstance(self.alpha_pattern, dict):
            raise ConfigError("rank_pattern and alpha_pattern must be dicts of {pattern: value}")
        for name in ("rank_pattern", "alpha_pattern"):
            for k in getattr(self, name):
                try:
                    re.compile(k)
                except (re.error, TypeError) as e:
                    raise ConfigError(f"{name} key {k!r} is not a valid regex: {e}") from None
        self.rank_pattern = {k: check_rank(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()}
        self.alpha_pattern = {k: check_alpha(f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()}
        lp = self.layers_pattern
        if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(x, str) for x in lp))):
            raise ConfigError(f"layers_pattern must be a string or a list of strings, got {lp!r}")

    def _check_layer_options(self) -> None:
        """PEFT's rules: block indices select among names matched by a list, not by a regex, which
        can name its blocks itself; ``layers_pattern`` alone selects nothing (PEFT refuses it; a
        warning here, as it leaves the math unchanged)."""
        if isinstance(self.target_modules, str) and self.layers_to_transform:
            raise ConfigError(
                f"layers_to_transform={self.layers_to_transform!r} needs target_modules as a list of names, "
                f"not the string {self.target_modules!r} (PEFT refuses it too); write the block indices "
                r"into the regex instead, e.g. '.*\.layers\.(0|1)\..*q_proj'")
        if self.layers_pattern and self.layers_to_transform is None:
            warnings.warn(f"layers_pattern={self.layers_pattern!r} without layers_to_transform selects no "
                          "blocks and is ignored (PEFT refuses it)", LoRAWarning, stacklevel=3)

    # --- per-module values -------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` (``rank_pattern`` first, else ``r``)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """``lora_alpha`` for ``module_name`` (``alpha_pattern`` first, else ``lora_alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """``s = alpha / r`` (Hu et al. 2021) or ``alpha / sqrt(r)`` (rsLoRA) for ``module_name``."""
        return scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)

    # --- PEFT adapter_config.json ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content in PEFT's format (``peft_type: "LORA"``), keys sorted.

        ``rank_pattern`` / ``alpha_pattern`` keep their order (the first matching key wins, for PEFT
        as here), so write the dict as it is, without ``sort_keys``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["lora_alpha"] = float(self.lora_alpha)
        d.update(peft_type="LORA", inference_mode=True)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        """Build a config from an ``adapter_config.json`` dict (PEFT's or ours).

        A missing ``lora_alpha`` is PEFT's default, 8 (``LoRAConfig``'s own default is 16); a
        missing or null ``target_modules`` is lorakit's default here, which ``read_adapter``
        replaces by the modules the weight file adapts. Keys PEFT knows but lorakit does not
        implement are accepted only at their neutral value (e.g. ``use_qalora: false``). Keys of older
        PEFT versions (``enable_lora: null``, ``merge_weights``) and keys no version knows are ignored with one
        ``LoRAWarning`` naming them, as PEFT does, unless they change the math or look like a
        misspelt field (``lora_alpah``).

        Raises:
            ConfigError: not a LoRA config, a PEFT feature that is switched on which lorakit
                does not implement, a legacy key at a value that changes the math, or a near miss
                of a field (the key, value and nearest field named).
        """
        if not isinstance(d, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"peft_type={d.get('peft_type')!r} is not a LoRA adapter (expected 'LORA')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k in _METADATA_KEYS:
                continue
            elif k in _LEGACY:
                if _LEGACY[k] is not None and v not in _LEGACY[k]:
                    raise ConfigError(f"adapter config key {k!r}={v!r} (from an older PEFT) changes the adapter's math; "
                                      "lorakit loads it only when null")
                ignored.append(k)
            elif k in _NEUTRAL or _near(k):
                _check_foreign(k, v, "adapter config key")
            else:
                ignored.append(k)
        if ignored:
            warnings.warn(f"adapter config keys {ignored} are not LoRA options of this PEFT version; ignored (as PEFT "
                          "does)", LoRAWarning, stacklevel=2)
        if kwargs.get("target_modules") is None and not kwargs.get("target_parameters"):
            kwargs.pop("target_modules", None)  # io.read_adapter takes them from the weight file's keys
        kwargs.setdefault("lora_alpha", PEFT_LORA_ALPHA)  # a file without it: PEFT's default, as PEFT loads it
        for k in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        _loaded_init(kwargs)
        return cls(**kwargs)


# PEFT's data- or SVD-driven initialisations: these only chose the first A and B, which a loaded file
# replaces, so the adapter loads as plain LoRA ...
_INIT_ONLY = ("eva", "orthogonal", "mica")
# ... while these also rewrote the base weight at init (W - s·B0·A0, or a quantised W), so the file's
# A and B belong to a base no other tool has unless PEFT converts them first.
_BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _loaded_init(kwargs: dict) -> None:
    init = kwargs.get("init_lora_weights")
    if not isinstance(init, str) or init == "gaussian":
        return
    if init.lower() in _INIT_ONLY:
        warnings.warn(f"init_lora_weights={init!r} only set the adapter's initial A and B, which the file's "
                      "weights replace; loaded as plain LoRA (init_lora_weights=True)", LoRAWarning, stacklevel=3)
        kwargs["init_lora_weights"] = True
    elif init.lower().startswith(_BASE_CHANGING):
        raise ConfigError(
            f"init_lora_weights={init!r}: PEFT changed the base weights when it built this adapter, so its A and B "
            "fit only that changed base; convert it to a plain LoRA adapter with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=<folder of the initial adapter>)), "
            "which loads here")


def _near(key: Any) -> list[str]:
    """The field ``key`` looks like a misspelling of (difflib ratio >= 0.8), if any."""
    valid = [f.name for f in dataclasses.fields(LoRAConfig)]
    return difflib.get_close_matches(key, valid, n=1, cutoff=0.8) if isinstance(key, str) else []


def _check_foreign(key: str, value: Any, what: str) -> None:
    """Accept a PEFT option lorakit does not implement only at its neutral value ("feature off").

    Raises:
        ConfigError: the option is switched on, or the key is unknown (the nearest valid key named).
    """
    if key in _NEUTRAL:
        allowed = _NEUTRAL[key]
        if allowed is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key}={value!r} is a PEFT LoraConfig option lorakit does not support")
        return
    valid = [f.name for f in dataclasses.fields(LoRAConfig)] + sorted(_NEUTRAL)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) if isinstance(key, str) else []
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid options: {', '.join(valid[:16])}"
    raise ConfigError(f"unknown {what} {key!r} (value {value!r}){hint}")


_dataclass_init = LoRAConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs) -> None:
    """The dataclass ``__init__``, with PEFT's unsupported options accepted only when off and unknown
    keywords refused with a ``ConfigError`` naming the nearest valid one (not a bare TypeError)."""
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    if len(args) > len(fields):
        raise ConfigError(f"LoRAConfig takes at most {len(fields)} positional arguments, got {len(args)}")
    for key in [k for k in kwargs if k not in fields]:
        _check_foreign(key, kwargs.pop(key), "LoRAConfig option")
    _dataclass_init(self, *args, **kwargs)


LoRAConfig.__init__ = _init


def excluded(config: LoRAConfig, name: str) -> bool:
    """Whether ``config.exclude_modules`` names module ``name`` (PEFT's rule: a string is a full-match
    regex; a list entry equals the name or its last dotted parts)."""
    em = config.exclude_modules
    if em is None:
        return False
    if isinstance(em, str):
        return re.fullmatch(em, name) is not None
    return any(name == e or name.endswith("." + e) for e in em)


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    """First key of ``patterns`` matching the end of ``module_name`` (PEFT's rule)."""
    for key in patterns:
        if key == module_name or re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
