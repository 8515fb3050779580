"""Temporal VAE of Open-Sora v1.2 (`VAE_Temporal`): causal 3D convolutions that compress time only.

Layout: channels-last, (B, T, H, W, C). H and W are never resampled; T shrinks by
2^(number of True entries in `temporal_downsample`) in the encoder and grows back in the decoder.

Facts this module reproduces:
* causal conv: zeros are padded in time at the FRONT only, `(kt-1) + (1-stride)` frames, and
  `k//2` on both sides of H and W;
* encoder downsampling is a causal 3×3×3 conv with time stride 2;
* decoder upsampling is a causal conv to 2·C channels followed by depth-to-time, where output
  channel `c·2 + s` becomes channel c of frame `2t + s`;
* GroupNorm eps 1e-5 (PyTorch default), posterior logvar clamped to [-30, 20];
* encode front-pads the input with zero frames to a multiple of the time factor, decode crops
  the same number of leading frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.models.vae.layers import Conv, GroupNorm, activation, ceil_div

NORM_EPS = 1e-5

_IGNORED_KEYS = {"class", "type", "from_pretrained"}


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
    """Architecture of the temporal VAE, with the reference's `VAE_Temporal` kwarg names and defaults."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (True, True, False)
    num_groups: int = 32
    activation_fn: str = "swish"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "TemporalVAEConfig":
        """Builds the config from `VAE_Temporal` kwargs; `type="VAE_Temporal_SD"` alone gives the released one."""
        config = dict(config)
        base = cls.sd_preset() if config.get("type") == "VAE_Temporal_SD" else cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS and not key.startswith("_"):
                raise ValueError(f"vae_temporal config key {key!r} is not supported (known: {sorted(fields)})")
        if "channel_multipliers" in kwargs:
            kwargs["channel_multipliers"] = tuple(int(m) for m in kwargs["channel_multipliers"])
        if "temporal_downsample" in kwargs:
            kwargs["temporal_downsample"] = tuple(bool(d) for d in kwargs["temporal_downsample"])
        cfg = dataclasses.replace(base, **kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def sd_preset(cls) -> "TemporalVAEConfig":
        """`VAE_Temporal_SD`: the configuration released with Open-Sora v1.2."""
        return cls(
            in_out_channels=4,
            latent_embed_dim=4,
            embed_dim=4,
            filters=128,
            num_res_blocks=4,
            channel_multipliers=(1, 2, 2, 4),
            temporal_downsample=(False, True, True),
        )

    def validate(self) -> None:
        n = len(self.channel_multipliers)
        if n == 0:
            raise ValueError("vae_temporal.channel_multipliers is empty")
        if len(self.temporal_downsample) < n - 1:
            raise ValueError(
                f"vae_temporal.temporal_downsample needs {n - 1} entries for {n} channel multipliers, "
                f"got {list(self.temporal_downsample)}"
            )
        for m in self.channel_multipliers:
            if (self.filters * m) % self.num_groups:
                raise ValueError(
                    f"vae_temporal: width {self.filters * m} is not a multiple of num_groups={self.num_groups}"
                )
        if self.activation_fn not in ("swish", "relu"):
            raise ValueError(f"vae_temporal.activation_fn must be 'swish' or 'relu', got {self.activation_fn!r}")

    @property
    def time_downsample_factor(self) -> int:
        # Like the reference, counts every True entry (entries past the last block included).
        return 2 ** sum(bool(d) for d in self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` input frames: ceil(T / factor) (front zero padding)."""
        return ceil_div(num_frames, self.time_downsample_factor)


class CausalConv3d(nnx.Module):
    """Conv3d over (B, T, H, W, C) padded causally in time (front only) and symmetrically in H, W.

    Kernel (kt, kh, kw, C_in, C_out); time stride `t_stride`, spatial stride 1.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | Sequence[int],
        *,
        rngs: nnx.Rngs,
        t_stride: int = 1,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd spatial kernel sizes, got {(kt, kh, kw)}")
        padding = ((kt - 1 + 1 - t_stride, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        self.conv = Conv(
            cin,
            cout,
            (kt, kh, kw),
            strides=(t_stride, 1, 1),
            padding=padding,
            use_bias=use_bias,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class ResBlock3D(nnx.Module):
    """GroupNorm → act → causal conv3 → GroupNorm → act → causal conv3 (no biases), plus a skip that a
    bias-free 1×1×1 causal conv projects when the widths differ."""

    def __init__(self, cin: int, cout: int, cfg: TemporalVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        g = cfg.num_groups
        self.act_fn = cfg.activation_fn
        self.norm1 = GroupNorm(g, cin, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(g, cout, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.conv3 = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        skip = self.conv3(x) if self.conv3 is not None else x
        return h + skip.astype(h.dtype)


def depth_to_time(x: jax.Array, factor: int) -> jax.Array:
    """(B, T, H, W, C·factor) → (B, T·factor, H, W, C); channel c·factor + s goes to frame t·factor + s."""
    b, t, h, w, cf = x.shape
    c = cf // factor
    x = x.reshape(b, t, h, w, c, factor)
    x = jnp.moveaxis(x, 5, 2)  # (B, T, factor, H, W, C)
    return x.reshape(b, t * factor, h, w, c)


class TemporalEncoder(nnx.Module):
    """(B, T, H, W, in_out_channels) → (B, T/factor, H, W, 2·latent_embed_dim)."""

    def __init__(self, cfg: TemporalVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = cfg.activation_fn
        n = len(cfg.channel_multipliers)
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, use_bias=False, **kw)
        blocks, convs = [], []
        prev = cfg.filters
        for i in range(n):
            width = cfg.filters * cfg.channel_multipliers[i]
            level = []
            for _ in range(cfg.num_res_blocks):
                level.append(ResBlock3D(prev, width, cfg, **kw))
                prev = width
            blocks.append(nnx.List(level))
            if i < n - 1:
                # The reference keeps an identity at levels without time downsampling (index kept).
                convs.append(CausalConv3d(prev, width, 3, t_stride=2, **kw) if cfg.temporal_downsample[i] else None)
                prev = width
        self.block_res_blocks = nnx.List(blocks)
        self.conv_blocks = nnx.List(convs)
        self.res_blocks = nnx.List([ResBlock3D(prev, prev, cfg, **kw) for _ in range(cfg.num_res_blocks)])
        self.norm1 = GroupNorm(cfg.num_groups, prev, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                x = block(x)
            if i < len(self.conv_blocks) and self.conv_blocks[i] is not None:
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(activation(self.act_fn)(self.norm1(x)))


class TemporalDecoder(nnx.Module):
    """(B, L, H, W, latent_embed_dim) → (B, L·factor, H, W, in_out_channels)."""

    def __init__(self, cfg: TemporalVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = cfg.activation_fn
        n = len(cfg.channel_multipliers)
        top = cfg.filters * cfg.channel_multipliers[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3, **kw)
        self.res_blocks = nnx.List([ResBlock3D(top, top, cfg, **kw) for _ in range(cfg.num_res_blocks)])
        blocks: list = [None] * n
        convs: list = [None] * (n - 1)
        prev = top
        for i in reversed(range(n)):
            width = cfg.filters * cfg.channel_multipliers[i]
            level = []
            for _ in range(cfg.num_res_blocks):
                level.append(ResBlock3D(prev, width, cfg, **kw))
                prev = width
            blocks[i] = nnx.List(level)
            if i > 0 and cfg.temporal_downsample[i - 1]:
                convs[i - 1] = CausalConv3d(prev, 2 * prev, 3, **kw)
        self.block_res_blocks = nnx.List(blocks)
        self.conv_blocks = nnx.List(convs)
        self.norm1 = GroupNorm(cfg.num_groups, prev, eps=NORM_EPS, rngs=rngs, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0 and self.conv_blocks[i - 1] is not None:
                x = depth_to_time(self.conv_blocks[i - 1](x), 2)
        return self.conv_out(activation(self.act_fn)(self.norm1(x)))


class TemporalVAE(nnx.Module):
    """Causal temporal VAE on 2D-VAE latents (B, T, H, W, C), channels-last."""

    def __init__(self, cfg: TemporalVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg.validate()
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = TemporalEncoder(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1, **kw)
        self.decoder = TemporalDecoder(cfg, **kw)

    def moments(self, x: jax.Array) -> jax.Array:
        """(B, T, H, W, C) → posterior moments (B, ceil(T/f), H, W, 2·embed_dim) = [mean | logvar].

        Zero frames are prepended so that T becomes a multiple of the time factor f.
        """
        f = self.config.time_downsample_factor
        pad = (-x.shape[1]) % f
        if pad:
            x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
        return self.quant_conv(self.encoder(x))

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """(B, L, H, W, embed_dim) → (B, L·f − ((f − num_frames % f) % f), H, W, C): the leading frames
        that `moments` would have padded for `num_frames` input frames are cropped."""
        f = self.config.time_downsample_factor
        crop = (-num_frames) % f
        x = self.decoder(self.post_quant_conv(z))
        return x[:, crop:]
