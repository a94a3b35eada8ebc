"""Golden cases: reference inputs, parameters, outputs and gradients that any implementation (PyTorch,
JAX, Triton, C, ...) can be checked against (the README section "Golden cases" is the user guide).

    make(directory, components=None, seed=0) -> manifest     writes the files below
    load(directory, component, variant="float64") -> Case    one golden case
    check(component, fn, directory, ...) -> Report           runs fn on the golden inputs, compares
    check_directory(directory, impl, ...) -> DirectoryReport  every component an implementation has
    resolve_impl("pkg.module[:function]" or "file.py[:function]", components) -> {component: fn}

A golden directory holds `<component>.safetensors` (float64), for some components also
`<component>.float32.safetensors`, and `manifest.json`. Tensor names are "<section>/<name>", section
one of inputs, params, upstream, outputs, grads. Calling convention, for every component:

    fn(inputs, params, upstream, config) -> (outputs, grads)      (or just outputs)

{name: array} dicts; grads[name] = d(sum_o sum(outputs[o] * upstream[o])) / d(inputs or params)[name].
minillm's own implementations in this form are the component functions of reference/cases.py
(with the registry COMPONENTS; the MoE, Mamba, RWKV and BitNet cases are in reference/cases_models.py,
the Llama family's in reference/cases_llama.py, both re-exported by cases.py). The comparison and its Report are in reference/report.py.
Per tensor, rel = max |got - want| / max |want| must be <= the variant's rtol; integer tensors must
match exactly. float32 variants: the case rounded to float32, expected values computed in float64 on
it. The same command writes byte-identical files (fixed per-component seeds, deterministic kernels,
one-key safetensors metadata, sorted JSON).
"""

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import zlib

import numpy as np

from minillm import __version__
from minillm.fileio import atomic_write
# the comparison and its report; ImplementationError, Report, Row, DirectoryReport and compare_case are
# part of this API
from minillm.reference.report import (DirectoryReport, ImplementationError, Report, Row,  # noqa: F401
                                      compare_case, to_numpy)

from minillm.reference.manifest import FORMAT, VERSION, case_path, manifest_entry, read_manifest  # noqa: F401
SECTIONS = ("inputs", "params", "upstream", "outputs", "grads")
CONVENTION = ("fn(inputs, params, upstream, config) -> (outputs, grads); grads[name] = d(sum_o "
              "sum(outputs[o] * upstream[o])) / d(inputs or params)[name]")
ERROR_MEASURE = "rel = max|got - want| / max|want| (absolute when want is all zero); pass: rel <= rtol"


def _registry():
    from minillm.reference.cases import COMPONENTS

    return COMPONENTS


def components():
    """Names of every component minillm can write golden cases for, in manifest order."""
    return list(_registry())


def _split_names(names):
    """"a,b c" or ["a,b", "c"] -> ["a", "b", "c"]."""
    return [n for part in ([names] if isinstance(names, str) else names)
            for n in str(part).replace(",", " ").split()]


def _check_names(names):
    known = _registry()
    if names is None:
        return list(known)
    names = _split_names(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown component {bad[0]!r}; known: {', '.join(known)}")
    if not names:
        raise ValueError("no components given")
    return list(dict.fromkeys(names))


# --- making golden files ----------------------------------------------------------------------------


def _cast(tensors, dtype):
    return {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in tensors.items()}


def _arrays(d, what):
    out = {}
    for k, v in d.items():
        a = np.array(to_numpy(v), order="C")    # a copy; keeps 0-d arrays 0-d
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise ValueError(f"{what}[{k!r}]: not a numeric array ({a.dtype})")
        out[k] = a
    return out


def build(component, seed=0, variant="float64"):
    """-> {"<section>/<name>": array} of one golden case (computed, nothing written)."""
    spec = _registry()[component]
    rng = np.random.default_rng([int(seed), zlib.crc32(component.encode())])
    inputs, params, upstream = (_arrays(d, component) for d in spec["sample"](rng))
    if variant == "float32":  # the case rounded to float32; expected values computed in float64 on it
        inputs, params, upstream = (_cast(_cast(d, np.float32), np.float64) for d in (inputs, params, upstream))
    overlap = set(inputs) & set(params)
    if overlap:
        raise ValueError(f"{component}: {sorted(overlap)} named both as input and as param")
    res = spec["fn"]({k: v.copy() for k, v in inputs.items()}, {k: v.copy() for k, v in params.items()},
                     upstream, json.loads(json.dumps(spec["config"])))
    outputs, grads = (_arrays(d, component) for d in res)
    tensors = {}
    for section, d in zip(SECTIONS, (inputs, params, upstream, outputs, grads)):
        d = _cast(d, np.float32) if variant == "float32" else d
        tensors.update((f"{section}/{k}", v) for k, v in d.items())
    return tensors


def _file_name(component, variant):
    return f"{component}.safetensors" if variant == "float64" else f"{component}.{variant}.safetensors"


def _short_lists(text):
    """Put JSON lists of numbers (shapes, betas) and each tensor's {dtype, shape} on one line."""
    text = re.sub(r"\[\s+([-+.\deE]+(?:,\s+[-+.\deE]+)*)\s+\]",
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
    return re.sub(r'\{\s+("dtype": "\w+"),\s+("shape": \[[^\]]*\])\s+\}', r"{\1, \2}", text)


def make(directory, components=None, seed=0, log=None):
    """Write the golden files of `components` (default: all) and manifest.json into `directory`.

    Returns the manifest dict. Re-running with the same arguments writes byte-identical files."""
    from safetensors.numpy import save

    names = _check_names(components)
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "minillm_version": __version__, "seed": int(seed),
                "calling_convention": CONVENTION, "error_measure": ERROR_MEASURE, "components": {}}
    for name in names:
        spec = _registry()[name]
        entry = {k: spec[k] for k in ("matches", "math", "config")}
        entry["variants"] = {}
        for variant, rtol in spec["variants"].items():
            tensors = build(name, seed, variant)
            data = save(tensors, metadata={"minillm_reference": f"{name}/{variant}"})
            fname = _file_name(name, variant)
            atomic_write(os.path.join(directory, fname), data)
            entry["variants"][variant] = {
                "file": fname, "sha256": hashlib.sha256(data).hexdigest(), "rtol": rtol,
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())}}
            if log:
                log(f"wrote {fname} ({len(tensors)} tensors)")
        manifest["components"][name] = entry
    text = _short_lists(json.dumps(manifest, indent=2, sort_keys=True)) + "\n"
    atomic_write(os.path.join(directory, "manifest.json"), text.encode("utf-8"))
    return manifest


# --- loading ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One golden case: the five sections as {name: array}, the config and the tolerance."""
    component: str
    variant: str
    config: dict
    rtol: float
    inputs: dict
    params: dict
    upstream: dict
    outputs: dict
    grads: dict


def load(directory, component, variant="float64", manifest=None):
    """Read and validate one golden case (checksum, tensor names, shapes, dtypes) -> Case."""
    from safetensors.numpy import load as st_load

    manifest = manifest or read_manifest(directory)
    entry = manifest_entry(manifest, directory, component)
    if variant not in entry.get("variants", {}):
        raise ValueError(f"{directory}: {component} has no {variant} variant (it has: "
                         f"{', '.join(entry.get('variants', {}))})")
    info = entry["variants"][variant]
    path = case_path(directory, info["file"])
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (listed in manifest.json)")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ValueError(f"{path}: contents do not match the checksum in manifest.json (modified or corrupt)")
    try:
        tensors = st_load(data)
    except Exception as e:   # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    want = {k: (tuple(v["shape"]), v["dtype"]) for k, v in info["tensors"].items()}
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise ValueError(f"{path}: tensors do not match manifest.json (first difference: {bad[0]})")
    sections = {s: {} for s in SECTIONS}
    for key, value in sorted(tensors.items()):
        section, _, name = key.partition("/")
        if section not in sections:
            raise ValueError(f"{path}: tensor {key!r} is in no known section")
        sections[section][name] = value
    return Case(component, variant, entry.get("config", {}), float(info["rtol"]), **sections)


# --- checking ---------------------------------------------------------------------------------------


def check(component, fn, directory, variants=None, grads=True, catch=False):
    """Run fn on the golden case(s) of `component` in `directory` and compare -> Report.

    variants: None (every variant in the directory), or e.g. ["float64"]. grads=False compares the
    outputs only (for forward-only implementations). Exceptions raised by fn propagate, or with
    catch=True become an ImplementationError naming the component and the exception. Problems with
    the directory (missing, corrupt, no such component) raise ValueError before fn is called."""
    manifest = read_manifest(directory)
    entry = manifest_entry(manifest, directory, component)
    names = list(entry["variants"]) if variants is None else list(variants)
    cases = [load(directory, component, variant, manifest) for variant in names]
    rows = []
    for case in cases:
        copy = lambda d: {k: v.copy() for k, v in d.items()}   # noqa: E731  fn may write into them
        args = (copy(case.inputs), copy(case.params), copy(case.upstream), json.loads(json.dumps(case.config)))
        with _ctrl_c_watch() as ctrl_c:
            try:
                result = fn(*args)
            except BaseException as e:
                # SystemExit (even exit 0) or a KeyboardInterrupt the implementation raised itself is its
                # failure; a real Ctrl-C (SIGINT) and GeneratorExit propagate
                real = isinstance(e, GeneratorExit) or (isinstance(e, KeyboardInterrupt) and ctrl_c)
                if not catch or real or not isinstance(e, (Exception, SystemExit, KeyboardInterrupt)):
                    raise
                raise ImplementationError(f"{component} [{case.variant}]: the implementation raised "
                                          f"{type(e).__name__}: {e}") from e
        rows += compare_case(case, result, grads)
    return Report(rows)


@contextlib.contextmanager
def _ctrl_c_watch():
    """Yields a list that gets an entry when a real SIGINT arrives while the block runs (main thread only;
    elsewhere every KeyboardInterrupt counts as real)."""
    seen = []
    if threading.current_thread() is not threading.main_thread():
        yield [True]
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def check_directory(directory, impl, components=None, variant="all", forward_only=False, on_report=None):
    """Check an implementation against every golden case it has a function for -> DirectoryReport.

    impl: "pkg.module[:function]" / "file.py[:function]" (resolve_impl) or {component: fn}.
    components: names (list or comma-separated) to restrict to; each must be in the directory.
    variant: "all", or "float64" / "float32" (components without that variant are skipped).
    forward_only: compare the outputs only. on_report(component, Report) is called as each component
    is done. An implementation that raises fails its component (one FAIL line) and the others still
    run. ValueError for problems with the directory or the arguments, before anything runs."""
    manifest = read_manifest(directory)
    wanted = None if components is None else _split_names(components)
    for name in wanted or ():             # first: "the directory has no case for x" (then: unknown names)
        manifest_entry(manifest, directory, name)
    if isinstance(impl, str):
        fns = resolve_impl(impl, wanted, available=list(manifest["components"]))
    else:
        impl = dict(impl)
        missing = [n for n in wanted or () if n not in impl]
        if missing:
            raise ValueError(f"the implementation has no function for {missing[0]!r}")
        fns = {n: f for n, f in impl.items() if wanted is None or n in wanted}
        for name in fns:
            manifest_entry(manifest, directory, name)
    if variant != "all":
        fns = {n: f for n, f in fns.items() if variant in manifest["components"][n].get("variants", {})}
        if not fns:
            raise ValueError(f"none of the components to check has a {variant} variant in {directory}")
    result = DirectoryReport(str(directory), list(fns), {}, [], [], 0)
    for name, fn in fns.items():
        variants = None if variant == "all" else [variant]
        try:
            rep = check(name, fn, directory, variants=variants, grads=not forward_only, catch=True)
        except ImplementationError as e:  # report it, go on with the other components
            result.failures.append(f"FAIL {e}")
            result.failed.append(name)
            continue
        result.reports[name] = rep
        result.n_tensors += sum(1 for r in rep.rows if not r.note.endswith("(ignored)"))
        if on_report is not None:
            on_report(name, rep)
        result.failures.extend(rep.failures())
        if not rep.ok:
            result.failed.append(name)
    return result


# --- finding someone's implementation ----------------------------------------------------------------


def _import(target):
    """A module by dotted name (the current directory is searched first, as `python -m` does) or
    a .py file by path; import failures become one-line ValueErrors."""
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise ValueError(f"--impl {target}: no such file")
            name = "_minillm_impl_" + os.path.splitext(os.path.basename(target))[0]
            spec = importlib.util.spec_from_file_location(name, target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(target)
        finally:
            sys.path.remove(os.getcwd())
    except ModuleNotFoundError as e:
        raise ValueError(f"--impl {target}: cannot import {e.name!r}") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"--impl {target}: importing it raised {type(e).__name__}: {e}") from None


def resolve_impl(spec, components=None, available=None):
    """"pkg.module:function" / "file.py:function" -> {component: function}; "pkg.module" / "file.py"
    -> every function of the module named like a component. `components` restricts (and is
    required when a lone function's name is not a component name); `available` lists the
    components of the golden directory (default: all known)."""
    known = available if available is not None else components()
    wanted = None if components is None else _check_names(components)
    target, _, func = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if not target:
        raise ValueError(f"--impl {spec!r}: expected package.module[:function] or file.py[:function]")
    module = _import(target)
    if func:
        fn = getattr(module, func, None)
        if not callable(fn):
            raise ValueError(f"--impl {spec}: {target} has no function {func!r}")
        if wanted is None:
            if func not in known:
                raise ValueError(f"--impl {spec}: {func!r} is not a component name; say which "
                                 "component(s) it implements with --components")
            wanted = [func]
        return {c: fn for c in wanted}
    found = {c: getattr(module, c) for c in known if callable(getattr(module, c, None))}
    if wanted is not None:
        missing = [c for c in wanted if c not in found]
        if missing:
            raise ValueError(f"--impl {spec}: the module has no function named {missing[0]!r}")
        return {c: found[c] for c in wanted}
    if not found:
        raise ValueError(f"--impl {spec}: the module defines none of the component functions "
                         f"({', '.join(known)})")
    return found

