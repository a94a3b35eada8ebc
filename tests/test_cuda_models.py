"""Every architecture on a real GPU (CuPy arrays) equals the CPU path; needs CuPy and an NVIDIA GPU.

float32 tolerance (rtol 1e-3 on logits and gradients): cuBLAS and OpenBLAS sum in different orders and
the CUDA kernels use libdevice's exp, so results agree to float32 rounding amplified by depth, not bitwise.
"""

import os

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the CUDA simulator cannot run CuPy models", allow_module_level=True)

from minillm import device, generate, models, train  # noqa: E402
from minillm.tree import flatten  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_forward_backward_match_the_cpu(arch):
    config = models.build_config(arch, vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32)
    model = models.get_model(arch)
    params = model.init(config, np.random.default_rng(0))
    idx = np.random.default_rng(1).integers(0, 64, (2, 16))
    logits, cache = model.forward(params, idx, config)
    grads = model.backward(np.ones_like(logits) / logits.size, cache)
    gparams = device.to_device(params, cupy)
    glogits, gcache = model.forward(gparams, cupy.asarray(idx), config)
    ggrads = model.backward(cupy.ones_like(glogits) / glogits.size, gcache)
    np.testing.assert_allclose(glogits.get(), logits, rtol=1e-3, atol=1e-4)
    for name, g in flatten(grads).items():
        np.testing.assert_allclose(device.to_host(flatten(ggrads)[name]), g, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_train_and_sample_on_the_gpu(arch, tmp_path):
    corpus = tmp_path / "c.txt"
    with open(os.path.join(HERE, "..", "data", "headlines.txt"), encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    losses = {}
    for dev in ("cpu", "cuda"):
        opts = train.TrainOptions(steps=3, batch_size=4, warmup=1, eval_every=10, eval_batches=1,
                                  out=str(tmp_path / dev), progress=False, device=dev)
        config = dict(arch=arch, vocab_size=300, context=16, n_layer=1, n_head=2, d_model=32)
        losses[dev] = train.train(str(corpus), opts, config, log=lambda m: None)["val_loss"]
    assert abs(losses["cuda"] - losses["cpu"]) < 1e-3 * losses["cpu"]
    lines = generate.sample_lines(str(tmp_path / "cuda"), 2, max_tokens=5, device="cuda")
    assert len(lines) == 2


def test_gpu_training_is_bit_reproducible(tmp_path):
    """The same seed twice on the GPU gives bit-identical weights: every kernel sums in a fixed order (no
    float atomics; the embedding backward sorts instead of cupy.add.at)."""
    corpus = tmp_path / "c.txt"
    with open(os.path.join(HERE, "..", "data", "headlines.txt"), encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    weights = []
    for run in ("a", "b"):
        opts = train.TrainOptions(steps=4, batch_size=4, warmup=1, eval_every=10, eval_batches=1,
                                  out=str(tmp_path / run), progress=False, device="cuda")
        config = dict(arch="gpt", vocab_size=300, context=16, n_layer=2, n_head=2, d_model=32)
        train.train(str(corpus), opts, config, log=lambda m: None)
        with open(tmp_path / run / "model.safetensors", "rb") as f:
            weights.append(f.read())
    assert weights[0] == weights[1]
