"""Checkpoint directories: bit-exact round trips, one transaction per save, one clear error per problem."""

import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

from minillm import __version__, models, store
from minillm.checkpoint import (Checkpoint, expected_from, load_checkpoint, rng_from_state,
                                rng_state, save_checkpoint)
from minillm.models import gpt
from minillm.optim import adamw_init, adamw_step
from minillm.tree import flatten, unflatten

CONFIG = models.build_config("gpt", vocab_size=11, context=5, n_layer=1, n_head=2, d_model=6)
NAMES = ["config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json"]


def make_params(dtype=np.float32, seed=0):
    return gpt.init(dict(CONFIG, dtype=np.dtype(dtype).name), np.random.default_rng(seed))


class FakeTokenizer:
    """Stands in for minillm.tokenizer's class: only save(path) matters here."""
    def __init__(self, payload):
        self.payload = payload

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.payload, f)


def tree_state(directory):
    """Every entry under `directory` (links as their text, files as their sha256), the lock file aside."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path) and name != store.LOCK:
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def trained_state(params, steps=1):
    state = adamw_init(params)
    grads = unflatten({k: np.ones_like(v) for k, v in flatten(params).items()})
    for _ in range(steps):
        adamw_step(params, grads, state, 1e-2)
    return state


def plain_copy(src, dst):
    """The files of a checkpoint as a plain directory (as an older minillm or a download has them)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and name in NAMES:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_bit_exact(tmp_path, dtype):
    params = make_params(dtype)
    state = trained_state(params)
    rng = np.random.default_rng(42)
    rng.standard_normal(3)
    trainer = {"step": 1, "rng": rng_state(rng), "val_loss": 2.5}
    out = tmp_path / "ckpt"
    config = dict(CONFIG, dtype=np.dtype(dtype).name)
    save_checkpoint(out, params, config, tokenizer=FakeTokenizer({"merges": [1, 2]}), optimizer_state=state,
                    trainer_state=trainer)
    assert sorted(os.listdir(out)) == sorted([".lock", ".versions", "current", *NAMES])
    assert all(os.readlink(out / n) == f"current/{n}" for n in NAMES)
    assert os.readlink(out / "current") == ".versions/v000001"
    assert sorted(os.listdir(out / ".versions" / "v000001")) == sorted(["checksums.json", *NAMES])  # no temps
    raw = json.loads((out / "config.json").read_text())
    assert raw["minillm"]["format"] == 2 and raw["minillm"]["version"] == __version__ and raw["model_type"] == "gpt2"
    # The tensors' bytes are exactly what safetensors writes for them (unchanged by the versioned layout).
    flat = {n: np.ascontiguousarray(a) for n, a in flatten(params).items()}
    assert (out / "model.safetensors").read_bytes() == safetensors.numpy.save(flat, metadata={"format": "np"})

    ck = load_checkpoint(out, arch="gpt")
    assert isinstance(ck, Checkpoint) and ck.version == __version__ and ck.config == config
    assert ck.fingerprint == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert json.load(open(ck.tokenizer_path)) == {"merges": [1, 2]}
    got, want = flatten(ck.params), flatten(params)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
        assert got[k].flags.writeable
    assert ck.optimizer_state["step"] == 1
    for key in ("m", "v"):
        assert set(ck.optimizer_state[key]) == set(want)
        for k in want:
            assert ck.optimizer_state[key][k].tobytes() == state[key][k].tobytes()
    assert ck.trainer_state["step"] == 1 and ck.trainer_state["val_loss"] == 2.5
    assert rng_from_state(ck.trainer_state["rng"]).standard_normal(4).tobytes() == \
        rng.standard_normal(4).tobytes()       # the RNG continues exactly where it stopped
    before = {n: (out / n).read_bytes() for n in NAMES}
    save_checkpoint(out, ck.params, ck.config, tokenizer=ck.tokenizer_path,
                    optimizer_state=ck.optimizer_state, trainer_state=ck.trainer_state)
    assert {n: (out / n).read_bytes() for n in NAMES} == before       # deterministic files
    assert os.listdir(out / ".versions") == ["v000002"]                # the old version is gone


def test_minimal_checkpoint_and_stale_resume_files(tmp_path):
    params = make_params()
    save_checkpoint(tmp_path, params, CONFIG, tokenizer={"vocab": {}},
                    optimizer_state=trained_state(make_params()), trainer_state={"step": 1})
    save_checkpoint(tmp_path, params, CONFIG)       # weights only: no stale resume files remain
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == \
        ["config.json", "current", "model.safetensors", "tokenizer.json"]
    ck = load_checkpoint(tmp_path)
    assert ck.optimizer_state is None and ck.trainer_state is None
    assert json.load(open(ck.tokenizer_path)) == {"vocab": {}}          # the current one is kept


def test_refused_saves_change_nothing(tmp_path):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1},
                    optimizer_state=trained_state(make_params()), trainer_state={"step": 1})
    before = tree_state(tmp_path)
    bad = make_params(seed=1)
    bad["transformer"]["h"]["0"]["attn"]["c_attn"]["bias"][3] = np.nan
    with pytest.raises(ValueError, match="non-finite parameters: transformer.h.0.attn.c_attn.bias"):
        save_checkpoint(tmp_path, bad, CONFIG, tokenizer={"v": 2})
    bad = make_params(seed=1)
    state = trained_state(make_params())
    state["v"]["transformer.wte.weight"][0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite optimizer moments: v.transformer.wte.weight"):
        save_checkpoint(tmp_path, bad, CONFIG, optimizer_state=state, trainer_state={})
    with pytest.raises(ValueError, match="trainer_state is not JSON"):
        save_checkpoint(tmp_path, bad, CONFIG, trainer_state={"loss": float("nan")})
    with pytest.raises(ValueError, match="config is not JSON"):
        save_checkpoint(tmp_path, bad, dict(CONFIG, x=object()))
    with pytest.raises(ValueError, match="optimizer_state must be a dict"):
        save_checkpoint(tmp_path, bad, CONFIG, optimizer_state={"m": {}})
    with pytest.raises(ValueError, match="cannot save the parameters as safetensors"):
        save_checkpoint(tmp_path, {"w": np.array([None, 1])}, CONFIG)
    with pytest.raises(ValueError, match="'arch'"):
        save_checkpoint(tmp_path, bad, {"vocab_size": 3})

    class Broken:
        def save(self, path):
            with open(path, "w") as f:
                f.write("{half")
            raise OSError("disk full")
    with pytest.raises(ValueError, match="disk full; nothing was replaced"):
        save_checkpoint(tmp_path, bad, CONFIG, tokenizer=Broken())
    assert tree_state(tmp_path) == before                 # nothing replaced, temporaries removed


def test_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1})
    before = tree_state(tmp_path)
    real, calls = store.write_temp, []

    def full(path, content):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, content)
    monkeypatch.setattr(store, "write_temp", full)
    with pytest.raises(ValueError, match=r"could not save the checkpoint to .*No space left on device; "
                                         "nothing was replaced"):
        save_checkpoint(tmp_path, make_params(seed=2), CONFIG)
    assert tree_state(tmp_path) == before


def test_missing_and_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory '.*nope' does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_checkpoint(tmp_path / "file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_checkpoint(tmp_path / "file", make_params(), CONFIG)
    with pytest.raises(ValueError, match="has no config.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "c", make_params(), CONFIG)
    os.remove(tmp_path / "c" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors' is missing"):
        load_checkpoint(tmp_path / "c")


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "ck"
    params = make_params()
    save_checkpoint(out, params, CONFIG, optimizer_state=trained_state(make_params()),
                    trainer_state={"step": 1})
    return out, expected_from(params)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_corrupt_safetensors(ckpt, tmp_path, name, damage):
    out, _ = ckpt
    plain = plain_copy(out, tmp_path / "plain")
    for directory, match in ((out, "does not match the checksum"), (plain, "is corrupt or truncated")):
        path = directory / name
        data = path.read_bytes()
        path.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(len(data)),
                          "empty": b"", "header": data[:8] + b"{not json" + data[17:]}[damage])
        with pytest.raises(ValueError, match=f"'.*{name}' {match}"):
            load_checkpoint(directory)


@pytest.mark.parametrize("name", ["config.json", "trainer_state.json"])
@pytest.mark.parametrize("text", ['{"arch": "gpt",', "[1, 2]", "\xff\xfe"])
def test_corrupt_json(ckpt, tmp_path, name, text):
    out, _ = ckpt
    plain = plain_copy(out, tmp_path / "plain")
    (plain / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"'.*{name}' (is not valid JSON|should hold a JSON obj)"):
        load_checkpoint(plain)
    (out / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"'.*{name}' does not match the checksum"):
        load_checkpoint(out)


def test_config_problems(ckpt, tmp_path):
    out, _ = ckpt
    plain = plain_copy(out, tmp_path / "plain")
    (plain / "config.json").write_text('{"vocab_size": 3}')
    with pytest.raises(ValueError, match="is neither a minillm config .* nor a Hugging Face one"):
        load_checkpoint(plain)
    (plain / "config.json").write_text(json.dumps(dict(CONFIG, format=3, minillm_version="9.0")))
    with pytest.raises(ValueError, match="format 3, written by a newer minillm"):
        load_checkpoint(plain)
    (plain / "config.json").write_text(json.dumps({"model_type": "gpt2", "minillm": {"format": 3}}))
    with pytest.raises(ValueError, match="format 3, written by a newer minillm"):
        load_checkpoint(plain)
    (plain / "config.json").write_text(json.dumps(dict(CONFIG, arch="mamba", format=1)))
    with pytest.raises(ValueError, match="checkpoint is a 'mamba' model, expected 'gpt'"):
        load_checkpoint(plain, arch="gpt")
    with pytest.raises(ValueError, match="none of its tensor names belongs to this architecture"):
        load_checkpoint(plain)                      # GPT weights labelled Mamba


def test_expected_mismatches(ckpt):
    out, expected = ckpt
    load_checkpoint(out, expected=expected)
    exp = dict(expected)
    del exp["transformer.wpe.weight"]
    exp["transformer.h.1.ln_1.weight"] = ((6,), "float32")
    exp["transformer.wte.weight"] = ((12, 6), "float32")
    exp["transformer.h.0.attn.c_attn.bias"] = ((18,), "float64")
    with pytest.raises(ValueError) as e:
        load_checkpoint(out, expected=exp)
    msg = str(e.value)
    assert "does not match the model" in msg and "\n" not in msg
    assert "missing 1 tensor(s): transformer.h.1.ln_1.weight" in msg
    assert "unexpected 1 tensor(s): transformer.wpe.weight" in msg
    assert "transformer.wte.weight has shape (11, 6), expected (12, 6)" in msg
    assert "transformer.h.0.attn.c_attn.bias has dtype float32, expected float64" in msg
    many = {f"x.{i}": ((1,), None) for i in range(9)}
    with pytest.raises(ValueError, match=r"missing 9 tensor\(s\): x.0, .*x.4 \(\+4 more\)"):
        load_checkpoint(out, expected={**expected, **many})


def test_foreign_and_torn_files_are_refused_naming_the_file(ckpt, tmp_path):
    out, _ = ckpt
    other = tmp_path / "other"
    save_checkpoint(other, make_params(seed=5), CONFIG, optimizer_state=trained_state(make_params(), 2),
                    trainer_state={"step": 2})
    shutil.copyfile(other / "optimizer.safetensors", tmp_path / "opt")
    os.replace(tmp_path / "opt", out / "optimizer.safetensors")    # a plain file where our link was
    with pytest.raises(ValueError, match=r"optimizer.safetensors' is not the link to current/"):
        load_checkpoint(out)
    with pytest.raises(ValueError, match="optimizer.safetensors' is not a file minillm saved there"):
        save_checkpoint(out, make_params(), CONFIG, tokenizer={"v": 1})   # and never replaced by a save
    os.remove(out / "optimizer.safetensors")
    os.symlink("current/optimizer.safetensors", out / "optimizer.safetensors")
    shutil.copyfile(other / "optimizer.safetensors", out / "current" / "optimizer.safetensors")
    with pytest.raises(ValueError, match="optimizer.safetensors' does not match the checksum"):
        load_checkpoint(out)
    plain = plain_copy(out, tmp_path / "plain")                      # no checksums: the steps tell
    with pytest.raises(ValueError, match="trainer_state.json' is at step 1 but .*optimizer.safetensors' at "
                                         "step 2: the files come from different saves"):
        load_checkpoint(plain)


def test_bad_rng_state():
    for state in ({"bit_generator": "Nope"}, {"bit_generator": "seed"}, "garbage", None, [1],
                  {"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}):
        with pytest.raises(ValueError, match="bad RNG state"):
            rng_from_state(state)


def test_files_get_umask_permissions(tmp_path):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1})
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "current"):
        assert (tmp_path / "current" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
