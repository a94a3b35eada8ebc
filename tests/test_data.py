"""data.py: documents, streaming encode, the shared token cache, splitting, batches."""

import os

import numpy as np
import pytest

from minillm import data, textfile

HERE = os.path.dirname(os.path.abspath(__file__))
HEADLINES = os.path.join(HERE, "..", "data", "headlines.txt")


class ByteTokenizer:
    """One id per byte, 256 = <|endoftext|>: enough to test the data plumbing."""

    eot_id = 256
    vocab_size = 257

    def __init__(self, tag="1"):
        self.tag = tag

    def encode_batch(self, texts):
        return [list(s.encode()) for s in texts]

    def encode(self, text):
        return list(text.encode())

    def to_json(self):
        return '{"bytes": %s}' % self.tag


@pytest.fixture(scope="module")
def bpe():
    from minillm.tokenizer import Tokenizer

    with open(HEADLINES, encoding="utf-8") as f:
        head = f.read(200_000)
    return Tokenizer.train(data.documents(head), 400, progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache of this test's own, and a count of the files encoded into it."""
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    calls = []
    real = data.encode_stream
    monkeypatch.setattr(data, "encode_stream", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    return calls


def token_files():
    d = os.path.join(os.environ["MINILLM_CACHE"], "tokens")
    return sorted(os.path.join(d, n) for n in os.listdir(d)) if os.path.isdir(d) else []


def test_documents_are_joined_with_eot():
    ids = data.encode_documents("ab\n\n c\n", ByteTokenizer(), progress=False)
    assert ids.tolist() == [97, 98, 256, 32, 99, 256]


def test_streaming_encode_equals_the_whole_text_encode_on_headlines(bpe):
    with open(HEADLINES, encoding="utf-8") as f:
        text = f.read()
    want = data.encode_documents(text, bpe, progress=False)
    pieces = list(data.encode_stream(HEADLINES, bpe, "lines", progress=False, chunk=50_000))
    assert len(pieces) > 10
    np.testing.assert_array_equal(np.concatenate(pieces), want)


def test_documents_file_is_one_document_that_keeps_its_newlines(bpe, tmp_path):
    with open(HEADLINES, encoding="utf-8") as f:
        text = "".join(f.readlines()[:3000]).replace("police", "police  \n\n  ") + "\tend\r\n  \n"
    text += "日本語の文。\n中文　测试 \u3000 x\u00a0 y\u2003\n\u0085 z\x1c \x1f\nend\n" * 300
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8", newline="")
    got = np.concatenate(list(data.encode_stream(str(path), bpe, "file", progress=False, chunk=3000)))
    np.testing.assert_array_equal(got, bpe.encode_array(text).tolist() + [bpe.eot_id])
    assert bpe.decode(got[:-1]) == text and (got == bpe.eot_id).sum() == 1
    lines = np.concatenate(list(data.encode_stream(str(path), bpe, "lines", progress=False)))
    assert "\n" not in bpe.decode(lines) and (lines == bpe.eot_id).sum() > 1


def test_the_cache_is_shared_keyed_by_content_and_memory_mapped(tmp_path, cache):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello\nworld\n")
    b.write_text("hello\nworld\n")          # same bytes, another path (another run's --out does not matter)
    ids = data.load_tokens(str(a), ByteTokenizer(), progress=False)
    again = data.load_tokens(str(b), ByteTokenizer(), progress=False)
    assert cache == [str(a)] and len(token_files()) == 1
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again, ids)
    assert ids.tolist() == [*b"hello", 256, *b"world", 256]
    data.load_tokens(str(a), ByteTokenizer("2"), progress=False)            # another tokenizer
    data.load_tokens(str(a), ByteTokenizer(), documents="file", progress=False)   # another mode
    b.write_text("hello\nthere\n")                                           # another text
    assert data.load_tokens(str(b), ByteTokenizer(), progress=False)[-6:].tolist() == [*b"there", 256]
    assert len(cache) == 4 and len(token_files()) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "grow", "last_token", "out_of_range", "float"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, cache, damage):
    path = tmp_path / "t.txt"
    path.write_text("some text\nmore text\n" * 50)
    want = data.load_tokens(str(path), ByteTokenizer(), progress=False).tolist()
    (cached,) = token_files()
    raw = open(cached, "rb").read()
    if damage == "truncate":
        raw = raw[:-6]
    elif damage == "garbage":
        raw = b"not a numpy file at all" + raw[23:]
    elif damage == "grow":
        raw = raw + b"\0\0\0\0"
    elif damage in ("last_token", "out_of_range"):
        arr = np.load(cached).copy()
        arr[-1 if damage == "last_token" else 3] = 7 if damage == "last_token" else 9999
        np.save(cached, arr)
        raw = open(cached, "rb").read()
    else:
        np.save(cached, np.asarray(want, np.float32))
        raw = open(cached, "rb").read()
    with open(cached, "wb") as f:
        f.write(raw)
    assert data.open_tokens(cached, 257, 256) is None
    assert data.load_tokens(str(path), ByteTokenizer(), progress=False).tolist() == want
    assert len(cache) == 2 and data.open_tokens(cached, 257, 256) is not None


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "m"))
    assert data.cache_dir() == str(tmp_path / "m")
    monkeypatch.delenv("MINILLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == os.path.join(str(tmp_path / "x"), "minillm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.cache_dir() == os.path.join(str(tmp_path / "h"), ".cache", "minillm")


def test_write_tokens_streams_chunks_into_one_npy(tmp_path):
    path = str(tmp_path / "x.npy")
    chunks = [np.arange(5, dtype=np.int32), np.array([], np.int32), np.arange(5, 9, dtype=np.int64)]
    assert data.write_tokens(path, iter(chunks)) == 9
    np.testing.assert_array_equal(np.load(path), np.arange(9))
    assert data.write_tokens(path, iter([])) == 0 and data.open_tokens(path).size == 0


def test_split_and_batches_are_deterministic_and_split_copies_nothing(tmp_path):
    path = str(tmp_path / "ids.npy")
    data.write_tokens(path, [np.arange(1000, dtype=np.int32)])
    ids = data.open_tokens(path)
    train, val = data.split(ids, 0.1)
    assert len(val) == 100 and train[-1] + 1 == val[0]
    assert np.shares_memory(train, ids) and np.shares_memory(val, ids)
    x, y = data.get_batch(train, 4, 8, np.random.default_rng(0))
    x2, _ = data.get_batch(train, 4, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, x + 1)
    assert type(x) is np.ndarray
    batches = data.eval_batches(val, 4, 8, max_batches=100)
    assert sum(len(b[0]) for b in batches) == (len(val) - 1) // 8
    assert [len(b[0]) for b in batches] == [len(b[0]) for b in data.iter_eval_batches(val, 4, 8, 100)]
    with pytest.raises(ValueError, match="too short"):
        data.check_enough(ids[:5], 8, "training")


def test_unknown_documents_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lines, file"):
        list(data.encode_stream(HEADLINES, ByteTokenizer(), "paragraphs"))
    assert textfile.DOCUMENTS == ("lines", "file")


def test_streaming_encode_of_random_tricky_texts_equals_the_whole_text_encode(bpe, tmp_path):
    """Whitespace of every kind (Unicode spaces, \\x1c, \\x85, \\r), contractions, non-ASCII, <|endoftext|>
    text, cut into 1- to 17-byte reads."""
    import random

    alphabet = list("ab1 \n\t\r'.,-") + ["\u3000", "\u00a0", "\u2003", "\x1c", "\x85", "é", "日", "'s", " 's",
                                         "  ", "\n\n", "<|endoftext|>"]
    rng, path = random.Random(0), tmp_path / "t.txt"
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
        path.write_text(text, encoding="utf-8", newline="")
        whole = {"file": bpe.encode_array(text).tolist() + [bpe.eot_id],
                 "lines": data.encode_documents(text, bpe, progress=False).tolist()}
        for documents, chunk in [("file", 1), ("file", 5), ("file", 17), ("lines", 1), ("lines", 17)]:
            got = [i for a in data.encode_stream(str(path), bpe, documents, progress=False, chunk=chunk) for i in a]
            assert got == whole[documents], (text, documents, chunk)


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("a line\n")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "file"))
    with pytest.raises(OSError, match="cannot write the token cache .*MINILLM_CACHE"):
        data.load_tokens(str(path), ByteTokenizer(), progress=False)
