"""finetune.py: adapter directories, fine-tuning a checkpoint, sampling-time loading, merging."""

import numpy as np
import pytest

from minillm import finetune
from minillm.nn import lora
from minillm.tree import flatten


def test_finetune_end_to_end(tmp_path):
    """finetune -> adapter dir (base bit-identical), sample-time loading, merge -> plain checkpoint;
    an adapter on a different base is refused."""
    from minillm import checkpoint, models, train
    from minillm.models import gpt
    from minillm.tokenizer import Tokenizer

    text = "\n".join(f"line {i} of a tiny corpus, word {i * 7 % 13}" for i in range(300)) + "\n"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tok = Tokenizer.train(text, 300, progress=False)
    config = models.build_config("gpt", vocab_size=tok.vocab_size, context=16, n_layer=1, n_head=2,
                                 d_model=16)
    base_dir, out = str(tmp_path / "base"), str(tmp_path / "adapter")
    checkpoint.save_checkpoint(base_dir, gpt.init(config, np.random.default_rng(0)), config, tok)
    base_bytes = (tmp_path / "base" / checkpoint.MODEL_FILE).read_bytes()
    opts = train.TrainOptions(steps=6, batch_size=4, lr=1e-2, warmup=1, eval_every=3,
                              eval_batches=1, out=out, progress=False)
    res = finetune.finetune(base_dir, str(corpus), opts, rank=2, alpha=4, log=lambda s: None)
    assert (tmp_path / "base" / checkpoint.MODEL_FILE).read_bytes() == base_bytes
    assert not (tmp_path / "adapter" / "cache").exists()   # tokens go to the shared cache
    base = checkpoint.load_checkpoint(base_dir).params
    trained_base, adapters = lora.split_adapters(res["params"])
    for n, a in flatten(base).items():
        assert np.array_equal(flatten(trained_base)[n], a), n          # base weights bit-identical
    assert all(flatten(adapters)[n].any() for n in flatten(adapters))   # B moved off zero
    assert res["trainable"] == 2 * (16 + 48) + 2 * (16 + 16) and res["adapter_bytes"] < res["base_bytes"]

    ck = finetune.load_with_adapter(base_dir, out)
    idx = np.random.default_rng(1).integers(0, tok.vocab_size, (2, 16))
    y = gpt.forward(ck.params, idx, ck.config)[0]
    assert np.array_equal(y, gpt.forward(res["params"], idx, res["config"])[0])
    merged_dir = finetune.merge_checkpoint(base_dir, out, str(tmp_path / "merged"))
    merged = checkpoint.load_checkpoint(merged_dir)
    assert "lora" not in merged.config and merged.tokenizer_path
    # float32: x (W + s B A) vs x W + s (x A) B differ by rounding only
    np.testing.assert_allclose(gpt.forward(merged.params, idx, merged.config)[0], y, rtol=1e-4,
                               atol=1e-5)
    other = {**config, "d_model": 32}
    checkpoint.save_checkpoint(str(tmp_path / "other"), gpt.init(other, np.random.default_rng(0)),
                               other, tok)
    with pytest.raises(ValueError, match="different base model"):
        finetune.load_with_adapter(str(tmp_path / "other"), out)
