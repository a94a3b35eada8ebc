"""Text file -> token ids (one shared, content-keyed cache), a deterministic train/validation split, batches.

Documents (`--documents`, see minillm.textfile): "lines" (the default) makes each non-empty line a
document; "file" makes the whole file one document that keeps its newlines. Every document is followed
by the tokenizer's end-of-text token.

Memory: the file is read and encoded in pieces of a few MB (textfile.pieces) and the ids are appended to
the cache file as they come, so encoding holds one piece at a time; training reads the cache file
memory-mapped (read-only), the split is two views of it and batches copy only their windows.

The token cache: `<cache>/tokens/<key>.npy` (int32, .npy version 1), where <cache> is $MINILLM_CACHE,
else $XDG_CACHE_HOME/minillm, else ~/.cache/minillm, and <key> hashes the text's bytes (sha256, streamed),
the tokenizer's JSON and the documents mode. Every run on the same text and tokenizer, in any output
directory, shares one file; changing either makes another. A cache file is used only if its header is
a 1-D little-endian int32 array, the file's size is exactly that header's, its last token is
<|endoftext|> and every id is within the vocabulary; otherwise it is encoded again and replaced
(atomically: a crash leaves the old file or the new one, never half of one).
"""

import hashlib
import os

import numpy as np
from tqdm.auto import tqdm

from minillm import textfile
from minillm.fileio import atomic_write

CACHE_VERSION = 1                      # part of the key: bump when the encoding of a file changes
TOKENIZER_SAMPLE_BYTES = 64 * 2**20    # BPE training reads only the first 64 MiB of the file
_DTYPE = np.dtype("<i4")
_HEADER = {"descr": _DTYPE.str, "fortran_order": False}


def documents(text):
    """The non-empty lines of `text`, stripped of their line ends."""
    return textfile.lines(text)


def encode_documents(text, tokenizer, progress=True, chunk=5000):
    """text (in memory) -> ids: (N,) int32, every line document followed by <|endoftext|>."""
    docs = documents(text)
    ids = []
    with tqdm(total=len(docs), desc="encoding", unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(docs), chunk):
            ids.extend(_encode_lines(docs[start:start + chunk], tokenizer))
            bar.update(len(docs[start:start + chunk]))
    return np.asarray(ids, dtype=np.int32)


def _encode_lines(docs, tokenizer):
    ids = []
    for doc_ids in tokenizer.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tokenizer.eot_id)
    return ids


def _encode_text(text, tokenizer):
    if hasattr(tokenizer, "encode_array"):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), np.int32)


def encode_stream(path, tokenizer, documents="lines", progress=True, chunk=textfile.CHUNK):
    """Yield int32 arrays whose concatenation is the token stream of the file at `path`, reading
    `chunk` bytes at a time (the file must have passed textfile.check)."""
    textfile.check_documents(documents)
    with tqdm(total=os.path.getsize(path), desc="encoding", unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for piece in textfile.pieces(path, documents, chunk):
            if documents == "lines":
                ids = np.asarray(_encode_lines(textfile.lines(piece), tokenizer), np.int32)
            else:
                ids = _encode_text(piece, tokenizer).astype(np.int32, copy=False)
            if not bar.disable:
                bar.update(len(piece.encode("utf-8")))
            yield ids
    if documents == "file":
        yield np.array([tokenizer.eot_id], np.int32)


# ------------------------------------------------------------------ the cache
def cache_dir():
    """$MINILLM_CACHE, else $XDG_CACHE_HOME/minillm, else ~/.cache/minillm."""
    if os.environ.get("MINILLM_CACHE"):
        return os.environ["MINILLM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minillm")


def token_cache_path(text_sha256, tokenizer_json, documents="lines", directory=None):
    """The cache file for this text (its sha256 hex digest), tokenizer and documents mode."""
    h = hashlib.sha256(f"minillm-tokens {CACHE_VERSION} {documents} {text_sha256}\0".encode())
    h.update(tokenizer_json.encode("utf-8"))
    return os.path.join(directory or cache_dir(), "tokens", f"{h.hexdigest()[:32]}.npy")


def write_tokens(path, chunks):
    """Write the int32 arrays of `chunks` one after another as one .npy file, atomically; -> count."""
    count = 0

    def writer(tmp):
        nonlocal count
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {**_HEADER, "shape": (0,)})  # a placeholder
            offset = f.tell()
            for a in chunks:
                a = np.ascontiguousarray(a, dtype=_DTYPE)
                f.write(memoryview(a).cast("B"))
                count += len(a)
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, {**_HEADER, "shape": (count,)})
            if f.tell() != offset:  # numpy pads the header so that the length can grow in place
                raise RuntimeError("the .npy header changed size")

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, writer)
    return count


def open_tokens(path, vocab_size=None, eot_id=None):
    """The cached ids, memory-mapped read-only, or None when the file is missing or fails a check
    (header, exact size, the final <|endoftext|>, ids within the vocabulary): never trusted blindly."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read_header[major](f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if dtype != _DTYPE or fortran or len(shape) != 1 or size != offset + shape[0] * _DTYPE.itemsize:
        return None
    if shape[0] == 0:
        return np.zeros(0, np.int32)
    ids = np.memmap(path, dtype=_DTYPE, mode="r", offset=offset, shape=shape)
    if eot_id is not None and ids[-1] != eot_id:
        return None
    step = 1 << 24
    for start in range(0, len(ids), step):
        block = ids[start:start + step]
        if block.min() < 0 or (vocab_size is not None and block.max() >= vocab_size):
            return None
    return ids


def load_tokens(path, tokenizer, documents="lines", info=None, progress=True, log=None, directory=None):
    """The token stream of the text file at `path`: (N,) int32, memory-mapped from the token cache,
    which is written (streaming) when missing or damaged. info: its textfile.check result, if known."""
    info = info or textfile.check(path)
    cache = token_cache_path(info.sha256, tokenizer.to_json(), documents, directory)
    ids = open_tokens(cache, tokenizer.vocab_size, tokenizer.eot_id)
    if ids is not None:
        if log:
            log(f"tokens of {path} from the cache {cache}")
        return ids
    if log:
        damaged = " (the cached file was damaged)" if os.path.exists(cache) else ""
        log(f"encoding {path} into the token cache {cache}{damaged}")
    try:
        write_tokens(cache, encode_stream(path, tokenizer, documents, progress))
    except OSError as e:
        raise OSError(f"cannot write the token cache {cache}: {e.strerror or e}; set MINILLM_CACHE to a "
                      "writable directory") from None
    ids = open_tokens(cache, tokenizer.vocab_size, tokenizer.eot_id)
    if ids is None:
        raise ValueError(f"the token cache {cache} did not read back (is the disk full?)")
    return ids


# ------------------------------------------------------------------ splits and batches
def split(ids, val_fraction=0.05):
    """The last `val_fraction` of the token stream is the validation set: (train_ids, val_ids), two views
    of `ids` (nothing is copied)."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def check_enough(ids, context, what):
    if len(ids) < context + 1:
        raise ValueError(
            f"the {what} text has {len(ids)} tokens, too short for one sequence of --context {context} "
            f"(needs at least {context + 1}); use more text or a smaller --context"
        )


def batch_rngs(seed, streams):
    """One generator per batch stream s in `streams`: np.random.default_rng([seed, s]). Stream 0 is
    np.random.default_rng(seed) itself (NumPy's SeedSequence reads [seed, 0] as seed: trailing zero words
    do not change the seed), the stream of a single process; under MPI micro-batch k of rank r uses stream
    r * grad_accum + k (train_step.batch_rngs), so the ranks draw independent windows."""
    return [np.random.default_rng(seed if s == 0 else [seed, s]) for s in streams]


def get_batch(ids, batch_size, context, rng):
    """Random windows: x, y: (batch_size, context) int64, y shifted one token left of x. Reads only the
    windows of `ids` (a memory map stays on disk)."""
    starts = rng.integers(0, len(ids) - context, size=batch_size)
    offsets = np.arange(context + 1)
    window = ids[starts[:, None] + offsets].astype(np.int64)
    return window[:, :-1], window[:, 1:]


def iter_eval_batches(ids, batch_size, context, max_batches):
    """Deterministic, evenly spaced validation windows, one (x, y) batch at a time."""
    n_windows = max(1, min(max_batches * batch_size, (len(ids) - 1) // context))
    starts = np.linspace(0, len(ids) - context - 1, n_windows).astype(np.int64)
    offsets = np.arange(context + 1)
    for group in np.array_split(starts, max(1, -(-n_windows // batch_size))):
        w = ids[group[:, None] + offsets].astype(np.int64)
        yield w[:, :-1], w[:, 1:]


def eval_batches(ids, batch_size, context, max_batches):
    """iter_eval_batches as a list (for evaluating the same batches again and again)."""
    return list(iter_eval_batches(ids, batch_size, context, max_batches))
