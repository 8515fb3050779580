r"""Train the Open-Sora v1.2 video VAE (2D VAE + temporal VAE) with opensora-jax (spec §12).

    python train_vae.py --config configs/vae/train_stage1.py --csv videos.csv \
        --config.vae_2d_pretrained=sdxl_vae/diffusion_pytorch_model.safetensors
    python train_vae.py --config configs/vae/train_stage2.py --csv videos.csv \
        --config.from_pretrained=outputs/vae_stage1/vae_model
    python train_vae.py --config configs/demo/vae_tiny.py --csv data/synthetic/train.csv --out-dir outputs/vae_tiny

The last runs on a fresh clone after `python -m opensora_jax.data.synthetic data/synthetic` (README: Train); the
first two need your video CSV and the weights they name (the SDXL 2D VAE, or an earlier stage's export).

Re-running with the same --out-dir resumes from its latest checkpoint (parameters, optimizer, step, RNG
and data position) exactly. At the end the VAE is exported to OUT_DIR/vae_model, a converted directory
that sample.py and train.py load as their `vae`.
"""

from __future__ import annotations

import argparse
import sys

import convert
import convert.vae_v1_2
from opensora_jax.checks import check_checkpoint
from opensora_jax.config_utils import config_from_cli, config_parser, console_entry, run_cli
from opensora_jax.errors import UserError
from opensora_jax.training.config_checks import AUTOENCODERS, check_train_config
from opensora_jax.training.vae_train import train_vae, validate_config

FLAGS = {
    "--out-dir": ("out_dir", str, "run directory: config.json, metrics.jsonl, eval.jsonl, checkpoints/, vae_model/"),
    "--steps": ("steps", int, "total number of updates"),
    "--seed": ("seed", int, "seed of init, data order, mixing and posterior sampling"),
    "--csv": ("data.csv", str, "training CSV of videos (path,text,num_frames,height,width,fps)"),
    "--eval-csv": ("eval.csv", str, "held-out CSV: reconstruction L1 at the end (and every eval.every steps)"),
    "--stage": ("stage", int, "trainable set: 0 the 2D VAE alone as an image autoencoder (ours), 1 temporal VAE, "
               "2 + 2D encoder, 3 everything"),
    "--lr": ("optimizer.lr", float, "learning rate (constant)"),
    "--ckpt-every": ("ckpt_every", int, "save a checkpoint every N steps"),
    "--dtype": ("dtype", str, "compute dtype: bfloat16 or float32 (parameters stay float32)"),
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser("train_vae.py", __doc__, "ml_collections config file (configs/vae/train_stage1.py, configs/demo/vae_tiny.py, ...)", FLAGS)


def make_config(argv):
    return config_from_cli(argv, build_parser(), FLAGS)[0]


# Checkpoint fields of a VAE training config → the converted models they may hold (None: any file).
CHECKPOINTS = {"from_pretrained": AUTOENCODERS, "vae_2d_pretrained": None}


def check_config(config) -> None:
    """Every flag, path and number of a VAE training config, before a model is built or a video read."""
    check_train_config(config, checkpoint_fields=CHECKPOINTS)
    try:
        validate_config(config)
    except ValueError as e:  # the recipe's own checks (stage, mixing, discriminator losses) name config fields
        raise UserError(f"config: {e}") from None
    if config.get("lpips") and config.lpips.get("enabled"):
        if not config.lpips.get("weights"):
            raise UserError("--config.lpips.enabled=True needs --config.lpips.weights=FILE (VGG16 + lin0..lin4 "
                            "weights, .npz or .safetensors); nothing is downloaded")
        check_checkpoint(config.lpips.weights, "--config.lpips.weights")


def main(argv=None) -> int:
    config = make_config(sys.argv[1:] if argv is None else argv)
    check_config(config)
    train_vae(config, load=convert.load_model, load_spatial=convert.vae_v1_2.load_spatial_weights)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
