"""char_tokenizer.py: the character vocabulary, its unseen-character policy, files, the type dispatch, and
`minillm train --tokenizer char` + `minillm sample` through the CLI."""

import json
import os

import numpy as np
import pytest

from clirun import run_cli
from minillm.char_tokenizer import CharTokenizer, load_tokenizer, tokenizer_from_json

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "data", "shakespeare_lines.txt")


def test_vocabulary_is_the_characters_in_code_point_order_then_eot():
    tok = CharTokenizer.train("hello wörld €")
    assert tok.chars == sorted(set("hello wörld €")) and tok.vocab_size == len(tok.chars) + 1
    assert tok.eot_id == len(tok.chars) and tok.special_tokens == {"<|endoftext|>": tok.eot_id}
    ids = tok.encode("wörld € hello")
    assert ids == [tok.chars.index(c) for c in "wörld € hello"]
    assert tok.decode(ids) == "wörld € hello" and tok.decode_bytes(ids) == "wörld € hello".encode()
    np.testing.assert_array_equal(tok.encode_array("he"), np.array(ids[-5:-3], np.int32))
    assert tok.encode_batch(["he", "", "lo"]) == [tok.encode("he"), [], tok.encode("lo")]
    assert tok.decode([tok.eot_id, *tok.encode("ol"), tok.eot_id]) == "<|endoftext|>ol<|endoftext|>"


def test_unseen_characters_are_an_error_naming_the_character():
    tok = CharTokenizer.train("abc ")
    with pytest.raises(ValueError, match=r"no token for 'Z' \(U\+005A, character 3"):
        tok.encode("ab Z")
    with pytest.raises(ValueError, match="U\\+1F600"):
        tok.encode("\U0001F600")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_special_tokens_are_plain_text_unless_allowed():
    tok = CharTokenizer.train("ab<|endoftx>")
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [*tok.encode("a"), tok.eot_id, *tok.encode("b")]
    assert len(tok.encode("a<|endoftext|>b")) == 15     # its characters are in the vocabulary here
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("a", allowed_special={"<|pad|>"})


def test_save_load_and_the_type_dispatch(tmp_path):
    from minillm.tokenizer import Tokenizer

    tok = CharTokenizer.train("the quick brown fox\n")
    tok.save(tmp_path / "char.json")
    back = load_tokenizer(tmp_path / "char.json")
    assert isinstance(back, CharTokenizer) and back.to_json() == tok.to_json()
    assert json.loads((tmp_path / "char.json").read_text())["model"]["minillm"]["tokenizer"] == "char"
    bpe = Tokenizer.train("the quick brown fox " * 20, 270, progress=False)
    bpe.save(tmp_path / "bpe.json")
    assert isinstance(load_tokenizer(tmp_path / "bpe.json"), Tokenizer)
    with pytest.raises(ValueError, match="model.type: 'WordPiece'"):
        tokenizer_from_json(json.dumps({**json.loads(tok.to_json()), "model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="not a tokenizer file"):
        tokenizer_from_json('{"type": "wordpiece"}')
    version1 = {"type": "char", "format": "minillm-char", "version": 1, "chars": tok.chars,
                "special_tokens": tok.special_tokens}   # an older minillm's file
    assert tokenizer_from_json(json.dumps(version1)).to_json() == tok.to_json()
    with pytest.raises(ValueError, match="distinct"):
        tokenizer_from_json(json.dumps({**version1, "chars": ["a", "a"]}))
    with pytest.raises(ValueError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


def test_train_char_and_sample_through_the_cli(capsys, tmp_path):
    corpus = tmp_path / "verse.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:400]), encoding="utf-8")
    out = str(tmp_path / "out")
    code, _, err = run_cli(capsys, "train", str(corpus), "--tokenizer", "char", "--documents", "file",
                           "--context", "16", "--layers", "1", "--heads", "2", "--d-model", "16",
                           "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--out", out, "--quiet")
    assert code == 0, err
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert isinstance(tok, CharTokenizer) and "\n" in tok.chars     # --documents file keeps the newlines
    assert set(tok.chars) == set(corpus.read_text(encoding="utf-8"))
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == tok.vocab_size
    code, lines, err = run_cli(capsys, "sample", "--checkpoint", out, "-n", "3", "--prompt", "the",
                               "--max-tokens", "10", "--seed", "1")
    assert code == 0, err
    assert len(lines.splitlines()) == 3 and all(ln.startswith("the") for ln in lines.splitlines())
    code, _, err = run_cli(capsys, "sample", "--checkpoint", out, "--prompt", "\u00e6on")
    assert code == 1 and "error: the char tokenizer has no token for 'æ'" in err
    code, ids, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", os.path.join(out, "tokenizer.json"),
                           "the")
    assert code == 0 and ids.split() == [str(i) for i in tok.encode("the")]
