"""python -m opensora_jax.parity CASE_DIR [CASE_DIR ...]: see opensora_jax.tools.parity."""

from opensora_jax.tools.parity.__main__ import cli_exit

if __name__ == "__main__":
    cli_exit()
