"""Adapters saved by lorakit before the core restructure (tests/data/legacy_*, written by commit
9db1ff6 with the outputs that code gave) load into fresh base models with the same outputs, in
lorakit and in PEFT."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama
from test_families import bert, gpt2

DATA = Path(__file__).parent / "data"
BUILDERS = {"llama": tiny_llama, "gpt2": gpt2, "bert": bert}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapter_saved_before_the_restructure_gives_the_same_outputs(name):
    folder = DATA / f"legacy_{name}"
    expected = load_file(folder / "expected.safetensors")
    model = lorakit.load_adapter(BUILDERS[name](), folder)
    with torch.no_grad():
        got = model(expected["input"]).logits
    # 1e-5: the expected logits were computed on another CPU, whose BLAS kernels round differently (this
    # one, an AMD EPYC, differs by up to 1.1e-6); a changed adapter or scaling moves them by far more
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-5)
    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input"]).logits, expected["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_peft_reads_the_legacy_files_to_the_same_outputs(name):
    peft = pytest.importorskip("peft")
    folder = DATA / f"legacy_{name}"
    expected = load_file(folder / "expected.safetensors")
    theirs = peft.PeftModel.from_pretrained(BUILDERS[name](), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(expected["input"]).logits, expected["logits"], rtol=0, atol=1e-5)


def test_resaved_legacy_adapter_is_key_for_key_the_same_file(tmp_path):
    folder = DATA / "legacy_gpt2"
    model = lorakit.load_adapter(gpt2(), folder)
    lorakit.save_adapter(model, tmp_path)
    old, new = load_file(folder / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
