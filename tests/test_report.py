"""minillm/reference/report.py: to_numpy, compare_case (one Row per expected tensor, rel = max|got - want|
/ max|want| against the case's rtol, absolute when want is all zero, integer tensors exact) and Report.
Cases are built by hand here; the end-to-end check against golden files is in test_reference.py."""

import numpy as np
import pytest
import torch

from minillm.reference import Case
from minillm.reference.report import ImplementationError, Report, Row, compare_case, to_numpy

Y = np.array([[1.0, -4.0, 2.0], [0.5, 0.0, 3.0]])      # max |want| = 4
DX = np.array([2.0, -1.0])
IDS = np.array([3, 1, 4], dtype=np.int64)


def case(rtol=1e-9, **outputs):
    return Case("comp", "float64", {}, rtol, {}, {}, {}, outputs or {"y": Y, "ids": IDS}, {"x": DX})


def rows_by_tensor(rows):
    return {r.tensor: r for r in rows}


def test_to_numpy():
    assert to_numpy([[1, 2], [3, 4]]).shape == (2, 2)             # nested lists
    assert to_numpy(1.5).shape == () and to_numpy(1.5).dtype == np.float64
    a = np.arange(3.0)
    assert to_numpy(a) is a                                        # numpy arrays pass through
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_()
    got = to_numpy(t * 2)                                          # a tensor in the graph: detached
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.array_equal(got, 2 * np.arange(6.0).reshape(2, 3))
    assert to_numpy(torch.tensor([1, 2], dtype=torch.int32)).dtype == np.int32


def test_exact_result_passes_with_one_row_per_tensor():
    for result in ((dict(y=Y.copy(), ids=IDS.copy()), {"x": DX.copy()}),
                   [dict(y=Y.tolist(), ids=IDS.tolist()), {"x": torch.tensor(DX, requires_grad=True) * 1}]):
        rows = compare_case(case(), result)
        assert [r.tensor for r in rows] == ["outputs/y", "outputs/ids", "grads/x"]
        assert all(isinstance(r, Row) and r.ok and r.max_abs == 0 and r.rel == 0 and r.note == "" for r in rows)
        assert [r.shape for r in rows] == [(2, 3), (3,), (2,)]
        assert {(r.component, r.variant, r.rtol) for r in rows} == {("comp", "float64", 1e-9)}
        assert Report(rows).ok and Report(rows).failures() == []


def test_relative_error_against_rtol():
    err = np.zeros_like(Y)
    err[1, 2] = 3e-9                                               # rel = 3e-9 / 4 = 7.5e-10 <= 1e-9
    r = rows_by_tensor(compare_case(case(), ({"y": Y + err, "ids": IDS}, {"x": DX})))["outputs/y"]
    assert r.ok and r.max_abs == pytest.approx(3e-9) and r.rel == pytest.approx(7.5e-10)
    err[0, 0] = -5e-9                                              # rel = 5e-9 / 4 = 1.25e-9 > 1e-9
    report = Report(compare_case(case(), ({"y": Y + err, "ids": IDS}, {"x": DX})))
    r = rows_by_tensor(report.rows)["outputs/y"]
    assert not r.ok and r.max_abs == pytest.approx(5e-9) and r.rel == pytest.approx(1.25e-9)
    assert not report.ok
    assert report.failures() == ["FAIL comp [float64] outputs/y: rel error 1.25e-09 > rtol 1e-09 "
                                 "(max abs error 5.00e-09)"]
    assert compare_case(case(rtol=1e-8), ({"y": Y + err, "ids": IDS}, {"x": DX}))[0].ok   # rtol from the case


def test_all_zero_want_uses_absolute_error():
    z = np.zeros(4)
    assert compare_case(case(y=z), {"y": z + 5e-10})[0].ok
    r = compare_case(case(y=z), {"y": z + 2e-9})[0]
    assert not r.ok and r.rel == pytest.approx(2e-9)


def test_nan_and_inf_fail():
    for bad in (np.nan, np.inf, -np.inf):
        y = Y.copy()
        y[0, 1] = bad
        r = compare_case(case(), ({"y": y, "ids": IDS}, {"x": DX}))[0]
        assert not r.ok and r.max_abs == np.inf and r.rel == np.inf
        assert "outputs/y: rel error inf > rtol" in Report([r]).failures()[0]


def test_integer_tensors_must_match_exactly():
    rows = compare_case(case(rtol=1.0), ({"y": Y, "ids": IDS + np.array([0, 1, 0])}, {"x": DX}))
    r = rows_by_tensor(rows)["outputs/ids"]
    assert not r.ok and r.max_abs == 1 and r.note == "integer tensor differs (must match exactly)"
    assert "FAIL comp [float64] outputs/ids: integer tensor differs" in Report(rows).failures()[0]
    packed = np.array([200, 7], dtype=np.uint8)                    # no wrap-around in the difference
    assert compare_case(case(p=packed), {"p": packed.astype(np.float64)})[0].ok
    assert compare_case(case(p=packed), {"p": np.array([7, 200], np.uint8)})[0].max_abs == 193
    empty = np.zeros((0, 2), np.int64)
    assert compare_case(case(m=empty), {"m": np.zeros((0, 2), np.int64)})[0].ok


def test_missing_wrong_shape_and_non_numeric_results():
    result = ({"y": Y.T, "ids": np.array(["a", "b", "c"])}, {"x": None})
    rows = rows_by_tensor(compare_case(case(), result))
    assert rows["outputs/y"].note == "shape (3, 2), expected (2, 3)"        # same size, other shape
    assert rows["outputs/ids"].note == "not a numeric array (<U1)"
    assert rows["grads/x"].note == "missing: the result has no grads['x']"
    assert not any(r.ok for r in rows.values()) and all(np.isnan(r.max_abs) for r in rows.values())
    complex_y = compare_case(case(y=Y), {"y": Y.astype(np.complex128)})[0]
    assert not complex_y.ok and complex_y.note == "not a numeric array (complex128)"
    ragged = compare_case(case(y=Y), {"y": [[1.0, 2.0], [3.0]]})[0]        # np.asarray raises
    assert not ragged.ok and ragged.note.startswith("not an array (")
    lines = Report(compare_case(case(), {"y": Y, "ids": IDS})).failures()   # outputs only: grads missing
    assert lines == ["FAIL comp [float64] grads/x: missing: the result has no grads['x']"]


def test_grads_false_skips_gradients_and_extras_are_ignored():
    rows = compare_case(case(), ({"y": Y, "ids": IDS}, {"x": DX + 1.0}), grads=False)
    assert [r.tensor for r in rows] == ["outputs/y", "outputs/ids"] and Report(rows).ok
    rows = compare_case(case(), {"y": Y, "ids": IDS}, grads=False)
    assert Report(rows).ok
    rows = compare_case(case(), ({"y": Y, "ids": IDS, "extra": 3.0}, {"x": DX, "w": np.ones(2)}))
    extras = [r for r in rows if "not in the golden case" in r.note]
    assert [r.tensor for r in extras] == ["outputs/extra", "grads/w"] and Report(rows).ok


@pytest.mark.parametrize("bad", [3.0, None, (Y,), ({"y": Y}, None), ({"y": Y}, {}, {}), [{"y": Y}]])
def test_result_that_is_not_dicts_is_an_implementation_error(bad):
    with pytest.raises(ImplementationError, match=r"comp: the implementation must return \(outputs, grads\)"):
        compare_case(case(), bad)
    assert issubclass(ImplementationError, ValueError)


def test_report_format():
    rows = compare_case(case(), ({"y": Y + 1e-3, "ids": IDS}, {}))
    text = Report(rows).format()
    lines = text.splitlines()
    assert lines[0] == "comp [float64]  rtol 1e-09" and len(lines) == 4 and str(Report(rows)) == text
    assert "outputs/y" in lines[1] and "(2, 3)" in lines[1] and "rel  2.50e-04" in lines[1]
    assert lines[1].endswith("FAIL") and lines[2].endswith("ok")
    assert lines[3].endswith("FAIL  missing: the result has no grads['x']") and "max abs" not in lines[3]
    two = Report(rows + compare_case(Case("other", "float32", {}, 1e-5, {}, {}, {}, {"y": Y}, {}), {"y": Y}))
    assert "other [float32]  rtol 1e-05" in two.format().splitlines()
