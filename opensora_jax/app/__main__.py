"""python -m opensora_jax.app: the local web app (see opensora_jax.app.cli)."""

import sys

from opensora_jax.app.cli import main
from opensora_jax.config_utils import run_cli

sys.exit(run_cli(main))
