"""Optimizer (AdamW with linear warm-up and global-norm clipping), trainable-parameter filters, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def learning_rate_schedule(lr: float, warmup_steps: int):
    """The reference's LinearWarmupLR: lr·(step+1)/(warmup+1) for step < warmup, then constant lr."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return lambda step: lr * jnp.minimum((step + 1) / (warmup_steps + 1), 1.0)


def make_optimizer(*, lr: float = 1e-4, warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-15, weight_decay: float = 0.0, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW as the reference trains STDiT3 (spec §8.5 defaults: eps 1e-15, no weight decay, clip 1.0)."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(lr, warmup_steps), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def trainable_filter(*, freeze_y_embedder: bool = False, only_train_temporal: bool = False):
    """The nnx filter of parameters that receive gradients (buffers never do)."""
    parts = [nnx.Param]
    if freeze_y_embedder:
        parts.append(nnx.Not(nnx.PathContains("y_embedder")))
    if only_train_temporal:
        parts.append(nnx.PathContains("temporal"))
    return nnx.All(*parts)


def ema_update(ema, params, decay: float):
    """ema ← decay·ema + (1 − decay)·params, in float32."""
    return jax.tree.map(lambda e, p: e * decay + p.astype(jnp.float32) * (1.0 - decay), ema, params)
