"""Open-Sora v1.2 video VAE (`OpenSoraVAE_V1_2` = `VideoAutoencoderPipeline`): 2D VAE + temporal VAE.

Public layout (channels-last):
  video  (B, T, H, W, 3), values in [-1, 1]
  z      (B, T', ⌊H/8⌋, ⌊W/8⌋, 4) with T' = `latent_size(T, H, W)[0]` (17 frames → 5)

encode: per-frame 2D VAE (×0.18215) → temporal VAE on chunks of `micro_frame_size` frames (each
chunk with its own causal front padding; a short last chunk too) → `(z - shift) / scale`.
decode: `z · scale + shift` → temporal decode of chunks of `latent_frames(micro_frame_size)`
latents (the short last chunk decodes to the remaining frame count) → per-frame 2D decode.

Memory: the full chunks run in a `fori_loop` writing into one preallocated output, the short
last chunk once after it, and the 2D VAE runs `micro_batch_size` frames at a time inside each
chunk. Peak memory beyond the output is one chunk's working set, whatever the frame count.

On a device mesh (`mesh=` or an active `opensora_jax.parallel.sharding_context`) the work is split
over every device, whatever the mesh axes are called: the temporal VAE over the (video, chunk) pairs —
chunks are independent, each decoded/encoded with its own causal padding — and the 2D VAE over single
frames, `micro_batch_size` frames per device at a time (see `sharded_item_map`). A batch of one video
with three 17-frame chunks thus keeps 3 devices busy in the temporal VAE and all of them in the 2D VAE.
The two stages meet in the small 4-channel latent-resolution tensor. Results equal the one-device ones
(posterior samples included: the noise is drawn with the one-device keys and shapes).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opensora_jax.models.layers import buffer
from opensora_jax.models.vae.layers import (
    ceil_div,
    chunked_apply,
    diagonal_gaussian,
    gaussian_sample,
    item_devices,
    sharded_item_map,
)
from opensora_jax.models.vae.spatial import (
    SPATIAL_LATENT_SCALE,
    AutoencoderKL,
    SpatialVAEConfig,
    _micro_batches,
    decode_frames,
    encode_frames,
)
from opensora_jax.models.vae.temporal import TemporalVAE, TemporalVAEConfig
from opensora_jax.errors import UserError

SHIFT = (-0.10, 0.34, 0.27, 0.98)
SCALE = (3.85, 2.32, 2.33, 3.06)

# The released OpenSoraVAE_V1_2 (hpcai-tech/OpenSora-VAE-v1.2): the SDXL-VAE 2D architecture (as
# configured in PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae) and VAE_Temporal_SD.
OPENSORA_VAE_V1_2_PRESET: dict[str, Any] = {
    "micro_frame_size": 17,
    "micro_batch_size": 4,
    "shift": list(SHIFT),
    "scale": list(SCALE),
    "vae_2d": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
    },
    "vae_temporal": {
        "in_out_channels": 4,
        "latent_embed_dim": 4,
        "embed_dim": 4,
        "filters": 128,
        "num_res_blocks": 4,
        "channel_multipliers": [1, 2, 2, 4],
        "temporal_downsample": [False, True, True],
        "num_groups": 32,
        "activation_fn": "swish",
    },
}

# Pipeline-level keys that do not change the architecture or the inference maths.
_IGNORED_KEYS = {"from_pretrained", "freeze_vae_2d", "cal_loss", "latent_size_for_input", "num_frames", "type"}


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class OpenSoraVAEConfig:
    """Whole-pipeline config: the two VAEs, chunking, and the latent normalisation."""

    spatial: SpatialVAEConfig
    temporal: TemporalVAEConfig
    micro_frame_size: int | None = 17
    micro_batch_size: int | None = 4
    shift: tuple[float, ...] = SHIFT
    scale: tuple[float, ...] = SCALE

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "OpenSoraVAEConfig":
        """Reads the reference pipeline kwargs (`vae_2d`, `vae_temporal`, `micro_frame_size`, ...)."""
        config = dict(config)
        for key in ("vae_2d", "vae_temporal"):
            if key not in config:
                raise UserError(f"VAE config needs a {key!r} section; got keys {sorted(config)}")
        known = {"vae_2d", "vae_temporal", "micro_frame_size", "micro_batch_size", "shift", "scale"}
        for key in config:
            if key not in known and key not in _IGNORED_KEYS and not key.startswith("_"):
                raise UserError(f"VAE config key {key!r} is not supported (known: {sorted(known)})")

        def floats(v):
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v]))

        cfg = cls(
            spatial=SpatialVAEConfig.from_dict(config["vae_2d"]),
            temporal=TemporalVAEConfig.from_dict(config["vae_temporal"]),
            micro_frame_size=_optional_int(config.get("micro_frame_size", 17)),
            micro_batch_size=_optional_int(config.get("micro_batch_size", 4)),
            shift=floats(config.get("shift", SHIFT)),
            scale=floats(config.get("scale", SCALE)),
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The inverse of `from_dict` (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["vae_2d"] = out.pop("spatial")
        out["vae_temporal"] = out.pop("temporal")
        for section in (out["vae_2d"], out["vae_temporal"]):
            for k, v in section.items():
                if isinstance(v, tuple):
                    section[k] = list(v)
        out["shift"], out["scale"] = list(self.shift), list(self.scale)
        return out

    def validate(self) -> None:
        lat = self.spatial.latent_channels
        if self.temporal.in_out_channels != lat:
            raise UserError(
                f"vae_temporal.in_out_channels={self.temporal.in_out_channels} must equal "
                f"vae_2d.latent_channels={lat}"
            )
        for name, values in (("shift", self.shift), ("scale", self.scale)):
            if len(values) not in (1, self.temporal.embed_dim):
                raise UserError(f"{name} has {len(values)} values; expected 1 or embed_dim={self.temporal.embed_dim}")
        if self.micro_frame_size is not None and self.micro_frame_size < 1:
            raise UserError(f"micro_frame_size must be positive or None, got {self.micro_frame_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserError(f"micro_batch_size must be positive or None, got {self.micro_batch_size}")

    @property
    def spatial_factor(self) -> int:
        return self.spatial.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.temporal.embed_dim

    def latent_frames(self, num_frames: int) -> int:
        """T' for T pixel frames: full chunks give latent_frames(micro_frame_size) each, the rest its own."""
        t = self.temporal
        if self.micro_frame_size is None:
            return t.latent_frames(num_frames)
        full, rest = divmod(num_frames, self.micro_frame_size)
        return full * t.latent_frames(self.micro_frame_size) + (t.latent_frames(rest) if rest else 0)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latent for a (T, H, W) video: H' = ⌊H/8⌋, W' = ⌊W/8⌋ (426 → 53)."""
        f = self.spatial_factor
        return self.latent_frames(num_frames), height // f, width // f


class OpenSoraVAE(nnx.Module):
    """Open-Sora v1.2 video VAE. Variables: `spatial/...` (2D VAE), `temporal/...`, buffers `scale`, `shift`."""

    def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.spatial = AutoencoderKL(config.spatial, **kw)
        self.temporal = TemporalVAE(config.temporal, **kw)
        # (C,) here; the reference stores [1, C, 1, 1, 1]. Cast with the module like the reference's buffers.
        self.scale = buffer(jnp.asarray(config.scale, param_dtype), ("channels",))
        self.shift = buffer(jnp.asarray(config.shift, param_dtype), ("channels",))

    # ---------------------------------------------------------------- sizes and input checks

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of `encode`'s output for a (T, H, W) video; see `OpenSoraVAEConfig.latent_size`."""
        return self.config.latent_size(num_frames, height, width)

    def _check_video(self, video) -> None:
        c = self.config.spatial.in_channels
        f = self.config.spatial_factor
        shape = tuple(video.shape)
        hint = ""
        if len(shape) == 5 and shape[1] == c and shape[-1] != c:
            hint = " (it looks channels-first (B, C, T, H, W); move the channel axis last)"
        if len(shape) != 5 or shape[-1] != c:
            raise ValueError(f"encode expects a video (B, T, H, W, {c}) channels-last, got shape {shape}{hint}")
        b, t, h, w, _ = shape
        if b < 1 or t < 1:
            raise ValueError(f"encode needs at least one video and one frame, got shape {shape}")
        if h < f or w < f:
            raise ValueError(
                f"encode needs frames of at least {f}x{f} pixels (the 2D VAE downsamples by {f}), got {h}x{w}"
            )

    def _check_latent(self, z, num_frames) -> int:
        c = self.config.latent_channels
        shape = tuple(z.shape)
        if len(shape) != 5 or shape[-1] != c:
            raise ValueError(f"decode expects a latent (B, T', H', W', {c}) channels-last, got shape {shape}")
        if min(shape[:4]) < 1:
            raise ValueError(f"decode needs a non-empty latent, got shape {shape}")
        try:
            num_frames = operator.index(num_frames)  # Python or NumPy integer, not a traced value
        except TypeError:
            raise ValueError(f"decode needs num_frames as a static positive integer, got {num_frames!r}") from None
        if isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"decode needs num_frames as a static positive integer, got {num_frames!r}")
        expected = self.config.latent_frames(num_frames)
        if shape[1] != expected:
            raise ValueError(
                f"decode: {num_frames} frames encode to {expected} latent frames, but z has {shape[1]} "
                f"(micro_frame_size={self.config.micro_frame_size})"
            )
        return num_frames

    # ---------------------------------------------------------------- encode / decode

    def encode(
        self,
        video: jax.Array,
        *,
        sample_key: jax.Array | None = None,
        return_intermediates: bool = False,
        mesh: Mesh | None = None,
    ):
        """Video (B, T, H, W, 3) in [-1, 1] → normalised latent z (B, T', ⌊H/8⌋, ⌊W/8⌋, 4).

        `sample_key=None` uses the posterior means of both VAEs; with a key both posteriors are
        sampled as in the reference. With `return_intermediates=True` returns (z, dict) where the
        dict holds `x_z` (2D latents ×0.18215, (B, T, H', W', 4)), `temporal_mean` and
        `temporal_logvar` ((B, T', H', W', 4), before shift/scale).
        `mesh` (default: the mesh of an active `sharding_context`) splits the work over its devices.
        """
        self._check_video(video)
        split = _item_split(mesh)
        if split is not None:
            return self._encode_split(video, sample_key, return_intermediates, *split)
        cfg = self.config
        t = video.shape[1]
        mfs = cfg.micro_frame_size or t
        num_full, rest = divmod(t, mfs)
        scale = self.scale[...].astype(self.dtype)
        shift = self.shift[...].astype(self.dtype)

        # Casts and normalisation happen per chunk so that nothing video-sized is materialised.
        def encode_chunk(chunk, index):
            k2d = kt = None
            if sample_key is not None:
                k2d, kt = jax.random.split(jax.random.fold_in(sample_key, index))
            chunk = chunk.astype(self.dtype)
            x_z = encode_frames(self.spatial, chunk, micro_batch_size=cfg.micro_batch_size, key=k2d)
            sample, mean, logvar = diagonal_gaussian(self.temporal.moments(x_z), kt)
            z = (sample - shift) / scale
            if return_intermediates:
                return {"z": z, "x_z": x_z, "temporal_mean": mean, "temporal_logvar": logvar}
            return z

        out = chunked_apply(
            video,
            size=mfs,
            num_full=num_full,
            full_fn=encode_chunk,
            last_fn=lambda chunk: encode_chunk(chunk, num_full),
            axis=1,
        )
        if return_intermediates:
            z = out.pop("z")
            return z, out
        return out

    def decode(self, z: jax.Array, num_frames: int, *, return_intermediates: bool = False, mesh: Mesh | None = None):
        """Normalised latent z (B, T', H', W', 4) → video (B, num_frames, 8·H', 8·W', 3).

        `num_frames` is the pixel frame count z was encoded from (T' must equal
        `latent_size(num_frames, ...)[0]`). With `return_intermediates=True` returns (video, dict)
        with `x_z_dec`: the temporal decoder output (B, num_frames, H', W', 4), input of the 2D decoder.
        `mesh` (default: the mesh of an active `sharding_context`) splits the work over its devices.
        """
        num_frames = self._check_latent(z, num_frames)
        split = _item_split(mesh)
        if split is not None:
            return self._decode_split(z, num_frames, return_intermediates, *split)
        cfg = self.config
        mfs = cfg.micro_frame_size or num_frames
        mz = cfg.temporal.latent_frames(mfs)
        num_full, rest = divmod(num_frames, mfs)
        scale = self.scale[...].astype(self.dtype)
        shift = self.shift[...].astype(self.dtype)

        def decode_chunk(zc, frames):
            x_z = self.temporal.decode(zc.astype(self.dtype) * scale + shift, frames)
            x = decode_frames(self.spatial, x_z, micro_batch_size=cfg.micro_batch_size)
            return {"video": x, "x_z_dec": x_z} if return_intermediates else x

        out = chunked_apply(
            z,
            size=mz,
            num_full=num_full,
            full_fn=lambda zc, index: decode_chunk(zc, mfs),
            last_fn=lambda zc: decode_chunk(zc, rest),
            axis=1,
        )
        if return_intermediates:
            x = out.pop("video")
            return x, out
        return out

    # ---------------------------------------------------------------- the same, split over a mesh

    def _encode_split(self, video, sample_key, return_intermediates, mesh, rules):
        """`encode` with the 2D VAE split over frames and the temporal VAE over (video, chunk) pairs."""
        cfg = self.config
        b, t = video.shape[:2]
        chunks = _chunks(t, cfg.micro_frame_size or t)
        chunk_keys = [None] * len(chunks)
        if sample_key is not None:
            chunk_keys = [jax.random.split(jax.random.fold_in(sample_key, i)) for i in range(len(chunks))]
        scale = self.scale[...].astype(self.dtype)
        shift = self.shift[...].astype(self.dtype)

        # 2D VAE, frame by frame over all devices; the posterior noise per chunk as `encode_frames` draws it.
        frames = video.astype(self.dtype).reshape((b * t,) + video.shape[2:])
        spatial, temporal = _gathered(self.spatial, mesh), _gathered(self.temporal, mesh)
        moments = sharded_item_map(
            spatial.moments, frames, mesh=mesh, rules=rules, micro=cfg.micro_batch_size, gather=True
        )
        x_z, mean, logvar = diagonal_gaussian(moments.reshape((b, t) + moments.shape[1:]), None)
        if sample_key is not None:
            noise = [_spatial_noise(k[0], (b, n) + mean.shape[2:], cfg.micro_batch_size) for k, (_, n) in
                     zip(chunk_keys, chunks)]
            x_z = gaussian_sample(mean, logvar, jnp.concatenate(noise, axis=1))
        x_z = _whole(x_z * jnp.asarray(SPATIAL_LATENT_SCALE, x_z.dtype), mesh)

        # Temporal VAE over the (video, chunk) pairs: the full chunks together, the short last one alone.
        per_device = ceil_div(b, item_devices(mesh, rules))
        parts = []
        for start, n, count in _chunk_groups(chunks):
            items = x_z[:, start : start + n * count]
            items = items.reshape((b * count, n) + items.shape[2:])
            out = sharded_item_map(temporal.moments, items, mesh=mesh, rules=rules, micro=per_device, gather=True)
            parts.append(out.reshape((b, count * out.shape[1]) + out.shape[2:]))
        sample, mean, logvar = diagonal_gaussian(_whole(jnp.concatenate(parts, axis=1), mesh), None)
        if sample_key is not None:
            lat = [self.config.temporal.latent_frames(n) for _, n in chunks]
            noise = [jax.random.normal(k[1], (b, m) + mean.shape[2:], jnp.float32) for k, m in zip(chunk_keys, lat)]
            sample = gaussian_sample(mean, logvar, jnp.concatenate(noise, axis=1))
        z = _batch_split((sample - shift) / scale, mesh, rules)
        if return_intermediates:
            return z, {"x_z": x_z, "temporal_mean": mean, "temporal_logvar": logvar}
        return z

    def _decode_split(self, z, num_frames, return_intermediates, mesh, rules):
        """`decode` with the temporal VAE split over (video, chunk) pairs and the 2D VAE over frames."""
        cfg = self.config
        b = z.shape[0]
        chunks = _chunks(num_frames, cfg.micro_frame_size or num_frames)
        scale = self.scale[...].astype(self.dtype)
        shift = self.shift[...].astype(self.dtype)
        z = _whole(z.astype(self.dtype) * scale + shift, mesh)

        spatial, temporal = _gathered(self.spatial, mesh), _gathered(self.temporal, mesh)
        per_device = ceil_div(b, item_devices(mesh, rules))
        parts, z_start = [], 0
        for _, n, count in _chunk_groups(chunks):
            m = cfg.temporal.latent_frames(n)
            items = z[:, z_start : z_start + m * count]
            items = items.reshape((b * count, m) + items.shape[2:])
            out = sharded_item_map(
                lambda c, n=n: temporal.decode(c, n), items, mesh=mesh, rules=rules, micro=per_device, gather=True
            )
            parts.append(out.reshape((b, count * n) + out.shape[2:]))
            z_start += m * count
        x_z = _whole(jnp.concatenate(parts, axis=1), mesh)

        frames = x_z.reshape((b * num_frames,) + x_z.shape[2:])
        x = sharded_item_map(
            lambda f: spatial.decode(f / jnp.asarray(SPATIAL_LATENT_SCALE, f.dtype)),
            frames,
            mesh=mesh,
            rules=rules,
            micro=cfg.micro_batch_size,
        )
        x = _batch_split(x.reshape((b, num_frames) + x.shape[1:]), mesh, rules)
        return (x, {"x_z_dec": x_z}) if return_intermediates else x


def _item_split(mesh: Mesh | None):
    """(mesh, rules) when the VAE's work is to be split over `mesh` (or the active context's mesh), else None."""
    from opensora_jax import parallel

    mesh = parallel.current_mesh() if mesh is None else mesh
    if mesh is None:
        return None
    rules = parallel.active_rules()
    return (mesh, rules) if item_devices(mesh, rules) > 1 else None


def _gathered(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """A copy of `module` whose variables are constrained to be whole on every device of `mesh`.

    Work is split over items, so each device needs every weight: gathering the (e.g. fsdp-split) weights
    once, up front, keeps the partitioner from following the weights' channel split into the activations.
    """
    from opensora_jax.parallel import replicated

    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, replicated(mesh)), state)
    return nnx.merge(graphdef, state)


def _whole(x: jax.Array, mesh: Mesh) -> jax.Array:
    """`x` replicated on every device of `mesh`: the small latent-resolution tensors between the two stages,
    so that each stage's split of its items is a local slice and its result one all-gather."""
    from opensora_jax.parallel import replicated

    return jax.lax.with_sharding_constraint(x, replicated(mesh))


def _batch_split(x: jax.Array, mesh: Mesh, rules) -> jax.Array:
    """The result's layout: batch over ("data", "fsdp") where it divides (like any batch array), else replicated."""
    from opensora_jax.parallel import constrain_on

    return constrain_on(x, ("act_batch",) + (None,) * (x.ndim - 1), mesh, rules)


def _chunks(num_frames: int, micro_frame_size: int) -> list[tuple[int, int]]:
    """(first frame, frame count) of each temporal chunk: full chunks of `micro_frame_size`, then the rest."""
    full, rest = divmod(num_frames, micro_frame_size)
    chunks = [(i * micro_frame_size, micro_frame_size) for i in range(full)]
    return chunks + [(full * micro_frame_size, rest)] if rest else chunks


def _chunk_groups(chunks: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(first frame, frames per chunk, number of chunks) of the runs of equal-length chunks."""
    groups: list[list[int]] = []
    for start, n in chunks:
        if groups and groups[-1][1] == n:
            groups[-1][2] += 1
        else:
            groups.append([start, n, 1])
    return [tuple(g) for g in groups]


def _spatial_noise(key: jax.Array, shape: tuple[int, ...], micro_batch_size: int | None) -> jax.Array:
    """The float32 posterior noise `encode_frames(..., key=key)` draws for latents of `shape` (B, T, h, w, L):
    one `normal(fold_in(key, j), ...)` per micro-batch j of the B·T frames, in its order."""
    b, t = shape[:2]
    frame = tuple(shape[2:])
    size, num_full = _micro_batches(b * t, micro_batch_size)
    parts = []
    if num_full:
        keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_full, dtype=jnp.int32))
        noise = jax.vmap(lambda k: jax.random.normal(k, (size,) + frame, jnp.float32))(keys)
        parts.append(noise.reshape((num_full * size,) + frame))
    rest = b * t - num_full * size
    if rest:
        parts.append(jax.random.normal(jax.random.fold_in(key, num_full), (rest,) + frame, jnp.float32))
    return jnp.concatenate(parts, axis=0).reshape(shape)


@nnx.jit(static_argnames=("return_intermediates", "mesh"))
def encode_jit(
    model: OpenSoraVAE,
    video: jax.Array,
    sample_key: jax.Array | None = None,
    return_intermediates=False,
    mesh: Mesh | None = None,
):
    """`model.encode` under `nnx.jit` (the chunk loop runs inside one compiled program)."""
    return model.encode(video, sample_key=sample_key, return_intermediates=return_intermediates, mesh=mesh)


@nnx.jit(static_argnames=("num_frames", "return_intermediates", "mesh"))
def decode_jit(model: OpenSoraVAE, z: jax.Array, num_frames: int, return_intermediates=False, mesh: Mesh | None = None):
    """`model.decode` under `nnx.jit`; recompiles per `num_frames`."""
    return model.decode(z, num_frames, return_intermediates=return_intermediates, mesh=mesh)


def build(
    config: Mapping[str, Any] | OpenSoraVAEConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
    param_dtype=None,
) -> OpenSoraVAE:
    """Creates an `OpenSoraVAE` with random weights from a config dict (reference kwargs) or config."""
    if not isinstance(config, OpenSoraVAEConfig):
        config = OpenSoraVAEConfig.from_dict(config)
    return OpenSoraVAE(
        config, rngs=rngs or nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype if param_dtype is not None else dtype
    )
