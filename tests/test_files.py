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


def test_write_folder_refuses_to_replace_the_current_folder_or_one_holding_its_inputs(tmp_path, monkeypatch):
    """``--output . --overwrite`` used to remove the current folder, the source file with it, before the rename
    into '.' failed; now it is refused before anything is written, as is a folder above it or around an input."""
    from lorakit.errors import SaveError

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    (work / "sub" / "src.gguf").write_text("input")
    monkeypatch.chdir(work)
    for dest, inputs, what in ((".", (), "the current folder"), ("..", (), "the current folder"),
                               (work, (), "the current folder"), ("sub", ("sub/src.gguf",), "input 'sub/src.gguf'")):
        with pytest.raises(SaveError, match=f"refusing to replace .*it holds {what}"):
            write_folder(dest, lambda d: (d / "x.txt").write_text("1"), replace=True, inputs=inputs)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "work", "work/notes.txt", "work/sub", "work/sub/src.gguf"]  # nothing removed, nothing left behind
    write_folder("out", lambda d: (d / "x.txt").write_text("1"), replace=True, inputs=("sub/src.gguf",))
    assert (work / "out" / "x.txt").read_text() == "1"


def test_write_folder_puts_the_old_folder_back_when_the_new_one_cannot_be_renamed_in(tmp_path, monkeypatch):
    """A replacement moves the old folder aside before renaming the new one in; if that rename fails the old
    one goes back (it was removed first before, and a failure there left neither)."""
    import os

    import lorakit.app.files as files

    dest = tmp_path / "model"
    write_folder(dest, lambda d: (d / "old.txt").write_text("old"))
    real = os.replace

    def failing(a, b):
        if str(a).startswith(str(tmp_path / ".model.")) and not str(a).startswith(str(tmp_path / ".model.old.")):
            raise OSError(28, "injected")  # the new folder's rename into place
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        write_folder(dest, lambda d: (d / "new.txt").write_text("new"), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (dest / "old.txt").read_text() == "old"
    monkeypatch.setattr(files.os, "replace", real)
    write_folder(dest, lambda d: (d / "new.txt").write_text("new"), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and [p.name for p in dest.iterdir()] == ["new.txt"]


def test_a_failed_write_names_the_output_not_its_temporary_sibling(tmp_path, monkeypatch):
    """An output folder that cannot be written (an immutable parent, a full disk) was reported under lorakit's
    temporary name ('out/.model.4l_zq_mk'); it is now named as given. An error on another file (an input
    ``fill`` reads) is left as it was."""
    import errno
    import tempfile

    from lorakit.errors import SaveError

    dest = tmp_path / "out" / "model"

    def refuse(prefix, dir):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dir / f"{prefix}abc123"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(SaveError, match=r"cannot write '.*out/model': Operation not permitted$"):
        write_folder(dest, lambda d: None)
    monkeypatch.undo()

    def read_missing(d):
        (d / "x.txt").write_text("1")
        open(tmp_path / "input.gguf")  # noqa: SIM115 - raises

    with pytest.raises(FileNotFoundError) as info:
        write_folder(dest, read_missing)
    assert not isinstance(info.value, SaveError) and info.value.filename == str(tmp_path / "input.gguf")
    assert not dest.parent.exists() or not list(dest.parent.iterdir())  # nothing left behind
