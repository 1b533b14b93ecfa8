"""Opt-in (pytest -m slow): llama.cpp itself runs what lorakit exports, through llama-cpp-python.

The first run builds llama-cpp-python (pinned in constraints.txt; PyPI has only its source package) with
cmake and the C compiler into a wheel under ``~/.cache/lorakit/wheels`` (``$LORAKIT_CACHE``) and installs it
with diskcache into ``~/.cache/lorakit/llama-cpp-python-<version>`` (not into the environment); later runs
reuse it. A short G2P adapter is trained on the default SmolLM2-135M-Instruct, then 20 test words are
decoded greedily by lorakit (float32, merged) and by llama.cpp: an f32 GGUF of the base and the default
Q4_1 GGUF, each with the exported GGUF LoRA, and the merged model exported as f32, f16 and q8_0 GGUF. The
agreement rates are printed (``-s``); f32 must agree on every word.

Run as ``OMP_WAIT_POLICY=PASSIVE pytest -m slow tests/test_llamacpp.py -s`` on a shared CPU (the policy is
read when torch loads; without it the short training run took 21 minutes instead of a few).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from lorakit import load_adapter, merge, read_adapter
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
    with torch.no_grad():  # the f16 file's values: every matrix rounded to float16, vectors kept (gguf_model)
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    ours_f16 = greedy_generate(lm.model, lm.tokenizer, texts, max_new_tokens=MAX_NEW)
    ids = [encode_prompt(lm.tokenizer, t) for t in texts]
    return out, lm.tokenizer, ids, ours, ours_f16


def _llama_greedy(llama_cpp, model: Path, ids, tokenizer, lora: Path | None = None) -> list[str]:
    # one thread: on a shared 2-core machine llama.cpp's per-op thread barriers stall (as torch's spinning
    # OpenMP threads do, see cli._reexec_passive); a 135M model needs no more
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=1,
                          n_threads_batch=1, verbose=False)
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


def test_gguf_lora(llama_cpp, trained, tmp_path):
    """The exported LoRA on an f32 GGUF of the base (the default's Q4_1 values, written by lorakit) must agree on
    every word; on the default Q4_1 file itself llama.cpp quantises activations to 8 bits in its Q4_1 matmuls,
    so there the agreement rate is reported (and must beat the base without the LoRA by far)."""
    from lorakit.app.gguf_model import write_merged_gguf

    adapter, tok, ids, ours, _ = trained
    lora = tmp_path / "adapter.gguf"
    assert cli.main(["export", "--adapter", str(adapter), "--format", "gguf", "--output", str(lora)]) == 0
    base_f32 = write_merged_gguf(load_model().model, "default", tmp_path / "base-f32.gguf", "f32")
    f32 = _report("llama.cpp f32 base + GGUF LoRA", ours, _llama_greedy(llama_cpp, base_f32, ids, tok, lora))
    q4 = _report("llama.cpp Q4_1 base + GGUF LoRA", ours, _llama_greedy(llama_cpp, default_gguf(), ids, tok, lora))
    none = _report("llama.cpp Q4_1 base, no LoRA", ours, _llama_greedy(llama_cpp, default_gguf(), ids, tok))
    assert f32 == 1 and q4 >= 0.7 and none < 0.2
    back = tmp_path / "back"  # and back to PEFT: the same tensors (9 query / 3 key-value heads un-permuted)
    assert cli.main(["convert", "--from", "gguf", str(lora), "--output", str(back), "--base-model", "default"]) == 0
    (_, t0), (_, t1) = read_adapter(adapter), read_adapter(back)
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_gguf(llama_cpp, trained, tmp_path, outtype):
    """The merged model as GGUF: f32 must agree with lorakit on every word, and f16 with lorakit running the same
    f16-rounded weights (llama.cpp also rounds the activations of f16 matmuls, so a near tie may still differ: the
    rate against lorakit's f32 model is reported beside it); q8_0's rate is reported."""
    adapter, tok, ids, ours, ours_f16 = trained
    merged = tmp_path / f"merged-{outtype}.gguf"
    assert cli.main(["merge", "--adapter", str(adapter), "--format", "gguf", "--outtype", outtype,
                     "--output", str(merged)]) == 0
    theirs = _llama_greedy(llama_cpp, merged, ids, tok)
    rate = _report(f"llama.cpp merged GGUF {outtype}", ours, theirs)
    if outtype == "f16":
        rate = _report("llama.cpp merged GGUF f16 against lorakit on the f16-rounded weights", ours_f16, theirs)
    assert rate >= {"f32": 1.0, "f16": 1.0, "q8_0": 0.7}[outtype]
