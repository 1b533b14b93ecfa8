"""Atomic write of a whole folder (merged model, dequantised GGUF cache, training checkpoint): built
in a temporary sibling, flushed to disk, and renamed into place, so readers see the old folder or
the new one, never half (a crash between the two renames of a replacement leaves the old one beside
it, as ``.NAME.old.*``). Single files go through
``lorakit.durable.write_atomic`` and ``lorakit.durable.write_json``; text files are read with
``lorakit.durable.read_utf8``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lorakit.durable import umask
from lorakit.errors import SaveError


def write_folder(dest: str | os.PathLike, fill: Callable[[Path], None], replace: bool = False,
                 inputs: tuple = ()) -> None:
    """Call ``fill(tmp)`` on a fresh temporary folder beside ``dest``, then rename it to ``dest``.

    Args:
        replace: replace an existing ``dest``: it is renamed aside, the new folder renamed in, and only
            then the old one removed (if the second rename fails, the old one is renamed back).
        inputs: paths ``fill`` reads (a source file, the base model), which ``replace`` must not remove.

    Raises:
        SaveError: ``replace`` would remove the current folder, one above it, or one holding ``inputs``
            (``--output . --overwrite``), refused before anything is written; or writing failed on ``dest``
            or its temporary sibling (named as ``dest``: the sibling's name means nothing to the user).
        OSError: from ``fill`` on other files (an input it reads); the temporary folder is removed either way.
    """
    try:
        _write_folder(Path(dest), fill, replace, inputs)
    except OSError as e:
        if isinstance(e, SaveError) or not _ours(e.filename, Path(dest)):
            raise
        raise SaveError(f"cannot write {str(dest)!r}: {e.strerror or e}") from e


def _ours(filename, dest: Path) -> bool:
    """Whether an error's file is ``dest``, its temporary sibling ``.NAME.*``, or a file inside either."""
    if not filename:
        return False
    p, d = Path(os.fsdecode(filename)).absolute(), dest.absolute()
    return any(q == d or (q.parent == d.parent and q.name.startswith(f".{d.name}.")) for q in (p, *p.parents))


def _write_folder(dest: Path, fill: Callable[[Path], None], replace: bool, inputs: tuple) -> None:
    if replace:
        _check_replaceable(dest, inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    mask = umask()
    old = None
    try:
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would make the folder private to its writer
        fill(tmp)
        _settle(tmp, mask)
        if replace and (dest.exists() or dest.is_symlink()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            old.rmdir()  # a fresh unused name: the old folder (or file) moves there whole
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:
                os.replace(old, dest)
                old = None
            raise
        _fsync(dest.parent)  # the renames themselves
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)


def check_output_file(dest: str | os.PathLike, inputs: tuple) -> None:
    """Raises ``SaveError`` if writing the file ``dest`` would overwrite one of ``inputs`` or an existing file
    inside an input folder (``lorakit export --output ADAPTER/adapter_model.safetensors --overwrite``); a new
    file beside an input (``ADAPTER/merged.gguf``) is fine."""
    target = Path(dest).resolve()
    for i in inputs:
        held = Path(i).resolve() if i else None
        if held is not None and (target == held or (target.exists() and held in target.parents)):
            raise SaveError(f"refusing to overwrite {str(dest)!r}: it is input {str(i)!r} or one of its files; "
                            "choose another output")


def _check_replaceable(dest: Path, inputs: tuple) -> None:
    """Raises ``SaveError`` if replacing ``dest`` would remove the current folder or one of ``inputs``."""
    target = dest.resolve()
    for what, p in [("the current folder", Path.cwd())] + [(f"input {str(i)!r}", Path(i)) for i in inputs if i]:
        held = p.resolve()
        if held == target or target in held.parents:
            raise SaveError(f"refusing to replace {str(dest)!r}: it holds {what}; choose another output folder")


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

