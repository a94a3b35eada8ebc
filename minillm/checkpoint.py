"""Checkpoint directories: safetensors weights + JSON config, one transaction per save, validation on load.

The directory the user names (--out) holds, under the fixed names Hugging Face looks for,
    model.safetensors        the parameters, flat dotted names (minillm.tree.flatten) = HF's names and layouts
    config.json              the model config in HF's keys, minillm's own under "minillm" (hf_config.py)
    tokenizer.json           written by the tokenizer's own save(path) (optional), in HF tokenizers' format
    tokenizer_config.json    beside it, for transformers.AutoTokenizer (hf_tokenizer.companion_files)
    optimizer.safetensors    AdamW moments as "m.<name>" / "v.<name>", step in the metadata
    trainer_state.json       whatever the trainer needs to resume (step, RNG state, ...)
The last two are what `--resume` needs. Nothing is ever unpickled: weights go through safetensors, the
rest is JSON.

Saving (minillm.store.publish): every name is a fixed link into current/, and `current` a link to
.versions/vNNNNNN, the files of one save with their sha256 in checksums.json. A save writes a whole new
version and then switches `current` with one os.replace, so a reader sees the old checkpoint or the new
one, whole, never model of step N+1 beside optimizer state of step N; the next save removes what a killed
save left behind. The writer holds an exclusive lock (fcntl.flock on .lock): a second writer is refused
naming the holder's pid. store.py's docstring says why this layout. Everything is validated and
serialised before anything is written; NaN/inf parameters are refused, so a diverged run never replaces
a good checkpoint. The tensors' bytes (model.safetensors, optimizer.safetensors) are the same as before
this layout existed.

Loading (load_checkpoint) reads one version and refuses, in one line naming the file: a file that does
not match its checksum (edited, or copied in from another save), a config whose sizes are not sane or do
not match the weights present (checked on the safetensors header, before anything is built from it), a
missing / extra / mis-shaped / mis-typed tensor, NaN/inf values, and optimizer or trainer state of another
step. Plain directories (an older minillm's, or assembled by hand) load too, without checksums.

Hugging Face: `AutoModelForCausalLM.from_pretrained(dir)` loads what save_checkpoint writes (it follows the
fixed links), and load_checkpoint reads what HF's save_pretrained writes (GPT-2, Llama, Mistral, Mixtral,
Mamba, RWKV): config.json translated by hf_config (a value minillm does not implement is one error naming
the key), model.safetensors or the shards of model.safetensors.index.json (hf_weights), HF-only buffers and
a stored copy of a tied head dropped, bfloat16 / float16 widened to float32; pytorch_model.bin is refused
(it would unpickle). Config files of format 1 (earlier minillm: its keys at the top level) still load.
"""

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from minillm.arrays import to_host
from minillm import __version__, hf_config, hf_weights, models, store, validate
from minillm.tree import flatten, unflatten
from minillm.validate import check_expected  # noqa: F401  (part of this module's API)

FORMAT = hf_config.FORMAT         # 2: HF keys + a "minillm" section; 1 (minillm keys only) still loads
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"
FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, OPTIMIZER_FILE, TRAINER_FILE)
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


@dataclass
class Checkpoint:
    """What load_checkpoint returns. params: nested dict of numpy arrays (writable copies);
    config: the config as saved (without the "format" / "minillm_version" keys, see `version`);
    tokenizer_path: path of tokenizer.json or None; optimizer_state: {"step", "m", "v"} as in
    minillm.optim, or None; trainer_state: dict or None; fingerprint: sha256 of model.safetensors."""
    path: str
    params: dict
    config: dict
    version: str | None = None
    tokenizer_path: str | None = None
    optimizer_state: dict | None = None
    trainer_state: dict | None = None
    fingerprint: str | None = None


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


def rng_from_state(state, where="checkpoint"):
    """Rebuild the numpy Generator saved by rng_state (same stream from where it stopped)."""
    try:
        if state["bit_generator"] not in BIT_GENERATORS:
            raise ValueError(f"unknown bit generator {state['bit_generator']!r}")
        bit_generator = getattr(np.random, state["bit_generator"])()
        bit_generator.state = state
    except Exception as e:   # KeyError, TypeError, ValueError, OverflowError ... from any garbage
        raise ValueError(f"bad RNG state in {where}: {type(e).__name__}: {e}") from None
    return np.random.Generator(bit_generator)


# ---------------------------------------------------------------------------------------- save

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
        with open(tokenizer, "rb") as f:     # read now: it may live in the version being replaced
            return f.read()
    if callable(tokenizer):
        return tokenizer
    raise ValueError("tokenizer must have .save(path), be a JSON dict, a tokenizer.json path or "
                     f"a callable(path); got {type(tokenizer).__name__}")


def _tokenizer_companions(tokenizer, content, config):
    """hf_tokenizer.companion_files of the tokenizer saved as `content` ({} when minillm cannot read it)."""
    from minillm import hf_tokenizer
    from minillm.char_tokenizer import tokenizer_from_json

    if not hasattr(tokenizer, "eot_id"):
        try:
            tokenizer = tokenizer_from_json(bytes(content).decode("utf-8"))
        except (TypeError, ValueError):   # a writer(path), or a tokenizer.json minillm does not read
            return {}
    return hf_tokenizer.companion_files(tokenizer, model_max_length=config.get("context"))


def _current_tokenizer(out):
    """The bytes of the tokenizer.json the checkpoint in `out` has now (checked), or None."""
    def read(vdir, files):
        path = os.path.join(vdir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        with open(store.verify(out, vdir, files, TOKENIZER_FILE), "rb") as f:
            return f.read()
    return store.read(out, read) if os.path.isdir(out) else None


def is_minillm_checkpoint(directory):
    """A plain directory an older minillm wrote (store.publish adopts its files instead of refusing)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE), "rb") as f:
            config = json.loads(f.read())
        if not isinstance(config, dict):
            return False
        section = config.get(hf_config.SECTION)
        return (isinstance(config.get("format"), int) and "minillm_version" in config) or \
            (isinstance(section, dict) and isinstance(section.get("format"), int))
    except (OSError, ValueError):
        return False


def check_writable(out_dir):
    """Fail early, writing nothing, when a save to out_dir would have to replace files minillm did not
    write there (see store.check_target)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"checkpoint path '{out_dir}' exists and is not a directory")
    store.check_target(os.fspath(out_dir), FILES, is_minillm_checkpoint)


def save_checkpoint(out_dir, params, config, tokenizer=None, optimizer_state=None,
                    trainer_state=None):
    """Write a checkpoint directory (created if needed) as one transaction (see the module docstring).

    params: nested dict of arrays. config: JSON-able dict with "arch". tokenizer: an object with
    .save(path), a JSON-able dict, the path of a tokenizer.json to copy, or a callable(path);
    None keeps the checkpoint's current tokenizer.json. optimizer_state: {"step", "m", "v"}
    (minillm.optim); trainer_state: JSON-able dict. When either of the last two is None, the new version
    has none, so a resume never mixes runs.
    Raises ValueError (and changes nothing) for non-finite params or moments, a config without "arch",
    values that are not JSON-able, a directory another process is writing, and a failed write (a full
    disk: the old checkpoint stays current).
    """
    if not isinstance(config, dict) or not isinstance(config.get("arch"), str):
        raise ValueError("config must be a dict with an 'arch' string")
    flat = {n: np.ascontiguousarray(to_host(a)) for n, a in flatten(params).items()}
    if not flat:
        raise ValueError("refusing to save a checkpoint without parameters")
    _check_finite(flat, "parameters")
    # One metadata key per file: safetensors serialises the metadata map in hash order, so
    # several keys would make the bytes differ from run to run (checkpoints must be reproducible).
    models.get_model(config["arch"])          # an unknown architecture is refused before anything is written
    files = {  # name -> bytes or writer(tmp_path), all prepared (and validated) before any write
        MODEL_FILE: _st_bytes(flat, {"format": "np"}, "parameters"),
    }
    out = os.fspath(out_dir)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"checkpoint path '{out}' exists and is not a directory")
    tok = _tokenizer_content(tokenizer) if tokenizer is not None else _current_tokenizer(out)
    if tok is not None:
        files[TOKENIZER_FILE] = tok
        files.update(_tokenizer_companions(tokenizer, tok, config))
    eot = hf_config.eot_id_of(tokenizer if tokenizer is not None else tok)
    files[CONFIG_FILE] = _json_bytes(hf_config.to_file(config, __version__, eot), "config")
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
    try:
        store.publish(out, files, known=FILES, adoptable=is_minillm_checkpoint)
    except OSError as e:
        raise ValueError(f"could not save the checkpoint to '{out}': {e.strerror or e}"
                         f"{f' ({e.filename})' if e.filename else ''}; nothing was replaced") from None
    return out


def _check_finite(flat, what):
    bad = [n for n, a in flat.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"refusing to save a checkpoint with non-finite {what}: {validate._names(bad)}")


# ---------------------------------------------------------------------------------------- load

def _read_json(path, shown):
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{shown}' is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'{shown}' should hold a JSON object, found {type(obj).__name__}")
    return obj


def _read_safetensors(path, shown):
    """-> (flat dict of writable numpy arrays, metadata dict)."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            flat = {name: np.array(f.get_tensor(name)) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError, numpy errors on bad dtypes ...
        raise ValueError(f"'{shown}' is corrupt or truncated: {e}") from None
    return flat, meta


def _load_optimizer(path, shown, params):
    header = validate.read_header(path)
    want = {f"{k}.{n}": spec for n, spec in validate.spec_of(params).items() for k in ("m", "v")}
    extra = [k for k in header if k not in want]
    if extra:
        raise ValueError(f"'{shown}' does not match the model: unexpected {validate._names(extra)}")
    validate.check_expected(header, {k: want[k] for k in header}, shown)
    moments, meta = _read_safetensors(path, shown)
    validate.check_values(moments, shown, "moment")
    state = {"m": {}, "v": {}}
    for key in sorted(moments):
        kind, _, name = key.partition(".")
        state[kind][name] = moments[key]
    if set(state["m"]) != set(state["v"]):
        raise ValueError(f"'{shown}' is corrupt: m and v cover different parameters")
    try:
        state["step"] = int(meta["step"])
        if state["step"] < 0:
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(f"'{shown}' has no valid 'step' in its metadata") from None
    return state


def _load(root, vdir, files, expected, arch):
    shown = lambda name: os.path.join(root, name)   # noqa: E731  the path the user knows
    path = lambda name: store.verify(root, vdir, files, name)   # noqa: E731  checked against its sha256
    if not os.path.isfile(os.path.join(vdir, CONFIG_FILE)):
        raise ValueError(f"checkpoint '{root}' has no {CONFIG_FILE}")
    weight_files = hf_weights.weight_files(vdir, str(root))
    raw = _read_json(path(CONFIG_FILE), shown(CONFIG_FILE))
    config, version, kind = hf_config.from_file(raw, shown(CONFIG_FILE))
    if not isinstance(config.get("arch"), str):
        raise ValueError(f"'{shown(CONFIG_FILE)}' is not a minillm config (needs 'arch')")
    if arch is not None and config["arch"] != arch:
        raise ValueError(f"checkpoint is a '{config['arch']}' model, expected '{arch}'")
    validate.validate_config(config, shown(CONFIG_FILE))
    for name in weight_files:
        path(name)
    weights_shown = shown(weight_files[0] if len(weight_files) == 1 else hf_weights.INDEX_FILE)
    header = hf_weights.read_header(vdir, weight_files, root)
    validate.check_header(config, header, weights_shown)
    if kind == "hf":      # HF's dtype: float64 only when every float tensor is; half precision is widened
        floats = {t for _, t in header.values() if t in ("float64", "float32", "float16", "bfloat16")}
        config["dtype"] = "float64" if floats == {"float64"} else "float32"
    if expected is None:
        expected = validate.expected_shapes(config)
    if kind != "hf":
        validate.check_expected(header, expected, root)
    flat = hf_weights.read_tensors(vdir, weight_files, root)
    if kind == "hf":
        flat = _from_hf_tensors(flat, config, weights_shown)
        validate.check_expected(flat, expected, root)
    validate.check_values(flat, weights_shown)
    try:
        params = unflatten(flat)
    except ValueError as e:
        raise ValueError(f"'{weights_shown}' has inconsistent names: {e}") from None
    optimizer_state = trainer_state = None
    if os.path.isfile(os.path.join(vdir, OPTIMIZER_FILE)):
        optimizer_state = _load_optimizer(path(OPTIMIZER_FILE), shown(OPTIMIZER_FILE), flat)
    if os.path.isfile(os.path.join(vdir, TRAINER_FILE)):
        trainer_state = _read_json(path(TRAINER_FILE), shown(TRAINER_FILE))
        step = trainer_state.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"'{shown(TRAINER_FILE)}': step must be a non-negative integer, got {step!r}")
        if optimizer_state is not None and optimizer_state["step"] != step:
            raise ValueError(f"'{shown(TRAINER_FILE)}' is at step {step} but '{shown(OPTIMIZER_FILE)}' at step "
                             f"{optimizer_state['step']}: the files come from different saves")
    tokenizer = None
    if os.path.isfile(os.path.join(vdir, TOKENIZER_FILE)):
        tokenizer = path(TOKENIZER_FILE)
    fingerprint = _fingerprint(vdir, files, weight_files)
    return Checkpoint(path=str(root), params=params, config=config, version=version,
                      tokenizer_path=tokenizer, optimizer_state=optimizer_state,
                      trainer_state=trainer_state, fingerprint=fingerprint)


def _from_hf_tensors(flat, config, where):
    """HF's tensors -> minillm's: the model module's from_hf_weights (buffers, tied head, fused experts), then
    the floats in the config's dtype."""
    convert = getattr(models.get_model(config["arch"]), "from_hf_weights", None)
    if convert is not None:
        try:
            flat = convert(flat, config)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    dtype = np.dtype(config["dtype"])
    return {n: a.astype(dtype) if a.dtype.kind == "f" and a.dtype != dtype else a for n, a in flat.items()}


def _fingerprint(vdir, files, weight_files):
    """sha256 of model.safetensors (from checksums.json when saved by minillm); of the shards' sha256s in
    order for a sharded directory."""
    digest = lambda name: files[name]["sha256"] if files and name in files else \
        store.sha256_file(os.path.join(vdir, name))   # noqa: E731
    if weight_files == [MODEL_FILE]:
        return digest(MODEL_FILE)
    return hashlib.sha256("".join(f"{n} {digest(n)}\n" for n in weight_files).encode()).hexdigest()


def load_checkpoint(path, expected=None, arch=None):
    """Read and validate a checkpoint directory -> Checkpoint (see the module docstring).

    expected: {name: (shape, dtype or None)} (see expected_from) to check the weights against instead of
    the shapes the config implies; arch: the architecture the caller wants. Every problem (a missing
    directory or file, corrupt, truncated or tampered files, an insane config, another architecture,
    missing / unexpected / mis-shaped tensors, NaN, state of another save) raises one ValueError.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"checkpoint directory '{root}' does not exist")
    if not root.is_dir():
        raise ValueError(f"checkpoint '{root}' is not a directory")
    return store.read(str(root), lambda vdir, files: _load(root, vdir, files, expected, arch))


def load_tokenizer(ckpt):
    """The checkpoint's tokenizer, checked: present, with <|endoftext|>, and of the config's vocab_size.
    tokenizer.json (minillm's or HF's); else GPT-2's vocab.json + merges.txt, as an HF directory may have
    them (hf_tokenizer.load_directory)."""
    from minillm.char_tokenizer import load_tokenizer   # a BPE or a character vocabulary, by its "type"

    tok = None
    if ckpt.tokenizer_path is not None:
        tok = load_tokenizer(ckpt.tokenizer_path)
    elif os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_tokenizer.py")):
        tok = importlib.import_module("minillm.hf_tokenizer").load_directory(ckpt.path)   # this package's own
    if tok is None:
        raise ValueError(f"checkpoint '{ckpt.path}' has no {TOKENIZER_FILE}")
    shown = os.path.join(ckpt.path, TOKENIZER_FILE)
    if tok.eot_id is None:
        raise ValueError(f"'{shown}' has no <|endoftext|> token, which minillm needs to separate documents")
    if tok.vocab_size != ckpt.config["vocab_size"]:
        raise ValueError(f"'{shown}' has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{ckpt.config['vocab_size']}: they do not belong together")
    return tok
