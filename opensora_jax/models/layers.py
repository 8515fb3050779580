"""Shared building blocks: parameters with logical axis names, dense layers, norms, embedders (attention lives
in opensora_jax.models.attention).

Parameters carry logical axis names (metadata `out_sharding`, e.g. ("embed", "mlp")); the mapping of
those names onto mesh axes lives in one place (opensora_jax.parallel). Modules never place or shard
anything themselves, so variables are created with eager sharding off.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


class Buffer(nnx.Variable):
    """A non-trainable state array loaded from a checkpoint (the reference's buffers, e.g. the null caption).

    Optimizers select `nnx.Param` only, so buffers are never updated by training.
    """


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """Creates an `nnx.Param` with logical axis names `axes` (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} got {len(axes)} axis names {tuple(axes)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def buffer(value: jax.Array, axes: Sequence[str | None]) -> Buffer:
    """Creates a `Buffer` with logical axis names."""
    return Buffer(value, out_sharding=tuple(axes), eager_sharding=False)


# ------------------------------------------------------------------------------------------------------------
# Projections that may carry a LoRA adapter (opensora_jax.models.lora attaches them)
# ------------------------------------------------------------------------------------------------------------

# A module class lists the kernels that accept an adapter in `LORA_KERNELS` {attribute: number of input axes} and
# computes each through `project`. The adapter of kernel attribute `k` is the attribute `k + LORA_SUFFIX`.
LORA_SUFFIX = "_lora"


class LoRA(nnx.Module):
    """The low-rank adapter of one kernel: kernel + scale · A·B, A (*in_axes, rank), B (rank, *out_axes).

    A and B are `nnx.LoRAParam` variables (an `nnx.Param` subclass) carrying logical axis names (the kernel's input
    axes then None for A, None then the kernel's output axes for B; stacked blocks add their leading "layers").
    `scale` (alpha / rank) is static.
    """

    def __init__(self, a: nnx.LoRAParam, b: nnx.LoRAParam, scale: float):
        self.a = a
        self.b = b
        self.scale = float(scale)


def _unused_letter(spec: str) -> str:
    return next(c for c in "rRzZyYqQ" if c not in spec)


def project(module: nnx.Module, name: str, spec: str, x: jax.Array) -> jax.Array:
    """`einsum(spec, x, kernel)` for the kernel attribute `name` of `module`, in x's dtype; when a LoRA adapter is
    attached (`module.<name>_lora`), adds scale · einsum(einsum(x, A), B): the adapter-applied projection.

    `spec` is "x_letters,kernel_letters->out_letters"; the adapter's A takes the first kernel letters (as many as A
    has input axes), B the rest.
    """
    kernel = getattr(module, name)[...].astype(x.dtype)
    y = jnp.einsum(spec, x, kernel)
    lora = getattr(module, name + LORA_SUFFIX, None)
    if lora is None:
        return y
    inputs, out = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    n_in = lora.a.ndim - 1
    k_in, k_out, r = k_spec[:n_in], k_spec[n_in:], _unused_letter(spec)
    xa_spec = "".join(c for c in x_spec if c not in k_in) + r
    xa = jnp.einsum(f"{x_spec},{k_in}{r}->{xa_spec}", x, lora.a[...].astype(x.dtype))
    delta = jnp.einsum(f"{xa_spec},{r}{k_out}->{out}", xa, lora.b[...].astype(x.dtype))
    return y + jnp.asarray(lora.scale, x.dtype) * delta


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) with logical axes `axes`; computes in `dtype`."""

    LORA_KERNELS = {"kernel": 1}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer = nnx.initializers.xavier_uniform(),
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros_init(), (out_features,), (axes[1],), param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(self, "kernel", "...i,io->...o", x.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos, sin] sinusoid features of a 1-D float array (cos first), float32, shape (N, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Llama/T5-style RMSNorm over the last axis: statistics in float32, cast back, then × weight."""
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def rope_interleaved(x: jax.Array, freqs: jax.Array) -> jax.Array:
    """Rotary embedding with interleaved pairs (x0,x1),(x2,x3)...; positions 0..L-1 along axis -3.

    x: (..., L, heads, head_dim); freqs: (head_dim // 2,). Angles are formed in x's dtype, as
    rotary-embedding-torch does, so bfloat16 runs round like the reference.
    """
    length, head_dim = x.shape[-3], x.shape[-1]
    positions = jnp.arange(length, dtype=x.dtype)
    angles = positions[:, None] * freqs.astype(x.dtype)[None, :]  # (L, head_dim/2)
    angles = jnp.repeat(angles, 2, axis=-1)[:, None, :]  # (L, 1, head_dim)
    pairs = x.reshape(*x.shape[:-1], head_dim // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)
