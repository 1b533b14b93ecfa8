"""Memory handed back to the operating system, for the memory-saving recipe (``--quantize``,
``--gradient-checkpointing``): the C allocator's free blocks (glibc) and the pages of a memory-mapped
model file already read (Linux). Elsewhere these do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
LARGE_BLOCK = 1 << 20  # bytes


_returned: list[int] = []  # the threshold return_large_blocks set, once it took


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim() -> None:
    """Return the allocator's free memory to the OS (glibc ``malloc_trim``).

    Quantising frees a float32 weight and bitsandbytes' temporaries per layer; glibc keeps such freed
    blocks, so without this SmolLM2-135M's process stays ~270 MiB larger after quantising."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve every allocation of at least ``threshold`` bytes from its own memory map, unmapped when it is
    freed (glibc ``mallopt(M_MMAP_THRESHOLD, threshold)``), for the rest of the process. Returns whether
    the allocator took the setting.

    Why: glibc raises its threshold to the largest block freed so far (up to 32 MiB), after which a
    training step's large temporaries (bitsandbytes' dequantised weights, the activations recomputed
    under checkpointing) come from the heap, where freed ones fragment it and stay resident. Measured on
    SmolLM2-135M, NF4 base with checkpointing, 10 steps of 8 G2P rows: peak RSS 1056-1136 MiB with
    glibc's default, 924-938 MiB at 0.5-1 MiB, 5-10% more step time (page faults); at 256 KiB 845 MiB
    but twice the time, hence 1 MiB."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    took = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    if took:
        _returned[:] = [threshold]
    return took


def large_blocks_returned() -> int | None:
    """The threshold (bytes) ``return_large_blocks`` set in this process, or None if it never took."""
    return _returned[0] if _returned else None


def file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's memory maps of files (Linux ``/proc/self/maps``; elsewhere none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):  # a path: file-backed (not heap, stack or anonymous)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def drop_file_pages(t: torch.Tensor) -> int:
    """Take the pages of ``t``'s storage that lie in a memory-mapped file out of this process's RSS
    (``madvise(MADV_DONTNEED)``). Returns the bytes dropped (0 when the storage is not in a file map,
    e.g. ordinary memory, or off Linux).

    Only whole pages inside the storage are dropped, and only while ``t`` (so the map) is alive. A dropped
    page reads back from the file if touched again: the values of a tensor never written in place are
    unchanged, those of one written in place (a private map's copied pages) go back to the file's. Meant
    for a weight just replaced (``qbase.quantize_loaded``), which nothing reads again.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or t.device.type != "cpu":  # a device address is not this process's memory
        return 0
    storage = t.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    if not any(start <= ptr and ptr + nbytes <= end for start, end in file_mappings()):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-ptr // page) * page, (ptr + nbytes) // page * page
    libc = _libc()
    if last <= first or libc is None or not hasattr(libc, "madvise"):
        return 0
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice)) != 0:
        return 0
    return last - first
