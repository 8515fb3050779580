"""python -m opensora_jax.tools.parity CASE_DIR [CASE_DIR ...] [--json FILE]"""

import argparse
import os
import pathlib
import sys

from opensora_jax.checks import one_line_errors

CASE_FILES = ("case.json", "io.npz")  # weights.safetensors too, where the component has weights


def check_case_dir(path: str) -> str | None:
    """Why `path` is not a fixture case directory (None when it is one)."""
    case = pathlib.Path(path)
    if case.is_symlink() and not case.exists():
        return f"{path!r} is a broken symbolic link (or a loop of them)"
    if not case.exists():
        return f"{path!r}: no such directory"
    if not case.is_dir():
        return f"{path!r} is a file; give a case directory (holding {', '.join(CASE_FILES)})"
    missing = [f for f in CASE_FILES if not (case / f).is_file()]
    if missing:
        return f"{path!r} is not a fixture case directory: it has no {', '.join(missing)}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.parity",
        description="Run reference fixture cases (../shared/fixtures format) against the JAX port. "
        "Prints 'PASS|FAIL <case> <component> worst=<max_err_over_max_ref> tol=<tol>' per case and "
        "'N passed, M failed' last; exits 0 only if every case passed.",
    )
    parser.add_argument("cases", nargs="+", help="fixture case directories (each holds case.json, io.npz, weights.safetensors)")
    parser.add_argument("--json", metavar="FILE", help="also write every case's result and per-array errors to FILE "
                        "(input of python -m opensora_jax.tools.status_table)")
    one_line_errors(parser)
    args = parser.parse_args(argv)
    json_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if json_dir and not os.path.isdir(json_dir):  # fail before the (long) run, not after it
        parser.error(f"--json {args.json}: directory {json_dir} does not exist")
    if args.json and (os.path.isdir(args.json) or not os.access(json_dir, os.W_OK)):
        parser.error(f"--json {args.json}: " + ("is a directory; give a file name" if os.path.isdir(args.json)
                                                 else f"directory {json_dir} is not writable"))
    for case in args.cases:  # every case before the first one runs
        problem = check_case_dir(case)
        if problem:
            parser.error(problem)

    # Full-precision float32 matmuls: the fixture tolerances assume them.
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from opensora_jax.tools.parity.core import run_cases, write_results_json

    results = run_cases(args.cases, print_fn=lambda s: print(s, flush=True))
    if args.json:
        write_results_json(args.json, results)
    return 0 if all(r.passed for r in results) else 1


def cli() -> int:
    """The `opensora-parity` console command (and `python -m opensora_jax.parity`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return main()


def cli_exit() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    cli_exit()
