"""Versioned output directories: every save is one transaction, and one writer at a time.

A directory D written by publish(D, files) (a checkpoint, a LoRA adapter) looks like

    D/model.safetensors  -> current/model.safetensors    one fixed relative link per file name
    D/config.json        -> current/config.json           (their text never changes)
    ...
    D/current            -> .versions/v000012             THE switch: one symlink
    D/.versions/v000012/   the files of one save + checksums.json (sha256 and size of each, written last)
    D/.lock                fcntl.flock'ed by the writer for as long as it writes; holds its pid

A save writes every file (fsync'ed) and checksums.json into .versions/.tmp-<pid>-<random>/, renames that
to .versions/v<N+1>, makes sure the fixed links exist, and then does the one atomic step,
os.replace(D/.current.<pid>, D/current). Before that rename a reader sees the old version whole, after
it the new one whole; a crash anywhere leaves one of the two (plus debris that the next save removes:
temporaries, and every version but the current one).

Why this layout rather than D itself being a symlink to D.versions/vN: D stays the real directory the user
named, so what else lives in it (train's token cache/) stays put and nothing appears beside it; every link
is relative and inside D, so `cp -r D`, tar and `rsync -a` copy a working checkpoint; and loaders that only
know fixed names (Hugging Face from_pretrained(D) opens D/config.json, D/model.safetensors) follow the links.
The fixed links never change, so they need no switch of their own.

Readers (read()) resolve `current` once and read every file from that version directory, checking each
against checksums.json: a save in between cannot mix two versions, a file replaced or edited after the
save is refused naming it, and a reader whose version a later save removed simply retries.

A directory of plain files written by an older minillm is adopted on the first save: its files are
hard-linked (or copied) into .versions/v000000 and become the current version before anything is
replaced, so no crash can lose them. A plain file of one of our names that is not adopted (not written by
minillm) is never replaced: the save is refused naming it; so is a save into a directory whose current
version is of another kind (an adapter written over a checkpoint would remove its files).

This module imports nothing of minillm but fileio.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil

from minillm.fileio import fsync_directory, write_temp

VERSIONS, CURRENT, LOCK, CHECKSUMS = ".versions", "current", ".lock", "checksums.json"
_VERSION = re.compile(r"v(\d{6,})")
_LINK_TMP = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.link")
_held = {}   # realpath of a directory -> [fd, depth]: the locks this process holds (re-entrant)


class Busy(ValueError):
    """Another process holds the directory's lock."""


# --------------------------------------------------------------------------------------------- lock

@contextlib.contextmanager
def lock(directory):
    """Hold the exclusive writer lock of `directory` (created if needed). Re-entrant within a process;
    another process gets Busy naming the holder's pid. The lock file is never removed (that would race)."""
    os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise Busy(f"'{directory}' is being written by another minillm process (pid {holder}); "
                   "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)       # releases the flock


def refuse_overwrite(out, inputs):
    """ValueError when `out` is one of the `inputs` ({what it is: path}) as a file (os.path.samefile:
    a symlink, a trailing slash or another spelling of the same directory is the same)."""
    for what, path in inputs.items():
        try:
            same = os.path.samefile(out, path)
        except OSError:          # one of them does not exist (yet)
            same = False
        if same:
            also = "" if os.path.normpath(out) == os.path.normpath(path) else f" ('{path}')"
            raise ValueError(f"--out '{out}' is {what}{also}: refusing to write over it; "
                             "choose another directory")


# --------------------------------------------------------------------------------------------- read

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_ok(directory, name, vdir=None):
    """directory/name is ours: the link into current/, or (mid-adoption) a hard link of vdir/name."""
    path = os.path.join(directory, name)
    if os.path.islink(path):
        return os.readlink(path) == f"{CURRENT}/{name}"
    try:
        return vdir is not None and os.path.samefile(path, os.path.join(vdir, name))
    except OSError:
        return False


def resolve(directory):
    """-> (directory to read the files from, {name: {"sha256", "bytes"}} or None for a plain directory).
    ValueError (naming the file) for a damaged layout or a top-level file that replaced our link."""
    cur = os.path.join(directory, CURRENT)
    if not os.path.islink(cur):
        if os.path.lexists(cur) and os.path.exists(os.path.join(directory, VERSIONS)):
            raise ValueError(f"'{cur}' should be a link into {VERSIONS}/: the directory is damaged")
        return directory, None
    target = os.readlink(cur)
    head, _, version = target.partition("/")
    if head != VERSIONS or not _VERSION.fullmatch(version):
        raise ValueError(f"'{cur}' points to {target!r}, not into {VERSIONS}/: refusing to follow it")
    vdir = os.path.join(directory, target)
    try:
        with open(os.path.join(vdir, CHECKSUMS), "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"'{os.path.join(vdir, CHECKSUMS)}' is corrupt: the directory is damaged") from None
    for name in files:
        if not _link_ok(directory, name, vdir):
            path = os.path.join(directory, name)
            what = "is missing" if not os.path.lexists(path) else \
                f"is not the link to {CURRENT}/{name} (it was replaced after the save)"
            raise ValueError(f"'{path}' {what}: the directory no longer holds one whole save")
    return vdir, files


def verify(directory, vdir, files, name):
    """Check vdir/name against its checksum (files from resolve; nothing to check when None) -> its path."""
    path = os.path.join(vdir, name)
    if files is not None and name in files:
        info = files[name]
        if os.path.getsize(path) != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            raise ValueError(f"'{os.path.join(directory, name)}' does not match the checksum saved with it "
                             f"({CHECKSUMS}): it was modified after the save or comes from another one")
    return path


def read(directory, reader, attempts=3):
    """reader(vdir, files) -> value, retried when a concurrent save removed the version being read."""
    for attempt in range(attempts):
        vdir, files = resolve(directory)
        try:
            return reader(vdir, files)
        except FileNotFoundError:
            if files is None or attempt == attempts - 1 or resolve(directory)[0] == vdir:
                raise


# -------------------------------------------------------------------------------------------- write

def _versions(vroot):
    try:
        names = os.listdir(vroot)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _VERSION.fullmatch(n))


def _remove_debris(directory, vroot, keep):
    """Temporaries of killed saves and every version but `keep` (all of them ours by their names)."""
    for name in os.listdir(vroot) if os.path.isdir(vroot) else ():
        if name != keep and (name.startswith(".tmp-") or _VERSION.fullmatch(name)):
            shutil.rmtree(os.path.join(vroot, name), ignore_errors=True)
    for name in os.listdir(directory):
        if _LINK_TMP.fullmatch(name) and os.path.islink(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))


def _checksums(vdir, names, version):
    files = {n: {"sha256": sha256_file(os.path.join(vdir, n)), "bytes": os.path.getsize(os.path.join(vdir, n))}
             for n in sorted(names)}
    return json.dumps({"format": "minillm-version", "version": version, "files": files}, indent=2) + "\n"


def _put(path, content):
    """Write one file of a new version (fsync'ed; its directory is fsync'ed once all are written)."""
    os.replace(write_temp(path, content), path)


def _link(directory, name, target):
    """Make directory/name a symlink to target, atomically (a link of the same text is left alone)."""
    path = os.path.join(directory, name)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _switch(directory, version):
    _link(directory, CURRENT, f"{VERSIONS}/{version}")
    fsync_directory(directory)


def _adopt(directory, vroot, names):
    """Plain files of an older minillm -> version v000000 (hard links: nothing copied, nothing lost)."""
    tmp = os.path.join(vroot, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    for name in names:
        try:
            os.link(os.path.join(directory, name), os.path.join(tmp, name))
        except OSError:
            shutil.copy2(os.path.join(directory, name), os.path.join(tmp, name))
    _put(os.path.join(tmp, CHECKSUMS), _checksums(tmp, names, 0))
    fsync_directory(tmp)
    os.rename(tmp, os.path.join(vroot, "v000000"))
    fsync_directory(vroot)
    _switch(directory, "v000000")          # from here on readers read the adopted copy
    for name in names:
        _link(directory, name, f"{CURRENT}/{name}")


def _current(directory):
    """-> (the current version's directory or None, its name or None)."""
    cur = os.path.join(directory, CURRENT)
    if not os.path.islink(cur):
        return None, None
    version = os.readlink(cur).partition("/")[2]
    return os.path.join(directory, VERSIONS, version), version


def check_target(directory, names, adoptable=None):
    """Whether publish may write `names` into `directory`, writing nothing: -> the plain files of an older
    minillm it would adopt; ValueError naming a file it would have to replace without having written it."""
    if not os.path.isdir(directory):
        return []
    vdir, _ = _current(directory)
    try:
        with open(os.path.join(vdir, CHECKSUMS), "rb") as f:
            theirs = set(json.loads(f.read())["files"]) - set(names)
    except (TypeError, OSError, ValueError, KeyError):    # no current version, or a damaged one
        theirs = set()
    if theirs:
        raise ValueError(f"'{directory}' holds another kind of save ({', '.join(sorted(theirs))}): writing "
                         "there would remove it; choose another directory")
    plain = sorted(n for n in names if os.path.lexists(os.path.join(directory, n))
                   and not _link_ok(directory, n, vdir))
    if not plain:
        return []
    regular = all(os.path.isfile(os.path.join(directory, n)) and not os.path.islink(os.path.join(directory, n))
                  for n in plain)
    if vdir is None and regular and adoptable is not None and adoptable(directory):
        return plain
    raise ValueError(f"'{os.path.join(directory, plain[0])}' is not a file minillm saved there (not its link "
                     f"into {CURRENT}/): refusing to replace it; move it away or choose another directory")


def publish(directory, files, known=(), adoptable=None):
    """Write `files` ({name: bytes, str or writer(tmp_path)}) as the new version of `directory` -> its path.

    known: every name this kind of directory uses (a plain file of such a name is either adopted or
    refused); adoptable(directory) -> bool says whether plain files are an older minillm's to adopt.
    Takes the directory's lock for the duration. On any error before the switch the old version stays
    current and the temporaries are removed (a killed process leaves them to the next save)."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"'{directory}' exists and is not a directory")
    with lock(directory):
        names = set(files) | set(known)
        plain = check_target(directory, names, adoptable)
        vroot = os.path.join(directory, VERSIONS)
        os.makedirs(vroot, exist_ok=True)
        kept, keep = _current(directory)
        _remove_debris(directory, vroot, keep)
        for n in names:    # finish an adoption a crash interrupted: hard links of the current files
            if not os.path.islink(os.path.join(directory, n)) and _link_ok(directory, n, kept):
                _link(directory, n, f"{CURRENT}/{n}")
        if plain:
            _adopt(directory, vroot, plain)
        numbers = [int(_VERSION.fullmatch(v).group(1)) for v in _versions(vroot)]
        version = f"v{max(numbers, default=0) + 1:06d}"
        tmp = os.path.join(vroot, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.makedirs(tmp)
        try:
            for name, content in files.items():
                _put(os.path.join(tmp, name), content)
            _put(os.path.join(tmp, CHECKSUMS), _checksums(tmp, files, int(version[1:])))   # last
            fsync_directory(tmp)
            os.rename(tmp, os.path.join(vroot, version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_directory(vroot)
        for name in files:
            _link(directory, name, f"{CURRENT}/{name}")
        _switch(directory, version)            # the one atomic step
        _remove_debris(directory, vroot, version)
        for name in names - set(files):        # our links to files the new version does not have
            if _link_ok(directory, name):
                os.remove(os.path.join(directory, name))
        return os.path.join(vroot, version)
