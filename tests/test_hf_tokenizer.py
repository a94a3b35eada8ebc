"""hf_tokenizer.py / tokenizer_json.py: minillm's tokenizer.json files against Hugging Face `tokenizers` and
`transformers.AutoTokenizer` (same ids, same decode), HF's files (GPT-2's, built locally; a `tokenizers`-trained
byte-level BPE; vocab.json + merges.txt) read by minillm, and one clear error line for every setting minillm
cannot reproduce."""

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2Tokenizer

from clirun import run_cli
from minillm import hf_tokenizer
from minillm.char_tokenizer import CharTokenizer, load_tokenizer, tokenizer_from_json
from minillm.checkpoint import save_checkpoint
from minillm.tokenizer import EOT, Tokenizer
from test_kernels_bpe import DATA, EDGE, random_strings
from test_tokenizer import ENCODER, VOCAB, gpt2, tiktoken_gpt2  # noqa: F401 (fixtures)

SEP = "<|sep|>"
TRAIN_TEXT = ("The café's 3 naïve bakers won't sell 12,345 crêpes; we'll see. Ünïcödé ÆØÅ 日本語のテキスト "
              "한국어 Ελληνικά   spaces\t\ttabs\n\n\nnew lines 2024-01-02 I'm you're they've 😀👍🏽 ") * 40
TEXTS = EDGE + [
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🏳️‍🌈🇫🇷", "中文，标点。日本語 한국어", "e\u0301 a\u0300\u0301\u0302 n\u0303",
    "line one\r\nline two\r\n\r\n", " " * 60 + "x" + "\t" * 9 + "\n" * 7, "don't we'll I'M you'RE",
    f"one{EOT}two {EOT} three{EOT}", f"{EOT}{EOT}", f"a{SEP}b{EOT}", "<|endoftext", "12345678901 3.14159",
    "The café's naïve bakers won't sell crêpes.",
] + random_strings(300, seed=21)


@pytest.fixture(scope="module")
def trained():
    with open(os.path.join(DATA, "headlines.txt"), encoding="utf-8") as f:
        text = f.read(100_000)
    tok = Tokenizer.train([text, TRAIN_TEXT], 700, special_tokens=(EOT, SEP), progress=False)
    assert tok.vocab_size == 700
    return tok


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """GPT-2's tokenizer as transformers builds it from GPT-2's two released files (no network)."""
    with open(ENCODER, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(VOCAB, encoding="utf-8") as f:
        merges = [tuple(ln.split(" ")) for ln in f.read().split("\n")[1:] if ln]
    out = tmp_path_factory.mktemp("hf-gpt2")
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(out)
    return out


def save_with_companions(tok, directory):
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    for name, content in hf_tokenizer.companion_files(tok).items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)
    return directory


def split_ids(tok):
    """Id sequences that cut characters apart (decode must then agree on U+FFFD)."""
    ids = tok.encode("héllo 😀 日本 e\u0301")
    return [part for cut in range(len(ids) + 1) for part in (ids[:cut], ids[cut:], ids[1:cut])]


# ---------------------------------------------------------------- minillm's files in HF

@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_saved_file_gives_minillm_ids_in_tokenizers_and_auto_tokenizer(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    directory = save_with_companions(tok, tmp_path / which)
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(directory)
    for s in TEXTS:
        ids = tok.encode(s, allowed_special="all")   # HF's encode always reads added tokens as specials
        assert hf.encode(s).ids == ids, repr(s)
        assert auto(s)["input_ids"] == ids, repr(s)
        assert auto(s, split_special_tokens=True)["input_ids"] == tok.encode(s), repr(s)   # minillm's plain
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids) == auto.decode(ids)
    for part in split_ids(tok):
        assert hf.decode(part, skip_special_tokens=False) == tok.decode(part) == auto.decode(part)
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size == len(auto)
    assert auto.eos_token == EOT and auto.eos_token_id == tok.eot_id


def test_gpt2_file_equals_gpt2s_released_merges_and_tiktoken(gpt2, tiktoken_gpt2, tmp_path):
    gpt2.save(tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    with open(VOCAB, encoding="utf-8") as f:
        assert saved["model"]["merges"] == [ln for ln in f.read().split("\n")[1:] if ln]
    with open(ENCODER, encoding="utf-8") as f:
        assert saved["model"]["vocab"] == {s: i for s, i in json.load(f).items() if s != EOT}
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with open(os.path.join(DATA, "shakespeare.txt"), encoding="utf-8") as f:
        text = f.read()[:300_000]
    assert hf.encode(text).ids == tiktoken_gpt2.encode(text, allowed_special="all") == gpt2.encode(text)


def test_trained_file_layout(trained, tmp_path):
    """The settings HF needs, and merge i creating id 256 + i."""
    trained.save(tmp_path / "tok.json")
    d = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert d["normalizer"] is None and d["post_processor"] is None and d["decoder"]["type"] == "ByteLevel"
    split, byte_level = d["pre_tokenizer"]["pretokenizers"]
    assert split["behavior"] == "Isolated" and byte_level["add_prefix_space"] is False
    assert [(a["content"], a["id"], a["special"]) for a in d["added_tokens"]] == [(EOT, 698, True), (SEP, 699, True)]
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    assert len(vocab) == 698 and len(merges) == 698 - 256
    assert all(vocab[m.replace(" ", "")] == 256 + i for i, m in enumerate(merges))


# ---------------------------------------------------------------- HF's files in minillm

def test_transformers_gpt2_directory_loads(hf_gpt2, gpt2, tiktoken_gpt2):
    tok = hf_tokenizer.load_directory(hf_gpt2)
    assert isinstance(tok, Tokenizer) and tok.tokens == gpt2.tokens and tok.special_tokens == {EOT: 50256}
    hf = tokenizers.Tokenizer.from_file(str(hf_gpt2 / "tokenizer.json"))
    for s in TEXTS:
        assert tok.encode(s, allowed_special="all") == hf.encode(s).ids == tiktoken_gpt2.encode(
            s, allowed_special="all"), repr(s)


def test_vocab_json_and_merges_txt(hf_gpt2, gpt2, tmp_path):
    """GPT-2's slow-tokenizer pair, as `tokenizers` writes it (transformers 5's save_pretrained writes only
    tokenizer.json, so the pair comes from the model's own save)."""
    hf = tokenizers.Tokenizer.from_file(str(hf_gpt2 / "tokenizer.json"))
    hf.model.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
    tok = hf_tokenizer.load_directory(tmp_path)
    assert tok.tokens == gpt2.tokens and tok.special_tokens == {EOT: 50256}
    for s in TEXTS[:80]:
        assert tok.encode(s, allowed_special="all") == hf.encode(s).ids
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="merges.txt: no such file"):
        hf_tokenizer.load_directory(tmp_path)
    os.remove(tmp_path / "vocab.json")
    assert hf_tokenizer.load_directory(tmp_path) is None


def test_a_tokenizers_trained_byte_level_bpe_loads():
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TRAIN_TEXT], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_special_tokens([EOT])
    tok = hf_tokenizer.from_hf(json.loads(hf.to_str()))
    assert tok.vocab_size == hf.get_vocab_size() and tok.eot_id == hf.token_to_id(EOT)
    for s in TEXTS:
        ids = tok.encode(s, allowed_special="all")
        assert ids == hf.encode(s).ids and tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_round_trip_through_hf(which, request):
    """minillm -> HF object -> tokenizers -> its own serialisation -> minillm: the same tokenizer."""
    tok = request.getfixturevalue(which)
    hf = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer.to_hf(tok)))
    back = hf_tokenizer.from_hf(json.loads(hf.to_str()))
    assert back.tokens == tok.tokens and back.special_tokens == tok.special_tokens


def test_long_tokens(tmp_path):
    """Tokens of up to 4096 bytes (runs double with each merge): their merges come from the heap path."""
    tok = Tokenizer.train(["a" * 2**12, "ab" * 2**10, "x y" * 300], 300, progress=False)
    assert max(len(t) for t in tok.tokens) >= 2**11
    hf = tokenizers.Tokenizer.from_str(tok.to_json())
    for s in ("a" * 5000, "ab" * 3000 + "a", "ba" * 777, "x y" * 100 + "a" * 1025, " " + "a" * 4095):
        assert hf.encode(s).ids == tok.encode(s), s[:10]


def test_ignore_merges_and_tokens_no_merge_produces():
    """A token whose bytes rank-order BPE splits in three ('abcd' = 'ab' + 'cd', but 'bc' comes first) is
    produced by neither tokenizer and gets no merge; with HF's ignore_merges it would be taken whole."""
    tokens = [bytes([b]) for b in range(256)] + [b"bc", b"ab", b"cd", b"abcd"]
    tok = Tokenizer(tokens, {EOT: 260})
    obj = hf_tokenizer.to_hf(tok)
    assert len(obj["model"]["merges"]) == 3
    hf = tokenizers.Tokenizer.from_str(json.dumps(obj))
    for s in ("abcd", "abcdabcd", "xabcdy", "bcd abc cd ab"):
        assert tok.encode(s) == hf.encode(s).ids and 259 not in tok.encode(s)
    obj["model"]["ignore_merges"] = True
    with pytest.raises(ValueError, match="model.ignore_merges"):
        hf_tokenizer.from_hf(obj)


# ---------------------------------------------------------------- the char vocabulary

CHAR_TEXT = "Hello, wörld!\nSecond line\r\n\ttabs  and   spaces 日本語 é\u0301 😀 ÆØ 123\n"


def test_char_tokenizer_in_tokenizers_and_auto_tokenizer(tmp_path):
    tok = CharTokenizer.train(CHAR_TEXT)
    directory = save_with_companions(tok, tmp_path / "char")
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(directory)
    rng = np.random.default_rng(5)
    chars = sorted(set(CHAR_TEXT))
    texts = [CHAR_TEXT, "\r\n\r\n", "   ", f"Hello{EOT}wörld{EOT}", EOT, ""] + [
        "".join(rng.choice(chars, int(rng.integers(1, 80)))) for _ in range(100)]
    for s in texts:
        ids = tok.encode(s, allowed_special="all")
        assert hf.encode(s).ids == ids == auto(s)["input_ids"], repr(s)
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids) == auto.decode(ids) == s
    assert isinstance(load_tokenizer(directory / "tokenizer.json"), CharTokenizer)
    assert load_tokenizer(directory / "tokenizer.json").chars == tok.chars
    # documented difference: minillm refuses a character it has no token for, HF drops it
    with pytest.raises(ValueError, match="no token for 'Z'"):
        tok.encode("HZe")
    assert hf.encode("HZe").ids == tok.encode("He")


def test_checkpoint_directory_is_an_auto_tokenizer_directory(trained, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(out, {"wte": np.zeros((3, 2), np.float32)}, {"arch": "gpt", "context": 32}, tokenizer=trained)
    auto = AutoTokenizer.from_pretrained(out)
    assert auto.model_max_length == 32
    s = f"won't 12,345 😀{EOT}日本"
    assert auto(s)["input_ids"] == trained.encode(s, allowed_special="all")
    save_checkpoint(out, {"wte": np.ones((3, 2), np.float32)}, {"arch": "gpt", "context": 32})   # keeps both
    assert AutoTokenizer.from_pretrained(out)(s)["input_ids"] == trained.encode(s, allowed_special="all")
    assert hf_tokenizer.load_directory(out).tokens == trained.tokens


# ---------------------------------------------------------------- refusals: one line naming the key

def _gpt2_like(trained):
    return tokenizers.Tokenizer.from_str(trained.to_json())


def refusal_cases(trained, hf_gpt2):
    """(name, HF tokenizer.json object, the key the error must name); most are made by `tokenizers`."""
    base = json.loads(trained.to_json())
    gpt2_file = json.loads((hf_gpt2 / "tokenizer.json").read_text(encoding="utf-8"))

    def edit(obj, change):
        obj = json.loads(json.dumps(obj))
        change(obj)
        return obj

    def with_hf(change):
        t = _gpt2_like(trained)
        change(t)
        return json.loads(t.to_str())

    def set_normalizer(t):
        t.normalizer = tokenizers.normalizers.NFC()

    def set_bos(t):
        t.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, trained.eot_id)])

    def set_truncation(t):
        t.enable_truncation(16)

    def set_prefix_space(t):
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)

    def set_regex(t):
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(r"\w+|\W+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    unigram = tokenizers.Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, False))
    merges = base["model"]["merges"]
    char_file = json.loads(CharTokenizer.train("ab").to_json())
    return [
        ("an unknown key", {**base, "special_tokens": {}}, "special_tokens"),
        ("a normalizer", with_hf(set_normalizer), "normalizer"),
        ("another regex", with_hf(set_regex), "pre_tokenizer.pretokenizers[0].pattern"),
        ("add_prefix_space", with_hf(set_prefix_space), "pre_tokenizer.add_prefix_space"),
        ("GPT-2's file with add_prefix_space",
         edit(gpt2_file, lambda o: o["pre_tokenizer"].update(add_prefix_space=True)), "pre_tokenizer.add_prefix_space"),
        ("a BOS post-processor", with_hf(set_bos), "post_processor"),
        ("truncation", with_hf(set_truncation), "truncation"),
        ("WordPiece", json.loads(wordpiece.to_str()), "model.type"),
        ("Unigram", json.loads(unigram.to_str()), "model.type"),
        ("byte_fallback", edit(base, lambda o: o["model"].update(byte_fallback=True)), "model.byte_fallback"),
        ("dropout", edit(base, lambda o: o["model"].update(dropout=0.1)), "model.dropout"),
        ("a suffix", edit(base, lambda o: o["model"].update(end_of_word_suffix="</w>")), "model.end_of_word_suffix"),
        ("merges out of order", edit(base, lambda o: o["model"].update(
            merges=merges[:5] + [merges[6], merges[5]] + merges[7:])), "model.merges"),
        ("a merge missing", edit(base, lambda o: o["model"].update(merges=merges[:-1])), "model.merges"),
        ("no decoder", edit(base, lambda o: o.update(decoder=None)), "decoder"),
        ("lstrip special", edit(base, lambda o: o["added_tokens"][0].update(lstrip=True)), "added_tokens[0].lstrip"),
        ("a special among the merges", edit(base, lambda o: o["added_tokens"][0].update(id=300)), "added_tokens"),
        ("a byte missing", edit(base, lambda o: o["model"]["vocab"].pop("a")), "model.vocab"),
        ("a char vocabulary with unk", edit(char_file, lambda o: o["model"].update(unk_token="a")), "model.unk_token"),
        ("a char vocabulary with merges", edit(char_file, lambda o: o["model"].update(merges=["a b"])),
         "pre_tokenizer"),
    ]


def test_each_unsupported_setting_is_one_error_naming_the_key(trained, hf_gpt2, tmp_path, capsys):
    for name, obj, key in refusal_cases(trained, hf_gpt2):
        with pytest.raises(ValueError) as e:
            hf_tokenizer.from_hf(obj, where="tok.json")
        msg = str(e.value)
        assert msg.startswith(f"tok.json: {key}:") and "\n" not in msg, (name, msg)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(obj), encoding="utf-8")
        code, out, err = run_cli(capsys, "tokenizer", "encode", "--tokenizer", str(path), "hi")
        assert code == 1 and out == "" and err.startswith(f"error: {path}: {key}:") and err.count("\n") == 1, name


def test_tokenizer_config_that_adds_tokens_is_refused(trained, tmp_path):
    directory = save_with_companions(trained, tmp_path / "d")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    with pytest.raises(ValueError, match="tokenizer_config.json: add_bos_token: true"):
        hf_tokenizer.load_directory(directory)


def test_files_that_are_not_tokenizers(tmp_path):
    for content, msg in (("{", "invalid JSON"), ("[]", "not a JSON object"), ('{"a": 1}', "not a tokenizer file"),
                         ('{"version": "1.0", "model": 3}', "model: expected a JSON object")):
        with pytest.raises(ValueError, match=msg):
            tokenizer_from_json(content, where="x.json")
