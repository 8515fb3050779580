"""Rectified-flow sampler of Open-Sora v1.2 (the reference's RFLOW.sample), traced into one jit.

Convention: t ∈ [0, num_timesteps], t = num_timesteps is pure noise; the model predicts the velocity
x0 − noise and Euler steps move z toward the data. Latents are channels-last (B, T, H, W, C).
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BASE_RESOLUTION = 512 * 512
# The reference hard-codes the VAE's 17 pixel frames → 5 latent frames in the time shift.
VAE_FRAMES_PER_CHUNK, VAE_LATENTS_PER_CHUNK = 17, 5


def timestep_transform(t: jax.Array, height, width, num_frames, num_timesteps: int = 1000, scale: float = 1.0) -> jax.Array:
    """Resolution- and length-dependent time shift, in the reference's operation order.

    t: (..., B) timesteps in [0, num_timesteps]; height/width: (B,) PIXEL sizes; num_frames: (B,) PIXEL
    frame counts. The shift ratio is computed in the dtype of height/width/num_frames (the reference
    passes them in the model dtype, so bfloat16 inputs round the ratio like it does); t stays float32.
    """
    height, width, num_frames = (jnp.asarray(a) for a in (height, width, num_frames))
    t = t / num_timesteps
    ratio_space = jnp.sqrt(height * width / BASE_RESOLUTION)
    frames = jnp.where(num_frames[0] == 1, jnp.ones_like(num_frames),
                       jnp.floor(num_frames / VAE_FRAMES_PER_CHUNK) * VAE_LATENTS_PER_CHUNK)
    ratio = ratio_space * jnp.sqrt(frames / 1) * scale
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return (new_t * num_timesteps).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RFlowSampler:
    """Euler sampler with classifier-free guidance and frame-conditioning masks.

    Fields mirror the reference's `RFLOW(...)` kwargs. `step0_rounding_quirk` (default True, for
    parity) keeps the first shifted timestep exactly as float32 arithmetic gives it; with a shift
    ratio outside [0.5, 2] that is slightly above num_timesteps, so at step 0 the reference treats
    every generated frame as a conditioning frame. Set it False to clip the schedule to
    [0, num_timesteps] instead.
    """

    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    cfg_scale: float = 7.0
    use_discrete_timesteps: bool = False
    use_timestep_transform: bool = True
    step0_rounding_quirk: bool = True

    def timesteps(self, height, width, num_frames, batch: int) -> jax.Array:
        """The (steps, B) float32 timesteps fed to the model."""
        base = [(1.0 - i / self.num_sampling_steps) * self.num_timesteps for i in range(self.num_sampling_steps)]
        if self.use_discrete_timesteps:
            base = [int(round(t)) for t in base]
        t = jnp.broadcast_to(jnp.asarray(np.asarray(base, np.float32))[:, None], (len(base), batch))
        if self.use_timestep_transform:
            t = timestep_transform(t, height, width, num_frames, self.num_timesteps)
        if not self.step0_rounding_quirk:
            t = jnp.clip(t, 0, self.num_timesteps)
        return t

    def step_sizes(self, timesteps: jax.Array) -> jax.Array:
        """dt_i = (t_i − t_{i+1}) / num_timesteps, and t_last / num_timesteps for the last step."""
        nxt = jnp.concatenate([timesteps[1:], jnp.zeros_like(timesteps[:1])])
        return (timesteps - nxt) / self.num_timesteps

    def sample(
        self,
        model,
        z: jax.Array,
        y: jax.Array,
        mask: jax.Array | None = None,
        *,
        height,
        width,
        num_frames,
        fps,
        cond_mask: jax.Array | None = None,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        cfg_scale: float | None = None,
        return_trace: bool = False,
        progress: bool = False,
        on_step=None,
    ):
        """Denoises `z` (B, T, H, W, C) conditioned on text `y` (B, L, C_cap) with token `mask` (B, L).

        height/width/num_frames/fps: (B,) pixel sizes, pixel frame count and fps. `cond_mask` (B, T)
        float: 1 = generate, 0 = keep the frame of `z` fixed, in between = edit strength; conditioned
        frames are re-noised with step i's draw `normal(fold_in(key, i), z.shape)`, made inside the loop so
        memory does not grow with the steps (or with `noise[i]` of `noise`, (steps, B, T, H, W, C), to
        replay recorded draws). The unconditional branch uses the model's learned null caption with the
        conditional prompts' mask. `progress` shows a bar ticking once per denoising step (from inside
        the compiled loop); `on_step(done, total)`, if given, is called after each step too (e.g. a web page's
        progress bar). Returns z (float32), plus a per-step trace dict if `return_trace`.
        """
        b = z.shape[0]
        if cond_mask is not None and key is None and noise is None:
            raise ValueError("cond_mask needs `key` (or recorded `noise`) for re-noising conditioned frames")
        timesteps = self.timesteps(height, width, num_frames, b)
        if noise is not None or cond_mask is None:
            key = None  # recorded draws replace the key's; without a cond_mask nothing is re-noised
        graphdef, state = nnx.split(model)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        extras = dict(height=jnp.asarray(height), width=jnp.asarray(width), fps=jnp.asarray(fps))
        with _StepProgress(self.num_sampling_steps, enabled=progress, on_step=on_step):
            z_final, trace = _denoise(graphdef, state, z.astype(jnp.float32), y, mask, timesteps,
                                      self.step_sizes(timesteps), key, noise, cond_mask, jnp.float32(scale), extras,
                                      self.num_timesteps, return_trace, progress or on_step is not None)
            z_final = jax.block_until_ready(z_final)
        return (z_final, {"timesteps": timesteps, **trace}) if return_trace else z_final


class _StepProgress:
    """A tqdm bar (and/or an `on_step(done, total)` callback) that the compiled denoising loop ticks through
    `jax.debug.callback`."""

    _active: "_StepProgress | None" = None
    _lock = threading.Lock()

    def __init__(self, total: int, enabled: bool, on_step=None):
        self.total, self.enabled, self.bar, self.on_step, self.done = total, enabled, None, on_step, 0

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="denoising", unit="step")
        if self.enabled or self.on_step is not None:
            _StepProgress._active = self
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        if _StepProgress._active is self:
            _StepProgress._active = None

    @staticmethod
    def tick(_step):
        with _StepProgress._lock:
            active = _StepProgress._active
            if active is None:
                return
            active.done += 1
            if active.bar is not None:
                active.bar.update(1)
            if active.on_step is not None:
                active.on_step(active.done, active.total)


def _step_noise(key, step_index, recorded, shape) -> jax.Array:
    """One step's re-noising draw: the recorded one when replaying, else drawn from fold_in(key, step)."""
    if recorded is not None:
        return recorded
    return jax.random.normal(jax.random.fold_in(key, step_index), shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 12, 13, 14))
def _denoise(graphdef, state, z, y, mask, timesteps, dts, key, noise, cond_mask, cfg_scale, extras, num_timesteps,
             trace, progress):
    """All steps in one lax.scan; the model call is inside the loop body (traced once). `noise`, when given,
    holds every step's draw; otherwise each step draws its own from `key`."""
    model = nnx.merge(graphdef, state)
    b = z.shape[0]
    y_both = jnp.concatenate([y.astype(jnp.float32), model.null_caption(b).astype(jnp.float32)])

    def step(carry, xs):
        z, noise_added = carry
        t, dt, step_index, recorded = xs
        x0 = z
        x_mask = None
        if cond_mask is not None:
            eps = _step_noise(key, step_index, recorded, z.shape)
            mask_t = cond_mask * num_timesteps
            upper = mask_t >= t[:, None]
            ratio = (1 - t / num_timesteps)[:, None, None, None, None]
            x_noise = ratio * x0 + (1 - ratio) * eps
            z = jnp.where((upper & ~noise_added)[:, :, None, None, None], x_noise, x0)
            noise_added = upper
            x_mask = jnp.concatenate([upper, upper])
        z_in = jnp.concatenate([z, z])
        t_in = jnp.concatenate([t, t])
        out = model(z_in, t_in, y_both, mask, x_mask, **extras)
        v_cond, v_uncond = out[:b, ..., : z.shape[-1]], out[b:, ..., : z.shape[-1]]
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
        z_new = z + v * dt[:, None, None, None, None]
        if cond_mask is not None:
            z_new = jnp.where(upper[:, :, None, None, None], z_new, x0)
        if progress:
            jax.debug.callback(_StepProgress.tick, t[0], ordered=True)
        record = dict(model_in_x=z_in, model_in_t=t_in, model_out=out) if trace else {}
        if trace and cond_mask is not None:
            record["model_in_x_mask"] = x_mask
        return (z_new, noise_added), record

    noise_added = None if cond_mask is None else cond_mask == 1
    xs = (timesteps, dts, jnp.arange(timesteps.shape[0]), noise)
    (z, _), records = jax.lax.scan(step, (z, noise_added), xs)
    return z, records
