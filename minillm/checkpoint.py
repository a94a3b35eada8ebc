"""Checkpoint directories: safetensors weights + JSON config, atomic writes, validation on load.

A checkpoint is a directory holding
    model.safetensors        the parameters, flat dotted names (minillm.tree.flatten)
    config.json              the model config + "minillm_version" + "format": FORMAT
    tokenizer.json           written by the tokenizer's own save(path) (optional)
    optimizer.safetensors    AdamW moments as "m.<name>" / "v.<name>", step in the metadata
    trainer_state.json       whatever the trainer needs to resume (step, RNG state, ...)
The last two are what `--resume` needs. Nothing is ever unpickled: weights go through
safetensors.numpy, everything else is JSON.

Every file is first written (and fsync'ed) to a temporary name in the same directory, then
os.replace'd (minillm.fileio), so a crash leaves each file either old or new, never half written.
All files are validated and written to temporaries before the first replace; parameters with NaN/inf
are refused before anything is written, so a diverged run never overwrites a good checkpoint.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from minillm.arrays import to_host
from minillm import __version__
from minillm.fileio import fsync_directory, remove_if_exists, write_temp
from minillm.tree import flatten, unflatten

FORMAT = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"
_SHOW = 5  # how many offending names an error message lists


@dataclass
class Checkpoint:
    """What load_checkpoint returns. params: nested dict of numpy arrays (writable copies);
    config: the config as saved (without the "format" / "minillm_version" keys, see `version`);
    tokenizer_path: path of tokenizer.json or None; optimizer_state: {"step", "m", "v"} as in
    minillm.optim, or None; trainer_state: dict or None."""
    path: str
    params: dict
    config: dict
    version: str | None = None
    tokenizer_path: str | None = None
    optimizer_state: dict | None = None
    trainer_state: dict | None = None


def expected_from(params):
    """Nested params -> {dotted name: (shape tuple, dtype str)}, the `expected` of load_checkpoint."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in flatten(params).items()}


def rng_state(rng):
    """A numpy Generator's state as a JSON-able dict (for trainer_state.json)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x.tolist() if isinstance(x, np.ndarray) else x
    return plain(rng.bit_generator.state)


def rng_from_state(state):
    """Rebuild the numpy Generator saved by rng_state (same stream from where it stopped)."""
    try:
        bit_generator = getattr(np.random, state["bit_generator"])()
        bit_generator.state = state
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"bad RNG state in checkpoint: {e}") from None
    return np.random.Generator(bit_generator)


# ---------------------------------------------------------------------------------------- save



def _check_finite(flat, what):
    bad = [n for n, a in flat.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"refusing to save a checkpoint with non-finite {what}: "
                         f"{', '.join(bad[:_SHOW])}" + (" ..." if len(bad) > _SHOW else ""))


def _json_bytes(obj, what):
    try:
        return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def _st_bytes(flat, meta, what):
    try:
        return safetensors.numpy.save(flat, metadata=meta)
    except Exception as e:  # unsupported dtype (object, bfloat16 ...), non-array leaves
        raise ValueError(f"cannot save the {what} as safetensors: {e}") from None


def _tokenizer_content(tokenizer):
    if hasattr(tokenizer, "save"):
        return lambda path: tokenizer.save(path)
    if isinstance(tokenizer, dict):
        return _json_bytes(tokenizer, "the tokenizer")
    if isinstance(tokenizer, (str, os.PathLike)):
        if not os.path.isfile(tokenizer):
            raise ValueError(f"tokenizer file {str(tokenizer)!r} does not exist")
        return lambda path: shutil.copyfile(tokenizer, path)
    if callable(tokenizer):
        return tokenizer
    raise ValueError("tokenizer must have .save(path), be a JSON dict, a tokenizer.json path or "
                     f"a callable(path); got {type(tokenizer).__name__}")


def save_checkpoint(out_dir, params, config, tokenizer=None, optimizer_state=None,
                    trainer_state=None):
    """Write a checkpoint directory (created if needed) atomically, file by file.

    params: nested dict of arrays. config: JSON-able dict with "arch". tokenizer: an object with
    .save(path), a JSON-able dict, the path of a tokenizer.json to copy, or a callable(path);
    None keeps an existing tokenizer.json. optimizer_state: {"step", "m", "v"} (minillm.optim);
    trainer_state: JSON-able dict. When either of the last two is None, a stale file of that kind
    from an earlier save is removed, so a resume never mixes runs.
    Raises ValueError (and writes nothing) for non-finite params or moments, a config without
    "arch", or values that are not JSON-able.
    """
    if not isinstance(config, dict) or not isinstance(config.get("arch"), str):
        raise ValueError("config must be a dict with an 'arch' string")
    flat = {n: np.ascontiguousarray(to_host(a)) for n, a in flatten(params).items()}
    if not flat:
        raise ValueError("refusing to save a checkpoint without parameters")
    _check_finite(flat, "parameters")
    # One metadata key per file: safetensors serialises the metadata map in hash order, so
    # several keys would make the bytes differ from run to run (checkpoints must be reproducible).
    files = {  # name -> bytes or writer(tmp_path), all prepared (and validated) before any write
        MODEL_FILE: _st_bytes(flat, {"format": "np"}, "parameters"),
        CONFIG_FILE: _json_bytes({**config, "minillm_version": __version__, "format": FORMAT}, "config"),
    }
    if tokenizer is not None:
        files[TOKENIZER_FILE] = _tokenizer_content(tokenizer)
    if optimizer_state is not None:
        if not isinstance(optimizer_state, dict) or not {"step", "m", "v"} <= set(optimizer_state):
            raise ValueError("optimizer_state must be a dict with 'step', 'm' and 'v' "
                             "(minillm.optim.adamw_init)")
        moments = {}
        for key in ("m", "v"):
            for n, a in optimizer_state[key].items():
                if n not in flat or tuple(a.shape) != flat[n].shape:
                    raise ValueError(f"optimizer moment {key}.{n} does not match a parameter")
                moments[f"{key}.{n}"] = np.ascontiguousarray(to_host(a))
        _check_finite(moments, "optimizer moments")
        opt_meta = {"step": str(int(optimizer_state["step"]))}
        files[OPTIMIZER_FILE] = _st_bytes(moments, opt_meta, "optimizer moments")
    if trainer_state is not None:
        files[TRAINER_FILE] = _json_bytes(trainer_state, "trainer_state")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"checkpoint path '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    temps = {}
    try:
        for name, writer in files.items():
            temps[name] = write_temp(out / name, writer)
        for name in (OPTIMIZER_FILE, TRAINER_FILE):
            if name not in files:
                remove_if_exists(out / name)
        # config.json last: a directory with a new config always has the new weights too.
        for name in sorted(temps, key=lambda n: n == CONFIG_FILE):
            os.replace(temps.pop(name), out / name)
    finally:
        for tmp in temps.values():
            remove_if_exists(tmp)
    fsync_directory(out)   # make the renames durable
    return str(out)


# ---------------------------------------------------------------------------------------- load

def _read_json(path):
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}' should hold a JSON object, found {type(obj).__name__}")
    return obj


def _read_safetensors(path):
    """-> (flat dict of writable numpy arrays, metadata dict)."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            flat = {name: np.array(f.get_tensor(name)) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError, numpy errors on bad dtypes ...
        raise ValueError(f"'{path}' is corrupt or truncated: {e}") from None
    return flat, meta


def _names(names):
    names = sorted(names)
    return ", ".join(names[:_SHOW]) + (f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW
                                       else "")


def check_expected(flat, expected, path):
    """Raise one ValueError naming the missing, unexpected and mis-shaped tensors of `flat` vs `expected`."""
    problems = []
    missing = [n for n in expected if n not in flat]
    unexpected = [n for n in flat if n not in expected]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    wrong = []
    for n, (shape, dtype) in expected.items():
        if n in flat:
            a = flat[n]
            if tuple(a.shape) != tuple(shape):
                wrong.append(f"{n} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            elif dtype is not None and str(a.dtype) != str(np.dtype(dtype)):
                wrong.append(f"{n} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if wrong:
        problems.append("; ".join(wrong[:_SHOW]) + (f" (+{len(wrong) - _SHOW} more)"
                                                   if len(wrong) > _SHOW else ""))
    if problems:
        raise ValueError(f"checkpoint '{path}' does not match the model: " + "; ".join(problems))


def _load_optimizer(path, flat):
    moments, meta = _read_safetensors(path)
    moments = {k: moments[k] for k in sorted(moments)}
    state = {"m": {}, "v": {}}
    for key, a in moments.items():
        kind, _, name = key.partition(".")
        if kind not in state or not name:
            raise ValueError(f"'{path}' has an unexpected tensor {key!r} (expected m.* / v.*)")
        if name not in flat or a.shape != flat[name].shape:
            raise ValueError(f"'{path}' does not match the model: {key} has shape {a.shape}, "
                             f"parameter {name!r} has "
                             f"{flat[name].shape if name in flat else 'no such parameter'}")
        state[kind][name] = a
    if set(state["m"]) != set(state["v"]):
        raise ValueError(f"'{path}' is corrupt: m and v cover different parameters")
    try:
        state["step"] = int(meta["step"])
    except (KeyError, ValueError):
        raise ValueError(f"'{path}' has no valid 'step' in its metadata") from None
    return state


def load_checkpoint(path, expected=None, arch=None):
    """Read and validate a checkpoint directory -> Checkpoint.

    expected: {name: (shape, dtype or None)} (see expected_from) to check the weights against;
    arch: the architecture the caller wants. Every problem (missing directory or files, corrupt
    or truncated files, another architecture, missing / unexpected / mis-shaped tensors) raises
    one ValueError saying what is wrong.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"checkpoint directory '{root}' does not exist")
    if not root.is_dir():
        raise ValueError(f"checkpoint '{root}' is not a directory")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (root / name).is_file():
            raise ValueError(f"checkpoint '{root}' has no {name}")
    config = _read_json(root / CONFIG_FILE)
    fmt = config.get("format")
    if not isinstance(config.get("arch"), str) or not isinstance(fmt, int):
        raise ValueError(f"'{root / CONFIG_FILE}' is not a minillm config (needs 'arch' and "
                         "'format')")
    if fmt > FORMAT:
        raise ValueError(f"checkpoint '{root}' has format {fmt}, written by a newer minillm "
                         f"(this one reads format {FORMAT}); upgrade minillm")
    if arch is not None and config["arch"] != arch:
        raise ValueError(f"checkpoint is a '{config['arch']}' model, expected '{arch}'")
    version = config.pop("minillm_version", None)
    del config["format"]
    flat, _ = _read_safetensors(root / MODEL_FILE)
    if expected is not None:
        check_expected(flat, expected, root)
    try:
        params = unflatten(flat)
    except ValueError as e:
        raise ValueError(f"'{root / MODEL_FILE}' has inconsistent names: {e}") from None
    tokenizer = root / TOKENIZER_FILE
    optimizer_state = trainer_state = None
    if (root / OPTIMIZER_FILE).is_file():
        optimizer_state = _load_optimizer(root / OPTIMIZER_FILE, flat)
    if (root / TRAINER_FILE).is_file():
        trainer_state = _read_json(root / TRAINER_FILE)
    return Checkpoint(path=str(root), params=params, config=config, version=version,
                      tokenizer_path=str(tokenizer) if tokenizer.is_file() else None,
                      optimizer_state=optimizer_state, trainer_state=trainer_state)
