"""Open-Sora 2.0's default VAE: the HunyuanVideo causal 3D VAE (`AutoencoderKLCausal3D`) in Flax NNX.

Public layout (channels-last):
  video  (B, T, H, W, 3), values in [-1, 1], T = 1 + f·k (f = 4, the time compression; T = 1 is an image)
  z      (B, 1 + (T − 1)/f, ⌈H/8⌉, ⌈W/8⌉, latent_channels), scaled: z = scale_factor · (x − shift_factor)

`encode` returns the posterior mean (or, with `sample=True`, a draw from it with `key`; logvar clamped to
[−30, 20]) times `scale_factor`; `decode` divides by it, applies `post_quant_conv` and the decoder, giving
1 + f·(T' − 1) frames of 8·H' × 8·W' pixels.

Architecture (the reference's `EncoderCausal3D` / `DecoderCausal3D`):
* every 3×3×3 convolution is causal: replicate-padded by 2 frames at the front of T and by 1 on both sides of
  H and W, then a valid convolution (k = 1 convolutions get no padding);
* ResNet block: GroupNorm → act → conv → GroupNorm → act → conv, plus a 1×1×1 causal conv on the skip when
  the widths differ. GroupNorm statistics span all frames of a video (eps 1e-6);
* down blocks end with a causal conv of stride (2, 2, 2) or (1, 2, 2); up blocks with nearest upsampling
  (frame 0 in H and W only, the other frames in T, H and W) followed by a causal conv: T → 1 + 2(T − 1);
* the mid block is ResNet → attention → ResNet; the attention (one head of width C, GroupNorm'd input,
  residual) runs over all T·H·W positions with a frame-causal mask: a position of frame f sees frames ≤ f;
* `quant_conv` / `post_quant_conv` are plain 1×1×1 convolutions.
Which blocks resample in time and space follows the reference's formulas from `time_compression_ratio`
(4 or 8), `spatial_compression_ratio` and the number of blocks (`block_layout`).

Tiling (as the reference; `tiled=None` follows the config's `use_spatial_tiling` / `use_temporal_tiling`):
* spatial, when H or W exceeds the tile (`sample_size` px for encode, `sample_size / 2^(blocks − 1)` latent
  rows for decode): tiles start every ⌊tile·(1 − overlap)⌋, each covers up to one tile; the outputs are blended
  linearly over ⌊out_tile·overlap⌋ rows with the (already blended) tile above, then columns with the one to the
  left, and each keeps out_tile − blend rows and columns;
* temporal, when T exceeds `sample_tsize` frames (encode) or `sample_tsize / f` latent frames (decode): tiles of
  tile + 1 frames every ⌊tile·(1 − overlap)⌋; every tile after the first drops its first output frame, blends
  with the previous one over ⌊out_tile·overlap⌋ frames and keeps out_tile − blend (the first keeps one more).
  Spatial tiling applies inside each temporal tile.

Execution: the independent work items (one video of the batch, or one video's tile) are grouped by shape and
run `micro_batch_size` at a time (default 1), so the working set is one step's items whatever the number of
videos or tiles. Called eagerly, `encode`/`decode` loop in Python over steps of one jitted function that is
compiled once per item shape and submodule structure (not per batch size, tile count or tiling setting) and
slices its own items; under an outer jit (`encode_jit`/`decode_jit`) the steps are one loop writing into a
preallocated buffer (`chunked_apply`) inside the single program. The tiles are then blended in one jitted
function per tiling layout. On a device mesh (`mesh=` or an active `opensora_jax.parallel.sharding_context`)
the items are split over every device (`sharded_item_map`); the results equal the one-device ones (posterior
samples too: the noise is drawn once, on the assembled posterior).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opensora_jax.errors import UserError
from opensora_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from opensora_jax.models.layers import Dense
from opensora_jax.models.vae.layers import Conv, GroupNorm, activation, chunked_apply, sharded_item_map

NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

# Reference `AutoEncoder3DConfig` fields that do not change the inference maths: where weights come from,
# per-sample slicing (items always run separately here), dropout (inference has none), an unused flag.
_IGNORED_KEYS = ("from_pretrained", "use_slicing", "dropout", "channel", "type")


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig:
    """Architecture and tiling (the reference's `AutoEncoder3DConfig` names and defaults) plus JAX settings."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scale_factor: float = 0.476986
    shift_factor: float = 0.0
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    sample_size: int = 256
    sample_tsize: int = 64
    use_spatial_tiling: bool = False
    use_temporal_tiling: bool = False
    tile_overlap_factor: float = 0.25
    # JAX execution settings (not reference fields).
    attention: str = "auto"  # the mid-block attention's implementation (ATTENTION_IMPLEMENTATIONS)
    micro_batch_size: int | None = 1  # work items (videos or tiles) per device per step; None: all at once

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    @classmethod
    def from_reference(cls, config: Mapping[str, Any], **overrides) -> "HunyuanVAEConfig":
        """A config from `AutoEncoder3DConfig` kwargs (case.json's `config`, a converted directory's config.json).

        Fields without effect at inference (`from_pretrained`, `use_slicing`, `dropout`, `channel`) are accepted
        and ignored; unknown keys raise a UserError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in {**dict(config), **overrides}.items():
            if key in _IGNORED_KEYS or key.startswith("_"):
                continue
            if key not in known:
                unknown.append(key)
                continue
            kwargs[key] = value
        if unknown:
            raise UserError(f"unknown Hunyuan VAE config keys: {sorted(unknown)} (known: {sorted(known)})")
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            raise UserError(f"Hunyuan VAE sample_size must be one integer (square tiles), got {kwargs['sample_size']}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The reference kwargs (plus the JAX settings); `from_reference(to_dict())` gives this config back."""
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        return out

    def validate(self) -> None:
        chans = self.block_out_channels
        if not chans:
            raise UserError("Hunyuan VAE block_out_channels is empty")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "sample_size", "sample_tsize", "spatial_compression_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"Hunyuan VAE {name} must be a positive integer, got {value!r}")
        for c in chans:
            if c < 1 or c % self.norm_num_groups:
                raise UserError(f"Hunyuan VAE: block width {c} is not a positive multiple of "
                                f"norm_num_groups={self.norm_num_groups}")
        if self.time_compression_ratio not in (4, 8):
            raise UserError(f"Hunyuan VAE time_compression_ratio must be 4 or 8 (as the reference), "
                            f"got {self.time_compression_ratio}")
        if not 0.0 <= float(self.tile_overlap_factor) < 1.0:
            raise UserError(f"Hunyuan VAE tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor}")
        if float(self.scale_factor) == 0.0:
            raise UserError("Hunyuan VAE scale_factor must not be 0")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"Hunyuan VAE attention {self.attention!r} unknown; choose one of "
                            f"{ATTENTION_IMPLEMENTATIONS}")
        if self.micro_batch_size is not None and (isinstance(self.micro_batch_size, bool)
                                                  or int(self.micro_batch_size) < 1):
            raise UserError(f"Hunyuan VAE micro_batch_size must be a positive integer or None, "
                            f"got {self.micro_batch_size!r}")
        try:
            activation(self.act_fn)
        except ValueError as e:
            raise UserError(f"Hunyuan VAE act_fn: {e}") from None

    # ------------------------------------------------------------------ derived geometry

    @property
    def tile_latent_size(self) -> int:
        """Latent rows/columns of a spatial tile: the reference's sample_size / 2^(blocks − 1)."""
        return int(self.sample_size / (2 ** (len(self.block_out_channels) - 1)))

    @property
    def tile_latent_tsize(self) -> int:
        return self.sample_tsize // self.time_compression_ratio

    @property
    def time_factor(self) -> int:
        """Actual time compression of the block layout (2 per time-resampling block)."""
        return math.prod(t for t, _ in block_layout(self))

    @property
    def spatial_factor(self) -> int:
        """Actual spatial compression of the block layout (2 per space-resampling block)."""
        return math.prod(s for _, s in block_layout(self))

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latent of a (T, H, W) video without tiling: T' = 1 + (T − 1)/f, H' = ⌈H/8⌉."""
        t, h, w = num_frames, height, width
        for ft, fs in block_layout(self):
            t, h, w = -(-t // ft), -(-h // fs), -(-w // fs)
        return t, h, w

    def num_frames(self, latent_frames: int) -> int:
        """Pixel frames `decode` makes from `latent_frames`: 1 + f·(T' − 1)."""
        return 1 + self.time_factor * (latent_frames - 1)


def block_layout(cfg: HunyuanVAEConfig) -> list[tuple[int, int]]:
    """(time factor, space factor) of each encoder down block (each 1 or 2), in order; the decoder's up block i
    uses the same factors. The reference's rule: space at blocks i < log2(spatial ratio); time at the
    log2(time ratio) blocks before the last (ratio 4) or at the same blocks as space (ratio 8)."""
    n = len(cfg.block_out_channels)
    n_space = int(np.log2(cfg.spatial_compression_ratio))
    n_time = int(np.log2(cfg.time_compression_ratio))
    layout = []
    for i in range(n):
        space = i < n_space
        if cfg.time_compression_ratio == 4:
            time = i >= n - 1 - n_time and i != n - 1
        else:
            time = i < n_space
        layout.append((2 if time else 1, 2 if space else 1))
    return layout


PRESETS: dict[str, dict[str, Any]] = {
    # configs/diffusion/inference/256px.py `ae` (768px.py too): the released hunyuan_vae.safetensors.
    "OpenSora-v2": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, norm_num_groups=32, act_fn="silu", scale_factor=0.476986,
                        shift_factor=0.0, time_compression_ratio=4, spatial_compression_ratio=8,
                        mid_block_add_attention=True, sample_size=256, sample_tsize=64, use_spatial_tiling=True,
                        use_temporal_tiling=False, tile_overlap_factor=0.25),
}


def preset(name: str = "OpenSora-v2", **overrides) -> HunyuanVAEConfig:
    """A released configuration with overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown Hunyuan VAE preset {name!r}; choose one of {sorted(PRESETS)}")
    return HunyuanVAEConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------ layers


class CausalConv3d(nnx.Module):
    """Conv3d over (B, T, H, W, C) after replicate padding: k − 1 frames in front of T, k // 2 on both sides
    of H and W (none for k = 1). Strides (t, h, w); the reference's `<name>.conv` Conv3d is `self.conv`."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, strides=(1, 1, 1), rngs: nnx.Rngs, dtype,
                 param_dtype):
        self.kernel_size = int(kernel_size)
        k = self.kernel_size
        self.conv = Conv(cin, cout, (k, k, k), strides=tuple(strides), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k > 1:
            x = jnp.pad(x.astype(self.conv.dtype), ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)),
                        mode="edge")
        return self.conv(x)


class ResnetBlock(nnx.Module):
    """GroupNorm → act → causal conv3 → GroupNorm → act → causal conv3, plus the (1×1×1-projected) input."""

    def __init__(self, cin: int, cout: int, cfg: HunyuanVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        g = cfg.norm_num_groups
        self.act_fn = cfg.act_fn
        self.norm1 = GroupNorm(g, cin, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(g, cout, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip.astype(h.dtype) + h


def frame_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
    """Single-head attention of (B, T, S, C) queries over all T·S keys of frames ≤ the query's frame.

    One frame of queries at a time (a loop over T): each sees the whole key sequence with the first
    (f + 1)·S keys valid (`key_lengths`), so no key or value is ever copied per frame and the working set is
    one frame's queries against the keys.
    """
    b, t, s, c = q.shape
    keys = k.reshape(b, t * s, 1, c)
    values = v.reshape(b, t * s, 1, c)
    if t == 1:
        return dot_product_attention(q.reshape(b, s, 1, c), keys, values, implementation=implementation
                                     ).reshape(b, t, s, c)

    def frame(args):
        qf, f = args
        lengths = jnp.broadcast_to((f + 1) * s, (b,)).astype(jnp.int32)
        return dot_product_attention(qf[:, :, None, :], keys, values, key_lengths=lengths,
                                     implementation=implementation)[:, :, 0, :]

    out = jax.lax.map(frame, (jnp.moveaxis(q, 1, 0), jnp.arange(t, dtype=jnp.int32)))
    return jnp.moveaxis(out, 0, 1)


class MidAttention(nnx.Module):
    """GroupNorm → q, k, v (C → C) → frame-causal single-head attention → out projection, plus the input."""

    def __init__(self, channels: int, cfg: HunyuanVAEConfig, *, rngs, dtype, param_dtype):
        self.implementation = cfg.attention
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        kw = dict(axes=("conv_in", "conv_out"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = Dense(channels, channels, **kw)
        self.to_k = Dense(channels, channels, **kw)
        self.to_v = Dense(channels, channels, **kw)
        self.to_out = Dense(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, t, h * w, c)
        out = frame_causal_attention(self.to_q(y), self.to_k(y), self.to_v(y), self.implementation)
        out = self.to_out(out).reshape(b, t, h, w, c)
        return out + x.astype(out.dtype)


class MidBlock(nnx.Module):
    """ResNet → attention (if `mid_block_add_attention`) → ResNet."""

    def __init__(self, channels: int, cfg: HunyuanVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, **kw) for _ in range(2)])
        self.attention = MidAttention(channels, cfg, **kw) if cfg.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


def upsample_nearest(x: jax.Array, ft: int, fs: int) -> jax.Array:
    """(B, T, H, W, C) → (B, 1 + ft·(T − 1), fs·H, fs·W, C): frame 0 repeated in H and W only, the other frames
    in T, H and W (nearest)."""
    b, t, h, w, c = x.shape

    def repeat(a, times):  # (B, n, H, W, C) → (B, n·times, fs·H, fs·W, C)
        n = a.shape[1]
        a = jnp.broadcast_to(a[:, :, None, :, None, :, None, :], (b, n, times, h, fs, w, fs, c))
        return a.reshape(b, n * times, h * fs, w * fs, c)

    first = repeat(x[:, :1], 1)
    if t == 1:
        return first
    return jnp.concatenate([first, repeat(x[:, 1:], ft)], axis=1)


class DownBlock(nnx.Module):
    """ResNet blocks, then (if the block resamples) a causal conv of stride (time, space, space)."""

    def __init__(self, cin: int, cout: int, factors: tuple[int, int], cfg: HunyuanVAEConfig, *, rngs, dtype,
                 param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, **kw)
                                 for i in range(cfg.layers_per_block)])
        ft, fs = factors
        self.downsampler = CausalConv3d(cout, cout, 3, strides=(ft, fs, fs), **kw) if ft * fs > 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsampler(x) if self.downsampler is not None else x


class UpBlock(nnx.Module):
    """layers_per_block + 1 ResNet blocks, then (if the block resamples) nearest upsampling and a causal conv."""

    def __init__(self, cin: int, cout: int, factors: tuple[int, int], cfg: HunyuanVAEConfig, *, rngs, dtype,
                 param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, **kw)
                                 for i in range(cfg.layers_per_block + 1)])
        self.factors = tuple(factors)
        self.upsampler = CausalConv3d(cout, cout, 3, **kw) if factors[0] * factors[1] > 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is not None:
            x = self.upsampler(upsample_nearest(x, *self.factors))
        return x


class Encoder(nnx.Module):
    """(B, T, H, W, in_channels) → (B, T', H', W', 2·latent_channels) pre-quant moments."""

    def __init__(self, cfg: HunyuanVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List([DownBlock(chans[max(i - 1, 0)], chans[i], f, cfg, **kw)
                                     for i, f in enumerate(block_layout(cfg))])
        self.mid_block = MidBlock(chans[-1], cfg, **kw)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chans[-1], eps=NORM_EPS, rngs=rngs,
                                       param_dtype=param_dtype)
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # the reference's conv_act is SiLU always


class Decoder(nnx.Module):
    """(B, T', H', W', latent_channels) → (B, 1 + f·(T' − 1), 8·H', 8·W', out_channels)."""

    def __init__(self, cfg: HunyuanVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], cfg, **kw)
        self.up_blocks = nnx.List([UpBlock(rev[max(i - 1, 0)], rev[i], f, cfg, **kw)
                                   for i, f in enumerate(block_layout(cfg))])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ------------------------------------------------------------------------------------------------ posterior


class DiagonalGaussian(NamedTuple):
    """The posterior: channels-last `mean` and `logvar` (clamped to [−30, 20]), unscaled latent units."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar.astype(jnp.float32)).astype(self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std · N(0, 1) noise drawn in float32 with `key` (shape of mean), in mean's dtype."""
        noise = jax.random.normal(key, self.mean.shape, jnp.float32)
        std = jnp.exp(0.5 * self.logvar.astype(jnp.float32))
        return (self.mean.astype(jnp.float32) + std * noise).astype(self.mean.dtype)


# ------------------------------------------------------------------------------------------------ tiling


@dataclasses.dataclass(frozen=True)
class _AxisTiling:
    """One tiled axis: input tiles of `tile` every `stride`; outputs blended over `blend`, `keep` kept each."""

    tile: int
    stride: int
    blend: int
    keep: int

    def spans(self, length: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.tile, length)) for s in range(0, length, self.stride)]


def _axis_tiling(cfg: HunyuanVAEConfig, what: str, tile_in: int, tile_out: int, extra: int) -> _AxisTiling:
    ov = cfg.tile_overlap_factor
    stride, blend = int(tile_in * (1 - ov)), int(tile_out * ov)
    if tile_in < 1 or tile_out < 1 or stride < 1:
        raise UserError(f"Hunyuan VAE {what} tiles of {tile_in} (→ {tile_out}) with overlap {ov} do not advance; "
                        f"raise sample_size / sample_tsize or turn this tiling off")
    return _AxisTiling(tile_in + extra, stride, blend, tile_out - blend)


def _spatial_tiling(cfg: HunyuanVAEConfig, encode: bool) -> _AxisTiling:
    pixel, latent = cfg.sample_size, cfg.tile_latent_size
    return _axis_tiling(cfg, "spatial", *((pixel, latent) if encode else (latent, pixel)), 0)


def _temporal_tiling(cfg: HunyuanVAEConfig, encode: bool) -> _AxisTiling:
    pixel, latent = cfg.sample_tsize, cfg.tile_latent_tsize
    return _axis_tiling(cfg, "temporal", *((pixel, latent) if encode else (latent, pixel)), 1)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """`b` with its first e slices along `axis` replaced by a[-e + y]·(1 − y/e) + b[y]·(y/e), y < e, where
    e = min(len_a, len_b, extent): the reference's linear blend of a tile with its predecessor."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return b
    y = np.arange(e, dtype=np.float64) / e
    shape = [1] * b.ndim
    shape[axis] = e
    w_b = jnp.asarray(y.astype(np.float32).reshape(shape))
    w_a = jnp.asarray((1.0 - y).astype(np.float32).reshape(shape))
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis).astype(jnp.float32)
    b_head = jax.lax.slice_in_dim(b, 0, e, axis=axis).astype(jnp.float32)
    mixed = (a_tail * w_a + b_head * w_b).astype(b.dtype)
    return jax.lax.dynamic_update_slice_in_dim(b, mixed, 0, axis=axis)


def _blend_grid(grid: list[list[jax.Array]], tiling: _AxisTiling) -> jax.Array:
    """Spatial assembly of (B, T, h, w, C) tiles in rows × columns: each tile blended with the final tile
    above (H) and then the final one to its left (W), cropped to `keep` × `keep`, concatenated."""
    final: list[list[jax.Array]] = []
    rows = []
    for i, row in enumerate(grid):
        done = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(final[i - 1][j], tile, tiling.blend, axis=2)
            if j > 0:
                tile = _blend(done[j - 1], tile, tiling.blend, axis=3)
            done.append(tile)
        final.append(done)
        rows.append(jnp.concatenate([t[:, :, : tiling.keep, : tiling.keep] for t in done], axis=3))
    return jnp.concatenate(rows, axis=2)


def _blend_time(tiles: list[jax.Array], tiling: _AxisTiling) -> jax.Array:
    """Temporal assembly of (B, t, H, W, C) tiles: every tile after the first drops its first frame and is
    blended with the previous (final) tile; the first keeps `keep` + 1 frames, the others `keep`."""
    final, kept = [], []
    for k, tile in enumerate(tiles):
        if k == 0:
            kept.append(tile[:, : tiling.keep + 1])
        else:
            tile = _blend(final[k - 1], tile[:, 1:], tiling.blend, axis=1)
            kept.append(tile[:, : tiling.keep])
        final.append(tile)
    return jnp.concatenate(kept, axis=1)


@dataclasses.dataclass(frozen=True)
class _TilePlan:
    """Static tiling of one (B, T, H, W, C) input: the spans of each axis and the tiles grouped by shape.

    `groups` holds (tile shape (t, h, w), members ((temporal index, row, column), ...)) in first-seen order."""

    t_spans: tuple[tuple[int, int], ...]
    h_spans: tuple[tuple[int, int], ...]
    w_spans: tuple[tuple[int, int], ...]
    groups: tuple[tuple[tuple[int, int, int], tuple[tuple[int, int, int], ...]], ...]
    s_tiling: _AxisTiling | None
    t_tiling: _AxisTiling | None

    @classmethod
    def make(cls, t: int, h: int, w: int, s_tiling, t_tiling) -> "_TilePlan":
        t_spans = t_tiling.spans(t) if t_tiling else [(0, t)]
        # A later temporal tile of one frame yields one output frame, which is dropped: skip it.
        t_spans = [span for k, span in enumerate(t_spans) if k == 0 or span[1] - span[0] > 1]
        h_spans = s_tiling.spans(h) if s_tiling else [(0, h)]
        w_spans = s_tiling.spans(w) if s_tiling else [(0, w)]
        groups: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        for k, (t0, t1) in enumerate(t_spans):
            for i, (h0, h1) in enumerate(h_spans):
                for j, (w0, w1) in enumerate(w_spans):
                    groups.setdefault((t1 - t0, h1 - h0, w1 - w0), []).append((k, i, j))
        return cls(tuple(t_spans), tuple(h_spans), tuple(w_spans),
                   tuple((shape, tuple(members)) for shape, members in groups.items()), s_tiling, t_tiling)

    def starts(self, members) -> np.ndarray:
        """(n, 3) int32 (t, h, w) corners of the member tiles."""
        return np.asarray([(self.t_spans[k][0], self.h_spans[i][0], self.w_spans[j][0]) for k, i, j in members],
                          np.int32)


@functools.partial(jax.jit, static_argnames=("shape",))
def _take_tiles(x: jax.Array, starts: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Tiles of `shape` (t, h, w) at the (n, 3) `starts` of x (B, T, H, W, C) as items (n·B, t, h, w, C)."""
    b, c = x.shape[0], x.shape[-1]

    def one(start):
        return jax.lax.dynamic_slice(x, (0, start[0], start[1], start[2], 0), (b,) + tuple(shape) + (c,))

    tiles = jax.vmap(one)(starts)
    return tiles.reshape((starts.shape[0] * b,) + tiles.shape[2:])


@functools.partial(jax.jit, static_argnames=("shape",))
def _take_items(x: jax.Array, videos: jax.Array, starts: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Items (n, t, h, w, C): the tile of `shape` at starts[i] of video videos[i] of x (B, T, H, W, C)."""
    c = x.shape[-1]

    def one(b, start):
        return jax.lax.dynamic_slice(x, (b, start[0], start[1], start[2], 0), (1,) + tuple(shape) + (c,))[0]

    return jax.vmap(one)(videos, starts)


@functools.partial(jax.jit, static_argnames=("plan", "batch"))
def _assemble(pieces: tuple[tuple[jax.Array, ...], ...], plan: _TilePlan, batch: int) -> jax.Array:
    """Blends the work items' outputs back into one (B, T', H', W', C'). `pieces` holds, per group of `plan`, its
    outputs in item order (member-major, then video) split into any number of consecutive chunks."""
    tiles: dict[tuple[int, int, int], jax.Array] = {}
    for (_, members), parts in zip(plan.groups, pieces):
        y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        y = y.reshape((len(members), batch) + y.shape[1:])
        for index, member in enumerate(members):
            tiles[member] = y[index]
    if plan.s_tiling is None and plan.t_tiling is None:
        return tiles[(0, 0, 0)]
    per_time = []
    for k in range(len(plan.t_spans)):
        grid = [[tiles[(k, i, j)] for j in range(len(plan.w_spans))] for i in range(len(plan.h_spans))]
        per_time.append(_blend_grid(grid, plan.s_tiling) if plan.s_tiling else grid[0][0])
    return _blend_time(per_time, plan.t_tiling) if plan.t_tiling else per_time[0]


# ------------------------------------------------------------------------------------------------ model


class HunyuanVAE(nnx.Module):
    """The Hunyuan causal 3D VAE, channels-last. Variables mirror the reference's module tree."""

    def __init__(self, config: HunyuanVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        lat = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = Conv(2 * lat, 2 * lat, (1, 1, 1), **kw)
        self.post_quant_conv = Conv(lat, lat, (1, 1, 1), **kw)

    # ---------------------------------------------------------------- sizes and checks

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.config.latent_size(num_frames, height, width)

    def _check(self, x, what: str, channels: int, letters: str) -> None:
        shape = tuple(x.shape)
        layout = f"(B, {letters}, {channels})"
        hint = ""
        if len(shape) == 5 and shape[1] == channels and shape[-1] != channels:
            hint = " (it looks channels-first (B, C, T, H, W); move the channel axis last)"
        if len(shape) != 5 or shape[-1] != channels:
            raise UserError(f"{what} expects a {'video' if what == 'encode' else 'latent'} {layout} channels-last, "
                            f"got shape {shape}{hint}")
        if min(shape[:4]) < 1:
            raise UserError(f"{what} needs a non-empty {layout} input, got shape {shape}")
        if what == "encode":
            f = self.config.time_factor
            if (shape[1] - 1) % f:
                raise UserError(f"encode needs T = 1 + {f}k frames in the video {layout} (causal time compression "
                                f"{f}: 1, {1 + f}, {1 + 2 * f}, ...), got T = {shape[1]} in shape {shape}")

    def _tiling_modes(self, tiled) -> tuple[bool, bool]:
        if tiled is None:
            return bool(self.config.use_spatial_tiling), bool(self.config.use_temporal_tiling)
        if isinstance(tiled, (bool, np.bool_)):
            return bool(tiled), bool(tiled)
        if isinstance(tiled, (tuple, list)) and len(tiled) == 2:
            return bool(tiled[0]), bool(tiled[1])
        raise ValueError(f"tiled must be None, a bool or (spatial, temporal), got {tiled!r}")

    # ---------------------------------------------------------------- public API

    def encode(self, video: jax.Array, *, sample: bool = False, key: jax.Array | None = None, tiled=None,
               return_posterior: bool = False, mesh: Mesh | None = None):
        """Video (B, T, H, W, in_channels) in [−1, 1] → scaled latent (B, T', H', W', latent_channels).

        The posterior mean by default; `sample=True` draws from the posterior with `key`. `tiled`: None = the
        config's (use_spatial_tiling, use_temporal_tiling), a bool for both, or a (spatial, temporal) pair.
        `return_posterior=True` returns (z, DiagonalGaussian) (mean and clamped logvar, before scaling).
        `mesh` (default: the active `sharding_context`'s) splits the work items over its devices.
        """
        self._check(video, "encode", self.config.in_channels, "T, H, W")
        if sample and key is None:
            raise ValueError("encode(sample=True) needs a PRNG key")
        spatial, temporal = self._tiling_modes(tiled)
        cfg = self.config
        _, t, h, w, _ = video.shape
        s_tiling = _spatial_tiling(cfg, True) if spatial and (h > cfg.sample_size or w > cfg.sample_size) else None
        t_tiling = _temporal_tiling(cfg, True) if temporal and t > cfg.sample_tsize else None
        split = _split(mesh)
        moments = self._tiled(video.astype(self.dtype), "encode", s_tiling, t_tiling, split)
        posterior = DiagonalGaussian.from_moments(moments)
        latent = posterior.sample(key) if sample else posterior.mode()
        scale = jnp.asarray(cfg.scale_factor, latent.dtype)
        z = scale * (latent - jnp.asarray(cfg.shift_factor, latent.dtype))
        if split is not None:
            z = _batch_split(z, *split)
        return (z, posterior) if return_posterior else z

    def decode(self, z: jax.Array, *, tiled=None, mesh: Mesh | None = None) -> jax.Array:
        """Scaled latent (B, T', H', W', latent_channels) → video (B, 1 + f·(T' − 1), 8·H', 8·W', out_channels).

        `tiled` and `mesh` as in `encode`."""
        self._check(z, "decode", self.config.latent_channels, "T', H', W'")
        spatial, temporal = self._tiling_modes(tiled)
        cfg = self.config
        _, t, h, w, _ = z.shape
        s_tiling = (_spatial_tiling(cfg, False)
                    if spatial and (h > cfg.tile_latent_size or w > cfg.tile_latent_size) else None)
        t_tiling = _temporal_tiling(cfg, False) if temporal and t > cfg.tile_latent_tsize else None
        z = z.astype(self.dtype)
        z = z / jnp.asarray(cfg.scale_factor, z.dtype) + jnp.asarray(cfg.shift_factor, z.dtype)
        split = _split(mesh)
        x = self._tiled(z, "decode", s_tiling, t_tiling, split)
        return x if split is None else _batch_split(x, *split)

    # ---------------------------------------------------------------- work items

    def _parts(self, kind: str) -> tuple[nnx.Module, nnx.Module]:
        """The two submodules a work item runs through: (encoder, quant_conv) or (post_quant_conv, decoder). Only
        these go into the compiled step, so its cache does not depend on the tiling settings of the config."""
        return (self.encoder, self.quant_conv) if kind == "encode" else (self.post_quant_conv, self.decoder)

    def _run_group(self, kind: str, x: jax.Array, plan: _TilePlan, shape, members, split) -> tuple[jax.Array, ...]:
        """The work items of one group (its member tiles × the B videos, member-major) through `_parts(kind)`,
        `micro_batch_size` items (per device) at a time; returns the outputs as consecutive chunks.

        Traced (inside jit): one loop writing into a preallocated output (`chunked_apply`), or `sharded_item_map`
        on a mesh. Eager: a Python loop over steps of one jitted function, compiled once per item shape (whatever
        the batch size or the number of tiles) and reused by every later call; each step slices its own items,
        so no stacked copy of the tiles is made."""
        b = x.shape[0]
        whole = shape == x.shape[1:4]
        n = len(members) * b
        micro = self.config.micro_batch_size
        size = n if not micro else min(int(micro), n)
        first, second = self._parts(kind)
        traced = isinstance(x, jax.core.Tracer)
        if split is not None or traced:
            items = x if whole else _take_tiles(x, jnp.asarray(plan.starts(members)), shape=shape)
            if split is not None:
                mesh, rules = split
                if traced:
                    return (_split_items(first, second, items, micro, mesh, rules),)
                return (_split_items_jit(first, second, items, micro=micro, mesh=mesh, rules=tuple(rules.items())),)
            fn = functools.partial(_chain, first, second)
            return (chunked_apply(items, size=size, num_full=n // size, full_fn=lambda c, i: fn(c), last_fn=fn,
                                  axis=0),)
        if whole and size == n:
            return (_chain_jit(first, second, x),)
        videos = np.tile(np.arange(b, dtype=np.int32), len(members))
        starts = np.repeat(plan.starts(members), b, axis=0)
        steps = []
        for i in range(0, n, size):
            j = min(i + size, n)
            if whole:
                items = jax.lax.dynamic_slice_in_dim(x, jnp.int32(i), j - i)
            else:
                items = _take_items(x, jnp.asarray(videos[i:j]), jnp.asarray(starts[i:j]), shape=shape)
            steps.append(_chain_jit(first, second, items))
        return tuple(steps)

    def _tiled(self, x: jax.Array, kind: str, s_tiling: _AxisTiling | None, t_tiling: _AxisTiling | None, split):
        """`_parts(kind)` over x (B, T, H, W, C) with the reference's spatial / temporal tiling and blending.

        The (temporal tile, row, column) tiles of every video are grouped by shape; each group's items run through
        `_run_group` (one compiled step per tile shape), then the tiles are blended back together (`_assemble`)."""
        b, t, h, w, _ = x.shape
        plan = _TilePlan.make(t, h, w, s_tiling, t_tiling)
        pieces = tuple(self._run_group(kind, x, plan, shape, members, split) for shape, members in plan.groups)
        if len(pieces) == 1 and len(pieces[0]) == 1 and plan.s_tiling is None and plan.t_tiling is None:
            return pieces[0][0]
        return _assemble(pieces, plan=plan, batch=b)


# ------------------------------------------------------------------------------------------------ mesh helpers


def _split(mesh: Mesh | None):
    """(mesh, rules) when the work items are to be split over `mesh` (or the active context's mesh), else None."""
    from opensora_jax.models.vae.opensora_v1_2 import _item_split

    return _item_split(mesh)


def _gathered(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    from opensora_jax.models.vae.opensora_v1_2 import _gathered as gathered

    return gathered(module, mesh)


def _chain(first: nnx.Module, second: nnx.Module, items: jax.Array) -> jax.Array:
    return second(first(items))


@nnx.jit
def _chain_jit(first: nnx.Module, second: nnx.Module, items: jax.Array) -> jax.Array:
    """One eager step of `HunyuanVAE._map`: compiled once per (submodule structure, item shape)."""
    return second(first(items))


def _split_items(first, second, items: jax.Array, micro, mesh: Mesh, rules) -> jax.Array:
    """The items split over every device of `mesh` (weights gathered once), results replicated."""
    first, second = _gathered(first, mesh), _gathered(second, mesh)
    return sharded_item_map(functools.partial(_chain, first, second), items, mesh=mesh, rules=rules, micro=micro,
                            gather=True)


@nnx.jit(static_argnames=("micro", "mesh", "rules"))
def _split_items_jit(first, second, items: jax.Array, micro, mesh: Mesh, rules: tuple) -> jax.Array:
    return _split_items(first, second, items, micro, mesh, dict(rules))


def _batch_split(x: jax.Array, mesh: Mesh, rules) -> jax.Array:
    from opensora_jax.models.vae.opensora_v1_2 import _batch_split as batch_split

    return batch_split(x, mesh, rules)


# ------------------------------------------------------------------------------------------------ entry points


@nnx.jit(static_argnames=("sample", "tiled", "return_posterior", "mesh"))
def encode_jit(model: HunyuanVAE, video: jax.Array, key: jax.Array | None = None, *, sample: bool = False,
               tiled=None, return_posterior: bool = False, mesh: Mesh | None = None):
    """`model.encode` under `nnx.jit` (recompiles per input shape and static option)."""
    return model.encode(video, sample=sample, key=key, tiled=tiled, return_posterior=return_posterior, mesh=mesh)


@nnx.jit(static_argnames=("tiled", "mesh"))
def decode_jit(model: HunyuanVAE, z: jax.Array, *, tiled=None, mesh: Mesh | None = None) -> jax.Array:
    """`model.decode` under `nnx.jit` (recompiles per latent shape and static option)."""
    return model.decode(z, tiled=tiled, mesh=mesh)


def build(cfg: HunyuanVAEConfig | Mapping[str, Any], rngs: nnx.Rngs | None = None, param_dtype=None,
          compute_dtype=None) -> HunyuanVAE:
    """The model for `cfg` (a config or reference kwargs); dtypes None = float32 (compute: the param dtype)."""
    if not isinstance(cfg, HunyuanVAEConfig):
        cfg = HunyuanVAEConfig.from_reference(cfg)
    param = jnp.dtype(param_dtype) if param_dtype is not None else jnp.dtype(jnp.float32)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else param
    return HunyuanVAE(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=compute, param_dtype=param)
