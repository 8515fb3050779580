"""Checks of a training config before any model is built or any data is read (`check_train_config`).

Every mistake a user can make in the fields the training configs share (STDiT3 v1.2, and the Open-Sora 2.0
configs with the same field names) is a UserError naming the flag or config field and what would be valid:
step counts, seed, learning rate, checkpoint cadence, dtypes, the mesh, the data (a CSV with its columns, or a
features directory with its index) and the checkpoint paths that are set. Fields a config does not have are
skipped, so one function serves every family.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib

import ml_collections

from opensora_jax.checks import (check_checkpoint, check_csv, check_dtype, check_mesh, check_writable_dir,
                                 finite_number, one_of, positive_number, readable_dir, whole_number)
from opensora_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
REMATS = ("everything", "dots", "nothing", True, False)
ATTENTIONS = ("auto", "blockwise", "xla", "cudnn", "splash")
MAX_STEPS = 100_000_000

# config field → the flag that sets it (train.py's FLAGS); other fields are named --config.FIELD.
FLAG_NAMES = {"out_dir": "--out-dir", "steps": "--steps", "seed": "--seed", "data.csv": "--csv",
              "data.features": "--features", "optimizer.lr": "--lr", "ckpt_every": "--ckpt-every",
              "dtype": "--dtype", "mesh": "--mesh", "eval.csv": "--eval-csv", "stage": "--stage",
              "lora.rank": "--lora-rank", "lora.alpha": "--lora-alpha"}

# Checkpoint fields → the model names a converted directory there may hold (any, when None).
AUTOENCODERS = ("vae", "hunyuan_vae", "dc_ae")
CHECKPOINT_FIELDS = {"from_pretrained": ("stdit3", "mmdit"), "vae": AUTOENCODERS, "ae": AUTOENCODERS, "t5": ("t5",),
                     "clip": ("clip",), "tokenizer": None, "t5_tokenizer": None, "clip_tokenizer": None}
# The frozen encoders a run that encodes videos on the fly needs, where the config has the field.
ENCODER_FIELDS = ("vae", "ae", "t5", "clip")


def flag(field: str) -> str:
    """How a user sets `field`: its train.py flag, else --config.FIELD."""
    return FLAG_NAMES.get(field, f"--config.{field}")


def _get(config, dotted: str, default=None):
    node = config
    for name in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
            return default
        node = node[name]
    return node


def _has(config, dotted: str) -> bool:
    sentinel = object()
    return _get(config, dotted, sentinel) is not sentinel


def check_counts(config) -> None:
    """Steps, seed, checkpoint and logging cadence, workers."""
    if _has(config, "steps"):
        whole_number(flag("steps"), config.steps, 1, MAX_STEPS)
    if _has(config, "seed"):
        whole_number(flag("seed"), config.seed, 0)
    for field in ("ckpt_every", "log_every", "keep_checkpoints"):
        if _has(config, field):
            whole_number(flag(field), _get(config, field), 1)
    for field in ("data.num_workers", "optimizer.warmup_steps"):
        if _has(config, field):
            whole_number(flag(field), _get(config, field), 0)
    if _has(config, "data.frame_interval"):
        whole_number(flag("data.frame_interval"), config.data.frame_interval, 1)
    if _has(config, "data.batch_size"):
        whole_number(flag("data.batch_size"), config.data.batch_size, 1)


def check_optimizer(config) -> None:
    """A finite learning rate > 0 and sane AdamW settings."""
    if _has(config, "optimizer.lr"):
        positive_number(flag("optimizer.lr"), config.optimizer.lr)
    for field in ("optimizer.b1", "optimizer.b2"):
        if _has(config, field):
            finite_number(flag(field), _get(config, field), 0, 1)
    for field in ("optimizer.eps", "optimizer.weight_decay"):
        if _has(config, field):
            finite_number(flag(field), _get(config, field), 0)
    if _has(config, "optimizer.grad_clip") and _get(config, "optimizer.grad_clip") is not None:
        finite_number(flag("optimizer.grad_clip"), config.optimizer.grad_clip, 0)
    if _has(config, "ema_decay") and config.ema_decay is not None:
        finite_number(flag("ema_decay"), config.ema_decay, 0, 1)


def check_choices(config) -> None:
    """dtypes, remat policy, attention kernel, mesh syntax."""
    for field in ("dtype", "param_dtype", "vae_dtype", "ae_dtype", "text_dtype"):
        if _has(config, field) and _get(config, field):
            check_dtype(flag(field), _get(config, field), DTYPES)
    if _has(config, "remat"):
        one_of(flag("remat"), config.remat, REMATS)
    if _has(config, "attention"):
        one_of(flag("attention"), config.attention, ATTENTIONS)
    if _has(config, "ae_type"):
        one_of(flag("ae_type"), config.ae_type, ("hunyuan_vae", "dc_ae"))
    if _has(config, "mesh"):
        check_mesh(flag("mesh"), config.mesh)
    if _has(config, "lora.rank"):
        whole_number(flag("lora.rank"), config.lora.rank, 0)
    if _has(config, "lora.alpha"):
        finite_number(flag("lora.alpha"), config.lora.alpha, 0)


def check_data(config) -> None:
    """The training data: a features directory holding *.index.json, or a CSV with path and text columns."""
    features, csv = _get(config, "data.features", ""), _get(config, "data.csv", "")
    if features:
        root = readable_dir(features, flag("data.features"))
        if not glob.glob(os.path.join(glob.escape(str(root)), "*.index.json")):
            raise UserError(f"{flag('data.features')} {str(features)!r} holds no *.index.json: write features "
                            "there first with opensora-features (python -m opensora_jax.cli.features)")
        return
    if not _has(config, "data.csv"):
        return
    if not csv:
        raise UserError("no training data: pass --csv FILE (a video CSV) or --features DIR (precomputed features)")
    check_csv(csv, flag("data.csv"))
    bucket_config = _get(config, "data.bucket_config")
    if isinstance(bucket_config, str):
        from opensora_jax.data.bucket_configs import NAMED_BUCKET_CONFIGS

        one_of(flag("data.bucket_config"), bucket_config, sorted(NAMED_BUCKET_CONFIGS))
    resolutions = _get(config, "data.resolutions")
    if resolutions:
        from opensora_jax.data.bucket_configs import NAMED_RESOLUTION_TABLES

        one_of(flag("data.resolutions"), resolutions, sorted(NAMED_RESOLUTION_TABLES))


def check_checkpoints(config, checkpoint_fields=None) -> None:
    """Each checkpoint path that is set exists, and a converted directory there holds the right model; training
    from videos needs the frozen encoders (`vae`, `t5`) where the config has those fields."""
    for field, models in (CHECKPOINT_FIELDS if checkpoint_fields is None else checkpoint_fields).items():
        value = _get(config, field)
        if value:
            check_checkpoint(value, flag(field), models=models)
    from_videos = not _get(config, "data.features", "") and _get(config, "data.csv", "")
    if from_videos and not _get(config, "ckpt_dir", ""):
        missing = [f for f in ENCODER_FIELDS if _has(config, f) and not _get(config, f)]
        if missing:
            raise UserError(
                f"training from videos (--csv) needs the frozen encoders: set {' and '.join(flag(f) for f in missing)}"
                " (converted directories or the reference's weights; the demo's are assets/demo/vae and "
                "assets/demo/t5), or train from --features DIR")


def check_text_width(config) -> None:
    """A converted T5 directory's embedding width matches the model's `caption_channels` (STDiT3 configs), so a
    mismatch is named now and not found at the first step."""
    width, t5 = _get(config, "model.caption_channels"), _get(config, "t5")
    if not isinstance(width, int) or not t5 or _get(config, "data.features", ""):
        return
    try:
        meta = json.loads((pathlib.Path(t5) / "config.json").read_text())
        d_model = meta["config"]["d_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a converted directory: the loader reads it
    if isinstance(d_model, int) and d_model != width:
        raise UserError(f"--config.model.caption_channels={width}, but the T5 at {str(t5)!r} outputs {d_model}-wide "
                        f"embeddings: pass --config.model.caption_channels={d_model}")


def check_out_dir(config) -> None:
    """The run directory is (or can be made) a writable directory."""
    out_dir = _get(config, "out_dir")
    if out_dir is None:
        return
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise UserError(f"{flag('out_dir')} must name a directory, got {out_dir!r}")
    check_writable_dir(pathlib.Path(out_dir), flag("out_dir"))


def check_train_config(config, *, checkpoint_fields=None) -> None:
    """Validates a training config before any model is built or data read; a mistake raises UserError (one line
    naming the flag or --config.FIELD and what would be valid). Fields a family's config lacks are skipped.

    checkpoint_fields: {config field: model names a converted directory there may hold, or None for any};
    default `CHECKPOINT_FIELDS` (the denoiser trainers'; the VAE trainer passes its own)."""
    check_counts(config)
    check_optimizer(config)
    check_choices(config)
    check_out_dir(config)
    check_data(config)
    if _get(config, "eval.csv"):
        check_csv(config.eval.csv, flag("eval.csv"))
    check_checkpoints(config, checkpoint_fields)
    check_text_width(config)
