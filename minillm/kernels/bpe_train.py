"""Byte-level BPE training: count the distinct pre-tokens, then merge pairs incrementally.

The most frequent adjacent pair is merged, weighted by pre-token counts; ties go to the smallest
(left id, right id). Pair counts are kept incrementally: a merge only visits the words on the
merged pair's occurrence list (words that held the pair at some point), recounts only the pairs
touching the merged positions, and a max-heap with lazy deletion (entries are upper bounds of
the counts, refreshed when popped) picks the next pair. `train_reference` is the plain-Python
specification that recounts everything at every step; the kernel must give the same merges.
"""

import numba
import numpy as np

from minillm.kernels.bpe import _piece_end, _slot


@numba.njit(cache=True)
def count_pieces(buf, item_ends, cats):
    """Distinct pre-tokens with their counts: (byte offset of one occurrence, length, count).
    Item ends past len(buf) count as len(buf)."""
    cap = 1 << 12
    table = np.full(cap, -1, np.int64)
    eoff = np.empty(cap // 2, np.int64)
    elen = np.empty(cap // 2, np.int64)
    ecnt = np.empty(cap // 2, np.int64)
    ehash = np.empty(cap // 2, np.uint64)
    n = 0
    i = 0
    for e in item_ends:
        e = min(e, len(buf))
        while i < e:
            j = _piece_end(buf, i, e, cats)
            h = np.uint64(14695981039346656037)  # FNV-1a
            for q in range(i, j):
                h = (h ^ np.uint64(buf[q])) * np.uint64(1099511628211)
            mask = cap - 1
            s = _slot(h >> np.uint64(1), mask)
            while True:
                x = table[s]
                if x == -1:
                    table[s] = n
                    eoff[n], elen[n], ecnt[n], ehash[n] = i, j - i, 1, h
                    n += 1
                    break
                if ehash[x] == h and elen[x] == j - i:
                    same = True
                    for q in range(j - i):
                        if buf[eoff[x] + q] != buf[i + q]:
                            same = False
                            break
                    if same:
                        ecnt[x] += 1
                        break
                s = (s + 1) & mask
            if 2 * n >= cap:  # grow and rehash
                cap *= 2
                table = np.full(cap, -1, np.int64)
                for x in range(n):
                    s = _slot(ehash[x] >> np.uint64(1), cap - 1)
                    while table[s] != -1:
                        s = (s + 1) & (cap - 1)
                    table[s] = x
                eoff = np.concatenate((eoff, np.empty(cap // 2 - len(eoff), np.int64)))
                elen = np.concatenate((elen, np.empty(cap // 2 - len(elen), np.int64)))
                ecnt = np.concatenate((ecnt, np.empty(cap // 2 - len(ecnt), np.int64)))
                ehash = np.concatenate((ehash, np.empty(cap // 2 - len(ehash), np.uint64)))
            i = j
    return eoff[:n].copy(), elen[:n].copy(), ecnt[:n].copy()


def train_reference(words, n_merges, first_id, min_count=1):
    """The specification: words {tuple of ids: count} -> list of merged pairs (a, b); the i-th
    creates id first_id + i. Each step recounts every pair, takes the highest count (ties: the
    smallest (a, b)) and rewrites every word left to right. Stops early below min_count."""
    words = [(list(w), c) for w, c in words.items()]
    merges = []
    for step in range(n_merges):
        counts = {}
        for w, c in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + c
        if not counts:
            break
        (a, b), c = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < min_count:
            break
        t = first_id + step
        merges.append((a, b))
        for w, _ in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [t]
                i += 1
    return merges


# Trainer state: words (sym, wstart, wlen, wfreq, wstamp); pairs (tk, tv hash -> pair index;
# pa, pb, pcnt, phead = occurrence list head, plast = last word appended, pstamp); occurrence
# list nodes (nword, nnext); max-heap (hcnt, hkey, hpair); scal = [n_pairs, n_nodes, heap size,
# merges done, next id, pair and heap slots needed, node slots needed]; outputs ma, mb, mcnt.
_N_PAIRS, _N_NODES, _N_HEAP, _DONE, _NEXT_ID, _NEED, _NEED_NODES = range(7)
INT32_MAX = 2**31 - 1  # ids are int32
NEED_SPACE, FINISHED = 1, 2


@numba.njit(cache=True)
def _pair(tk, tv, pa, pb, pcnt, phead, plast, pstamp, scal, a, b):
    """Index of pair (a, b), created with count 0 if new."""
    key = (np.int64(a) << 32) | b
    mask = len(tk) - 1
    s = _slot(key, mask)
    while tk[s] != -1:
        if tk[s] == key:
            return tv[s]
        s = (s + 1) & mask
    q = scal[_N_PAIRS]
    scal[_N_PAIRS] += 1
    tk[s], tv[s] = key, q
    pa[q], pb[q], pcnt[q], phead[q], plast[q], pstamp[q] = a, b, 0, -1, -1, -1
    return q


@numba.njit(cache=True, inline="always")
def _above(c1, k1, c2, k2):
    return c1 > c2 or (c1 == c2 and k1 < k2)


@numba.njit(cache=True)
def _hpush(hc, hk, hp, n, c, k, p):
    i = n
    while i > 0:
        par = (i - 1) >> 1
        if not _above(c, k, hc[par], hk[par]):
            break
        hc[i], hk[i], hp[i] = hc[par], hk[par], hp[par]
        i = par
    hc[i], hk[i], hp[i] = c, k, p
    return n + 1


@numba.njit(cache=True)
def _hdown(hc, hk, hp, n, c, k, p):
    """Put (c, k, p) at the root and sift it down."""
    i = 0
    while True:
        ch = 2 * i + 1
        if ch >= n:
            break
        if ch + 1 < n and _above(hc[ch + 1], hk[ch + 1], hc[ch], hk[ch]):
            ch += 1
        if not _above(hc[ch], hk[ch], c, k):
            break
        hc[i], hk[i], hp[i] = hc[ch], hk[ch], hp[ch]
        i = ch
    hc[i], hk[i], hp[i] = c, k, p


@numba.njit(cache=True)
def train_init(sym, wstart, wlen, wfreq, tk, tv, pa, pb, pcnt, phead, plast, pstamp,
               nword, nnext, hc, hk, hp, scal):
    """Count every adjacent pair once and fill the occurrence lists and the heap."""
    for w in range(len(wlen)):
        s = wstart[w]
        for i in range(wlen[w] - 1):
            q = _pair(tk, tv, pa, pb, pcnt, phead, plast, pstamp, scal, sym[s + i], sym[s + i + 1])
            pcnt[q] += wfreq[w]
            if plast[q] != w:
                plast[q] = w
                nd = scal[_N_NODES]
                scal[_N_NODES] += 1
                nword[nd], nnext[nd], phead[q] = w, phead[q], nd
    n = 0
    for q in range(scal[_N_PAIRS]):
        n = _hpush(hc, hk, hp, n, pcnt[q], (np.int64(pa[q]) << 32) | pb[q], q)
    scal[_N_HEAP] = n


@numba.njit(cache=True)
def train_steps(sym, wstart, wlen, wfreq, wstamp, tk, tv, pa, pb, pcnt, phead, plast, pstamp,
                nword, nnext, hc, hk, hp, scal, touched, mpos, ma, mb, mcnt, n_steps, min_count):
    """Up to n_steps merges. Returns 0 (done them), NEED_SPACE (scal[_NEED] more pair and heap
    slots and scal[_NEED_NODES] more node slots are needed before the next merge) or FINISHED
    (no pair counts min_count)."""
    for _ in range(n_steps):
        n = scal[_N_HEAP]
        while n > 0:  # pop stale entries: the heap holds upper bounds of the counts
            p = hp[0]
            if hc[0] == pcnt[p]:
                break
            n -= 1
            if pcnt[p] > 0:
                _hdown(hc, hk, hp, n + 1, pcnt[p], hk[0], p)
                n += 1
            elif n > 0:
                _hdown(hc, hk, hp, n, hc[n], hk[n], hp[n])
        scal[_N_HEAP] = n
        if n == 0 or hc[0] < min_count:
            return FINISHED
        p = hp[0]
        # Room for the merge: every pair it creates holds the new id t, so there are at most
        # 2t + 1 of them ((x, t), (t, y), (t, t) with x, y < t) and at most as many as the
        # symbols visited; each visited word gets at most that many occurrence nodes.
        most = 2 * scal[_NEXT_ID] + 1
        visited = 0
        need_nodes = 0
        nd = phead[p]
        while nd != -1:
            ln = wlen[nword[nd]]
            visited += ln
            need_nodes += min(ln, most)
            nd = nnext[nd]
        need = min(visited, most)
        if (scal[_N_PAIRS] + need > len(pa) or 2 * (scal[_N_PAIRS] + need) > len(tk)
                or scal[_N_NODES] + need_nodes > len(nword) or n + need > len(hc)):
            scal[_NEED] = need
            scal[_NEED_NODES] = need_nodes
            return NEED_SPACE
        a, b, t, step = pa[p], pb[p], scal[_NEXT_ID], scal[_DONE]
        ma[step], mb[step], mcnt[step] = a, b, pcnt[p]
        n_touched = 0
        nd = phead[p]
        while nd != -1:
            w = nword[nd]
            nd = nnext[nd]
            if wstamp[w] == step:
                continue
            wstamp[w] = step
            s, ln, f = wstart[w], wlen[w], wfreq[w]
            found = False
            mpos[:ln] = False
            i = 0
            while i < ln - 1:
                if sym[s + i] == a and sym[s + i + 1] == b:
                    mpos[i] = mpos[i + 1] = found = True
                    i += 2
                else:
                    i += 1
            if not found:
                continue  # a stale list entry
            for i in range(ln - 1):  # pairs that lose a symbol to the merge
                if mpos[i] or mpos[i + 1]:
                    q = _pair(tk, tv, pa, pb, pcnt, phead, plast, pstamp, scal, sym[s + i],
                              sym[s + i + 1])
                    pcnt[q] -= f
            i, j = 0, 0
            while i < ln:
                if i < ln - 1 and sym[s + i] == a and sym[s + i + 1] == b:
                    sym[s + j] = t
                    i += 2
                else:
                    sym[s + j] = sym[s + i]
                    i += 1
                j += 1
            wlen[w] = j
            for i in range(j - 1):  # pairs that gain the new symbol
                if sym[s + i] == t or sym[s + i + 1] == t:
                    q = _pair(tk, tv, pa, pb, pcnt, phead, plast, pstamp, scal, sym[s + i],
                              sym[s + i + 1])
                    pcnt[q] += f
                    if plast[q] != w:
                        plast[q] = w
                        m = scal[_N_NODES]
                        scal[_N_NODES] += 1
                        nword[m], nnext[m], phead[q] = w, phead[q], m
                    if pstamp[q] != step:
                        pstamp[q] = step
                        touched[n_touched] = q
                        n_touched += 1
        pcnt[p] = 0
        phead[p] = -1
        for i in range(n_touched):
            q = touched[i]
            n = _hpush(hc, hk, hp, n, pcnt[q], (np.int64(pa[q]) << 32) | pb[q], q)
        scal[_N_HEAP] = n
        scal[_NEXT_ID] += 1
        scal[_DONE] += 1
    return 0


def _grown(arr, size):
    out = np.empty(size, arr.dtype)
    out[:len(arr)] = arr
    return out


def check_words(sym, wstart, wlen, wfreq, first_id):
    """ValueError unless the word arrays fit together: as many starts, lengths and weights,
    every word inside sym, lengths and weights >= 0, symbols in 0..first_id - 1."""
    if not len(wstart) == len(wlen) == len(wfreq):
        raise ValueError(f"{len(wstart)} word starts, {len(wlen)} lengths and {len(wfreq)} "
                         f"weights: expected as many of each")
    if len(wlen) and (wlen.min() < 0 or wstart.min() < 0 or wfreq.min() < 0
                      or int((wstart.astype(np.int64) + wlen).max()) > len(sym)):
        raise ValueError("a word lies outside sym, or has a negative length or weight")
    if len(sym) and (sym.min() < 0 or sym.max() >= first_id):
        raise ValueError(f"symbols must be in 0..{first_id - 1} (merges create ids from {first_id})")


def train(sym, wstart, wlen, wfreq, n_merges, first_id, min_count=1, on_progress=None):
    """Learn up to n_merges merges over words (sym[wstart[w]:wstart[w] + wlen[w]], weight
    wfreq[w]); returns (a, b, count) arrays, merge i creating id first_id + i. `sym` and `wlen`
    are rewritten in place (the words as merged). on_progress(merges done) is called between
    chunks of merges. No word, words of one symbol and n_merges = 0 are fine. n_merges beyond
    the number of adjacent pairs in the words (each merge removes at least one) is cut to it,
    so every allocation is bounded by the words, whatever n_merges."""
    sym = np.ascontiguousarray(sym, np.int32)
    wstart = np.ascontiguousarray(wstart, np.int64)
    wlen = np.ascontiguousarray(wlen, np.int32)
    wfreq = np.ascontiguousarray(wfreq, np.int64)
    if not 0 <= first_id <= INT32_MAX:
        raise ValueError(f"first_id must be in 0..{INT32_MAX}, got {first_id}")
    check_words(sym, wstart, wlen, wfreq, first_id)
    n_pairs = int(np.sum(np.maximum(wlen, 1) - 1, dtype=np.int64))
    n_merges = min(int(n_merges), n_pairs, INT32_MAX - first_id)
    if n_merges < 0:
        raise ValueError(f"n_merges must be >= 0, got {n_merges}")
    min_count = int(min(max(min_count, 1), 2**62))
    # Room for the initial pairs: distinct ones (pair table, heap) are at most the pair
    # occurrences and at most first_id**2 (symbols are below first_id); occurrence nodes at most
    # the occurrences. The merges grow the tables by doubling (train_steps says how much).
    n_distinct = min(n_pairs, first_id * first_id) + 16
    cap = 16
    while cap < 2 * n_distinct:
        cap *= 2
    st = dict(tk=np.full(cap, -1, np.int64), tv=np.zeros(cap, np.int32))
    for name, dt, size in (("pa", np.int32, n_distinct), ("pb", np.int32, n_distinct),
                           ("pcnt", np.int64, n_distinct), ("phead", np.int32, n_distinct),
                           ("plast", np.int32, n_distinct), ("pstamp", np.int32, n_distinct),
                           ("touched", np.int32, n_distinct), ("hp", np.int32, n_distinct),
                           ("hc", np.int64, n_distinct), ("hk", np.int64, n_distinct),
                           ("nword", np.int32, n_pairs + 16), ("nnext", np.int32, n_pairs + 16)):
        st[name] = np.zeros(size, dt)
    scal = np.zeros(7, np.int64)
    scal[_NEXT_ID] = first_id
    wstamp = np.full(len(wstart), -1, np.int32)
    mpos = np.zeros(int(np.max(wlen, initial=1)), np.bool_)
    out = [np.zeros(n_merges, dt) for dt in (np.int32, np.int32, np.int64)]
    train_init(sym, wstart, wlen, wfreq, st["tk"], st["tv"], st["pa"], st["pb"], st["pcnt"],
               st["phead"], st["plast"], st["pstamp"], st["nword"], st["nnext"], st["hc"],
               st["hk"], st["hp"], scal)
    chunk = max(1, min(256, n_merges // 50))
    while scal[_DONE] < n_merges:
        status = train_steps(sym, wstart, wlen, wfreq, wstamp, st["tk"], st["tv"], st["pa"],
                             st["pb"], st["pcnt"], st["phead"], st["plast"], st["pstamp"],
                             st["nword"], st["nnext"], st["hc"], st["hk"], st["hp"], scal,
                             st["touched"], mpos, *out, min(chunk, n_merges - scal[_DONE]),
                             min_count)
        if status == FINISHED:
            break
        if status == NEED_SPACE:
            need, need_nodes = int(scal[_NEED]), int(scal[_NEED_NODES])
            if scal[_N_PAIRS] + need > len(st["pa"]):
                size = max(2 * len(st["pa"]), int(scal[_N_PAIRS]) + need)
                for name in ("pa", "pb", "pcnt", "phead", "plast", "pstamp", "touched"):
                    st[name] = _grown(st[name], size)
            if 2 * (scal[_N_PAIRS] + need) > len(st["tk"]):
                cap = len(st["tk"])
                while cap < 2 * (scal[_N_PAIRS] + need):
                    cap *= 2
                n_pairs = int(scal[_N_PAIRS])
                keys = (st["pa"][:n_pairs].astype(np.int64) << 32) | st["pb"][:n_pairs]
                st["tk"], st["tv"] = _rehash(keys, cap)
            for name, used, more in (("nword", _N_NODES, need_nodes),
                                     ("nnext", _N_NODES, need_nodes), ("hc", _N_HEAP, need),
                                     ("hk", _N_HEAP, need), ("hp", _N_HEAP, need)):
                if scal[used] + more > len(st[name]):
                    st[name] = _grown(st[name], max(2 * len(st[name]), int(scal[used]) + more))
        elif on_progress is not None:
            on_progress(int(scal[_DONE]))
    done = int(scal[_DONE])
    return out[0][:done], out[1][:done], out[2][:done]


@numba.njit(cache=True)
def _rehash(keys, cap):
    tk = np.full(cap, -1, np.int64)
    tv = np.zeros(cap, np.int32)
    for q in range(len(keys)):
        s = _slot(keys[q], cap - 1)
        while tk[s] != -1:
            s = (s + 1) & (cap - 1)
        tk[s], tv[s] = keys[q], q
    return tk, tv
