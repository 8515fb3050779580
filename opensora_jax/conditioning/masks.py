"""Mask strategies for frame conditioning (spec §7): image-to-video, extension, editing, looping.

A mask strategy is ";"-separated groups "loop_id,ref_id,ref_start,target_start,length,edit_ratio".
`apply_mask_strategy` copies reference latents into the initial latent and returns the per-frame mask the
sampler takes as `cond_mask`: 1 = generate, 0 = keep the copied frame, in between = edit ratio. All frame
indices of a mask strategy count LATENT frames (one latent ≈ 4 pixel frames, an image is one latent).
Latents are channels-last: z (B, T, H, W, C), reference latents (T_ref, H, W, C).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opensora_jax.errors import UserError

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
                raise UserError(f"mask strategy {name} must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.edit_ratio <= 1.0:
            raise UserError(f"mask strategy edit_ratio must be in [0, 1], got {self.edit_ratio}")

    def __str__(self) -> str:
        return ",".join(str(getattr(self, name)) for name in MASK_FIELDS)


def parse_mask_group(group: str) -> MaskCondition:
    """Parse one group "loop_id,ref_id,ref_start,target_start,length,edit_ratio"; missing trailing
    fields take the defaults 0,0,0,0,1,0. Raises ValueError naming the group and the bad field."""
    fields = group.split(",")
    if len(fields) > len(MASK_FIELDS):
        raise UserError(f"mask strategy group {group!r} has {len(fields)} fields; at most 6: {','.join(MASK_FIELDS)}")
    fields += MASK_DEFAULTS[len(fields) :]
    values = {}
    for name, field in zip(MASK_FIELDS, fields):
        kind = float if name == "edit_ratio" else int
        try:
            values[name] = kind(field)
        except ValueError:
            raise UserError(
                f"mask strategy group {group!r}: {name} must be {'a number' if kind is float else 'an integer'}, "
                f"got {field!r} (fields: {','.join(MASK_FIELDS)})"
            ) from None
    try:
        return MaskCondition(**values)
    except ValueError as err:
        raise UserError(f"mask strategy group {group!r}: {err}") from None


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
        raise UserError(f"align must be a positive number of latent frames or None, got {align}")
    ref_start = cond.ref_start + ref_frames if cond.ref_start < 0 else cond.ref_start
    target_start = cond.target_start + target_frames if cond.target_start < 0 else cond.target_start
    for name, start, size, raw in (
        ("ref_start", ref_start, ref_frames, cond.ref_start),
        ("target_start", target_start, target_frames, cond.target_start),
    ):
        if not 0 <= start < size:
            raise UserError(f"mask strategy {name} {raw} is outside a latent of {size} frames (condition {cond})")
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
        raise UserError(
            f"sample {sample}: mask strategy {cond} uses reference {cond.ref_id} but the prompt has {len(refs)}"
        )
    ref = refs[cond.ref_id]
    if ref.ndim != 4 or tuple(ref.shape[1:]) != tuple(z_shape[2:]):
        raise UserError(
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
        raise UserError(f"got {len(strategies)} mask strategies for a batch of {b}")
    refs = [[] for _ in range(b)] if refs is None else refs
    if len(refs) != b:
        raise UserError(f"got reference lists for {len(refs)} samples for a batch of {b}")
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
        raise UserError(f"got {len(generated_latents)} generated latents for {b} mask strategies")
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
        raise UserError(
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
        raise UserError("join_loop_clips needs at least one clip")
    parts = [np.asarray(clip)[loop_frames_to_drop(i, condition_frame_length) :] for i, clip in enumerate(clips)]
    return np.concatenate(parts, axis=0)


def total_loop_frames(num_frames: int, loop: int, condition_frame_length: int = 5) -> int:
    """Pixel frames of a looped video: num_frames + (loop − 1)·(num_frames − dframe_to_frame(cfl))."""
    return num_frames + (loop - 1) * (num_frames - dframe_to_frame(condition_frame_length))


