"""Fixture case loading, comparison rule and component dispatch for the parity checker.

A component handler is a function `handler(case) -> dict[str, np.ndarray]` that builds the JAX
module from `case.config`, loads `case.weights_path` through the user-facing converter, runs the
recorded call and returns arrays named as in io.npz, in the reference layout. Every array with
role `output` must be returned; intermediates are compared when returned.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
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
    case: str
    component: str
    passed: bool
    worst: float
    tol: float
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = f"{status} {self.case} {self.component} worst={self.worst:.3e} tol={self.tol:.3e}"
        return f"{text} {self.detail}" if self.detail else text


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
    """Runs one case and compares every output (and every intermediate the handler returns)."""
    path = pathlib.Path(path)
    try:
        case = load_case(path)
    except Exception as e:  # noqa: BLE001 - reported as a failed case
        return CaseResult(path.name, "?", False, float("inf"), 0.0, f"cannot load case: {e}")
    found = find_handler(case.component)
    if found is None:
        component = case.component.replace(" ", "")
        return CaseResult(case.name, component, False, float("inf"), case.tol, "unsupported component")
    target, short = found
    module_name, fn_name = target.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), fn_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return CaseResult(case.name, short, False, float("inf"), case.tol, "unsupported component")
    try:
        produced = handler(case)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return CaseResult(case.name, short, False, float("inf"), case.tol, f"error: {type(e).__name__}: {e} [{tb}]")

    worst, worst_name, problems = 0.0, "", []
    for name in case.roles("output"):
        if name not in produced:
            problems.append(f"missing output {name}")
            continue
        err = relative_error(produced[name], case[name])
        if err > worst or not worst_name:
            worst, worst_name = err, name
        if not err <= case.tol:
            problems.append(f"{name} err={err:.3e} shape={np.shape(produced[name])} vs {case[name].shape}")
    for name in case.roles("intermediate"):
        if name in produced:
            err = relative_error(produced[name], case[name])
            if not err <= case.tol:
                problems.append(f"{name} err={err:.3e}")
    detail = f"(worst: {worst_name})" if not problems else "; ".join(problems)
    return CaseResult(case.name, short, not problems, worst, case.tol, detail if problems else "")


def run_cases(paths, print_fn=print) -> tuple[int, int]:
    """Runs each case, prints its result line, then the summary; returns (passed, failed)."""
    passed = failed = 0
    for p in paths:
        result = run_case(p)
        print_fn(result.line())
        if result.passed:
            passed += 1
        else:
            failed += 1
    print_fn(f"{passed} passed, {failed} failed")
    return passed, failed
