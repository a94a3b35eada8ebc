"""reference/common.py: the registry entry's variants and tolerances, the samplers' normal draw."""

import numpy as np

from minillm.reference import common


def test_entry_variants_and_tolerances():
    e = common.entry(len, None, {"k": 1}, "peer", "math")
    assert e["variants"] == {"float64": 1e-9} and e["fn"] is len and e["config"] == {"k": 1}
    assert common.entry(len, None, {}, "p", "m", float32=True)["variants"] == {"float64": 1e-9, "float32": 1e-5}


def test_normal_is_a_scaled_shifted_standard_normal():
    a = common.normal(np.random.default_rng(3), (2, 3), scale=2.0, shift=1.0)
    b = np.random.default_rng(3).standard_normal((2, 3)) * 2.0 + 1.0
    assert a.dtype == np.float64 and np.array_equal(a, b)
