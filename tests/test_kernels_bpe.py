"""kernels/bpe.py: the Numba kernels against their references (the `regex` module with the
pinned pattern, plain Python)."""

import os
from collections import Counter

import numpy as np
import pytest
import regex

from minillm.kernels import bpe, bpe_train
from minillm.kernels.bpe import categories, pinned_pattern
from minillm.tokenizer import Tokenizer

# GPT-2's pattern with \p{L}, \p{N}, \s pinned to the kernels' Unicode version (not regex's own)
PATTERN = pinned_pattern()
# the corpora sit in ../shared/data beside the repository
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data")

EDGE = [
    "", " ", "  ", "a", " a", "  a", "\n", "\n\n", "a\n\nb", "a \n b", "\t\tx", " \tx", "x  ",
    "x \n", "it's", "IT'S", "we're we've I'm he'll I'd", "'s'", "''s", " 's", "!'s", "'", "a'",
    "'ll'", "'re", "'r", "don't", "1,000.50", " 123abc", "a1b2", "..., !!!", " ?!", "x\u00a0y",
    "\u3000\u3000x", "\u2028a", "\x85b", "\x1c\x1dq", "tab\tsep\tvalue\n", "e\u0301te\u0301",
    "日本語のテキスト", "한국어 텍스트", "emoji 😀👍🏽 family 👨‍👩‍👧", "Ελληνικά 123 ٣٤٥",
    "zero\u200bwidth", "\r\n\r\n", "a  \t  b", "x\x00y\x7f", "\ufeffbom", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def random_strings(n, seed, max_len=40):
    """Strings mixing ASCII, spaces, punctuation and random code points of all planes."""
    rng = np.random.default_rng(seed)
    pools = [" ", "  ", "\n", "\t", "'", "'s", "'ll", "a", "Z", "é", "1", "٣", ".", "😀", "\u0301",
             "\u00a0", "\u3000", "日"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.integers(0, max_len)):
            if rng.random() < 0.5:
                parts.append(pools[rng.integers(len(pools))])
            else:
                c = int(rng.integers(0, 0x110000 if rng.random() < 0.3 else 0x3000))
                parts.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        out.append("".join(parts))
    return out


def pieces(text):
    buf = np.frombuffer(text.encode("utf-8"), np.uint8)
    starts = bpe.pretokenize(buf, np.array([len(buf)], np.int64), categories())
    return [buf[a:b].tobytes().decode("utf-8") for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("text", EDGE)
def test_pretokenize_matches_regex_on_edge_cases(text):
    assert pieces(text) == regex.findall(PATTERN, text)


def test_pretokenize_matches_regex_on_random_and_real_text():
    for s in random_strings(2000, seed=0):
        assert pieces(s) == regex.findall(PATTERN, s), repr(s)
    with open(f"{DATA}/shakespeare.txt", encoding="utf-8") as f:
        text = f.read(500_000)
    assert pieces(text) == regex.findall(PATTERN, text)


def test_pretokenize_never_crosses_item_ends():
    items = ["ab ", " cd", "'", "s  ", "x"]
    buf = np.frombuffer("".join(items).encode(), np.uint8)
    ends = np.cumsum([len(s) for s in items]).astype(np.int64)
    starts = bpe.pretokenize(buf, ends, categories())
    got = [buf[a:b].tobytes().decode() for a, b in zip(starts[:-1], starts[1:])]
    assert got == [p for s in items for p in regex.findall(PATTERN, s)]


def test_count_pieces_matches_counter():
    with open(f"{DATA}/headlines.txt", encoding="utf-8") as f:
        text = f.read(300_000)
    text += "".join(random_strings(300, seed=1))
    raw = text.encode("utf-8")
    off, ln, cnt = bpe_train.count_pieces(np.frombuffer(raw, np.uint8), np.array([len(raw)], np.int64),
                                    categories())
    got = {raw[o:o + n].decode(): c for o, n, c in zip(off, ln, cnt)}
    assert len(got) == len(off)  # each distinct piece once
    assert got == Counter(regex.findall(PATTERN, text))


def test_table_first_key_wins_and_missing_is_minus_one():
    keys = np.array([5, 7, 5, (3 << 32) | 9], np.int64)
    tk, tv = bpe.table_build(keys, np.array([1, 2, 3, 4], np.int32))
    assert [bpe.table_get(tk, tv, k) for k in (5, 7, (3 << 32) | 9, 6)] == [1, 2, 4, -1]


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_gpt2_files(f"{DATA}/gpt2/vocab.bpe", f"{DATA}/gpt2/encoder.json")


def test_encode_kernel_matches_reference(gpt2):
    texts = EDGE + random_strings(500, seed=2)
    # long pre-tokens take the heap path (> bpe.LONG bytes): letters, digits, spaces, symbols
    texts += ["ab" * 300, "a" * 1001, " " * 700 + "x", "1234567890" * 40, "!?" * 200,
              "".join(random_strings(1, seed=3, max_len=400)).replace(" ", "")]
    cache, pairs = {}, bpe.pair_dict(gpt2._tk, gpt2._tv)
    for t in texts:
        assert gpt2.encode(t) == bpe.encode_reference(t, gpt2._byte_to_id, pairs, cache), repr(t)


@pytest.mark.parametrize("tables", ["gpt2", "small"])
def test_merge_long_equals_merge_short(gpt2, tables):
    """The in-place block-minimum merge of long pieces against tiktoken's rescanning loop, at
    every length around the block size and beyond, on few-letter alphabets (many equal ranks,
    merges that meet across block edges)."""
    if tables == "gpt2":
        tk, tv, b2i = gpt2._tk, gpt2._tv, gpt2._byte_to_id
    else:
        tok = Tokenizer.train("abab aabb baba ab " * 50 + "aaaa bbbb " * 20, 300, progress=False)
        tk, tv, b2i = tok._tk, tok._tv, tok._byte_to_id
    rng = np.random.default_rng(5)
    r = np.empty(4096, np.int32)
    for m in [*range(0, 3 * bpe.BLOCK + 3), 500, 1000, 4000]:
        for alphabet in (b"a", b"ab", b"abc ", b"the quick"):
            raw = bytes(rng.choice(list(alphabet), m)) if m else b""
            ids = b2i[np.frombuffer(raw, np.uint8)].astype(np.int32)
            short, long_ = ids.copy(), ids.copy()
            n_short = bpe._merge_short(short, r, m, tk, tv)
            n_long = bpe._merge_long(long_, m, tk, tv)
            assert long_[:n_long].tolist() == short[:n_short].tolist(), (m, alphabet)


def test_encode_cache_gives_same_ids_when_warm_and_when_full(gpt2):
    with open(f"{DATA}/shakespeare.txt", encoding="utf-8") as f:
        text = f.read(200_000)
    first = gpt2.encode(text)
    assert gpt2.encode(text) == first  # second call served from the cache
    gpt2._cache, size = None, gpt2._cache_size
    try:
        gpt2._cache_size = 64  # the cache fills up at once: encode must stop adding, not break
        assert gpt2.encode(text) == first
        assert gpt2.encode(text) == first
    finally:
        gpt2._cache, gpt2._cache_size = None, size


def test_decode_kernel():
    tok_bytes = np.frombuffer(b"abcde", np.uint8)
    off = np.array([0, 1, 3, 5], np.int64)  # "a", "bc", "de"
    assert bpe.decode(np.array([2, 0, 1, 1], np.int64), tok_bytes, off).tobytes() == b"deabcbc"
