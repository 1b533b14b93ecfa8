"""Reading an adapter's weight file without trusting it: a safetensors header checked against its
data before anything is loaded, and a PyTorch pickle through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import AdapterLoadError

_DTYPE_BYTES = {  # safetensors dtype -> bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def load_safetensors(w_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``w_file``, its header checked first (``_check_header``).

    Raises:
        AdapterLoadError: truncated or corrupt (the key, dtype, shape and byte counts named).
    """
    _check_header(w_file)
    try:
        return load_file(w_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"{str(w_file)!r} is truncated or corrupt: {e}") from None


def load_pickle(w_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``adapter_model.bin``, unpickled with ``weights_only=True``.

    Raises:
        AdapterLoadError: the file holds anything but a dict of tensors (the restricted unpickler
            refuses objects of other classes before building them), or is not a PyTorch file.
    """
    try:
        state = torch.load(w_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0].split(". ")[0])
        raise AdapterLoadError(f"{str(w_file)!r} is not a PyTorch pickle of tensors that "
                               f"torch.load(weights_only=True) accepts: {why}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
        raise AdapterLoadError(f"{str(w_file)!r} (a pickle) holds {type(state).__name__}, not a dict of tensors")
    return state


def check_finite(w_file: Path, key: str, t: torch.Tensor) -> None:
    """Raise AdapterLoadError naming ``w_file``, ``key``, the count and the first index of a NaN or Inf in
    the floating tensor ``t`` (adapter weights must be finite)."""
    bad = ~torch.isfinite(t)
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        raise AdapterLoadError(f"{str(w_file)!r}: tensor {key!r} contains NaN or Inf values ({int(bad.sum())} of "
                               f"{t.numel()}; first {t[tuple(first)].item()} at index {first})")


def _check_header(w_file: Path) -> None:
    """Check a safetensors header against its data before ``load_file`` reads it: an 8-byte
    little-endian header length, a JSON header, and per tensor ``dtype`` x ``shape`` bytes equal to
    its ``data_offsets`` span, inside the file (the safetensors format).

    Raises:
        AdapterLoadError: the file is shorter than its header or data, or a tensor's dtype and
            shape do not fit its bytes (the key, dtype, shape and byte counts named).
    """
    size = w_file.stat().st_size
    with open(w_file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise AdapterLoadError(f"{str(w_file)!r} is truncated or corrupt: {size} bytes, shorter than its header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AdapterLoadError(f"{str(w_file)!r} is truncated or corrupt: the header is not JSON") from None
    data = size - 8 - n
    for k, v in (header.items() if isinstance(header, dict) else ()):
        try:
            dtype, shape, (start, end) = v["dtype"], [int(x) for x in v["shape"]], v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            continue  # __metadata__, or a malformed entry: load_file reports it
        need = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if dtype in _DTYPE_BYTES and need != end - start:
            raise AdapterLoadError(f"{str(w_file)!r} is corrupt: the header gives tensor {k!r} dtype {dtype} shape "
                                   f"{shape} ({need} bytes) but {end - start} bytes of data")
        if end > data:
            raise AdapterLoadError(f"{str(w_file)!r} is truncated: tensor {k!r} ends at byte {end} of the data, "
                                   f"which holds {data} bytes")
