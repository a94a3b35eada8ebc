"""AdamW, gradient clipping and the LR schedule against torch on the same tensors (float64)."""

import math

import numpy as np
import pytest
import torch

from minillm.optim import (adamw_init, adamw_step, clip_grad_norm, decay_mask, lr_at)
from minillm.tree import flatten, unflatten


def make_params(rng, dtype=np.float64):
    """A small GPT-like tree: embeddings, a norm, a dense layer with bias, a (1,1,C) vector."""
    shapes = {
        "wte.weight": (11, 6), "wpe.weight": (5, 6),
        "h.0.ln_1.weight": (6,), "h.0.ln_1.bias": (6,),
        "h.0.attn.c_attn.weight": (6, 18), "h.0.attn.c_attn.bias": (18,),
        "h.0.mlp.c_fc.weight": (6, 24), "h.0.mix.time_mix_k": (1, 1, 6),
    }
    return unflatten({k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()})


def make_grads(params, rng):
    return unflatten({k: rng.standard_normal(p.shape) for k, p in flatten(params).items()})


def test_decay_mask_rule():
    mask = decay_mask(flatten(make_params(np.random.default_rng(0))))
    assert mask == {
        "wte.weight": False, "wpe.weight": False, "h.0.ln_1.weight": False,
        "h.0.ln_1.bias": False, "h.0.attn.c_attn.weight": True, "h.0.attn.c_attn.bias": False,
        "h.0.mlp.c_fc.weight": True, "h.0.mix.time_mix_k": False,
    }
    z = np.zeros((4, 4))
    more = decay_mask({"model.embed_tokens.weight": z, "lm_head.weight": z,
                       "backbone.embeddings.weight": z, "layers.0.mixer.A_log": z,
                       "layers.0.mixer.conv1d.weight": np.zeros((4, 1, 3)),
                       "q.lora_A": np.zeros((2, 4)), "q.lora_B": np.zeros((4, 2))})
    assert [k for k, d in more.items() if d] == ["layers.0.mixer.conv1d.weight", "q.lora_A",
                                                  "q.lora_B"]


def torch_adamw(params, grads_seq, lrs, betas, eps, wd):
    """Run torch.optim.AdamW with two param groups (decay / no decay) and return final params."""
    flat = flatten(params)
    mask = decay_mask(flat)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in flat.items()}
    opt = torch.optim.AdamW(
        [{"params": [tp[k] for k in flat if mask[k]], "weight_decay": wd},
         {"params": [tp[k] for k in flat if not mask[k]], "weight_decay": 0.0}],
        lr=lrs[0], betas=betas, eps=eps, foreach=False)
    for lr, grads in zip(lrs, grads_seq):
        for g in opt.param_groups:
            g["lr"] = lr
        fg = flatten(grads)
        for k, t in tp.items():
            t.grad = torch.tensor(fg[k])
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


@pytest.mark.parametrize("n_steps", [1, 7])
def test_adamw_matches_torch(n_steps):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    grads_seq = [make_grads(params, rng) for _ in range(n_steps)]
    lrs = [lr_at(s, 3e-2, 3, n_steps) for s in range(n_steps)]
    betas, eps, wd = (0.9, 0.95), 1e-8, 0.1
    expected = torch_adamw(params, grads_seq, lrs, betas, eps, wd)
    state = adamw_init(params)
    for lr, grads in zip(lrs, grads_seq):
        adamw_step(params, grads, state, lr, betas=betas, eps=eps, weight_decay=wd)
    assert state["step"] == n_steps
    for k, p in flatten(params).items():
        # Same operations as torch's single-tensor path; torch's CPU kernels fuse multiply-adds
        # (FMA) in lerp/addcmul, so float64 results differ by a few ulps (observed <= 5e-16 abs
        # on O(1) params after 7 steps): 1e-13 relative is rounding, a wrong formula is >> 1e-6.
        np.testing.assert_allclose(p, expected[k], rtol=1e-13, atol=1e-14, err_msg=k)


def test_adamw_float32_stays_float32_and_close_to_torch():
    rng = np.random.default_rng(2)
    params = make_params(rng, np.float32)
    grads = unflatten({k: v.astype(np.float32) for k, v in flatten(make_grads(params, rng)).items()})
    expected = torch_adamw(params, [grads], [1e-2], (0.9, 0.95), 1e-8, 0.1)
    state = adamw_init(params)
    adamw_step(params, grads, state, 1e-2)
    for k, p in flatten(params).items():
        assert p.dtype == np.float32 and state["m"][k].dtype == np.float32
        np.testing.assert_allclose(p, expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_adamw_trainable_freezes_bit_exactly():
    rng = np.random.default_rng(3)
    params = make_params(rng)
    before = {k: v.copy() for k, v in flatten(params).items()}
    trainable = {"h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias"}
    state = adamw_init(params, trainable=trainable)
    assert set(state["m"]) == trainable == set(state["v"])
    grads = make_grads(params, rng)
    # A predicate works as well as a set; gradients for frozen params are simply ignored.
    adamw_step(params, grads, state, 1e-2, trainable=lambda n: n in trainable)
    for k, p in flatten(params).items():
        if k in trainable:
            assert not np.array_equal(p, before[k])
        else:
            assert p.tobytes() == before[k].tobytes(), k
    # Frozen params need no gradient at all.
    only = {"h": {"0": {"attn": {"c_attn": flatten(grads["h"]["0"]["attn"]["c_attn"])}}}}
    adamw_step(params, only, state, 1e-2, trainable=trainable)
    adamw_step(params, only, state, 1e-2)      # default: the params that have moments
    assert state["step"] == 3
    for k, p in flatten(params).items():
        assert k in trainable or p.tobytes() == before[k].tobytes(), k


def test_adamw_bad_calls_leave_everything_intact():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    before = {k: v.copy() for k, v in flatten(params).items()}
    state = adamw_init(params)
    grads = flatten(make_grads(params, rng))
    missing = dict(grads)
    del missing["h.0.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="no gradient for trainable parameter 'h.0.mlp.c_fc"):
        adamw_step(params, missing, state, 1e-2)
    wrong = dict(grads, **{"wte.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"gradient of 'wte.weight' has shape \(3, 3\)"):
        adamw_step(params, wrong, state, 1e-2)
    with pytest.raises(ValueError, match="no optimizer state"):
        adamw_step(params, grads, adamw_init(params, trainable=set()), 1e-2,
                   trainable={"wte.weight"})
    with pytest.raises(ValueError, match="unknown parameters"):
        adamw_step(params, grads, adamw_init(dict(params, extra=np.zeros(2))), 1e-2)
    with pytest.raises(ValueError, match="betas"):
        adamw_step(params, grads, state, 1e-2, betas=(1.0, 0.9))
    assert state["step"] == 0
    for k, p in flatten(params).items():
        assert p.tobytes() == before[k].tobytes()


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    rng = np.random.default_rng(5)
    grads = make_grads(make_params(rng), rng)
    flat = flatten(grads)
    ts = [torch.tensor(g.copy(), requires_grad=True) for g in flat.values()]
    for t in ts:
        t.grad = t.detach().clone()
    expected_total = float(torch.nn.utils.clip_grad_norm_(ts, max_norm))
    total = clip_grad_norm(grads, max_norm)
    assert math.isclose(total, expected_total, rel_tol=1e-14)
    for g, t in zip(flat.values(), ts):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-14, atol=0)
    if max_norm > total:
        return
    assert math.isclose(math.sqrt(sum(float((g * g).sum()) for g in flat.values())),
                        max_norm, rel_tol=1e-5)


def test_clip_grad_norm_nonfinite_and_bad_max():
    grads = {"a": np.array([1.0, np.inf]), "b": np.array([1.0])}
    assert clip_grad_norm(grads, 1.0) == math.inf
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


def test_lr_schedule_shape():
    max_lr, warm, total = 1e-3, 10, 100
    lrs = [lr_at(s, max_lr, warm, total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(max_lr / warm) and lrs[0] > 0
    assert all(b > a for a, b in zip(lrs[:warm - 1], lrs[1:warm]))      # linear ramp up
    assert lrs[warm - 1] == pytest.approx(max_lr) and lrs[warm] == pytest.approx(max_lr)
    assert all(b <= a for a, b in zip(lrs[warm:total], lrs[warm + 1:total]))  # cosine decay
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.55 * max_lr)        # halfway: midpoint of max and min
    assert lrs[total - 1] == pytest.approx(0.1 * max_lr, rel=1e-2)
    assert lrs[total:] == [pytest.approx(0.1 * max_lr)] * 5
    assert lr_at(0, 1.0, 0, 10) == 1.0 and lr_at(5, 1.0, 0, 10, min_lr_ratio=0.0) == 0.5
    with pytest.raises(ValueError):
        lr_at(-1, 1.0, 0, 10)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 0, 10, min_lr_ratio=2.0)
