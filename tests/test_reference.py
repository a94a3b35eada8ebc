"""Golden cases (minillm/reference/__init__.py): byte-identical regeneration, the check API and CLI, wrong
implementations failing with clear messages, and the README's worked example. The peers named in the
manifest pass the check in test_reference_peers.py."""

import os
import sys

import numpy as np
import pytest

from clirun import run_cli
from minillm import reference
from minillm.reference import cases as rc


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("golden"))
    reference.make(path)
    return path


def one_error_line(capsys, *args, match):
    code, out, err = run_cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error:") and match in lines[0], lines[0]
    return lines[0]


def files_of(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


# --- making -------------------------------------------------------------------------------------------


def test_regenerates_byte_identical(golden, tmp_path, capsys):
    again = str(tmp_path / "again")
    code, _, err = run_cli(capsys, "reference", "make", again, "--seed", "0")
    assert code == 0, err
    a, b = files_of(golden), files_of(again)
    assert sorted(a) == sorted(b) and "manifest.json" in a
    for name in a:
        assert a[name] == b[name], name
    manifest = reference.read_manifest(again)
    assert sorted(manifest["components"]) == sorted(reference.components())
    assert manifest["minillm_version"] and manifest["seed"] == 0
    for entry in manifest["components"].values():
        assert entry["matches"] and entry["math"] and "float64" in entry["variants"]


def test_seed_and_subset(tmp_path):
    reference.make(tmp_path / "s1", ["gelu", "wkv"], seed=1)
    reference.make(tmp_path / "s2", "gelu", seed=2)
    assert list(reference.read_manifest(tmp_path / "s1")["components"]) == ["gelu", "wkv"]
    assert sorted(os.listdir(tmp_path / "s2")) == ["gelu.safetensors", "manifest.json"]
    x1 = reference.load(tmp_path / "s1", "gelu").inputs["x"]
    assert not np.array_equal(x1, reference.load(tmp_path / "s2", "gelu").inputs["x"])
    with pytest.raises(ValueError, match="unknown component 'nope'"):
        reference.make(tmp_path / "s3", ["gelu", "nope"])


def test_float32_variants_are_the_rounded_case(golden):
    for name in ("gpt", "moe", "selective_scan", "wkv", "bitlinear"):
        c64, c32 = reference.load(golden, name), reference.load(golden, name, "float32")
        for key, a in {**c64.inputs, **c64.params}.items():
            b = {**c32.inputs, **c32.params}[key]
            if np.issubdtype(a.dtype, np.floating):
                assert b.dtype == np.float32 and np.allclose(a, b, rtol=1e-6, atol=0)
            else:
                assert np.array_equal(a, b)
        assert all(v.dtype == np.float32 for v in c32.outputs.values())


# --- checking: our own functions, wrong ones ---------------------------------------------------------


def test_minillm_passes_every_case_in_both_dtypes(golden):
    """Each component function of reference.cases, run on the float32 files, computes in float32:
    that float32 arithmetic passes the float32 tolerance is what the tolerance promises."""
    for name in reference.components():
        report = reference.check(name, rc.COMPONENTS[name]["fn"], golden)
        assert report.ok, report.format()


def numpy_gpt_block(gelu):
    """A GPT-2 block assembled from minillm's layers with a choice of GELU (its value, derivative)."""
    from minillm.nn import attention, ops
    from minillm.tree import unflatten

    def fn(inputs, params, upstream, config):
        p, x, dy = unflatten(params), inputs["x"], upstream["y"]
        ln = lambda h, q: ops.layernorm_forward(h, q["weight"], q["bias"], config["layer_norm_epsilon"])  # noqa
        h1, c1 = ln(x, p["ln_1"])
        a, ca = attention.attention_forward(h1, p["attn"], config)
        x2 = x + a
        h2, c2 = ln(x2, p["ln_2"])
        u, cfc = ops.linear_forward(h2, p["mlp"]["c_fc"]["weight"], p["mlp"]["c_fc"]["bias"])
        g, dg_du = gelu(u)
        m, cpr = ops.linear_forward(g, p["mlp"]["c_proj"]["weight"], p["mlp"]["c_proj"]["bias"])
        dg, dwp, dbp = ops.linear_backward(dy, cpr)
        dh2, dwf, dbf = ops.linear_backward(dg * dg_du, cfc)
        dh2, dw2, db2 = ops.layernorm_backward(dh2, c2)
        dx2 = dy + dh2
        dh1, gattn = attention.attention_backward(dx2, ca)
        dh1, dw1, db1 = ops.layernorm_backward(dh1, c1)
        grads = {"x": dx2 + dh1, "ln_1.weight": dw1, "ln_1.bias": db1, "ln_2.weight": dw2, "ln_2.bias": db2,
                 "mlp.c_fc.weight": dwf, "mlp.c_fc.bias": dbf, "mlp.c_proj.weight": dwp, "mlp.c_proj.bias": dbp}
        grads.update({f"attn.{k}.{n}": v for k, d in gattn.items() for n, v in d.items()})
        return {"y": x2 + m}, grads
    return fn


def gelu_tanh(u):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (u + 0.044715 * u ** 3))
    return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c * (1 + 3 * 0.044715 * u * u)


def gelu_erf(u):   # torch's default F.gelu: the classic mistake against GPT-2
    from math import erf

    phi = 0.5 * (1 + np.vectorize(erf)(u / np.sqrt(2)))
    return u * phi, phi + u * np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)


def scan_without_d(inputs, params, upstream, config):
    return rc.selective_scan({**inputs, "D": np.zeros_like(inputs["D"])}, params, upstream, config)


def test_wrong_implementations_fail_clearly(golden):
    assert reference.check("gpt_block", numpy_gpt_block(gelu_tanh), golden).ok
    report = reference.check("gpt_block", numpy_gpt_block(gelu_erf), golden)
    assert not report.ok
    lines = report.failures()
    assert lines[0].startswith("FAIL gpt_block [float64] outputs/y: rel error ")
    assert "> rtol 1e-09" in lines[0]
    report = reference.check("selective_scan", scan_without_d, golden, variants=["float64"])
    failing = {r.tensor for r in report.rows if not r.ok}
    assert {"outputs/y", "grads/x"} <= failing and "grads/B" not in failing

    def half_done(inputs, params, upstream, config):
        out, grads = rc.layernorm(inputs, params, upstream, config)
        return {"y": out["y"][:, :4], "extra": out["y"]}, {"x": grads["x"]}
    lines = reference.check("layernorm", half_done, golden).failures()
    assert "FAIL layernorm [float64] outputs/y: shape (2, 4, 8), expected (2, 5, 8)" in lines
    assert "FAIL layernorm [float64] grads/weight: missing: the result has no grads['weight']" in lines
    assert reference.check("layernorm", half_done, golden, grads=False).failures() == [lines[0]]
    with pytest.raises(ValueError, match="must return"):
        reference.check("gelu", lambda *a: 3.0, golden)
    with pytest.raises(reference.ImplementationError, match=r"gelu \[float64\]: the implementation raised KeyError"):
        reference.check("gelu", lambda i, p, u, c: i["nope"], golden, catch=True)
    merges = reference.check("tokenizer_train", lambda i, p, u, c: {"merges": np.zeros((64, 2), np.int64)}, golden)
    assert "integer tensor differs" in merges.failures()[0]


def test_bad_directories(golden, tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        reference.check("gelu", rc.gelu, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no manifest.json"):
        reference.check("gelu", rc.gelu, tmp_path)
    reference.make(tmp_path / "g", ["gelu", "layernorm"])
    with pytest.raises(ValueError, match=r"has no golden case for 'wkv' \(it has: gelu, layernorm\)"):
        reference.check("wkv", rc.wkv, tmp_path / "g")
    path = tmp_path / "g" / "gelu.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checksum"):
        reference.check("gelu", rc.gelu, tmp_path / "g")
    path.unlink()
    with pytest.raises(ValueError, match="missing"):
        reference.check("gelu", rc.gelu, tmp_path / "g")
    (tmp_path / "g" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        reference.check("layernorm", rc.layernorm, tmp_path / "g")


def test_check_directory(golden):
    res = reference.check_directory(golden, "minillm.reference.cases", "gelu,wkv", "float32")
    assert res.ok and res.components == ["wkv"] and list(res.reports) == ["wkv"]   # gelu: no float32 file
    assert res.n_tensors == 5 and res.summary() == "ok: 1 component(s), 5 tensors within tolerance"

    def broken(inputs, params, upstream, config):
        raise RuntimeError("not yet")
    seen = []
    res = reference.check_directory(golden, {"layernorm": broken, "gelu": rc.gelu, "wkv": rc.wkv},
                                    ["layernorm", "gelu"], on_report=lambda name, rep: seen.append((name, rep.ok)))
    assert not res.ok and res.components == ["layernorm", "gelu"] and res.failed == ["layernorm"]
    assert seen == [("gelu", True)] and list(res.reports) == ["gelu"]       # the one that raised: no Report
    assert res.failures == ["FAIL layernorm [float64]: the implementation raised RuntimeError: not yet"]
    assert res.summary() == f"1 of 2 component(s) failed against {golden}: layernorm"
    res = reference.check_directory(golden, {"gelu": lambda *a: rc.gelu(*a)[0]})     # outputs only
    assert res.failed == ["gelu"] and "missing: the result has no grads['x']" in res.failures[0]
    assert reference.check_directory(golden, {"gelu": lambda *a: rc.gelu(*a)[0]}, forward_only=True).ok
    with pytest.raises(ValueError, match="no function for 'wkv'"):
        reference.check_directory(golden, {"gelu": rc.gelu}, "wkv")
    with pytest.raises(ValueError, match="none of the components to check has a float32 variant"):
        reference.check_directory(golden, "minillm.reference.cases:gelu", variant="float32")


# --- the command line -----------------------------------------------------------------------------------

WRONG_IMPL = '''
import numpy as np
from minillm.reference import cases as rc

def gelu(inputs, params, upstream, config):          # erf GELU instead of tanh
    from math import erf, sqrt
    x = inputs["x"]
    y = 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
    return {"y": y}, rc.gelu(inputs, params, upstream, config)[1]

def layernorm(inputs, params, upstream, config):
    raise RuntimeError("not written yet")
'''


def test_cli_check(golden, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases", "--quiet")
    assert code == 0 and out.startswith("ok: 24 component(s)")
    code, out, _ = run_cli(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases:gelu")
    assert code == 0 and "gelu [float64]" in out and "outputs/y" in out
    impl = tmp_path / "mine.py"
    impl.write_text(WRONG_IMPL)
    code, out, err = run_cli(capsys, "reference", "check", golden, "--impl", str(impl), "--quiet")
    assert code == 1 and out.splitlines()[1:] == [
        "FAIL layernorm [float64]: the implementation raised RuntimeError: not written yet"]
    assert out.startswith("FAIL gelu [float64] outputs/y: rel error ")
    assert err.strip() == f"error: 2 of 2 component(s) failed against {golden}: gelu, layernorm"
    code, out, _ = run_cli(capsys, "reference", "check", golden, "--impl", f"{impl}:gelu", "--forward-only",
                           "--components", "gelu")
    assert code == 1 and "grads/x" not in out
    code, out, _ = run_cli(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases",
                           "--components", "wkv,bitlinear", "--variant", "float32")
    assert code == 0 and "wkv [float32]" in out and "[float64]" not in out


def test_cli_errors_are_one_line(golden, tmp_path, capsys):
    one_error_line(capsys, "reference", "check", str(tmp_path / "none"), "--impl", "minillm.reference.cases",
                   match="no such directory")
    one_error_line(capsys, "reference", "check", golden, "--impl", "no_such_module_xyz", match="cannot import")
    one_error_line(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases:nope",
                   match="has no function 'nope'")
    one_error_line(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases:normal",
                   match="--components")
    one_error_line(capsys, "reference", "check", golden, "--impl", "minillm.nn.ops", match="none of the component")
    one_error_line(capsys, "reference", "make", str(tmp_path / "x"), "--components", "gelu,bogus",
                   match="unknown component 'bogus'")
    one_error_line(capsys, "reference", "check", golden, "--impl", "minillm.reference.cases:gelu", "--variant",
                   "float32", match="has a float32 variant")
    reference.make(tmp_path / "g", ["gelu"])
    one_error_line(capsys, "reference", "check", str(tmp_path / "g"), "--impl", "minillm.reference.cases",
                   "--components", "wkv", match="no golden case for 'wkv'")
    with open(tmp_path / "g" / "gelu.safetensors", "r+b") as f:
        f.write(b"garbage!")
    one_error_line(capsys, "reference", "check", str(tmp_path / "g"), "--impl", "minillm.reference.cases",
                   match="checksum")


# --- the README's worked example (keep EXAMPLE equal to the README's my_impl.py) -------------------------

EXAMPLE = '''
import torch
import torch.nn.functional as F


def _t(a, grad=True):
    return torch.tensor(a, requires_grad=grad)


def layernorm(inputs, params, upstream, config):
    x, w, b = _t(inputs["x"]), _t(params["weight"]), _t(params["bias"])
    y = F.layer_norm(x, x.shape[-1:], w, b, eps=config["eps"])
    y.backward(torch.tensor(upstream["y"]))
    return {"y": y}, {"x": x.grad, "weight": w.grad, "bias": b.grad}


def gelu(inputs, params, upstream, config):
    x = _t(inputs["x"])
    y = F.gelu(x)
    y.backward(torch.tensor(upstream["y"]))
    return {"y": y}, {"x": x.grad}


def attention(inputs, params, upstream, config):
    x = _t(inputs["x"])
    p = {k: _t(v) for k, v in params.items()}
    B, T, C = x.shape
    H = config["n_head"]
    qkv = x @ p["c_attn.weight"] + p["c_attn.bias"]          # Conv1D weights are (in, out)
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = o.transpose(1, 2).reshape(B, T, C) @ p["c_proj.weight"] + p["c_proj.bias"]
    y.backward(torch.tensor(upstream["y"]))
    return {"y": y}, {"x": x.grad, **{k: t.grad for k, t in p.items()}}
'''


def test_readme_worked_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_impl.py").write_text(EXAMPLE)
    assert run_cli(capsys, "reference", "make", "golden", "--components", "layernorm,gelu,attention")[0] == 0
    code, out, err = run_cli(capsys, "reference", "check", "golden", "--impl", "my_impl")
    assert code == 1 and err == "error: 1 of 3 component(s) failed against golden: gelu\n"
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert [ln.split(":")[0] for ln in fails] == ["FAIL gelu [float64] outputs/y", "FAIL gelu [float64] grads/x"]
    assert "rel error 5.92e-05 > rtol 1e-09 (max abs error 4.73e-04)" in fails[0]
    (tmp_path / "my_impl.py").write_text(EXAMPLE.replace("F.gelu(x)", 'F.gelu(x, approximate="tanh")'))
    sys.modules.pop("my_impl")                                    # import the fixed file afresh
    code, out, _ = run_cli(capsys, "reference", "check", "golden", "--impl", "my_impl", "--quiet")
    assert code == 0 and out == "ok: 3 component(s), 12 tensors within tolerance\n"
    sys.modules.pop("my_impl")
