"""Rectified-flow training loss of Open-Sora v1.2 (spec §8.4); latents channels-last (B, T, H, W, C)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opensora_jax.schedulers.rflow import timestep_transform


def sample_timesteps(key, batch: int, method: str = "logit-normal", num_timesteps: int = 1000,
                     loc: float = 0.0, scale: float = 1.0) -> jax.Array:
    """(B,) training timesteps in [0, num_timesteps]: sigmoid(N(loc, scale)) (logit-normal) or uniform."""
    if method == "logit-normal":
        return jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch,))) * num_timesteps
    if method == "uniform":
        return jax.random.uniform(key, (batch,)) * num_timesteps
    raise ValueError(f"timestep sampling {method!r} unknown; choose logit-normal or uniform")


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, num_timesteps: int = 1000) -> jax.Array:
    """x_t = (1 − t/N)·x0 + (t/N)·noise, t per sample."""
    s = (1 - t / num_timesteps).reshape(-1, *([1] * (x0.ndim - 1)))
    return s * x0 + (1 - s) * noise


def masked_mean_sq(err: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
    """Per-sample mean of err² over generated frames only: Σ_masked err² / (n_masked · H·W·C)."""
    sq = jnp.square(err.astype(jnp.float32))
    if frame_mask is None:
        return sq.mean(axis=tuple(range(1, sq.ndim)))
    per_frame = sq.sum(axis=tuple(range(2, sq.ndim)))  # (B, T)
    denom = frame_mask.sum(axis=1) * (sq.size // (sq.shape[0] * sq.shape[1]))
    return (per_frame * frame_mask).sum(axis=1) / denom


def rflow_loss(model, x0, y, text_mask, *, key, height, width, num_frames, fps, frame_mask=None,
               timestep_method: str = "logit-normal", use_timestep_transform: bool = True,
               num_timesteps: int = 1000, train: bool = True):
    """Mean velocity MSE; returns (loss, per-sample losses). `key` drives t, the noise and dropout."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    t = sample_timesteps(k_t, b, timestep_method, num_timesteps)
    if use_timestep_transform:
        t = timestep_transform(t, height, width, num_frames, num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = add_noise(x0, noise, t, num_timesteps)
    if frame_mask is not None:
        x_t = jnp.where(frame_mask[:, :, None, None, None], x_t, x0)
    out = model(x_t, t, y, text_mask, frame_mask, fps=fps, height=height, width=width,
                train=train, dropout_key=k_drop if train else None)
    velocity = out[..., : x0.shape[-1]]
    per_sample = masked_mean_sq(velocity - (x0 - noise), frame_mask)
    return per_sample.mean(), per_sample
