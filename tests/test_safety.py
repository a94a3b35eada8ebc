"""Issue 15, "nothing lost, nothing crashes": a table of bad inputs run through the CLI entry point. Each one
must end in exactly one `error:` line (no traceback), a non-zero exit status, and leave the checkpoints it
was given byte for byte as they were."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from clirun import run_cli
from minillm import checkpoint, cli, store
from minillm.models import mamba
from minillm.tree import flatten
from test_checkpoint import NAMES, tree_state

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--vocab-size", "300", "--context", "16", "--layers", "1", "--heads", "2", "--d-model", "16",
        "--batch-size", "4", "--quiet"]
WTE, C_ATTN = "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained base (4 steps), a LoRA adapter on it, the merged checkpoint and a golden directory."""
    root = tmp_path_factory.mktemp("world")
    corpus = root / "small.txt"
    with open(os.path.join(HERE, "..", "data", "headlines.txt"), encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:400]), encoding="utf-8")
    w = {k: str(root / k) for k in ("base", "ad", "merged", "golden")}
    w["corpus"] = str(corpus)
    cli.main(["train", w["corpus"], "--steps", "4", "--eval-every", "2", "--out", w["base"], *TINY])
    cli.main(["finetune", w["base"], w["corpus"], "--lora-rank", "2", "--steps", "2", "--batch-size", "4",
              "--out", w["ad"], "--quiet"])
    cli.main(["merge", w["base"], w["ad"], "--out", w["merged"]])
    cli.main(["reference", "make", w["golden"], "--components", "gelu"])
    return w


def plain(w, tmp, tensors=None, config=None, drop=(), src="base", trainer=None):
    """A plain-directory copy of a checkpoint (as downloaded), its tensors / config / trainer state edited."""
    dst = str(tmp / "ck")
    os.makedirs(dst)
    for name in NAMES:
        if name not in drop and os.path.isfile(os.path.join(w[src], name)):
            shutil.copyfile(os.path.join(w[src], name), os.path.join(dst, name))
    for name, edit in (("model.safetensors", tensors), ("config.json", config), ("trainer_state.json", trainer)):
        if edit is None:
            continue
        path = os.path.join(dst, name)
        if name.endswith(".safetensors"):
            flat = safetensors.numpy.load_file(path)
            edit(flat)
            safetensors.numpy.save_file(flat, path, metadata={"format": "np"})
        else:
            obj = json.load(open(path))
            edit(obj)
            json.dump(obj, open(path, "w"))
    return dst


def copy(w, tmp, src="base"):
    dst = str(tmp / "copy")
    shutil.copytree(w[src], dst, symlinks=True)
    return dst


GPT2_NAMES = {"context": "n_positions", "d_model": "n_embd"}     # GPT2Config's names of minillm's keys


def setitem(key, value):
    """Set `key` in a dict (a flat dict of tensors); in a config.json of format 2, minillm's config key `key`:
    under GPT2Config's name for it, or in the "minillm" section when HF has no key for it."""
    def edit(d):
        name = GPT2_NAMES.get(key, key) if "minillm" in d else key
        if name in d or "minillm" not in d:
            d[name] = value
        else:
            d["minillm"][key] = value
    return edit


def golden(w, tmp, edit):
    dst = copy(w, tmp, "golden")
    path = os.path.join(dst, "manifest.json")
    manifest = json.load(open(path))
    edit(manifest)
    json.dump(manifest, open(path, "w"))
    return dst


def variant(key, value):
    return lambda m: m["components"]["gelu"]["variants"]["float64"].__setitem__(key, value)


def impl(tmp, body):
    path = tmp / "my_impl.py"
    path.write_text(f"def gelu(inputs, params, upstream, config):\n    {body}\n")
    return str(path)


def sample(ck, *more):
    return ["sample", "--checkpoint", ck, "-n", "1", "--max-tokens", "2", *more]


def nan_wte(f):
    f[WTE][0, 0] = np.nan


def other_arch(f):
    f.clear()
    f.update(flatten(mamba.init({"arch": "mamba", "vocab_size": 300, "context": 16, "n_layer": 1, "d_model": 16},
                                np.random.default_rng(0))))


def edit_tokenizer_without_eot(ck):
    path = os.path.join(ck, "tokenizer.json")
    tok = json.load(open(path))
    tok["added_tokens"] = []   # Hugging Face's tokenizer.json: the special tokens
    json.dump(tok, open(path, "w"))
    return ck


def flip_last_byte(ck):
    path = os.path.join(ck, "current", "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    return ck


def replace_link(ck):
    path = os.path.join(ck, "optimizer.safetensors")
    data = open(path, "rb").read()
    os.remove(path)
    open(path, "wb").write(data)
    return ck


def another_base(w, tmp):
    """The same sizes as the base, other weights: the adapter's fingerprint does not fit it."""
    ck = checkpoint.load_checkpoint(w["base"])
    ck.params["transformer"]["wte"]["weight"] += 1e-3
    checkpoint.save_checkpoint(str(tmp / "b2"), ck.params, ck.config, tokenizer=ck.tokenizer_path)
    return str(tmp / "b2")


def nan_adapter(w, tmp):
    dst = str(tmp / "ad")
    os.makedirs(dst)
    for name in ("adapter_model.safetensors", "adapter_config.json", "minillm_adapter.json"):
        shutil.copyfile(os.path.join(w["ad"], name), os.path.join(dst, name))
    path = os.path.join(dst, "adapter_model.safetensors")
    flat = safetensors.numpy.load_file(path)
    next(a for n, a in sorted(flat.items()) if n.endswith("lora_A.weight"))[0, 0] = np.inf
    safetensors.numpy.save_file(flat, path)
    return dst


def symlink_to(target, tmp):
    link = str(tmp / "link")
    os.symlink(target, link)
    return link


def foreign_dir(tmp):
    d = tmp / "mine"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"my own weights")
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    return str(d)


def resume(w, ck, *more):
    return ["train", w["corpus"], "--resume", "--out", ck, "--batch-size", "4", "--quiet", *more]


# name -> builder(w, tmp) -> (argv, directories that must not change, text the error line contains)
CASES = {
    # the weights and the config against each other
    "missing tensor": lambda w, t: (sample(plain(w, t, tensors=lambda f: f.pop(C_ATTN))), [], f"missing 1 tensor(s): {C_ATTN}"),
    "missing bias": lambda w, t: (sample(plain(w, t, tensors=lambda f: f.pop("transformer.h.0.mlp.c_fc.bias"))), [], "missing 1"),
    "extra tensor": lambda w, t: (sample(plain(w, t, tensors=setitem("transformer.extra", np.ones(3, np.float32)))), [], "unexpected 1 tensor(s): transformer.extra"),
    "wrong shape": lambda w, t: (sample(plain(w, t, tensors=setitem(C_ATTN, np.ones((16, 47), np.float32)))), [], f"{C_ATTN} has shape (16, 47), expected (16, 48)"),
    "F64 declared F32": lambda w, t: (sample(plain(w, t, tensors=lambda f: f.__setitem__(WTE, f[WTE].astype(np.float64)))), [], "dtype float64, expected float32"),
    "float16": lambda w, t: (sample(plain(w, t, tensors=lambda f: f.__setitem__(WTE, f[WTE].astype(np.float16)))), [], "dtype float16, expected float32"),
    "I32 layernorm": lambda w, t: (sample(plain(w, t, tensors=setitem("transformer.ln_f.weight", np.ones(16, np.int32)))), [], "dtype int32"),
    "NaN weights": lambda w, t: (sample(plain(w, t, tensors=nan_wte)), [], "non-finite"),
    "other architecture": lambda w, t: (sample(plain(w, t, tensors=other_arch)), [], "another architecture"),
    "n_head 0": lambda w, t: (sample(plain(w, t, config=setitem("n_head", 0))), [], "n_head = 0 is out of range"),
    "context 10^12": lambda w, t: (sample(plain(w, t, config=setitem("context", 10**12))), [], "context = 1000000000000 is out of range"),
    "n_layer 10^9": lambda w, t: (sample(plain(w, t, config=setitem("n_layer", 10**9))), [], "n_layer = 1000000000 is out of range"),
    "n_layer 2 of 1": lambda w, t: (sample(plain(w, t, config=setitem("n_layer", 2))), [], "hold 1 layer(s)"),
    "vocab_size 10^12": lambda w, t: (sample(plain(w, t, config=setitem("vocab_size", 10**12))), [], "vocab_size = 1000000000000 is out of range"),
    "vocab_size off by one": lambda w, t: (sample(plain(w, t, config=lambda c: c.__setitem__("vocab_size", c["vocab_size"] - 1))), [], "embedding"),
    "d_model a string": lambda w, t: (sample(plain(w, t, config=setitem("d_model", "16"))), [], "n_embd must be an integer"),
    "missing tokenizer": lambda w, t: (sample(plain(w, t, drop=["tokenizer.json"])), [], "has no tokenizer.json"),
    "tokenizer without eot": lambda w, t: (sample(edit_tokenizer_without_eot(plain(w, t))), [], "no <|endoftext|>"),
    "quantize a missing tensor": lambda w, t: (["quantize", plain(w, t, tensors=lambda f: f.pop(C_ATTN), config=setitem("ternary", True)), "--out", str(t / "q")], [], "missing 1"),
    # torn, foreign and tampered state
    "garbage RNG state": lambda w, t: (resume(w, plain(w, t, trainer=setitem("rng_state", {"bit_generator": "PCG64", "state": "x"})), "--steps", "6"), [], "bad rng state"),
    "torn legacy save": lambda w, t: (sample(plain(w, t, trainer=setitem("step", 3))), [], "come from different saves"),
    "tampered model": lambda w, t: (sample(flip_last_byte(copy(w, t))), [], "model.safetensors' does not match the checksum"),
    "replaced link": lambda w, t: (sample(replace_link(copy(w, t))), [], "optimizer.safetensors' is not the link"),
    # commands that would write over their input or lose data
    "merge --out BASE": lambda w, t: (["merge", w["base"], w["ad"], "--out", w["base"]], [w["base"], w["ad"]], "is the base checkpoint"),
    "merge --out ADAPTER": lambda w, t: (["merge", w["base"], w["ad"], "--out", w["ad"]], [w["base"], w["ad"]], "is the adapter"),
    "merge --out link to BASE": lambda w, t: (["merge", w["base"], w["ad"], "--out", symlink_to(w["base"], t)], [w["base"]], "is the base checkpoint"),
    "quantize --out link to CK": lambda w, t: (["quantize", w["base"], "--out", symlink_to(w["base"], t)], [w["base"]], "in place"),
    "finetune --out BASE": lambda w, t: (["finetune", w["base"], w["corpus"], "--steps", "1", "--out", w["base"]], [w["base"]], "is the base checkpoint"),
    "tokenizer train --out FILE": lambda w, t: (["tokenizer", "train", w["corpus"], "--vocab-size", "260", "--out", w["corpus"]], [os.path.dirname(w["corpus"])], "is the training text"),
    "finetune --out a checkpoint": lambda w, t: (["finetune", w["base"], w["corpus"], "--steps", "1", "--out", w["merged"]], [w["merged"]], "holds another kind of save"),
    "merge --out an adapter": lambda w, t: (["merge", w["base"], w["ad"], "--out", copy(w, t, "ad")], [str(t / "copy")], "holds another kind of save"),
    "resume below the saved step": lambda w, t: (resume(w, w["base"], "--steps", "2"), [w["base"]], "already at step 4"),
    "train over foreign files": lambda w, t: (["train", w["corpus"], "--out", foreign_dir(t), *TINY], [str(t / "mine")], "is not a file minillm saved there"),
    # adapters
    "adapter with inf": lambda w, t: (sample(w["base"], "--adapter", nan_adapter(w, t)), [w["base"]], "non-finite"),
    "adapter of another base": lambda w, t: (sample(another_base(w, t), "--adapter", w["ad"]), [w["ad"]], "other base weights"),
    "adapter merged twice": lambda w, t: (["merge", w["merged"], w["ad"], "--out", str(t / "m2")], [w["merged"], w["ad"]], "already merged"),
    # flags
    "--temperature nan": lambda w, t: (sample(w["base"], "--temperature", "nan"), [], "not a finite number"),
    "--temperature inf": lambda w, t: (sample(w["base"], "--temperature", "inf"), [], "not a finite number"),
    "--top-p nan": lambda w, t: (sample(w["base"], "--top-p", "nan"), [], "not a finite number"),
    "--lr nan": lambda w, t: (["train", w["corpus"], "--lr", "nan", "--out", str(t / "o")], [], "--lr"),
    "--lora-alpha nan": lambda w, t: (["finetune", w["base"], w["corpus"], "--lora-alpha", "nan"], [], "--lora-alpha"),
    "--seed -1": lambda w, t: (sample(w["base"], "--seed", "-1"), [], "--seed"),
    "--d-model 10^6": lambda w, t: (["train", w["corpus"], "--d-model", "1000000", "--heads", "1", "--out", str(t / "o")], [], "d_model = 1000000 is out of range"),
    "--batch-size 10^9": lambda w, t: (["train", w["corpus"], "--batch-size", "1000000000", "--out", str(t / "o")], [], "needs at least"),
    # golden manifests and implementations
    "golden file ../": lambda w, t: (["reference", "check", golden(w, t, variant("file", "../../../etc/passwd")), "--impl", "minillm.reference.cases"], [], "outside the golden directory"),
    "golden file absolute": lambda w, t: (["reference", "check", golden(w, t, variant("file", "/etc/passwd")), "--impl", "minillm.reference.cases"], [], "outside the golden directory"),
    "golden null component": lambda w, t: (["reference", "check", golden(w, t, lambda m: m["components"].__setitem__("gelu", None)), "--impl", "minillm.reference.cases"], [], "not an object"),
    "golden no variants": lambda w, t: (["reference", "check", golden(w, t, lambda m: m["components"]["gelu"].__setitem__("variants", {})), "--impl", "minillm.reference.cases"], [], "no variants"),
    "golden no components": lambda w, t: (["reference", "check", golden(w, t, lambda m: m.__setitem__("components", {})), "--impl", "minillm.reference.cases"], [], "no components"),
    "impl raises SystemExit(0)": lambda w, t: (["reference", "check", w["golden"], "--impl", impl(t, "raise SystemExit(0)")], [w["golden"]], "1 of 1 component(s) failed"),
    "impl raises KeyboardInterrupt": lambda w, t: (["reference", "check", w["golden"], "--impl", impl(t, "raise KeyboardInterrupt")], [w["golden"]], "1 of 1 component(s) failed"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(capsys, tmp_path, world, name):
    argv, guarded, match = CASES[name](world, tmp_path)
    guarded = guarded + [world["base"]]
    before = {d: tree_state(d) for d in guarded}
    code, out, err = run_cli(capsys, *argv)
    assert code not in (0, None), (name, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert match.lower() in errors[0].lower(), errors[0]
    assert {d: tree_state(d) for d in guarded} == before
    if name.startswith("impl raises"):
        assert "the implementation raised" in out


def test_golden_symlink_out_of_the_directory(capsys, tmp_path, world):
    g = copy(world, tmp_path, "golden")
    os.symlink("/etc/passwd", os.path.join(g, "link.safetensors"))
    manifest = json.load(open(os.path.join(g, "manifest.json")))
    manifest["components"]["gelu"]["variants"]["float64"]["file"] = "link.safetensors"
    json.dump(manifest, open(os.path.join(g, "manifest.json"), "w"))
    code, _, err = run_cli(capsys, "reference", "check", g, "--impl", "minillm.reference.cases")
    assert code == 1 and err.strip().splitlines()[-1].endswith("(a symlink?): refusing to open it")


def test_a_second_writer_is_refused_naming_the_holder(capsys, tmp_path, world):
    ck = copy(world, tmp_path)
    before = tree_state(ck)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.pwrite(fd, b'%d' % os.getpid(), 0); "
         "print('locked', flush=True); "
         "sys.stdin.read()", os.path.join(ck, store.LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, *resume(world, ck, "--steps", "6"))
        assert code == 1 and f"(pid {holder.pid})" in err.strip().splitlines()[-1]
        code, _, err = run_cli(capsys, "merge", world["base"], world["ad"], "--out", ck)
        assert code == 1 and f"(pid {holder.pid})" in err.strip().splitlines()[-1]
    finally:
        holder.communicate("", timeout=10)
    assert tree_state(ck) == before


def test_full_disk_is_one_line(capsys, tmp_path, world, monkeypatch):
    ck = copy(world, tmp_path)
    before = tree_state(ck)

    def full(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store, "write_temp", full)
    code, _, err = run_cli(capsys, *resume(world, ck, "--steps", "6", "--eval-every", "1"))
    assert code == 1 and "No space left on device; nothing was replaced" in err.strip().splitlines()[-1]
    # metrics.jsonl logs the steps that ran (a resume cuts it back to the checkpoint's step); the
    # checkpoint itself is untouched
    after = tree_state(ck)
    assert "Traceback" not in err and after.pop("metrics.jsonl") and before.pop("metrics.jsonl")
    assert after == before


def test_a_real_ctrl_c_still_stops_a_golden_check(capsys, tmp_path, world):
    code, _, err = run_cli(capsys, "reference", "check", world["golden"], "--impl",
                           impl(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGINT)"))
    assert code == 130 and err.strip() in ("aborted", "interrupted")
