"""The weights of a checkpoint directory as Hugging Face lays them out: one model.safetensors, or shards
listed by model.safetensors.index.json ({"weight_map": {tensor name: shard file}}), as save_pretrained
writes a large model. Nothing is unpickled: a directory holding only pytorch_model.bin (or another pickle
/ framework file) is refused in one line that says how to convert it.

    weight_files(vdir, shown)    -> [file names] holding the tensors (checked: plain names, present)
    read_header(vdir, files)     -> {tensor name: (shape, dtype)} over all of them, no tensor data read
    read_tensors(vdir, files, shown) -> {tensor name: numpy array} (bfloat16 widened to float32 exactly)
"""

import json
import os

import numpy as np

from minillm import validate

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5",
           "flax_model.msgpack")


def weight_files(vdir, shown):
    """The safetensors files of the checkpoint in vdir (shown: the directory as the user named it)."""
    if os.path.isfile(os.path.join(vdir, MODEL_FILE)):
        return [MODEL_FILE]
    if os.path.isfile(os.path.join(vdir, INDEX_FILE)):
        return _shards(vdir, os.path.join(shown, INDEX_FILE))
    pickled = [name for name in PICKLED if os.path.isfile(os.path.join(vdir, name))]
    if pickled:
        raise ValueError(f"checkpoint '{shown}' has {pickled[0]} but no {MODEL_FILE}: minillm does not load it, "
                         "because loading it would unpickle (run whatever code it holds); convert it to "
                         "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True), "
                         "or safetensors.torch.save_file)")
    raise ValueError(f"checkpoint '{shown}' has no {MODEL_FILE}")


def _shards(vdir, shown_index):
    try:
        with open(os.path.join(vdir, INDEX_FILE), "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{shown_index}' is not a valid safetensors index ({type(e).__name__}: {e})") from None
    files = sorted(set(weight_map.values()), key=str)
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") \
                or not name.endswith(".safetensors"):
            raise ValueError(f"'{shown_index}' names the shard {name!r}: shards must be .safetensors files "
                             "beside it")
        if not os.path.isfile(os.path.join(vdir, name)):
            raise ValueError(f"'{shown_index}' lists the shard {name}, which is missing")
    return files


def read_header(vdir, files, shown):
    """{tensor name: (shape, numpy dtype name)} over every file; a name in two files is refused."""
    out, where = {}, {}
    for name in files:
        for tensor, spec in validate.read_header(os.path.join(vdir, name)).items():
            if tensor in out:
                raise ValueError(f"checkpoint '{shown}': tensor {tensor} is in both {where[tensor]} and {name}")
            out[tensor], where[tensor] = spec, name
    return out


def read_tensors(vdir, files, shown):
    """{tensor name: writable numpy array} of every file; bfloat16 becomes float32 (exact: its bits are the
    top half of a float32). Each tensor is read with one readinto into its own array, not through a memory
    map: mapped pages of the file would count in the process's memory on top of the arrays (peak RSS 2.4x
    the file for GPT-2 124M through safetensors' reader, about 1x this way)."""
    flat = {}
    for name in files:
        path = os.path.join(vdir, name)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                for tensor, info in header.items():
                    flat[tensor] = _read_one(f, 8 + n, info)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"'{os.path.join(shown, name)}' is corrupt or truncated: {e}") from None
    return flat


def _read_one(f, base, info):
    start, end = info["data_offsets"]
    shape, code = tuple(info["shape"]), info["dtype"]
    if code not in validate.DTYPES:
        raise ValueError(f"unsupported dtype {code}")
    stored = np.dtype("<u2") if code == "BF16" else np.dtype(validate.DTYPES[code]).newbyteorder("<")
    a = np.empty(shape, stored)
    if a.nbytes != end - start:
        raise ValueError(f"a tensor of shape {shape} and dtype {code} does not take {end - start} bytes")
    f.seek(base + start)
    if f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
        raise ValueError("the file ends inside a tensor")
    if code == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
