"""Atomic file writes: a file is either its old contents or its new contents, never half written.

    atomic_write(path, content)       content: bytes, str (written as UTF-8) or a writer(tmp_path)

The new contents go to a fresh temporary file in the same directory (named like the target, with the
target's extension kept, so writers that add one, like numpy's save, leave the name alone), which is
flushed and fsync'ed, os.replace'd onto the target, and then the directory is fsync'ed so the rename
is durable too. On any failure before the replace (the writer raising, a full disk, Ctrl-C) the
temporary is removed and the error propagates; the target is untouched.

The two stages are public for callers that place several files only after all of them are written
(store.publish, which writes a checkpoint's files into a new version directory and then switches one link):
write_temp(path, content) -> tmp, then os.replace and fsync_directory.

This module imports nothing of minillm.
"""

import os
import secrets

__all__ = ["atomic_write", "write_temp", "fsync_directory", "remove_if_exists"]


def remove_if_exists(path):
    """os.remove, ignoring a file that is already gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _temp_name(path):
    directory, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    # Not mkstemp: its files are mode 0600, and what we write should get the usual umask mode.
    return os.path.join(directory, f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{ext}")


def write_temp(path, content):
    """Write `content` to a fresh temporary file next to `path`, fsync it, return its name.

    content: bytes (or bytearray / memoryview), str (encoded as UTF-8, no newline translation), or
    a callable writer(tmp_path) that creates the file. On any failure the temporary is removed and the
    error propagates."""
    if isinstance(content, str):
        content = content.encode("utf-8")
    elif not callable(content) and not isinstance(content, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write: content must be bytes, str or a writer(path), "
                        f"not {type(content).__name__}")
    tmp = _temp_name(path)
    try:
        if callable(content):
            content(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "xb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        remove_if_exists(tmp)
        raise
    return tmp


def fsync_directory(directory):
    """fsync a directory, making the renames in it durable (best effort: not every filesystem or
    platform allows opening a directory, and the files are already in place when this runs)."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, content):
    """Replace the file `path` by `content` atomically and durably; returns `path`.

    content: bytes, str (UTF-8) or a writer(tmp_path), as for write_temp. The temporary lives in the
    same directory as `path` (os.replace is atomic only within one filesystem), which must exist."""
    tmp = write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_if_exists(tmp)
        raise
    fsync_directory(os.path.dirname(os.fspath(path)) or ".")
    return path
