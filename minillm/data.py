"""Text file -> token ids (cached on disk), a deterministic train/validation split, random batches.

Each non-empty line of the file is one document (one headline); documents are joined with the
tokenizer's end-of-text token, which also ends the last one.
"""

import hashlib
import os

import numpy as np
from tqdm.auto import tqdm

from minillm.fileio import atomic_write


def documents(text):
    """The non-empty lines of `text`, stripped of their line ends."""
    return [line for line in text.splitlines() if line.strip()]


def encode_documents(text, tokenizer, progress=True, chunk=5000):
    """text -> ids: (N,) int32, every document followed by <|endoftext|>."""
    docs = documents(text)
    ids = []
    with tqdm(total=len(docs), desc="encoding", unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(docs), chunk):
            for doc_ids in tokenizer.encode_batch(docs[start:start + chunk]):
                ids.extend(doc_ids)
                ids.append(tokenizer.eot_id)
            bar.update(len(docs[start:start + chunk]))
    return np.asarray(ids, dtype=np.int32)


def token_cache_path(cache_dir, text_bytes, tokenizer_json):
    """A file name keyed by the text and the tokenizer, so either changing invalidates the cache."""
    h = hashlib.sha256(text_bytes)
    h.update(b"\0")
    h.update(tokenizer_json.encode())
    return os.path.join(cache_dir, f"tokens-{h.hexdigest()[:16]}.npy")


def load_tokens(text, tokenizer, cache_dir=None, progress=True):
    """Encode `text`, reusing `cache_dir/tokens-<hash>.npy` when present (never unpickles)."""
    if cache_dir is None:
        return encode_documents(text, tokenizer, progress)
    path = token_cache_path(cache_dir, text.encode("utf-8"), tokenizer.to_json())
    if os.path.exists(path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt
    ids = encode_documents(text, tokenizer, progress)
    os.makedirs(cache_dir, exist_ok=True)
    # the temporary keeps the .npy ending, so np.save writes to it as named
    atomic_write(path, lambda tmp: np.save(tmp, ids, allow_pickle=False))
    return ids


def split(ids, val_fraction=0.05):
    """The last `val_fraction` of the token stream is the validation set: (train_ids, val_ids)."""
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
    r * grad_accum + k (train.batch_rngs), so the ranks draw independent windows."""
    return [np.random.default_rng(seed if s == 0 else [seed, s]) for s in streams]


def get_batch(ids, batch_size, context, rng):
    """Random windows: x, y: (batch_size, context) int64, y shifted one token left of x."""
    starts = rng.integers(0, len(ids) - context, size=batch_size)
    offsets = np.arange(context + 1)
    window = ids[starts[:, None] + offsets].astype(np.int64)
    return window[:, :-1], window[:, 1:]


def eval_batches(ids, batch_size, context, max_batches):
    """Deterministic, evenly spaced validation windows: a list of (x, y) batches."""
    n_windows = max(1, min(max_batches * batch_size, (len(ids) - 1) // context))
    starts = np.linspace(0, len(ids) - context - 1, n_windows).astype(np.int64)
    offsets = np.arange(context + 1)
    windows = ids[starts[:, None] + offsets].astype(np.int64)
    return [(w[:, :-1], w[:, 1:]) for w in np.array_split(windows, max(1, -(-n_windows // batch_size)))]
