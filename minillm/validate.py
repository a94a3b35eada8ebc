"""One validation of what a checkpoint claims, before anything is allocated from it.

    validate_config(config, where)           types, positive sizes, sane upper bounds (LIMITS)
    read_header(path)                        a safetensors file's {name: (shape, dtype)} without its data
    check_header(config, header, where)      the config's sizes against the weights actually present
    expected_shapes(config)                  {name: (shape, dtype)} the config implies (one layer built)
    check_expected(specs, expected, where)   names, shapes and dtypes; one line naming what is wrong
    check_values(flat, where)                finite floats; packed ternary layers consistent
    check_memory(need, what) / training_bytes(config, batch_size)     against MemAvailable

A config.json may come from anywhere (a shared or downloaded checkpoint), so its sizes are never trusted:
they are bounded, and then checked against the shapes in model.safetensors' header, before a model is
built from them. A model module may add bounds for its own keys with a LIMITS fact ({key: (lo, hi)});
any other integer key is bounded by GENERIC_LIMIT.
"""

import json
import math
import os
import re
import struct

import numpy as np

from minillm import models
from minillm.tree import flatten

LIMITS = {
    "vocab_size": (1, 1 << 24), "context": (1, 1 << 20), "n_layer": (1, 1024), "n_head": (1, 4096),
    "d_model": (1, 1 << 16), "d_state": (1, 1024), "d_conv": (1, 64), "expand": (1, 16),
    "n_experts": (0, 1024), "top_k": (1, 1024), "d_ff": (1, 1 << 18), "intermediate_size": (1, 1 << 18),
    "dt_rank": (1, 1 << 16),
}
GENERIC_LIMIT = 1 << 24
POSITIVE_FLOATS = ("norm_eps", "layer_norm_epsilon", "dt_min", "dt_max", "initializer_range")
FLAGS = {"n_layer": "--layers", "n_head": "--heads", "n_experts": "--experts"}   # where the name differs
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_SHOW = 5


def _names(names):
    names = sorted(names)
    return ", ".join(names[:_SHOW]) + (f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def flag_of(key):
    return FLAGS.get(key, "--" + key.replace("_", "-"))


# --------------------------------------------------------------------------------------------- config

def validate_config(config, where="config"):
    """Raise one ValueError for a config that is not a sane minillm model config."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: not a JSON object")
    arch = config.get("arch")
    if not isinstance(arch, str) or arch not in models.ARCHITECTURES:
        raise ValueError(f"{where}: unknown architecture {arch!r} (known: {', '.join(models.ARCHITECTURES)})")
    limits = {**LIMITS, **getattr(models.get_model(arch), "LIMITS", {})}
    for key in ("vocab_size", "context", "n_layer", "d_model"):
        if key not in config:
            raise ValueError(f"{where}: {key} is missing")
    for key, value in config.items():
        if isinstance(value, bool) or value is None or isinstance(value, (str, dict, list)):
            continue
        if isinstance(value, float) and key not in limits:
            if not math.isfinite(value) or (key in POSITIVE_FLOATS and value <= 0) or value < 0:
                raise ValueError(f"{where}: {key} = {value!r} must be a finite"
                                 f"{' positive' if key in POSITIVE_FLOATS else ' non-negative'} number")
            continue
        lo, hi = limits.get(key, (0, GENERIC_LIMIT))
        if not isinstance(value, int):
            raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{where}: {key} = {value} is out of range: it must be in [{lo}, {hi}] "
                             f"({flag_of(key)})")
    for key in ("vocab_size", "context", "n_layer", "d_model"):
        if not isinstance(config[key], int) or isinstance(config[key], bool):
            raise ValueError(f"{where}: {key} must be an integer, got {config[key]!r}")
    for key in ("ternary", "packed"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"{where}: {key} must be true or false, got {config[key]!r}")
    if config.get("dtype", "float32") not in ("float32", "float64"):
        raise ValueError(f"{where}: dtype must be float32 or float64, got {config.get('dtype')!r}")
    if "n_head" in config and (not isinstance(config["n_head"], int) or config["d_model"] % config["n_head"]):
        raise ValueError(f"{where}: d_model {config['d_model']} is not divisible by n_head {config['n_head']}")
    if config.get("n_experts") and config.get("top_k", 1) > config["n_experts"]:
        raise ValueError(f"{where}: top_k {config['top_k']} is more than n_experts {config['n_experts']}")
    if config.get("dt_rank", "auto") != "auto" and not isinstance(config["dt_rank"], int):
        raise ValueError(f"{where}: dt_rank must be \"auto\" or an integer, got {config['dt_rank']!r}")


# ---------------------------------------------------------------------------------------- weights

def read_header(path):
    """-> {name: (shape tuple, numpy dtype name)} from a safetensors header, reading no tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(n).decode("utf-8"))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, dtype, (start, end) = tuple(info["shape"]), info["dtype"], info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"tensor {name!r} has a bad shape or offsets")
            out[name] = (shape, DTYPES.get(dtype, dtype))
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is corrupt or truncated: {e}") from None
    return out


def _layer_index(name):
    """The first numeric part of a dotted name (the block index in every architecture), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def check_header(config, header, where):
    """The config's n_layer, vocab_size, d_model (and context, for learned positions: its table cannot be
    larger than all the weights) against the shapes present in the weights file, before any model is built
    from the config (expected_shapes then checks every tensor)."""
    layers = {i for i in map(_layer_index, header) if i is not None}
    L, V, d = config["n_layer"], config["vocab_size"], config["d_model"]
    if layers != set(range(L)):
        raise ValueError(f"{where}: config.json says n_layer {L}, but the weights hold {len(layers)} "
                         f"layer(s){'' if layers == set(range(len(layers))) else ' (numbered with gaps)'}")
    shapes = {s for s, _ in header.values()}
    if (V, d) not in shapes:
        raise ValueError(f"{where}: config.json says vocab_size {V} and d_model {d}, but the weights have "
                         f"no ({V}, {d}) embedding")
    total = sum(math.prod(s) for s, _ in header.values())
    if getattr(models.get_model(config["arch"]), "BOUNDED_POSITIONS", False) and config["context"] * d > total:
        raise ValueError(f"{where}: config.json says context {config['context']}, but the weights hold "
                         f"{total:,} values in all: no ({config['context']}, {d}) position table fits")
    check_memory(sum(math.prod(s) * np.dtype(t).itemsize for s, t in header.values()
                     if t in DTYPES.values() and t != "bfloat16"), "loading these weights")


def expected_shapes(config):
    """{dotted name: (shape, dtype)} of the model `config` describes, packed layers included, without building
    all of it: at most two layers are built (the first may differ, e.g. RWKV's pre_ln; every later one has
    the shapes of the second) and the second's names repeated for the layer indices after it. The vocabulary
    and context are not built at full size either (an RWKV embedding's orthogonal init alone is a QR of a
    (V, d) matrix): two builds with tiny ones (3 / 7 and 5 / 11) tell which dimensions they are."""
    model = models.get_model(config["arch"])
    L = config["n_layer"]

    def build(vocab, context):
        few = model.init({**config, "n_layer": min(L, 2), "vocab_size": vocab, "context": context},
                         np.random.default_rng(0))
        if config.get("packed"):
            from minillm.nn.ternary import pack_params

            few = pack_params(few, {**config, "vocab_size": vocab, "context": context})
        return flatten(few)

    small, other = build(3, 7), build(5, 11)
    full = {(3, 5): config["vocab_size"], (7, 11): config["context"]}
    out = {}
    for name, a in small.items():
        shape = tuple(full.get(pair, pair[0]) for pair in zip(a.shape, other[name].shape))
        parts = name.split(".")
        j = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        for i in ([None] if j is None else [0] if parts[j] == "0" else range(1, L)):
            if i is not None:
                parts[j] = str(i)
            out[".".join(parts)] = (shape, str(a.dtype))
    return out


def spec_of(flat):
    """{name: array or (shape, dtype)} -> {name: (shape, dtype str)}."""
    return {n: (tuple(a[0]), str(a[1])) if isinstance(a, tuple) else (tuple(a.shape), str(a.dtype))
            for n, a in flat.items()}


def check_expected(flat, expected, path):
    """Raise one ValueError naming the missing, unexpected, mis-shaped and mis-typed tensors of `flat`
    (arrays or (shape, dtype) pairs) against `expected` ({name: (shape, dtype or None)})."""
    got = spec_of(flat)
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    problems = []
    if missing and len(missing) == len(expected):
        problems.append("none of its tensor names belongs to this architecture (weights of another "
                        "architecture?)")
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    wrong = []
    for n, (shape, dtype) in expected.items():
        if n in got:
            if got[n][0] != tuple(shape):
                wrong.append(f"{n} has shape {got[n][0]}, expected {tuple(shape)}")
            elif dtype is not None and got[n][1] != str(np.dtype(dtype)):
                wrong.append(f"{n} has dtype {got[n][1]}, expected {np.dtype(dtype)}")
    if wrong:
        problems.append("; ".join(wrong[:_SHOW]) + (f" (+{len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""))
    if problems:
        raise ValueError(f"checkpoint '{path}' does not match the model: " + "; ".join(problems))


def check_values(flat, where, what="tensor"):
    """NaN/inf in any float tensor, and packed layers whose weight_shape / weight_scale do not fit."""
    bad = [n for n, a in flat.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"{where}: non-finite values (NaN or inf) in {len(bad)} {what}(s): {_names(bad)}")
    for n, a in flat.items():
        if n.endswith(".weight_shape"):
            w = flat.get(n[: -len("_shape")])
            O, I = (int(v) for v in a) if a.shape == (2,) else (-1, -1)
            if w is None or w.shape != ((O + 3) // 4, I) or O < 1:
                raise ValueError(f"{where}: {n} = {a.tolist()} does not fit the packed weight "
                                 f"{None if w is None else w.shape}")
        if n.endswith(".weight_scale") and not (a > 0).all():
            raise ValueError(f"{where}: {n} must be positive")


# ---------------------------------------------------------------------------------------- memory

def available_memory():
    """Bytes of memory available now: /proc/meminfo MemAvailable, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def check_memory(need, what):
    """ValueError when `need` bytes are more than the memory available."""
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(f"{what} needs at least {_fmt(need)} of memory, but only {_fmt(have)} is available; "
                         "use smaller sizes")


def training_bytes(config, batch_size):
    """A lower bound on a training run's memory: the parameters (an embedding and >= 4 d^2 per layer), their
    gradients and two AdamW moments, and the activations (the logits and their gradient, and a few (B, T, d)
    arrays per layer kept for the backward)."""
    V, T, L, d = (int(config[k]) for k in ("vocab_size", "context", "n_layer", "d_model"))
    item = 8 if config.get("dtype") == "float64" else 4
    params = V * d + L * 4 * d * d
    return item * (4 * params + int(batch_size) * T * (2 * V + 8 * L * d))
