"""Shared building blocks: parameters with logical axis names, dense layers, norms, attention, embedders.

Parameters carry logical axis names (metadata `out_sharding`, e.g. ("embed", "mlp")); the mapping of
those names onto mesh axes lives in one place (opensora_jax.parallel). Modules never place or shard
anything themselves, so variables are created with eager sharding off.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.models import splash

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


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) with logical axes `axes`; computes in `dtype`."""

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
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
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


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")

log = logging.getLogger(__name__)
_warned: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    """Logs `message` the first time `key` is seen in this process (fallbacks are decided at every trace)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _backend() -> str:
    """jax's default backend; one function so tests can pretend to be on another platform."""
    return jax.default_backend()


def _on_cuda_gpu() -> bool:
    if _backend() != "gpu":
        return False
    try:
        version = jax.devices()[0].client.platform_version
    except AttributeError:  # cannot tell CUDA from ROCm here: let cuDNN report for itself
        return True
    return "cuda" in version.lower()


def _multi_device_mesh() -> bool:
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get_mesh is None else get_mesh()
    return mesh is not None and not mesh.empty and mesh.size > 1


def _resolve_attention(implementation: str, q: jax.Array, kv_len: int) -> str:
    """The implementation that actually runs: `implementation`, or `xla` (warning once) where its kernel is
    not available or not worth it. Decided at trace time; every fallback says once what ran instead and why."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
    backend = _backend()
    if implementation == "cudnn":
        if not _on_cuda_gpu():
            _warn_once(("cudnn", backend), f"cudnn attention needs an NVIDIA GPU; using xla attention on {backend}")
            return "xla"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            _warn_once(("cudnn", q.dtype.name),
                       f"cudnn attention needs bfloat16 or float16 inputs, got {q.dtype.name}; using xla attention")
            return "xla"
    if implementation == "splash":
        if splash.interpret_forced():
            return "splash"
        if backend != "tpu":
            _warn_once(("splash", backend), f"splash attention needs a TPU; using xla attention on {backend}")
            return "xla"
        if not splash.kernel_available():
            _warn_once(("splash", "missing"), f"jax {jax.__version__} has no Pallas splash attention kernel "
                       "(jax.experimental.pallas.ops.tpu.splash_attention); using xla attention")
            return "xla"
        if _multi_device_mesh():
            _warn_once(("splash", "mesh"), "splash attention is not wrapped in shard_map for multi-device meshes "
                       "yet (a Pallas TPU kernel cannot be auto-partitioned); using xla attention")
            return "xla"
        if kv_len < splash.MIN_KERNEL_KV_LEN:  # e.g. temporal attention: padding to a 128 block costs more
            _warn_once(("splash", "short"), f"splash attention runs only on key sequences of at least "
                       f"{splash.MIN_KERNEL_KV_LEN} tokens (padding shorter ones to a {splash.LANES}-token block "
                       f"costs more than it saves); using xla attention for {kv_len} keys and any other "
                       "short key sequence")
            return "xla"
    return implementation


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Softmax attention over layout (..., L, heads, head_dim); returns q's shape.

    Leading dims of k/v (and `key_mask`, (..., Lk) bool, False = masked out) broadcast against q's, so
    callers never merge (possibly sharded) leading axes into one batch axis.
    `xla`: q is scaled by head_dim**-0.5 before q·k and the softmax runs in float32, as in the
    reference's non-flash path. `cudnn`: jax.nn.dot_product_attention's cuDNN kernel (NVIDIA GPUs,
    bfloat16/float16). `splash`: JAX's Pallas splash-attention kernel (TPU; see opensora_jax.models.splash),
    used for key sequences of at least 128 tokens on one device. Where the chosen kernel is not available
    (another backend or dtype, a multi-device mesh for splash) or, for splash, the keys are too few to be worth
    it, the `xla` path runs and a warning saying so is logged once per reason.
    """
    implementation = _resolve_attention(implementation, q, k.shape[-3])
    scale = q.shape[-1] ** -0.5
    if implementation == "splash":
        return splash.splash_attention(q, k, v, key_mask, interpret=jax.default_backend() != "tpu")
    if implementation == "cudnn":
        lead = q.shape[:-3]
        k, v = (jnp.broadcast_to(a, (*lead, *a.shape[-3:])).reshape(-1, *a.shape[-3:]) for a in (k, v))
        mask = None
        if key_mask is not None:
            mask = jnp.broadcast_to(key_mask, (*lead, key_mask.shape[-1])).reshape(-1, 1, 1, key_mask.shape[-1])
        out = jax.nn.dot_product_attention(q.reshape(-1, *q.shape[-3:]), k, v, mask=mask, scale=scale,
                                           implementation="cudnn")
        return out.reshape(q.shape)
    logits = jnp.einsum("...qhd,...khd->...hqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[..., None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)
