"""Train STDiT3 (Open-Sora v1.2) with opensora-jax.

    python train.py --config configs/opensora_v1_2/train_stage1.py --config.data.csv=data.csv \
        --config.vae=ckpt/vae --config.t5=ckpt/t5 --config.from_pretrained=ckpt/stdit3
    python train.py --config configs/demo/train_tiny.py --out-dir outputs/demo

Re-running with the same --out-dir resumes from its latest checkpoint (model, EMA, optimizer, step, RNG
and data position), so a killed run continues as if it had never stopped.
"""

from __future__ import annotations

import argparse
import sys

import convert
from opensora_jax.config_utils import config_from_cli, config_parser, console_entry, run_cli
from opensora_jax.parallel import initialize_distributed
from opensora_jax.training.loop import train

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
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser("train.py", __doc__, "ml_collections config file (configs/opensora_v1_2/train_stage1.py, configs/demo/...)", FLAGS)


def make_config(argv):
    return config_from_cli(argv, build_parser(), FLAGS)[0]


def main(argv=None) -> int:
    config = make_config(sys.argv[1:] if argv is None else argv)
    initialize_distributed()  # multi-process launches (SLURM, torchrun-style env, JAX_COORDINATOR_ADDRESS)
    train(config, load=convert.load_model)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
