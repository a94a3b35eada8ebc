"""kernels/__init__.py: the one dispatch picks the Numba kernel for host arrays, the CUDA kernel for GPU
arrays, and the forms that `forced` asks for (all ops, or the named ones)."""

import numpy as np
import pytest

from minillm import kernels
from minillm.kernels import gelu, layernorm


class FakeDeviceArray:
    __cuda_array_interface__ = {}


def test_host_arrays_take_the_numba_kernel_and_gpu_arrays_the_cuda_one():
    x = np.zeros(3)
    assert kernels.pick("gelu", "forward", x) is gelu.forward
    assert kernels.implementation_for(x) == "numba"
    assert kernels.implementation_for(FakeDeviceArray()) == "cuda"
    assert kernels.on_gpu(FakeDeviceArray()) and not kernels.on_gpu(x)


def test_forced_reference_for_all_or_some_ops():
    x = np.zeros(3)
    with kernels.forced("reference"):
        assert kernels.pick("gelu", "forward", x) is gelu.forward_reference
        assert kernels.select("layernorm", x).backward is layernorm.backward_reference
    with kernels.forced("reference", ops=("gelu",)):
        assert kernels.pick("gelu", "backward", x) is gelu.backward_reference
        assert kernels.pick("layernorm", "forward", x) is layernorm.forward
    assert kernels.pick("gelu", "forward", x) is gelu.forward          # restored on exit
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        with kernels.forced("fortran"):
            pass


def test_every_kernel_name_has_its_reference_and_cuda_twin():
    """The names models call through the dispatch exist in all three forms."""
    import importlib

    names = {"gelu": ["forward", "backward"], "layernorm": ["forward", "backward", "rows"],
             "softmax": ["causal", "causal_backward", "rows", "cross_entropy_forward", "cross_entropy_backward"],
             "embedding": ["backward"], "scan": ["forward", "backward"], "wkv": ["forward", "backward"],
             "moe": ["dispatch", "combine", "combine_backward", "swiglu", "swiglu_backward"],
             "ternary": ["matmul", "matvec"], "adamw": ["update"],
             "ternary_quant": ["weight_quant", "activation_quant", "rescale", "weight_dequant",
                               "activation_dequant"]}
    for op, fns in names.items():
        cpu = importlib.import_module(f"minillm.kernels.{op}")
        for fn in fns:
            assert callable(getattr(cpu, fn)) and callable(getattr(cpu, fn + "_reference")), (op, fn)
            source = importlib.util.find_spec(f"minillm.kernels.{op}_cuda").origin
            assert f"def {fn}(" in open(source).read(), (op, fn)
