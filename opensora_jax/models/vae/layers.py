"""Building blocks shared by the VAE modules: channels-last convolution, group norm, activations,
and the bounded-memory chunk loop.

Every array here is channels-last: 2D feature maps are (N, H, W, C), 3D ones (N, T, H, W, C).
Kernels are stored (*window, C_in, C_out) (HWIO / DHWIO); the converter transposes PyTorch's
(C_out, C_in, *window).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.models.layers import param

# PyTorch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)) is uniform(±1/sqrt(fan_in)),
# i.e. variance 1/(3·fan_in). Only used for random-weight runs; real weights come from a checkpoint.
_torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)

_DIMENSION_NUMBERS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The element-wise activation called `name` in the reference configs ("silu"/"swish", "relu", ...)."""
    table = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
        "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
    return table[name]


class Conv(nnx.Module):
    """Channels-last N-d convolution (N = len(kernel_size)) with explicit zero padding.

    Input (B, *spatial, C_in) → output (B, *spatial', C_out); kernel (*kernel_size, C_in, C_out).
    `padding` is one (low, high) pair per spatial dimension, applied as zeros before a valid conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        *,
        rngs: nnx.Rngs,
        strides: Sequence[int] | None = None,
        padding: Sequence[tuple[int, int]] | None = None,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kernel_size = tuple(int(k) for k in kernel_size)
        nd = len(kernel_size)
        if nd not in _DIMENSION_NUMBERS:
            raise ValueError(f"Conv supports 1 to 3 spatial dimensions, got kernel_size {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.strides = tuple(strides) if strides is not None else (1,) * nd
        self.padding = tuple(tuple(p) for p in padding) if padding is not None else ((0, 0),) * nd
        self.dtype = dtype
        axes = (None,) * nd + ("conv_in", "conv_out")
        self.kernel = param(rngs, _torch_default_init, kernel_size + (in_channels, out_channels), axes, param_dtype)
        zeros = nnx.initializers.zeros_init()
        self.bias = param(rngs, zeros, (out_channels,), ("conv_out",), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.strides)
        if x.ndim != nd + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"Conv expects (batch, {nd} spatial dims, {self.in_channels} channels), got shape {tuple(x.shape)}"
            )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=_DIMENSION_NUMBERS[nd],
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """GroupNorm over a channels-last tensor (B, *spatial, C), PyTorch semantics.

    Each sample's channels are split into `num_groups` contiguous groups; mean and (biased) variance
    are taken over all spatial positions and the group's channels, in float32. The result has the
    input's dtype.
    """

    def __init__(self, num_groups: int, channels: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels cannot be split into {num_groups} groups")
        self.num_groups = num_groups
        self.channels = channels
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (channels,), ("channels",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (channels,), ("channels",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.channels:
            raise ValueError(f"GroupNorm expects {self.channels} channels (last axis), got shape {tuple(x.shape)}")
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, self.channels // g))
        reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xf, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def diagonal_gaussian(moments: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Splits channels-last moments (..., 2L) into (sample, mean, logvar) of a diagonal Gaussian.

    logvar is clamped to [-30, 20] as in the reference posterior. With `key=None` the sample is the
    mean (the reference samples; the fixtures use the mean).
    """
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    if key is None:
        return mean, mean, logvar
    return gaussian_sample(mean, logvar, jax.random.normal(key, mean.shape, jnp.float32)), mean, logvar


def gaussian_sample(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """mean + exp(logvar / 2) · noise, in float32, returned in mean's dtype (`noise`: float32 standard normal)."""
    std = jnp.exp(0.5 * logvar.astype(jnp.float32))
    return (mean.astype(jnp.float32) + std * noise).astype(mean.dtype)


def chunked_apply(
    x: jax.Array,
    *,
    size: int,
    num_full: int,
    full_fn: Callable[[jax.Array, jax.Array], object],
    last_fn: Callable[[jax.Array], object] | None = None,
    axis: int = 1,
    place: Callable[[jax.Array], jax.Array] | None = None,
):
    """Concatenation along `axis` of `full_fn` over `num_full` chunks of `size`, then `last_fn` on the rest.

    `x.shape[axis]` is `num_full * size + r`; the trailing `r` elements (r > 0) form one short chunk
    handled by `last_fn(chunk)`. `full_fn(chunk, i)` gets the chunk index `i` (a traced int32) and
    may return a pytree; every leaf is concatenated along `axis`.

    The full chunks run in a `fori_loop` that writes each result into one preallocated output
    buffer, and the short chunk is written into the same buffer afterwards. Peak memory is thus
    the output plus one chunk's working set, independent of the number of chunks (no stacked
    per-chunk results, no final concatenate/transpose copy).

    `place`, if given, is applied to every output buffer when it is created and after every write (e.g. a
    sharding constraint, so that the loop carry keeps the layout of the chunk results).
    """
    length = x.shape[axis]
    rest = length - num_full * size
    if num_full < 0 or rest < 0:
        raise ValueError(f"chunked_apply: {num_full} chunks of {size} do not fit an axis of length {length}")
    if rest and last_fn is None:
        raise ValueError(f"chunked_apply: {rest} trailing elements but no last_fn")

    def take(start, n):
        return jax.lax.dynamic_slice_in_dim(x, start, n, axis=axis)

    full_spec = jax.eval_shape(full_fn, take(0, size), jnp.int32(0)) if num_full else None
    last_spec = jax.eval_shape(last_fn, take(num_full * size, rest)) if rest else None
    ref_spec = full_spec if num_full else last_spec
    treedef = jax.tree_util.tree_structure(ref_spec)
    ref = jax.tree_util.tree_leaves(ref_spec)
    # Per output leaf: length along `axis` of one full chunk's result and of the short chunk's.
    full_len = [leaf.shape[axis] for leaf in jax.tree_util.tree_leaves(full_spec)] if num_full else [0] * len(ref)
    last_len = [leaf.shape[axis] for leaf in jax.tree_util.tree_leaves(last_spec)] if rest else [0] * len(ref)
    place = place or (lambda buf: buf)
    out = [
        place(jnp.zeros(r.shape[:axis] + (num_full * f + l,) + r.shape[axis + 1 :], r.dtype))
        for r, f, l in zip(ref, full_len, last_len)
    ]

    def write(bufs, results, offsets):
        return [
            place(jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), o, axis=axis))
            for buf, y, o in zip(bufs, jax.tree_util.tree_leaves(results), offsets)
        ]

    if num_full:

        def body(i, bufs):
            return write(bufs, full_fn(take(i * size, size), i), [i * f for f in full_len])

        out = jax.lax.fori_loop(0, num_full, body, out) if num_full > 1 else body(jnp.int32(0), out)
    if rest:
        out = write(out, last_fn(take(num_full * size, rest)), [num_full * f for f in full_len])
    return jax.tree_util.tree_unflatten(treedef, out)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


ITEMS_AXIS = "act_vae_items"


def item_devices(mesh, rules=None) -> int:
    """Devices that `sharded_item_map` splits items over on `mesh` (1: no split)."""
    from opensora_jax.parallel import logical_axis_size

    return logical_axis_size(ITEMS_AXIS, mesh, rules)


def sharded_item_map(
    fn: Callable[[jax.Array], object], x: jax.Array, *, mesh, rules=None, micro: int | None, gather: bool = False
):
    """`fn` over the leading (item) axis of `x`, the items split evenly over the devices of `mesh`.

    The items (videos, temporal chunks or frames: anything `fn` treats independently) are padded with zero
    items to `D·k` (D = `item_devices(mesh)`, k = ⌈N/D⌉), laid out as (D, k, ...) with the D axis on the mesh
    axes of the logical "act_vae_items", and run `micro` per device at a time (None: all k): each step hands
    `fn` a (D·m, ...) batch whose rows are split D ways, so every device computes only its own m items. Device d
    owns items d·k ... d·k + k − 1. `fn` may return a pytree; every leaf must keep the leading item axis.
    Padding items are computed (on otherwise idle devices) and dropped; `fn` must not mix items.
    `gather=True` replicates the results on every device (for small results that the next stage re-splits).
    """
    from opensora_jax.parallel import constrain_on, replicated

    n = x.shape[0]
    d = item_devices(mesh, rules)
    k = ceil_div(n, d)
    if d * k != n:
        x = jnp.pad(x, [(0, d * k - n)] + [(0, 0)] * (x.ndim - 1))

    def place(a):
        return constrain_on(a, (ITEMS_AXIS,) + (None,) * (a.ndim - 1), mesh, rules)

    def run(chunk, index=None):
        m = chunk.shape[1]
        y = fn(place(chunk).reshape((d * m,) + chunk.shape[2:]))
        return jax.tree.map(lambda a: place(a.reshape((d, m) + a.shape[1:])), y)

    size = k if not micro else min(int(micro), k)
    out = chunked_apply(
        place(x.reshape((d, k) + x.shape[1:])),
        size=size,
        num_full=k // size,
        full_fn=run,
        last_fn=run,
        axis=1,
        place=place,
    )
    if gather:
        out = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated(mesh)), out)
    return jax.tree.map(lambda a: a.reshape((d * k,) + a.shape[2:])[:n], out)
