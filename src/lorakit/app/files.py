"""Atomic write of a whole folder (merged model, dequantised GGUF cache, training checkpoint): built
in a temporary sibling, flushed to disk, and renamed into place, so readers see the old folder or
the new one, never half, even after a crash or power loss. Single files go through
``lorakit.durable.write_atomic`` and ``lorakit.durable.write_json``; text files are read with
``lorakit.durable.read_utf8``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lorakit.durable import umask


def write_folder(dest: str | os.PathLike, fill: Callable[[Path], None], replace: bool = False) -> None:
    """Call ``fill(tmp)`` on a fresh temporary folder beside ``dest``, then rename it to ``dest``.

    Args:
        replace: remove an existing ``dest`` first (else the rename fails on a non-empty folder).

    Raises:
        OSError: from ``fill`` or the rename; the temporary folder is removed either way.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    mask = umask()
    try:
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would make the folder private to its writer
        fill(tmp)
        _settle(tmp, mask)
        if replace and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        _fsync(dest.parent)  # the rename itself
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(root: Path, mask: int) -> None:
    """Give every file under ``root`` the umask's mode (some writers create 0600 files), then fsync
    every file and folder (contents first, then the folders naming them)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)
            _fsync(Path(folder) / name)
        _fsync(Path(folder))

