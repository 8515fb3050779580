"""python sample.py: text/image-to-video sampling (also the `opensora-sample` command); see --help."""

import sys

from opensora_jax.cli.sample import main
from opensora_jax.config_utils import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
