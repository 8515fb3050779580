"""Open-Sora 2.0 image/video conditioning while training (spec §4): a per-sample draw of the condition type and
the [mask, masked reference latent] it makes.

To keep the reference frames from leaking the clip, their latents are encoded on their own (frame 0 alone for
the head, the last frame alone for the tail, the first / last 33 or 65 frames for v2v) and the target stays the
full clip's latent. Latents are channels-last (B, T, H, W, C); everything here is traceable (jit) with the set of
condition types static.

References by name (what the encoder must produce, `needed_references`):
    head       (B, 1, H, W, C)  frame 0 encoded alone                 i2v_head, i2v_loop
    tail       (B, 1, H, W, C)  the last frame encoded alone           i2v_tail, i2v_loop
    v2v_head   (B, k, H, W, C)  the first 33 (65: _easy) frames         v2v_head(_easy)
    v2v_tail   (B, k, H, W, C)  the last 33 (65) frames                 v2v_tail(_easy)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from opensora_jax.conditioning.latent_conditions import check_cond_type, v2v_frames
from opensora_jax.errors import UserError


def check_weights(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The condition mix as sorted-by-appearance ((name, weight), ...); names must be COND_TYPES, weights ≥ 0 with a
    positive sum."""
    items = tuple((str(name), float(w)) for name, w in dict(weights).items())
    for name, w in items:
        check_cond_type(name)
        if not w >= 0:
            raise UserError(f"condition weight of {name!r} must be a number >= 0, got {w!r}")
    if not items or sum(w for _, w in items) <= 0:
        raise UserError(f"the condition mix needs a positive total weight, got {dict(weights)!r}")
    return items


def reference_frames(name: str) -> int:
    """Pixel frames a reference of `name` covers (v2v: 33, or 65 for the _easy variants)."""
    if name in ("head", "tail"):
        return 1
    return 65 if name.endswith("_easy") else 33


def needed_references(cond_types: Sequence[str]) -> tuple[str, ...]:
    """The reference latents the condition types of a mix need (see the module docstring), in a fixed order."""
    need = set()
    for name in cond_types:
        if name in ("i2v_head", "i2v_loop"):
            need.add("head")
        if name in ("i2v_tail", "i2v_loop"):
            need.add("tail")
        if name.startswith("v2v"):
            need.add(name)
    order = ("head", "tail", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")
    return tuple(n for n in order if n in need)


def usable_types(weights: tuple[tuple[str, float], ...], pixel_frames: int) -> tuple[tuple[str, float], ...]:
    """The mix for clips of `pixel_frames` frames: v2v types need longer clips than their reference (as the
    reference drops them for short videos); images get no condition (t2v only)."""
    if pixel_frames == 1:
        return (("t2v", 1.0),)
    kept = tuple((n, w) for n, w in weights if not n.startswith("v2v") or pixel_frames > reference_frames(n))
    return kept if kept and sum(w for _, w in kept) > 0 else (("t2v", 1.0),)


def draw_types(key: jax.Array, batch: int, weights: tuple[tuple[str, float], ...]) -> jax.Array:
    """(B,) int32 indices into `weights`, drawn with probabilities proportional to the weights."""
    w = jnp.asarray([w for _, w in weights], jnp.float32)
    return jax.random.categorical(key, jnp.log(w / w.sum()), shape=(batch,)).astype(jnp.int32)


def training_condition(latent_shape: tuple[int, ...], weights: tuple[tuple[str, float], ...], choice: jax.Array,
                       references: Mapping[str, jax.Array], *, causal: bool = True) -> tuple[jax.Array, jax.Array]:
    """(mask (B, T, H, W, 1), masked reference (B, T, H, W, C)) float32 for each sample's drawn condition type.

    `choice` (B,) indexes `weights`; `references` holds the latents `needed_references` names. t2v (and any
    image, T = 1) gives zeros.
    """
    b, t, h, w, c = latent_shape
    mask = jnp.zeros((b, t, 1, 1, 1), jnp.float32)
    masked = jnp.zeros((b, t, h, w, c), jnp.float32)
    if t == 1:
        return jnp.broadcast_to(mask, (b, t, h, w, 1)), masked
    frames = jnp.arange(t)
    for index, (name, _) in enumerate(weights):
        if name == "t2v":
            continue
        chosen = (choice == index)[:, None, None, None, None]
        placed = jnp.zeros((b, t, h, w, c), jnp.float32)
        fixed = jnp.zeros((t,), bool)
        if name in ("i2v_head", "i2v_loop"):
            placed = placed.at[:, :1].set(references["head"].astype(jnp.float32))
            fixed = fixed | (frames == 0)
        if name in ("i2v_tail", "i2v_loop"):
            placed = placed.at[:, -1:].set(references["tail"].astype(jnp.float32))
            fixed = fixed | (frames == t - 1)
        if name.startswith("v2v"):
            k = min(v2v_frames(name, causal), t)
            ref = references[name].astype(jnp.float32)
            if "head" in name:
                placed = placed.at[:, :k].set(ref[:, :k])
                fixed = fixed | (frames < k)
            else:
                placed = placed.at[:, t - k:].set(ref[:, ref.shape[1] - k:])
                fixed = fixed | (frames >= t - k)
        fixed = fixed[None, :, None, None, None]
        mask = jnp.where(chosen & fixed, 1.0, mask)
        masked = jnp.where(chosen & fixed, placed, masked)
    return jnp.broadcast_to(mask, (b, t, h, w, 1)), masked
