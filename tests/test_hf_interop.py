"""Hugging Face interoperability of checkpoint directories, both ways, for every architecture HF has:

* minillm writes, HF reads: save_checkpoint's directory (the versioned layout: config.json and
  model.safetensors are links into current/) loads with AutoModelForCausalLM.from_pretrained, with no
  conversion, and gives minillm's logits and greedy tokens;
* HF writes, minillm reads: a small random model built with from_config + save_pretrained (one file or
  shards) loads with load_checkpoint and gives HF's logits and greedy tokens;
* what minillm does not implement is one `error:` line through the CLI naming the key and its value.

The peer is transformers itself; the random models are small (2 layers, width 32)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from clirun import run_cli
from minillm import checkpoint, generate, models
from test_cli import one_error_line

V = 61
HF_CONFIGS = {  # name -> (config class, keys)
    "gpt2": (tf.GPT2Config, dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)),
    "llama-tied": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, head_dim=8, max_position_embeddings=64,
                                        tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500.0})),
    "mistral": (tf.MistralConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
                                       max_position_embeddings=64)),
    "mixtral": (tf.MixtralConfig, dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=64)),
    "mamba": (tf.MambaConfig, dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                                   time_step_rank=4)),
    "rwkv": (tf.RwkvConfig, dict(hidden_size=32, attention_hidden_size=32, intermediate_size=80,
                                 num_hidden_layers=2, context_length=64, rescale_every=0)),
}
ARCH = {"gpt2": "gpt", "llama": "llama", "llama-tied": "llama", "mistral": "llama", "mixtral": "mixtral",
        "mamba": "mamba", "rwkv": "rwkv"}
MINILLM_CONFIGS = {  # name -> build_config overrides
    "gpt": dict(n_head=4),
    "llama": dict(n_head=4, n_kv_head=2, rope_theta=500.0),
    "llama-window": dict(n_head=4, n_kv_head=1, sliding_window=6, tie_embeddings=True),
    "mixtral": dict(n_head=4, n_kv_head=2, n_experts=3, top_k=2),
    "mamba": dict(d_state=8),
    "rwkv": dict(intermediate_size=72),
}
PROMPT = [[3, 17, 42, 5, 9]]
NEW_TOKENS = 12


def _randomize(model, seed=0):
    """HF's init gives near-uniform logits (ties in greedy decoding); spread them: the parameters are drawn
    anew around their init, every model stays finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and not name.endswith(("A_log", "D", "time_decay", "time_first")):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def hf_dir(tmp_path, name, **save):
    cls, keys = HF_CONFIGS[name]
    hc = cls(vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None, **keys)
    model = _randomize(tf.AutoModelForCausalLM.from_config(hc)).eval()
    out = tmp_path / name
    model.save_pretrained(out, **save)
    return str(out), model


def minillm_dir(tmp_path, name, dtype="float32"):
    arch = name.split("-")[0]
    config = models.build_config(arch, vocab_size=V, context=32, n_layer=2, d_model=32, dtype=dtype,
                                 **MINILLM_CONFIGS[name])
    params = models.get_model(arch).init(config, np.random.default_rng(1))
    flat = {k: v for k, v in _flat(params).items()}
    rng = np.random.default_rng(2)
    for k, a in flat.items():              # spread the logits (as _randomize): no greedy near-ties
        if a.ndim == 2 and "embed" not in k and "wte" not in k:
            a += (rng.standard_normal(a.shape) * 0.3).astype(a.dtype)
    out = str(tmp_path / name)
    checkpoint.save_checkpoint(out, params, config)
    return out, params, config


def _flat(params):
    from minillm.tree import flatten

    return flatten(params)


def ours(ckpt):
    model = models.get_model(ckpt.config["arch"])
    logits = model.forward(ckpt.params, np.asarray(PROMPT * 2), ckpt.config)[0]
    tokens = generate.generate(model, ckpt.params, ckpt.config, PROMPT, NEW_TOKENS, np.random.default_rng(0),
                               temperature=0)[0]
    return logits, tokens


def theirs(model):
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT * 2)).logits.numpy()
        out = model.generate(torch.tensor(PROMPT), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)
    return logits, out[0, len(PROMPT[0]):].tolist()


def assert_close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= rtol, err


# --- HF writes, minillm reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_directory_loads_with_hf_logits_and_tokens(tmp_path, name):
    path, model = hf_dir(tmp_path, name)
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.config["arch"] == ARCH[name] and ckpt.config["dtype"] == "float32" and ckpt.version is None
    if name == "mistral":
        assert ckpt.config["sliding_window"] == 5
    logits, tokens = ours(ckpt)
    hf_logits, hf_tokens = theirs(model)
    assert_close(logits, hf_logits, 1e-5)
    assert tokens == hf_tokens


def test_hf_sharded_float64_directory(tmp_path):
    """save_pretrained with a small max_shard_size: model.safetensors.index.json + shards; float64 stays
    float64 and equals HF to float64 accuracy (GPT-2 computes in its dtype throughout)."""
    cls, keys = HF_CONFIGS["gpt2"]
    model = _randomize(tf.GPT2LMHeadModel(cls(vocab_size=V, **keys)).double()).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 3
    ckpt = checkpoint.load_checkpoint(tmp_path / "sharded")
    assert ckpt.config["dtype"] == "float64"
    assert_close(ours(ckpt)[0], theirs(model)[0], 1e-12)
    # a missing shard, and a shard name that leaves the directory, are one line each
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.rename(tmp_path / "sharded" / shard, tmp_path / shard)
    with pytest.raises(ValueError, match=f"lists the shard {shard}, which is missing"):
        checkpoint.load_checkpoint(tmp_path / "sharded")
    index["weight_map"] = {k: "../" + shard for k in index["weight_map"]}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shards must be .safetensors files beside it"):
        checkpoint.load_checkpoint(tmp_path / "sharded")


def test_bfloat16_is_widened_exactly(tmp_path):
    cls, keys = HF_CONFIGS["llama"]
    model = _randomize(tf.LlamaForCausalLM(cls(vocab_size=V, **keys))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    ckpt = checkpoint.load_checkpoint(tmp_path / "bf16")
    assert ckpt.config["dtype"] == "float32"
    w = ckpt.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy())


def test_old_gpt2_files_buffers_and_stored_head(tmp_path):
    """The attn.bias mask buffers of older GPT-2 files are dropped; a stored lm_head equal to wte is the tied
    head (dropped); one that differs is refused (minillm's GPT-2 head is tied)."""
    import safetensors.numpy

    path, model = hf_dir(tmp_path, "gpt2")
    flat = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    flat["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    flat["lm_head.weight"] = flat["transformer.wte.weight"].copy()
    safetensors.numpy.save_file(flat, os.path.join(path, "model.safetensors"))
    assert_close(ours(checkpoint.load_checkpoint(path))[0], theirs(model)[0], 1e-5)
    flat["lm_head.weight"][0, 0] += 1
    safetensors.numpy.save_file(flat, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        checkpoint.load_checkpoint(path)


# --- minillm writes, HF reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MINILLM_CONFIGS))
def test_minillm_directory_loads_in_hf(tmp_path, name):
    out, params, config = minillm_dir(tmp_path, name)
    assert os.path.islink(os.path.join(out, "config.json"))          # store.py's versioned layout
    assert os.readlink(os.path.join(out, "model.safetensors")) == "current/model.safetensors"
    raw = json.load(open(os.path.join(out, "config.json")))
    assert raw["minillm"]["format"] == checkpoint.FORMAT and raw["minillm"]["arch"] == config["arch"]
    model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == raw["architectures"][0] and model.dtype == torch.float32
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt.config == config                                      # the round trip is exact
    logits, tokens = ours(ckpt)
    hf_logits, hf_tokens = theirs(model)
    assert_close(logits, hf_logits, 1e-5)
    assert tokens == hf_tokens


def test_float64_checkpoint_loads_as_float64_in_hf(tmp_path):
    out, params, config = minillm_dir(tmp_path, "gpt", dtype="float64")
    model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float64
    assert_close(ours(checkpoint.load_checkpoint(out))[0], theirs(model)[0], 1e-12)


def test_trained_checkpoint_names_its_end_of_text_id(capsys, tmp_path):
    """`minillm train` writes bos/eos_token_id = <|endoftext|>'s id, so HF's generate stops where minillm's
    sample does; the tokenizer's own file stays beside it."""
    from test_cli import TINY, HEADLINES

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(open(HEADLINES, encoding="utf-8").readlines()[:200]), encoding="utf-8")
    out = str(tmp_path / "out")
    code, _, err = run_cli(capsys, "train", str(corpus), "--steps", "2", "--out", out, *TINY)
    assert code == 0, err
    raw = json.load(open(os.path.join(out, "config.json")))
    tok = checkpoint.load_tokenizer(checkpoint.load_checkpoint(out))
    assert raw["eos_token_id"] == raw["bos_token_id"] == tok.eot_id
    assert tf.AutoModelForCausalLM.from_pretrained(out).config.eos_token_id == tok.eot_id


@pytest.mark.parametrize("what", ["moe", "ternary"])
def test_no_hf_class_means_no_model_type(tmp_path, what):
    """--arch moe and ternary models have no HF class: config.json has no model_type (HF refuses it rather
    than building another model) and says why in one line; minillm reads it back exactly."""
    arch, extra = ("moe", {}) if what == "moe" else ("gpt", {"ternary": True})
    config = models.build_config(arch, vocab_size=V, context=16, n_layer=1, d_model=16, n_head=2, **extra)
    out = str(tmp_path / what)
    checkpoint.save_checkpoint(out, models.get_model(arch).init(config, np.random.default_rng(0)), config)
    raw = json.load(open(os.path.join(out, "config.json")))
    assert "model_type" not in raw and raw["minillm"]["note"].startswith("Hugging Face cannot load this model")
    assert checkpoint.load_checkpoint(out).config == config
    with pytest.raises((ValueError, OSError)):
        tf.AutoModelForCausalLM.from_pretrained(out)


def test_format_1_checkpoint_of_the_previous_minillm_loads(tmp_path):
    """A checkpoint written by minillm before this format (commit 33f2224, run from `git archive`) loads
    with the same config and weights."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", repo, "archive", "33f2224", "minillm"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip("the repository's history is not available: " + archive.stderr.decode()[:200])
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    script = ("import numpy as np; from minillm import models, checkpoint\n"
              "c = models.build_config('llama', vocab_size=61, context=16, n_layer=2, d_model=32, n_head=4)\n"
              "p = models.get_model('llama').init(c, np.random.default_rng(0))\n"
              "checkpoint.save_checkpoint(%r, p, c)\n" % str(tmp_path / "ck"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=old, env={**os.environ, "PYTHONPATH": str(old)})
    raw = json.load(open(tmp_path / "ck" / "config.json"))
    assert raw["format"] == 1 and "model_type" not in raw
    ckpt = checkpoint.load_checkpoint(tmp_path / "ck")
    config = models.build_config("llama", vocab_size=61, context=16, n_layer=2, d_model=32, n_head=4)
    assert ckpt.config == config
    want = _flat(models.get_model("llama").init(config, np.random.default_rng(0)))
    assert all(np.array_equal(a, want[k]) for k, a in _flat(ckpt.params).items())


# --- refusals: one error line naming the key --------------------------------------------------------------

REFUSED = {  # name -> (HF directory, config edit, words of the error)
    "gelu erf": ("gpt2", {"activation_function": "gelu"}, 'activation_function = "gelu"'),
    "inverse layer idx": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = true"),
    "upcast attention": ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn = true"),
    "n_inner": ("gpt2", {"n_inner": 100}, "n_inner = 100"),
    "gpt2 eps": ("gpt2", {"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon = 1e-06"),
    "unscaled attention": ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights = false"),
    "rope scaling": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                     'rope_parameters.rope_type = "linear"'),
    "legacy rope_scaling": ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling = {"),
    "attention bias": ("llama", {"attention_bias": True}, "attention_bias = true"),
    "mlp bias": ("llama", {"mlp_bias": True}, "mlp_bias = true"),
    "llama act": ("llama", {"hidden_act": "gelu"}, 'hidden_act = "gelu"'),
    "pretraining_tp": ("llama", {"pretraining_tp": 2}, "pretraining_tp = 2"),
    "quantized": ("llama", {"quantization_config": {"quant_method": "bitnet"}}, 'quantization_config.quant_method = "bitnet"'),
    "router jitter": ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1"),
    "mamba bias": ("mamba", {"use_bias": True}, "use_bias = true"),
    "mamba conv bias": ("mamba", {"use_conv_bias": False}, "use_conv_bias = false"),
    "mamba untied": ("mamba", {"tie_word_embeddings": False}, "tie_word_embeddings = false"),
    "rwkv rescale": ("rwkv", {"rescale_every": 6}, "rescale_every = 6"),
    "rwkv attention size": ("rwkv", {"attention_hidden_size": 16}, "attention_hidden_size = 16"),
    "unknown model type": ("gpt2", {"model_type": "bert"}, "model_type 'bert' is not one minillm runs"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {name: hf_dir(base, name)[0] for name in ("gpt2", "llama", "mixtral", "mamba", "rwkv")}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_config_value_is_one_error_line(capsys, tmp_path, hf_dirs, case):
    name, edit, words = REFUSED[case]
    path = str(tmp_path / "d")
    shutil.copytree(hf_dirs[name], path)
    raw = json.load(open(os.path.join(path, "config.json")))
    raw.update(edit)
    json.dump(raw, open(os.path.join(path, "config.json"), "w"))
    line = one_error_line(capsys, "sample", "--checkpoint", path, "--max-tokens", "2", match=words.lower())
    assert "config.json" in line


def test_pickled_weights_are_refused(capsys, tmp_path, hf_dirs):
    path = str(tmp_path / "bin")
    shutil.copytree(hf_dirs["gpt2"], path)
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    line = one_error_line(capsys, "sample", "--checkpoint", path, match="pytorch_model.bin but no model.safetensors")
    assert "unpickle" in line and "safetensors" in line


def test_packed_llama_exports_to_hf_bitnet(tmp_path):
    """quantize's packed files have no model_type (HF would read the scale the other way); bitnet_export
    writes what transformers' bitnet quantization_config (BitLinear, offline) runs, with minillm's logits."""
    from minillm import quantize

    config = models.build_config("llama", vocab_size=V, context=16, n_layer=2, d_model=32, n_head=4, ternary=True)
    src, packed, hf = (str(tmp_path / n) for n in ("ternary", "packed", "hf"))
    checkpoint.save_checkpoint(src, models.get_model("llama").init(config, np.random.default_rng(0)), config)
    quantize.quantize_checkpoint(src, packed)
    assert "model_type" not in json.load(open(os.path.join(packed, "config.json")))
    quantize.bitnet_export(packed, hf)
    model = tf.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "BitLinear"
    assert_close(ours(checkpoint.load_checkpoint(packed))[0], theirs(model)[0], 1e-5)
    with pytest.raises(ValueError, match="bitnet_export takes a packed llama checkpoint"):
        quantize.bitnet_export(src, str(tmp_path / "x"))


def test_mixtral_fused_expert_names_load(tmp_path):
    """transformers 5 saves Mixtral under the released names, but holds the experts fused in memory
    (mlp.experts.gate_up_proj / down_proj); a file of that state dict loads too, with HF's logits."""
    import safetensors.torch

    path, model = hf_dir(tmp_path, "mixtral")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, os.path.join(path, "model.safetensors"))
    assert_close(ours(checkpoint.load_checkpoint(path))[0], theirs(model)[0], 1e-5)


def test_hf_model_and_tokenizer_directory_samples_through_the_cli(capsys, tmp_path):
    """An HF directory as transformers writes it, model and tokenizer (save_pretrained of both):
    `minillm sample --greedy` gives the text of HF's greedy generate from the same start."""
    import tokenizers

    from minillm.tokenizer import Tokenizer
    from test_cli import HEADLINES

    with open(HEADLINES, encoding="utf-8") as f:
        text = f.read(50_000)
    tok = Tokenizer.train([text], 300, special_tokens=("<|endoftext|>",), progress=False)
    cls, keys = HF_CONFIGS["gpt2"]
    model = _randomize(tf.GPT2LMHeadModel(cls(vocab_size=tok.vocab_size, bos_token_id=tok.eot_id,
                                              eos_token_id=tok.eot_id, **keys))).eval()
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.to_json()),
                                      eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    code, out, err = run_cli(capsys, "sample", "--checkpoint", path, "--greedy", "-n", "1", "--max-tokens", "10",
                             "--prompt", "the", "--no-stream")
    assert code == 0, err
    start = [tok.eot_id] + fast("the")["input_ids"]
    with torch.no_grad():
        ids = model.generate(torch.tensor([start]), do_sample=False, max_new_tokens=10, pad_token_id=0)[0, len(start):]
    new = []
    for i in ids.tolist():          # minillm stops at <|endoftext|> and at a token holding a newline
        if i == tok.eot_id or "\n" in fast.decode([i]):
            break
        new.append(i)
    assert out.splitlines() == [generate.escape_controls("the" + fast.decode(new))]   # (control characters shown escaped)
