"""minillm/fileio.py: atomic_write replaces a file by bytes, text or a writer's output; the old file
stays intact and no temporary is left when anything fails; file and directory are fsync'ed."""

import ast
import os
import stat

import numpy as np
import pytest

from minillm import fileio
from minillm.fileio import atomic_write, fsync_directory, write_temp


def listing(directory):
    return sorted(os.listdir(directory))


@pytest.fixture
def fsyncs(monkeypatch):
    """Record each os.fsync as "file" or "dir" (then really fsync)."""
    calls, real = [], os.fsync

    def record(fd):
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)
    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_bytes_text_and_writer(tmp_path):
    target = tmp_path / "a.bin"
    assert atomic_write(target, b"\x00\x01bytes") == target
    assert target.read_bytes() == b"\x00\x01bytes"
    atomic_write(target, bytearray(b"again"))
    assert target.read_bytes() == b"again"
    atomic_write(str(target), "caf\u00e9\n\u6771")                  # text: UTF-8, "\n" kept as is
    assert target.read_bytes() == "caf\u00e9\n\u6771".encode("utf-8")
    atomic_write(target, lambda p: open(p, "wb").close())           # a writer may write nothing
    assert target.read_bytes() == b""
    assert listing(tmp_path) == ["a.bin"]


def test_writer_gets_a_temporary_with_the_same_extension(tmp_path):
    seen = []
    ids = np.arange(5, dtype=np.int32)

    def write(path):
        seen.append(path)
        np.save(path, ids, allow_pickle=False)   # appends .npy unless the name already ends with it
    target = tmp_path / "tokens.npy"
    atomic_write(target, write)
    assert np.array_equal(np.load(target), ids) and listing(tmp_path) == ["tokens.npy"]
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".npy") and tmp != str(target)
    assert os.path.basename(tmp).startswith(".tokens.")


@pytest.mark.parametrize("error", [RuntimeError("writer bug"), OSError(28, "No space left on device"),
                                   KeyboardInterrupt()])
def test_writer_failure_keeps_old_content_and_leaves_no_temporary(tmp_path, error):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def write(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise error
    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["model.safetensors"]


def test_disk_full_while_writing_bytes(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    assert target.read_text() == "old" and listing(tmp_path) == ["config.json"]


def test_failed_replace_leaves_no_temporary(tmp_path):
    (tmp_path / "d").mkdir()                       # os.replace cannot put a file onto a directory
    (tmp_path / "d" / "x").write_text("keep")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d", b"new")
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == ["x"]


def test_writer_that_writes_no_file_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "a.json", lambda p: None)
    assert listing(tmp_path) == []


def test_bad_content_and_missing_directory(tmp_path):
    with pytest.raises(TypeError, match="bytes, str or a writer"):
        atomic_write(tmp_path / "a", 3)
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "a", b"x")
    assert listing(tmp_path) == []


def test_file_then_directory_fsynced(tmp_path, fsyncs):
    atomic_write(tmp_path / "a", b"x")
    assert fsyncs == ["file", "dir"]
    fsyncs.clear()
    atomic_write(tmp_path / "b", lambda p: open(p, "w").write("y"))
    assert fsyncs == ["file", "dir"]
    fsyncs.clear()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        atomic_write("c", "z")                     # a bare name: the current directory is fsync'ed
    finally:
        os.chdir(cwd)
    assert fsyncs == ["file", "dir"] and (tmp_path / "c").read_text() == "z"


def test_two_stages(tmp_path, fsyncs):
    target = tmp_path / "w.bin"
    tmp = write_temp(target, b"staged")
    assert fsyncs == ["file"] and not target.exists() and open(tmp, "rb").read() == b"staged"
    os.replace(tmp, target)
    fsync_directory(tmp_path)
    fsync_directory(tmp_path / "missing")          # best effort: no error
    assert fsyncs == ["file", "dir"] and listing(tmp_path) == ["w.bin"]


def test_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644   # not mkstemp's 0600


def test_imports_nothing_of_minillm():
    tree = ast.parse(open(fileio.__file__, encoding="utf-8").read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"os", "secrets"}
