"""Parity checker: runs reference fixture cases (see ../shared/fixtures/README.md) on the JAX port.

`python -m opensora_jax.tools.parity CASE_DIR [CASE_DIR ...]` prints one line per case,
`PASS|FAIL <case> <component> worst=<max_err_over_max_ref> tol=<tol>`, then `N passed, M failed`;
`--json FILE` also writes the results with per-array errors (`core.results_json`).
"""

from opensora_jax.tools.parity.core import Case, CaseResult, load_case, run_case, run_cases

__all__ = ["Case", "CaseResult", "load_case", "run_case", "run_cases"]
