"""Checkpoint directories: bit-exact round trips, atomic writes, one clear error per corruption."""

import json
import os

import numpy as np
import pytest

from minillm import __version__
from minillm.checkpoint import (Checkpoint, expected_from, load_checkpoint, rng_from_state,
                                rng_state, save_checkpoint)
from minillm.optim import adamw_init, adamw_step
from minillm.tree import flatten, unflatten

CONFIG = {"arch": "gpt", "vocab_size": 11, "context": 5, "n_layer": 1, "n_head": 2,
          "d_model": 6, "dtype": "float32"}


def make_params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"wte.weight": (11, 6), "wpe.weight": (5, 6), "h.0.ln_1.weight": (6,),
              "h.0.attn.c_attn.weight": (6, 18), "h.0.attn.c_attn.bias": (18,)}
    return unflatten({k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()})


class FakeTokenizer:
    """Stands in for minillm.tokenizer's class: only save(path) matters here."""
    def __init__(self, payload):
        self.payload = payload

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.payload, f)


def bytes_of(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def trained_state(params):
    state = adamw_init(params)
    grads = unflatten({k: np.ones_like(v) for k, v in flatten(params).items()})
    adamw_step(params, grads, state, 1e-2)
    return state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_bit_exact(tmp_path, dtype):
    params = make_params(dtype)
    state = trained_state(params)
    rng = np.random.default_rng(42)
    rng.standard_normal(3)
    trainer = {"step": 1, "rng": rng_state(rng), "val_loss": 2.5}
    out = tmp_path / "ckpt"
    save_checkpoint(out, params, dict(CONFIG, dtype=np.dtype(dtype).name),
                    tokenizer=FakeTokenizer({"merges": [1, 2]}), optimizer_state=state,
                    trainer_state=trainer)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "optimizer.safetensors", "tokenizer.json",
                                       "trainer_state.json"]          # no temp files left
    raw = json.loads((out / "config.json").read_text())
    assert raw["format"] == 1 and raw["minillm_version"] == __version__

    ck = load_checkpoint(out, expected=expected_from(params), arch="gpt")
    assert isinstance(ck, Checkpoint) and ck.version == __version__
    assert ck.config == dict(CONFIG, dtype=np.dtype(dtype).name)
    assert json.load(open(ck.tokenizer_path)) == {"merges": [1, 2]}
    got, want = flatten(ck.params), flatten(params)
    assert list(got) == list(want) or set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
        assert got[k].flags.writeable
    assert ck.optimizer_state["step"] == 1
    for key in ("m", "v"):
        assert set(ck.optimizer_state[key]) == set(want)
        for k in want:
            assert ck.optimizer_state[key][k].tobytes() == state[key][k].tobytes()
    assert ck.trainer_state["step"] == 1 and ck.trainer_state["val_loss"] == 2.5
    # The RNG continues exactly where it stopped.
    assert rng_from_state(ck.trainer_state["rng"]).standard_normal(4).tobytes() == \
        rng.standard_normal(4).tobytes()
    # Saving again gives identical bytes (deterministic files).
    before = bytes_of(out)
    save_checkpoint(out, ck.params, ck.config, tokenizer=ck.tokenizer_path,
                    optimizer_state=ck.optimizer_state, trainer_state=ck.trainer_state)
    assert bytes_of(out) == before


def test_minimal_checkpoint_and_stale_resume_files(tmp_path):
    params = make_params()
    save_checkpoint(tmp_path, params, CONFIG, tokenizer={"vocab": {}},
                    optimizer_state=trained_state(make_params()), trainer_state={"step": 1})
    save_checkpoint(tmp_path, params, CONFIG)       # weights only: no stale resume files remain
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    ck = load_checkpoint(tmp_path)
    assert ck.optimizer_state is None and ck.trainer_state is None
    assert ck.tokenizer_path.endswith("tokenizer.json")        # an existing one is kept


def test_nonfinite_params_refused_old_checkpoint_intact(tmp_path):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1},
                    optimizer_state=trained_state(make_params()), trainer_state={"step": 1})
    before = bytes_of(tmp_path)
    bad = make_params(seed=1)
    bad["h"]["0"]["attn"]["c_attn"]["bias"][3] = np.nan
    with pytest.raises(ValueError, match="non-finite parameters: h.0.attn.c_attn.bias"):
        save_checkpoint(tmp_path, bad, CONFIG, tokenizer={"v": 2})
    bad = make_params(seed=1)
    state = trained_state(make_params())
    state["v"]["wte.weight"][0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite optimizer moments: v.wte.weight"):
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
    assert bytes_of(tmp_path) == before


def test_failure_while_writing_leaves_old_files(tmp_path):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1})
    before = bytes_of(tmp_path)

    class Broken:
        def save(self, path):
            with open(path, "w") as f:
                f.write("{half")
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, make_params(seed=3), dict(CONFIG, n_layer=9),
                        tokenizer=Broken())
    assert bytes_of(tmp_path) == before                 # nothing replaced, temps cleaned up


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
    with pytest.raises(ValueError, match="has no model.safetensors"):
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
def test_corrupt_safetensors(ckpt, name, damage):
    out, _ = ckpt
    path = out / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(len(data)),
                      "empty": b"", "header": data[:8] + b"{not json" + data[17:]}[damage])
    with pytest.raises(ValueError, match=f"'.*{name}' is corrupt or truncated"):
        load_checkpoint(out)


@pytest.mark.parametrize("name", ["config.json", "trainer_state.json"])
@pytest.mark.parametrize("text", ['{"arch": "gpt",', "[1, 2]", "\xff\xfe"])
def test_corrupt_json(ckpt, name, text):
    out, _ = ckpt
    (out / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"'.*{name}' (is not valid JSON|should hold a JSON obj)"):
        load_checkpoint(out)


def test_config_problems(ckpt):
    out, _ = ckpt
    (out / "config.json").write_text('{"vocab_size": 3}')
    with pytest.raises(ValueError, match="is not a minillm config"):
        load_checkpoint(out)
    (out / "config.json").write_text(json.dumps(dict(CONFIG, format=2)))
    with pytest.raises(ValueError, match="format 2, written by a newer minillm"):
        load_checkpoint(out)
    (out / "config.json").write_text(json.dumps(dict(CONFIG, arch="mamba", format=1)))
    with pytest.raises(ValueError, match="checkpoint is a 'mamba' model, expected 'gpt'"):
        load_checkpoint(out, arch="gpt")
    assert load_checkpoint(out, arch="mamba").config["arch"] == "mamba"


def test_expected_mismatches(ckpt):
    out, expected = ckpt
    load_checkpoint(out, expected=expected)
    exp = dict(expected)
    del exp["wpe.weight"]
    exp["h.1.ln_1.weight"] = ((6,), "float32")
    exp["wte.weight"] = ((12, 6), "float32")
    exp["h.0.attn.c_attn.bias"] = ((18,), "float64")
    with pytest.raises(ValueError) as e:
        load_checkpoint(out, expected=exp)
    msg = str(e.value)
    assert "does not match the model" in msg and "\n" not in msg
    assert "missing 1 tensor(s): h.1.ln_1.weight" in msg
    assert "unexpected 1 tensor(s): wpe.weight" in msg
    assert "wte.weight has shape (11, 6), expected (12, 6)" in msg
    assert "h.0.attn.c_attn.bias has dtype float32, expected float64" in msg
    many = {f"x.{i}": ((1,), None) for i in range(9)}
    with pytest.raises(ValueError, match=r"missing 9 tensor\(s\): x.0, .*x.4 \(\+4 more\)"):
        load_checkpoint(out, expected={**expected, **many})


def test_optimizer_file_mismatch(ckpt, tmp_path):
    out, _ = ckpt
    other = tmp_path / "other"
    big = make_params()
    big["wte"]["weight"] = np.zeros((12, 6), np.float32)
    save_checkpoint(other, big, CONFIG, optimizer_state=trained_state(big), trainer_state={})
    os.replace(other / "optimizer.safetensors", out / "optimizer.safetensors")
    with pytest.raises(ValueError, match=r"does not match the model: m.wte.weight has shape"):
        load_checkpoint(out)


def test_bad_rng_state():
    with pytest.raises(ValueError, match="bad RNG state"):
        rng_from_state({"bit_generator": "Nope"})


def test_files_get_umask_permissions(tmp_path):
    save_checkpoint(tmp_path, make_params(), CONFIG, tokenizer={"v": 1})
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
