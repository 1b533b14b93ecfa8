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
from lorakit.durable import write_atomic


MAX_LINE_BYTES = 1 << 20  # one record of at most 1 MiB: a longer line is a file without newlines, or not data


def read_objects(path: str | os.PathLike) -> list[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSONL file (lines count from 1).

    Raises:
        DataError: the path is a folder or does not exist, a line is not UTF-8 (UTF-16 files, with
            or without a byte-order mark, are named as such), longer than ``MAX_LINE_BYTES`` or not
            valid JSON (file and line named).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; give a .jsonl file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out = []
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 2):  # at most the limit, a CR LF, and one byte to tell
            lineno += 1
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line is longer than {MAX_LINE_BYTES >> 20} MiB; one record "
                                "per line (does the file lack newlines?)")
            line = _decode(path, lineno, raw)
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return out


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    """Line ``lineno`` as text; a leading UTF-8 byte-order mark is dropped.

    Raises:
        DataError: UTF-16 (a UTF-16 byte-order mark, or NUL bytes, which no UTF-8 JSON line holds) or
            other bytes that are not UTF-8.
    """
    if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: the file is UTF-16; save it as UTF-8")
    if b"\x00" in raw:
        raise DataError(f"{path}:{lineno}: NUL bytes: the file looks like UTF-16 (no byte-order mark); "
                        "save it as UTF-8")
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Write ``records`` as JSONL, atomically (``lorakit.durable.write_atomic``)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    write_atomic(Path(path), write)


class RecordLog:
    """Records appended to a JSONL file as they come, one line each, flushed (a live log such as
    ``metrics.jsonl``). The file is created, or emptied, at the first record, so a run that stops before
    logging anything (a refused ``--resume``) leaves an earlier file as it was."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._file = Path(path), None

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
