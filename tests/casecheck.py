"""Shared by test_cases.py and test_cases_models.py: draw a golden case, run its minillm
function as `minillm reference check` does, and check its gradients by central differences."""

import json

import numpy as np

from minillm.reference import cases as rc


def sample(name, seed=0):
    """-> (inputs, params, upstream) of component `name`, drawn with `seed`."""
    return rc.COMPONENTS[name]["sample"](np.random.default_rng(seed))


def run(name, inputs, params, upstream):
    """-> (outputs, grads); the config goes through JSON, as check() passes it."""
    spec = rc.COMPONENTS[name]
    return spec["fn"](inputs, params, upstream, json.loads(json.dumps(spec["config"])))


def check_upstream_grads(name, inputs, params, upstream, grads):
    """grads[k] . d == d/dt sum_o <outputs[o](k + t d), upstream[o]> at t = 0 for every key k of grads."""
    rng = np.random.default_rng(0)
    for key, g in grads.items():
        sec = inputs if key in inputs else params
        d, eps, f = g + rng.standard_normal(g.shape) * (np.abs(g).mean() or 1.0), 1e-6, []
        d /= np.sqrt(np.mean(d * d))        # along g (catches scaled grads) plus noise (catches the rest)
        assert g.shape == sec[key].shape and g.dtype == np.float64
        for s in (eps, -eps):
            moved = {**sec, key: sec[key] + s * d}
            out = run(name, *((moved, params) if sec is inputs else (inputs, moved)), upstream)[0]
            f.append(sum(float(np.sum(out[o] * upstream[o])) for o in upstream))
            size = sum(float(np.sum(np.abs(out[o] * upstream[o]))) for o in upstream)
        # 1e-6 relative, plus a floor for the rounding of f itself (~1e-16 |f| / eps = 1e-10 |f|)
        err = abs((f[0] - f[1]) / (2 * eps) - np.sum(g * d))
        assert err <= 1e-6 * np.sum(np.abs(g * d)) + 1e-8 * size, key
