"""minillm/reference/cases_llama.py: the Llama-family golden cases. A leaf module (only common.py), its
entries and functions re-exported by cases.py; samplers deterministic per seed; Mixtral's routing away
from top-k ties (also rounded to float32); the upstream-gradient contract by central differences."""

import numpy as np
import pytest

from casecheck import check_upstream_grads, run, sample
from minillm.reference import cases as rc
from minillm.reference import cases_llama as rcl
from test_cases_models import _reference_imports

LLAMA = ["rmsnorm", "rope", "swiglu", "gqa_attention", "llama_block", "llama", "mixtral"]


def test_leaf_module_and_reexports():
    assert _reference_imports(rcl) == {"minillm.reference.common"}
    assert list(rcl.LLAMA_COMPONENTS) == LLAMA and list(rc.COMPONENTS)[-len(LLAMA):] == LLAMA
    for name in LLAMA:
        assert rc.COMPONENTS[name] is rcl.LLAMA_COMPONENTS[name]
        assert rc.COMPONENTS[name]["fn"] is getattr(rcl, name) is getattr(rc, name)


@pytest.mark.parametrize("name", LLAMA)
def test_samplers_are_deterministic_float64(name):
    a, b = sample(name, 3), sample(name, 3)
    for da, db in zip(a, b):
        assert sorted(da) == sorted(db) and all(np.array_equal(da[k], db[k]) for k in da)
        assert all(v.dtype in (np.float64, np.int64) for v in da.values())


def test_mixtral_routing_is_away_from_ties():
    inputs, params, _ = sample("mixtral")
    cfg = {**rc.COMPONENTS["mixtral"]["config"], "dtype": "float64"}
    for cast in (np.float64, np.float32):
        p = {k: v.astype(cast).astype(np.float64) for k, v in params.items()}
        assert rcl._routing_gaps(p, inputs["idx"], cfg) > 1e-3


@pytest.mark.parametrize("name", LLAMA)
def test_grads_are_the_upstream_contract(name):
    inputs, params, upstream = sample(name)
    outputs, grads = run(name, inputs, params, upstream)
    assert set(outputs) >= set(upstream)
    keys = {"rope": {"x"}}.get(name, {k for k in [*inputs, *params] if k not in ("idx", "position_ids")})
    assert set(grads) == keys
    check_upstream_grads(name, inputs, params, upstream, grads)
