"""Memory handed back to the OS (``lorakit.app.allocator``) and ``quantize_loaded`` on a model read from
safetensors through a memory map: the pages of each replaced weight leave the process's RSS, no value of
the model changes (checked against the file read without a map), anonymous memory is never touched."""

import mmap
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _tiny import tiny_model_folder
from lorakit import quantize_base
from lorakit.app import allocator
from lorakit.app.qbase import quantize_loaded

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and madvise: Linux only")


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@linux
def test_dropped_pages_of_a_mapped_file_leave_rss_and_read_back_unchanged(tmp_path):
    n = 8 << 20  # 32 MiB of float32
    expected = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    expected.tofile(tmp_path / "w.bin")
    t = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=n)  # a private map of the file
    before = rss_file_kib()
    assert float(t.double().sum()) == pytest.approx(float(expected.astype(np.float64).sum()))  # every page read
    touched = rss_file_kib()
    dropped = allocator.drop_file_pages(t)
    after = rss_file_kib()
    assert touched - before > 28 * 1024  # the pages read were resident ...
    assert touched - after > 28 * 1024  # ... and are not after the drop
    assert 4 * n - 4096 <= dropped <= 4 * n  # the whole pages of the storage
    assert np.array_equal(t.numpy(), expected)  # read back from the file


def test_ordinary_memory_is_never_dropped():
    t = torch.randn(1 << 20)
    keep = t.clone()
    assert allocator.drop_file_pages(t) == 0
    assert torch.equal(t, keep)


@linux
def test_only_whole_pages_inside_the_storage_are_dropped(tmp_path):
    """Two storages in one private file map, as transformers loads safetensors: the page they share is
    kept, so the second's values written in place stay (a dropped page would read back the file's)."""
    n = 3000  # 12,000 bytes: the page at 8192-12287 holds the end of the first and the start of the second
    np.zeros(2 * n, dtype=np.float32).tofile(tmp_path / "w.bin")
    with open(tmp_path / "w.bin", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    first = torch.frombuffer(mm, dtype=torch.float32, count=n)
    second = torch.frombuffer(mm, dtype=torch.float32, count=n, offset=4 * n)
    second.fill_(7.0)  # in this process's copies of its pages only
    assert first.untyped_storage().data_ptr() % mmap.PAGESIZE == 0
    assert allocator.drop_file_pages(first) == 8192  # its two whole pages, not the shared third
    assert torch.equal(second, torch.full((n,), 7.0)) and torch.equal(first, torch.zeros(n))


@linux
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_loaded_from_a_mapped_file_equals_quantizing_the_file_read_into_memory(kind, tmp_path):
    folder = tiny_model_folder(tmp_path / "m", hidden_size=256)  # q_proj: 256 KiB, whole pages
    mapped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    in_memory = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    in_memory.load_state_dict(load_file(folder / "model.safetensors"), strict=False)  # no map: its own copies
    in_memory.tie_weights()
    quantize_loaded(mapped, kind)
    quantize_base(in_memory, kind)
    got, want = mapped.state_dict(), in_memory.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and torch.equal(a, b), key  # quantised codes, scales and the kept float tensors
    ids = torch.randint(0, mapped.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mapped(ids).logits, in_memory(ids).logits)


def test_return_large_blocks_is_taken_by_glibc_and_recorded():
    """In a child process: the setting holds for the rest of a process, and this one keeps glibc's default."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = ("from lorakit.app import allocator as a; assert a.large_blocks_returned() is None; "
            "assert a.return_large_blocks(3 << 20) is True; print(a.large_blocks_returned())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(3 << 20)]


def test_a_tensor_off_the_cpu_is_never_dropped():
    t = torch.empty(1 << 20, device="meta")  # no memory of this process behind it
    assert allocator.drop_file_pages(t) == 0


def test_checkpointed_blocks_trim_after_each_forward_and_keep_outputs_and_gradients(monkeypatch):
    """Inside ``checkpointed(model, True)`` every transformer block hands freed memory back after its
    forward; outputs and LoRA gradients equal the run without
    (float64 model); the hooks go when the block ends."""
    import lorakit
    import lorakit.app.blocks as B
    from conftest import tiny_llama

    trims = []
    monkeypatch.setattr(B, "trim", lambda: trims.append(1) or allocator.trim())

    def run(on: bool):
        model = tiny_llama().double()
        lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        model.train()
        trims.clear()
        with B.checkpointed(model, on):
            hooked = [len(b._forward_hooks) for b in B.blocks(model)]
            out = model(ids).logits
            out.square().sum().backward()
        after = [len(b._forward_hooks) for b in B.blocks(model)]
        g = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.detach(), g, hooked, after, len(trims)

    out0, g0, hooked0, _, trims0 = run(False)
    out1, g1, hooked1, after1, trims1 = run(True)
    n = len(hooked0)
    assert n == 2 and hooked0 == [0] * n and hooked1 == [1] * n and after1 == [0] * n
    assert trims0 == 0 and trims1 == n  # after each block's forward
    assert torch.allclose(out0, out1, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-10, atol=1e-12) for k in g0)
