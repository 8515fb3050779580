"""Open-Sora 2.0's flow-matching sampler: shifted timesteps, Euler steps, 3-way guidance (the reference's I2VDenoiser).

Convention: t = 1 is noise, t = 0 is data; the model predicts the velocity and `x += (t_next − t_cur)·v`.
Every step runs the model on the batch [x, x, x] with texts [prompt, negative, negative] and image conditions
[c, c, 0], and combines the three outputs (cond, uncond, uncond_2) as

    v = uncond_2 + g_img·(uncond − uncond_2) + g_txt·(cond − uncond).

Oscillating guidance keeps a scale at full strength on steps i < 10 and even steps, and at 1.0 on odd steps
≥ 10; `scale_temporal_osci` (image conditions only) ramps the image guidance per latent frame from 1.0 at frame 0
to `linspace(g_img, 1, steps + 1)[i]` at the last frame. The guidance scales depend only on the step index,
so they are computed on the host and fed to one `lax.scan` over the steps: one compile per shape.

Latents here are packed tokens (B, L, C·p²) in the order (t, h, w) (`opensora_jax.models.mmdit.pack`), so latent
frame f owns tokens [f·S, (f + 1)·S) with S tokens per frame.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.errors import UserError

# Guidance oscillation: full scale before this step, then on even steps only.
OSCILLATION_START = 10


def shift_alpha(tokens_per_frame: int, latent_frames: int) -> float:
    """The time-shift strength: linear in tokens per latent frame (256 → 1, 4096 → 3), times sqrt(latent frames)."""
    slope = (3.0 - 1.0) / (4096 - 256)
    return (slope * tokens_per_frame + (1.0 - slope * 256)) * math.sqrt(latent_frames)


def timesteps(num_steps: int, tokens_per_frame: int, latent_frames: int, *, shift: bool = True,
              alpha: float | None = None) -> np.ndarray:
    """(num_steps + 1,) float32 times from 1 to 0: linspace, then t' = α·t / (1 + (α − 1)·t) when `shift`
    (α from `shift_alpha` unless given: the reference's `flow_shift`), in float32 as the reference computes them."""
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    n = num_steps
    # torch.linspace in float32: the first half counts up from the start, the second half down from the end.
    i = np.arange(n + 1)
    step = np.float32(-1.0 / n)
    t = np.where(i < (n + 1) // 2, np.float32(1) + step * i.astype(np.float32),
                 np.float32(0) - step * (n - i).astype(np.float32)).astype(np.float32)
    if shift:
        a = shift_alpha(tokens_per_frame, latent_frames) if alpha is None else float(alpha)
        t = (np.float32(a) * t / (np.float32(1) + np.float32(a - 1) * t)).astype(np.float32)
    return t


def oscillate(scale: float, step: int) -> float:
    """The reference's oscillating guidance: `scale` on steps < 10 and even steps, else 1.0."""
    return scale if step < OSCILLATION_START or step % 2 == 0 else 1.0


@dataclasses.dataclass(frozen=True)
class GuidanceV2:
    """Guidance settings of the 2.0 sampler (the reference's SamplingOption fields)."""

    guidance: float = 7.5
    guidance_img: float = 3.0
    text_osci: bool = True
    image_osci: bool = True
    scale_temporal_osci: bool = True

    def schedules(self, num_steps: int, latent_frames: int, image_condition: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per step: the text scale (steps,) and the image scale per latent frame (steps, latent_frames), float32.

        The temporal ramp applies only with an image condition (cond types containing "i2v") and where the
        oscillated image scale exceeds 1.
        """
        text = np.empty(num_steps, np.float32)
        image = np.empty((num_steps, latent_frames), np.float32)
        upper = np.linspace(self.guidance_img, 1.0, num_steps + 1, dtype=np.float32)  # torch.linspace(g, 1, n+1)
        for i in range(num_steps):
            text[i] = oscillate(self.guidance, i) if self.text_osci else self.guidance
            g_img = oscillate(self.guidance_img, i) if self.image_osci else self.guidance_img
            if image_condition and self.scale_temporal_osci and g_img > 1.0:
                image[i] = np.linspace(1.0, upper[i], latent_frames, dtype=np.float32)
            else:
                image[i] = g_img
        return text, image


def guided_velocity(out: jax.Array, text_scale, image_scale) -> jax.Array:
    """v from the 3B model output [cond; uncond; uncond_2] (3B, L, C); image_scale broadcasts against (B, L, C)."""
    cond, uncond, uncond2 = jnp.split(out, 3, axis=0)
    return uncond2 + image_scale * (uncond - uncond2) + text_scale * (cond - uncond)


def sample(
    model,
    noise: jax.Array,
    cond: jax.Array | None,
    txt: jax.Array,
    y_vec: jax.Array,
    img_ids: jax.Array,
    ts: np.ndarray,
    text_scales: np.ndarray,
    image_scales: np.ndarray,
    *,
    tokens_per_frame: int,
    branches: int = 3,
    record: bool = False,
):
    """Runs the denoising loop; returns the final tokens (B, L, C) (and a per-step trace if `record`).

    Args:
      model: an `MMDiT` (called as model(img, img_ids, txt, txt_ids, timesteps, y_vec, cond)).
      noise: (B, L, C) packed initial latent.
      cond: (B, L, C + p²) packed [mask, masked reference] for the conditional branches, or None (no image
        condition: zeros, as the reference's t2v).
      txt, y_vec: text states for [prompts; negatives; negatives]: (3B, L_txt, D_txt), (3B, D_vec). With
        `branches=2` only the first 2B rows are used.
      img_ids: (B, L, 3) positions. ts: (steps + 1,) times. text_scales (steps,), image_scales (steps, frames).
      branches: 3 runs the reference's batch; 2 drops the third branch, valid only without an image condition,
        where it equals the second (uncond_2 = uncond).
      record: also return {"model_in_img", "model_in_timesteps", "model_out"} stacked over steps, with the
        model batch as the reference forms it.
    """
    if branches not in (2, 3):
        raise ValueError(f"branches must be 2 or 3, got {branches}")
    if branches == 2 and cond is not None:
        raise ValueError("the 2-branch batch is only valid without an image condition (t2v)")
    b, length, _ = noise.shape
    dtype = noise.dtype
    model_cond = None
    if model.cfg.cond_embed:
        c = jnp.zeros((b, length, model.cfg.cond_channels), dtype) if cond is None else cond.astype(dtype)
        model_cond = jnp.concatenate([c, c, jnp.zeros_like(c)][:branches], axis=0)
    txt, y_vec = txt[: branches * b], y_vec[: branches * b]
    ids = jnp.concatenate([img_ids] * branches, axis=0)
    txt_ids = jnp.zeros((*txt.shape[:2], 3), jnp.float32)
    frame_of_token = jnp.arange(length) // tokens_per_frame
    ts = jnp.asarray(ts, jnp.float32)
    steps = (ts[:-1], ts[1:], jnp.asarray(text_scales, jnp.float32), jnp.asarray(image_scales, jnp.float32))

    def step(x, xs):
        t_cur, t_next, g_txt, g_img = xs
        batch = jnp.concatenate([x] * branches, axis=0)
        t_vec = jnp.full((branches * b,), t_cur, dtype)
        out = model(batch, ids, txt, txt_ids, t_vec, y_vec, model_cond)
        if branches == 3:
            v = guided_velocity(out, g_txt, g_img[frame_of_token][None, :, None])
        else:
            cond_out, uncond = jnp.split(out, 2, axis=0)
            v = uncond + g_txt * (cond_out - uncond)
        x = (x + (t_next - t_cur) * v).astype(dtype)
        return x, ((batch, t_vec, out) if record else None)

    x, trace = jax.lax.scan(step, noise, steps)
    if not record:
        return x
    return x, {"model_in_img": trace[0], "model_in_timesteps": trace[1], "model_out": trace[2],
               "model_in_cond": model_cond, "model_in_img_ids": ids}


sample_jit = nnx.jit(sample, static_argnames=("tokens_per_frame", "branches", "record"))
