"""STDiT3 (Open-Sora v1.2 diffusion transformer) in Flax NNX.

Public layout is channels-last: latents (B, T, H, W, C_in) in, (B, T, H, W, 2·C_in) out when
`pred_sigma` (the sampler uses the first C_in channels, the velocity). Text embeddings are
(B, L, caption_channels) with a (B, L) token mask.

The 2·depth blocks are stored stacked: `blocks.spatial.*` and `blocks.temporal.*` carry a leading
`layers` axis of size depth, and the forward pass runs one `lax.scan` over (spatial, temporal) pairs,
so the stack is traced once whatever the depth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention, valid_first
from opensora_jax.models.layers import (
    Dense,
    buffer,
    gelu_tanh,
    layer_norm,
    param,
    project,
    rms_norm,
    rope_interleaved,
    sinusoidal_embedding,
)
from opensora_jax.models.remat import REMAT_POLICIES, remat_policy_name  # noqa: F401 - re-exported
from opensora_jax.models.sequence_parallel import sequence_parallel_mesh, ulysses_attention
from opensora_jax.parallel import constrain
from opensora_jax.errors import UserError

# Reference kwargs that only pick kernels or distribution strategy; they do not change the math.
_KERNEL_ONLY_FIELDS = ("enable_flash_attn", "enable_layernorm_kernel", "enable_sequence_parallelism")

# Logical names of activations (opensora_jax.parallel maps them to mesh axes; no-ops without a mesh context).
# x stays (B, T, S, C) throughout, and attention runs on it without merging axes, so a split of S on
# "sequence" survives every block: temporal attention (over T) is local, spatial attention (over S) switches
# q/k/v to a heads split and o back to a tokens split (the Ulysses exchange), cross-attention keeps the split.
_ACT = ("act_batch", "act_frames", "act_tokens", "act_embed")
_SPATIAL_HEADS = ("act_batch", "act_frames", None, "act_attn_heads", None)
_SPATIAL_OUT = ("act_batch", "act_frames", "act_tokens", "act_heads", None)

# Each (spatial, temporal) block pair is one scanned layer for rematerialisation (opensora_jax.models.remat).


@dataclasses.dataclass(frozen=True)
class STDiT3Config:
    """Architecture (the reference's STDiT3Config fields) plus JAX execution settings."""

    input_size: tuple = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False
    # JAX execution settings (not part of the reference config).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"  # opensora_jax.models.attention.ATTENTION_IMPLEMENTATIONS
    remat: str = "nothing"  # a REMAT_POLICIES name; True / False still load, as "everything" / "nothing"

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for the interleaved rotary embedding")
        if self.hidden_size % 4:
            raise UserError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos position embedding)")
        if len(self.patch_size) != 3:
            raise UserError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention {self.attention!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_reference(cls, config: dict[str, Any], **overrides) -> "STDiT3Config":
        """Builds a config from the reference's STDiT3Config kwargs (e.g. case.json's `config`).

        Kernel-selection flags (flash attention, fused LayerNorm, sequence parallelism) are accepted and
        ignored: they do not change the outputs. Unknown keys raise, naming them.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in {**config, **overrides}.items():
            if key in _KERNEL_ONLY_FIELDS or key in ("model_type", "architectures", "transformers_version", "torch_dtype"):
                continue
            if key not in known:
                unknown.append(key)
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        if unknown:
            raise UserError(f"unknown STDiT3 config keys: {sorted(unknown)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "STDiT3-XL/2": dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16),
    "STDiT3-3B/2": dict(depth=28, hidden_size=1872, patch_size=(1, 2, 2), num_heads=26),
}


def preset(name: str, **overrides) -> STDiT3Config:
    """The reference's registered sizes (`STDiT3-XL/2`, `STDiT3-3B/2`) with optional overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown STDiT3 preset {name!r}; choose one of {sorted(PRESETS)}")
    return STDiT3Config(**{**PRESETS[name], **overrides})


def _xavier():
    return nnx.initializers.xavier_uniform()


def _zeros():
    return nnx.initializers.zeros_init()


def _normal(std: float):
    return nnx.initializers.normal(std)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with optional q/k RMSNorm and (temporal blocks) interleaved RoPE.

    qkv kernel (hidden, 3, heads, head_dim); proj kernel (heads, head_dim, hidden).
    """

    LORA_KERNELS = {"qkv_kernel": 1, "proj_kernel": 2}

    def __init__(self, cfg: STDiT3Config, *, zero_proj: bool, rngs: nnx.Rngs):
        d, h, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.qkv_kernel = param(rngs, _xavier(), (d, 3, h, hd), ("embed", None, "heads", "head_dim"), pd)
        self.qkv_bias = param(rngs, _zeros(), (3, h, hd), (None, "heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = param(rngs, nnx.initializers.ones_init(), (hd,), ("head_dim",), pd)
            self.k_norm = param(rngs, nnx.initializers.ones_init(), (hd,), ("head_dim",), pd)
        self.proj_kernel = param(rngs, _zeros() if zero_proj else _xavier(), (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.proj_bias = param(rngs, _zeros(), (d,), ("embed",), pd)

    def __call__(self, x: jax.Array, rope_freqs: jax.Array | None) -> jax.Array:
        """x: (B, A, L, hidden), attention over L → same shape. Spatial blocks pass (B, T, S, C); temporal
        blocks pass (B, S, T, C) with rope_freqs."""
        dt = x.dtype
        qkv = project(self, "qkv_kernel", "bald,dthk->tbalhk", x)
        qkv = qkv + self.qkv_bias[...].astype(dt)[:, None, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Spatial attention with a split S: Ulysses under shard_map where the shapes allow, else GSPMD constraints
        # from a tokens split to a heads split and back (XLA inserts the all-to-alls).
        ulysses_mesh = sequence_parallel_mesh(q.shape) if rope_freqs is None else None
        gspmd_spatial = rope_freqs is None and ulysses_mesh is None
        if gspmd_spatial:
            q, k, v = (constrain(a, _SPATIAL_HEADS) for a in (q, k, v))
        if self.cfg.qk_norm:
            q, k = rms_norm(q, self.q_norm[...]), rms_norm(k, self.k_norm[...])
        if rope_freqs is not None:
            q, k = rope_interleaved(q, rope_freqs), rope_interleaved(k, rope_freqs)

        def attend(q, k, v, key_mask=None):
            return dot_product_attention(q, k, v, key_mask=key_mask, implementation=self.cfg.attention)

        o = attend(q, k, v) if ulysses_mesh is None else ulysses_attention(q, k, v, attend, mesh=ulysses_mesh)
        if gspmd_spatial:
            o = constrain(o, _SPATIAL_OUT)
        return project(self, "proj_kernel", "balhk,hkd->bald", o) + self.proj_bias[...].astype(dt)


class CrossAttention(nnx.Module):
    """Attention from video tokens to text tokens with a per-sample key mask.

    Equivalent to the reference's packed block-diagonal attention: sample b attends to its own valid
    text tokens only.
    """

    LORA_KERNELS = {"q_kernel": 1, "kv_kernel": 1, "proj_kernel": 2}

    def __init__(self, cfg: STDiT3Config, *, zero_proj: bool, rngs: nnx.Rngs):
        d, h, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q_kernel = param(rngs, _xavier(), (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.q_bias = param(rngs, _zeros(), (h, hd), ("heads", "head_dim"), pd)
        self.kv_kernel = param(rngs, _xavier(), (d, 2, h, hd), ("embed", None, "heads", "head_dim"), pd)
        self.kv_bias = param(rngs, _zeros(), (2, h, hd), (None, "heads", "head_dim"), pd)
        self.proj_kernel = param(rngs, _zeros() if zero_proj else _xavier(), (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.proj_bias = param(rngs, _zeros(), (d,), ("embed",), pd)

    def __call__(self, x: jax.Array, y: jax.Array, y_mask: jax.Array) -> jax.Array:
        """x: (B, T, S, hidden), y: (B, L, hidden), y_mask: (B, L) bool → (B, T, S, hidden)."""
        dt = x.dtype
        # Valid tokens first (as the reference packs them), so the mask is a prefix given by lengths (cuDNN takes
        # those instead of a dense mask); the keys' order does not change attention.
        order, lengths = valid_first(y_mask)
        y = jnp.take_along_axis(y, order[..., None], axis=1)
        q = project(self, "q_kernel", "btsd,dhk->btshk", x) + self.q_bias[...].astype(dt)
        kv = project(self, "kv_kernel", "bld,dthk->tblhk", y) + self.kv_bias[...].astype(dt)[:, None, None]
        k, v = kv[0][:, None], kv[1][:, None]  # (B, 1, L, h, d): broadcast over frames
        o = dot_product_attention(q, k, v, key_lengths=lengths[:, None], implementation=self.cfg.attention)
        return project(self, "proj_kernel", "btshk,hkd->btsd", o) + self.proj_bias[...].astype(dt)


class Mlp(nnx.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, axes, zero_fc2: bool, cfg: STDiT3Config, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.fc1 = Dense(d_in, d_hidden, axes=(axes[0], axes[1]), **kw)
        self.fc2 = Dense(d_hidden, d_out, axes=(axes[1], axes[2]), kernel_init=_zeros() if zero_fc2 else _xavier(), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class STDiT3Block(nnx.Module):
    """adaLN-single block: self-attention (spatial or temporal), cross-attention, MLP.

    Activations are (B, T, S, hidden). Modulation tensors are per (sample, frame): (B, T, 1, hidden),
    which is how `x_mask` selects the timestep-0 modulation for conditioning frames.
    """

    def __init__(self, cfg: STDiT3Config, *, temporal: bool, rngs: nnx.Rngs):
        self.temporal = temporal
        d = cfg.hidden_size
        self.scale_shift_table = param(rngs, _normal(d**-0.5), (6, d), (None, "embed"), jnp.dtype(cfg.param_dtype))
        self.attn = SelfAttention(cfg, zero_proj=temporal, rngs=rngs)
        self.cross_attn = CrossAttention(cfg, zero_proj=temporal, rngs=rngs)
        self.mlp = Mlp(d, cfg.mlp_hidden, d, axes=("embed", "mlp", "embed"), zero_fc2=temporal, cfg=cfg, rngs=rngs)

    def __call__(self, x, y, y_mask, mod, rope_freqs, drop_keep):
        """x (B,T,S,C); mod (6, B, T, 1, C) already selected per frame; drop_keep (B,1,1,1) scale or None."""
        table = self.scale_shift_table[...].astype(x.dtype)[:, None, None, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod + table

        def residual(h):
            return h if drop_keep is None else h * drop_keep

        x = constrain(x, _ACT)
        h = _modulate(layer_norm(x), shift_msa, scale_msa)
        if self.temporal:
            h = self.attn(h.transpose(0, 2, 1, 3), rope_freqs).transpose(0, 2, 1, 3)
        else:
            h = self.attn(h, None)
        x = constrain(x + residual(gate_msa * h), _ACT)
        x = constrain(x + self.cross_attn(x, y, y_mask), _ACT)
        h = self.mlp(_modulate(layer_norm(x), shift_mlp, scale_mlp))
        return constrain(x + residual(gate_mlp * h), _ACT)


class BlockPair(nnx.Module):
    """One spatial block followed by one temporal block: the unit the layer scan iterates over."""

    def __init__(self, cfg: STDiT3Config, *, rngs: nnx.Rngs):
        self.spatial = STDiT3Block(cfg, temporal=False, rngs=rngs)
        self.temporal = STDiT3Block(cfg, temporal=True, rngs=rngs)


class TimestepEmbedder(nnx.Module):
    """256-dim [cos, sin] sinusoid of a scalar per sample, then Linear–SiLU–Linear (also the fps embedder)."""

    FREQ_DIM = 256

    def __init__(self, cfg: STDiT3Config, *, rngs: nnx.Rngs, first_init=None, zero_second=False):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.mlp_in = Dense(self.FREQ_DIM, cfg.hidden_size, axes=(None, "embed"), kernel_init=first_init or _xavier(), **kw)
        self.mlp_out = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "embed_out"),
                             kernel_init=_zeros() if zero_second else _xavier(), **kw)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        """t: (B,) → (B, hidden). t is rounded to the compute dtype first, as the reference casts it."""
        feats = sinusoidal_embedding(t.astype(self.dtype), self.FREQ_DIM).astype(self.dtype)
        return self.mlp_out(jax.nn.silu(self.mlp_in(feats)))


class CaptionEmbedder(nnx.Module):
    """y_proj MLP on T5 features, the learned null caption, and class dropout (training only)."""

    def __init__(self, cfg: STDiT3Config, *, rngs: nnx.Rngs):
        c = cfg.caption_channels
        self.y_proj = Mlp(c, cfg.hidden_size, cfg.hidden_size, axes=("caption", "mlp", "embed"), zero_fc2=False, cfg=cfg, rngs=rngs)
        init = jax.random.normal(rngs.params(), (cfg.model_max_length, c), jnp.dtype(cfg.param_dtype)) / c**0.5
        self.y_embedding = buffer(init, (None, "caption"))
        self.uncond_prob = cfg.class_dropout_prob

    def __call__(self, y: jax.Array, *, drop_key: jax.Array | None) -> jax.Array:
        """y: (B, L, caption_channels) → (B, L, hidden). With `drop_key`, each caption is replaced by the
        null caption with probability class_dropout_prob (the mask is left unchanged, as in the reference)."""
        if drop_key is not None and self.uncond_prob > 0:
            if y.shape[1:] != self.y_embedding.shape:
                raise ValueError(f"training captions must be {self.y_embedding.shape} per sample, got {y.shape[1:]}")
            drop = jax.random.uniform(drop_key, (y.shape[0],)) < self.uncond_prob
            y = jnp.where(drop[:, None, None], self.y_embedding[...].astype(y.dtype)[None], y)
        return self.y_proj(y)

    def null(self, batch: int) -> jax.Array:
        """The null caption repeated: (batch, model_max_length, caption_channels)."""
        return jnp.broadcast_to(self.y_embedding[...][None], (batch, *self.y_embedding.shape))


class FinalLayer(nnx.Module):
    """adaLN final projection to patch pixels; reproduces the reference's t0-branch quirk under x_mask."""

    def __init__(self, cfg: STDiT3Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        n_out = int(np.prod(cfg.patch_size)) * cfg.out_channels
        self.scale_shift_table = param(rngs, _normal(d**-0.5), (2, d), (None, "embed"), jnp.dtype(cfg.param_dtype))
        self.linear = Dense(d, n_out, axes=("embed", None), rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, x, t, t0, x_mask):
        """x (B,T,S,C); t, t0 (B,C); x_mask (B,T) bool → (B,T,S,prod(patch)·out_channels)."""
        table = self.scale_shift_table[...].astype(x.dtype)
        shift, scale = table[0] + t[:, None, None, :], table[1] + t[:, None, None, :]
        shift0, scale0 = table[0] + t0[:, None, None, :], table[1] + t0[:, None, None, :]
        h = _modulate(layer_norm(x), shift, scale)
        # The reference normalises the already-modulated h for the t0 branch; kept for parity.
        h0 = _modulate(layer_norm(h), shift0, scale0)
        h = jnp.where(x_mask[:, :, None, None], h, h0)
        return self.linear(h)


def pos_embed_2d(hp: int, wp: int, dim: int, scale: jax.Array, base_size: int) -> jax.Array:
    """2D sin-cos position embedding (S = hp·wp, dim), row-major tokens; first half encodes the column.

    grid = arange(n) / scale · base_size / n; each coordinate gives [sin, cos] with
    inv_freq = 1/10000^(arange(0, dim/2, 2)/(dim/2)). `scale` may be traced.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    rows = jnp.arange(hp, dtype=jnp.float32) / scale * (base_size / hp)
    cols = jnp.arange(wp, dtype=jnp.float32) / scale * (base_size / wp)

    def sincos(coord):
        ang = coord[:, None] * inv_freq[None]
        return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)

    col_emb = jnp.broadcast_to(sincos(cols)[None, :, :], (hp, wp, half))
    row_emb = jnp.broadcast_to(sincos(rows)[:, None, :], (hp, wp, half))
    return jnp.concatenate([col_emb, row_emb], axis=-1).reshape(hp * wp, dim)


def _tile_to_batch(a: jax.Array, batch: int, name: str) -> jax.Array:
    """Repeats a (b, ...) array to (batch, ...) the way the reference repeats masks/fps for CFG."""
    if a.shape[0] == batch:
        return a
    if a.shape[0] == 0 or batch % a.shape[0]:
        raise ValueError(f"{name} has {a.shape[0]} rows, which does not divide the batch size {batch}")
    return jnp.tile(a, (batch // a.shape[0],) + (1,) * (a.ndim - 1))


class STDiT3(nnx.Module):
    """Spatial-temporal DiT v3 (Open-Sora v1.2). See the module docstring for layouts."""

    def __init__(self, cfg: STDiT3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        pt, ph, pw = cfg.patch_size
        self.patch_kernel = param(rngs, _xavier(), (pt, ph, pw, cfg.in_channels, d), (None, None, None, None, "embed"), pd)
        self.patch_bias = param(rngs, _zeros(), (d,), ("embed",), pd)
        self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
        self.fps_embedder = TimestepEmbedder(cfg, rngs=rngs, first_init=_normal(0.02), zero_second=True)
        self.t_block = Dense(d, 6 * d, axes=("embed", "mlp"), rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pd)
        self.y_embedder = CaptionEmbedder(cfg, rngs=rngs)
        half = cfg.head_dim // 2
        self.rope_freqs = buffer(1.0 / (10000.0 ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32)[:half] / cfg.head_dim)), (None,))

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return BlockPair(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    # -- pieces of the forward pass ------------------------------------------------------------

    def patchify(self, x: jax.Array) -> jax.Array:
        """(B, T, H, W, C) → (B, Tp, Hp, Wp, hidden), zero-padding T/H/W at the end to patch multiples."""
        pt, ph, pw = self.cfg.patch_size
        b, t, h, w, c = x.shape
        pads = [(0, 0), (0, -t % pt), (0, -h % ph), (0, -w % pw), (0, 0)]
        x = jnp.pad(x, pads)
        tp, hp, wp = x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw
        x = x.reshape(b, tp, pt, hp, ph, wp, pw, c)
        out = jnp.einsum("bpxqyrzc,xyzcd->bpqrd", x, self.patch_kernel[...].astype(x.dtype))
        return out + self.patch_bias[...].astype(x.dtype)

    def unpatchify(self, x: jax.Array, size: tuple[int, int, int]) -> jax.Array:
        """(B, Tp, Hp, Wp, pt·ph·pw·C_out) → (B, T, H, W, C_out), cropped to `size` = (T, H, W)."""
        pt, ph, pw = self.cfg.patch_size
        b, tp, hp, wp, _ = x.shape
        x = x.reshape(b, tp, hp, wp, pt, ph, pw, self.cfg.out_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp * pt, hp * ph, wp * pw, self.cfg.out_channels)
        return x[:, : size[0], : size[1], : size[2]]

    def conditioning(self, timestep, fps, batch):
        """Embeddings (a dict), then t, t_mlp for `timestep` and t0, t0_mlp for timestep 0 (fps added to both)."""
        fps_emb = self.fps_embedder(_tile_to_batch(jnp.asarray(fps, jnp.float32).reshape(-1), batch, "fps"))
        t_emb = self.t_embedder(timestep)
        t = t_emb + fps_emb
        t0_emb = self.t_embedder(jnp.zeros_like(timestep))
        t0 = t0_emb + fps_emb
        embeds = dict(t_embedder_out=t_emb, fps_embedder_out=fps_emb, t0_embedder_out=t0_emb)
        return embeds, t, self.t_block(jax.nn.silu(t)), t0, self.t_block(jax.nn.silu(t0))

    def __call__(
        self,
        x: jax.Array,
        timestep: jax.Array,
        y: jax.Array,
        mask: jax.Array | None = None,
        x_mask: jax.Array | None = None,
        *,
        fps: jax.Array,
        height: jax.Array,
        width: jax.Array,
        train: bool = False,
        dropout_key: jax.Array | None = None,
        return_intermediates: bool = False,
    ):
        """Predicts the rectified-flow velocity (and the unused sigma channels).

        Args:
          x: latents (B, T, H, W, in_channels), channels-last.
          timestep: (B,) floats in [0, 1000].
          y: text embeddings (B, L, caption_channels) (a (B, 1, L, C) array is accepted too); with
            `skip_y_embedder`, already projected (B, L, hidden).
          mask: (b, L) text token mask (1 = real token); b may divide B (it is repeated, as the reference
            does for the CFG null branch). None means every token is valid.
          x_mask: (B, T) bool; False frames use the timestep-0 modulation (conditioning frames).
          fps, height, width: (B,) or scalars; height/width are PIXEL sizes and only element 0 is used.
          train: enables class dropout of captions and drop-path (needs `dropout_key`).
          return_intermediates: also return a dict of the reference's named intermediates.

        Returns:
          (B, T, H, W, out_channels) float32 (and the intermediates dict if requested).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be (B, T, H, W, {cfg.in_channels}) channels-last, got shape {x.shape}")
        if y.ndim == 4:
            y = y[:, 0]
        b = x.shape[0]
        if train and dropout_key is None and (cfg.class_dropout_prob > 0 or cfg.drop_path > 0):
            raise ValueError("train=True needs dropout_key (class dropout / drop path draw random numbers)")
        drop_key, path_key = jax.random.split(dropout_key) if (train and dropout_key is not None) else (None, None)

        x, timestep, y = x.astype(dt), jnp.asarray(timestep, jnp.float32).astype(dt).reshape(-1), y.astype(dt)
        size = x.shape[1:4]
        inter = {}

        embeds, t, t_mlp, t0, t0_mlp = self.conditioning(timestep, fps, b)
        inter.update(embeds, t_block_out=t_mlp, t0_block_out=t0_mlp)

        if cfg.skip_y_embedder:
            y_emb = y
        else:
            y_emb = self.y_embedder(y, drop_key=drop_key)
            inter["y_embedder_out"] = y_emb
        y_emb = constrain(y_emb, ("act_batch", "act_text", "act_embed"))
        y_mask = jnp.ones(y_emb.shape[:2], bool) if mask is None else _tile_to_batch(jnp.asarray(mask) != 0, y_emb.shape[0], "mask")

        h = self.patchify(x)
        _, tp, hp, wp, d = h.shape
        inter["x_embedder_out"] = h.reshape(b, tp * hp * wp, d)
        scale = jnp.sqrt(jnp.asarray(height, jnp.float32).reshape(-1)[0] * jnp.asarray(width, jnp.float32).reshape(-1)[0]) / cfg.input_sq_size
        pos = pos_embed_2d(hp, wp, d, scale, round(math.sqrt(hp * wp))).astype(dt)
        inter["pos_embed_out"] = pos[None]
        h = constrain(h.reshape(b, tp, hp * wp, d) + pos[None, None], _ACT)

        frame_mask = jnp.ones((b, tp), bool) if x_mask is None else jnp.asarray(x_mask, bool).reshape(b, -1)
        if frame_mask.shape[1] != tp:
            raise ValueError(f"x_mask has {frame_mask.shape[1]} frames, latent has {tp} (after temporal patching)")
        mod = jnp.where(
            frame_mask[None, :, :, None, None],
            t_mlp.reshape(b, 6, 1, 1, d).transpose(1, 0, 2, 3, 4),
            t0_mlp.reshape(b, 6, 1, 1, d).transpose(1, 0, 2, 3, 4),
        )  # (6, B, T, 1, C)
        mod = constrain(mod, (None, "act_batch", "act_frames", None, "act_embed"))

        h, (spatial_outs, temporal_outs) = self._run_blocks(h, y_emb, y_mask, mod, path_key, return_intermediates)
        if return_intermediates:
            for i in range(cfg.depth):
                inter[f"spatial_block_{i}_out"] = spatial_outs[i].reshape(b, -1, d)
                inter[f"temporal_block_{i}_out"] = temporal_outs[i].reshape(b, -1, d)

        out = constrain(self.final_layer(h, t, t0, frame_mask), ("act_batch", "act_frames", "act_tokens", None))
        inter["final_layer_out"] = out.reshape(b, tp * hp * wp, -1)
        out = self.unpatchify(out.reshape(b, tp, hp, wp, -1), size).astype(jnp.float32)
        return (out, inter) if return_intermediates else out

    def _run_blocks(self, h, y, y_mask, mod, path_key, collect: bool):
        """Runs the depth (spatial, temporal) pairs as one lax.scan over the stacked parameters."""
        cfg = self.cfg
        graphdef, state = nnx.split(self.blocks)
        rope_freqs = self.rope_freqs[...]
        b = h.shape[0]
        if path_key is not None and cfg.drop_path > 0:
            rates = jnp.linspace(0.0, cfg.drop_path, cfg.depth)
            keys = jax.random.split(path_key, (cfg.depth, 2))
        else:
            rates, keys = None, None

        def keep_scale(rate, key):
            if rates is None:
                return None
            keep = jax.random.bernoulli(key, 1.0 - rate, (b, 1, 1, 1))
            return jnp.where(keep, 1.0 / jnp.maximum(1.0 - rate, 1e-6), 0.0).astype(h.dtype)

        def body(carry, xs):
            layer_state, rate, key = xs
            pair = nnx.merge(graphdef, layer_state)
            s = pair.spatial(carry, y, y_mask, mod, None, None if key is None else keep_scale(rate, key[0]))
            t = pair.temporal(s, y, y_mask, mod, rope_freqs, None if key is None else keep_scale(rate, key[1]))
            return t, ((s, t) if collect else None)

        if cfg.remat != "nothing":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
        h, outs = jax.lax.scan(body, h, (state, rates, keys))
        return h, (outs if collect else (None, None))

    def null_caption(self, batch: int) -> jax.Array:
        """The learned null caption for CFG: (batch, model_max_length, caption_channels)."""
        return self.y_embedder.null(batch)
