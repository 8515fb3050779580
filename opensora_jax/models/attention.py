"""The one attention function of every model: softmax attention over (..., L, heads, head_dim).

`dot_product_attention(q, k, v, key_mask | key_lengths, implementation)` picks an implementation at trace time:

  auto       (the default) for bfloat16/float16 inputs: cudnn on NVIDIA GPUs (head_dim a multiple of 8, at
             most 128), splash on TPUs (key sequences of at least 128 tokens); blockwise for everything else:
             CPU, float32 anywhere (so parity runs take it), short key sequences, other head dims.
  blockwise  flash-style online-softmax attention in pure JAX: query blocks × key blocks, memory
             O(L × block) in the forward and the backward pass (a custom VJP that saves only the output and
             the per-row softmax statistics and recomputes the probabilities one key block at a time).
             Sequences that fit one block (both Lq ≤ BLOCK_Q and Lk ≤ BLOCK_K) run the naive path, which is
             the same computation in one block's memory.
  xla        the naive path: the whole (Lq × Lk) logits in float32, the reference for every other path.
  cudnn      jax.nn.dot_product_attention's cuDNN kernel; key lengths go in as `key_value_seq_lengths`.
  splash     JAX's Pallas splash kernel (opensora_jax.models.splash), inside `jax.shard_map` on a
             multi-device mesh (batch and heads split as the logical rules say).

An explicit choice that cannot run here (cudnn off NVIDIA GPUs or in float32, splash off TPU or on short key
sequences) falls back to what `auto` picks for these inputs, and a warning saying what ran instead and why is
logged once per reason.

Every implementation gives the naive path's result up to rounding, including rows whose keys are all masked:
their logits are all float32's minimum, so the softmax is uniform and the row is the mean of v over the Lk keys.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from opensora_jax import parallel
from opensora_jax.models import splash

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn", "splash")
DEFAULT_IMPLEMENTATION = "auto"

# Largest blockwise blocks (tokens) when the caller gives none; tuned on CPU (bench/attention.py).
BLOCK_Q = 1024
BLOCK_K = 512
CUDNN_MAX_HEAD_DIM = 128

log = logging.getLogger(__name__)
_warned: set[tuple] = set()
_MASKED = float(jnp.finfo(jnp.float32).min)


# ------------------------------------------------------------------------------------------------------------
# Choosing the implementation
# ------------------------------------------------------------------------------------------------------------


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


def _active_mesh():
    """JAX's current mesh when it has more than one device, else None; None too inside a shard_map (any manual
    axis), where the caller already hands attention its own shard."""
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get_mesh is None else get_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1 or mesh.manual_axes:
        return None
    return mesh


def _multi_device_mesh() -> bool:
    return _active_mesh() is not None


def _cudnn_problem(dtype, head_dim: int) -> tuple[tuple, str] | None:
    """Why cuDNN cannot run these inputs here (a warn-once key and the reason), or None."""
    backend = _backend()
    if not _on_cuda_gpu():
        return ("cudnn", backend), f"cudnn attention needs an NVIDIA GPU; using {{alt}} attention on {backend}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return ("cudnn", jnp.dtype(dtype).name), (
            f"cudnn attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}; using {{alt}} attention")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return ("cudnn", "head_dim", head_dim), (
            f"cudnn attention needs a head_dim that is a multiple of 8 and at most {CUDNN_MAX_HEAD_DIM}, got "
            f"{head_dim}; using {{alt}} attention")
    return None


def _splash_problem(kv_len: int) -> tuple[tuple, str] | None:
    """Why the splash kernel does not run these inputs here (a warn-once key and the reason), or None."""
    if splash.interpret_forced():
        return None
    backend = _backend()
    if backend != "tpu":
        return ("splash", backend), f"splash attention needs a TPU; using {{alt}} attention on {backend}"
    if not splash.kernel_available():
        return ("splash", "missing"), (f"jax {jax.__version__} has no Pallas splash attention kernel "
                                       "(jax.experimental.pallas.ops.tpu.splash_attention); using {alt} attention")
    if kv_len < splash.MIN_KERNEL_KV_LEN:  # e.g. temporal attention: padding to a 128 block costs more
        return ("splash", "short"), (
            f"splash attention runs only on key sequences of at least {splash.MIN_KERNEL_KV_LEN} tokens (padding "
            f"shorter ones to a {splash.LANES}-token block costs more than it saves); using {{alt}} attention for "
            f"{kv_len} keys and any other short key sequence")
    return None


def _auto_choice(dtype, head_dim: int, kv_len: int) -> str:
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if half and _backend() == "tpu" and splash.kernel_available() and kv_len >= splash.MIN_KERNEL_KV_LEN:
        return "splash"
    if _cudnn_problem(dtype, head_dim) is None:
        return "cudnn"
    return "blockwise"


def resolve_attention(implementation: str, dtype, head_dim: int, kv_len: int) -> str:
    """The implementation that runs for inputs of `dtype` with `head_dim` and `kv_len` keys on this backend.

    `auto` → cudnn / splash / blockwise as the module docstring says; `xla` and `blockwise` always run; an
    explicit `cudnn` or `splash` that cannot run here becomes `auto`'s choice, with a one-time warning.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "auto":
        return _auto_choice(dtype, head_dim, kv_len)
    problem = {"cudnn": lambda: _cudnn_problem(dtype, head_dim), "splash": lambda: _splash_problem(kv_len)}.get(
        implementation, lambda: None)()
    if problem is None:
        return implementation
    key, message = problem
    alt = _auto_choice(dtype, head_dim, kv_len)
    _warn_once(key, message.format(alt=alt))
    return alt


# ------------------------------------------------------------------------------------------------------------
# The one entry point
# ------------------------------------------------------------------------------------------------------------


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    implementation: str = DEFAULT_IMPLEMENTATION,
    *,
    key_lengths: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Softmax attention over layout (..., L, heads, head_dim); returns (*broadcast leading dims, Lq, heads, d).

    Leading dims of k/v (and of `key_mask` / `key_lengths`) broadcast against q's, so callers never merge
    (possibly sharded) leading axes into one batch axis. q is scaled by head_dim**-0.5 (in q's dtype) before
    q·k and the softmax runs in float32, as in the reference's non-flash path.

    Keys are masked by at most one of
      key_mask     (..., Lk) bool, False = masked out: any pattern;
      key_lengths  (...) int: key j is valid iff j < length (a prefix padding mask, e.g. left-aligned text
                   tokens); cuDNN takes these as sequence lengths instead of a dense mask.
    `implementation`: one of ATTENTION_IMPLEMENTATIONS (module docstring); `block_q`/`block_k` override the
    largest blockwise block sizes (BLOCK_Q/BLOCK_K) and matter only when blockwise runs.
    """
    if key_mask is not None and key_lengths is not None:
        raise ValueError("give key_mask or key_lengths, not both")
    lk, head_dim = k.shape[-3], q.shape[-1]
    chosen = resolve_attention(implementation, q.dtype, head_dim, lk)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, key_mask, key_lengths=key_lengths)
    if key_lengths is not None:
        key_mask = lengths_to_mask(key_lengths, lk)
    if chosen == "splash":
        return _splash(q, k, v, key_mask)
    if chosen == "blockwise" and not fits_one_block(q.shape[-3], lk, block_q, block_k):
        return blockwise_attention(q, k, v, key_mask, block_q=block_q, block_k=block_k)
    return naive_attention(q, k, v, key_mask)


def fits_one_block(q_len: int, kv_len: int, block_q: int | None = None, block_k: int | None = None) -> bool:
    """True when both sequences fit a single blockwise block. The naive path then computes exactly what the
    blockwise one would, in memory bounded by one block (Lq × Lk ≤ BLOCK_Q × BLOCK_K), and compiles and runs
    faster: short sequences (temporal attention over T frames, tiny models) take it."""
    return q_len <= (block_q or BLOCK_Q) and kv_len <= (block_k or BLOCK_K)


def lengths_to_mask(lengths: jax.Array, length: int) -> jax.Array:
    """(...) valid-key counts → (..., length) bool prefix mask."""
    return jnp.arange(length) < jnp.asarray(lengths)[..., None]


def valid_first(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For a (..., L) bool mask: (order, lengths) such that `take_along_axis(keys, order, axis=-1)` puts each row's
    valid keys first (in their order) and `lengths` counts them. Attention is invariant to the order of its keys,
    so this turns any key mask into a prefix mask given by lengths (what the reference's packed masks are)."""
    mask = jnp.asarray(mask, bool)
    order = jnp.argsort(~mask, axis=-1, stable=True)
    return order, jnp.sum(mask, axis=-1, dtype=jnp.int32)


def naive_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """The `xla` path: the whole float32 logits (..., heads, Lq, Lk). Layout and contract as dot_product_attention."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...qhd,...khd->...hqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[..., None, None, :], logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


# ------------------------------------------------------------------------------------------------------------
# blockwise: online softmax over query blocks × key blocks, custom VJP
# ------------------------------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_layout(length: int, max_block: int) -> tuple[int, int]:
    """(block, count) for `length` tokens in blocks of at most `max_block`: the fewest blocks, as even as
    possible (padding under `count` tokens in all). One block of exactly `length` when it fits."""
    count = _ceil_div(length, max(1, int(max_block)))
    return _ceil_div(length, count), count


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Flash-style attention in pure JAX; layout and contract as dot_product_attention(implementation="xla").

    Memory O(L × block) forward and backward. Blocks are strided (block i holds tokens i, i + n, i + 2n, ...,
    n the block count), which changes nothing (queries are independent and the softmax does not care about the
    order of keys) and keeps a split of the sequence axis over devices local where the block size divides by it.
    Leading dims over which k, v and the mask are constant (size 1, e.g. the frames of cross-attention) are not
    broadcast: they ride along with the queries of each block.
    """
    lq, heads, d = q.shape[-3:]
    lk = k.shape[-3]
    if k.shape[-2:] != (heads, d) or v.shape[-3:] != (lk, heads, d):
        raise ValueError(f"attention needs matching heads/head_dim: q {q.shape}, k {k.shape}, v {v.shape}")
    if key_mask is not None and key_mask.shape[-1] != lk:
        raise ValueError(f"key_mask {key_mask.shape} does not match {lk} keys")
    layout = _Canonical(q, k, v, key_mask)
    qc, kc, vc, mask = layout.inputs(q, k, v, key_mask)
    bq, nq = block_layout(lq, block_q or BLOCK_Q)
    bk, nk = block_layout(lk, block_k or BLOCK_K)
    qc = _pad_axis(qc * jnp.asarray(d**-0.5, qc.dtype), -2, bq * nq)
    kc, vc = _pad_axis(kc, -2, bk * nk), _pad_axis(vc, -2, bk * nk)
    if mask is not None:
        mask = _pad_axis(mask, -1, bk * nk)
    return layout.output(_flash(qc, kc, vc, mask, nq, nk, lk)[..., :lq, :])


class _Canonical:
    """The blockwise kernel's layouts: q (*N, H, [G,] Lq, D), k and v (*N, H, Lk, D), mask (*N, Lk).

    N are the broadcast leading dims over which k/v/mask vary; G merges the "shared" leading dims, where q has
    more than one entry and k, v and the mask all have one (no broadcast copies of k/v). G is dropped when
    there are none: XLA:CPU's batched dots run about half as fast with a size-1 group axis.
    """

    def __init__(self, q, k, v, key_mask):
        kv_side = [k.shape[:-3], v.shape[:-3]] + ([] if key_mask is None else [key_mask.shape[:-1]])
        self.lead = lead = tuple(jnp.broadcast_shapes(q.shape[:-3], *kv_side))
        n = len(lead)
        kv_leads = [(1,) * (n - len(shape)) + tuple(shape) for shape in kv_side]
        self.shared = [i for i in range(n) if lead[i] > 1 and all(shape[i] == 1 for shape in kv_leads)]
        self.batch = [i for i in range(n) if i not in self.shared]
        self.n_lead = tuple(lead[i] for i in self.batch)
        self.s_lead = tuple(lead[i] for i in self.shared)

    def _full_rank(self, a, trailing: int):
        return a.reshape((1,) * (len(self.lead) + trailing - a.ndim) + a.shape)

    def _kv_side(self, a, trailing: int):  # shared dims dropped, the other leading dims broadcast
        a = self._full_rank(a, trailing)
        a = jnp.squeeze(a, axis=tuple(self.shared)) if self.shared else a
        return jnp.broadcast_to(a, self.n_lead + a.shape[a.ndim - trailing:])

    def inputs(self, q, k, v, key_mask):
        n, (lq, heads, d) = len(self.lead), q.shape[-3:]
        qc = jnp.broadcast_to(self._full_rank(q, 3), (*self.lead, lq, heads, d))
        qc = qc.transpose(*self.batch, n + 1, *self.shared, n, n + 2)
        qc = qc.reshape(*self.n_lead, heads, *((math.prod(self.s_lead),) if self.shared else ()), lq, d)
        kc, vc = (jnp.swapaxes(self._kv_side(a, 3), -3, -2) for a in (k, v))
        mask = None if key_mask is None else self._kv_side(jnp.asarray(key_mask, bool), 1)
        return qc, kc, vc, mask

    def output(self, out):
        """(*N, H, [G,] Lq, D) → (*lead, Lq, H, D)."""
        n, nb = len(self.lead), len(self.batch)
        heads, (lq, d) = out.shape[nb], out.shape[-2:]
        out = out.reshape(*self.n_lead, heads, *self.s_lead, lq, d)
        position = {dim: i for i, dim in enumerate(self.batch)}
        position.update({dim: nb + 1 + i for i, dim in enumerate(self.shared)})
        return out.transpose(*(position[i] for i in range(n)), n + 1, nb, n + 2)


def _pad_axis(a: jax.Array, axis: int, length: int) -> jax.Array:
    extra = length - a.shape[axis]
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _block(a: jax.Array, axis: int, count: int, i) -> jax.Array:
    """Strided block i of `count` along `axis`: elements i, i + count, ... (axis length = block · count)."""
    axis %= a.ndim
    size = a.shape[axis] // count
    split = a.reshape(*a.shape[:axis], size, count, *a.shape[axis + 1:])
    return lax.dynamic_index_in_dim(split, i, axis + 1, keepdims=False)


def _set_block(a: jax.Array, axis: int, count: int, i, value: jax.Array) -> jax.Array:
    """`a` with strided block i along `axis` replaced by `value` (in place inside a loop)."""
    axis %= a.ndim
    size = a.shape[axis] // count
    split = a.reshape(*a.shape[:axis], size, count, *a.shape[axis + 1:])
    split = lax.dynamic_update_index_in_dim(split, value, i, axis + 1)
    return split.reshape(a.shape)


def _specs(grouped: bool) -> dict[str, str]:
    """einsum specs over the canonical layouts: queries (*N, H, [G,] Lq, D), keys (*N, H, Lk, D)."""
    g = "g" if grouped else ""
    q, k, s = f"...h{g}qd", "...hkd", f"...h{g}qk"
    return {"logits": f"{q},{k}->{s}", "out": f"{s},{k}->{q}", "key_grad": f"{s},{q}->{k}"}


def _dot(kind: str, a, b, grouped: bool):
    return jnp.einsum(_specs(grouped)[kind], a, b, preferred_element_type=jnp.float32)


def _key_keep(mask, j, nk: int, ndim: int):
    """Key block j of the mask, shaped to broadcast against logits of rank `ndim`."""
    keep = _block(mask, -1, nk, j)
    return keep.reshape(*keep.shape[:-1], *(1,) * (ndim - keep.ndim), keep.shape[-1])


def _key_block_logits(qi, kj, mask, j, nk: int, kv_len: int):
    """float32 logits (*N, H, [G,] bq, bk) of a query block and key block j, with masked keys at float32's
    minimum (as the naive path) and padding keys at -inf (weight exactly 0 even in a fully masked row)."""
    s = _dot("logits", qi, kj, qi.ndim > kj.ndim)
    bk = kj.shape[-2]
    if mask is None and bk * nk == kv_len:
        return s
    is_real = jnp.arange(bk) * nk + j < kv_len  # strided block j holds keys j, j + nk, ...
    keep = is_real if mask is None else _key_keep(mask, j, nk, s.ndim)
    return jnp.where(keep, s, jnp.where(is_real, _MASKED, -jnp.inf))


def _forward(q, k, v, mask, nq: int, nk: int, kv_len: int):
    """(out, row max m, row sum l): out (*N, H, [G,] Lq, D) in v's dtype, m and l (*N, H, [G,] Lq) float32."""
    rows_all, grouped = q.shape[:-1], q.ndim > k.ndim

    def query_block(i):
        qi = _block(q, -2, nq, i)
        rows = qi.shape[:-1]

        def key_step(carry, j):
            m, l, acc = carry
            s = _key_block_logits(qi, _block(k, -2, nk, j), mask, j, nk, kv_len)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = _dot("out", p.astype(v.dtype), _block(v, -2, nk, j), grouped)
            return (m_new, l, alpha[..., None] * acc + pv), None

        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, v.shape[-1]), jnp.float32))
        (m, l, acc), _ = lax.scan(key_step, init, jnp.arange(nk))
        return (acc / l[..., None]).astype(v.dtype), m, l

    if nq == 1:
        return query_block(0)

    def query_step(carry, i):
        out, m, l = carry
        oi, mi, li = query_block(i)
        return (_set_block(out, -2, nq, i, oi), _set_block(m, -1, nq, i, mi), _set_block(l, -1, nq, i, li)), None

    init = (jnp.zeros((*rows_all, v.shape[-1]), v.dtype), jnp.zeros(rows_all, jnp.float32),
            jnp.zeros(rows_all, jnp.float32))
    (out, m, l), _ = lax.scan(query_step, init, jnp.arange(nq))
    return out, m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, nq: int, nk: int, kv_len: int):
    """Attention of pre-scaled, padded canonical q (*N, H, [G,] Lq, D) over k, v (*N, H, Lk, D)."""
    return _forward(q, k, v, mask, nq, nk, kv_len)[0]


def _flash_fwd(q, k, v, mask, nq, nk, kv_len):
    out, m, l = _forward(q, k, v, mask, nq, nk, kv_len)
    # The row max and sum are kept apart rather than as one logsumexp: in a fully masked row the max is
    # float32's minimum, where adding log(sum) would round away and the recomputed weights would be 1, not 1/Lk.
    return out, (q, k, v, mask, out, m, l)


def _flash_bwd(nq, nk, kv_len, residuals, dout):
    """FlashAttention-2 backward: per key block (outer scan) and query block (inner scan), recompute the
    probabilities from the saved row statistics; dk, dv of the key block accumulate over query blocks and dq
    over key blocks."""
    q, k, v, mask, out, m, l = residuals
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (*N, H, [G,] Lq)
    inv_l, grouped = 1.0 / l, q.ndim > k.ndim

    def key_step(dq, j):
        kj, vj = _block(k, -2, nk, j), _block(v, -2, nk, j)

        def query_step(carry, i):
            dq, dk_j, dv_j = carry
            qi, do_i = _block(q, -2, nq, i), _block(dout, -2, nq, i).astype(v.dtype)
            s = _key_block_logits(qi, kj, mask, j, nk, kv_len)
            p = jnp.exp(s - _block(m, -1, nq, i)[..., None]) * _block(inv_l, -1, nq, i)[..., None]
            dv_j = dv_j + _dot("key_grad", p.astype(v.dtype), do_i, grouped)
            ds = p * (_dot("logits", do_i, vj, grouped) - _block(delta, -1, nq, i)[..., None])
            if mask is not None:  # the naive path's where() passes no gradient to masked logits
                ds = jnp.where(_key_keep(mask, j, nk, ds.ndim), ds, 0.0)
            ds = ds.astype(q.dtype)
            dq = _set_block(dq, -2, nq, i, _block(dq, -2, nq, i) + _dot("out", ds, kj, grouped))
            dk_j = dk_j + _dot("key_grad", ds, qi, grouped)
            return (dq, dk_j, dv_j), None

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dq, dk_j, dv_j), _ = lax.scan(query_step, (dq, zeros, zeros), jnp.arange(nq))
        return dq, (dk_j, dv_j)

    def assemble(blocks, like):  # (nk, *N, H, bk, D) strided blocks → (*N, H, Lk, D)
        return jnp.moveaxis(blocks, 0, -2).reshape(like.shape).astype(like.dtype)

    dq, (dk, dv) = lax.scan(key_step, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    return dq.astype(q.dtype), assemble(dk, k), assemble(dv, v), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------------------
# cudnn
# ------------------------------------------------------------------------------------------------------------


def cudnn_seq_lengths(key_lengths: jax.Array, lead: tuple[int, ...], q_len: int, kv_len: int):
    """jax.nn.dot_product_attention's (query_seq_lengths, key_value_seq_lengths), each (prod(lead),) int32, for
    `key_lengths` broadcast over the leading dims `lead`. Key lengths are clipped to [1, kv_len] (a kernel row with
    no key is undefined; `cudnn_attention` replaces rows with no valid key afterwards)."""
    batch = math.prod(lead)
    kv = jnp.broadcast_to(jnp.asarray(key_lengths, jnp.int32), lead).reshape(batch)
    return jnp.full((batch,), q_len, jnp.int32), jnp.clip(kv, 1, kv_len)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    key_lengths: jax.Array | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """jax.nn.dot_product_attention with the leading dims flattened into its batch axis; layout and contract as
    dot_product_attention. `key_lengths` become sequence lengths (no dense mask); a `key_mask` goes in dense.
    `implementation` is passed on ("xla" lets tests check the argument plumbing without a GPU)."""
    lq, heads, d = q.shape[-3:]
    lk = k.shape[-3]
    kv_side = [k.shape[:-3], v.shape[:-3]] + [jnp.shape(a)[: jnp.ndim(a) - t] for a, t in
                                              ((key_mask, 1), (key_lengths, 0)) if a is not None]
    lead = jnp.broadcast_shapes(q.shape[:-3], *kv_side)

    def flat(a):
        return jnp.broadcast_to(a, (*lead, *a.shape[-3:])).reshape(-1, *a.shape[-3:])

    kwargs, valid = {}, None
    if key_lengths is not None:
        kwargs["query_seq_lengths"], kwargs["key_value_seq_lengths"] = cudnn_seq_lengths(key_lengths, lead, lq, lk)
        valid = jnp.broadcast_to(jnp.asarray(key_lengths), lead).reshape(-1) > 0
    elif key_mask is not None:
        dense = jnp.broadcast_to(key_mask, (*lead, lk)).reshape(-1, lk)
        kwargs["mask"] = dense[:, None, None, :]
        valid = jnp.any(dense, axis=-1)
    vf = flat(v)
    out = jax.nn.dot_product_attention(flat(q), flat(k), vf, scale=d**-0.5, implementation=implementation, **kwargs)
    if valid is not None:  # rows with no valid key: the naive path's uniform weights, i.e. the mean of v
        mean_v = jnp.mean(vf.astype(jnp.float32), axis=1).astype(out.dtype)  # (batch, heads, d)
        out = jnp.where(valid[:, None, None, None], out, mean_v[:, None])
    return out.reshape(*lead, lq, heads, d)


# ------------------------------------------------------------------------------------------------------------
# splash (wrapped in shard_map on a multi-device mesh)
# ------------------------------------------------------------------------------------------------------------


def _splash(q, k, v, key_mask):
    interpret = jax.default_backend() != "tpu"  # the real backend, whatever tests pretend
    mesh = _active_mesh()
    if mesh is None:
        return splash.splash_attention(q, k, v, key_mask, interpret=interpret)
    return splash_sharded(q, k, v, key_mask, mesh=mesh, interpret=interpret)


def splash_sharded(q, k, v, key_mask, *, mesh, interpret: bool) -> jax.Array:
    """splash.splash_attention inside jax.shard_map over `mesh`: the first leading dim split like "act_batch" and
    heads like "act_attn_heads" (opensora_jax.parallel's rules, each where it divides), sequences whole.
    A Pallas kernel cannot be partitioned automatically, so every device runs it on its own shard."""
    lead = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3],
                                *([] if key_mask is None else [key_mask.shape[:-1]]))
    n = len(lead)
    q = jnp.broadcast_to(q, (*lead, *q.shape[-3:]))
    k, v = (a.reshape((1,) * (n + 3 - a.ndim) + a.shape) for a in (k, v))
    names = (("act_batch",) if n else ()) + (None,) * max(n - 1, 0) + (None, "act_attn_heads", None)
    q_spec = parallel.logical_to_spec(names, mesh, parallel.active_rules(), q.shape)

    def spec_like_q(a, trailing):  # q's split of the first leading dim where `a` has it, else whole
        first = q_spec[0] if n and a.shape[0] == lead[0] else None
        rest = tuple(q_spec[n:]) if trailing == 3 else (None,)
        return PartitionSpec(*(((first,) + (None,) * (n - 1)) if n else ()), *rest)

    args, specs = [q, k, v], [q_spec, spec_like_q(k, 3), spec_like_q(v, 3)]
    if key_mask is not None:
        mask = jnp.asarray(key_mask, bool)
        mask = mask.reshape((1,) * (n + 1 - mask.ndim) + mask.shape)
        args.append(mask)
        specs.append(spec_like_q(mask, 1))

    def local(q, k, v, mask=None):
        return splash.splash_attention(q, k, v, mask, interpret=interpret)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)
    return sharded(*args)
