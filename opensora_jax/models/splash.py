"""Splash attention: JAX's Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the
(..., L, heads, head_dim) layout of `opensora_jax.models.attention.dot_product_attention`.

`splash_attention` always runs the kernel: compiled by Mosaic on a TPU, or with `interpret=True` through
Pallas' interpreter on any backend (CPU tests). Choosing when to use it (TPU only, long enough key sequences)
and wrapping it in `shard_map` on a multi-device mesh is `attention.dot_product_attention`'s job, which warns
once for each reason an explicit `splash` falls back; `interpret_mode()` forces the interpreted kernel there so
tests can run whole models through it on CPU.

What the wrapper does around the kernel, which works on one example of (heads, L, head_dim):
* Leading dims broadcast as in the other attention paths. Trailing leading dims over which k, v and the key mask are
  constant (size 1), e.g. the frames T of STDiT3's cross-attention, are folded into the query sequence instead
  of broadcasting k/v; the remaining ones are flattened into one batch axis that the kernel is vmapped over.
* q is scaled by head_dim**-0.5 before the kernel (the kernel does not scale), in q's dtype as the `xla` path.
* Sequence lengths are zero-padded to multiples of the block sizes and head_dim to a multiple of 128 (zero
  columns change neither q·k nor the kept output columns); the output is cropped back.
* Padded keys and keys with `key_mask` False are masked through segment ids: every query has segment 1, valid
  keys 1, the others 0, so the kernel's logits there become its mask value and their weights exactly 0.
* A query row whose keys are all masked gets the mean of v over the Lk real keys, as the `xla` path's uniform
  softmax over equal (minimum) logits gives.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp

LANES = 128  # the kernel's block sizes must be multiples of the TPU lane width
MAX_BLOCK = 512
# Key sequences shorter than this take another path even with attention="splash" (with a one-time warning):
# padding them to a 128-lane block multiplies the work, and their logits are small anyway (STDiT3's temporal
# attention, L = T).
MIN_KERNEL_KV_LEN = LANES

_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("opensora_splash_interpret", default=False)


@contextlib.contextmanager
def interpret_mode() -> Iterator[None]:
    """Within the block (at trace time), attention="splash" runs the kernel on any backend (through Pallas'
    interpreter off TPU) and for any key length, instead of falling back. For tests."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpret_forced() -> bool:
    return _INTERPRET.get()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(length: int) -> int:
    """The largest of 512/256/128 that pads `length` by less than 10% more than padding it to 128 would."""
    base = _round_up(length, LANES)
    for block in (MAX_BLOCK, MAX_BLOCK // 2):
        if _round_up(length, block) <= 1.1 * base:
            return block
    return LANES


def kernel_available() -> bool:
    """Whether this jax ships the splash kernel (checked on import of it, without running anything)."""
    try:
        _kernel_module()
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernel_module():
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ImportError(
            f"attention='splash' needs jax.experimental.pallas.ops.tpu.splash_attention, which this jax "
            f"({jax.__version__}) does not provide: {err}") from err
    return splash_attention_kernel, splash_attention_mask


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    """A splash MHA kernel for (heads, q_len, d) × (heads, kv_len, d), lengths already block multiples.

    The static mask is full (every block computed); padding and key masks come in as segment ids, which may
    differ per example. The backward pass uses the fused dq/dkv kernel with the forward block sizes.
    """
    kernel_lib, mask_lib = _kernel_module()
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len)) for _ in range(heads)])
    blocks = kernel_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        use_fused_bwd_kernel=True,
    )
    # Evaluated eagerly even when first asked for inside a trace: the kernel holds arrays (its block masks), and
    # a cached kernel whose arrays were tracers of one trace would leak them into the next.
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                          interpret=interpret)


def _lead(a: jax.Array, trailing: int, ndim: int) -> tuple[int, ...]:
    """a's leading dims (all but the last `trailing`), left-padded with 1s to `ndim` dims."""
    shape = a.shape[: a.ndim - trailing]
    return (1,) * (ndim - len(shape)) + shape


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention over layout (..., L, heads, head_dim) through the splash kernel.

    Same contract as `attention.dot_product_attention(..., implementation="xla")`: leading dims of q, k, v and
    `key_mask` ((..., Lk) bool, False = masked out) broadcast; returns (*broadcast leading dims, Lq, heads, d).
    """
    lq, heads, d = q.shape[-3:]
    lk = k.shape[-3]
    if k.shape[-2:] != (heads, d) or v.shape[-3:] != (lk, heads, d):
        raise ValueError(f"splash attention needs matching heads/head_dim: q {q.shape}, k {k.shape}, v {v.shape}")
    if key_mask is not None and key_mask.shape[-1] != lk:
        raise ValueError(f"key_mask {key_mask.shape} does not match {lk} keys")
    kv_side = [k.shape[:-3], v.shape[:-3]] + ([] if key_mask is None else [key_mask.shape[:-1]])
    lead = jnp.broadcast_shapes(q.shape[:-3], *kv_side)
    n = len(lead)
    kv_leads = [_lead(k, 3, n), _lead(v, 3, n)] + ([] if key_mask is None else [_lead(key_mask, 1, n)])

    # Trailing leading dims where every kv-side input has size 1 join the query sequence.
    fold = 0
    while fold < n and all(shape[n - 1 - fold] == 1 for shape in kv_leads):
        fold += 1
    outer = lead[: n - fold]
    batch = math.prod(outer)
    q_len = math.prod(lead[n - fold :]) * lq

    qb = jnp.broadcast_to(q, (*lead, lq, heads, d)).reshape(batch, q_len, heads, d)

    def kv_batch(a: jax.Array, trailing: int) -> jax.Array:
        a = a.reshape(*_lead(a, trailing, n)[: n - fold], *a.shape[a.ndim - trailing :])
        return jnp.broadcast_to(a, (*outer, *a.shape[len(outer) :])).reshape(batch, *a.shape[len(outer) :])

    kb, vb = kv_batch(k, 3), kv_batch(v, 3)
    mask = None if key_mask is None else kv_batch(key_mask.astype(bool), 1)  # (batch, lk)

    block_q, block_kv = block_size(q_len), block_size(lk)
    q_pad, kv_pad, d_pad = _round_up(q_len, block_q), _round_up(lk, block_kv), _round_up(d, LANES)

    def to_kernel(a: jax.Array, length: int) -> jax.Array:  # (batch, L, h, d) → (batch, h, L_pad, d_pad)
        a = jnp.swapaxes(a, 1, 2)
        return jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, d_pad - d)))

    scale = jnp.asarray(d**-0.5, q.dtype)
    qk = to_kernel(qb * scale, q_pad)
    kk, vk = to_kernel(kb, kv_pad), to_kernel(vb, kv_pad)

    kernel = _kernel(heads, q_pad, kv_pad, block_q, block_kv, bool(interpret))
    kernel_lib, _ = _kernel_module()
    if mask is None and kv_pad == lk:
        out = jax.vmap(lambda a, b, c: kernel(a, b, c))(qk, kk, vk)
    else:
        valid = jnp.ones((batch, lk), bool) if mask is None else mask
        kv_ids = jnp.pad(valid, ((0, 0), (0, kv_pad - lk))).astype(jnp.int32)
        q_ids = jnp.ones((batch, q_pad), jnp.int32)
        out = jax.vmap(lambda a, b, c, qi, ki: kernel(a, b, c, segment_ids=kernel_lib.SegmentIds(q=qi, kv=ki)))(
            qk, kk, vk, q_ids, kv_ids)
    out = jnp.swapaxes(out[:, :, :q_len, :d], 1, 2)  # (batch, q_len, h, d)

    if mask is not None:  # rows with no valid key: the xla path's uniform weights, i.e. the mean of v
        mean_v = jnp.mean(vb.astype(jnp.float32), axis=1).astype(out.dtype)  # (batch, h, d)
        any_valid = jnp.any(mask, axis=-1)
        out = jnp.where(any_valid[:, None, None, None], out, mean_v[:, None])
    return out.reshape(*lead, lq, heads, d)
