"""kernels/bpe_train.py: the Numba BPE trainer equals the Python reference (ties, tiny alphabets, growing
tables, real pieces)."""

import os
from collections import Counter

import numpy as np
import pytest
import regex

from minillm.kernels import bpe_train
from minillm.kernels.bpe import pinned_pattern

PATTERN = pinned_pattern()
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data")


def words_to_arrays(words):
    keys = list(words)
    sym = np.array([s for w in keys for s in w], np.int32)
    wlen = np.array([len(w) for w in keys], np.int32)
    wstart = np.concatenate(([0], np.cumsum(wlen[:-1]))).astype(np.int64)
    return sym, wstart, wlen, np.array([words[w] for w in keys], np.int64)


def random_words(rng, n_words, alphabet, max_len):
    words = {}
    for _ in range(n_words):
        w = tuple(int(x) for x in rng.integers(0, alphabet, rng.integers(1, max_len + 1)))
        words[w] = words.get(w, 0) + int(rng.integers(1, 6))
    return words


@pytest.mark.parametrize("seed", range(12))
def test_train_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    alphabet = [2, 3, 5, 20][seed % 4]  # tiny alphabets make many ties and runs like a a a a
    words = random_words(rng, int(rng.integers(5, 200)), alphabet, int(rng.integers(2, 16)))
    n_merges, min_count = 60, 1 + seed % 3
    want = bpe_train.train_reference(words, n_merges, 256, min_count)
    a, b, _ = bpe_train.train(*words_to_arrays(words), n_merges, 256, min_count)
    assert list(zip(a.tolist(), b.tolist())) == want


def test_train_kernel_grows_its_tables():
    """One pair in every word: the first merge needs more room than the initial guess."""
    rng = np.random.default_rng(7)
    words = {(0, 1) + tuple(int(x) for x in rng.integers(0, 250, 60)): 1 for _ in range(300)}
    want = bpe_train.train_reference(words, 200, 256)
    a, b, c = bpe_train.train(*words_to_arrays(words), 200, 256)
    assert list(zip(a.tolist(), b.tolist())) == want
    assert c[0] >= 300 and np.all(c >= 1)


@pytest.mark.parametrize("seed", range(6))
def test_train_kernel_from_tight_tables_matches_reference(seed):
    """Symbols 0..k-1 and first_id = k: the tables start at k**2 + 16 pairs and grow at many
    merges (each merge reserves at most 2 * new id + 1 pairs)."""
    rng = np.random.default_rng(100 + seed)
    k = 1 + seed % 4
    words = random_words(rng, int(rng.integers(1, 80)), k, int(rng.integers(1, 60)))
    want = bpe_train.train_reference(words, 150, k, 1)
    a, b, _ = bpe_train.train(*words_to_arrays(words), 150, k, 1)
    assert list(zip(a.tolist(), b.tolist())) == want


def test_train_kernel_on_real_pieces_matches_reference():
    with open(f"{DATA}/headlines.txt", encoding="utf-8") as f:
        text = f.read(20_000)
    words = Counter(tuple(p.encode()) for p in regex.findall(PATTERN, text))
    want = bpe_train.train_reference(dict(words), 150, 256, 2)
    a, b, _ = bpe_train.train(*words_to_arrays(dict(words)), 150, 256, 2)
    assert list(zip(a.tolist(), b.tolist())) == want
