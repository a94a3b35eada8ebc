"""textfile.py: the streaming check (same verdicts as tokenizer.read_text_file), pieces, the sample."""

import hashlib

import pytest

from minillm import textfile
from minillm.tokenizer import read_text_file


@pytest.mark.parametrize("content", [b"", b"ok\x00binary", b"caf\xe9 au lait\n", b"x" * 10 + b"\xff" + b"y" * 20,
                                     b"abc" * 5 + "é".encode() + b"\xe2\x82", b"\xe2\x82" + b"\x00",
                                     b"a" * 7 + "€".encode() + b"b" * 30])
def test_check_agrees_with_read_text_file(tmp_path, content):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    try:
        read_text_file(path)
        want = None
    except ValueError as e:
        want = str(e)
    try:   # chunks of 8 bytes: multi-byte characters and bad bytes straddle the chunk boundaries
        info = textfile.check(path, chunk=8)
        got = None
    except ValueError as e:
        got = str(e)
    assert got == want
    if want is None:
        assert info.size == len(content) and info.sha256 == hashlib.sha256(content).hexdigest()


def test_check_missing_and_directory(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        textfile.check(tmp_path / "none.txt")
    with pytest.raises(ValueError, match="directory"):
        textfile.check(tmp_path)


def test_pieces_join_to_the_text_and_end_at_safe_places(tmp_path):
    text = "Ünïcode line one\nline  two \n\n€uro 42\r\nlast" * 40
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    for documents in textfile.DOCUMENTS:
        parts = list(textfile.pieces(path, documents, chunk=64))
        assert "".join(parts) == text and len(parts) > 10
        if documents == "lines":
            assert all(p.endswith("\n") for p in parts[:-1])
        else:
            assert all(not p[-1].isspace() and q[0] in " \n" for p, q in zip(parts, parts[1:]))
    lines = [d for p in textfile.pieces(path, "lines", chunk=64) for d in textfile.lines(p)]
    assert lines == textfile.lines(text)


def test_sample_cuts_at_a_line_end(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\nsecond line\nthird\n")

    def sample(*args, **kw):
        items, truncated = textfile.sample(path, *args, **kw)
        return list(items), truncated

    assert sample(1000) == (["first line", "second line", "third"], False)
    assert sample(15) == sample(15, chunk=4) == (["first line"], True)
    assert sample(15, "file") == (["first line"], True)
    assert sample(9, "file", chunk=2) == (["first"], True)
    path.write_text("\u00e9\u00e9\u00e9")
    assert sample(3, "file") == (["\u00e9"], True)    # no safe cut: up to the split character
    assert sample(2, "file") == sample(2) == (["\u00e9"], True)
    path.write_text("first line\nsecond line\nthird\n")
    assert textfile.distinct_characters(path) == set("first line second third")
    assert "\n" in textfile.distinct_characters(path, "file")
