"""python train.py: STDiT3 training (also the `opensora-train` command); see --help."""

import sys

from opensora_jax.cli.train import main
from opensora_jax.config_utils import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
