"""models/llama.py and models/mixtral.py: float64 gradient checks, and HF LlamaForCausalLM /
MistralForCausalLM / MixtralForCausalLM with the same weights: logits, loss (Mixtral: with its router
aux loss) and every parameter gradient, KV-cache steps, greedy decoding, loading our files with
from_pretrained.

HF computes the RMSNorm, the rotary tables, the eager attention softmax and Mixtral's router in float32
even for float64 weights; the float64 comparisons run under peers.llama_float64 (those casts disabled,
rtol 1e-9) and also check the genuine code, which is float32-accurate (rtol 1e-5). B T n_layer = 32 tokens
so that HF's float32 token fractions in load_balancing_loss_func are exact.
"""

import contextlib
import os

import numpy as np
import pytest
import torch

import peers
from gradcheck import check_grads
from minillm import models
from minillm.nn import ops
from minillm.tree import flatten

V, T = 37, 8


def _model(arch, rng_seed=0, **kw):
    model = models.get_model(arch)
    config = models.build_config(arch, vocab_size=V, context=T, n_layer=2, n_head=4, d_model=16,
                                 dtype="float64", **kw)
    params = model.init(config, np.random.default_rng(rng_seed))
    noise = np.random.default_rng(rng_seed + 1)
    for a in flatten(params).values():                   # no norm weight at 1, no tiny projection
        a += noise.standard_normal(a.shape) * (0.3 if a.ndim == 1 else 0.1)
    return model, config, params


def _loss_and_grads(model, params, idx, config):
    """HF's loss: mean cross-entropy of the shifted labels (+ aux_loss_coef * aux) and its gradients."""
    logits, cache = model.forward(params, idx, config)
    loss, lc = ops.cross_entropy_forward(logits[:, :-1], idx[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = ops.cross_entropy_backward(1.0, lc)
    return logits, loss + model.aux_loss(cache), flatten(model.backward(dlogits, cache))


CASES = [("llama", dict(n_kv_head=1)), ("llama", dict(n_kv_head=2)), ("llama", dict(n_kv_head=4)),
         ("llama", dict(n_kv_head=2, tie_embeddings=True)), ("llama", dict(n_kv_head=2, sliding_window=3)),
         ("mixtral", dict(n_kv_head=2, n_experts=4, top_k=2)),
         ("mixtral", dict(n_kv_head=1, n_experts=3, top_k=1, sliding_window=5))]
IDS = ["mqa", "gqa", "mha", "tied", "mistral-window", "mixtral", "mixtral-window-top1"]


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch, kw", CASES, ids=IDS)
def test_equals_hf_logits_loss_and_every_gradient(arch, kw):
    model, config, params = _model(arch, **kw)
    idx = np.random.default_rng(2).integers(0, V, (2, T))
    logits, loss, grads = _loss_and_grads(model, params, idx, config)
    for context, rtol in ((peers.llama_float64, 1e-9), (contextlib.nullcontext, 1e-5)):
        with context():
            hf = peers.hf_llama(params, config)
            out = hf(input_ids=torch.tensor(idx), labels=torch.tensor(idx))
            out.loss.backward()
        theirs = peers.llama_grads(hf, config)
        assert sorted(theirs) == sorted(grads)
        assert rel(logits, out.logits.detach()) < rtol
        assert abs(loss - out.loss.item()) < rtol * loss
        errors = {n: rel(g, theirs[n]) for n, g in grads.items()}
        assert max(errors.values()) < rtol, {n: e for n, e in errors.items() if e >= rtol}


@pytest.mark.parametrize("arch, kw", [CASES[1], CASES[3], CASES[5]], ids=["gqa", "tied", "mixtral"])
def test_gradients_float64_finite_differences(arch, kw):
    model, config, params = _model(arch, rng_seed=3, **kw)
    idx = np.random.default_rng(4).integers(0, V, (2, T))
    _, _, grads = _loss_and_grads(model, params, idx, config)
    check_grads(lambda: _loss_and_grads(model, params, idx, config)[1], flatten(params), grads,
                rtol=1e-6, max_entries=4)


@pytest.mark.parametrize("arch, kw", [CASES[0], CASES[4], CASES[5]], ids=["mqa", "window", "mixtral"])
def test_kv_cache_steps_equal_the_forward_past_the_context(arch, kw):
    model, config, params = _model(arch, **kw)
    idx = np.random.default_rng(5).integers(0, V, (3, 2 * T + 1))         # beyond `context`: the cache grows
    logits, _ = model.forward(params, idx, config)
    state = model.init_state(params, config, 3)
    steps = [model.step(params, idx[:, t], state)[0] for t in range(idx.shape[1])]
    np.testing.assert_allclose(np.stack(steps, 1), logits, rtol=1e-10, atol=1e-11)
    assert state["pos"] == 2 * T + 1


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch, kw", [CASES[1], CASES[4], CASES[5]], ids=["gqa", "window", "mixtral"])
def test_greedy_decoding_equals_hf_generate(arch, kw):
    from minillm import generate

    model, config, params = _model(arch, rng_seed=6, **kw)
    prompt = [3, 1, 4]
    ours = generate.generate(model, params, config, [prompt], 12, np.random.default_rng(0), temperature=0)[0]
    with peers.llama_float64():
        hf = peers.hf_llama(params, config).eval()
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_our_weights_load_with_from_pretrained(arch, tmp_path):
    """The released-checkpoint names: HF's own loader (which renames Mixtral's block_sparse_moe experts and
    fuses them) reads our state dict as it is, next to HF's config."""
    import safetensors.numpy
    from transformers import AutoModelForCausalLM

    model = models.get_model(arch)
    config = models.build_config(arch, vocab_size=V, context=T, n_layer=2, n_head=4, d_model=16, n_kv_head=2,
                                 n_experts=4 if arch == "mixtral" else None)
    if arch == "mixtral":
        config = {**model.DEFAULTS, **config}
    params = model.init(config, np.random.default_rng(0))
    peers.llama_config(config).save_pretrained(tmp_path)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in flatten(params).items()},
                                os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    idx = np.random.default_rng(1).integers(0, V, (2, T))
    np.testing.assert_allclose(hf(input_ids=torch.tensor(idx)).logits.detach().numpy(),
                               model.forward(params, idx, config)[0], rtol=1e-4, atol=1e-5)


def test_mixtral_aux_loss_and_stats():
    model, config, params = _model("mixtral", n_experts=4, top_k=2)
    _, cache = model.forward(params, np.random.default_rng(7).integers(0, V, (2, T)), config)
    stats = model.stats(cache)
    assert stats["expert_tokens"].sum() == 2 * T * 2 * config["n_layer"]
    assert 1.5 < stats["balance_loss"] < 2.5            # top_k = 2 at perfect balance
    assert model.aux_loss(cache) == pytest.approx(config["aux_loss_coef"] * stats["balance_loss"])
    with pytest.raises(ValueError, match="top-k"):
        model.init({**config, "top_k": 5}, np.random.default_rng(0))


def test_facts():
    llama, mixtral = models.get_model("llama"), models.get_model("mixtral")
    assert (llama.HF_CLASS, mixtral.HF_CLASS) == ("LlamaForCausalLM", "MixtralForCausalLM")
    assert not llama.BOUNDED_POSITIONS and "n_kv_head" in llama.OPTIONS and "n_experts" in mixtral.OPTIONS
    assert llama.d_ff_of({"d_model": 128}) == 352 and llama.d_ff_of({"d_model": 384}) == 1024
