"""The command line with --arch llama and --arch mixtral: train, sample, finetune (LoRA on the attention and
MLP by name), merge, ternary training and quantize, and the arch-specific flags' checks."""

import os

import pytest

from clirun import run_cli
from test_cli import TINY, one_error_line, small_corpus  # noqa: F401  (a fixture)

ARCHS = {"llama": ["--kv-heads", "1", "--rope-theta", "500", "--sliding-window", "12"],
         "mixtral": ["--kv-heads", "2", "--experts", "3", "--experts-per-token", "2", "--tie-embeddings"]}
LORA = {"llama": ["--lora-targets", "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj",
                  "--lora-targets", "mlp.gate_proj,mlp.up_proj,mlp.down_proj"],
        "mixtral": ["--lora-targets", "self_attn.*_proj", "--lora-targets", "experts.*.w1,experts.*.w2"]}
SAMPLE = ["-n", "2", "--seed", "1", "--max-tokens", "20", "--temperature", "0"]


def _train(capsys, corpus, out, arch, *extra):
    code, _, err = run_cli(capsys, "train", corpus, "--arch", arch, "--steps", "3", "--eval-every", "2",
                           "--out", out, *TINY, *ARCHS[arch], *extra)
    assert code == 0, err
    assert f"{arch}: " in err and "validation:" in err
    return err


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_train_sample_finetune_merge(capsys, small_corpus, tmp_path, arch):  # noqa: F811
    out = str(tmp_path / "out")
    _train(capsys, small_corpus, out, arch)
    code, lines, err = run_cli(capsys, "sample", "--checkpoint", out, *SAMPLE)
    assert code == 0 and len(lines.splitlines()) == 2, err
    adapter = str(tmp_path / "lora")
    code, _, err = run_cli(capsys, "finetune", out, small_corpus, "--lora-rank", "2", "--lora-alpha", "6",
                           "--steps", "2", "--batch-size", "4", "--out", adapter, "--quiet", *LORA[arch])
    assert code == 0, err
    code, adapted, _ = run_cli(capsys, "sample", "--checkpoint", out, "--adapter", adapter, *SAMPLE)
    assert code == 0 and len(adapted.splitlines()) == 2
    merged = str(tmp_path / "merged")
    assert run_cli(capsys, "merge", out, adapter, "--out", merged)[0] == 0
    assert run_cli(capsys, "sample", "--checkpoint", merged, *SAMPLE)[1] == adapted


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ternary_train_quantize_sample(capsys, small_corpus, tmp_path, arch):  # noqa: F811
    out, packed = str(tmp_path / "ternary"), str(tmp_path / "packed")
    _train(capsys, small_corpus, out, arch, "--ternary")
    code, _, err = run_cli(capsys, "quantize", out, "--out", packed)
    assert code == 0 and "smaller" in err, err
    assert run_cli(capsys, "sample", "--checkpoint", packed, *SAMPLE)[1] == \
        run_cli(capsys, "sample", "--checkpoint", out, *SAMPLE)[1]
    assert os.path.getsize(os.path.join(packed, "model.safetensors")) < os.path.getsize(
        os.path.join(out, "model.safetensors"))


def test_arch_specific_flags_are_checked(capsys, small_corpus, tmp_path):  # noqa: F811
    out = str(tmp_path / "o")
    one_error_line(capsys, "train", small_corpus, "--kv-heads", "2", "--out", out, *TINY, match="--arch llama or mixtral")
    one_error_line(capsys, "train", small_corpus, "--arch", "moe", "--sliding-window", "4", "--out", out, *TINY,
                   match="--sliding-window")
    one_error_line(capsys, "train", small_corpus, "--arch", "llama", "--experts", "4", "--out", out, *TINY,
                   match="--arch moe or mixtral")
    one_error_line(capsys, "train", small_corpus, "--arch", "mixtral", "--d-state", "4", "--out", out, *TINY,
                   match="--arch mamba")
    one_error_line(capsys, "train", small_corpus, "--arch", "llama", "--kv-heads", "3", "--out", out, *TINY,
                   match="must divide")
    one_error_line(capsys, "train", small_corpus, "--arch", "mixtral", "--experts", "2", "--experts-per-token", "3",
                   "--out", out, *TINY, match="top_k 3 is more than n_experts 2")
