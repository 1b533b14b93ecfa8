"""Files that survive a crash, and text files read with a clear error: a single file written
atomically (temporary sibling, fsync, rename: readers see the old file or the new one, never half),
JSON written that way, and a whole text file decoded as UTF-8 naming the file and the bad byte.
(A whole folder is written the same way by ``lorakit.app.files.write_folder``.)"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import LoRAError


def umask() -> int:
    """The process's file-creation mask (files written atomically get ``0o666 & ~umask()``)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_utf8(path: str | os.PathLike, error: type[LoRAError], encoding: str = "utf-8") -> str:
    """A whole text file (a config or metadata file) decoded as UTF-8 (``"utf-8-sig"``: a leading
    byte-order mark dropped).

    Raises:
        error: the file is not UTF-8 (the file, byte and offset named).
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise error(f"{str(path)!r} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers see old or new, never half."""
    write_atomic_all([(path, write)])


def write_atomic_all(files: list) -> None:
    """``write_atomic`` for several ``(path, write)`` files as one change: every file is written and synced
    to its temporary file first, and only then are they renamed into place, so a failed write (a full
    disk) changes none of them: an adapter's weights never sit beside another adapter's config."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would make the file private to its writer
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def json_writer(obj, sort_keys: bool = False):
    """A ``write(tmp_path)`` for ``write_atomic``: ``obj`` as indented JSON with a trailing newline."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")

    return write


def write_json(path: Path, obj, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON with a trailing newline, atomically (``write_atomic``)."""
    write_atomic(Path(path), json_writer(obj, sort_keys))
