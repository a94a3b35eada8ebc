"""Byte-level BPE as in GPT-2: train, encode, decode, save, load.

Text is UTF-8 bytes cut into pre-tokens by GPT-2's regex; the 256 byte values are tokens 0..255
(any order: GPT-2 permutes them), and every further token is the concatenation of two tokens.

- Training merges, at each step, the adjacent pair with the highest count over the pre-tokens of
  the text; **ties go to the pair with the smallest (left id, right id)**. Merge i gets id 256 + i
  and the special tokens follow the merges. Special-token text found in the training text is cut
  out first (nothing is learned across it).
- Encoding follows tiktoken: inside a pre-token, repeatedly merge the adjacent pair whose
  concatenated bytes form the token of lowest id, leftmost first (so GPT-2's files give exactly
  tiktoken's `gpt2` ids).
- **Special tokens**: `encode(text)` treats special-token text such as "<|endoftext|>" as plain
  text (like tiktoken's `encode_ordinary`); `encode(text, allowed_special={"<|endoftext|>"})` or
  `allowed_special="all"` turns those occurrences into their special ids.
- **Unicode version**: the pre-tokenizer's \\p{L}, \\p{N} and \\s are those of Unicode 16.0.0 (the
  version of tiktoken's `gpt2` encoding), read from the generated table
  `minillm/kernels/unicode_classes.py` (made by `data/make_unicode_classes.py` from the Unicode
  Character Database 16.0.0), not from the installed `regex` module or Python's `unicodedata`:
  ids do not change when either is upgraded. A character assigned after 16.0 is an "other"
  character (like punctuation), as in tiktoken. Moving to another version changes ids; it means
  regenerating the table (and stating the new version).
- `decode` replaces bytes that are not valid UTF-8 (e.g. ids that split a character) with U+FFFD
  as tiktoken does; `decode_bytes` returns the raw bytes. Strings with lone surrogates cannot be
  encoded (they have no UTF-8 form): ValueError.
- Files: Hugging Face `tokenizers`' tokenizer.json (model BPE, vocab in GPT-2's byte-to-unicode
  strings, the merges rank-order BPE implies, GPT-2's split + ByteLevel, the specials as added tokens;
  minillm/tokenizer_json.py), so `tokenizers.Tokenizer.from_file` gives the same ids (HF's plain encode
  = `encode(text, allowed_special="all")`). `load` also reads minillm's version-1 JSON {"format":
  "minillm-bpe", "version": 1, "pattern", "tokens", "special_tokens"} and any HF byte-level BPE file
  whose settings it reproduces exactly (else one error line naming the setting).
"""

import json
import os

import numpy as np
import regex

from minillm import tokenizer_json
from minillm.fileio import atomic_write
from minillm.kernels import bpe, bpe_train
from minillm.kernels.bpe import categories
from minillm.tokenizer_json import bytes_to_unicode  # noqa: F401 (part of this module's API)

EOT = "<|endoftext|>"
MAX_VOCAB_SIZE = 2**24  # Tokenizer.train refuses more: 16,777,216 ids, ~80x GPT-4o's ~200k
_B2U = tokenizer_json.B2U


def read_text_file(path):
    """The contents of a UTF-8 text file; ValueError for a missing path, a directory, an empty
    file, a binary file (NUL bytes) or one that is not UTF-8."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a text file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path}: the file is empty")
    if b"\x00" in data:
        raise ValueError(f"{path}: looks like a binary file (it contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start})") from None


class Tokenizer:
    """A byte-level BPE vocabulary: `tokens[i]` is the bytes of id i; specials follow them."""

    def __init__(self, tokens, special_tokens=None):
        tokens = [bytes(t) for t in tokens]
        special_tokens = dict(special_tokens or {})
        if len(tokens) < 256 or sorted(tokens[:256]) != [bytes([b]) for b in range(256)]:
            raise ValueError("a BPE vocabulary starts with the 256 single bytes (ids 0..255)")
        first = {}
        for i, t in enumerate(tokens):
            first.setdefault(t, i)
        keys, vals = [], []
        # split points only where both halves have the length of some token: the tokens of a
        # long run ('a' * 2**k, ...) have few lengths, and trying every split of each was O(L^2)
        sizes = sorted({len(t) for t in tokens})
        size_set = set(sizes)
        for i in range(256, len(tokens)):
            t, ok = tokens[i], False
            for k in sizes:  # every split into two tokens merges into t
                if k >= len(t):
                    break
                if len(t) - k not in size_set:
                    continue
                x, y = first.get(t[:k]), first.get(t[k:])
                if x is not None and y is not None:
                    keys.append((x << 32) | y)
                    vals.append(i)
                    ok = ok or (x < i and y < i)
            if not ok:
                raise ValueError(f"token {i} ({t!r}) is not the merge of two earlier tokens")
        n = len(tokens)
        if not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError("special tokens must be non-empty strings")
        ids = special_tokens.values()
        if (not all(type(i) is int for i in ids)
                or sorted(ids) != list(range(n, n + len(special_tokens)))):
            raise ValueError(f"special token ids must be {n}, {n + 1}, ... (after the merges)")
        self.tokens = tokens
        self.special_tokens = special_tokens
        self._tk, self._tv = bpe.table_build(np.array(keys, np.int64), np.array(vals, np.int32))
        self._byte_to_id = np.zeros(256, np.int32)
        for i in range(256):
            self._byte_to_id[tokens[i][0]] = i
        every = tokens + [s.encode("utf-8") for s in sorted(special_tokens, key=special_tokens.get)]
        self._bytes = np.frombuffer(b"".join(every), np.uint8)
        self._off = np.cumsum([0] + [len(t) for t in every]).astype(np.int64)
        self._special_re = {}
        self._cache, self._cache_size = None, 1 << 16  # pre-token -> ids (bpe.new_cache)
        self._json = None  # to_json, made once (deriving GPT-2's merges takes ~1 s)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self):
        return len(self.tokens) + len(self.special_tokens)

    @property
    def eot_id(self):
        """Id of <|endoftext|>, or None when the tokenizer has none."""
        return self.special_tokens.get(EOT)

    # ------------------------------------------------------------ encoding
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

    def _encode_many(self, texts, allowed_special=()):
        """Flat int32 ids of all texts and the end of each text in them."""
        allowed = self._allowed(allowed_special)
        parts = []  # per text: list of str pieces and special ids
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"can only encode str, not {type(text).__name__}")
            if allowed:
                if allowed not in self._special_re:
                    alts = sorted(allowed, key=len, reverse=True)
                    self._special_re[allowed] = regex.compile("|".join(map(regex.escape, alts)))
                pos, p = 0, []
                for m in self._special_re[allowed].finditer(text):
                    p += [text[pos:m.start()], self.special_tokens[m.group()]]
                    pos = m.end()
                parts.append(p + [text[pos:]])
            else:
                parts.append([text])
        try:
            chunks = [s.encode("utf-8") for p in parts for s in p if isinstance(s, str)]
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be encoded as UTF-8 (lone surrogate?): {e}") from None
        buf = np.frombuffer(b"".join(chunks), np.uint8)
        ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)
        if self._cache is None or bpe.cache_full(self._cache):
            self._cache = bpe.new_cache(self._cache_size)
        c = self._cache
        ids, id_ends = bpe.encode(buf, ends, categories(), self._byte_to_id, self._tk, self._tv,
                                  c["slots"], c["ent"], c["keys"], c["vals"], c["use"])
        if not allowed:
            return ids, id_ends
        out, text_ends, item, start = [], [], 0, 0
        for p in parts:
            for s in p:
                if isinstance(s, str):
                    out.append(ids[start:id_ends[item]])
                    start = id_ends[item]
                    item += 1
                else:
                    out.append(np.array([s], np.int32))
            text_ends.append(sum(len(o) for o in out))
        return np.concatenate(out) if out else ids, np.array(text_ends, np.int64)

    def clear_cache(self):
        """Forget the cached pre-tokens (encode fills the cache again as it goes)."""
        self._cache = None

    def encode(self, text, allowed_special=()):
        """str -> list of ids. Special-token text is plain text unless listed in allowed_special
        (a set of special tokens, or "all")."""
        return self._encode_many([text], allowed_special)[0].tolist()

    def encode_array(self, text, allowed_special=(), dtype=np.int32):
        """Like encode, as a NumPy array (int32 by default, or int64)."""
        return self._encode_many([text], allowed_special)[0].astype(dtype, copy=False)

    def encode_batch(self, texts, allowed_special=()):
        """list of str -> list of lists of ids, in one pass."""
        ids, ends = self._encode_many(list(texts), allowed_special)
        return [a.tolist() for a in np.split(ids, ends[:-1])] if len(ends) else []

    # ------------------------------------------------------------ decoding
    def decode_bytes(self, ids):
        """Ids -> the raw bytes they stand for."""
        a = np.asarray(ids)
        if a.size == 0:
            return b""
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise ValueError("token ids must be a flat sequence of integers")
        bad = (a < 0) | (a >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {a[bad][0]} is out of range (vocabulary size "
                             f"{self.vocab_size})")
        return bpe.decode(a.astype(np.int64), self._bytes, self._off).tobytes()

    def decode(self, ids):
        """Ids -> str; bytes that are not valid UTF-8 become U+FFFD (as tiktoken does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------ training
    @classmethod
    def train(cls, text, vocab_size, special_tokens=(EOT,), progress=True, min_frequency=2):
        """Learn vocab_size - 256 - len(special_tokens) merges from a str or an iterable of str
        (each item pre-tokenized on its own). Stops early when no pair occurs min_frequency
        times, giving a smaller vocabulary. progress: a tqdm bar on stderr.

        vocab_size must be in 256 + len(special_tokens) .. MAX_VOCAB_SIZE (2**24), else
        ValueError before any work; within that, the merges are also capped by what the text
        can give (each merge removes at least one pair occurrence of the distinct pre-tokens),
        so memory stays bounded by the text whatever vocab_size asks."""
        specials = list(dict.fromkeys(special_tokens))
        if not all(isinstance(s, str) and s for s in specials):
            raise ValueError("special tokens must be non-empty strings")
        if (not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool)
                or vocab_size < 256 + len(specials)):
            raise ValueError(f"vocab_size must be at least {256 + len(specials)} (256 bytes + "
                             f"{len(specials)} special tokens), got {vocab_size!r}")
        if vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at most {MAX_VOCAB_SIZE} (2**24), got "
                             f"{vocab_size}")
        if not isinstance(min_frequency, (int, np.integer)) or isinstance(min_frequency, bool):
            raise ValueError(f"min_frequency must be an integer, got {min_frequency!r}")
        items = [text] if isinstance(text, str) else text
        cut = regex.compile("|".join(map(regex.escape, sorted(specials, key=len, reverse=True))))
        counts, batch, size, seen = {}, [], 0, False

        def flush():
            buf_bytes = b"".join(batch)
            buf = np.frombuffer(buf_bytes, np.uint8)
            ends = np.cumsum([len(b) for b in batch], dtype=np.int64)
            for o, n, c in zip(*(x.tolist() for x in bpe_train.count_pieces(buf, ends, categories()))):
                key = buf_bytes[o:o + n]
                counts[key] = counts.get(key, 0) + c
            batch.clear()

        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"training text must be str, not {type(item).__name__}")
            for piece in (cut.split(item) if specials else [item]):
                if piece:
                    seen = True
                    batch.append(piece.encode("utf-8"))
                    size += len(batch[-1])
            if size > 1 << 24:
                flush()
                size = 0
        flush()
        if not seen:
            raise ValueError("the training text is empty")
        words = [w for w in counts if len(w) > 1]  # may be none: "x", "a b c", ...
        sym = np.frombuffer(b"".join(words), np.uint8).astype(np.int32)
        wlen = np.array([len(w) for w in words], np.int32)
        wstart = np.cumsum(wlen, dtype=np.int64) - wlen  # one start per word, none for no word
        wfreq = np.array([counts[w] for w in words], np.int64)
        # no more merges than pair occurrences in the distinct words (bpe_train.train cuts too)
        n_merges = min(int(vocab_size) - 256 - len(specials), int(np.sum(wlen - 1, dtype=np.int64)))
        from tqdm import tqdm

        with tqdm(total=n_merges, desc="BPE merges", unit="merge", disable=not progress,
                  leave=False) as bar:
            a, b, _ = bpe_train.train(sym, wstart, wlen, wfreq, n_merges, 256, max(1, min_frequency),
                                on_progress=lambda done: bar.update(done - bar.n))
        tokens = [bytes([i]) for i in range(256)]
        for x, y in zip(a.tolist(), b.tolist()):
            tokens.append(tokens[x] + tokens[y])
        return cls(tokens, {s: len(tokens) + i for i, s in enumerate(specials)})

    # ------------------------------------------------------------ files
    @classmethod
    def from_gpt2_files(cls, vocab_bpe, encoder_json):
        """GPT-2's released vocab.bpe (merges) and encoder.json (ids); checked to agree."""
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        if not isinstance(encoder, dict):
            raise ValueError(f"{encoder_json}: expected a JSON object of token -> id")
        tokens = [None] * (256 + len(lines))
        for b in range(256):
            i = encoder.get(_B2U[b])
            if not isinstance(i, int) or not 0 <= i < 256 or tokens[i] is not None:
                raise ValueError(f"{encoder_json}: byte {b} must have a distinct id below 256")
            tokens[i] = bytes([b])
        for i, ln in enumerate(lines):
            pair = ln.split(" ")
            if len(pair) != 2 or encoder.get(pair[0] + pair[1]) != 256 + i:
                raise ValueError(f"{vocab_bpe}: merge {i + 1} ({ln!r}) does not match id "
                                 f"{256 + i} in {encoder_json}")
            tokens[256 + i] = _to_bytes(pair[0] + pair[1])
        specials = {s: i for s, i in encoder.items() if i >= len(tokens)}
        return cls(tokens, specials)

    def to_json(self):
        """The tokenizer as HF tokenizer.json text (deterministic; tokenizer_json.bpe_to_hf)."""
        if self._json is None:
            self._json = tokenizer_json.dumps(tokenizer_json.bpe_to_hf(self.tokens, self.special_tokens))
        return self._json

    @classmethod
    def from_json(cls, s, where="tokenizer"):
        """A byte-level BPE from tokenizer.json text of any format tokenizer_json.parse reads."""
        vocab = tokenizer_json.loads(s, where)
        if vocab.kind != "bpe":
            raise ValueError(f"{where}: a {vocab.kind} tokenizer, not a byte-level BPE (minillm.char_tokenizer."
                             "load_tokenizer reads either)")
        try:
            return cls(vocab.items, vocab.special_tokens)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, path):
        """Write the JSON file (UTF-8) atomically (minillm.fileio.atomic_write)."""
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such tokenizer file")
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a tokenizer file (not UTF-8 JSON)") from None
        return cls.from_json(text, where=path)


def _to_bytes(s):
    return tokenizer_json.token_bytes(s)
