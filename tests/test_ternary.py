"""BitLinear (BitNet b1.58): quantisers, forward against HF transformers' BitNet layers, the
straight-through-estimator backward, packed inference (bit-identical to training), quantize_params."""

import numpy as np
import pytest
import torch

import peers
from gradcheck import check_grads, weighted_sum
from minillm import kernels
from minillm.nn import dense, ternary
from minillm.kernels import ternary as kt

torch._dynamo.config.disable = True  # HF wraps its quantisers in torch.compile: run them eagerly


def _hf():
    from transformers.integrations import bitnet

    return bitnet


def _case(rng, layout, dtype=np.float64, shape=(2, 3), O=12, I=40, bias=True):
    x = rng.standard_normal(shape + (I,)).astype(dtype)
    w = (rng.standard_normal((O, I) if layout == "out_in" else (I, O)) * 0.05).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    return x, w, b


# --- quantisers -----------------------------------------------------------------------------------


def test_weight_quant_by_hand():
    w = np.array([[0.5, -0.25, 1.5], [-2.0, 0.0, 0.25]])  # mean |w| = 0.75
    wq, s = ternary.weight_quant(w)
    assert s == 0.75
    # w / s = [2/3, -1/3, 2, -8/3, 0, 1/3] -> round, clip to [-1, 1]
    np.testing.assert_array_equal(wq, [[1, 0, 1], [-1, 0, 0]])
    # round half to even: w / s = +-0.5 -> 0, 1.5 -> 2 -> clipped 1
    wq, s = ternary.weight_quant(np.array([0.5, -0.5, 1.5, 1.5]))  # mean 1.0
    np.testing.assert_array_equal(wq, [0, 0, 1, 1])
    # all-zero weights: the scale is floored at eps, codes are 0
    wq, s = ternary.weight_quant(np.zeros((2, 2), np.float32))
    assert s.dtype == np.float32 and np.isclose(s, 1e-5) and not wq.any()


def test_activation_quant_by_hand():
    x = np.array([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 0.0]])
    xq, a = ternary.activation_quant(x)
    assert a.shape == (3, 1)
    np.testing.assert_allclose(a[:, 0], [127.0, 127 / 1e-5, 63.5])
    # 127 * [1, -0.5, 0.25] = [127, -63.5, 31.75] -> half to even: -64; row 3: [-127, 63.5 -> 64]
    np.testing.assert_array_equal(xq, [[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 0]])
    assert xq.dtype == np.float64


def test_quantisers_match_hf():
    hf = _hf()
    rng = np.random.default_rng(0)
    # activations: HF BitLinear.activation_quant runs in the input dtype -> float64, exact
    x = rng.standard_normal((3, 5, 64)) * np.array([1e-7, 1.0, 30.0, 1.0, 1.0])[:, None]
    layer = hf.BitLinear(64, 8, bias=False, dtype=torch.float64)
    hxq, ha = layer.activation_quant(torch.from_numpy(x))
    xq, a = ternary.activation_quant(x)
    np.testing.assert_array_equal(hxq.numpy(), xq)
    np.testing.assert_allclose(ha.numpy(), a, rtol=1e-15)
    # weights: HF's WeightQuant computes in float32 whatever the input dtype, so compare in float32:
    # codes equal, scales to float32 rounding (torch and numpy may sum the mean in another order)
    w = (rng.standard_normal((24, 40)) * 0.02).astype(np.float32)
    hw = hf.WeightQuant.apply(torch.from_numpy(w)).numpy()  # = round(w / s) * s, dequantised
    wq, s = ternary.weight_quant(w)
    np.testing.assert_allclose(hw, wq * s, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.sign(hw), wq)


# --- forward against HF ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_forward_matches_hf_bitlinear_float64(layout):
    """HF's packed BitLinear in float64, loaded with our packed bytes and weight_scale = 1 / s (its
    direction): y = x_q W_q^T / (a * weight_scale) + b. Both sides are exact integer products times one
    rescale, so they agree to a few float64 ulps (rtol 1e-13)."""
    rng = np.random.default_rng(1)
    x, w, b = _case(rng, layout)
    y, _ = ternary.bitlinear_forward(x, w, b, layout=layout)
    packed, s, shape = ternary.pack_weight(w, layout)
    m = peers.hf_bitlinear_packed(packed, s, shape, b)
    with torch.no_grad():
        y_hf = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_hf, rtol=1e-13, atol=1e-13 * np.abs(y).max())


def test_forward_matches_hf_autobitlinear():
    """AutoBitLinear (the class of the released microsoft/bitnet-b1.58-2B-4T, offline mode) multiplies
    by weight_scale = s = mean |W|: our direction. Its ActQuant runs in float32, so the agreement is
    float32-accurate (rtol 1e-6); online mode (WeightQuant too) gives the same."""
    rng = np.random.default_rng(2)
    x, w, _ = _case(rng, "out_in", bias=False)
    y, _ = ternary.bitlinear_forward(x, w)
    wq, s = ternary.weight_quant(w)
    off = peers.hf_autobitlinear(wq, online_quant=False, weight_scale=s)
    on = peers.hf_autobitlinear(w, online_quant=True)
    with torch.no_grad():
        for m in (off, on):
            np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), y, rtol=1e-6,
                                       atol=1e-6 * np.abs(y).max())


# --- backward: the straight-through estimator -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_ste_gradients_central_differences(layout):
    """The STE gradient is the gradient of the same function with both quantisers replaced by the
    identity on the backward path: L(x, w, b) = sum(g * ((x~0 + x - x0) op (W~0 + w - w0) + b)), where
    x~0, W~0 are the forward's quantised values at (x0, w0). Central differences of L at (x0, w0)."""
    rng = np.random.default_rng(3)
    x, w, b = _case(rng, layout, O=6, I=10)
    y, cache = ternary.bitlinear_forward(x, w, b, layout=layout)
    g = rng.standard_normal(y.shape)
    dx, dw, db = ternary.bitlinear_backward(g, cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    wq, s = ternary.weight_quant(w)
    xq, a = ternary.activation_quant(x)
    x_deq, w_deq = xq / a, wq * s
    x0, w0 = x.copy(), w.copy()
    arrays = {"x": x, "w": w, "b": b}

    def surrogate():
        wt = w_deq + (arrays["w"] - w0)
        xt = x_deq + (arrays["x"] - x0)
        return weighted_sum(xt @ (wt.T if layout == "out_in" else wt) + arrays["b"], g)

    assert np.isclose(surrogate(), weighted_sum(y, g), rtol=1e-12)  # same forward value
    check_grads(surrogate, arrays, {"x": dx, "w": dw, "b": db}, rtol=1e-6)


def _torch_ste(t, quant):
    return t + (quant(t) - t).detach()  # value quant(t), gradient the identity


def _torch_weight_quant(w):
    s = w.abs().mean().clamp(min=1e-5)
    return (w * (1.0 / s)).round().clamp(-1, 1) * s


def _torch_act_quant(x):
    a = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * a).round().clamp(-128, 127) / a


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_ste_matches_torch_autograd(layout):
    """torch autograd through the detach-trick STE, float64 (rtol 1e-12); and HF's AutoBitLinear in online
    (QAT) mode, whose WeightQuant / ActQuant have identity backwards but run in float32 (rtol 1e-6)."""
    rng = np.random.default_rng(4)
    x, w, b = _case(rng, layout, shape=(2, 5), O=8, I=24)
    y, cache = ternary.bitlinear_forward(x, w, b, layout=layout)
    g = rng.standard_normal(y.shape)
    dx, dw, db = ternary.bitlinear_backward(g, cache)
    xt, wt, bt = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    w_oi = wt if layout == "out_in" else wt.T
    yt = _torch_ste(xt, _torch_act_quant) @ _torch_ste(w_oi, _torch_weight_quant).T + bt
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(yt.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    for ours, theirs in ((dx, xt), (dw, wt), (db, bt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-12, atol=1e-12)
    if layout == "out_in":
        m = peers.hf_autobitlinear(w, b, online_quant=True)
        xh = torch.tensor(x, requires_grad=True)
        m(xh).backward(torch.from_numpy(g))
        for ours, theirs in ((dx, xh.grad), (dw, m.weight.grad), (db, m.bias.grad)):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6 * np.abs(ours).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_flows_and_no_bias(dtype):
    rng = np.random.default_rng(5)
    x, w, _ = _case(rng, "out_in", dtype=dtype, bias=False)
    y, cache = ternary.bitlinear_forward(x, w)
    dx, dw, db = ternary.bitlinear_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == dw.dtype == dtype and db is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_kernels_train_bit_identically_to_numpy_quantisers(dtype, layout, bias):
    """Training through the Numba quantisers (kernels/ternary_quant.py) gives the bits of the NumPy
    quantisers (the reference, which is what training ran before): forward, cache and STE gradients."""
    rng = np.random.default_rng(8)
    x, w, b = _case(rng, layout, dtype=dtype, shape=(3, 50), O=70, I=300, bias=bias)
    dy = rng.standard_normal((3, 50, 70)).astype(dtype)

    def run():
        y, cache = ternary.bitlinear_forward(x, w, b, layout=layout)
        return (y, *cache[:4], *(g for g in ternary.bitlinear_backward(dy, cache) if g is not None))

    with kernels.forced("reference", ops=("ternary_quant",)):
        want = run()
    got = run()
    for g, r in zip(got, want):
        g, r = np.asarray(g), np.asarray(r)
        assert g.dtype == r.dtype and g.shape == r.shape and g.tobytes() == r.tobytes()


def test_dense_layer_hook():
    """dense.dense_forward / dense_backward route config["ternary"] through bitlinear, grads keyed like p."""
    rng = np.random.default_rng(6)
    x, w, b = _case(rng, "in_out")
    p = {"weight": w, "bias": b}
    y, cache = dense.dense_forward(x, p, dense.mode({"ternary": True}, "in_out"))
    y_ref, c_ref = ternary.bitlinear_forward(x, w, b, layout="in_out")
    np.testing.assert_array_equal(y, y_ref)
    dx, grads = dense.dense_backward(np.ones_like(y), cache)
    _, dw, db = ternary.bitlinear_backward(np.ones_like(y), c_ref)
    assert set(grads) == {"weight", "bias"}
    np.testing.assert_array_equal(grads["weight"], dw)
    np.testing.assert_array_equal(grads["bias"], db)


def test_bad_input():
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="layout"):
        ternary.bitlinear_forward(x, np.zeros((3, 4)), layout="oi")
    with pytest.raises(ValueError, match="features"):
        ternary.bitlinear_forward(x, np.zeros((4, 3)), layout="out_in")
    with pytest.raises(ValueError, match="2-D"):
        ternary.bitlinear_forward(x, np.zeros(4))
    packed, s, shape = ternary.pack_weight(np.ones((3, 4)))
    with pytest.raises(ValueError, match="features"):
        ternary.packed_linear_forward(np.zeros((2, 5)), packed, s, shape)


# --- packed inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("shape", [(1, 1), (1,), (3, 7)])
def test_packed_forward_bit_identical(dtype, layout, shape):
    """The packed integer kernel reproduces the training forward exactly (same tokens when sampling)."""
    rng = np.random.default_rng(7)
    x, w, b = _case(rng, layout, dtype=dtype, shape=shape, O=13, I=150)
    for bias in (b, None):
        y, _ = ternary.bitlinear_forward(x, w, bias, layout=layout)
        packed, s, wshape = ternary.pack_weight(w, layout)
        assert packed.shape == (4, 150) and s.dtype == dtype and wshape == (13, 150)
        y_packed = ternary.packed_linear_forward(x, packed, s, wshape, bias)
        assert y_packed.dtype == dtype
        np.testing.assert_array_equal(y_packed, y)


def _toy_params(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    block = {"ln_1": {"weight": f(8), "bias": f(8)},
             "attn": {"c_attn": {"weight": f(8, 24), "bias": f(24)}, "c_proj": {"weight": f(8, 8)}},
             "mlp": {"c_fc": {"weight": f(8, 30)}, "down": {"weight": f(5, 30)}}}
    return {"wte": {"weight": f(50, 8)}, "h": {"0": block}, "lm_head": {"weight": f(50, 8)}}


def test_quantize_params():
    rng = np.random.default_rng(8)
    params = _toy_params(rng)
    packed, scales = ternary.quantize_params(params, {"arch": "gpt"})
    shapes = ternary.packed_shapes(params, {"arch": "gpt"})
    names = {"h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight",
             "h.0.mlp.down.weight"}
    assert set(packed) == set(scales) == set(shapes) == names  # no embeddings, head, norms, biases
    assert shapes["h.0.attn.c_attn.weight"] == (24, 8)  # Conv1D (in, out) read as (out, in)
    assert shapes["h.0.mlp.down.weight"] == (5, 30)     # nn.Linear (out, in)
    for name, layout in (("h.0.attn.c_attn.weight", "in_out"), ("h.0.mlp.down.weight", "out_in")):
        node = params["h"]["0"]["attn" if "attn" in name else "mlp"][name.split(".")[3]]
        assert packed[name].dtype == np.uint8 and packed[name].shape == (kt.packed_rows(shapes[name][0]),
                                                                          shapes[name][1])
        assert scales[name].shape == (1,) and scales[name].dtype == np.float32
        wq, s = ternary.weight_quant(node["weight"])
        np.testing.assert_array_equal(
            ternary.dequantize_weight(packed[name], scales[name], shapes[name], layout), wq * s)
