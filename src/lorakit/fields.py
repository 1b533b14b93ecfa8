"""Validators of ``LoRAConfig``'s fields: each takes a field's value as given (from Python or an
``adapter_config.json``), returns it normalised (a set sorted to a list, an int index to a list)
or raises ``ConfigError`` naming the field and the value."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigError

ALL_LINEAR = "all-linear"


def check_targets(tm: Any) -> list[str] | str:
    if isinstance(tm, str):
        if tm != ALL_LINEAR:
            try:
                re.compile(tm)
            except re.error as e:
                raise ConfigError(f"target_modules regex {tm!r} does not compile: {e}") from None
        return tm
    if isinstance(tm, (list, tuple, set)) and tm and all(isinstance(t, str) and t for t in tm):
        return sorted(tm) if isinstance(tm, set) else list(tm)
    raise ConfigError(
        f"target_modules must be a non-empty list of module names, a regex string or 'all-linear', got {tm!r}"
    )


def check_tokens(tti: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices``: a list of distinct row indices >= 0, or ``{module name: such a list}``."""
    def indices(where: str, v: Any) -> list[int]:
        if not isinstance(v, (list, tuple)) or not v or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise ConfigError(f"trainable_token_indices{where} must be a non-empty list of row indices >= 0, got {v!r}")
        if len(set(v)) != len(v):
            dup = next(i for i in v if list(v).count(i) > 1)
            raise ConfigError(f"trainable_token_indices{where} lists row {dup} twice")
        return [int(i) for i in v]

    if tti is None:
        return None
    if isinstance(tti, dict):
        if not tti or not all(isinstance(k, str) and k for k in tti):
            raise ConfigError(f"trainable_token_indices must map module names to row indices, got {tti!r}")
        return {k: indices(f"[{k!r}]", v) for k, v in tti.items()}
    return indices("", tti)


def check_parameters(tp: Any, dropout: float) -> list[str] | None:
    """``target_parameters``: a list of ``"<module>.<parameter>"`` names; PEFT's ParamWrapper has no dropout."""
    if tp is None or (isinstance(tp, (list, tuple)) and not tp):
        return None
    if isinstance(tp, str) or not isinstance(tp, (list, tuple, set)) or not all(
            isinstance(t, str) and t and not t.startswith(".") and not t.endswith(".") for t in tp):
        raise ConfigError(f"target_parameters must be a list of '<module>.<parameter>' names, got {tp!r}")
    if dropout:
        raise ConfigError(f"target_parameters={list(tp)!r} needs lora_dropout=0 (dropout cannot act on a weight "
                          f"delta; PEFT's ParamWrapper refuses it too), got lora_dropout={dropout}")
    return sorted(tp) if isinstance(tp, set) else list(dict.fromkeys(tp))


def check_excludes(em: Any) -> list[str] | str | None:
    if em is None or em == "" or (isinstance(em, (list, tuple, set)) and not em):
        return None
    if isinstance(em, str):
        try:
            re.compile(em)
        except re.error as e:
            raise ConfigError(f"exclude_modules regex {em!r} does not compile: {e}") from None
        return em
    if isinstance(em, (list, tuple, set)) and all(isinstance(t, str) and t for t in em):
        return sorted(em) if isinstance(em, set) else list(em)
    raise ConfigError(f"exclude_modules must be a list of module names, a regex string or None, got {em!r}")


def check_layers(lt: Any) -> list[int] | None:
    if isinstance(lt, int) and not isinstance(lt, bool):
        lt = [lt]
    if lt is not None and not (
        isinstance(lt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lt)
    ):
        raise ConfigError(f"layers_to_transform must be a list of block indices >= 0, got {lt!r}")
    return None if lt is None else list(lt)


def check_rank(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def check_alpha(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)
