"""Fixture case loading, comparison rule and component dispatch for the parity checker.

A component handler is a function `handler(case) -> dict[str, np.ndarray]` that builds the JAX
module from `case.config`, loads `case.weights_path` through the user-facing converter, runs the
recorded call and returns arrays named as in io.npz, in the reference layout. Every array with
role `output` and every array with role `intermediate` must be returned: a missing one fails the case.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import tempfile
import traceback
from typing import Callable

import numpy as np

# (predicate on case.json "component", "module:function", short name printed on the result line).
# Handlers are imported lazily so that a broken or heavy component does not break the others.
_HANDLERS: list[tuple[Callable[[str], bool], str, str]] = [
    (lambda c: c.startswith("RFLOW.sample"), "opensora_jax.tools.parity.rflow:run", "rflow"),
    (lambda c: c == "STDiT3", "opensora_jax.tools.parity.stdit3:run", "stdit3"),
    (lambda c: c.startswith("T5EncoderModel"), "opensora_jax.tools.parity.t5:run", "t5"),
    (lambda c: c.startswith("OpenSoraVAE_V1_2"), "opensora_jax.tools.parity.vae_v1_2:run", "vae_v1_2"),
    (lambda c: c.startswith("MMDiTModel"), "opensora_jax.tools.parity.mmdit:run", "mmdit"),
    (lambda c: c.startswith("CLIPTextModel"), "opensora_jax.tools.parity.clip:run", "clip_text"),
    (lambda c: c.startswith("AutoencoderKLCausal3D"), "opensora_jax.tools.parity.hunyuan_vae:run", "hunyuan_vae"),
    (lambda c: c.startswith("DCAE"), "opensora_jax.tools.parity.dc_ae:run", "dc_ae"),
    (lambda c: c.startswith("Open-Sora 2.0 sampling"), "opensora_jax.tools.parity.sampler_v2:run", "sampler_v2"),
]


@dataclasses.dataclass
class Case:
    """One fixture directory: case.json, io.npz and weights.safetensors."""

    path: pathlib.Path
    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.meta.get("case", self.path.name)

    @property
    def component(self) -> str:
        return self.meta["component"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def tol(self) -> float:
        return float(self.meta["tolerance"]["max_err_over_max_ref"])

    @property
    def weights_path(self) -> pathlib.Path:
        return self.path / "weights.safetensors"

    def roles(self, role: str) -> list[str]:
        return [a["name"] for a in self.meta["arrays"] if a.get("role") == role]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"{self.path}/io.npz has no array {name!r}; it has {sorted(self.arrays)}")
        return self.arrays[name]


@dataclasses.dataclass
class CaseResult:
    """The outcome of one case. `errors` maps each output and intermediate array the fixture holds to its
    max_err_over_max_ref, or None where the handler did not return it (empty when the case could not be
    loaded)."""

    case: str
    component: str  # case.json's "component"
    handler: str | None  # the handler's short name; None where no handler ran the case
    passed: bool
    worst: float
    tol: float
    detail: str = ""
    errors: dict[str, float | None] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        """`PASS|FAIL <case> <handler> worst=<err> tol=<tol> [detail]`, the checker's stdout format (the
        component without spaces stands in for the handler where there is none)."""
        status = "PASS" if self.passed else "FAIL"
        name = self.handler or self.component.replace(" ", "")
        text = f"{status} {self.case} {name} worst={self.worst:.3e} tol={self.tol:.3e}"
        return f"{text} {self.detail}" if self.detail else text

    def to_json(self) -> dict:
        """A JSON-safe record; non-finite errors become the strings "inf"/"nan", missing arrays null."""
        return {
            "case": self.case,
            "component": self.component,
            "handler": self.handler,
            "passed": self.passed,
            "worst": _json_float(self.worst),
            "tol": _json_float(self.tol),
            "detail": self.detail,
            "errors": {name: None if err is None else _json_float(err) for name, err in self.errors.items()},
        }


def _json_float(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(float(x))


def load_case(path: str | pathlib.Path) -> Case:
    """Reads case.json and io.npz of one fixture directory."""
    path = pathlib.Path(path)
    meta_path = path / "case.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a fixture case: {meta_path} not found")
    meta = json.loads(meta_path.read_text())
    with np.load(path / "io.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return Case(path=path, meta=meta, arrays=arrays)


def to_channels_last(x) -> np.ndarray:
    """Reference layout B C T H W → ours, B T H W C."""
    return np.moveaxis(np.asarray(x), 1, -1)


def to_channels_first(x) -> np.ndarray:
    """Ours, B T H W C → reference layout B C T H W."""
    return np.moveaxis(np.asarray(x), -1, 1)


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    """max|ours - expected| / max|expected| (the fixture README's rule); inf on shape mismatch or NaN."""
    ours = np.asarray(ours, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if ours.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    err = np.max(np.abs(ours - expected))
    if not np.isfinite(err):
        return float("inf")
    scale = np.max(np.abs(expected))
    return float(err / scale) if scale > 0 else float(err)


def find_handler(component: str) -> tuple[str, str] | None:
    for predicate, target, short in _HANDLERS:
        if predicate(component):
            return target, short
    return None


def run_case(path: str | pathlib.Path) -> CaseResult:
    """Runs one case and compares every output and every intermediate the fixture holds."""
    path = pathlib.Path(path)
    try:
        case = load_case(path)
    except Exception as e:  # noqa: BLE001 - reported as a failed case
        return CaseResult(path.name, "?", None, False, float("inf"), 0.0, f"cannot load case: {e}")
    component = str(case.component)
    found = find_handler(component)
    if found is None:
        return _failed(case, None, "unsupported component")
    target, short = found
    module_name, fn_name = target.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), fn_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return _failed(case, None, "unsupported component")
    try:
        produced = handler(case)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return _failed(case, short, f"error: {type(e).__name__}: {e} [{tb}]")
    return compare(case, produced, short)


def _failed(case: Case, handler: str | None, detail: str) -> CaseResult:
    """A case that produced nothing: every output and intermediate is reported missing."""
    errors = dict.fromkeys(case.roles("output") + case.roles("intermediate"))
    return CaseResult(case.name, str(case.component), handler, False, float("inf"), case.tol, detail, errors)


def compare(case: Case, produced: dict, handler: str) -> CaseResult:
    """Checks a handler's arrays against the case: every output and intermediate must be present and within
    tolerance. `worst` is the largest output error."""
    errors: dict[str, float | None] = {}
    worst, worst_name, problems = 0.0, "", []
    for name in case.roles("output"):
        if name not in produced:
            errors[name] = None
            problems.append(f"missing output {name}")
            continue
        err = errors[name] = relative_error(produced[name], case[name])
        if err > worst or not worst_name:
            worst, worst_name = err, name
        if not err <= case.tol:
            problems.append(f"{name} err={err:.3e} shape={np.shape(produced[name])} vs {case[name].shape}")
    missing = []
    for name in case.roles("intermediate"):
        if name not in produced:
            errors[name] = None
            missing.append(name)
            continue
        err = errors[name] = relative_error(produced[name], case[name])
        if not err <= case.tol:
            problems.append(f"{name} err={err:.3e}")
    if missing:
        problems.append(f"missing intermediate{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return CaseResult(case.name, str(case.component), handler, not problems, worst, case.tol, "; ".join(problems),
                      errors)


def run_cases(paths, print_fn=print) -> list[CaseResult]:
    """Runs each case, prints its result line, then the `N passed, M failed` summary; returns the results."""
    results = []
    for p in paths:
        result = run_case(p)
        print_fn(result.line())
        results.append(result)
    passed = sum(r.passed for r in results)
    print_fn(f"{passed} passed, {len(results) - passed} failed")
    return results


def results_json(results: list[CaseResult]) -> dict:
    """The `--json` report: the summary counts and one record per case (see `CaseResult.to_json`)."""
    passed = sum(r.passed for r in results)
    return {"passed": passed, "failed": len(results) - passed, "cases": [r.to_json() for r in results]}


def write_text_atomic(path: str | pathlib.Path, text: str) -> None:
    """Writes `text` to a temporary file next to `path`, then renames it over `path`, so readers never see
    a half-written file."""
    path = pathlib.Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_results_json(path: str | pathlib.Path, results: list[CaseResult]) -> None:
    """Writes `results_json(results)` to `path` atomically."""
    write_text_atomic(path, json.dumps(results_json(results), indent=2, allow_nan=False) + "\n")
