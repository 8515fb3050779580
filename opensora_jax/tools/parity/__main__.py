"""python -m opensora_jax.parity CASE_DIR [CASE_DIR ...]"""

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
    args = parser.parse_args(argv)

    # Full-precision float32 matmuls: the fixture tolerances assume them.
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from opensora_jax.tools.parity.core import run_cases

    _, failed = run_cases(args.cases, print_fn=lambda s: print(s, flush=True))
    return 0 if failed == 0 else 1


def cli() -> int:
    """The `opensora-parity` console command (and `python -m opensora_jax.parity`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return main()


def cli_exit() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    cli_exit()
