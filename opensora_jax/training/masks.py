"""Frame-conditioning masks for training (the reference's MaskGenerator), drawn inside jit.

A mask is (B, T_lat) bool over latent frames: True = generate (noised, in the loss), False = condition
(kept clean, timestep-0 modulation, excluded from the loss). One mask type is drawn per sample with the
configured probabilities; `identity` (all True) takes the remaining probability.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_TYPES = (
    "identity", "quarter_random", "quarter_head", "quarter_tail", "quarter_head_tail",
    "image_random", "image_head", "image_tail", "image_head_tail", "random", "intepolate",
)


def normalize_ratios(ratios: dict[str, float]) -> dict[str, float]:
    """Validates mask ratios and adds `identity` = 1 − sum(others) when absent (reference semantics)."""
    unknown = sorted(set(ratios) - set(MASK_TYPES))
    if unknown:
        raise ValueError(f"unknown mask types {unknown}; valid: {list(MASK_TYPES)}")
    bad = {k: v for k, v in ratios.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"mask ratios must lie in [0, 1], got {bad}")
    ratios = dict(ratios)
    if "identity" not in ratios:
        ratios["identity"] = 1.0 - sum(ratios.values())
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6) or ratios["identity"] < -1e-9:
        raise ValueError(f"mask ratios must sum to 1, got {sum(ratios.values())} ({ratios})")
    return ratios


def _one_mask(key, probs: jax.Array, names: tuple[str, ...], t: int) -> jax.Array:
    keys = jax.random.split(key, 6)
    frames = jnp.arange(t)
    cmax = max(t // 4, 1)
    size = jax.random.randint(keys[1], (), 1, cmax + 1)
    quarter_pos = jax.random.randint(keys[2], (), 0, t - size + 1)
    image_pos = jax.random.randint(keys[3], (), 0, t)
    start = jax.random.randint(keys[4], (), 0, 2)
    keep_ratio = jax.random.uniform(keys[5], (), minval=0.1, maxval=0.9)
    random_mask = jax.random.uniform(jax.random.fold_in(keys[5], 1), (t,)) > keep_ratio
    random_mask = random_mask.at[-1].set(random_mask[-1] | ~random_mask.any())
    head, tail = frames < size, frames >= t - size
    candidates = {
        "identity": jnp.ones(t, bool),
        "quarter_random": ~((frames >= quarter_pos) & (frames < quarter_pos + size)),
        "quarter_head": ~head,
        "quarter_tail": ~tail,
        "quarter_head_tail": ~(head | tail),
        "image_random": frames != image_pos,
        "image_head": frames != 0,
        "image_tail": frames != t - 1,
        "image_head_tail": (frames != 0) & (frames != t - 1),
        "random": random_mask,
        "intepolate": (frames - start) % 2 != 0,
    }
    choice = jax.random.choice(keys[0], len(names), p=probs)
    return jnp.stack([candidates[n] for n in names])[choice]


def sample_masks(key: jax.Array, ratios: dict[str, float], batch: int, num_frames: int) -> jax.Array:
    """(batch, num_frames) bool masks; clips of ≤ 1 latent frame always get all True."""
    ratios = normalize_ratios(ratios)
    if num_frames <= 1:
        return jnp.ones((batch, num_frames), bool)
    names = tuple(ratios)
    probs = jnp.asarray([max(ratios[n], 0.0) for n in names], jnp.float32)
    return jax.vmap(lambda k: _one_mask(k, probs, names, num_frames))(jax.random.split(key, batch))
