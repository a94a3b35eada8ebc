"""The command line: train and sample end to end, and every bad input gives one line and exit 1."""

import os
import subprocess
import sys

import click
import pytest

from clirun import run_cli
from minillm import cli

HERE = os.path.dirname(os.path.abspath(__file__))
HEADLINES = os.path.join(HERE, "..", "data", "headlines.txt")
TINY = ["--vocab-size", "300", "--context", "16", "--layers", "1", "--heads", "2", "--d-model", "16",
        "--batch-size", "4", "--quiet"]


def one_error_line(capsys, *args, match):
    code, out, err = run_cli(capsys, *args)
    assert code != 0, f"expected a failure, got {out!r} {err!r}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error", "Error"))]
    assert len(errors) == 1 and errors[0] == lines[-1] and match in errors[0].lower(), lines
    return errors[0]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(HEADLINES, encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:500]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    cli.main(["train", small_corpus, "--steps", "4", "--eval-every", "2", "--out", out, *TINY])
    return out


def test_sample_prints_n_lines_and_is_seeded(capsys, trained):
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", trained, "-n", "5", "--seed", "3", "--max-tokens", "8")
    assert code == 0 and len(out.splitlines()) == 5
    assert run_cli(capsys, "sample", "--checkpoint", trained, "-n", "5", "--seed", "3", "--max-tokens", "8")[1] == out
    code, out2, _ = run_cli(capsys, "sample", "--checkpoint", trained, "-n", "2", "--prompt", "police",
                            "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    assert code == 0 and all(line.startswith("police") for line in out2.splitlines())


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"\x00\x01\x02binary\x00", "binary"),
                                            (b"caf\xe9 au lait\n", "utf-8")])
def test_train_rejects_bad_files(capsys, tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    one_error_line(capsys, "train", str(path), "--out", str(tmp_path / "o"), *TINY, match=match)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_train_rejects_missing_paths_and_directories(capsys, tmp_path):
    one_error_line(capsys, "train", str(tmp_path / "nope.txt"), *TINY, match="nope.txt")
    one_error_line(capsys, "train", str(tmp_path), *TINY, match="directory")


def test_train_rejects_text_too_short(capsys, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a headline\n" * 5)
    one_error_line(capsys, "train", str(path), "--out", str(tmp_path / "o"), *TINY, match="too short")


def test_sample_rejects_missing_and_corrupt_checkpoints(capsys, tmp_path, trained):
    one_error_line(capsys, "sample", "--checkpoint", str(tmp_path / "none"), match="none")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(trained):
        if os.path.isfile(os.path.join(trained, name)):
            (broken / name).write_bytes(open(os.path.join(trained, name), "rb").read())
    (broken / "model.safetensors").write_bytes(b"garbage")
    one_error_line(capsys, "sample", "--checkpoint", str(broken), match="model.safetensors")


def test_resume_of_another_architecture_is_refused(capsys, small_corpus, trained):
    one_error_line(capsys, "train", small_corpus, "--arch", "rwkv", "--resume", "--out", trained, *TINY[:-1],
                   match="gpt")


def test_documents_flag_is_checked(capsys, small_corpus, tmp_path):
    one_error_line(capsys, "train", small_corpus, "--documents", "pages", "--out", str(tmp_path), match="lines")


def test_arch_specific_flags_are_checked(capsys, small_corpus, tmp_path):
    one_error_line(capsys, "train", small_corpus, "--experts", "4", "--out", str(tmp_path), match="--arch moe")


def test_python_dash_m_and_no_traceback_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minillm", "train", str(tmp_path / "missing.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error:")


def test_finetune_sample_with_adapter_and_merge(capsys, trained, small_corpus, tmp_path):
    base_bytes = open(os.path.join(trained, "model.safetensors"), "rb").read()
    adapter = str(tmp_path / "lora")
    code, _, err = run_cli(capsys, "finetune", trained, small_corpus, "--lora-rank", "2", "--lora-alpha", "4",
                           "--steps", "3", "--batch-size", "4", "--out", adapter, "--quiet",
                           "--documents", "file")
    assert code == 0, err
    assert "trainable" in err.lower()
    assert open(os.path.join(trained, "model.safetensors"), "rb").read() == base_bytes
    args = ["-n", "3", "--seed", "1", "--max-tokens", "6", "--temperature", "0"]
    code, with_adapter, _ = run_cli(capsys, "sample", "--checkpoint", trained, "--adapter", adapter, *args)
    assert code == 0 and len(with_adapter.splitlines()) == 3
    merged = str(tmp_path / "merged")
    assert run_cli(capsys, "merge", trained, adapter, "--out", merged)[0] == 0
    assert run_cli(capsys, "sample", "--checkpoint", merged, *args)[1] == with_adapter
    one_error_line(capsys, "sample", "--checkpoint", trained, "--adapter", str(tmp_path / "missing"), match="missing")


def test_options_of_other_architectures_and_contradictions_are_refused(capsys, small_corpus, tmp_path):
    one_error_line(capsys, "train", small_corpus, "--arch", "mamba", "--heads", "2", "--out", str(tmp_path),
                   match="--heads only apply to --arch gpt or moe or llama or mixtral")
    one_error_line(capsys, "train", small_corpus, "--arch", "gpt", "--experts-per-token", "2", "--out",
                   str(tmp_path), match="--experts-per-token only apply to --arch moe or mixtral")
    one_error_line(capsys, "train", small_corpus, "--top-k", "2", "--out", str(tmp_path), match="no such option")
    one_error_line(capsys, "train", small_corpus, "--seed", "-1", "--out", str(tmp_path), match="--seed")
    tok = str(tmp_path / "tok.json")
    assert run_cli(capsys, "tokenizer", "train", small_corpus, "--vocab-size", "300", "--out", tok, "--quiet")[0] == 0
    one_error_line(capsys, "train", small_corpus, "--tokenizer", tok, "--vocab-size", "400", "--out",
                   str(tmp_path / "o"), *TINY[2:], match="contradicts --tokenizer")


def test_every_option_has_help_and_shows_its_default(capsys):
    for command in ("train", "finetune", "sample", "eval", "merge", "quantize", "plot"):
        params = cli.cli.commands[command].params
        for p in params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help, f"{command} {p.opts[0]} has no help text"
                assert p.is_flag or p.show_default or p.default in (None, "") or p.required, \
                    f"{command} {p.opts[0]} hides its default"
