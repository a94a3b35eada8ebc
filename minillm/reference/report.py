"""Comparing an implementation's result with a golden case (minillm.reference) and reporting it:
one Row per expected tensor, rel = max |got - want| / max |want| against the case's rtol, integer
tensors exact.

    compare_case(case, result, grads=True) -> [Row]     Report(rows).ok / .failures() / .format()
    DirectoryReport                                     what check_directory found for a directory
"""

import dataclasses

import numpy as np


def to_numpy(v):
    if hasattr(v, "detach"):     # torch tensors
        v = v.detach().cpu().numpy()
    return np.asarray(v)


@dataclasses.dataclass
class Row:
    component: str
    variant: str
    tensor: str          # "<section>/<name>"
    shape: tuple
    max_abs: float       # nan when not compared
    rel: float
    rtol: float
    ok: bool
    note: str = ""


class Report:
    """The result of `check`: one Row per expected tensor (plus notes on unexpected ones)."""

    def __init__(self, rows):
        self.rows = rows

    @property
    def ok(self):
        return all(r.ok for r in self.rows)

    def failures(self):
        """One clear line per failing tensor."""
        out = []
        for r in self.rows:
            if not r.ok:
                what = r.note or f"rel error {r.rel:.2e} > rtol {r.rtol:.0e} (max abs error {r.max_abs:.2e})"
                out.append(f"FAIL {r.component} [{r.variant}] {r.tensor}: {what}")
        return out

    def format(self):
        lines, last = [], None
        for r in self.rows:
            if (r.component, r.variant) != last:
                last = (r.component, r.variant)
                lines.append(f"{r.component} [{r.variant}]  rtol {r.rtol:.0e}")
            num = "" if np.isnan(r.max_abs) else f"max abs {r.max_abs:9.2e}  rel {r.rel:9.2e}"
            status = "ok" if r.ok else "FAIL"
            lines.append(f"  {r.tensor:32s} {str(r.shape):14s} {num:32s} {status}"
                         + (f"  {r.note}" if r.note else ""))
        return "\n".join(lines)

    def __str__(self):
        return self.format()


@dataclasses.dataclass
class DirectoryReport:
    """The result of check_directory: the components checked (in order), a Report for each that
    returned a result, the FAIL lines of all of them (a component whose implementation raised has one
    line and no Report), the failed components and how many tensors were compared."""
    directory: str
    components: list
    reports: dict            # component -> Report
    failures: list           # "FAIL ..." lines, in order
    failed: list             # names of the components with a failure
    n_tensors: int           # compared tensors (result tensors the case does not have are not counted)

    @property
    def ok(self):
        return not self.failures

    def summary(self):
        """The one-line verdict `minillm reference check` ends with."""
        if self.ok:
            return f"ok: {len(self.components)} component(s), {self.n_tensors} tensors within tolerance"
        return (f"{len(self.failed)} of {len(self.components)} component(s) failed against {self.directory}: "
                f"{', '.join(self.failed)}")


def _compare(want, got):
    """-> (max_abs, rel, exact_needed)."""
    if not np.issubdtype(want.dtype, np.floating):
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) if want.size else np.zeros(1)
        return float(diff.max()), float(diff.max()), True
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if diff.size and not np.isfinite(diff).all():
        max_abs = float("inf")
    scale = float(np.abs(want).max()) if want.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs), False


def compare_case(case, result, grads=True):
    """Compare an implementation's result with a Case -> list of Rows."""
    if isinstance(result, dict):
        outputs, got_grads = result, {}
    elif isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(d, dict) for d in result):
        outputs, got_grads = result
    else:
        raise ImplementationError(f"{case.component}: the implementation must return (outputs, grads), "
                                  f"two dicts, or an outputs dict; got {type(result).__name__}")
    rows = []
    sections = [("outputs", case.outputs, outputs)] + ([("grads", case.grads, got_grads)] if grads else [])
    for section, want_d, got_d in sections:
        for name, want in want_d.items():
            key = f"{section}/{name}"
            row = dict(component=case.component, variant=case.variant, tensor=key, shape=want.shape,
                       max_abs=float("nan"), rel=float("nan"), rtol=case.rtol)
            if name not in got_d or got_d[name] is None:
                rows.append(Row(**row, ok=False, note=f"missing: the result has no {section}[{name!r}]"))
                continue
            try:
                got = to_numpy(got_d[name])
            except Exception as e:
                rows.append(Row(**row, ok=False, note=f"not an array ({e})"))
                continue
            if got.shape != want.shape:
                rows.append(Row(**row, ok=False, note=f"shape {tuple(got.shape)}, expected {want.shape}"))
                continue
            if got.dtype.kind not in "biuf":
                rows.append(Row(**row, ok=False, note=f"not a numeric array ({got.dtype})"))
                continue
            max_abs, rel, exact = _compare(want, got)
            ok = max_abs == 0 if exact else rel <= case.rtol
            note = "" if ok or not exact else "integer tensor differs (must match exactly)"
            rows.append(Row(**{**row, "max_abs": max_abs, "rel": rel}, ok=ok, note=note))
        for name in got_d:
            if name not in want_d:
                rows.append(Row(case.component, case.variant, f"{section}/{name}", (), float("nan"),
                                float("nan"), case.rtol, True, "not in the golden case (ignored)"))
    return rows


class ImplementationError(ValueError):
    """The checked implementation failed (raised, or returned something that is not two dicts)."""
