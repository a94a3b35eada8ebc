"""data.py: documents, splitting, batches, the token cache."""

import numpy as np
import pytest

from minillm import data


class CharTokenizer:
    """One id per byte, 256 = <|endoftext|>: enough to test the data plumbing."""

    eot_id = 256

    def encode_batch(self, texts):
        return [list(s.encode()) for s in texts]

    def to_json(self):
        return '{"char": 1}'


def test_documents_are_joined_with_eot():
    ids = data.encode_documents("ab\n\n c\n", CharTokenizer(), progress=False)
    assert ids.tolist() == [97, 98, 256, 32, 99, 256]


def test_split_and_batches_are_deterministic(tmp_path):
    ids = np.arange(1000, dtype=np.int32)
    train, val = data.split(ids, 0.1)
    assert len(val) == 100 and train[-1] + 1 == val[0]
    x, y = data.get_batch(train, 4, 8, np.random.default_rng(0))
    x2, _ = data.get_batch(train, 4, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, x + 1)
    batches = data.eval_batches(val, 4, 8, max_batches=100)
    assert sum(len(b[0]) for b in batches) == (len(val) - 1) // 8
    with pytest.raises(ValueError, match="too short"):
        data.check_enough(ids[:5], 8, "training")


def test_token_cache_is_reused_and_keyed_by_text(tmp_path):
    tok = CharTokenizer()
    a = data.load_tokens("hello\nworld", tok, str(tmp_path), progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    np.save(files[0], np.array([1, 2, 3], dtype=np.int32))  # a changed file proves the cache is read
    assert data.load_tokens("hello\nworld", tok, str(tmp_path), progress=False).tolist() == [1, 2, 3]
    b = data.load_tokens("hello\nthere", tok, str(tmp_path), progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and b.tolist() != a.tolist()
