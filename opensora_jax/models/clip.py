"""CLIP text tower in Flax NNX: transformers' `CLIPTextModel` (text encoder of Open-Sora 2.0's conditioner).

API: `CLIPTextModel(config, rngs=...)(input_ids, attention_mask=None, return_hidden_states=False)` → dict with
  last_hidden_state (B, L, hidden)  the final-LayerNorm output,
  pooler_output     (B, hidden)     last_hidden_state at each row's end-of-text position (no projection),
  hidden_states     tuple of num_hidden_layers + 1 arrays (B, L, hidden), only with `return_hidden_states`:
                    [0] the embeddings, [i + 1] the output of layer i (before the final LayerNorm).

Semantics (as transformers, openai/clip-vit-large-patch14): token + learned position embeddings; pre-LN
layers `x + attn(ln1(x))`, `x + fc2(act(fc1(ln2(x))))` with biased q/k/v/out projections, scores scaled by
head_dim**-0.5 and a causal mask; a final LayerNorm. The pooled row: with the legacy `eos_token_id == 2`
(CLIP-L's config) the position of `argmax(input_ids)` (the end-of-text id is the largest id, so its first
occurrence even when pads are end-of-text too); otherwise the first position holding `eos_token_id`
(position 0 when a row has none, as transformers).

An optional `attention_mask` (B, L) (1 = token, 0 = padding) removes padded keys on top of the causal mask.
A query with no key left (only possible with a padded first token) gets uniform weights over all keys,
the house attention's convention; transformers adds two large negatives there. Open-Sora 2.0 passes None.

Precision: `dtype` is the compute dtype (float32 or bfloat16); LayerNorm statistics and the softmax run
in float32. The causal mask goes through `opensora_jax.models.attention.dot_product_attention`, whose masks
are per key: every query is its own leading "batch" entry (q (B, L, 1, H, D) against k/v (B, 1, L, H, D))
with its own row of the (B, L, L) mask; on the naive path this is the same computation as one L × L
masked softmax, with no copy of k or v.

The layer stack is built with `nnx.vmap` (leading "layers" axis on every per-layer variable) and run with
one `nnx.scan`. Parameters carry logical axis names ("vocab", "embed", "heads", "head_dim", "mlp", "layers").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.errors import UserError
from opensora_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from opensora_jax.models.layers import Dense, param

# transformers' CLIPTextConfig defaults, used for keys a config dict leaves out.
_HF_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# Execution settings of ours (not in transformers' config), kept when a dict carries them.
_EXECUTION_FIELDS = ("dtype", "param_dtype", "attention")
_MODEL_TYPES = ("clip_text_model", "clip")
# The legacy end-of-text id of the original CLIP configs: pool at argmax(input_ids) instead.
LEGACY_EOS_TOKEN_ID = 2

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (transformers `CLIPTextConfig` names) plus execution settings.

    The defaults are CLIP ViT-L/14's text tower (`PRESETS["CLIP-ViT-L-14"]`). `dtype` / `param_dtype` are the
    compute and storage dtypes; `attention` an `opensora_jax.models.attention` implementation ("xla", the
    naive path, by default: 77 tokens need no kernel).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    # JAX execution settings (not part of the reference config).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"CLIPTextConfig.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(f"unsupported CLIP hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            raise UserError(f"CLIPTextConfig.eos_token_id must be one integer (it picks the pooled position), "
                            f"got {self.eos_token_id!r}")
        if not self.layer_norm_eps > 0:
            raise UserError(f"CLIPTextConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention {self.attention!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise UserError(f"CLIPTextConfig.{name} {getattr(self, name)!r} is not a dtype") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """The text tower's config from a transformers `CLIPTextConfig` dict, a full `CLIPConfig` dict (its
        "text_config" is used) or our own `to_dict()`.

        Keys a dict leaves out take transformers' CLIPTextConfig defaults (note: eos 49407, hidden 512 there).
        Generic PretrainedConfig keys (return_dict, id2label, projection_dim, ...) are ignored. A `model_type`
        other than "clip_text_model" / "clip" raises a UserError.
        """
        if not isinstance(config, Mapping):
            raise UserError(f"a CLIP text config must be a dict, got {type(config).__name__}")
        model_type = config.get("model_type", "clip_text_model")
        if model_type not in _MODEL_TYPES:
            raise UserError(f"not a CLIP text config: model_type is {model_type!r} (expected one of {_MODEL_TYPES})")
        if model_type == "clip" or "text_config" in config or "text_config_dict" in config:
            text = config.get("text_config") or config.get("text_config_dict") or {}
            return cls.from_dict({**text, "model_type": "clip_text_model"})
        values = {k: config.get(k, v) for k, v in _HF_DEFAULTS.items()}
        values.update({k: config[k] for k in _EXECUTION_FIELDS if config.get(k) is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """transformers-style dict (with model_type), the inverse of `from_dict`."""
        return {**dataclasses.asdict(self), "model_type": "clip_text_model"}


PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14's text_config (Open-Sora 2.0's second text encoder); its token ids are
    # the legacy ones (bos 0, pad 1, eos 2), so the pooled position is argmax(input_ids).
    "CLIP-ViT-L-14": CLIPTextConfig(),
}


def preset(name: str) -> CLIPTextConfig:
    """The named CLIP text architecture (currently "CLIP-ViT-L-14")."""
    if name not in PRESETS:
        raise UserError(f"unknown CLIP text preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics and the affine map in float32, result in `dtype`."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class CLIPAttention(nnx.Module):
    """Self-attention with biased projections: q/k/v kernels (embed, heads, head_dim) and biases (heads,
    head_dim); the output kernel (heads, head_dim, embed) and bias (embed,)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.implementation = cfg.attention
        d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        init = nnx.initializers.normal(d**-0.5)
        zeros = nnx.initializers.zeros_init()
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_kernel", param(rngs, init, (d, h, k), ("embed", "heads", "head_dim"), param_dtype))
            setattr(self, f"{name}_bias", param(rngs, zeros, (h, k), ("heads", "head_dim"), param_dtype))
        self.o_kernel = param(rngs, init, (h, k, d), ("heads", "head_dim", "embed"), param_dtype)
        self.o_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        dt = self.dtype
        kernel, bias = getattr(self, f"{name}_kernel"), getattr(self, f"{name}_bias")
        return jnp.einsum("bld,dhk->blhk", x, kernel[...].astype(dt)) + bias[...].astype(dt)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, L, hidden); mask (B or 1, L, L) bool, [b, i, j] = query i may see key j → (B, L, hidden)."""
        dt = self.dtype
        q, k, v = (self._project(x, name) for name in ("q", "k", "v"))
        # One leading entry per query, so that the per-key mask of dot_product_attention is per query too.
        out = dot_product_attention(q[:, :, None], k[:, None], v[:, None], key_mask=mask,
                                    implementation=self.implementation)
        out = out[:, :, 0].astype(dt)  # (B, L, heads, head_dim)
        return jnp.einsum("blhk,hkd->bld", out, self.o_kernel[...].astype(dt)) + self.o_bias[...].astype(dt)


class CLIPMLP(nnx.Module):
    """fc2(act(fc1(x))): kernels (embed, mlp) and (mlp, embed), with biases."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act_name = cfg.hidden_act
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"),
                         kernel_init=nnx.initializers.normal((2 * cfg.hidden_size) ** -0.5), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"),
                         kernel_init=nnx.initializers.normal(cfg.hidden_size**-0.5), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act_name](self.fc1(x)))


class CLIPLayer(nnx.Module):
    """One pre-LN encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.attn = CLIPAttention(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    """CLIP text tower: `(input_ids (B, L) int, attention_mask (B, L) | None)` → dict (module docstring).

    Variables (path: shape, logical axes):
      token_embedding: (vocab, hidden) ("vocab", "embed"); position_embedding: (max_positions, hidden) (None, "embed")
      layers/layer_norm{1,2}/{scale,bias}: (layers, hidden)
      layers/attn/{q,k,v}_kernel: (layers, hidden, heads, head_dim); layers/attn/{q,k,v}_bias: (layers, heads, head_dim)
      layers/attn/o_kernel: (layers, heads, head_dim, hidden); layers/attn/o_bias: (layers, hidden)
      layers/mlp/fc1/{kernel,bias}: (layers, hidden, mlp), (layers, mlp)
      layers/mlp/fc2/{kernel,bias}: (layers, mlp, hidden), (layers, hidden)
      final_layer_norm/{scale,bias}: (hidden,)
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=None, rngs: nnx.Rngs):
        cfg = config
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        param_dtype = jnp.dtype(cfg.param_dtype if param_dtype is None else param_dtype)
        self.config = cfg
        self.dtype = dtype
        emb_init = nnx.initializers.normal(0.02)
        self.token_embedding = param(rngs, emb_init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.position_embedding = param(rngs, emb_init, (cfg.max_position_embeddings, cfg.hidden_size),
                                        (None, "embed"), param_dtype)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> CLIPLayer:
            return CLIPLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)

    def _check(self, input_ids, attention_mask):
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"CLIP input_ids must be a (B, L) integer array, got shape {ids.shape} dtype {ids.dtype}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP input_ids have {ids.shape[1]} tokens, more than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != ids.shape:
                raise ValueError(f"CLIP attention_mask shape {attention_mask.shape} does not match input_ids "
                                 f"{ids.shape}")
            attention_mask = attention_mask.astype(bool)
        return ids, attention_mask

    def attention_mask(self, length: int, attention_mask: jax.Array | None = None) -> jax.Array:
        """(B or 1, L, L) bool: query i sees key j iff j <= i (and key j is not padding)."""
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
        return causal if attention_mask is None else causal & attention_mask[:, None, :]

    def pooled_positions(self, ids: jax.Array) -> jax.Array:
        """(B,) int32: the end-of-text position of each row (module docstring)."""
        eos = self.config.eos_token_id
        if eos == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(ids, axis=-1).astype(jnp.int32)
        return jnp.argmax(ids == eos, axis=-1).astype(jnp.int32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 return_hidden_states: bool = False) -> dict[str, Any]:
        ids, pad_mask = self._check(input_ids, attention_mask)
        length = ids.shape[1]
        x = (self.token_embedding[...][ids].astype(self.dtype)
             + self.position_embedding[...][:length].astype(self.dtype)[None])
        mask = self.attention_mask(length, pad_mask)

        if return_hidden_states:
            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0))
            def run_states(h, layer, mask):
                h = layer(h, mask)
                return h, h

            h, states = run_states(x, self.layers, mask)
        else:
            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
            def run(h, layer, mask):
                return layer(h, mask)

            h, states = run(x, self.layers, mask), None

        last = self.final_layer_norm(h)
        positions = self.pooled_positions(ids)
        pooled = jnp.take_along_axis(last, positions[:, None, None], axis=1)[:, 0]
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if return_hidden_states:
            out["hidden_states"] = (x, *(states[i] for i in range(states.shape[0])))
        return out


def build(cfg: CLIPTextConfig | Mapping[str, Any], rngs: nnx.Rngs | None = None, param_dtype=None,
          compute_dtype=None) -> CLIPTextModel:
    """The `families.MODELS["clip"]` builder: dtypes None keep the config's (float32 by default)."""
    if not isinstance(cfg, CLIPTextConfig):
        cfg = CLIPTextConfig.from_dict(cfg)
    changes = {}
    if param_dtype is not None:
        changes["param_dtype"] = jnp.dtype(param_dtype).name
    if compute_dtype is not None:
        changes["dtype"] = jnp.dtype(compute_dtype).name
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    return CLIPTextModel(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


def abstract_model(config: CLIPTextConfig | Mapping[str, Any], *, param_dtype=None,
                   compute_dtype=None) -> CLIPTextModel:
    """The model with ShapeDtypeStruct leaves (nothing allocated), for conversion and manifest checks."""
    return nnx.eval_shape(lambda: build(config, nnx.Rngs(0), param_dtype, compute_dtype))
