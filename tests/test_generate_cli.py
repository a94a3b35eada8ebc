"""`minillm sample` end to end: greedy, streaming, one sample per line, sliding past the context."""

import os

import pytest

from clirun import run_cli
from minillm import cli, generate

HEADLINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "headlines.txt")
TINY = ["--vocab-size", "300", "--context", "8", "--layers", "1", "--heads", "2", "--d-model", "16",
        "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(HEADLINES, encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:400]), encoding="utf-8")
    out = str(tmp_path_factory.mktemp("run") / "out")
    cli.main(["train", str(corpus), "--steps", "3", "--eval-every", "3", "--out", out, *TINY])
    return out


def test_greedy_is_temperature_zero(capsys, trained):
    args = ["sample", "--checkpoint", trained, "--num-samples", "2", "--max-tokens", "5"]
    code, greedy, _ = run_cli(capsys, *args, "--greedy")
    assert code == 0 and len(greedy.splitlines()) == 2
    assert run_cli(capsys, *args, "--temperature", "0", "--seed", "9")[1] == greedy


def test_stream_prints_the_same_line(capsys, trained):
    args = ["sample", "--checkpoint", trained, "-n", "1", "--max-tokens", "12", "--seed", "3", "--prompt", "the"]
    code, plain, _ = run_cli(capsys, *args, "--no-stream")
    code2, streamed, _ = run_cli(capsys, *args, "--stream")
    assert code == code2 == 0 and streamed == plain and streamed.startswith("the")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", trained, "-n", "2", "--stream")
    assert code == 1 and "-n 1" in err and "Traceback" not in err


def test_samples_slide_past_the_context_and_stay_one_line(trained, monkeypatch):
    from minillm import checkpoint
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(checkpoint.load_checkpoint(trained).tokenizer_path)
    seen = []
    real = generate.generate

    def spy(*a, **k):
        out = real(*a, **k)
        seen.extend(out)
        return out

    monkeypatch.setattr(generate, "generate", spy)
    lines = generate.sample_lines(trained, 4, max_tokens=40, temperature=1.5, seed=0)
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    newline_ids = {i for i in range(tok.vocab_size) if b"\n" in tok.decode_bytes([i])}
    assert not any(i in newline_ids or i == tok.eot_id for ids in seen for i in ids)
    assert max(len(ids) for ids in seen) > 8       # longer than the context of 8: the window slid
