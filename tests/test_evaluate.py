"""evaluate.py / `minillm eval`: every token scored once, the batched loss equals window-by-window sums,
every architecture and an adapter through the CLI."""

import math
import os

import numpy as np
import pytest

from clirun import run_cli
from minillm import cli, evaluate, models
from minillm.nn import ops

HEADLINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "headlines.txt")
TINY = ["--vocab-size", "300", "--context", "8", "--layers", "1", "--heads", "2", "--d-model", "16",
        "--batch-size", "4", "--quiet"]


def test_windows_score_every_token_but_the_first_once():
    ids = np.arange(10)
    pairs = evaluate.windows(ids, 3)
    assert np.array_equal(np.concatenate([y for _, y in pairs]), ids[1:])
    assert all(np.array_equal(x[1:], y[:-1]) for x, y in pairs) and len(pairs[-1][0]) == 3
    assert evaluate.windows(np.arange(1), 4) == []


@pytest.mark.parametrize("arch", ["gpt", "mamba", "rwkv", "moe"])
def test_batched_loss_is_the_token_weighted_mean_of_the_windows(arch):
    config = models.build_config(arch, vocab_size=13, context=5, n_layer=1, n_head=2, d_model=8, dtype="float64")
    model = models.get_model(arch)
    params = model.init(config, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, 13, 23)
    got, n = evaluate.loss_over(model, params, config, ids, batch_size=2, progress=False)
    total = 0.0
    for x, y in evaluate.windows(ids, 5):
        logits, _ = model.forward(params, x[None], config)
        total += ops.cross_entropy_forward(logits, y[None])[0] * len(y)
    assert n == 22 and got == pytest.approx(total / 22, rel=1e-12)


def test_cli_eval_checkpoint_and_adapter(capsys, tmp_path):
    corpus = tmp_path / "small.txt"
    with open(HEADLINES, encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    out = str(tmp_path / "out")
    cli.main(["train", str(corpus), "--steps", "2", "--eval-every", "2", "--out", out, *TINY])
    code, text, err = run_cli(capsys, "eval", "--checkpoint", out, str(corpus), "--quiet")
    assert code == 0, err
    nats, ppl = float(text.split()[0]), float(text.split("perplexity ")[1].split(",")[0])
    assert ppl == pytest.approx(math.exp(nats), rel=1e-3) and "bits/byte" in text
    adapter = str(tmp_path / "lora")
    assert run_cli(capsys, "finetune", out, str(corpus), "--steps", "2", "--batch-size", "4", "--out", adapter,
                   "--quiet")[0] == 0
    code, text2, err = run_cli(capsys, "eval", "--checkpoint", out, "--adapter", adapter, str(corpus), "--quiet")
    assert code == 0 and "nats/token" in text2, err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", out, str(tmp_path / "missing.txt"))
    assert code == 1 and err.startswith("error:") and "missing.txt" in err
