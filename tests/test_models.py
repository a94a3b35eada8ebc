"""models.py: every registered architecture offers the model API; configs are validated."""

import numpy as np
import pytest

from minillm import models
from minillm.tree import flatten

API = ("init", "forward", "backward", "init_state", "step")


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_every_architecture_runs_the_model_api(arch):
    model = models.get_model(arch)
    assert all(callable(getattr(model, name)) for name in API)
    config = models.build_config(arch, vocab_size=50, context=8, n_layer=1, n_head=2, d_model=16)
    params = model.init(config, np.random.default_rng(0))
    idx = np.random.default_rng(1).integers(0, 50, (2, 8))
    logits, cache = model.forward(params, idx, config)
    assert logits.shape == (2, 8, 50) and logits.dtype == np.float32
    grads = model.backward(np.ones_like(logits), cache)
    assert {n: g.shape for n, g in flatten(grads).items()} == {n: p.shape for n, p in flatten(params).items()}
    state = model.init_state(params, config, 2)
    step_logits, _ = model.step(params, idx[:, 0], state)
    np.testing.assert_allclose(step_logits, logits[:, 0], rtol=1e-4, atol=1e-5)


def test_build_config_merges_defaults_and_overrides():
    config = models.build_config("mamba", d_state=8, context=None)
    assert config["arch"] == "mamba" and config["d_state"] == 8
    assert config["context"] == models.BASE_DEFAULTS["context"] and "d_conv" in config


@pytest.mark.parametrize("overrides, match", [({"d_model": 30, "n_head": 4}, "divisible"),
                                              ({"n_layer": 0}, "positive")])
def test_build_config_rejects_bad_sizes(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build_config("gpt", **overrides)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'transformer-xl'"):
        models.get_model("transformer-xl")


def test_token_ids_and_dtype_are_checked():
    config = models.build_config("gpt", vocab_size=10)
    assert models.check_token_ids([1, 2], config).tolist() == [1, 2]
    with pytest.raises(ValueError, match="outside"):
        models.check_token_ids(np.array([0, 10]), config)
    with pytest.raises(ValueError, match="integer"):
        models.check_token_ids(np.zeros(2), config, "tokens")
    assert models.param_dtype({"dtype": "float64"}) == np.float64
    with pytest.raises(ValueError, match="float16"):
        models.param_dtype({"dtype": "float16"})
