r"""Make minillm/kernels/unicode_classes.py: the Unicode classes of GPT-2's pre-tokenizer pattern.

    pip install unicodedata2==16.0.0     # the Unicode Character Database 16.0.0, for any Python
    python data/make_unicode_classes.py > minillm/kernels/unicode_classes.py

The pre-tokenizer (minillm/kernels/bpe.py) needs three classes of code points: \p{L} (General
Category Lu, Ll, Lt, Lm or Lo), \p{N} (Nd, Nl or No) and \s (the White_Space property). They are
pinned to one Unicode version, UNICODE_VERSION below (the one tiktoken's `gpt2` encoding uses), so
that token ids do not change with the installed `regex` module. The general categories come from
`unicodedata2` of exactly that version (Python's own `unicodedata` is whatever the interpreter
carries: 14.0.0 in Python 3.11); White_Space comes from the UCD's PropList.txt, written out below
(unicodedata has no White_Space; the list has been the same 25 code points since Unicode 6.3).
The output is deterministic: the same version gives the same file, byte for byte.
"""

import importlib.metadata
import sys

UNICODE_VERSION = "16.0.0"
# PropList.txt (Unicode 16.0.0), property White_Space
WHITE_SPACE = ((0x0009, 0x000D), (0x0020, 0x0020), (0x0085, 0x0085), (0x00A0, 0x00A0),
               (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F),
               (0x205F, 0x205F), (0x3000, 0x3000))


def ranges(pred):
    """Inclusive (first, last) runs of the code points 0..0x10FFFF for which pred(cp) holds."""
    out, start = [], None
    for cp in range(0x110001):
        ok = cp < 0x110000 and pred(cp)
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            out.append((start, cp - 1))
            start = None
    return tuple(out)


def _rows(rs, per_line=4):
    cells = [f"(0x{a:05X}, 0x{b:05X})," for a, b in rs]
    return "".join("    " + " ".join(cells[i:i + per_line]) + "\n"
                   for i in range(0, len(cells), per_line))


def render(ucd):
    """The text of unicode_classes.py from a unicodedata-like module `ucd` (of UNICODE_VERSION)."""
    if ucd.unidata_version != UNICODE_VERSION:
        raise SystemExit(f"need the Unicode Character Database {UNICODE_VERSION}, got "
                         f"{ucd.unidata_version} (pip install unicodedata2=={UNICODE_VERSION})")
    letter = ranges(lambda cp: ucd.category(chr(cp)) in ("Lu", "Ll", "Lt", "Lm", "Lo"))
    number = ranges(lambda cp: ucd.category(chr(cp)) in ("Nd", "Nl", "No"))
    try:
        source = f"{ucd.__name__} {importlib.metadata.version(ucd.__name__)}"
    except importlib.metadata.PackageNotFoundError:
        source = f"{ucd.__name__} (unidata_version {ucd.unidata_version})"
    return (
        f'r"""Unicode {UNICODE_VERSION} classes of GPT-2\'s pre-tokenizer pattern (generated: do not '
        f'edit).\n\nMade by `python data/make_unicode_classes.py` from {source} (the Unicode '
        f"Character\nDatabase {UNICODE_VERSION}): LETTER = \\p{{L}} (General Category Lu Ll Lt Lm "
        f"Lo), NUMBER = \\p{{N}} (Nd Nl No),\nSPACE = \\s (White_Space, PropList.txt). Each is a "
        f'tuple of inclusive (first, last) code points.\n"""\n\n'
        f'UNICODE_VERSION = "{UNICODE_VERSION}"\n'
        f'SOURCE = "{source}"\n\n'
        f"LETTER = (  # {len(letter)} ranges, {sum(b - a + 1 for a, b in letter)} code points\n"
        f"{_rows(letter)})\n\n"
        f"NUMBER = (  # {len(number)} ranges, {sum(b - a + 1 for a, b in number)} code points\n"
        f"{_rows(number)})\n\n"
        f"SPACE = (  # {len(WHITE_SPACE)} ranges, {sum(b - a + 1 for a, b in WHITE_SPACE)} code "
        f"points\n{_rows(WHITE_SPACE)})\n")


if __name__ == "__main__":
    import unicodedata2

    sys.stdout.write(render(unicodedata2))
