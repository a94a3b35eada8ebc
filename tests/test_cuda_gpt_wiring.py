"""The GPU path of GPT's forward/backward and of the loss, without a GPU: the one kernel dispatch is forced to
the CUDA forms for host arrays (kernels.forced("cuda")), so the numba.cuda kernels (in Numba's CUDA simulator, or on a real GPU
when there is one) run inside the model where CuPy arrays would take them. This checks the wiring (which
kernel each step calls, that their caches fit together) against the CPU path; tests/test_cuda_models.py
checks the whole GPU path with CuPy where a GPU exists."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minillm import kernels  # noqa: E402
from minillm.models import gpt  # noqa: E402
from minillm.nn import ops  # noqa: E402
from minillm.kernels import gelu_cuda, layernorm_cuda, softmax_cuda  # noqa: E402

CONFIG = {"arch": "gpt", "vocab_size": 11, "context": 6, "n_layer": 2, "n_head": 2, "d_model": 8,
          "dtype": "float64"}


@pytest.fixture(autouse=True)
def quick_simulator(monkeypatch, fast_simulator_threads):
    """Blocks of 8 threads (rows still span several) and frequent thread switches: the simulator runs each
    GPU thread as a Python thread and polls at every barrier."""
    monkeypatch.setattr(softmax_cuda, "MIN_THREADS", 8)
    monkeypatch.setattr(softmax_cuda, "MAX_THREADS", 8)


def _step(params, idx, targets):
    logits, cache = gpt.forward(params, idx, CONFIG)
    loss, loss_cache = ops.cross_entropy_forward(logits, targets)
    return logits, loss, gpt.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)


def test_gpt_step_through_the_cuda_kernels_equals_the_cpu_path(monkeypatch):
    rng = np.random.default_rng(0)
    params = gpt.init(CONFIG, rng)
    idx = rng.integers(0, 11, (2, 5))
    targets = rng.integers(0, 11, (2, 5))
    want_logits, want_loss, want_grads = _step(params, idx, targets)

    calls = []

    def spy(module, name):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{name}")
            return fn(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    for module, names in ((layernorm_cuda, ("forward", "backward")),
                          (gelu_cuda, ("forward", "backward")),
                          (softmax_cuda, ("causal", "causal_backward",
                                          "cross_entropy_forward", "cross_entropy_backward"))):
        for name in names:
            spy(module, name)
    with kernels.forced("cuda", ops=("layernorm", "gelu", "softmax")):  # the CUDA kernels on host arrays
        logits, loss, grads = _step(params, idx, targets)

    L = CONFIG["n_layer"]
    assert calls.count("layernorm_cuda.forward") == 2 * L + 1 and calls.count("layernorm_cuda.backward") == 2 * L + 1
    assert calls.count("gelu_cuda.forward") == L and calls.count("gelu_cuda.backward") == L
    assert calls.count("softmax_cuda.causal") == L and calls.count("softmax_cuda.causal_backward") == L
    assert (calls.count("softmax_cuda.cross_entropy_forward") == 1
            and calls.count("softmax_cuda.cross_entropy_backward") == 1)
    # float64: the same operations, summed in other (fixed) orders by the kernels' trees
    np.testing.assert_allclose(logits, want_logits, rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    flat, want = gpt_flat(grads), gpt_flat(want_grads)
    assert flat.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(flat[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def gpt_flat(tree):
    from minillm.tree import flatten

    return flatten(tree)


def test_gpt_decoding_step_through_the_cuda_softmax_equals_the_cpu_path(monkeypatch):
    rng = np.random.default_rng(1)
    params = gpt.init(CONFIG, rng)
    tokens = rng.integers(0, 11, (2, 3))

    def decode():
        state = gpt.init_state(params, CONFIG, 2)
        out = []
        for t in range(tokens.shape[1]):
            logits, state = gpt.step(params, tokens[:, t], state)
            out.append(logits)
        return np.stack(out)

    want = decode()
    calls = []
    rows = softmax_cuda.rows
    monkeypatch.setattr(softmax_cuda, "rows", lambda s: calls.append(1) or rows(s))
    with kernels.forced("cuda", ops=("softmax",)):
        got = decode()
    assert len(calls) == CONFIG["n_layer"] * tokens.shape[1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
