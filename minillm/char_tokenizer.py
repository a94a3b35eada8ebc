"""A character-level vocabulary (`minillm train --tokenizer char`) and the tokenizer.json loader that
picks the class of a file.

- The vocabulary is every distinct character of the training text, in code-point order (ids 0..n-1),
  then the special tokens (`<|endoftext|>` = n).
- **Unseen characters are an error**: `encode` raises ValueError naming the first character that is
  not in the vocabulary (there is no byte fallback, so the vocabulary stays exactly the characters of
  the text; a model has nothing learned to say about a character it never saw). `train` builds the
  vocabulary from the whole training file, so its own text always encodes.
- Special-token text is plain text unless listed in `allowed_special` (as for the BPE tokenizer), and
  then needs its characters in the vocabulary only where it is not special.
- Files: Hugging Face `tokenizers`' tokenizer.json (model BPE over the characters, no merges, no
  pre-tokenizer, decoder Fuse, the specials as added tokens; minillm/tokenizer_json.py): HF gives the same
  ids for every text minillm encodes, but it drops a character outside the vocabulary where minillm
  refuses it. The version-1 JSON {"type": "char", "format": "minillm-char", "version": 1, "chars",
  "special_tokens"} still loads.

`load_tokenizer(path)` / `tokenizer_from_json(text)` read any tokenizer.json minillm reads
(tokenizer_json.parse: HF's format or minillm's version 1) and return the class its vocabulary is: a
CharTokenizer or the byte-level BPE `Tokenizer`. They live here for now because tokenizer.py is being
changed elsewhere; they belong in tokenizer.py as its module-level `load`.
"""

import os
import re

import numpy as np

from minillm import tokenizer_json
from minillm.fileio import atomic_write

EOT = "<|endoftext|>"


class CharTokenizer:
    """One token per character; the specials follow the characters."""

    def __init__(self, chars, special_tokens=None):
        chars = list(chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a char vocabulary is a list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("the characters of a char vocabulary must be distinct")
        special_tokens = dict({EOT: len(chars)} if special_tokens is None else special_tokens)
        n = len(chars)
        if not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError("special tokens must be non-empty strings")
        ids = special_tokens.values()
        if not all(type(i) is int for i in ids) or sorted(ids) != list(range(n, n + len(special_tokens))):
            raise ValueError(f"special token ids must be {n}, {n + 1}, ... (after the characters)")
        self.chars = chars
        self.special_tokens = special_tokens
        cps = np.array([ord(c) for c in chars], np.int64)
        self._order = np.argsort(cps, kind="stable")
        self._sorted = cps[self._order]
        self._cps = cps
        self._special_text = {i: s for s, i in special_tokens.items()}
        self._special_re = {}

    @classmethod
    def train(cls, chars, special_tokens=(EOT,)):
        """A vocabulary of the given characters (any iterable of them, or a str), in code-point order."""
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("the training text is empty")
        specials = list(dict.fromkeys(special_tokens))
        return cls(chars, {s: len(chars) + i for i, s in enumerate(specials)})

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self):
        return len(self.chars) + len(self.special_tokens)

    @property
    def eot_id(self):
        return self.special_tokens.get(EOT)

    # ------------------------------------------------------------ encoding
    def _encode_plain(self, text, dtype):
        if not isinstance(text, str):
            raise ValueError(f"can only encode str, not {type(text).__name__}")
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be encoded as UTF-8 (lone surrogate?): {e}") from None
        at = np.minimum(np.searchsorted(self._sorted, cps), max(len(self._sorted) - 1, 0))
        ok = self._sorted[at] == cps if len(self._sorted) else np.zeros(len(cps), bool)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            c = text[i]
            raise ValueError(f"the char tokenizer has no token for {c!r} (U+{ord(c):04X}, character {i} "
                             f"of the text): it only knows the {len(self.chars)} characters of its "
                             "training text")
        return self._order[at].astype(dtype)

    def _allowed(self, allowed_special):
        if allowed_special == "all":
            return tuple(sorted(self.special_tokens))
        if isinstance(allowed_special, str):
            allowed_special = (allowed_special,)
        allowed = tuple(sorted(set(allowed_special)))
        unknown = [s for s in allowed if s not in self.special_tokens]
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {', '.join(unknown)}")
        return allowed

    def encode_array(self, text, allowed_special=(), dtype=np.int32):
        """str -> ids as a NumPy array (int32 by default)."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_plain(text, dtype)
        if allowed not in self._special_re:
            alts = sorted(allowed, key=len, reverse=True)
            self._special_re[allowed] = re.compile("(" + "|".join(map(re.escape, alts)) + ")")
        parts = self._special_re[allowed].split(text)
        out = [self._encode_plain(p, dtype) if i % 2 == 0 else np.array([self.special_tokens[p]], dtype)
               for i, p in enumerate(parts)]
        return np.concatenate(out)

    def encode(self, text, allowed_special=()):
        """str -> list of ids; ValueError for a character outside the vocabulary."""
        return self.encode_array(text, allowed_special).tolist()

    def encode_batch(self, texts, allowed_special=()):
        """list of str -> list of lists of ids."""
        return [self.encode(t, allowed_special) for t in texts]

    def clear_cache(self):
        """Nothing is cached (here for the BPE tokenizer's interface)."""

    # ------------------------------------------------------------ decoding
    def decode_bytes(self, ids):
        """Ids -> the UTF-8 bytes of their characters (a special token: its text)."""
        a = np.asarray(ids)
        if a.size == 0:
            return b""
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise ValueError("token ids must be a flat sequence of integers")
        bad = (a < 0) | (a >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {a[bad][0]} is out of range (vocabulary size {self.vocab_size})")
        special = a >= len(self.chars)
        if not special.any():
            return self._cps[a].astype("<u4").tobytes().decode("utf-32-le").encode("utf-8")
        out, start = [], 0
        for i in np.flatnonzero(special).tolist():
            out += [self.decode_bytes(a[start:i]), self._special_text[int(a[i])].encode("utf-8")]
            start = i + 1
        out.append(self.decode_bytes(a[start:]))
        return b"".join(out)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8")

    # ------------------------------------------------------------ files
    def to_json(self):
        """The tokenizer as HF tokenizer.json text (deterministic; tokenizer_json.char_to_hf)."""
        return tokenizer_json.dumps(tokenizer_json.char_to_hf(self.chars, self.special_tokens))

    @classmethod
    def from_json(cls, s, where="tokenizer"):
        tok = tokenizer_from_json(s, where)
        if not isinstance(tok, cls):
            raise ValueError(f"{where}: a byte-level BPE tokenizer, not a char vocabulary")
        return tok

    def save(self, path):
        """Write the JSON file (UTF-8) atomically."""
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path):
        return cls.from_json(_read(path), where=os.fspath(path))


def _read(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a tokenizer file (not UTF-8 JSON)") from None


def tokenizer_from_json(s, where="tokenizer"):
    """Tokenizer JSON text (tokenizer_json.parse) -> CharTokenizer or the byte-level BPE Tokenizer."""
    return tokenizer_from_vocabulary(tokenizer_json.loads(s, where), where)


def tokenizer_from_vocabulary(vocab, where="tokenizer"):
    """A tokenizer_json.Vocabulary -> CharTokenizer (kind "char") or Tokenizer (kind "bpe")."""
    from minillm.tokenizer import Tokenizer

    cls = CharTokenizer if vocab.kind == "char" else Tokenizer
    try:
        return cls(vocab.items, vocab.special_tokens)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_tokenizer(path):
    """Read a tokenizer.json of either kind (see tokenizer_from_json)."""
    return tokenizer_from_json(_read(path), where=os.fspath(path))
