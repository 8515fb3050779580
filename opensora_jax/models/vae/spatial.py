"""Spatial (per-frame) VAE of Open-Sora v1.2: the diffusers `AutoencoderKL` architecture in NNX.

Layout: channels-last throughout. Images are (N, H, W, C); videos (B, T, H, W, C) are encoded
frame by frame (`encode_frames` / `decode_frames`), in micro-batches of frames.

Architecture (diffusers 0.27.2 `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`):
encoder = conv_in → down blocks (ResNet blocks, then a stride-2 conv after every block but the
last) → mid block (ResNet, single-head self-attention, ResNet) → GroupNorm → SiLU → conv_out
(2·latent channels); quant_conv (1×1) gives the posterior moments. The decoder mirrors it with
`layers_per_block + 1` ResNet blocks per up block and nearest-×2 upsampling followed by a 3×3 conv.
All GroupNorms use eps 1e-6.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from opensora_jax.models.layers import Dense
from opensora_jax.models.vae.layers import Conv, GroupNorm, activation, chunked_apply, diagonal_gaussian

# Open-Sora hard-codes this latent scale for the 2D VAE (the SDXL-VAE config says 0.13025; unused).
SPATIAL_LATENT_SCALE = 0.18215
NORM_EPS = 1e-6

# Config keys that do not change the architecture (diffusers bookkeeping, tiling, latent statistics).
_IGNORED_KEYS = {
    "class",
    "type",
    "diffusers_version",
    "sample_size",
    "scaling_factor",
    "force_upcast",
    "latents_mean",
    "latents_std",
    "from_pretrained",
    "subfolder",
    "micro_batch_size",
    "local_files_only",
    "cache_dir",
}


@dataclasses.dataclass(frozen=True)
class SpatialVAEConfig:
    """Architecture of the 2D VAE, with the diffusers `AutoencoderKL` kwarg names and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # JAX execution setting (not a diffusers kwarg): the mid-block attention's implementation.
    attention: str = "auto"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SpatialVAEConfig":
        """Builds the config from diffusers-style kwargs; rejects block types and keys it does not know."""
        config = dict(config)
        blocks = tuple(int(c) for c in config.pop("block_out_channels", cls.block_out_channels))
        for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = config.pop(key, None)
            if types is None:
                continue
            if len(types) != len(blocks):
                raise ValueError(f"vae_2d.{key} has {len(types)} entries but block_out_channels has {len(blocks)}")
            if any(t != expected for t in types):
                raise ValueError(f"vae_2d.{key} must all be {expected!r}, got {list(types)}")
        kwargs = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS and not key.startswith("_"):
                raise ValueError(f"vae_2d config key {key!r} is not supported (known: {sorted(fields)})")
        cfg = cls(block_out_channels=blocks, **kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"vae_2d.attention {self.attention!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
        if not self.block_out_channels:
            raise ValueError("vae_2d.block_out_channels is empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"vae_2d: block width {c} is not a multiple of norm_num_groups={self.norm_num_groups}")
        activation(self.act_fn)

    @property
    def downsample_factor(self) -> int:
        """Spatial compression: one stride-2 conv per block except the last."""
        return 2 ** (len(self.block_out_channels) - 1)


def _conv3x3(cin: int, cout: int, *, rngs, dtype, param_dtype, strides=(1, 1), padding=((1, 1), (1, 1))) -> Conv:
    return Conv(cin, cout, (3, 3), strides=strides, padding=padding, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock2D(nnx.Module):
    """GroupNorm → act → conv3×3 → GroupNorm → act → conv3×3, plus a (1×1-projected if widths differ) skip."""

    def __init__(self, cin: int, cout: int, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        g = cfg.norm_num_groups
        self.act_fn = cfg.act_fn
        self.norm1 = GroupNorm(g, cin, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv1 = _conv3x3(cin, cout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = GroupNorm(g, cout, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = _conv3x3(cout, cout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_shortcut = (
            Conv(cin, cout, (1, 1), rngs=rngs, dtype=dtype, param_dtype=param_dtype) if cin != cout else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip.astype(h.dtype) + h


class MidAttention2D(nnx.Module):
    """Single-head self-attention over the H·W positions of each image, with GroupNorm and a residual."""

    def __init__(self, channels: int, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.channels = channels
        self.implementation = cfg.attention
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        kw = dict(axes=("conv_in", "conv_out"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = Dense(channels, channels, **kw)
        self.to_k = Dense(channels, channels, **kw)
        self.to_v = Dense(channels, channels, **kw)
        self.to_out = Dense(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        t = self.group_norm(x).reshape(n, h * w, c)
        q, k, v = (proj(t)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))  # (n, HW, 1 head, c)
        out = self.to_out(dot_product_attention(q, k, v, implementation=self.implementation)[:, :, 0])
        return out.reshape(n, h, w, c) + x.astype(out.dtype)


class MidBlock2D(nnx.Module):
    """ResNet → attention (optional) → ResNet at the lowest resolution."""

    def __init__(self, channels: int, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg, **kw) for _ in range(2)])
        self.attention = MidAttention2D(channels, cfg, **kw) if cfg.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """ResNet blocks, then (unless last) zero-pad bottom/right by 1 and a 3×3 stride-2 conv: n → ⌊n/2⌋."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(num_layers)]
        )
        self.downsample = (
            _conv3x3(cout, cout, strides=(2, 2), padding=((0, 1), (0, 1)), **kw) if add_downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x) if self.downsample is not None else x


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """(N, H, W, C) → (N, 2H, 2W, C), each pixel repeated 2×2."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


class UpDecoderBlock2D(nnx.Module):
    """ResNet blocks, then (unless last) nearest ×2 upsampling and a 3×3 conv."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(num_layers)]
        )
        self.upsample = _conv3x3(cout, cout, **kw) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(upsample_nearest2x(x))
        return x


class Encoder2D(nnx.Module):
    """(N, H, W, in_channels) → (N, H/f, W/f, 2·latent_channels) pre-quant moments."""

    def __init__(self, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = cfg.block_out_channels
        self.conv_in = _conv3x3(cfg.in_channels, chans[0], **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, i < len(chans) - 1, cfg, **kw
                )
                for i in range(len(chans))
            ]
        )
        self.mid_block = MidBlock2D(chans[-1], cfg, **kw)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chans[-1], eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = _conv3x3(chans[-1], 2 * cfg.latent_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        # diffusers applies a plain SiLU here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder2D(nnx.Module):
    """(N, h, w, latent_channels) → (N, h·f, w·f, out_channels)."""

    def __init__(self, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = _conv3x3(cfg.latent_channels, rev[0], **kw)
        self.mid_block = MidBlock2D(rev[0], cfg, **kw)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i < len(rev) - 1, cfg, **kw)
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = _conv3x3(rev[-1], cfg.out_channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The 2D KL autoencoder on images (N, H, W, C), channels-last. No latent scaling here."""

    def __init__(self, cfg: SpatialVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg.validate()
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        lat = cfg.latent_channels
        self.encoder = Encoder2D(cfg, **kw)
        self.decoder = Decoder2D(cfg, **kw)
        self.quant_conv = Conv(2 * lat, 2 * lat, (1, 1), **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(lat, lat, (1, 1), **kw) if cfg.use_post_quant_conv else None

    def moments(self, x: jax.Array) -> jax.Array:
        """Images (N, H, W, in_channels) → posterior moments (N, ⌊H/f⌋, ⌊W/f⌋, 2·latent): [mean | logvar]."""
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (N, h, w, latent_channels) → images (N, h·f, w·f, out_channels)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _flatten_frames(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _micro_batches(n: int, micro_batch_size: int | None) -> tuple[int, int]:
    size = n if not micro_batch_size else min(int(micro_batch_size), n)
    return size, n // size


def encode_frames(
    vae: AutoencoderKL,
    video: jax.Array,
    *,
    micro_batch_size: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Per-frame 2D encoding of video (B, T, H, W, C) → latents (B, T, H/f, W/f, L), times 0.18215.

    Frames are processed `micro_batch_size` at a time (memory only; the result does not depend on
    it). `key=None` returns the posterior mean; with a key the posterior is sampled, as the reference.
    """
    b, t = video.shape[:2]
    frames = _flatten_frames(video)
    size, num_full = _micro_batches(frames.shape[0], micro_batch_size)

    def encode(x, index):
        sub = None if key is None else jax.random.fold_in(key, index)
        sample, _, _ = diagonal_gaussian(vae.moments(x), sub)
        return sample * jnp.asarray(SPATIAL_LATENT_SCALE, sample.dtype)

    z = chunked_apply(
        frames, size=size, num_full=num_full, full_fn=encode, last_fn=lambda x: encode(x, num_full), axis=0
    )
    return z.reshape((b, t) + z.shape[1:])


def decode_frames(vae: AutoencoderKL, z: jax.Array, *, micro_batch_size: int | None = None) -> jax.Array:
    """Per-frame 2D decoding of latents (B, T, h, w, L) (scaled by 0.18215) → video (B, T, h·f, w·f, C)."""
    b, t = z.shape[:2]
    frames = _flatten_frames(z)
    size, num_full = _micro_batches(frames.shape[0], micro_batch_size)

    def decode(x, index=None):
        return vae.decode(x / jnp.asarray(SPATIAL_LATENT_SCALE, x.dtype))

    x = chunked_apply(frames, size=size, num_full=num_full, full_fn=decode, last_fn=decode, axis=0)
    return x.reshape((b, t) + x.shape[1:])
