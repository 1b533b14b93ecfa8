"""The one JSONL reader (and writer) of the app: every data file goes through ``read_objects``.

A JSONL file holds one JSON value per line. Blank lines and a UTF-8 byte-order mark (which some
Windows editors write) are skipped; what the values must look like is the caller's business
(``data.read_jsonl`` for language-model records, ``classify.read_records`` for ``{text, label}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import DataError
from lorakit.io import write_atomic


def read_objects(path: str | os.PathLike) -> list[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSONL file (lines count from 1).

    Raises:
        DataError: the path is a folder or does not exist, a line is not UTF-8 (UTF-16 files are
            named as such) or not valid JSON (file and line named).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; give a .jsonl file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise DataError(f"{path}:1: the file is UTF-16; save it as UTF-8")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading byte-order mark is dropped
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return out


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Write ``records`` as JSONL, atomically (``lorakit.io.write_atomic``)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    write_atomic(Path(path), write)
