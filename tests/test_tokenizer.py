"""tokenizer.py: GPT-2 parity with tiktoken, round trips, training, files, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import regex
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from clirun import run_cli
from minillm.kernels import bpe_train
from minillm.kernels.bpe import GPT2_PATTERN
from minillm.tokenizer import EOT, MAX_VOCAB_SIZE, Tokenizer, bytes_to_unicode, read_text_file
from test_kernels_bpe import DATA, EDGE, PATTERN, random_strings

VOCAB, ENCODER = f"{DATA}/gpt2/vocab.bpe", f"{DATA}/gpt2/encoder.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_gpt2_files(VOCAB, ENCODER)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's gpt2 encoding built offline from the same two files (no download, no cache)."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" = read the local files directly
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(VOCAB, ENCODER)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-local", pat_str=pat, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


@pytest.fixture(scope="module")
def trained():
    with open(f"{DATA}/headlines.txt", encoding="utf-8") as f:
        return Tokenizer.train(f.read(300_000), 600, progress=False)


# ---------------------------------------------------------------- GPT-2 parity

def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571,
                                                          12, 17, 13]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


@pytest.mark.parametrize("name", ["headlines.txt", "shakespeare.txt"])
def test_gpt2_ids_equal_tiktoken_on_corpora(gpt2, tiktoken_gpt2, name):
    with open(f"{DATA}/{name}", encoding="utf-8") as f:
        text = f.read()
    want = tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.encode_array(text).tolist() == want
    lines = text.splitlines()[:3000]
    assert gpt2.encode_batch(lines) == tiktoken_gpt2.encode_ordinary_batch(lines, num_threads=1)


def test_gpt2_ids_equal_tiktoken_on_edge_and_random_strings(gpt2, tiktoken_gpt2):
    """Random code points of every plane, unassigned ones and recent additions included: the
    pre-tokenizer's Unicode classes are pinned to tiktoken's version (kernels/unicode_classes)."""
    for s in EDGE + random_strings(1000, seed=10) + ["ab" * 300, " " * 500, "x" * 2000]:
        assert gpt2.encode(s) == tiktoken_gpt2.encode_ordinary(s), repr(s)


def test_gpt2_ids_equal_tiktoken_on_long_pieces(gpt2, tiktoken_gpt2):
    """Pre-tokens of 10^4..10^5 bytes (the in-place long-piece merge), one call for all and one
    each, through encode and encode_array."""
    rng = np.random.default_rng(13)
    texts = ["a" * 100_000, "ab" * 20_000, " " * 30_000 + "x", "9" * 25_000, "ña" * 8_000,
             "the" * 9_000, "!?." * 7_000, "".join(rng.choice(list("abcdefgh"), 50_000)),
             "日本" * 5_000]
    for s in texts:
        assert gpt2.encode_array(s).tolist() == tiktoken_gpt2.encode_ordinary(s), s[:12]
    joined = " ".join(texts)
    assert gpt2.encode(joined) == tiktoken_gpt2.encode_ordinary(joined)


def test_special_tokens_policy(gpt2, tiktoken_gpt2):
    s = f"one{EOT}two {EOT}"
    assert gpt2.encode(s) == tiktoken_gpt2.encode_ordinary(s)  # plain text by default
    assert EOT not in [gpt2.decode([i]) for i in gpt2.encode(s)]
    for allowed in ("all", {EOT}):
        assert gpt2.encode(s, allowed_special=allowed) == tiktoken_gpt2.encode(s, allowed_special="all")
    assert gpt2.encode(s, allowed_special="all").count(50256) == 2
    assert gpt2.encode_batch([s, "x"], allowed_special="all") == [
        gpt2.encode(s, allowed_special="all"), gpt2.encode("x")]
    with pytest.raises(ValueError, match="not special tokens"):
        gpt2.encode(s, allowed_special={"<|nope|>"})


def test_decode_matches_tiktoken_on_split_characters(gpt2, tiktoken_gpt2):
    ids = gpt2.encode("héllo 😀 日本")
    for cut in range(len(ids) + 1):
        for part in (ids[:cut], ids[cut:], ids[1:cut]):
            assert gpt2.decode(part) == tiktoken_gpt2.decode(part)
            assert gpt2.decode_bytes(part) == tiktoken_gpt2.decode_bytes(part)
    emoji = gpt2.encode("😀")
    assert len(emoji) > 1 and "\ufffd" in gpt2.decode(emoji[:1])


# ---------------------------------------------------------------- round trips, API

ROUND_TRIP = EDGE + ["", "\x00\x01\x02\x1b[31m", "a\u0300\u0301\u0302\u0303", "🏳️‍🌈🇫🇷",
                     "中文，标点。", "mixed 😀 ascii\r\n\ttabs", "\U0010FFFF\U000E0001", EOT]


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_round_trip(which, request):
    tok = request.getfixturevalue(which)
    for s in ROUND_TRIP + random_strings(500, seed=11, max_len=60):
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
        assert tok.decode_bytes(ids) == s.encode("utf-8")
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode([]) == "" and tok.encode("") == []


def test_array_and_batch_forms(gpt2):
    texts = ["hello world", "", "日本語 text", " spaces  "]
    ids = gpt2.encode_batch(texts)
    assert ids == [gpt2.encode(t) for t in texts]
    for dtype in (np.int32, np.int64):
        a = gpt2.encode_array(texts[2], dtype=dtype)
        assert a.dtype == dtype and a.tolist() == ids[2]
    assert gpt2.decode(np.array(ids[2], np.int64)) == texts[2]
    assert gpt2.encode_batch([]) == []


def test_bad_ids_and_inputs(gpt2):
    for bad in ([50257], [-1], [1.5], [[1, 2]]):
        with pytest.raises(ValueError):
            gpt2.decode(bad)
    with pytest.raises(ValueError, match="str"):
        gpt2.encode(b"bytes")
    with pytest.raises(ValueError, match="surrogate"):
        gpt2.encode("\ud800")


# ---------------------------------------------------------------- training

def test_training_layout_and_determinism(trained):
    assert trained.vocab_size == 600 and trained.eot_id == 599
    assert trained.tokens[:256] == [bytes([i]) for i in range(256)]
    with open(f"{DATA}/headlines.txt", encoding="utf-8") as f:
        again = Tokenizer.train(f.read(300_000), 600, progress=False)
    assert again.tokens == trained.tokens
    assert trained.tokens[256] in (b" t", b"e ", b" s", b"s ", b"in", b"er")  # plausible first merge


def test_training_equals_the_reference_twin():
    text = "".join(random_strings(200, seed=12)) + " the cat sat on the mat" * 20
    tok = Tokenizer.train(text, 256 + 80 + 1, progress=False, min_frequency=1)
    words = {}
    for p in regex.findall(PATTERN, text):
        w = tuple(p.encode())
        words[w] = words.get(w, 0) + 1
    merges = bpe_train.train_reference(words, 80, 256)
    tokens = [bytes([i]) for i in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    assert tok.tokens == tokens


def test_training_merges_are_capped_by_the_text():
    """The largest vocab_size on a tiny text: only the merges the text can give ("abab": 3 pair
    occurrences, so at most 3 merges), nothing allocated for the rest."""
    tok = Tokenizer.train("abab", MAX_VOCAB_SIZE, progress=False, min_frequency=1)
    assert tok.vocab_size == 256 + 2 + 1 and tok.tokens[256:] == [b"ab", b"abab"]
    assert Tokenizer.train("x", MAX_VOCAB_SIZE, progress=False).vocab_size == 257


def test_training_on_one_long_run():
    """A text that is one run of a letter: each merge doubles the token ('a' * 2**k). Building
    the tokenizer from such long tokens once tried every split of each (O(L^2) per token: a
    10 MB run took hours); tests/test_tokenizer_bounds.py trains on a 1 MB run under a timeout."""
    tok = Tokenizer.train("a" * 2**16, 300, progress=False)
    assert [len(t) for t in tok.tokens[256:]] == [2**k for k in range(1, 16)]
    assert tok.encode("a" * (2**16 + 3)) == [tok.vocab_size - 2] * 2 + [256, 97]  # 2**15 * 2 + 2 + 1


def test_training_input_forms_and_specials():
    lines = ["low lower lowest", "new newer newest", f"wide{EOT}wider widest"]
    a = Tokenizer.train(lines, 300, progress=False, min_frequency=1)
    b = Tokenizer.train(iter(lines), 300, progress=False, min_frequency=1)
    assert a.tokens == b.tokens
    assert not any(b"<|" in t or b"|>" in t for t in a.tokens)  # nothing learned across specials
    c = Tokenizer.train("aaaa bbbb", 400, special_tokens=("<|a|>", "<|b|>"), progress=False)
    assert c.vocab_size < 400 and c.special_tokens == {"<|a|>": c.vocab_size - 2,
                                                       "<|b|>": c.vocab_size - 1}
    assert c.eot_id is None
    assert c.encode("<|b|>aaaa", allowed_special="all")[0] == c.vocab_size - 1


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train("some text", 256, progress=False)
    for too_big in (MAX_VOCAB_SIZE + 1, 10**12, 10**30):  # refused before any work
        with pytest.raises(ValueError, match=f"vocab_size must be at most {MAX_VOCAB_SIZE}"):
            Tokenizer.train("some text", too_big, progress=False)
    with pytest.raises(ValueError, match="min_frequency must be an integer"):
        Tokenizer.train("some text", 300, progress=False, min_frequency=1.5)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train("", 300, progress=False)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([EOT, ""], 300, progress=False)
    with pytest.raises(ValueError, match="must be str"):
        Tokenizer.train([b"bytes"], 300, progress=False)


# ---------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path, trained, gpt2):
    for tok in (trained, gpt2):
        path = tmp_path / "tok.json"
        tok.save(path)
        back = Tokenizer.load(path)
        assert back.tokens == tok.tokens and back.special_tokens == tok.special_tokens
        assert back.to_json() == tok.to_json()
        s = "Round trip, ok? 😀"
        assert back.encode(s) == tok.encode(s)


def version1_json(tok):
    """The file an older minillm wrote (format "minillm-bpe", version 1), spelled out literally."""
    b2u = bytes_to_unicode()
    return {"format": "minillm-bpe", "version": 1, "pattern": GPT2_PATTERN,
            "tokens": ["".join(b2u[b] for b in t) for t in tok.tokens], "special_tokens": tok.special_tokens}


def test_version1_files_still_load(tmp_path, trained, gpt2):
    for tok in (trained, gpt2):
        path = tmp_path / "old.json"
        path.write_text(json.dumps(version1_json(tok), ensure_ascii=False), encoding="utf-8")
        back = Tokenizer.load(path)
        assert back.tokens == tok.tokens and back.special_tokens == tok.special_tokens
        assert back.to_json() == tok.to_json()   # saved again, in HF's format


def test_load_rejects_bad_files(tmp_path, trained):
    good = version1_json(trained)
    cases = {
        "{not json": "invalid JSON",
        json.dumps({**good, "version": 99}): "version 99 is not supported",
        json.dumps({**good, "format": "other"}): "not a tokenizer file",
        json.dumps([1, 2]): "not a tokenizer file",
        json.dumps({**good, "pattern": "x"}): "pattern",
        json.dumps({**good, "tokens": good["tokens"][:100]}): "256 single bytes",
        json.dumps({**good, "tokens": good["tokens"] + ["\u4e00"]}): "alphabet",
        json.dumps({**good, "tokens": good["tokens"] + ["zzzzqqqq"]}): "not the merge",
        json.dumps({**good, "special_tokens": {EOT: 5}}): "special token ids",
        json.dumps({**good, "tokens": 3}): "must be a list",
    }
    for i, (content, msg) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.json"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=msg):
            Tokenizer.load(path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "bin.json")
    with pytest.raises(ValueError, match="no such"):
        Tokenizer.load(tmp_path / "missing.json")


def test_gpt2_files_must_agree(tmp_path):
    with open(VOCAB, encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines[5], lines[6] = lines[6], lines[5]  # two merges swapped: ids no longer match
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="does not match id"):
        Tokenizer.from_gpt2_files(tmp_path / "vocab.bpe", ENCODER)


def test_read_text_file(tmp_path):
    (tmp_path / "ok.txt").write_text("héllo\n", encoding="utf-8")
    assert read_text_file(tmp_path / "ok.txt") == "héllo\n"
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "nul.txt").write_bytes(b"ab\x00cd")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for name, msg in (("missing.txt", "no such file"), ("", "is a directory"),
                      ("empty.txt", "empty"), ("nul.txt", "binary"), ("latin1.txt", "not UTF-8")):
        with pytest.raises(ValueError, match=msg):
            read_text_file(tmp_path / name)


# ---------------------------------------------------------------- CLI

def test_cli_train_encode_decode(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ate the log\n" * 50, encoding="utf-8")
    tok = str(tmp_path / "tok.json")
    code, _, err = run_cli(capsys, "tokenizer", "train", str(corpus), "--vocab-size", "270",
                           "--out", tok, "--quiet")
    assert code == 0 and "270 tokens" in err and Tokenizer.load(tok).vocab_size == 270
    code, out, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", tok, "the cat 😀")
    ids = [int(x) for x in out.split()]
    assert code == 0 and ids == Tokenizer.load(tok).encode("the cat 😀")
    code, out, _ = run_cli(capsys, "tokenizer", "decode", "--tokenizer", tok, *map(str, ids))
    assert code == 0 and out == "the cat 😀"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(" ".join(map(str, ids))))
    code, out, _ = run_cli(capsys, "tokenizer", "decode", "--tokenizer", tok, "-")
    assert out == "the cat 😀"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(f"a{EOT}"))
    code, out, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", tok, "--allow-special")
    assert out.split()[-1] == "269"


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    (tmp_path / "ok.txt").write_text("some text here", encoding="utf-8")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    train = ("tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "t.json"))
    cases = [
        (*train, str(tmp_path / "missing.txt")), (*train, str(tmp_path)),
        (*train, str(tmp_path / "empty.txt")), (*train, str(tmp_path / "bin.txt")),
        (*train, str(tmp_path / "latin.txt")),
        ("tokenizer", "train", str(tmp_path / "ok.txt"), "--vocab-size", "100", "--out", "x.json"),
        ("tokenizer", "train", str(tmp_path / "ok.txt"), "--vocab-size", str(10**12), "--out",
         "x.json"),
        ("tokenizer", "encode", "--tokenizer", str(tmp_path / "bad.json"), "hi"),
        ("tokenizer", "encode", "--tokenizer", str(tmp_path / "nope.json"), "hi"),
    ]
    for args in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 1 and out == "", args
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert not os.path.exists("x.json")


def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minillm", "tokenizer", "train",
                        str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out",
                        str(tmp_path / "t.json")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: no such file"
