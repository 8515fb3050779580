"""Frame conditioning for Open-Sora v1.2 sampling: image-to-video, extension, editing, looping (spec §7).

A prompt may end with a JSON object giving its `reference_path` (";"-separated image/video files) and
`mask_strategy` (";"-separated groups "loop_id,ref_id,ref_start,target_start,length,edit_ratio").
`apply_mask_strategy` copies reference latents into the initial latent and returns the per-frame mask the
sampler takes as `cond_mask`: 1 = generate, 0 = keep the copied frame, in between = edit ratio. All frame
indices of a mask strategy count LATENT frames (one latent ≈ 4 pixel frames, an image is one latent).

Layouts are channels-last: latents z (B, T, H, W, C), reference latents (T_ref, H, W, C), reference
pixels (T, H, W, 3) float32 in [-1, 1]. VAE encoding of references is the pipeline's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from opensora_jax import video_io

# ---------------------------------------------------------------------------------------------- prompts

PROMPT_JSON_KEYS = ("reference_path", "mask_strategy")
LOOP_PROMPT_PREFIX = "|0|"


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """A prompt split from its trailing JSON options; a field is None when the JSON did not set it."""

    text: str
    reference_path: str | None = None
    mask_strategy: str | None = None


def parse_prompt(prompt: str) -> PromptOptions:
    """Split `text{"reference_path": ..., "mask_strategy": ...}` into the text and its options.

    The JSON object starts at the first "{" and runs to the end; the text before it is kept as is
    (trailing space included, like the reference). Only the keys in PROMPT_JSON_KEYS are allowed,
    with string values. Raises ValueError naming the offending part.
    """
    start = prompt.find("{")
    if start < 0:
        return PromptOptions(text=prompt)
    text, blob = prompt[:start], prompt[start:]
    if "{" in blob[1:]:
        raise ValueError(f"prompt may hold one JSON object without nested braces, got {blob!r} in {prompt!r}")
    try:
        options = json.loads(blob)
    except json.JSONDecodeError as err:
        raise ValueError(f"prompt ends with invalid JSON {blob!r}: {err}") from None
    for key, value in options.items():
        if key not in PROMPT_JSON_KEYS:
            raise ValueError(f"invalid key {key!r} in prompt JSON {blob!r}; allowed: {', '.join(PROMPT_JSON_KEYS)}")
        if not isinstance(value, str):
            raise ValueError(f"prompt JSON key {key!r} must be a string, got {value!r}")
    return PromptOptions(text=text, **options)


def apply_prompt_options(
    prompts: Sequence[str],
    reference_paths: Sequence[str] | None = None,
    mask_strategies: Sequence[str] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Per-prompt (texts, reference_paths, mask_strategies); a prompt's JSON overrides the given lists.

    The lists default to "" per prompt (no reference, no strategy), like the reference's inference script.
    """
    n = len(prompts)
    refs = list(reference_paths) if reference_paths is not None else [""] * n
    strategies = list(mask_strategies) if mask_strategies is not None else [""] * n
    for name, values in (("reference_paths", refs), ("mask_strategies", strategies)):
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    texts = []
    for i, prompt in enumerate(prompts):
        options = parse_prompt(prompt)
        texts.append(options.text)
        if options.reference_path is not None:
            refs[i] = options.reference_path
        if options.mask_strategy is not None:
            strategies[i] = options.mask_strategy
    return texts, refs, strategies


def is_loop_prompt(prompt: str) -> bool:
    """True for a multi-segment loop prompt `|0|text0|k1|text1...`."""
    return prompt.startswith(LOOP_PROMPT_PREFIX)


def _loop_segments(prompt: str) -> list[tuple[int, str]]:
    """[(first loop, text)] of a loop prompt, texts unstripped; starts must rise strictly from 0."""
    fields = prompt.split("|")[1:]
    if len(fields) % 2:
        raise ValueError(f"loop prompt must be |k|text pairs (a '|' inside a text is not allowed): {prompt!r}")
    segments = []
    for k, text in zip(fields[0::2], fields[1::2]):
        try:
            start = int(k)
        except ValueError:
            raise ValueError(f"loop index {k!r} is not an integer in loop prompt {prompt!r}") from None
        if segments and start <= segments[-1][0]:
            raise ValueError(f"loop indices must increase, got {start} after {segments[-1][0]} in {prompt!r}")
        segments.append((start, text))
    return segments


def split_loop_prompt(prompt: str) -> tuple[list[str], list[int] | None]:
    """(stripped segment texts, their first loop indices) of a loop prompt; ([prompt], None) otherwise."""
    if not is_loop_prompt(prompt):
        return [prompt], None
    segments = _loop_segments(prompt)
    return [text.strip() for _, text in segments], [start for start, _ in segments]


def merge_loop_prompt(texts: Sequence[str], loop_starts: Sequence[int] | None = None) -> str:
    """Inverse of `split_loop_prompt`: `|k0|text0|k1|text1...`, or the only text when loop_starts is None."""
    if loop_starts is None:
        if len(texts) != 1:
            raise ValueError(f"without loop indices give exactly one text, got {len(texts)}")
        return texts[0]
    if len(texts) != len(loop_starts):
        raise ValueError(f"{len(texts)} texts for {len(loop_starts)} loop indices")
    return "".join(f"|{k}|{text}" for k, text in zip(loop_starts, texts))


def prompt_for_loop(prompt: str, loop_i: int) -> str:
    """The text used at loop iteration `loop_i`: the last segment whose start is ≤ loop_i.

    A plain prompt is returned unchanged; segment texts are not stripped (as in the reference).
    """
    if not is_loop_prompt(prompt):
        return prompt
    if loop_i < 0:
        raise ValueError(f"loop index must be ≥ 0, got {loop_i}")
    return [text for start, text in _loop_segments(prompt) if start <= loop_i][-1]


# ---------------------------------------------------------------------------------------- mask strategy

MASK_FIELDS = ("loop_id", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
MASK_DEFAULTS = ("0", "0", "0", "0", "1", "0")


@dataclasses.dataclass(frozen=True)
class MaskCondition:
    """One mask-strategy group: copy `length` latent frames of reference `ref_id` from `ref_start` to
    `target_start` of the generated latent at loop iteration `loop_id`, with that `edit_ratio`.

    Negative starts count from the end. edit_ratio 0 keeps the frames, 1 regenerates them freely.
    """

    loop_id: int = 0
    ref_id: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def __post_init__(self):
        for name in ("loop_id", "ref_id", "length"):
            if getattr(self, name) < 0:
                raise ValueError(f"mask strategy {name} must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.edit_ratio <= 1.0:
            raise ValueError(f"mask strategy edit_ratio must be in [0, 1], got {self.edit_ratio}")

    def __str__(self) -> str:
        return ",".join(str(getattr(self, name)) for name in MASK_FIELDS)


def parse_mask_group(group: str) -> MaskCondition:
    """Parse one group "loop_id,ref_id,ref_start,target_start,length,edit_ratio"; missing trailing
    fields take the defaults 0,0,0,0,1,0. Raises ValueError naming the group and the bad field."""
    fields = group.split(",")
    if len(fields) > len(MASK_FIELDS):
        raise ValueError(f"mask strategy group {group!r} has {len(fields)} fields; at most 6: {','.join(MASK_FIELDS)}")
    fields += MASK_DEFAULTS[len(fields) :]
    values = {}
    for name, field in zip(MASK_FIELDS, fields):
        kind = float if name == "edit_ratio" else int
        try:
            values[name] = kind(field)
        except ValueError:
            raise ValueError(
                f"mask strategy group {group!r}: {name} must be {'a number' if kind is float else 'an integer'}, "
                f"got {field!r} (fields: {','.join(MASK_FIELDS)})"
            ) from None
    try:
        return MaskCondition(**values)
    except ValueError as err:
        raise ValueError(f"mask strategy group {group!r}: {err}") from None


def parse_mask_strategy(strategy: str | None) -> list[MaskCondition]:
    """Parse a mask strategy: groups separated by ";"; "" or None → no condition."""
    if not strategy:
        return []
    return [parse_mask_group(group) for group in strategy.split(";")]


def format_mask_strategy(conditions: Sequence[MaskCondition]) -> str:
    """The string form of a list of conditions (inverse of `parse_mask_strategy`)."""
    return ";".join(str(c) for c in conditions)


def find_nearest_point(value: int, point: int, max_value: int) -> int:
    """Snap `value` to a multiple of `point`: down, or up when the remainder exceeds point / 2 and the
    next multiple stays below the last whole multiple that fits in `max_value`."""
    q = value // point
    if value % point > point / 2 and q < max_value // point - 1:
        q += 1
    return q * point


@dataclasses.dataclass(frozen=True)
class FrameCopy:
    """A resolved condition: z[target_start : target_start + length] ← ref[ref_start : ...], mask = edit_ratio."""

    ref_start: int
    target_start: int
    length: int
    edit_ratio: float


def resolve_condition(
    cond: MaskCondition, ref_frames: int, target_frames: int, align: int | None = None
) -> FrameCopy:
    """Turn a condition into absolute latent-frame ranges (the reference's order of operations).

    Negative starts are counted from the end of the reference / target; with `align`, both starts are
    snapped by `find_nearest_point`; the length is clipped to what both sides still hold. Raises
    ValueError when a start falls outside its latent.
    """
    if align is not None and align < 1:
        raise ValueError(f"align must be a positive number of latent frames or None, got {align}")
    ref_start = cond.ref_start + ref_frames if cond.ref_start < 0 else cond.ref_start
    target_start = cond.target_start + target_frames if cond.target_start < 0 else cond.target_start
    for name, start, size, raw in (
        ("ref_start", ref_start, ref_frames, cond.ref_start),
        ("target_start", target_start, target_frames, cond.target_start),
    ):
        if not 0 <= start < size:
            raise ValueError(f"mask strategy {name} {raw} is outside a latent of {size} frames (condition {cond})")
    if align is not None:
        ref_start = find_nearest_point(ref_start, align, ref_frames)
        target_start = find_nearest_point(target_start, align, target_frames)
    length = min(cond.length, target_frames - target_start, ref_frames - ref_start)
    return FrameCopy(ref_start, target_start, length, cond.edit_ratio)


def _conditions(strategy: str | Sequence[MaskCondition] | None) -> list[MaskCondition]:
    if strategy is None or isinstance(strategy, str):
        return parse_mask_strategy(strategy)
    return list(strategy)


def _reference(refs: Sequence, sample: int, cond: MaskCondition, z_shape):
    if cond.ref_id >= len(refs):
        raise ValueError(
            f"sample {sample}: mask strategy {cond} uses reference {cond.ref_id} but the prompt has {len(refs)}"
        )
    ref = refs[cond.ref_id]
    if ref.ndim != 4 or tuple(ref.shape[1:]) != tuple(z_shape[2:]):
        raise ValueError(
            f"sample {sample}: reference {cond.ref_id} latent has shape {tuple(ref.shape)}; "
            f"expected (T_ref, {', '.join(map(str, z_shape[2:]))}) to match z {tuple(z_shape)}"
        )
    return ref


def apply_mask_strategy(
    z,
    refs: Sequence[Sequence] | None,
    strategies: Sequence[str | Sequence[MaskCondition] | None],
    loop_i: int = 0,
    align: int | None = None,
):
    """Copy reference latents into z as each sample's strategy says; return (z, mask).

    z: (B, T, H, W, C) latent, jax or numpy. refs: per sample, a list of reference latents
    (T_ref, H, W, C) (None: no references). strategies: per sample a strategy string, a list of
    MaskCondition, or None. Only groups with loop_id == loop_i apply, in order (later ones overwrite).
    Returns z with the copied frames (same kind of array and dtype; numpy input is not modified) and
    mask (B, T) float32 (jax for jax z): 1 where the sampler generates, the group's edit_ratio where a
    frame was copied.
    """
    b, t = z.shape[:2]
    if len(strategies) != b:
        raise ValueError(f"got {len(strategies)} mask strategies for a batch of {b}")
    refs = [[] for _ in range(b)] if refs is None else refs
    if len(refs) != b:
        raise ValueError(f"got reference lists for {len(refs)} samples for a batch of {b}")
    is_jax = isinstance(z, jax.Array)
    out = z if is_jax else np.array(z)
    mask = np.ones((b, t), np.float32)
    for i, strategy in enumerate(strategies):
        for cond in _conditions(strategy):
            if cond.loop_id != loop_i:
                continue
            ref = _reference(refs[i] if refs[i] is not None else [], i, cond, z.shape)
            copy = resolve_condition(cond, ref.shape[0], t, align)
            src = ref[copy.ref_start : copy.ref_start + copy.length]
            dst = slice(copy.target_start, copy.target_start + copy.length)
            if is_jax:
                out = out.at[i, dst].set(jnp.asarray(src, out.dtype))
            else:
                out[i, dst] = np.asarray(src, out.dtype)
            mask[i, dst] = copy.edit_ratio
    return out, (jnp.asarray(mask) if is_jax else mask)


# ------------------------------------------------------------------------------------------------ loops

LATENTS_PER_CHUNK, FRAMES_PER_CHUNK = 5, 17  # the v1.2 VAE: 17 pixel frames ↔ 5 latent frames


def loop_condition_group(
    loop_i: int, ref_id: int, condition_frame_length: int, condition_frame_edit: float = 0.0
) -> str:
    """The group added at loop i > 0: the last `condition_frame_length` latents of reference `ref_id`
    (the previous clip) become the first latents of the new clip: "i,ref_id,-cfl,0,cfl,edit"."""
    return f"{loop_i},{ref_id},-{condition_frame_length},0,{condition_frame_length},{condition_frame_edit}"


def append_mask_group(strategy: str | None, group: str) -> str:
    """`strategy;group`, or `group` when the strategy is empty."""
    return f"{strategy};{group}" if strategy else group


def append_generated(
    refs: Sequence[Sequence] | None,
    strategies: Sequence[str | None],
    generated_latents,
    loop_i: int,
    condition_frame_length: int = 5,
    condition_frame_edit: float = 0.0,
) -> tuple[list[list], list[str]]:
    """Before loop i > 0: add each sample's previous-clip latent to its references and the loop group
    to its strategy. generated_latents: (B, T, H, W, C), the VAE encoding of the previous clip.
    Returns new lists; the inputs are not modified."""
    b = len(strategies)
    if len(generated_latents) != b:
        raise ValueError(f"got {len(generated_latents)} generated latents for {b} mask strategies")
    refs = [[] for _ in range(b)] if refs is None else refs
    new_refs, new_strategies = [], []
    for i in range(b):
        sample_refs = list(refs[i] or []) + [generated_latents[i]]
        group = loop_condition_group(loop_i, len(sample_refs) - 1, condition_frame_length, condition_frame_edit)
        new_refs.append(sample_refs)
        new_strategies.append(append_mask_group(strategies[i], group))
    return new_refs, new_strategies


def dframe_to_frame(latent_frames: int) -> int:
    """Pixel frames spanned by a multiple of 5 latent frames: 5 → 17, 10 → 34."""
    if latent_frames % LATENTS_PER_CHUNK:
        raise ValueError(
            f"condition length must be a multiple of {LATENTS_PER_CHUNK} latent frames, got {latent_frames}"
        )
    return latent_frames // LATENTS_PER_CHUNK * FRAMES_PER_CHUNK


def loop_frames_to_drop(loop_i: int, condition_frame_length: int) -> int:
    """Leading pixel frames of clip `loop_i` to drop when joining loop clips (they repeat the previous clip)."""
    return 0 if loop_i == 0 else dframe_to_frame(condition_frame_length)


def join_loop_clips(clips: Sequence, condition_frame_length: int = 5) -> np.ndarray:
    """Concatenate per-loop pixel clips (T, H, W, 3) along time, each clip after the first without the
    frames it shares with its predecessor."""
    if not clips:
        raise ValueError("join_loop_clips needs at least one clip")
    parts = [np.asarray(clip)[loop_frames_to_drop(i, condition_frame_length) :] for i, clip in enumerate(clips)]
    return np.concatenate(parts, axis=0)


def total_loop_frames(num_frames: int, loop: int, condition_frame_length: int = 5) -> int:
    """Pixel frames of a looped video: num_frames + (loop − 1)·(num_frames − dframe_to_frame(cfl))."""
    return num_frames + (loop - 1) * (num_frames - dframe_to_frame(condition_frame_length))


# ------------------------------------------------------------------------------------------- references

_URL = re.compile(r"^(?:http|ftp)s?://", re.IGNORECASE)


def is_url(path: str) -> bool:
    """True for http(s):// and ftp(s):// addresses."""
    return bool(_URL.match(path))


def split_reference_paths(reference_path: str | None) -> list[str]:
    """The ";"-separated paths of one prompt's reference_path ("" or None → []), whitespace-stripped."""
    if not reference_path:
        return []
    paths = [p.strip() for p in reference_path.split(";")]
    if not all(paths):
        raise ValueError(f"empty path in reference_path {reference_path!r} (paths are separated by ';')")
    return paths


def fill_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after scaling (height, width) by the larger of the two target/source ratios, so that the
    result covers `target` (rounded like the reference: Python's round, half to even)."""
    th, tw = target
    rh, rw = th / height, tw / width
    if rh > rw:
        return th, round(width * rh)
    return round(height * rw), tw


def resize_crop_image(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Reference `resize_crop` for an image: PIL bicubic resize to cover `target`, then a centred crop.

    image: (H, W, 3) uint8 → (th, tw, 3) uint8. The crop offset is round(excess / 2), half to even.
    """
    h, w = image.shape[:2]
    sh, sw = fill_size(h, w, target)
    resized = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BICUBIC))
    th, tw = target
    top, left = int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0))
    return resized[top : top + th, left : left + tw]


def bilinear_resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (T, H, W, C) float frames to size (H', W'), half-pixel centres, no antialias:
    the sampling of torch's `interpolate(mode="bilinear", align_corners=False)`."""
    frames = np.asarray(frames, np.float32)
    rows = _linear_weights(frames.shape[1], size[0])
    cols = _linear_weights(frames.shape[2], size[1])
    out = _interpolate_axis(frames, 1, *rows)
    return _interpolate_axis(out, 2, *cols)


def _linear_weights(n_in: int, n_out: int):
    """For each output index: the two source indices and their weights (source clamped at 0)."""
    scale = np.float32(n_in) / np.float32(n_out)
    # scale·(i + 0.5) − 0.5 with a single float32 rounding: torch's CPU kernel compiles it to an FMA, and
    # rounding the product first moves far source positions by up to ~1e-5 pixel.
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w_hi = (src - lo).astype(np.float32)
    return lo, hi, np.float32(1) - w_hi, w_hi


def _interpolate_axis(x: np.ndarray, axis: int, lo, hi, w_lo, w_hi) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.take(x, lo, axis) * w_lo.reshape(shape) + np.take(x, hi, axis) * w_hi.reshape(shape)


def resize_crop_video(frames: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Reference `resize_crop` for a video: (T, H, W, C) float in [0, 1] → (T, th, tw, C), bilinear
    resize (no antialias) to cover `target`, then a crop offset by ⌊excess / 2⌋."""
    _, h, w, _ = frames.shape
    sh, sw = fill_size(h, w, target)
    resized = bilinear_resize(frames, (sh, sw))
    th, tw = target
    top, left = (sh - th) // 2, (sw - tw) // 2
    return resized[:, top : top + th, left : left + tw]


def _to_unit_range(frames_uint8: np.ndarray) -> np.ndarray:
    return frames_uint8.astype(np.float32) / np.float32(255)


def _normalize(x: np.ndarray) -> np.ndarray:
    """[0, 1] → [-1, 1] as the reference's Normalize(mean=0.5, std=0.5)."""
    return (x - np.float32(0.5)) / np.float32(0.5)


def load_reference(path: str, size: tuple[int, int]) -> np.ndarray:
    """One reference file resized and cropped to size (H, W): (T, H, W, 3) float32 in [-1, 1].

    Images give T = 1; videos all their frames. Local files only: a URL raises ValueError.
    """
    path = os.fspath(path)
    if is_url(path):
        raise ValueError(
            f"reference {path!r} is a URL; downloading is not supported: download it and pass the local path"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such reference file: {path!r}")
    if video_io.is_video_path(path):
        frames = video_io.read_frames(path)
        return _normalize(resize_crop_video(_to_unit_range(frames), size))
    if video_io.is_image_path(path):
        image = resize_crop_image(video_io.read_image(path), size)
        return _normalize(_to_unit_range(image))[None]
    raise ValueError(
        f"unsupported reference file type {os.path.splitext(path)[1]!r} for {path!r}; "
        f"videos: {', '.join(video_io.VIDEO_EXTENSIONS)}; images: {', '.join(video_io.IMAGE_EXTENSIONS)}"
    )


def load_references(reference_path: str | None, size: tuple[int, int]) -> list[np.ndarray]:
    """Every reference of one prompt's ";"-separated reference_path, each (T, H, W, 3) in [-1, 1]."""
    return [load_reference(p, size) for p in split_reference_paths(reference_path)]
