"""tree.py: nested params <-> dotted names."""

import numpy as np
import pytest

from minillm.tree import flatten, unflatten
from test_optim import make_params


def test_flatten_unflatten_round_trip():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    flat = flatten(params)
    assert list(flat)[:2] == ["wte.weight", "wpe.weight"]
    assert flatten(unflatten(flat)) == flat and flatten(flat) == flat
    assert flat["h.0.attn.c_attn.weight"] is params["h"]["0"]["attn"]["c_attn"]["weight"]
    assert flatten({"h": [{"w": 1}, {"w": 2}], "b": None}) == {"h.0.w": 1, "h.1.w": 2}
    with pytest.raises(ValueError, match="twice"):
        flatten({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(ValueError, match="both a tensor and a prefix"):
        unflatten({"a": 1, "a.b": 2})
