"""Opt-in (pytest -m slow): llama.cpp itself runs what lorakit exports, through llama-cpp-python.

The first run builds llama-cpp-python (pinned in constraints.txt; PyPI has only its source package) with
cmake and the C compiler into a wheel under ``~/.cache/lorakit/wheels`` (``$LORAKIT_CACHE``) and installs it
with diskcache into ``~/.cache/lorakit/llama-cpp-python-<version>`` (not into the environment); later runs
reuse it. A short G2P adapter is trained on the default SmolLM2-135M-Instruct, then 20 test words are
decoded greedily by lorakit (float32, merged) and by llama.cpp: the default Q4_1 GGUF with the exported
GGUF LoRA, and the merged model exported as f32, f16 and q8_0 GGUF. The agreement rates are printed
(``-s``); f32 must agree on every word.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import load_adapter, merge
from lorakit.app import cli
from lorakit.app.models import cache_root, default_gguf, load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
N_WORDS, MAX_NEW = 20, 24


def _pin(name: str) -> str:
    line = next(l for l in (ROOT / "constraints.txt").read_text().splitlines() if l.startswith(name + "=="))
    return line.split("==")[1].strip()


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp, built once from PyPI's source package and cached (see the module docstring)."""
    version = _pin("llama-cpp-python")
    target = cache_root() / f"llama-cpp-python-{version}"
    if not (target / "llama_cpp").is_dir():
        wheels = cache_root() / "wheels"
        pip = [sys.executable, "-m", "pip"]
        if not list(wheels.glob(f"llama_cpp_python-{version}-*.whl")):
            # GGML_NATIVE=OFF: -march=native emitted AMX / AVX-512 code that this VM's CPU advertises but
            # traps on (SIGILL); the portable build (AVX2, FMA, F16C) computes the same. No multimodal library.
            flags = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
            env = dict(os.environ, CMAKE_ARGS=flags,
                       CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), f"llama-cpp-python=={version}"], env=env,
                           check=True, timeout=4 * 3600)
        wheel = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))[-1]
        tmp = target.with_name(target.name + ".tmp")
        subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(tmp), str(wheel),
                        f"diskcache=={_pin('diskcache')}"], check=True, timeout=600)
        tmp.rename(target)
    sys.path.insert(0, str(target))
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A G2P adapter trained briefly on the default model, and lorakit's greedy completions of 20 test words."""
    from lorakit.app import g2p
    from lorakit.app.data import render_prompt
    from lorakit.app.evaluate import encode_prompt, greedy_generate

    out = tmp_path_factory.mktemp("llamacpp") / "adapter"
    assert cli.main(["train", "--steps", "40", "--test-size", "8", "--eval-every", "0", "--output", str(out),
                     "--no-progress"]) == 0
    lm = load_model()
    load_adapter(lm.model, out)
    merge(lm.model)
    words = [w for w, _ in g2p.g2p_split(0, 200, g2p.G2P_VALIDATION).test[:N_WORDS]]
    texts = [render_prompt(lm.tokenizer, w, g2p.G2P_FORMAT) for w in words]
    ours = greedy_generate(lm.model, lm.tokenizer, texts, max_new_tokens=MAX_NEW)
    ids = [encode_prompt(lm.tokenizer, t) for t in texts]
    return out, lm.tokenizer, ids, ours


def _llama_greedy(llama_cpp, model: Path, ids, tokenizer, lora: Path | None = None) -> list[str]:
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                          verbose=False)
    outs = []
    for prompt in ids:
        toks = []
        for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == llm.token_eos() or len(toks) == MAX_NEW:
                break
            toks.append(t)
        outs.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return outs


def _report(name: str, ours: list[str], theirs: list[str]) -> float:
    rate = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    print(f"\n{name}: {rate:.0%} of {len(ours)} greedy completions equal lorakit's")
    for a, b in zip(ours, theirs):
        if a != b:
            print(f"  lorakit {a!r} != llama.cpp {b!r}")
    return rate


def test_gguf_lora_on_the_default_gguf(llama_cpp, trained, tmp_path):
    adapter, tok, ids, ours = trained
    lora = tmp_path / "adapter.gguf"
    assert cli.main(["export", "--adapter", str(adapter), "--format", "gguf", "--output", str(lora)]) == 0
    with_lora = _llama_greedy(llama_cpp, default_gguf(), ids, tok, lora)
    base_only = _llama_greedy(llama_cpp, default_gguf(), ids, tok)
    _report("llama.cpp base (Q4_1) + GGUF LoRA (f32)", ours, with_lora)
    assert _report("llama.cpp base without the LoRA", ours, base_only) < 0.5  # the LoRA is what makes them agree
    back = tmp_path / "back"
    assert cli.main(["convert", "--from", "gguf", str(lora), "--output", str(back), "--base-model", "default"]) == 0
    assert sum(a == b for a, b in zip(ours, with_lora)) >= N_WORDS - 1


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_gguf(llama_cpp, trained, tmp_path, outtype):
    adapter, tok, ids, ours = trained
    merged = tmp_path / f"merged-{outtype}.gguf"
    assert cli.main(["merge", "--adapter", str(adapter), "--format", "gguf", "--outtype", outtype,
                     "--output", str(merged)]) == 0
    rate = _report(f"llama.cpp merged GGUF {outtype}", ours, _llama_greedy(llama_cpp, merged, ids, tok))
    assert rate >= {"f32": 1.0, "f16": 0.9, "q8_0": 0.7}[outtype]
