"""Open-Sora 2.0 sizes: resolution names ("256px", "768px"), W:H aspect-ratio names, frame counts, latent shapes.

Sizes follow the reference's inference table (`training=False`): for "{S}px" the pixel budget is S²; for a ratio
w:h, W = ⌊√(S²·w/h) / D⌋·D and H = ⌊(S²/W) / D⌋·D, with D the autoencoder's spatial compression times the patch
size (16 for the Hunyuan VAE, 32 for the Video DC-AE); every ratio also gets its vertical twin (h:w), which
replaces an entry of that name. Then H and W are rounded up to multiples of 16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from opensora_jax.errors import UserError

# The reference's landscape-first list (names are width:height).
ASPECT_RATIOS = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")


def num_pixels(resolution: str) -> int:
    """The pixel budget of "{S}px" (S²) or "{S}p" (S²·16/9)."""
    name = str(resolution).split("_")[0]
    try:
        if name.endswith("px"):
            return int(name[:-2]) ** 2
        if name.endswith("p"):
            return int(int(name[:-1]) ** 2 / 9 * 16)
    except ValueError:
        pass
    raise UserError(f"resolution {resolution!r} is not a name like '256px' or '768px'")


def aspect_ratio_sizes(resolution: str, compression: int = 16) -> dict[str, tuple[int, int]]:
    """{W:H name: (H, W)} of the inference table for `resolution` (before the rounding up to 16)."""
    total = num_pixels(resolution)
    sizes, vertical = {}, {}
    for name in ASPECT_RATIOS:
        w_ratio, h_ratio = (float(v) for v in name.split(":"))
        width = int(math.sqrt(total * (w_ratio / h_ratio)) // compression) * compression
        if width == 0:
            raise UserError(f"resolution {resolution!r} is too small for aspect ratio {name}")
        height = int((total / width) // compression) * compression
        sizes[name] = (height, width)
        vertical[":".join(name.split(":")[::-1])] = (width, height)
    sizes.update(vertical)
    return sizes


def training_sizes(resolution: str, compression: int = 16) -> dict[str, tuple[int, int]]:
    """{W:H name: (H, W)} of the reference's training table (`training=True`): each size is first nudged by ±D on
    H or W towards the pixel budget, and a ratio whose size an earlier one already has is left out (with its
    vertical twin)."""
    total = num_pixels(resolution)
    d = compression
    sizes, vertical = {}, {}
    for name in ASPECT_RATIOS:
        w_ratio, h_ratio = (float(v) for v in name.split(":"))
        width = int(math.sqrt(total * (w_ratio / h_ratio)) // d) * d
        if width == 0:
            raise UserError(f"resolution {resolution!r} is too small for aspect ratio {name}")
        height = int((total / width) // d) * d
        diff = abs(height * width - total)
        for h, w in ((height - d, width), (height + d, width), (height, width - d), (height, width + d)):
            if abs(h * w - total) < diff:
                height, width, diff = h, w, abs(h * w - total)
        if (height, width) in sizes.values():
            continue
        sizes[name] = (height, width)
        vertical[":".join(name.split(":")[::-1])] = (width, height)
    sizes.update(vertical)
    return sizes


def ratio_of(name: str) -> float:
    """H / W of a W:H aspect-ratio name ("16:9" → 0.5625)."""
    w, h = (float(v) for v in name.split(":"))
    return h / w


class TrainingResolutions(Mapping):
    """The training buckets' resolution table for any "{S}px" / "{S}p" name: name → (pixel budget,
    {W:H name: (H, W)}) in the format of `opensora_jax.data.buckets` (aspect-ratio keys are W:H names, matched by
    their nominal H / W as the reference does). Iterates over `names`; looks up any valid name."""

    def __init__(self, names=("256px", "768px", "1024px"), compression: int = 16):
        self.names, self.compression = tuple(names), compression

    def __getitem__(self, name):
        try:
            return num_pixels(name), training_sizes(name, self.compression)
        except UserError:
            raise KeyError(name) from None

    def __contains__(self, name) -> bool:
        try:
            num_pixels(name)
        except UserError:
            return False
        return True

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def image_size(resolution: str, aspect_ratio: str, compression: int = 16) -> tuple[int, int]:
    """(H, W) in pixels for a resolution and a W:H aspect-ratio name: ("256px", "16:9") → (192, 336)."""
    sizes = aspect_ratio_sizes(resolution, compression)
    if aspect_ratio not in sizes:
        raise UserError(f"unknown aspect ratio {aspect_ratio!r} (names are W:H); valid: {', '.join(sizes)}")
    h, w = sizes[aspect_ratio]
    return -(-h // 16) * 16, -(-w // 16) * 16


def check_num_frames(num_frames: int, *, causal: bool = True, time_compression: int = 4) -> int:
    """`num_frames` if the autoencoder takes it (causal: 1 or 4k+1; otherwise a multiple of 4), else a UserError
    listing the nearest valid counts."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise UserError(f"--num-frames must be a whole number ≥ 1, got {num_frames!r}")
    k = time_compression
    valid = (num_frames - 1) % k == 0 if causal else (num_frames == 1 or num_frames % k == 0)
    if valid:
        return num_frames
    if causal:
        below = (num_frames - 1) // k * k + 1
    else:
        below = max(num_frames // k * k, 1)
    rule = f"{k}k+1 (1, {k + 1}, {2 * k + 1}, ...)" if causal else f"a multiple of {k}"
    raise UserError(f"--num-frames {num_frames} does not fit the autoencoder: use {rule}, e.g. {below} or "
                    f"{below + k}")


def latent_frames(num_frames: int, *, causal: bool = True, time_compression: int = 4) -> int:
    """Latent frames of `num_frames` pixel frames: 1 for an image, (T−1)//4+1 causal, T//4 otherwise."""
    if num_frames == 1:
        return 1
    return (num_frames - 1) // time_compression + 1 if causal else num_frames // time_compression


def latent_hw(height: int, width: int, *, spatial_compression: int = 8, patch_size: int = 2) -> tuple[int, int]:
    """The latent grid (H', W') of the noise: p·⌈H/D⌉ × p·⌈W/D⌉ with D = spatial compression · patch size."""
    d = spatial_compression * patch_size
    return patch_size * -(-height // d), patch_size * -(-width // d)
