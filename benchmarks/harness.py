"""What the benchmarks share: the path set-up, the timer, the table printer.

    import harness   # first in benchmarks/x.py: `import minillm` and `import peers` then work from a checkout

Importing it puts the checkout's root first on sys.path (this checkout's minillm, not an installed one)
and tests/ last (tests/peers.py: the Hugging Face peers built from minillm weights). It imports nothing
heavy, so a script can still set environment variables (Numba, Rayon) after it.

`medians` times minillm and its peers alternately (a, b, a, b, ...), so that every implementation sees
the same background load, and returns the median seconds of each; `table` prints rows of cells and
`versus` the usual workload / minillm / peer / ratio table.
"""

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if TESTS not in sys.path:
    sys.path.append(TESTS)

from minillm import heap  # noqa: E402  (after the path set-up)

# As `minillm train` does (train.fit): freed arrays stay in the process for the next step. mallopt is
# process-wide, so the peers timed in the same process run under the same allocator settings.
HEAP_KEPT = heap.keep_freed_memory()


def minillm_step(model, params, config, x, y, state, *adamw_args, **adamw_kw):
    """One training step on the batch x, y: (B, T) as `minillm train` takes it: train_step.micro_batch (the
    batch in batch_parts' parts, side by side where they may be), then optim.adamw_step(params, mean gradients,
    state, *adamw_args, **adamw_kw). -> the batch's mean loss. (Imports inside: see the module docstring.)"""
    from minillm import batch_parts, optim, train, train_step

    parts = batch_parts.count(train.TrainOptions.batch_parts, len(x), config, x)
    loss, _, _, grads = train_step.micro_batch(model, params, config, x, y, parts)
    optim.adamw_step(params, grads if parts == 1 else {n: g / parts for n, g in grads.items()}, state,
                     *adamw_args, **adamw_kw)
    return loss / parts


def _per_fn(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def time_calls(fns, repeats, warmup=1, sync=None, before=None, interleave=True, pause=0.0):
    """Wall-clock seconds of each call of each function: [[t, ...] for each fn].

    repeats, warmup: an int, or one per function (a slow peer can run fewer times, or without its
    warm-up call). warm-up calls run first, in rounds over the functions (Numba compilation, caches,
    allocators). interleave: repeat i of every function runs before repeat i + 1 of any (a function
    with fewer repeats drops out of the later rounds); False runs each function's calls in one block,
    after `pause` seconds of sleep (on a 2-core machine one library's idle-spinning thread pool can
    steal the cores the next call needs). sync: called before and after each timed call (a GPU queue);
    before: one callable or None per function, called untimed before each of its timed calls."""
    n = len(fns)
    repeats, warmup, before = _per_fn(repeats, n), _per_fn(warmup, n), _per_fn(before, n)
    sync = sync or (lambda: None)

    def timed(i):
        if before[i] is not None:
            before[i]()
        sync()
        t0 = time.perf_counter()
        fns[i]()
        sync()
        return time.perf_counter() - t0

    times = [[] for _ in fns]
    if interleave:
        for r in range(max(warmup, default=0)):
            for i, fn in enumerate(fns):
                if r < warmup[i]:
                    fn()
        for r in range(max(repeats, default=0)):
            for i in range(n):
                if r < repeats[i]:
                    times[i].append(timed(i))
    else:
        for i, fn in enumerate(fns):
            time.sleep(pause)
            for _ in range(warmup[i]):
                fn()
            times[i] = [timed(i) for _ in range(repeats[i])]
    return times


def medians(fns, repeats, **kw):
    """Median seconds of each function (see `time_calls` for the arguments): [median for each fn]."""
    return [statistics.median(ts) for ts in time_calls(fns, repeats, **kw)]


def table(head, rows, title=None, indent="", align=None):
    """Print `rows` (sequences of cells: strings, or values printed with str) under `head`, each column as
    wide as its widest cell, two spaces apart. align: 'l' / 'r' per column (default: the first column
    left, the others right). title: a line printed first ("" prints an empty line)."""
    cells = [[str(c) for c in row] for row in [head, *rows]]
    align = align or "l" + "r" * (len(head) - 1)
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    if title is not None:
        print(title)
    for row in cells:
        print(indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, align)).rstrip())


def versus(rows, peers, ours="minillm ms", formats=(".2f", ".1f", ".4f"), title=None):
    """The workload / minillm / peer / ratio table. rows: (workload, minillm time, peer time, ...), one
    time per name in `peers` (the column titles); each peer column is followed by the ratio
    minillm / peer (< 1: minillm is faster). formats: of the minillm times, the peer times, the ratios."""
    f_ours, f_peer, f_ratio = formats
    head = ["", ours] + [h for p in peers for h in (p, "ratio")]
    body = [[name, format(mine, f_ours)] + [c for t in theirs for c in (format(t, f_peer), format(mine / t, f_ratio))]
            for name, mine, *theirs in rows]
    table(head, body, title=title)


def generation(models, gen_context, gen_tokens):
    """Print tokens/s of `step`, batch 1, float32, for minillm models [(name, module)] of one size (4 layers,
    d_model 256, vocab 2048), over gen_tokens tokens: at the start of the context and after a prompt of
    gen_context - gen_tokens tokens, prefilled through `step` as generate.py does. Each loop of steps runs
    once, after a warm-up loop."""
    import numpy as np

    base = dict(vocab_size=2048, context=gen_context, n_layer=4, n_head=4, d_model=256, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, base["vocab_size"], (1, gen_context - gen_tokens))
    new = rng.integers(0, base["vocab_size"], (1, gen_tokens))
    rows = []
    for name, module in models:
        config = {"arch": name, **base, **module.DEFAULTS}
        params = module.init(config, np.random.default_rng(1))

        def run_steps(state):
            t = time.perf_counter()
            for i in range(gen_tokens):
                _, state = module.step(params, new[:, i], state)
            return gen_tokens / (time.perf_counter() - t)

        run_steps(module.init_state(params, config, 1))  # warm-up
        short = run_steps(module.init_state(params, config, 1))
        state = module.init_state(params, config, 1)
        for i in range(prompt.shape[1]):
            _, state = module.step(params, prompt[:, i], state)
        rows.append((name, f"{short:.0f}", f"{run_steps(state):.0f}"))
    table(["", "at position 0", f"at position {prompt.shape[1]}"], rows,
          title=f"\nGeneration: batch 1, {base['n_layer']} layers, d_model {base['d_model']}, vocab "
                f"{base['vocab_size']}, float32; tokens/s of `step` over {gen_tokens} tokens")


# --- the machine's limits, measured in the same run ------------------------------------------------------

_LIMITS = {}


def gemm_flops(n=2048, repeats=5):
    """FLOP/s of a large float32 GEMM (n x n @ n x n, 2 n^3 flops) with NumPy's BLAS: the compute ceiling
    that MFU divides by. Measured once per run (median of `repeats`)."""
    if "gemm" not in _LIMITS:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        b = a.T.copy()
        seconds = medians([lambda: a @ b], repeats, warmup=1)[0]
        _LIMITS["gemm"] = 2.0 * n ** 3 / seconds
    return _LIMITS["gemm"]


def copy_bandwidth(megabytes=256, repeats=5):
    """Bytes/s moved by a large array copy (read + write counted): the ceiling of memory-bound kernels."""
    if "copy" not in _LIMITS:
        import numpy as np

        src = np.ones(megabytes * 2 ** 20 // 4, dtype=np.float32)
        dst = np.empty_like(src)
        seconds = medians([lambda: np.copyto(dst, src)], repeats, warmup=1)[0]
        _LIMITS["copy"] = 2.0 * src.nbytes / seconds
    return _LIMITS["copy"]


def gpt_flops_per_token(n_params, n_layer, d_model, context):
    """Training FLOPs per token, 6 N + 12 L d T (the PaLM appendix B / nanoGPT estimate_mfu convention:
    N without the position embeddings; the attention scores' 12 L d T on top)."""
    return 6 * n_params + 12 * n_layer * d_model * context


def mfu(tokens_per_s, flops_per_token):
    """Model FLOPs utilisation: achieved FLOP/s over the measured float32 GEMM FLOP/s."""
    return tokens_per_s * flops_per_token / gemm_flops()


def limits_line():
    """One line naming the ceilings, for the report."""
    return (f"machine limits (this run): float32 GEMM {gemm_flops() / 1e9:.1f} GFLOP/s, "
            f"copy {copy_bandwidth() / 1e9:.1f} GB/s")
