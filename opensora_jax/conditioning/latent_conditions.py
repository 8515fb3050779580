"""Open-Sora 2.0 image/video conditioning in latent space: which latent frames a reference fixes, and pasting the
reference back after sampling (the reference's prepare_inference_condition and its paste-back).

Latents are channels-last (B, T, H, W, C). A sample's references are a list of encoded reference latents
(T_ref, H, W, C): one image latent for i2v_head / i2v_tail, two for i2v_loop (head, tail), one video latent for
v2v_*. A sample without references (None) gets no condition.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opensora_jax.errors import UserError

COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")


def check_cond_type(cond_type: str) -> str:
    if cond_type not in COND_TYPES:
        raise UserError(f"cond type {cond_type!r} unknown; choose one of {', '.join(COND_TYPES)}")
    return cond_type


def v2v_frames(cond_type: str, causal: bool = True) -> int:
    """Latent frames a v2v condition fixes: 8 (+1 for a causal VAE), 16 (+1) for the `_easy` variants."""
    return (16 if cond_type.endswith("_easy") else 8) + int(causal)


def inference_condition(shape: tuple[int, ...], cond_type: str, references: Sequence[Sequence[np.ndarray] | None],
                        *, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mask (B, T, H, W, 1), masked reference (B, T, H, W, C)) float32 for latents of `shape` = (B, T, H, W, C).

    The mask is 1 on the latent frames the references fix and the masked reference holds them (zeros elsewhere):
    i2v_head frame 0 from the first reference's frame 0; i2v_tail the last frame from the last reference's last
    frame; i2v_loop both; v2v_head / v2v_tail the first / last `v2v_frames` frames of the reference video. An
    image (T = 1) and a sample without references get no condition, as in the reference.
    """
    check_cond_type(cond_type)
    b, t, h, w, c = shape
    if len(references) != b:
        raise ValueError(f"{len(references)} reference lists for a batch of {b}")
    mask = np.zeros((b, t, h, w, 1), np.float32)
    masked = np.zeros((b, t, h, w, c), np.float32)
    if cond_type == "t2v" or t == 1:
        return mask, masked
    for i, refs in enumerate(references):
        if not refs:
            continue
        refs = [np.asarray(r, np.float32) for r in refs]
        for r in refs:
            if r.ndim != 4 or r.shape[1:] != (h, w, c):
                raise ValueError(f"reference latent {r.shape} does not match the latent frames {(h, w, c)}")
        if cond_type in ("i2v_head", "i2v_loop"):
            mask[i, 0], masked[i, 0] = 1, refs[0][0]
        if cond_type in ("i2v_tail", "i2v_loop"):
            mask[i, -1], masked[i, -1] = 1, refs[-1][-1]
        if cond_type.startswith("v2v"):
            k = min(v2v_frames(cond_type, causal), t)
            ref = refs[0]
            if ref.shape[0] < k:
                raise UserError(f"{cond_type} needs a reference video of at least {k} latent frames, got {ref.shape[0]}")
            window = slice(0, k) if "head" in cond_type else slice(t - k, t)
            ref_window = slice(0, k) if "head" in cond_type else slice(ref.shape[0] - k, ref.shape[0])
            mask[i, window], masked[i, window] = 1, ref[ref_window]
    return mask, masked


def paste_references(x: np.ndarray, cond_type: str, references: Sequence[Sequence[np.ndarray] | None], *,
                     all_samples: bool = False) -> np.ndarray:
    """Writes the reference frames back into the sampled latent x (B, T, H, W, C) before decoding.

    As the reference: i2v_head → frame 0, i2v_tail → the last frame, i2v_loop → both, from the sample's first
    (and second) reference latent; v2v and t2v paste nothing. The reference does this for batch element 0 only;
    `all_samples=True` does it for every sample that has references.
    """
    check_cond_type(cond_type)
    x = np.array(x, copy=True)
    if not cond_type.startswith("i2v"):
        return x
    for i in range(x.shape[0] if all_samples else min(1, x.shape[0])):
        refs = references[i] if i < len(references) else None
        if not refs:
            continue
        if cond_type in ("i2v_head", "i2v_loop"):
            x[i, :1] = np.asarray(refs[0])[:1]
        if cond_type in ("i2v_tail", "i2v_loop"):  # the frame the condition fixed: the last reference's last
            x[i, -1:] = np.asarray(refs[-1])[-1:]
    return x
