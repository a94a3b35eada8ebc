"""Float64 central-difference gradient checks shared by the test modules.

    check_grads(loss_fn, arrays, grads, rtol=1e-6)

`arrays` is a (nested) dict of float64 arrays that `loss_fn()` reads (it is perturbed in place, entry by
entry); `grads` holds the analytic gradients of the scalar `loss_fn()` with the same keys. For each array,
at most `max_entries` entries (chosen by a seeded rng) are checked. The error of an array is
max |analytic - numeric| / max(max |analytic|, max |numeric|, tiny): relative to the gradient's scale, so
entries that are (almost) zero do not blow it up.
"""

import numpy as np


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def numeric_grad(loss_fn, x, idx, eps):
    old = x[idx]
    x[idx] = old + eps
    plus = loss_fn()
    x[idx] = old - eps
    minus = loss_fn()
    x[idx] = old
    return (plus - minus) / (2 * eps)


def grad_errors(loss_fn, arrays, grads, eps=1e-6, max_entries=24, seed=0):
    """-> {name: relative error} for every leaf of `arrays`."""
    rng = np.random.default_rng(seed)
    analytic = dict(_leaves(grads))
    errors = {}
    for name, x in _leaves(arrays):
        assert x.dtype == np.float64, f"{name}: gradient checks need float64, got {x.dtype}"
        assert name in analytic, f"no analytic gradient for {name}"
        g = np.asarray(analytic[name])
        assert g.shape == x.shape, f"{name}: gradient shape {g.shape} != {x.shape}"
        flat_ids = np.arange(x.size)
        if x.size > max_entries:
            flat_ids = rng.choice(x.size, max_entries, replace=False)
        a, n = [], []
        for f in flat_ids:
            idx = np.unravel_index(f, x.shape)
            a.append(g[idx])
            n.append(numeric_grad(loss_fn, x, idx, eps))
        a, n = np.array(a), np.array(n)
        scale = max(np.abs(a).max(), np.abs(n).max(), 1e-12)
        errors[name] = float(np.abs(a - n).max() / scale)
    return errors


def check_grads(loss_fn, arrays, grads, rtol=1e-6, **kw):
    errors = grad_errors(loss_fn, arrays, grads, **kw)
    bad = {k: v for k, v in errors.items() if not v < rtol}
    assert not bad, f"gradient check failed (rtol {rtol}): {bad}"
    return errors


def weighted_sum(y, g):
    """The scalar sum(y * g): its gradient with respect to y is g."""
    return float(np.sum(y * g))
