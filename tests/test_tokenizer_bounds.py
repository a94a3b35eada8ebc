"""Tiny and degenerate inputs through every BPE kernel with Numba's bounds checking on.

Each test runs in a subprocess with NUMBA_BOUNDSCHECK=1 (an out-of-bounds read or write raises
IndexError instead of reading garbage, which is how `tokenizer train` on a file holding just "x"
used to hang) and NUMBA_CACHE_DIR in a temporary folder (the bounds-checked compile must not
land in, nor come from, the normal cache), under a timeout so that a hang fails the test.

    python tests/test_tokenizer_bounds.py     # the API cases themselves, in this process
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from boundscheck import boundscheck_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EOT = "<|endoftext|>"


# ---------------------------------------------------------------- the cases (run in the child)

# (text or items, vocab_size, special_tokens, min_frequency, expected vocab size or error text)
TRAIN_CASES = [
    ("x", 300, (EOT,), 2, 257),  # no pre-token of two bytes: no word at all (the hang)
    ("x", 300, (), 1, 256),
    ("a.b,c;d", 300, (EOT,), 1, 257),  # pieces of one byte only
    ("xx", 300, (EOT,), 2, 257),  # one pair, seen once: below min_frequency
    ("xx", 300, (EOT,), 1, 258),  # one word, one pair: one merge
    ("é", 300, (EOT,), 1, 258),  # one character of two bytes
    ("😀", 300, (), 1, 259),  # four bytes, three merges at most
    (" ", 300, (EOT,), 1, 257),
    ("\n\n", 300, (EOT,), 1, 258),
    (f"{EOT}x{EOT}", 300, (EOT,), 1, 257),  # the text around the special tokens is one byte
    ([EOT + "ab", "", "ab"], 300, (EOT,), 2, 258),
    ("hello hello", 257, (EOT,), 2, 257),  # vocab_size = 256 + specials: no merge to learn
    ("hello hello", 256, (), 2, 256),
    ("hello hello hello", 300, (EOT,), 10**30, 257),  # no pair reaches min_frequency
    ("hello hello hello", 300, (EOT,), -5, None),  # min_frequency < 1 means 1
    ("ab" * 3000, 400, (EOT,), 1, None),  # one long pre-token
    ("a" * 2**20, 300, (EOT,), 2, 276),  # one run: tokens up to 'a' * 2**19 (no O(L^2) build)
    ("hello", 2**24, (EOT,), 1, None),  # the largest vocab_size: capped by what the text gives
    ("hello", 2**24 + 1, (EOT,), 2, "at most 16777216"),
    ("hello", 10**12, (EOT,), 2, "at most 16777216"),
    ("hello", 256, (EOT,), 2, "at least 257"),
    ("hello", 300, (EOT,), 2.5, "min_frequency must be an integer"),
    ("", 300, (EOT,), 2, "empty"),
    (EOT, 300, (EOT,), 2, "empty"),  # only special tokens
    ([EOT, EOT + EOT, ""], 300, (EOT,), 2, "empty"),
    ([], 300, (EOT,), 2, "empty"),
]
SAMPLES = ["", "x", "xx", " ", "é", "😀", "a.b", "hello world", "a" * 129, "ab" * 200, " " * 300,
           EOT, f"a{EOT}b"]


def check_tokenizer(tok):
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and all(0 <= i < tok.vocab_size for i in ids), repr(s)
    for s in tok.special_tokens:
        assert tok.encode(s, allowed_special="all") == [tok.special_tokens[s]]
    assert tok.encode_batch([]) == [] and tok.encode_batch([""]) == [[]]
    assert tok.encode_batch(["", "x", ""]) == [[], tok.encode("x"), []]
    assert tok.decode([]) == "" and tok.decode_bytes([]) == b""
    assert type(tok).from_json(tok.to_json()).tokens == tok.tokens


def train_cases():
    from minillm.tokenizer import Tokenizer

    for text, vocab, specials, minf, want in TRAIN_CASES:
        case = (text if len(text) < 40 else f"{text[:20]}...", vocab, specials, minf)
        if isinstance(want, str):
            with pytest.raises(ValueError, match=want):
                Tokenizer.train(text, vocab, special_tokens=specials, progress=False,
                                min_frequency=minf)
            continue
        tok = Tokenizer.train(text, vocab, special_tokens=specials, progress=False,
                              min_frequency=minf)
        assert tok.vocab_size <= vocab and (want is None or tok.vocab_size == want), case
        check_tokenizer(tok)


def random_bytes(rng, n):
    """Bytes that are mostly not UTF-8: lead bytes without their continuations, stray
    continuations, 0xF8..0xFF, a few ASCII letters and spaces."""
    pool = np.array([0x20, 0x27, 0x61, 0x73, 0x31, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xF4, 0xF8,
                     0xFF, 0x0A], np.uint8)
    return np.where(rng.random(n) < 0.5, rng.choice(pool, n), rng.integers(0, 256, n)).astype(
        np.uint8)


def kernel_cases():
    """The kernels called directly: empty and one-element arrays, item ends past the end or
    going backwards, bytes that are not UTF-8."""
    from minillm.kernels import bpe, bpe_train
    from minillm.tokenizer import Tokenizer
    from test_kernels_bpe import DATA

    cats = bpe.categories()
    i64 = np.int64
    empty = np.zeros(0, np.uint8)
    assert bpe.pretokenize(empty, np.zeros(0, i64), cats).tolist() == [0]
    assert bpe.pretokenize(empty, np.array([0, 5], i64), cats).tolist() == [0]
    assert bpe.pretokenize(np.array([97], np.uint8), np.array([1], i64), cats).tolist() == [0, 1]
    assert bpe.pretokenize(np.array([0xE6], np.uint8), np.array([9], i64), cats).tolist() == [0, 1]
    for args in ((empty, np.zeros(0, i64)), (empty, np.array([0], i64)),
                 (np.array([120], np.uint8), np.array([1], i64))):
        off, ln, cnt = bpe_train.count_pieces(*args, cats)
        assert len(off) == len(ln) == len(cnt) == len(args[0])

    gpt2 = Tokenizer.from_gpt2_files(f"{DATA}/gpt2/vocab.bpe", f"{DATA}/gpt2/encoder.json")
    bare = Tokenizer([bytes([b]) for b in range(256)])  # no merge at all: every rank is INF
    rng = np.random.default_rng(0)
    for tok in (gpt2, bare):
        for cache_size in (0, 1, 3, 1 << 16):
            c = bpe.new_cache(cache_size)
            for n in [0, 1, 2, 3, 4, 5, 127, 128, 129, 130, 300, 2000] * 3:
                buf = random_bytes(rng, n)
                ends = np.sort(rng.integers(0, n + 3, int(rng.integers(0, 4)))).astype(i64)
                if rng.random() < 0.3:
                    ends = ends[::-1].copy()  # ends going backwards: empty items
                ids, id_ends = bpe.encode(buf, ends, cats, tok._byte_to_id, tok._tk, tok._tv,
                                          c["slots"], c["ent"], c["keys"], c["vals"], c["use"])
                assert len(ids) <= n and len(id_ends) == len(ends)
                covered = int(min(ends.max(), n)) if len(ends) else 0
                want = buf[:covered].tobytes()
                assert bpe.decode(ids.astype(i64), tok._bytes, tok._off).tobytes() == want
                starts = bpe.pretokenize(buf, ends, cats)
                assert np.all(np.diff(starts) > 0) and starts[-1] == covered
                if n:
                    off, ln, cnt = bpe_train.count_pieces(buf, ends, cats)
                    assert int(cnt.sum()) == len(starts) - 1
        for s in ("a" * 129, "a" * 1000, " " * 500, "ab" * 400, "😀" * 100, "1" * 777):
            pairs = bpe.pair_dict(tok._tk, tok._tv)
            assert tok.encode(s) == bpe.encode_reference(s, tok._byte_to_id, pairs), s[:10]
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode(np.array([0, 256], i64), bare._bytes, bare._off)

    tr = bpe_train.train
    z32, z64 = np.zeros(0, np.int32), np.zeros(0, i64)
    for n_merges in (0, 1, 10**12):
        a, b, c = tr(z32, z64, z32, z64, n_merges, 256)  # no word
        assert len(a) == len(b) == len(c) == 0
        a, _, _ = tr(np.array([5], np.int32), np.array([0], i64), np.array([1], np.int32),
                     np.array([3], i64), n_merges, 256)  # one word of one symbol
        assert len(a) == 0
        a, b, _ = tr(np.array([5, 6], np.int32), np.array([0], i64), np.array([2], np.int32),
                     np.array([3], i64), n_merges, 256)  # one word, one pair
        assert (a.tolist(), b.tolist()) == ([5] * min(n_merges, 1), [6] * min(n_merges, 1))
    from test_kernels_bpe_train import random_words, words_to_arrays

    for seed in range(20):  # tables that start tiny (first_id = alphabet) and grow many times
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, 5))
        words = random_words(rng, int(rng.integers(1, 60)), k, int(rng.integers(1, 40)))
        a, b, _ = tr(*words_to_arrays(words), 100, k, int(rng.integers(1, 3)))
        assert len(a) <= 100
    for bad in ((z32, np.array([0], i64), z32, z64),  # a start for no word (the hang)
                (np.array([1], np.int32), np.array([0], i64), np.array([2], np.int32),
                 np.array([1], i64)),  # a word past the end of sym
                (np.array([300, 1], np.int32), np.array([0], i64), np.array([2], np.int32),
                 np.array([1], i64))):  # a symbol that is not below first_id
        with pytest.raises(ValueError):
            tr(*bad, 10, 256)


if __name__ == "__main__":
    train_cases()
    kernel_cases()
    print("all bounds-checked cases passed")


# ---------------------------------------------------------------- the tests (the parent)

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return boundscheck_env(tmp_path_factory.mktemp("numba-boundscheck-cache"))


def run(args, env, timeout, cwd=ROOT):
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(args)} still running after {timeout} s")


def test_api_and_kernels_with_boundscheck(env):
    """All of the above in one child (the first compile with bounds checks takes a while)."""
    r = run([os.path.abspath(__file__)], env, timeout=600)
    assert r.returncode == 0 and "all bounds-checked cases passed" in r.stdout, r.stderr[-3000:]


CLI_CASES = [  # (file contents, --vocab-size, exit code, what stderr says)
    ("x", "300", 0, "wrote"),  # the reported hang; then encode and decode with the result
    ("x", "257", 0, "wrote"),  # 256 + the one special token
    ("a.b,c", "300", 0, "wrote"),
    ("é", "300", 0, "wrote"),
    (EOT * 3, "300", 1, "error: the training text is empty"),
    ("hello world", str(10**12), 1, "error: vocab_size must be at most 16777216"),
]


@pytest.mark.parametrize("text, vocab, code, says", CLI_CASES)
def test_cli_train_with_boundscheck(env, tmp_path, text, vocab, code, says):
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "t.json"
    r = run(["-m", "minillm", "tokenizer", "train", str(tmp_path / "in.txt"), "--vocab-size",
             vocab, "--out", str(out), "--quiet"], env, timeout=300, cwd=tmp_path)
    assert r.returncode == code and says in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    if code:
        assert r.stderr.count("\n") == 1 and not out.exists()
        return
    from minillm.tokenizer import Tokenizer

    assert Tokenizer.load(out).decode(Tokenizer.load(out).encode(text)) == text
    if text != "x":
        return
    r = run(["-m", "minillm", "tokenizer", "encode", "--tokenizer", str(out), text], env,
            timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = r.stdout.split()
    r = run(["-m", "minillm", "tokenizer", "decode", "--tokenizer", str(out), *ids], env,
            timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == text, r.stderr[-3000:]
