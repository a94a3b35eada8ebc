"""nn/rope.py: the rotary embedding pair, HF's tables, and Meta's interleaved layout as a permutation."""

import numpy as np
import pytest
import torch

from gradcheck import check_grads, weighted_sum
from minillm.nn import rope


def test_rope_gradient_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 8))
    cos, sin = rope.tables(np.arange(5), 8, 100.0)
    g = rng.standard_normal(x.shape)
    y, cache = rope.rope_forward(x, cos, sin)
    check_grads(lambda: weighted_sum(rope.rope_forward(x, cos, sin)[0], g), {"x": x},
                {"x": rope.rope_backward(g, cache)})


def test_rope_is_a_rotation_and_scores_depend_on_distance_only():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 16))
    cos, sin = rope.tables(np.arange(40), 16, 10000.0)
    rot = lambda v, p: rope.rope_forward(v[None, :], cos[p:p + 1], sin[p:p + 1])[0][0]  # noqa: E731
    assert np.isclose(np.linalg.norm(rot(q, 7)), np.linalg.norm(q), rtol=1e-14)
    assert np.isclose(rot(q, 9) @ rot(k, 4), rot(q, 35) @ rot(k, 30), rtol=1e-12)   # both at distance 5


def test_tables_and_rotation_equal_hf_in_float64():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    theta, hd, T = 500.0, 8, 6
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)        # HF's, in float64
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    x = torch.randn(2, 3, T, hd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])   # (1, T, hd) tables
    got, _ = rope.rope_forward(x.numpy(), *rope.tables(np.arange(T), hd, theta))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-15)
    assert LlamaConfig().rope_parameters["rope_theta"] == 10000.0                    # our default


def _permute(w, n_heads):
    """HF's convert_llama_weights_to_hf.py: Meta's interleaved rows of W_q / W_k -> half-split rows."""
    dim1, dim2 = w.shape
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def test_meta_interleaved_layout_equals_half_split_after_hf_permutation():
    rng = np.random.default_rng(2)
    H, hd, C, T = 2, 8, 12, 5
    wq, wk = rng.standard_normal((2, H * hd, C))
    x = rng.standard_normal((T, C))
    angles = np.arange(T)[:, None] * rope.frequencies(hd, 10000.0)[None, :]      # (T, hd/2)

    def meta(w):   # Meta's apply_rotary_emb: interleaved pairs as complex numbers times e^{i p theta}
        v = (x @ w.T).reshape(T, H, hd // 2, 2)
        z = (v[..., 0] + 1j * v[..., 1]) * np.exp(1j * angles)[:, None, :]
        return np.stack([z.real, z.imag], axis=-1).reshape(T, H, hd).transpose(1, 0, 2)

    def hf(w):
        v = (x @ _permute(w, H).T).reshape(T, H, hd).transpose(1, 0, 2)
        return rope.rope_forward(v, *rope.tables(np.arange(T), hd, 10000.0))[0]

    scores_meta = meta(wq) @ meta(wk).transpose(0, 2, 1)
    scores_hf = hf(wq) @ hf(wk).transpose(0, 2, 1)
    np.testing.assert_allclose(scores_hf, scores_meta, rtol=1e-12, atol=1e-12)
    assert not np.allclose(hf(wq), meta(wq))          # the rotated vectors themselves are permuted


@pytest.mark.parametrize("hd, theta", [(7, 10000.0), (8, 0.0)])
def test_bad_sizes_are_refused(hd, theta):
    with pytest.raises(ValueError):
        rope.frequencies(hd, theta)
