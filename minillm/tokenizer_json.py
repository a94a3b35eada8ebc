"""tokenizer.json as plain data: Hugging Face `tokenizers`' format (written and read) and minillm's
version-1 formats (read), for the byte-level BPE (tokenizer.py) and the char vocabulary (char_tokenizer.py).

What minillm writes, loadable by `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer`:
- byte-level BPE: model BPE, vocab = GPT-2's byte-to-unicode string of each token -> id, merges (below);
  pre_tokenizer Sequence[Split(GPT-2's regex, Isolated), ByteLevel(add_prefix_space=false,
  use_regex=false)]; decoder ByteLevel; no normalizer, no post-processor.
- char vocabulary: model BPE whose vocab is the characters and which has no merges (so every character
  is its own token), no pre-tokenizer, decoder Fuse (the characters concatenated).
- both: the special tokens as added_tokens (special: true); minillm's own facts under model["minillm"]
  (`tokenizers` ignores unknown keys inside the model and refuses them at the top level).

**Merges.** minillm encodes as tiktoken does: merge the adjacent pair whose concatenation is the token of
lowest id. HF merges by the rank of the pair in its merge list. The two agree exactly when the list holds,
for each token t in id order, the split in which rank-order BPE over the tokens below t leaves t's bytes
(`canonical_merges`; what tiktoken -> HF converters derive): when minillm forms t, the parts it joins are
always that split. A token whose bytes end in 3+ parts is produced by neither and gets no merge. GPT-2's
merges are exactly these. Reading an HF file, the merges must be this list, else one error line.

`parse` refuses, in one line naming the key, every setting minillm cannot reproduce (a normalizer,
another pre-tokenizer regex, add_prefix_space, a post-processor that adds tokens, a model other than BPE,
dropout, byte_fallback, merges out of rank order, ...). HF's plain `encode` always turns added-token
text into the special ids: that is minillm's `encode(text, allowed_special="all")`.
"""

import heapq
import json
from dataclasses import dataclass

from minillm.kernels.bpe import GPT2_PATTERN
from minillm.kernels.unicode_classes import UNICODE_VERSION

FORMAT_VERSION = 2   # minillm's tokenizer files: 1 = "minillm-bpe" / "minillm-char" JSON, 2 = HF's format
# tiktoken's spelling of the same pattern ('s|'t|... as one group: no alternative is a prefix of another)
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the
    other 68 to chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


B2U = bytes_to_unicode()
U2B = {c: b for b, c in B2U.items()}


def token_string(t):
    """Token bytes -> GPT-2's byte-to-unicode string."""
    return "".join(B2U[b] for b in t)


def token_bytes(s):
    """GPT-2's byte-to-unicode string -> token bytes; ValueError for a character outside that alphabet."""
    if not isinstance(s, str) or any(c not in U2B for c in s):
        raise ValueError(f"token {s!r} is not in GPT-2's byte-to-unicode alphabet")
    return bytes(U2B[c] for c in s)


@dataclass
class Vocabulary:
    """What a tokenizer file holds. kind "bpe": items = token bytes per id; kind "char": one str per id.
    special_tokens: {text: id}, ids after the items."""
    kind: str
    items: list
    special_tokens: dict


# ---------------------------------------------------------------------------------------- writing

def canonical_merges(tokens):
    """tokens: bytes per id (the 256 single bytes first) -> [(left id, right id, id)] in id order: the
    split of each token that rank-order BPE over the lower ids ends with, for tokens it ends in two parts."""
    rank = {}
    for i, t in enumerate(tokens):
        rank.setdefault(t, i)
    out = []
    for i in range(256, len(tokens)):
        if rank[tokens[i]] == i:
            parts = _rank_order_bpe(tokens[i], rank, i)
            if len(parts) == 2:   # their only pair is the token itself, of rank i
                out.append((rank[parts[0]], rank[parts[1]], i))
    return out


def _rank_order_bpe(t, rank, limit):
    """The parts of bytes t after merging, while any is left, the adjacent pair whose concatenation is the
    token of lowest rank below `limit` (leftmost first). Long ones with a heap of (rank, start of the left
    part) and linked parts, O(L log L): a token may be long (a run of 'a' doubles with each merge)."""
    n = len(t)
    if n <= 64:   # short (nearly every token): rescanning is faster than the heap
        parts = [t[k:k + 1] for k in range(n)]
        while len(parts) > 1:
            best, at = limit, -1
            for k in range(len(parts) - 1):
                r = rank.get(parts[k] + parts[k + 1], limit)
                if r < best:
                    best, at = r, k
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        return parts
    end = list(range(1, n + 1))   # end[s]: end of the live part starting at s
    prev = list(range(-1, n - 1))
    heap = []

    def push(s):
        e = end[s]
        if e < n:
            r = rank.get(t[s:end[e]], limit)
            if r < limit:
                heapq.heappush(heap, (r, s, e, end[e]))

    for s in range(n - 1):
        push(s)
    while heap:
        _, s, e, f = heapq.heappop(heap)
        if end[s] != e or end[e] != f:   # stale: a part changed since the pair was pushed
            continue
        end[s], end[e] = f, -1
        if f < n:
            prev[f] = s
        push(s)
        if prev[s] >= 0:
            push(prev[s])
    parts, s = [], 0
    while s < n:
        parts.append(t[s:end[s]])
        s = end[s]
    return parts


def _added_tokens(special_tokens):
    return [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]


def hf_document(model, pre_tokenizer, decoder, special_tokens):
    """The whole tokenizer.json object around a model dict."""
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(special_tokens), "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


def _bpe_model(vocab, merges, kind):
    facts = {"tokenizer": kind, "format_version": FORMAT_VERSION}
    if kind == "bpe":
        facts["unicode_version"] = UNICODE_VERSION   # of the \p{L}, \p{N}, \s minillm's pre-tokenizer uses
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "minillm": facts, "vocab": vocab, "merges": merges}


def bpe_to_hf(tokens, special_tokens):
    """A byte-level BPE (token bytes per id, {special text: id}) -> HF tokenizer.json dict."""
    strings = [token_string(t) for t in tokens]
    seen = {}
    for i, s in enumerate(strings):
        if seen.setdefault(s, i) != i:
            raise ValueError(f"token {i} repeats token {seen[s]} ({tokens[i]!r}): a Hugging Face vocabulary "
                             "holds each token once")
    merges = [f"{strings[a]} {strings[b]}" for a, b, _ in canonical_merges(tokens)]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    decoder = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    model = _bpe_model({s: i for i, s in enumerate(strings)}, merges, "bpe")
    return hf_document(model, pre, decoder, special_tokens)


def char_to_hf(chars, special_tokens):
    """A char vocabulary (one str per id, {special text: id}) -> HF tokenizer.json dict."""
    model = _bpe_model({c: i for i, c in enumerate(chars)}, [], "char")
    return hf_document(model, None, {"type": "Fuse"}, special_tokens)


def dumps(obj):
    """The JSON text minillm writes (deterministic, UTF-8 characters as they are)."""
    return json.dumps(obj, ensure_ascii=False)


# ---------------------------------------------------------------------------------------- reading

def loads(text, where="tokenizer"):
    """JSON text of a tokenizer file -> Vocabulary (see parse)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a tokenizer file (invalid JSON: {e})") from None
    return parse(obj, where)


def parse(obj, where="tokenizer"):
    """A tokenizer.json object (HF's format or minillm's version 1) -> Vocabulary; ValueError naming the
    key minillm cannot reproduce."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: not a tokenizer file (not a JSON object)")
    if "model" not in obj:
        return _parse_v1(obj, where)
    return _HF(obj, where).vocabulary()


def _parse_v1(d, where):
    """minillm's version-1 files: {"format": "minillm-bpe", "pattern", "tokens", "special_tokens"} and
    {"type": "char", "format": "minillm-char", "chars", "special_tokens"}."""
    fmt = d.get("format")
    if fmt not in ("minillm-bpe", "minillm-char") or (fmt == "minillm-char") != (d.get("type") == "char"):
        raise ValueError(f"{where}: not a tokenizer file (neither Hugging Face's tokenizer.json, which has a "
                         "\"model\", nor minillm's older \"format\": \"minillm-bpe\" / \"minillm-char\")")
    if d.get("version") != 1:
        raise ValueError(f"{where}: tokenizer format version {d.get('version')!r} is not supported (this "
                         "minillm reads version 1 and Hugging Face's tokenizer.json)")
    items, specials = d.get("tokens" if fmt == "minillm-bpe" else "chars"), d.get("special_tokens")
    if not isinstance(items, list) or not isinstance(specials, dict):
        raise ValueError(f"{where}: the token list must be a list and \"special_tokens\" an object")
    if fmt == "minillm-char":
        return Vocabulary("char", items, specials)
    if d.get("pattern") != GPT2_PATTERN:
        raise ValueError(f"{where}: only GPT-2's pre-tokenizer pattern is supported")
    try:
        return Vocabulary("bpe", [token_bytes(t) for t in items], specials)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


_HF_KEYS = {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor",
            "decoder", "model"}


class _HF:
    """The checks of one HF tokenizer.json object; vocabulary() -> Vocabulary."""

    def __init__(self, d, where):
        self.d, self.where = d, where

    def refuse(self, key, why):
        raise ValueError(f"{self.where}: {key}: {why}")

    def get(self, obj, key, name):
        if not isinstance(obj, dict):
            self.refuse(name, f"expected a JSON object, got {type(obj).__name__}")
        return obj.get(key)

    def vocabulary(self):
        d = self.d
        unknown = sorted(set(d) - _HF_KEYS)
        if unknown:
            self.refuse(unknown[0], "not a key of Hugging Face's tokenizer.json (which `tokenizers` refuses)")
        if d.get("version") != "1.0":
            self.refuse("version", f"{d.get('version')!r} is not a tokenizer.json version this minillm reads "
                        "(\"1.0\")")
        for key in ("truncation", "padding"):
            if d.get(key) is not None:
                self.refuse(key, "is set: minillm's encode neither truncates nor pads, so its ids would differ")
        norm = d.get("normalizer")
        if norm is not None and not (self.get(norm, "type", "normalizer") == "Sequence"
                                     and norm.get("normalizers") == []):
            self.refuse("normalizer", f"{self.get(norm, 'type', 'normalizer')!r}: minillm applies no "
                        "normalizer, so its ids would differ")
        self.check_post_processor(d.get("post_processor"))
        model = d.get("model")
        if self.get(model, "type", "model") != "BPE":
            self.refuse("model.type", f"{model.get('type')!r}: minillm reads BPE models only")
        kind = "char" if d.get("pre_tokenizer") is None else "bpe"
        if kind == "bpe":
            self.check_pre_tokenizer(d["pre_tokenizer"])
        facts = model.get("minillm")
        if isinstance(facts, dict):
            if facts.get("tokenizer", kind) != kind:
                self.refuse("model.minillm.tokenizer", f"says {facts['tokenizer']!r} but the file is a {kind} "
                            "tokenizer")
            if not isinstance(facts.get("format_version", 2), int) or facts.get("format_version", 2) > FORMAT_VERSION:
                self.refuse("model.minillm.format_version", f"{facts.get('format_version')!r}: written by a newer "
                            f"minillm (this one reads {FORMAT_VERSION}); upgrade minillm")
        decoder = self.get(d.get("decoder") or {}, "type", "decoder")
        want = "ByteLevel" if kind == "bpe" else "Fuse"
        if decoder != want:
            self.refuse("decoder", f"{decoder!r}: minillm decodes a {kind} tokenizer as HF's {want} decoder does")
        self.check_model_options(model, kind)
        strings, specials = self.split_vocab(model)
        merges = self.merge_list(model.get("merges"))
        if kind == "char":
            if merges:
                self.refuse("pre_tokenizer", "null with merges: minillm reads byte-level BPE (GPT-2's split + "
                            "ByteLevel) or a character vocabulary (no merges)")
            bad = next((s for s in strings if len(s) != 1), None)
            if bad is not None:
                self.refuse("model.vocab", f"{bad!r} is not one character (a tokenizer without pre-tokenizer and "
                            "merges is read as minillm's char vocabulary)")
            return Vocabulary("char", strings, specials)
        try:
            tokens = [token_bytes(s) for s in strings]
        except ValueError as e:
            self.refuse("model.vocab", str(e))
        if len(tokens) < 256 or sorted(tokens[:256]) != [bytes([b]) for b in range(256)]:
            self.refuse("model.vocab", "a byte-level BPE vocabulary has the 256 single bytes as ids 0..255")
        want = canonical_merges(tokens)
        self.check_merges(merges, [(strings[a], strings[b]) for a, b, _ in want], strings)
        if model.get("ignore_merges") and len(want) != len(tokens) - 256:
            self.refuse("model.ignore_merges", "true with tokens that no merge produces: HF would take such a "
                        "token whole where minillm splits it")
        return Vocabulary("bpe", tokens, specials)

    def check_post_processor(self, p):
        if p is None:
            return
        kind = self.get(p, "type", "post_processor")
        if kind == "ByteLevel":   # moves offsets only
            return
        if kind == "TemplateProcessing" and p.get("single") == [{"Sequence": {"id": "A", "type_id": 0}}]:
            return
        self.refuse("post_processor", f"{kind!r} may add tokens (a BOS, an EOS) that minillm's encode does not "
                    "add; only none, ByteLevel or a TemplateProcessing whose single is \"$A\" are read")

    def check_pre_tokenizer(self, p):
        kind = self.get(p, "type", "pre_tokenizer")
        if kind == "ByteLevel":   # GPT-2's files: ByteLevel splits with GPT-2's regex itself
            self.check_byte_level(p, "pre_tokenizer", use_regex=True)
            return
        steps = p.get("pretokenizers") if kind == "Sequence" else None
        if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps)
                and [s.get("type") for s in steps] == ["Split", "ByteLevel"]):
            self.refuse("pre_tokenizer", f"{kind!r}: minillm reads GPT-2's split (ByteLevel with use_regex, or "
                        "Sequence[Split, ByteLevel]) or no pre-tokenizer (a char vocabulary)")
        split = steps[0]
        pattern = self.get(split.get("pattern"), "Regex", "pre_tokenizer.pretokenizers[0].pattern")
        if pattern not in (GPT2_PATTERN, TIKTOKEN_GPT2_PATTERN):
            self.refuse("pre_tokenizer.pretokenizers[0].pattern", f"{pattern!r} is not GPT-2's regex, the only "
                        "one minillm's pre-tokenizer follows")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            self.refuse("pre_tokenizer.pretokenizers[0].behavior", f"{split.get('behavior')!r} (invert "
                        f"{split.get('invert')!r}): minillm keeps every match as a piece (Isolated, not inverted)")
        self.check_byte_level(steps[1], "pre_tokenizer.pretokenizers[1]", use_regex=False)

    def check_byte_level(self, p, name, use_regex):
        if p.get("add_prefix_space", True):   # HF's default is true
            self.refuse(f"{name}.add_prefix_space", "true: HF would put a space before the text, minillm does not")
        if p.get("use_regex", True) != use_regex:
            self.refuse(f"{name}.use_regex", f"{p.get('use_regex', True)!r}: GPT-2's split would be "
                        f"{'missing' if use_regex else 'applied twice'}")

    def check_model_options(self, m, kind):
        if m.get("dropout") not in (None, 0, 0.0):
            self.refuse("model.dropout", f"{m['dropout']!r}: BPE dropout makes ids random; minillm's are not")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if m.get(key) not in (None, ""):
                self.refuse(f"model.{key}", f"{m[key]!r}: byte-level BPE has none")
        if m.get("byte_fallback"):
            self.refuse("model.byte_fallback", "true: minillm's tokenizers have no <0xNN> byte tokens")
        if kind == "char" and m.get("unk_token") is not None:
            self.refuse("model.unk_token", f"{m['unk_token']!r}: HF would give unseen characters this token, "
                        "minillm's char tokenizer refuses them")

    def split_vocab(self, m):
        """-> (token strings by id, {special: id}); the added tokens follow the vocabulary."""
        vocab, added = m.get("vocab"), self.d.get("added_tokens") or []
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in vocab.values()):
            self.refuse("model.vocab", "expected an object of token -> integer id")
        if not isinstance(added, list):
            self.refuse("added_tokens", "expected a list")
        specials = {}
        for k, a in enumerate(added):
            name = f"added_tokens[{k}]"
            content, i = self.get(a, "content", name), a.get("id")
            if not isinstance(content, str) or not content or not isinstance(i, int) or isinstance(i, bool):
                self.refuse(name, "needs a non-empty \"content\" and an integer \"id\"")
            for key in ("single_word", "lstrip", "rstrip"):
                if a.get(key):
                    self.refuse(f"{name}.{key}", f"true for {content!r}: minillm matches special tokens exactly")
            if specials.setdefault(content, i) != i:
                self.refuse(name, f"{content!r} is listed twice")
        by_id = {}
        for s, i in vocab.items():
            if s in specials:   # GPT-2's files list <|endoftext|> in the vocab too
                if specials[s] != i:
                    self.refuse("added_tokens", f"{s!r} has id {specials[s]} but model.vocab gives it {i}")
                continue
            if by_id.setdefault(i, s) != s:
                self.refuse("model.vocab", f"id {i} is given to {by_id[i]!r} and {s!r}")
        n = len(by_id)
        if sorted(by_id) != list(range(n)):
            self.refuse("model.vocab", f"the ids of the {n} tokens are not 0..{n - 1}")
        if sorted(specials.values()) != list(range(n, n + len(specials))):
            self.refuse("added_tokens", f"the ids must follow the vocabulary ({n}, {n + 1}, ...): minillm puts "
                        "special tokens after the merges")
        return [by_id[i] for i in range(n)], specials

    def merge_list(self, merges):
        if not isinstance(merges, list):
            self.refuse("model.merges", "expected a list")
        out = []
        for k, m in enumerate(merges):
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                self.refuse("model.merges", f"entry {k} ({m!r}) is not a pair of tokens")
            out.append(tuple(pair))
        return out

    def check_merges(self, got, want, strings):
        if got == want:
            return
        k = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        shown = lambda ms: " ".join(ms[k]) if k < len(ms) else "nothing"   # noqa: E731
        self.refuse("model.merges", f"merge {k} is {shown(got)!r} where minillm's rank-order BPE (the token "
                    f"of lowest id first, as tiktoken) needs {shown(want)!r} ({len(got)} merges, {len(want)} "
                    "expected): the ids would differ")

