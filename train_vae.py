"""python train_vae.py: Open-Sora v1.2 VAE training (also the `opensora-train-vae` command); see --help."""

import sys

from opensora_jax.cli.train_vae import main
from opensora_jax.config_utils import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
