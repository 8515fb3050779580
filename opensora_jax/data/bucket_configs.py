"""Bucket configs of the v1.2 training stages (spec §8.2; `configs/opensora-v1-2/train/stage{1,2,3}.py`),
and a tiny table + config for smoke-training on the synthetic dataset.

Format: {resolution: {num_frames: (keep_prob or (p_res, p_T), batch_size)}}; batch sizes are the
reference's per-GPU sizes. See `buckets.py` for how they are used.
"""

from __future__ import annotations

STAGE1 = {  # "webvid", ~12 s/it
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27), 204: ((1.0, 0.1), 13), 408: ((1.0, 0.1), 6)},
    "256": {1: (0.4, 297), 51: (0.5, 20), 102: ((0.5, 0.33), 10), 204: ((0.5, 0.1), 5), 408: ((0.5, 0.1), 2)},
    "240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10), 204: ((0.4, 0.1), 5), 408: ((0.4, 0.1), 2)},
    "360p": {1: (0.2, 141), 51: (0.15, 8), 102: ((0.15, 0.33), 4), 204: ((0.15, 0.1), 2), 408: ((0.15, 0.1), 1)},
    "512": {1: (0.1, 141)},
    "480p": {1: (0.1, 89)},
    "720p": {1: (0.05, 36)},
    "1024": {1: (0.05, 36)},
    "1080p": {1: (0.1, 5)},
    "2048": {1: (0.1, 5)},
}  # fmt: skip

STAGE2 = {
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27), 204: ((1.0, 0.1), 13), 408: ((1.0, 0.1), 6)},
    "256": {1: (0.4, 297), 51: (0.5, 20), 102: ((0.5, 0.33), 10), 204: ((0.5, 1.0), 5), 408: ((0.5, 1.0), 2)},
    "240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10), 204: ((0.4, 1.0), 5), 408: ((0.4, 1.0), 2)},
    "360p": {1: (0.5, 141), 51: (0.15, 8), 102: ((0.3, 0.5), 4), 204: ((0.3, 1.0), 2), 408: ((0.5, 0.5), 1)},
    "512": {1: (0.4, 141), 51: (0.15, 8), 102: ((0.2, 0.4), 4), 204: ((0.2, 1.0), 2), 408: ((0.4, 0.5), 1)},
    "480p": {1: (0.5, 89), 51: (0.2, 5), 102: (0.2, 2), 204: (0.1, 1)},
    "720p": {1: (0.1, 36), 51: (0.03, 1)},
    "1024": {1: (0.1, 36), 51: (0.02, 1)},
    "1080p": {1: (0.01, 5)},
    "2048": {1: (0.01, 5)},
}  # fmt: skip

STAGE3 = {  # ~20 s/it
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: (1.0, 27), 204: (1.0, 13), 408: (1.0, 6)},
    "256": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.5), 2)},
    "240p": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.4), 2)},
    "360p": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.3), 1)},
    "512": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.2), 1)},
    "480p": {1: (1.0, 89), 51: (0.5, 5), 102: (0.5, 3), 204: ((0.5, 0.5), 1), 408: (0.0, None)},
    "720p": {1: (0.3, 36), 51: (0.2, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1024": {1: (0.3, 36), 51: (0.1, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1080p": {1: (0.1, 5)},
    "2048": {1: (0.05, 5)},
}  # fmt: skip

STAGES = {"stage1": STAGE1, "stage2": STAGE2, "stage3": STAGE3}

# Tiny resolutions for the synthetic dataset (sizes are multiples of 16, so latents (÷8) split into 2×2
# patches). Pass as Buckets(..., resolutions=SYNTHETIC_RESOLUTIONS). Keys are H/W like the v1.2 tables.
SYNTHETIC_RESOLUTIONS = {
    "32px": (1024, {"0.50": (16, 32), "1.00": (32, 32), "2.00": (32, 16)}),
    "64px": (4096, {"0.50": (48, 96), "1.00": (64, 64), "2.00": (96, 48)}),
}

# For `python -m opensora_jax.data.synthetic` clips (default 32 frames): a video needs more than T frames.
SYNTHETIC = {
    "64px": {1: (1.0, 16), 17: (1.0, 4)},
    "32px": {1: (1.0, 32), 17: (1.0, 8)},
}

# The demo model (assets/demo): 17-frame clips at 32×32, 8 per batch. On a 2-core CPU a step costs about
# linearly in the batch, and per second of training batch 8 learns the prompts faster than 16 or 32.
DEMO = {"32px": {17: (1.0, 8)}}



# ---------------------------------------------------------------------------------------------------------------
# Open-Sora 2.0 (spec §4; `configs/diffusion/train/*.py`): frame buckets 4k+1 (the causal Hunyuan VAE) or 4k
# (the DC-AE), batch sizes per group of frame counts. Resolutions are "{S}px" names of the 2.0 training table
# (`presets_v2_0.TrainingResolutions`).


def frame_groups(image: tuple | None, groups, *, keep: float = 1.0, skip=()) -> dict:
    """{T: (keep, batch)}: the image bucket `image` = (keep, batch) (or None) and, for each (first, last, step,
    batch) of `groups`, every T in first..last by step (leaving out `skip`) with that batch."""
    table = {} if image is None else {1: tuple(image)}
    for first, last, step, batch in groups:
        table.update({t: (keep, batch) for t in range(first, last + 1, step) if t not in skip})
    return table


def _v2_video(b33, b65, b97, b129, *, keep=1.0, skip=()):
    return frame_groups(None, ((5, 33, 4, b33), (37, 65, 4, b65), (69, 97, 4, b97), (101, 129, 4, b129)),
                        keep=keep, skip=skip)


V2_IMAGE = {"256px": {1: (1.0, 50)}, "768px": {1: (0.5, 11)}, "1024px": {1: (0.5, 7)}}
V2_STAGE1 = {"256px": {1: (1.0, 45), **_v2_video(12, 6, 4, 3)}, "768px": {1: (0.5, 13)}, "1024px": {1: (0.5, 7)}}
V2_STAGE2 = {"256px": {1: (1.0, 130), **_v2_video(14, 10, 7, 6, skip=(69,))},
             "768px": {1: (1.0, 38), **_v2_video(6, 4, 3, 2)}}
V2_STAGE2_I2V = {"256px": {1: (1.0, 195), **_v2_video(80, 40, 28, 23)},
                 "768px": {1: (0.5, 38), **_v2_video(10, 5, 3, 2, keep=0.5)}}
V2_HIGH_COMPRESSION = {"768px": frame_groups((1.0, 20), ((16, 32, 4, 8), (36, 64, 4, 4), (68, 96, 4, 3),
                                                         (100, 128, 4, 2)))}
# Tiny buckets for the synthetic dataset (64×64 clips of 32 frames): images and 17-frame clips.
V2_SYNTHETIC = {"64px": {1: (1.0, 4), 17: (1.0, 2)}}

V2_STAGES = {"v2_image": V2_IMAGE, "v2_stage1": V2_STAGE1, "v2_stage1_i2v": V2_STAGE1, "v2_stage2": V2_STAGE2,
             "v2_stage2_i2v": V2_STAGE2_I2V, "v2_high_compression": V2_HIGH_COMPRESSION,
             "v2_synthetic": V2_SYNTHETIC}


def _v2_resolutions(compression: int):
    from opensora_jax.presets_v2_0 import TrainingResolutions

    return TrainingResolutions(compression=compression)


# Names a training config may use for `data.bucket_config` and `data.resolutions`.
NAMED_BUCKET_CONFIGS = {**STAGES, "synthetic": SYNTHETIC, "demo": DEMO, **V2_STAGES}
NAMED_RESOLUTION_TABLES = {"synthetic": SYNTHETIC_RESOLUTIONS, "opensora_v2_0": _v2_resolutions(16),
                           "opensora_v2_0_dc_ae": _v2_resolutions(32)}
