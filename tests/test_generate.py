"""generate.py: logit filters against HF's warpers, determinism, stopping, context limits."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from minillm import generate

rng = np.random.default_rng(0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                       (0.9, 10, 0.6), (1.0, 1, None)])
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    logits = rng.standard_normal((3, 40)) * 3
    ours = generate.filter_logits(logits, temperature, top_k, top_p)
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.log_softmax(scores, dim=-1).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    keep = np.isfinite(ref)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-12, atol=1e-12)


def test_top_k_keeps_ties_at_the_boundary():
    logits = np.array([[3.0, 2.0, 2.0, 1.0]])
    kept = np.isfinite(generate.filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_follows_the_distribution_and_is_seeded():
    logits = np.log(np.array([[0.1, 0.6, 0.3]]).repeat(20000, axis=0))
    a = generate.sample_next(logits, np.random.default_rng(1))
    b = generate.sample_next(logits, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    freq = np.bincount(a, minlength=3) / len(a)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.015)
    assert generate.sample_next(logits[:2], None, temperature=0).tolist() == [1, 1]


class Counter:
    """A toy model whose next token is always (last token + 1) mod V: checks the loop, not a network."""

    V = 7

    @staticmethod
    def init_state(params, config, batch):
        return None

    @staticmethod
    def step(params, tokens, state):
        logits = np.full((len(tokens), Counter.V), -1e9)
        logits[np.arange(len(tokens)), (tokens + 1) % Counter.V] = 0.0
        return logits, state


class PositionalCounter(Counter):
    """As Counter, with GPT's learned positions: a state that holds at most `context` tokens."""
    BOUNDED_POSITIONS = True

    @staticmethod
    def init_state(params, config, batch):
        return {"pos": 0, "context": config["context"], "seen": []}

    @staticmethod
    def step(params, tokens, state):
        if state["pos"] >= state["context"]:
            raise ValueError("the context is full")
        state["pos"] += 1
        state["seen"].append(int(tokens[0]))
        return Counter.step(params, tokens, state)[0], state


def test_generate_stops_at_stop_id_and_slides_past_the_context():
    out = generate.generate(Counter, None, {"arch": "mamba"}, [[2], [5]], 20, np.random.default_rng(0), stop_id=6)
    assert out == [[3, 4, 5], []]
    out = generate.generate(Counter, None, {"arch": "mamba"}, [[2]], 20, np.random.default_rng(0), stop_id={5, 6})
    assert out == [[3, 4]]
    # context 4: the window slides (the last 2 tokens read again) instead of stopping at 2 new tokens
    out = generate.generate(PositionalCounter, None, {"arch": "gpt", "context": 4}, [[0, 1]], 20,
                            np.random.default_rng(0))
    assert out == [[(2 + i) % Counter.V for i in range(20)]]
    # a prompt longer than the context: its last `context` tokens are read
    out = generate.generate(PositionalCounter, None, {"arch": "gpt", "context": 2}, [[0, 1, 2, 3]], 5,
                            np.random.default_rng(0))
    assert out == [[4, 5, 6, 0, 1]]


def test_escape_controls_keeps_one_line():
    assert generate.escape_controls("a\nb\tc\x1b[0m\x7f é") == "a\\nb\\tc\\x1b[0m\\x7f é"
