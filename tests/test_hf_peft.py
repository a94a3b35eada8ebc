"""LoRA adapters as peft directories, both ways: peft.PeftModel.from_pretrained loads what minillm writes
(over the base that transformers loads from minillm's checkpoint) and gives minillm's adapted logits;
minillm loads what peft's save_pretrained writes and gives peft's; adapters of the previous minillm
still load; a peft setting minillm does not implement is one CLI error line. alpha != r throughout."""

import json
import os
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers as tf

from minillm import checkpoint, finetune, models
from minillm.nn import lora
from minillm.tree import flatten
from test_cli import one_error_line
from test_hf_interop import PROMPT, V, assert_close, hf_dir, minillm_dir

# peft refuses Mamba adapters on out_proj and conv1d (its CUDA path reads those weights directly), so the
# Mamba case adapts in_proj and x_proj; minillm's default Mamba targets (in_proj, out_proj) load in minillm only.
TARGETS = {"gpt": ["attn.c_attn", "mlp.c_fc"], "llama": ["self_attn.q_proj", "mlp.down_proj"],
           "mamba": ["mixer.in_proj", "mixer.x_proj"], "rwkv": ["attention.key", "feed_forward.value"]}


def adapted(params, config, rank=2, alpha=6.0, seed=3):
    """params with LoRA adapters on TARGETS whose B is random (a fresh B = 0 would hide every mistake)."""
    config = {**config, "lora": lora.lora_config(rank, alpha, TARGETS[config["arch"]])}
    params = lora.add_adapters(params, config, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for name, a in flatten(params).items():
        if name.endswith("lora_B"):
            a[...] = rng.standard_normal(a.shape) * 0.3
    return params, config


def logits_of(params, config):
    return models.get_model(config["arch"]).forward(params, np.asarray(PROMPT), config)[0]


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.numpy()


@pytest.mark.parametrize("name", ["gpt", "llama", "mamba", "rwkv"])
def test_minillm_adapter_loads_in_peft(tmp_path, name):
    base, params, config = minillm_dir(tmp_path, name)
    params, config = adapted(params, config)
    out = str(tmp_path / "adapter")
    finetune.save_adapter(out, params, config, base=base, base_sha256="0" * 64)
    raw = json.load(open(os.path.join(out, "adapter_config.json")))
    assert raw["peft_type"] == "LORA" and raw["r"] == 2 and raw["lora_alpha"] == 6.0
    assert raw["fan_in_fan_out"] == (name == "gpt") and "minillm" not in raw
    hf = tf.AutoModelForCausalLM.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(hf, out).eval()
    assert_close(torch_logits(model), logits_of(params, config), 1e-5)
    assert_close(torch_logits(model), logits_of(lora.merge(params, config), config), 1e-5)  # and merged


@pytest.mark.parametrize("name", ["gpt2", "llama", "mamba"])
def test_peft_adapter_loads_in_minillm_and_merges(tmp_path, name):
    base, model = hf_dir(tmp_path, name)
    targets = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "gate_proj"],
               "mamba": ["in_proj", "x_proj"]}[name]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets,
                                                    init_lora_weights=False, fan_in_fan_out=name == "gpt2"))
    pm.eval().save_pretrained(tmp_path / "peft")
    ckpt = finetune.load_with_adapter(base, str(tmp_path / "peft"))
    want = torch_logits(pm)
    assert_close(logits_of(ckpt.params, ckpt.config), want, 1e-5)
    merged = str(tmp_path / "merged")
    finetune.merge_checkpoint(base, str(tmp_path / "peft"), merged)
    assert_close(torch_logits(tf.AutoModelForCausalLM.from_pretrained(merged).eval()), want, 1e-5)
    back = checkpoint.load_checkpoint(merged)
    assert_close(logits_of(back.params, back.config), want, 1e-5)


def test_cli_finetune_writes_a_peft_adapter(capsys, tmp_path):
    """`minillm finetune` end to end: the adapter it writes loads in peft and gives minillm's logits."""
    from clirun import run_cli
    from test_cli import HEADLINES, TINY

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(open(HEADLINES, encoding="utf-8").readlines()[:200]), encoding="utf-8")
    base, out = str(tmp_path / "base"), str(tmp_path / "lora")
    assert run_cli(capsys, "train", str(corpus), "--steps", "2", "--out", base, *TINY)[0] == 0
    code, _, err = run_cli(capsys, "finetune", base, str(corpus), "--lora-rank", "2", "--lora-alpha", "5",
                           "--steps", "3", "--lr", "0.05", "--batch-size", "4", "--out", out, "--quiet")
    assert code == 0, err
    ckpt = finetune.load_with_adapter(base, out)
    assert any(np.abs(a).max() > 0 for n, a in flatten(ckpt.params).items() if n.endswith("lora_B"))
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out).eval()
    assert_close(torch_logits(model), logits_of(ckpt.params, ckpt.config), 1e-5)


def test_adapter_of_the_previous_minillm_loads(tmp_path):
    """An adapter written by minillm before the peft format (commit 33f2224, run from `git archive`): minillm
    names in adapter_config.json's own format; it applies to the same base with the same result."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "-C", repo, "archive", "33f2224", "minillm"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip("the repository's history is not available")
    old = tmp_path / "old"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    script = f"""
import numpy as np
from minillm import models, checkpoint, finetune
from minillm.nn import lora
c = models.build_config('gpt', vocab_size=61, context=16, n_layer=2, d_model=32, n_head=4)
p = models.get_model('gpt').init(c, np.random.default_rng(0))
checkpoint.save_checkpoint({str(tmp_path / 'base')!r}, p, c)
c = {{**c, 'lora': lora.lora_config(2, 7.0, ['attn.c_attn'])}}
p = lora.add_adapters(p, c, np.random.default_rng(1))
from minillm.tree import flatten
for n, a in flatten(p).items():
    if n.endswith('lora_B'): a[...] = np.random.default_rng(2).standard_normal(a.shape)
sha = checkpoint.load_checkpoint({str(tmp_path / 'base')!r}).fingerprint
finetune.save_adapter({str(tmp_path / 'ad')!r}, p, c, base='base', base_sha256=sha)
np.save({str(tmp_path / 'logits.npy')!r}, models.get_model('gpt').forward(p, np.asarray({PROMPT!r}), c)[0])
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=old, env={**os.environ, "PYTHONPATH": str(old)})
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["format"] == "minillm-lora"
    ckpt = finetune.load_with_adapter(str(tmp_path / "base"), str(tmp_path / "ad"))
    # the same up to float32 rounding, not bitwise: the GELU kernel has changed since (kernels/gelu.py)
    np.testing.assert_allclose(logits_of(ckpt.params, ckpt.config), np.load(tmp_path / "logits.npy"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value", [("use_dora", True), ("use_rslora", True), ("bias", "all"),
                                       ("modules_to_save", ["lm_head"]), ("rank_pattern", {"c_attn": 4}),
                                       ("peft_type", "IA3")])
def test_unsupported_peft_setting_is_one_error_line(capsys, tmp_path, key, value):
    base, model = hf_dir(tmp_path, "gpt2")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                    fan_in_fan_out=True))
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    raw = json.load(open(path))
    raw[key] = value
    json.dump(raw, open(path, "w"))
    line = one_error_line(capsys, "sample", "--checkpoint", base, "--adapter", str(tmp_path / "peft"),
                          match=key)
    assert "adapter_config.json" in line
