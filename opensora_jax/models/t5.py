"""T5 (v1.1) text encoder in Flax NNX: the encoder stack of transformers' `T5EncoderModel`.

API: `T5Encoder(config, rngs=...)(ids, mask) -> hidden`, with `ids` (B, L) integer token ids,
`mask` (B, L) 1/True for real tokens and 0/False for padding, and `hidden` (B, L, d_model) in
`dtype` (the last hidden state after the final norm; padded positions are not zeroed).

Semantics (T5 v1.1 as in `DeepFloyd/t5-v1_1-xxl`): token embedding without scaling; pre-norm blocks
with T5's RMS norm (no mean subtraction, no bias, float32 statistics); self-attention without the
1/sqrt(d) scaling, plus one bidirectional relative-position bias table that only the first block owns
and every block adds (together with the padding mask); a gated feed-forward `wo(act(wi_0 x) * wi_1 x)`
(gated-gelu uses the tanh GELU); a final RMS norm. The non-gated `feed_forward_proj` variants of
T5Config ("relu", ...) are supported as well.

The layer stack is built with `nnx.vmap` (every per-layer parameter has a leading "layers" axis) and run
with one `nnx.scan`, so it is traced once whatever the depth. Parameters carry logical axis names
("vocab", "embed", "heads", "kv", "mlp", "layers"); nothing is placed or sharded here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.models.layers import Dense, param
from opensora_jax.errors import UserError

# transformers' T5Config defaults, used for keys a config.json leaves out.
_HF_DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder; field names follow transformers' `T5Config`.

    `num_heads * d_kv` need not equal `d_model`. `dense_act_fn` / `is_gated_act` are derived from
    `feed_forward_proj` the way transformers does it ("gated-gelu" → gated, tanh GELU).
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UserError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not of the form 'ACT' or 'gated-ACT'"
            )
        if self.dense_act_fn is None:
            act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", parts[0] == "gated")
        if self.dense_act_fn not in _ACTIVATIONS:
            raise UserError(f"unsupported T5 activation {self.dense_act_fn!r}; known: {sorted(_ACTIVATIONS)}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise UserError(
                "relative position buckets need num_buckets >= 4 and max_distance > num_buckets // 4, got "
                f"num_buckets={self.relative_attention_num_buckets}, "
                f"max_distance={self.relative_attention_max_distance}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "T5Config":
        """Builds the encoder config from a transformers T5Config dict (config.json); other keys are ignored.

        Missing keys take transformers' defaults (note: its default `feed_forward_proj` is "relu").
        Raises ValueError when `model_type` is present and is not "t5".
        """
        model_type = config.get("model_type", "t5")
        if model_type != "t5":
            raise UserError(f"not a T5 config: model_type is {model_type!r} (expected 't5')")
        values = {k: config.get(k, v) for k, v in _HF_DEFAULTS.items()}
        for k in ("dense_act_fn", "is_gated_act"):
            if config.get(k) is not None:
                values[k] = config[k]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """transformers-style dict (includes model_type), the inverse of `from_dict`."""
        d = dataclasses.asdict(self)
        d["model_type"] = "t5"
        return d


PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl = DeepFloyd/t5-v1_1-xxl, the text encoder of Open-Sora v1.2.
    "t5-v1_1-xxl": T5Config(),
}


def preset(name: str) -> T5Config:
    """The named T5 architecture (currently "t5-v1_1-xxl")."""
    if name not in PRESETS:
        raise KeyError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def relative_position_buckets(length_q: int, length_k: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index of (key position - query position), int32 (length_q, length_k).

    Half the buckets hold positive offsets. Within each half, offsets below num_buckets/4 get their own
    bucket and larger ones share logarithmically wider buckets up to `max_distance`. Computed with numpy
    at trace time (lengths are static); the log is evaluated in float32 in the same order as
    transformers so that the truncation at bucket boundaries agrees exactly.
    """
    rel = np.arange(length_k)[None, :] - np.arange(length_q)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    far = np.maximum(dist, exact).astype(np.float32)
    log_ratio = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    far_bucket = exact + (log_ratio * np.float32(half - exact)).astype(np.int64)
    far_bucket = np.minimum(far_bucket, half - 1)
    bucket = np.where(dist < exact, dist, far_bucket) + (rel > 0) * half
    return bucket.astype(np.int32)


class T5Norm(nnx.Module):
    """T5's RMS norm: x * rsqrt(mean(x²) + eps) * scale; statistics in float32, result in `dtype`."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y


class T5Attention(nnx.Module):
    """Multi-head self-attention without score scaling; q/k/v kernels (embed, heads, kv), o (heads, kv, embed)."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
        # transformers' init scales (irrelevant once weights are loaded).
        self.q = param(rngs, nnx.initializers.normal((d * k) ** -0.5), (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.k = param(rngs, nnx.initializers.normal(d**-0.5), (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.v = param(rngs, nnx.initializers.normal(d**-0.5), (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.o = param(rngs, nnx.initializers.normal((h * k) ** -0.5), (h, k, d), ("heads", "kv", "embed"), param_dtype)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x (B, L, d_model); bias (1, H, L, L) float32; key_mask (B, 1, 1, L) bool → (B, L, d_model)."""
        dt = self.dtype
        q = jnp.einsum("bld,dhk->blhk", x, self.q[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.k[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.v[...].astype(dt))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) + bias
        # Padded keys get the most negative float: a row with no valid key becomes uniform, as in the reference.
        scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
        return jnp.einsum("bqhk,hkd->bqd", out, self.o[...].astype(dt))


class T5FeedForward(nnx.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x); plain: wo(act(wi x)). Kernels (embed, mlp) and (mlp, embed)."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gated = bool(cfg.is_gated_act)
        self.act_name = cfg.dense_act_fn
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        wi_init = nnx.initializers.normal(cfg.d_model**-0.5)
        if self.gated:
            self.wi_0 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
            self.wi_1 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
        else:
            self.wi = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
        self.wo = Dense(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), kernel_init=nnx.initializers.normal(cfg.d_ff**-0.5), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_name]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(h)


class T5Layer(nnx.Module):
    """One pre-norm encoder block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attn = T5Attention(cfg, **kw)
        self.mlp_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.mlp = T5FeedForward(cfg, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias, key_mask)
        return x + self.mlp(self.mlp_norm(x))


class T5Encoder(nnx.Module):
    """T5 encoder: `(ids (B, L) int, mask (B, L) 0/1) -> hidden (B, L, d_model)` in `dtype`.

    Variables (path: shape, logical axes):
      embedding: (vocab, d_model) ("vocab", "embed")
      relative_bias: (num_buckets, heads) (None, "heads")  — block 0's table, used by every block
      layers/attn_norm/scale, layers/mlp_norm/scale: (layers, d_model)
      layers/attn/{q,k,v}: (layers, d_model, heads, d_kv); layers/attn/o: (layers, heads, d_kv, d_model)
      layers/mlp/{wi_0,wi_1 | wi}/kernel: (layers, d_model, d_ff); layers/mlp/wo/kernel: (layers, d_ff, d_model)
      final_norm/scale: (d_model,)
    `param_dtype` is the storage dtype, `dtype` the compute dtype (norm statistics and softmax stay float32).
    """

    def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        cfg = config
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype)
        self.relative_bias = param(
            rngs, nnx.initializers.normal(cfg.d_model**-0.5), (cfg.relative_attention_num_buckets, cfg.num_heads),
            (None, "heads"), param_dtype,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> T5Layer:
            return T5Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """Relative position bias (1, heads, length, length), float32."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.relative_bias[...].astype(self.dtype).astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def _check_inputs(self, ids, mask):
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"T5 ids must be a (B, L) integer array, got shape {ids.shape} dtype {ids.dtype}")
        if mask is None:
            return jnp.ones(ids.shape, dtype=bool)
        mask = jnp.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"T5 mask shape {mask.shape} does not match ids shape {ids.shape}")
        return mask.astype(bool)

    def _prepare(self, ids, mask):
        """Embedded tokens (B, L, d_model), position bias (1, H, L, L) and key mask (B, 1, 1, L)."""
        ids = jnp.asarray(ids)
        key_mask = self._check_inputs(ids, mask)[:, None, None, :]
        x = self.embedding[...][ids].astype(self.dtype)
        return x, self.position_bias(ids.shape[1]), key_mask

    def encode_with_states(self, ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Like `__call__`, also returning the residual stream `states` (num_layers + 1, B, L, d_model):
        states[0] is the embedding output and states[i] the output of block i-1 (before the final norm)."""
        x, bias, key_mask = self._prepare(ids, mask)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0))
        def run(h, layer, bias, key_mask):
            h = layer(h, bias, key_mask)
            return h, h

        h, states = run(x, self.layers, bias, key_mask)
        return self.final_norm(h), jnp.concatenate([x[None], states], axis=0)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """ids (B, L) int, mask (B, L) 1 = token / 0 = padding (None: all tokens) → hidden (B, L, d_model)."""
        x, bias, key_mask = self._prepare(ids, mask)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
        def run(h, layer, bias, key_mask):
            return layer(h, bias, key_mask)

        return self.final_norm(run(x, self.layers, bias, key_mask))


def abstract_encoder(config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> T5Encoder:
    """The encoder with ShapeDtypeStruct leaves (nothing allocated), for conversion and manifest checks."""
    return nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
