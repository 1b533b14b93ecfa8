"""The app's atomic writers: JSON files and whole folders (merged checkpoint, GGUF cache)."""

import pytest

from lorakit.app.files import write_folder
from lorakit.durable import write_json


def test_write_json(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_write_folder_whole_or_nothing(tmp_path):
    dest = tmp_path / "out" / "model"
    write_folder(dest, lambda d: (d / "x.txt").write_text("1"))
    assert (dest / "x.txt").read_text() == "1"

    def fail(d):
        (d / "y.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(dest, fail, replace=True)
    assert sorted(p.name for p in dest.iterdir()) == ["x.txt"]  # the old folder is untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # the temporary folder is gone
    with pytest.raises(OSError):  # an existing folder is replaced only when asked
        write_folder(dest, lambda d: (d / "z.txt").write_text("2"))
    write_folder(dest, lambda d: (d / "z.txt").write_text("2"), replace=True)
    assert sorted(p.name for p in dest.iterdir()) == ["z.txt"]
