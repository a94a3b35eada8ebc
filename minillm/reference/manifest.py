"""A golden directory's manifest.json, read and validated once (minillm.reference re-exports these).

    read_manifest(directory) -> dict          every structural problem is one ValueError naming it
    manifest_entry(manifest, directory, component) -> entry
    case_path(directory, file) -> path        a variant's `file`, confined to the directory

A manifest may come from anywhere, so nothing in it is trusted: every component entry must be an object
with at least one variant, every variant a file name inside the directory (no absolute path, no `..`, and
the resolved path -- symlinks followed -- inside the resolved directory), a sha256, a finite positive rtol
and a tensor table.
"""

import json
import math
import os

FORMAT, VERSION = "minillm-reference", 1


def case_path(directory, file):
    """The path of a variant's file; ValueError unless it stays inside `directory`."""
    if not isinstance(file, str) or not file or "\0" in file:
        raise ValueError(f"{directory}: manifest.json names a file {file!r}, not a file name")
    parts = file.replace("\\", "/").split("/")
    if os.path.isabs(file) or ".." in parts:
        raise ValueError(f"{directory}: manifest.json names the file {file!r}, outside the golden directory: "
                         "refusing to open it")
    path = os.path.join(directory, file)
    root = os.path.realpath(directory)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"{directory}: manifest.json's file {file!r} resolves outside the golden directory "
                         "(a symlink?): refusing to open it")
    return path


def _check_entry(path, directory, name, entry):
    where = f"{path}: component {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {json.dumps(entry)}, not an object")
    variants = entry.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{where} has no variants (nothing to check against)")
    if not isinstance(entry.get("config", {}), dict):
        raise ValueError(f"{where}: config must be an object")
    for variant, info in variants.items():
        w = f"{where} variant {variant!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{w} is {json.dumps(info)}, not an object")
        case_path(directory, info.get("file"))
        if not isinstance(info.get("sha256"), str):
            raise ValueError(f"{w} has no sha256")
        rtol = info.get("rtol")
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol < 0:
            raise ValueError(f"{w}: rtol must be a finite non-negative number, got {rtol!r}")
        tensors = info.get("tensors")
        if not isinstance(tensors, dict) or not tensors or not all(
                isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)
                for t in tensors.values()):
            raise ValueError(f"{w}: tensors must map names to {{\"shape\", \"dtype\"}}")


def read_manifest(directory):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory")
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no manifest.json, not a golden-case directory "
                         "(write one with `minillm reference make DIR`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a minillm golden-case manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION or not isinstance(manifest.get("components"), dict):
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r} is not supported "
                         f"(this minillm reads version {VERSION})")
    if not manifest["components"]:
        raise ValueError(f"{path}: the manifest lists no components")
    for name, entry in manifest["components"].items():
        _check_entry(path, directory, name, entry)
    return manifest


def manifest_entry(manifest, directory, component):
    """The manifest's entry for `component`; ValueError naming what the directory has."""
    comps = manifest["components"]
    if component not in comps:
        raise ValueError(f"{directory}: has no golden case for {component!r} (it has: "
                         f"{', '.join(comps) or 'none'})")
    return comps[component]
