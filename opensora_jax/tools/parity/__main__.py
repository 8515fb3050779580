"""python -m opensora_jax.tools.parity CASE_DIR [CASE_DIR ...] [--json FILE]"""

import argparse
import os
import sys


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
    args = parser.parse_args(argv)
    json_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if json_dir and not os.path.isdir(json_dir):  # fail before the (long) run, not after it
        parser.error(f"--json {args.json}: directory {json_dir} does not exist")

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
