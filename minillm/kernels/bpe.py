"""Byte-level BPE encoding hot loops: GPT-2 pre-tokenization and merge-by-rank encoding.

Text is handled as UTF-8 bytes (uint8 arrays) cut into *items* (`item_ends`: exclusive byte
offsets); pre-tokens never cross an item end. `cats` classifies every code point for GPT-2's
pattern GPT2_PATTERN (OTHER, LETTER, NUMBER, SPACE: `categories()`), and `_piece_end` is that
pattern written out as a scanner.

**Unicode version.** \\p{L}, \\p{N} and \\s are pinned to Unicode 16.0.0 (UNICODE_VERSION, the
version of tiktoken's `gpt2` encoding) by the generated table `unicode_classes.py` (made by
`data/make_unicode_classes.py` from the Unicode Character Database of that version), not taken
from the installed `regex` module, whose tables follow its own release (Unicode 18.0.0 in regex
2026.11): a character added after 16.0 is OTHER here, as in tiktoken. `pinned_pattern()` is
GPT2_PATTERN with those classes written out, for `regex` (the references and the tests).

Encoding (tiktoken's rule): in a pre-token, repeatedly merge the adjacent pair whose
concatenation is the token with the lowest rank (= id), leftmost first. The pair table maps
key(left, right) = left << 32 | right -> merged id, in open addressing (`table_build`).

Every kernel is safe on any input: empty text, one byte, items of any length, and even bytes
that are not UTF-8 (a truncated or invalid sequence reads as one OTHER byte) never make it read
or write out of bounds. Extra memory of `encode` is bounded by the text: the output (4 bytes per
input byte) plus, for a pre-token longer than LONG bytes, 4 bytes per byte of it (`_merge_long`).

`encode_reference` (`regex.findall(pinned_pattern())` + plain Python merges) is the
specification of `encode`; training lives in `bpe_train.py`.
"""

import numba
import numpy as np
import regex

from minillm.kernels import unicode_classes
from minillm.kernels.unicode_classes import UNICODE_VERSION  # noqa: F401 (re-exported)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
INF = np.int32(2**31 - 1)
LONG = 128  # pre-tokens longer than this merge with _merge_long (O(log n) a merge), not rescans
BLOCK = 64  # _merge_long keeps the minimum rank of each block of this many positions
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_CATS = None
_PINNED = None


def categories():
    """Per code point (0x110000 uint8): OTHER / LETTER / NUMBER / SPACE, as \\p{L}, \\p{N}, \\s of
    Unicode UNICODE_VERSION (the table unicode_classes.py; built once)."""
    global _CATS
    if _CATS is None:
        cats = np.zeros(0x110000, np.uint8)
        for cat, rs in ((LETTER, unicode_classes.LETTER), (NUMBER, unicode_classes.NUMBER),
                        (SPACE, unicode_classes.SPACE)):
            for a, b in rs:
                cats[a:b + 1] = cat
        _CATS = cats
    return _CATS


def pinned_pattern():
    """GPT2_PATTERN with \\p{L}, \\p{N}, \\s written out as the ranges of unicode_classes, so that
    `regex` matches as the Numba pre-tokenizer does whatever Unicode version `regex` carries."""
    global _PINNED
    if _PINNED is None:
        def body(rs):
            return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in rs)
        let, num, sp = (body(unicode_classes.LETTER), body(unicode_classes.NUMBER),
                        body(unicode_classes.SPACE))
        _PINNED = (f"'s|'t|'re|'ve|'m|'ll|'d| ?[{let}]+| ?[{num}]+| ?[^{sp}{let}{num}]+"
                   f"|[{sp}]+(?![^{sp}])|[{sp}]+")
    return _PINNED


# ---------------------------------------------------------------- pre-tokenization (GPT-2)

@numba.njit(cache=True, inline="always")
def _cp(buf, i, n):
    """(code point, byte length) of the UTF-8 character at buf[i] of buf[:n]. Never reads past n:
    a sequence cut short by n, or one that is not UTF-8 at all (the tokenizer only passes valid
    UTF-8), reads as U+FFFD (OTHER) of length 1."""
    b0 = np.int32(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xC0 or b0 >= 0xF8:  # a continuation byte, or no UTF-8 lead byte
        return 0xFFFD, 1
    if b0 < 0xE0:
        if i + 1 >= n:
            return 0xFFFD, 1
        return ((b0 & 0x1F) << 6) | (np.int32(buf[i + 1]) & 0x3F), 2
    if b0 < 0xF0:
        if i + 2 >= n:
            return 0xFFFD, 1
        return (((b0 & 0x0F) << 12) | ((np.int32(buf[i + 1]) & 0x3F) << 6)
                | (np.int32(buf[i + 2]) & 0x3F)), 3
    if i + 3 >= n:
        return 0xFFFD, 1
    c = (((b0 & 0x07) << 18) | ((np.int32(buf[i + 1]) & 0x3F) << 12)
         | ((np.int32(buf[i + 2]) & 0x3F) << 6) | (np.int32(buf[i + 3]) & 0x3F))
    return (c, 4) if c < 0x110000 else (0xFFFD, 1)


@numba.njit(cache=True, inline="always")
def _run(buf, j, n, cats, cat):
    """End of the run of characters of category `cat` starting at byte j."""
    while j < n:
        b = buf[j]
        if b < 0x80:  # ASCII fast path
            if cats[b] != cat:
                break
            j += 1
        else:
            c, ln = _cp(buf, j, n)
            if cats[c] != cat:
                break
            j += ln
    return j


@numba.njit(cache=True)
def _piece_end(buf, i, n, cats):
    """End (exclusive) of the GPT-2 pre-token that starts at byte i < n of buf[:n]: in i+1..n."""
    c, ln = _cp(buf, i, n)
    if c == 39 and i + 1 < n:  # contractions 's 't 'm 'd 're 've 'll (case-sensitive)
        c1 = buf[i + 1]
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:
            return i + 2
        if i + 2 < n:
            c2 = buf[i + 2]
            if (c2 == 101 and (c1 == 114 or c1 == 118)) or (c1 == 108 and c2 == 108):
                return i + 3
    cat = cats[c]
    if cat != SPACE:  # \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+
        return _run(buf, i + ln, n, cats, cat)
    if c == 32 and i + 1 < n:  # ' ?' prefix in front of a letter/number/other run
        c2, l2 = _cp(buf, i + 1, n)
        k2 = cats[c2]
        if k2 != SPACE:
            return _run(buf, i + 1 + l2, n, cats, k2)
    last = i  # \s+(?!\S) keeps the last space for the next word; \s+ when only one is left
    j = i + ln
    while j < n:
        c3, l3 = _cp(buf, j, n)
        if cats[c3] != SPACE:
            break
        last = j
        j += l3
    if j == n or last == i:
        return j
    return last


@numba.njit(cache=True)
def pretokenize(buf, item_ends, cats):
    """Byte offsets where the pre-tokens start, plus the final end: (n_pieces + 1,) int64.
    Item ends past len(buf) count as len(buf); an end before the previous one makes an empty item."""
    out = np.empty(len(buf) + 1, np.int64)
    k = 0
    i = 0
    for e in item_ends:
        e = min(e, len(buf))
        while i < e:
            out[k] = i
            k += 1
            i = _piece_end(buf, i, e, cats)
    out[k] = i
    return out[:k + 1].copy()


# ---------------------------------------------------------------- pair table

@numba.njit(cache=True, inline="always")
def _slot(key, mask):
    return np.int64((np.uint64(key) * _GOLD) >> np.uint64(24)) & mask


@numba.njit(cache=True)
def table_build(keys, vals):
    """Open-addressing table key -> val (keys int64 >= 0, vals int32); the first of equal keys wins."""
    cap = 16
    while cap < 2 * len(keys):
        cap *= 2
    tk = np.full(cap, -1, np.int64)
    tv = np.zeros(cap, np.int32)
    mask = cap - 1
    for i in range(len(keys)):
        s = _slot(keys[i], mask)
        while tk[s] != -1 and tk[s] != keys[i]:
            s = (s + 1) & mask
        if tk[s] == -1:
            tk[s] = keys[i]
            tv[s] = vals[i]
    return tk, tv


@numba.njit(cache=True, inline="always")
def table_get(tk, tv, key):
    """Value for key, or -1."""
    mask = len(tk) - 1
    s = _slot(key, mask)
    while True:
        k = tk[s]
        if k == key:
            return tv[s]
        if k == -1:
            return -1
        s = (s + 1) & mask


@numba.njit(cache=True, inline="always")
def _rank(tk, tv, a, b):
    r = table_get(tk, tv, (np.int64(a) << 32) | b)
    return INF if r < 0 else r


# ---------------------------------------------------------------- encoding

@numba.njit(cache=True)
def _merge_short(ids, r, m, tk, tv):
    """tiktoken's loop: merge the lowest-rank pair (leftmost on ties) until none is left."""
    for k in range(m - 1):
        r[k] = _rank(tk, tv, ids[k], ids[k + 1])
    while m > 1:
        best = INF
        bi = -1
        for k in range(m - 1):
            if r[k] < best:
                best = r[k]
                bi = k
        if bi < 0:
            break
        ids[bi] = best
        for k in range(bi + 1, m - 1):
            ids[k] = ids[k + 1]
        for k in range(bi + 1, m - 2):
            r[k] = r[k + 1]
        m -= 1
        if bi < m - 1:
            r[bi] = _rank(tk, tv, ids[bi], ids[bi + 1])
        if bi > 0:
            r[bi - 1] = _rank(tk, tv, ids[bi - 1], ids[bi])
    return m


@numba.njit(cache=True, inline="always")
def _after(ids, p, m):
    """Start of the live token after the one starting at p (m at the end); see _merge_long."""
    if p + 1 < m and ids[p + 1] < 0:
        return p - np.int64(ids[p + 1])
    return p + 1


@numba.njit(cache=True, inline="always")
def _refresh(tree, leaves, cur, b, m):
    """Recompute the minimum of block b of cur and the min-tree above it."""
    lo = b * BLOCK
    hi = min(lo + BLOCK, m)
    v = INF
    for k in range(lo, hi):
        if cur[k] < v:
            v = cur[k]
    i = leaves + b
    tree[i] = v
    i >>= 1
    while i >= 1:
        w = min(tree[2 * i], tree[2 * i + 1])
        if tree[i] == w:
            break
        tree[i] = w
        i >>= 1


@numba.njit(cache=True)
def _merge_long(ids, m, tk, tv):
    """Same result as _merge_short on ids[:m], in place, in O(log m + BLOCK) per merge and 4 bytes
    of extra memory per byte: cur[p] = rank of the pair starting at live position p (INF at
    dead ones), the minimum of each BLOCK of cur, and a min-tree over the blocks that finds the
    lowest rank and its leftmost block. The live tokens need no links: a token of L >= 2 bytes
    starting at p keeps its id at ids[p] and -L at ids[p + 1] and ids[p + L - 1]; every position
    that starts no live token holds a negative value. Returns the number of ids left."""
    if m < 2:
        return m
    if m > INF:
        raise ValueError("a pre-token longer than 2**31 - 1 bytes")
    cur = np.empty(m, np.int32)
    for k in range(m - 1):
        cur[k] = _rank(tk, tv, ids[k], ids[k + 1])
    cur[m - 1] = INF
    n_blocks = (m + BLOCK - 1) // BLOCK
    leaves = 1
    while leaves < n_blocks:
        leaves *= 2
    tree = np.full(2 * leaves, INF, np.int32)
    for b in range(n_blocks):
        v = INF
        for k in range(b * BLOCK, min(b * BLOCK + BLOCK, m)):
            if cur[k] < v:
                v = cur[k]
        tree[leaves + b] = v
    for i in range(leaves - 1, 0, -1):
        tree[i] = min(tree[2 * i], tree[2 * i + 1])
    while tree[1] < INF:
        best = tree[1]
        i = 1
        while i < leaves:  # leftmost block holding the minimum
            i = 2 * i if tree[2 * i] == best else 2 * i + 1
        p = (i - leaves) * BLOCK
        while cur[p] != best:
            p += 1
        q = _after(ids, p, m)  # merge the tokens at p and q into one of r - p bytes
        r = _after(ids, q, m)
        ln = r - p
        ids[p] = best
        ids[q] = -ln
        ids[p + 1] = -ln
        ids[r - 1] = -ln
        cur[q] = INF
        cur[p] = _rank(tk, tv, best, ids[r]) if r < m else INF
        bp, bq = p // BLOCK, q // BLOCK
        _refresh(tree, leaves, cur, bp, m)
        if bq != bp:
            _refresh(tree, leaves, cur, bq, m)
        if p > 0:
            a = p - 1 if ids[p - 1] >= 0 else p + np.int64(ids[p - 1])  # the token before p
            cur[a] = _rank(tk, tv, ids[a], best)
            _refresh(tree, leaves, cur, a // BLOCK, m)
    k, j = 0, 0
    while k < m:
        nxt = _after(ids, k, m)
        ids[j] = ids[k]
        j += 1
        k = nxt
    return j


def new_cache(entries=1 << 16):
    """An empty pre-token cache for `encode`: pieces -> ids, kept between calls. ent[e] =
    (hash, key offset, key length, ids offset, ids length); use[0..2] = entries, key bytes and
    ids used. `encode` stops adding when it is full (see `cache_full`). entries is rounded up to
    a power of two (at least 2)."""
    size = 2
    while size < entries:
        size *= 2
    return dict(slots=np.full(2 * size, -1, np.int32), ent=np.zeros((size, 5), np.int64),
                keys=np.zeros(16 * size, np.uint8), vals=np.zeros(8 * size, np.int32),
                use=np.zeros(3, np.int64))


def cache_full(c):
    u = c["use"]
    return u[0] >= len(c["ent"]) - 1 or u[1] + 2 * LONG > len(c["keys"]) \
        or u[2] + 2 * LONG > len(c["vals"])


@numba.njit(cache=True)
def encode(buf, item_ends, cats, byte_to_id, tk, tv, slots, ent, keys, vals, use):
    """Token ids of every item, and each item's end in them: (ids int32, id_ends int64).
    Pre-tokens of 2..LONG bytes go through the cache (slots, ent, keys, vals, use: new_cache);
    longer ones are merged in place in the output (a piece of m bytes gives at most m ids).
    Item ends past len(buf) count as len(buf)."""
    out = np.empty(len(buf), np.int32)
    id_ends = np.empty(len(item_ends), np.int64)
    ids = np.empty(LONG, np.int32)
    r = np.empty(LONG, np.int32)
    mask = len(slots) - 1
    k = 0
    i = 0
    for it in range(len(item_ends)):
        e = min(item_ends[it], len(buf))
        while i < e:
            j = _piece_end(buf, i, e, cats)
            m = j - i
            if m == 1:
                out[k] = byte_to_id[buf[i]]
                k += 1
            elif m <= LONG:
                h = np.uint64(14695981039346656037)  # FNV-1a
                for q in range(i, j):
                    h = (h ^ np.uint64(buf[q])) * np.uint64(1099511628211)
                hh = np.int64(h >> np.uint64(2))
                s = _slot(hh, mask)
                while True:
                    x = slots[s]
                    if x == -1:
                        break
                    if ent[x, 0] == hh and ent[x, 2] == m:
                        ko = ent[x, 1]
                        same = True
                        for q in range(m):
                            if keys[ko + q] != buf[i + q]:
                                same = False
                                break
                        if same:
                            break
                    s = (s + 1) & mask
                if x != -1:  # hit
                    vo, vn = ent[x, 3], ent[x, 4]
                    out[k:k + vn] = vals[vo:vo + vn]
                    k += vn
                else:
                    for q in range(m):
                        ids[q] = byte_to_id[buf[i + q]]
                    n = _merge_short(ids, r, m, tk, tv)
                    out[k:k + n] = ids[:n]
                    k += n
                    x = use[0]
                    if x < len(ent) - 1 and use[1] + m <= len(keys) and use[2] + n <= len(vals):
                        ent[x, 0], ent[x, 1], ent[x, 2], ent[x, 3], ent[x, 4] = hh, use[1], m, use[2], n
                        keys[use[1]:use[1] + m] = buf[i:j]
                        vals[use[2]:use[2] + n] = ids[:n]
                        slots[s] = x
                        use[0] += 1
                        use[1] += m
                        use[2] += n
            else:  # k + m <= j <= len(buf): each byte so far gave at most one id
                for q in range(m):
                    out[k + q] = byte_to_id[buf[i + q]]
                k += _merge_long(out[k:k + m], m, tk, tv)
            i = j
        id_ends[it] = k
    return out[:k].copy(), id_ends


@numba.njit(cache=True)
def decode(ids, tok_bytes, tok_off):
    """Concatenated bytes of the tokens: uint8 array (ValueError for an id out of range)."""
    total = 0
    for t in ids:
        if t < 0 or t >= len(tok_off) - 1:
            raise ValueError("token id out of range")
        total += tok_off[t + 1] - tok_off[t]
    out = np.empty(total, np.uint8)
    k = 0
    for t in ids:
        for q in range(tok_off[t], tok_off[t + 1]):
            out[k] = tok_bytes[q]
            k += 1
    return out


def pair_dict(tk, tv):
    """The pair table as a dict {(left, right): merged id}."""
    return {(k >> 32, k & 0xFFFFFFFF): v for k, v in zip(tk.tolist(), tv.tolist()) if k != -1}


def encode_reference(text, byte_to_id, pairs, cache=None):
    """The specification of `encode` for one str: `regex` pre-tokens, then merge the lowest-id
    pair (leftmost on ties) in plain Python; pre-tokens are cached in `cache` (a dict)."""
    cache = {} if cache is None else cache
    out = []
    for piece in regex.findall(pinned_pattern(), text):
        if piece not in cache:
            ids = [int(byte_to_id[b]) for b in piece.encode("utf-8")]
            while len(ids) > 1:
                r, i = min((pairs.get(p, INF), i) for i, p in enumerate(zip(ids, ids[1:])))
                if r == INF:
                    break
                ids[i:i + 2] = [r]
            cache[piece] = ids
        out += cache[piece]
    return out
