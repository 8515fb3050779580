r"""Train STDiT3 (Open-Sora v1.2) or the MMDiT (Open-Sora 2.0) with opensora-jax; the config's `family` picks.

    python -m opensora_jax.data.synthetic data/synthetic --num-clips 64 --frames 32 --size 32 32
    python train.py --config configs/demo/train_tiny.py --csv data/synthetic/train.csv \
        --config.vae=assets/demo/vae --config.t5=assets/demo/t5 --config.model.caption_channels=64 --out-dir outputs/demo
    python train.py --config configs/opensora_v1_2/train_stage1.py --csv data.csv \
        --config.vae=ckpt/vae --config.t5=ckpt/t5 --config.from_pretrained=ckpt/stdit3

The first two run on a fresh clone (synthetic clips, the demo's VAE and T5 from assets/demo); the third needs
your video CSV and the converted Open-Sora v1.2 checkpoints (python -m convert, see README.md).

Re-running with the same --out-dir resumes from its latest checkpoint (model, EMA, optimizer, step, RNG
and data position), so a killed run continues as if it had never stopped.
"""

from __future__ import annotations

import argparse
import sys

import convert
from opensora_jax.config_utils import config_from_cli, config_parser, console_entry, run_cli
from opensora_jax.parallel import initialize_distributed
from opensora_jax.training import loop as stdit3_loop
from opensora_jax.training.config_checks import check_train_config

FLAGS = {
    "--out-dir": ("out_dir", str, "run directory: config.json, metrics.jsonl, checkpoints/, ema_model/"),
    "--steps": ("steps", int, "total number of updates"),
    "--seed": ("seed", int, "seed of init, data order, masks, noise"),
    "--csv": ("data.csv", str, "training CSV (path, text, num_frames, height, width, fps, ...)"),
    "--features": ("data.features", str, "directory of precomputed features (instead of --csv)"),
    "--lr": ("optimizer.lr", float, "peak learning rate"),
    "--ckpt-every": ("ckpt_every", int, "save a checkpoint every N steps"),
    "--dtype": ("dtype", str, "compute dtype: bfloat16 or float32 (master weights stay float32)"),
    "--mesh": ("mesh", str, "device mesh, e.g. 'fsdp=8' or 'data=-1,fsdp=8'; axes data/fsdp/tensor/sequence"),
    "--lora-rank": ("lora.rank", int, "LoRA fine-tuning: train only rank-R adapters (0 = full training)"),
    "--lora-alpha": ("lora.alpha", float, "LoRA scale numerator: adapters are scaled by alpha / rank"),
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser("train.py", __doc__, "ml_collections config file (configs/opensora_v1_2/train_stage1.py, configs/demo/...)", FLAGS)


def make_config(argv):
    return config_from_cli(argv, build_parser(), FLAGS)[0]


def main(argv=None) -> int:
    config = make_config(sys.argv[1:] if argv is None else argv)
    check_train_config(config)  # every flag, path and number, before any model loads or data is read
    initialize_distributed()  # multi-process launches (SLURM, torchrun-style env, JAX_COORDINATOR_ADDRESS)
    if config.get("family", "opensora_v1_2") == "opensora_v2_0":
        from opensora_jax.training import mmdit_loop

        mmdit_loop.train(config, load=convert.load_model)
    else:
        stdit3_loop.train(config, load=convert.load_model)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
