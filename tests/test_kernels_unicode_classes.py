"""The pre-tokenizer's Unicode classes: pinned to one stated version by a generated table
(minillm/kernels/unicode_classes.py), equal to tiktoken's, whatever Unicode `regex` carries."""

import importlib.util
import os

import numpy as np
import pytest
import regex
import tiktoken

from minillm import tokenizer
from minillm.kernels import bpe, unicode_classes
from minillm.kernels.bpe import LETTER, NUMBER, OTHER, SPACE, categories
from test_kernels_bpe import PATTERN, pieces
from test_tokenizer import ROOT, gpt2, tiktoken_gpt2  # noqa: F401 (fixtures)

STATED = "16.0.0"  # README, tokenizer.py and kernels/bpe.py say so
CJK_EXT_J = "\U00032ABC"  # Lo since Unicode 17.0 (CJK Unified Ideographs Extension J)
TOLONG_SIKI_DIGIT = "\U00011DE0"  # Nd since Unicode 17.0
GARAY_LETTER = "\U00010D4A"  # Lo since Unicode 16.0


def test_table_states_its_version_and_is_well_formed():
    assert unicode_classes.UNICODE_VERSION == bpe.UNICODE_VERSION == STATED
    assert STATED in unicode_classes.SOURCE and STATED in unicode_classes.__doc__
    assert f"Unicode {STATED}" in tokenizer.__doc__ and f"Unicode {STATED}" in bpe.__doc__
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f"Unicode {STATED}" in f.read()
    seen = np.zeros(0x110000, np.int8)
    for rs in (unicode_classes.LETTER, unicode_classes.NUMBER, unicode_classes.SPACE):
        flat = [x for r in rs for x in r]
        assert flat == sorted(flat) and all(a <= b for a, b in rs)  # sorted, disjoint runs
        assert 0 <= flat[0] and flat[-1] <= 0x10FFFF
        for a, b in rs:
            seen[a:b + 1] += 1
    assert seen.max() == 1  # the three classes are disjoint
    cats = categories()
    assert np.count_nonzero(cats == LETTER) == 141028  # Unicode 16.0.0: \p{L}
    assert np.count_nonzero(cats == NUMBER) == 1911  # \p{N}
    assert np.count_nonzero(cats == SPACE) == 25  # White_Space


def test_table_is_what_the_generator_makes():
    """Regenerate from the Unicode Character Database of the stated version, when installed
    (pip install unicodedata2==16.0.0); the committed file must be the generator's output."""
    ucd = pytest.importorskip("unicodedata2")
    if ucd.unidata_version != STATED:
        pytest.skip(f"unicodedata2 carries Unicode {ucd.unidata_version}, not {STATED}")
    spec = importlib.util.spec_from_file_location(
        "make_unicode_classes", os.path.join(ROOT, "data", "make_unicode_classes.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(unicode_classes.__file__, encoding="utf-8") as f:
        assert gen.render(ucd) == f.read()


def tiktoken_class(pattern):
    """The code points that tiktoken's regex engine puts in `pattern` (a one-character class):
    an encoding that only keeps the text its pattern matches, over every code point."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    enc = tiktoken.Encoding("class-probe", pat_str=pattern,
                            mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    kept = enc.decode_bytes(enc.encode_ordinary(every)).decode("utf-8")
    return np.array(sorted(map(ord, kept)), np.int64)


@pytest.mark.parametrize("cat, pattern", [(LETTER, r"\p{L}"), (NUMBER, r"\p{N}"), (SPACE, r"\s")])
def test_classes_equal_tiktokens(cat, pattern):
    """Every code point is classified as the installed tiktoken classifies it. If this fails
    after a tiktoken upgrade, tiktoken moved to another Unicode version: regenerate the table
    for it (data/make_unicode_classes.py) and update the stated version."""
    ours = np.flatnonzero(categories() == cat)
    ours = ours[(ours < 0xD800) | (ours >= 0xE000)]
    assert np.array_equal(ours, tiktoken_class(pattern))


def test_characters_added_after_the_stated_version_are_other(gpt2, tiktoken_gpt2):  # noqa: F811
    cats = categories()
    assert cats[ord(GARAY_LETTER)] == LETTER  # new in 16.0: in
    assert cats[ord(CJK_EXT_J)] == OTHER and cats[ord(TOLONG_SIKI_DIGIT)] == OTHER  # 17.0: out
    for s in (f"a{CJK_EXT_J}b", f" {CJK_EXT_J}{CJK_EXT_J}", f"x1{TOLONG_SIKI_DIGIT}2",
              f"{GARAY_LETTER}a {GARAY_LETTER}"):
        assert gpt2.encode(s) == tiktoken_gpt2.encode_ordinary(s)
        assert pieces(s) == regex.findall(PATTERN, s)
    # the installed regex may carry a later Unicode (18.0 in regex 2026.11), where the Ext. J
    # ideograph is a letter: the pinned tables do not follow it
    if regex.match(r"\p{L}", CJK_EXT_J):
        assert pieces(f"a{CJK_EXT_J}b") != regex.findall(bpe.GPT2_PATTERN, f"a{CJK_EXT_J}b")
