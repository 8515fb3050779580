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

# Names a training config may use for `data.bucket_config` and `data.resolutions`.
NAMED_BUCKET_CONFIGS = {**STAGES, "synthetic": SYNTHETIC, "demo": DEMO}
NAMED_RESOLUTION_TABLES = {"synthetic": SYNTHETIC_RESOLUTIONS}
