"""A UTF-8 text file read in bounded memory: checked and hashed in one streaming pass, cut into pieces
that can be encoded one at a time, and sampled.

    info = check(path)                       # TextInfo(path, size, sha256); ValueError for a bad file
    for piece in pieces(path, "lines"):      # str pieces, each ending at a line end ("lines") or at a
        ...                                  # cut no GPT-2 pre-token crosses ("file")
    items, truncated = sample(path, max_bytes, "lines")   # the first max_bytes, as documents

Documents (`--documents`): "lines" makes every non-empty line a document (the line breaks are not part
of it: str.splitlines); "file" makes the whole file one document, newlines kept as text.

Where the file is cut ("file"): before a space or "\\n" that follows a character which is not
whitespace (neither for str.isspace nor for the regex module's \\s). No pre-token of GPT-2's pattern
spans such a boundary (letter, number and punctuation runs never end in whitespace, a leading space
starts a pre-token, and the whitespace rules only look ahead), so encoding the pieces one by one gives
the ids of the whole text. A file with no such place is read on until there is one (a file with no
spaces or newlines at all is then held whole).

This module imports nothing of minillm.
"""

import codecs
import dataclasses
import hashlib
import os

import regex

CHUNK = 1 << 22                         # 4 MiB read at a time
DOCUMENTS = ("lines", "file")
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"   # what str.splitlines splits on
_SPACE = regex.compile(r"\s")
_TRIES = 1000                           # candidate cuts tried per chunk before reading on


@dataclasses.dataclass(frozen=True)
class TextInfo:
    path: str
    size: int        # bytes
    sha256: str      # hex digest of the bytes


def check_documents(documents):
    if documents not in DOCUMENTS:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENTS)}, not {documents!r}")


def _blocks(path, chunk, limit=None):
    with open(path, "rb") as f:
        while limit is None or limit > 0:
            block = f.read(chunk if limit is None else min(chunk, limit))
            if not block:
                return
            if limit is not None:
                limit -= len(block)
            yield block


def check(path, chunk=CHUNK):
    """Stream the file once: -> TextInfo. ValueError (the messages of tokenizer.read_text_file) for a
    missing path, a directory, an empty file, a binary file (NUL bytes) or one that is not UTF-8."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a text file")
    h, size, binary, bad = hashlib.sha256(), 0, False, None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    for block in _blocks(path, chunk):
        h.update(block)
        binary = binary or b"\x00" in block
        if bad is None:
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:  # e.object is the pending bytes + this block
                bad = (e.object[e.start], size - pending + e.start)
        size += len(block)
    if size == 0:
        raise ValueError(f"{path}: the file is empty")
    if binary:
        raise ValueError(f"{path}: looks like a binary file (it contains NUL bytes), not text")
    if bad is None:
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            bad = (decoder.getstate()[0][0], size - pending)
    if bad is not None:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{bad[0]:02x} at offset {bad[1]})")
    return TextInfo(path, size, h.hexdigest())


def _cut(buf, documents, start=0):
    """Where a piece of `buf` can end (the cut is at or after `start`); 0: nowhere."""
    if documents == "lines":
        return buf.rfind(b"\n", start) + 1
    end = len(buf)
    for _ in range(_TRIES):
        p = max(buf.rfind(b" ", start, end), buf.rfind(b"\n", start, end))
        if p <= 0:
            return 0
        q = p - 1
        while q > 0 and p - q < 4 and (buf[q] & 0xC0) == 0x80:   # back to the character's first byte
            q -= 1
        try:
            ch = buf[q:p].decode("utf-8")
        except UnicodeDecodeError:   # the character began in an earlier block: not a candidate
            ch = " "
        if not ch.isspace() and not _SPACE.match(ch):
            return p
        end = p
    return 0


def pieces(path, documents="lines", chunk=CHUNK, limit=None):
    """Yield the file as str pieces of about `chunk` bytes (see the module notes for where it is cut);
    their concatenation is the whole text, or with `limit` its first `limit` bytes or less, up to the
    last cut (any character boundary if there is none). The file must have passed check()."""
    check_documents(documents)
    parts, cut_once = [], False     # the blocks read since the last cut
    if limit is not None and os.path.getsize(path) <= limit:
        limit = None
    for block in _blocks(path, chunk, limit):
        head = parts[-1][-4:] if parts else b""   # the character before a cut may start there
        found = _cut(head + block, documents, start=len(head))
        if found:
            cut = found - len(head)
            yield (b"".join(parts) + block[:cut]).decode("utf-8")
            parts, cut_once = ([block[cut:]] if cut < len(block) else []), True
        else:
            parts.append(block)
    rest = b"".join(parts)
    if rest and limit is not None:  # the limit fell after the last cut: the rest is left out, unless
        if not cut_once:            # there was no cut at all: then up to the last whole character
            yield rest.decode("utf-8", errors="ignore")   # (the file is UTF-8: only its end can be cut)
        return
    if rest:
        yield rest.decode("utf-8")


def lines(text):
    """The documents of "lines" text: its non-empty lines (not whitespace only), line breaks removed."""
    return [line for line in text.splitlines() if line.strip()]


def sample(path, max_bytes, documents="lines", chunk=CHUNK):
    """The first `max_bytes` of the file (cut as pieces(limit=max_bytes) does) as training items, read
    lazily: (an iterator of its documents ("lines") or of pieces of its text ("file"), which pre-tokenize
    as the whole text does; whether the file is longer than max_bytes)."""
    check_documents(documents)
    truncated = os.path.getsize(path) > max_bytes

    def items():
        for piece in pieces(path, documents, chunk, limit=max_bytes):
            yield from (lines(piece) if documents == "lines" else [piece])

    return items(), truncated


def distinct_characters(path, documents="lines", chunk=CHUNK):
    """The set of characters of the file (line breaks left out for "lines", where they end documents)."""
    chars = set()
    for piece in pieces(path, documents, chunk):
        chars.update(piece)
    if documents == "lines":
        chars.difference_update(LINE_BREAKS)
    return chars
