"""Sequence-parallel attention under `shard_map`: Ulysses (all-to-all over heads) and ring attention.

Both take q, k, v in the layout (B, *A, L, heads, head_dim): a batch axis, any leading axes A (e.g. frames),
the attended sequence L, heads, head_dim. L arrives split over the mesh axis `axis` ("sequence"); the batch
axis is split over ("data", "fsdp") and heads over "tensor" by the project's logical rules (`act_batch`,
`act_heads` in opensora_jax.parallel, with the same divisibility fallbacks), so the other mesh axes keep
working inside the `shard_map`. Outputs have q's layout and split.

`ulysses_attention` (STDiT3's spatial attention): one all-to-all per q/k/v turns the L split into a heads
split, any local attention function runs on whole sequences for 1/n of the heads, one all-to-all brings the
output back. Needs L and the heads per device (heads / tensor) divisible by n = size of `axis`.

`ring_attention` (a joint text+image sequence, as in Open-Sora 2.0's MMDiT: text tokens + video tokens, up
to 76.5k, attended together). Each device keeps its block of queries; the K/V blocks (and their key mask)
travel around the ring with `ppermute`, and the output is accumulated with an online softmax in float32.
Each ring step is tiled as `attention.blockwise_attention` is (its `block_layout`, BLOCK_Q / BLOCK_K and
strided blocks): the local queries in query blocks against the visiting keys in key blocks, the softmax
statistics carried across tiles and ring steps.
Why ring rather than Ulysses here, with N = L·heads·head_dim elements per q/k/v and n devices:
  - Heads: Ulysses needs (heads / tensor) % n == 0. MMDiT has 24 heads: tensor=2 leaves 12, which
    sequence=8 does not divide, and sequence=16 never divides 24. Ring has no condition on heads, and
    supports any L (padded up to a multiple of n with keys that are never attended).
  - Memory per device: both hold O(N/n) of q/k/v/o (ring: q, o, the current and the next K/V block). Logits:
    Ulysses' local attention sees L × L·heads/n of them (70 GB per sample in float32 at 76.5k tokens, 24
    heads, n=8, so it needs a blockwise or fused local attention); an untiled ring step would form
    (L/n)² · heads, n times fewer (8.8 GB there), and the tiled one forms block_q × block_k · heads at a time
    (1024 × 512 by default: 50 MB per sample there), whatever L.
  - Communication per device and forward pass: Ulysses 4 all-to-alls of ~N/n each (≈ 4N/n, shrinking
    with n); ring (n−1) steps of the K and V blocks (≈ 2N, constant in n; backward ≈ 4N). Ring sends more,
    but each step's ppermute is independent of that step's block computation ((L/n)²·heads·head_dim
    flops against L·heads·head_dim/n elements sent), so it hides behind compute when L/n is large,
    which is the long-sequence case this is for. Ulysses stays the cheaper choice where heads divide.
  - Key masks (padded captions in the joint sequence) travel with their K/V block; nothing about the
    text/video boundary needs the text on one device.
The ring has a custom VJP (flash-attention style): forward saves q, k, v, o and the per-row softmax max and
sum, backward runs a second ring in which dK/dV accumulators travel with their K/V block and arrive home
after n steps, so no device holds more than two K/V blocks (and one dK/dV pair) or one tile of logits; each
ring step there is FlashAttention-2's backward over the tiles, recomputing probabilities from the statistics.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from opensora_jax import parallel
from opensora_jax.models import attention
from opensora_jax.models.attention import _block, _dot, _pad_axis, _set_block

log = logging.getLogger(__name__)
_logged: set[tuple] = set()

AttentionFn = Callable[..., jax.Array]  # attention_fn(q, k, v, key_mask=None) over (..., L, heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# Specs and checks shared by both forms
# ----------------------------------------------------------------------------------------------------------


def _check_layout(q: jax.Array, k: jax.Array, v: jax.Array, name: str) -> None:
    if q.ndim < 4:
        raise ValueError(f"{name}: q must be (B, *A, L, heads, head_dim) with at least 4 dims, got shape {q.shape}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"{name}: q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")


def _expand_mask(key_mask: jax.Array | None, q: jax.Array, name: str) -> jax.Array | None:
    """key_mask (..., L) bool with leading dims broadcastable to q's → exactly q.ndim − 2 dims."""
    if key_mask is None:
        return None
    key_mask = jnp.asarray(key_mask, bool)
    lead = q.ndim - 3
    if key_mask.ndim > lead + 1 or key_mask.shape[-1] != q.shape[-3]:
        raise ValueError(f"{name}: key_mask must be (..., L={q.shape[-3]}) over q's leading dims {q.shape[:-3]}, "
                         f"got shape {key_mask.shape}")
    return key_mask.reshape((1,) * (lead + 1 - key_mask.ndim) + key_mask.shape)


def _spec(shape: tuple[int, ...], mesh: Mesh, axis: str, *, seq_dim: int, heads: bool) -> PartitionSpec:
    """Batch (dim 0) by `act_batch`, heads (dim −2, when `heads`) by `act_heads`, dim `seq_dim` on `axis`
    (None: not split); everything else replicated."""
    logical = [None] * len(shape)
    logical[0] = "act_batch"
    if heads:
        logical[-2] = "act_heads"
    entries = list(parallel.logical_to_spec(logical, mesh, parallel.active_rules(), shape))
    for i, entry in enumerate(entries):
        if axis in ((entry,) if isinstance(entry, str) else entry or ()):
            raise ValueError(f"mesh axis {axis!r} already splits dim {i} of an array of shape {shape} under the "
                             f"active logical rules; it cannot also split the sequence")
    if seq_dim is not None:
        entries[seq_dim] = axis
    return PartitionSpec(*entries)


def _split_size(entry, mesh: Mesh) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(parallel.mesh_axis_size(mesh, name) for name in names)


# ----------------------------------------------------------------------------------------------------------
# Ulysses
# ----------------------------------------------------------------------------------------------------------


def _ulysses_problem(q_shape: tuple[int, ...], mesh: Mesh, axis: str) -> str | None:
    """Why `ulysses_attention` cannot split q of `q_shape` over `axis` of `mesh`, or None when it can."""
    n, length, heads = parallel.mesh_axis_size(mesh, axis), q_shape[-3], q_shape[-2]
    if length % n:
        return f"sequence length {length} is not divisible by the size {n} of mesh axis {axis!r}"
    try:
        heads_entry = _spec(q_shape, mesh, axis, seq_dim=len(q_shape) - 3, heads=True)[-2]
    except ValueError as error:  # custom rules already put `axis` on another dim
        return str(error)
    local_heads = heads // _split_size(heads_entry, mesh)
    if local_heads % n:
        return (f"{local_heads} heads per device ({heads} heads split over {heads_entry or 'no mesh axis'}) are not "
                f"divisible by the size {n} of mesh axis {axis!r}; use ring_attention or a mesh whose {axis!r} "
                f"size divides them")
    return None


def sequence_parallel_mesh(q_shape: tuple[int, ...], axis: str = "sequence") -> Mesh | None:
    """The active `sharding_context` mesh when it splits `axis` (size > 1) and `ulysses_attention` can run on
    q of `q_shape` (B, *A, L, heads, head_dim); None otherwise. A shape that does not fit is logged once,
    and the caller keeps its GSPMD path (which falls back to fewer splits on its own)."""
    mesh = parallel.current_mesh()
    if parallel.mesh_axis_size(mesh, axis) == 1:
        return None
    problem = _ulysses_problem(q_shape, mesh, axis)
    if problem:
        if (q_shape, axis) not in _logged:
            _logged.add((q_shape, axis))
            log.info("sequence parallelism by GSPMD constraints instead of shard_map for q %s: %s", q_shape, problem)
        return None
    return mesh


def ulysses_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attention_fn: AttentionFn,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """Self-attention over L with L split on mesh axis `axis`, by all-to-all to a heads split and back.

    q, k, v: (B, *A, L, heads, head_dim), one shape; key_mask: (..., L) bool (False = masked out), leading
    dims broadcastable to (B, *A). `attention_fn(q, k, v, key_mask=...)` is the local attention (e.g.
    `dot_product_attention` with its implementation bound); it sees (b, *A, L, heads / n, head_dim) blocks
    of whole sequences. Returns q's shape, split like q. With `axis` absent from `mesh` or of size 1 this is
    just `attention_fn`. Raises ValueError when L or the heads per device (heads / tensor) do not divide by
    n = the size of `axis`.
    """
    _check_layout(q, k, v, "ulysses_attention")
    key_mask = _expand_mask(key_mask, q, "ulysses_attention")
    n = parallel.mesh_axis_size(mesh, axis)
    if n == 1:
        return attention_fn(q, k, v, key_mask=key_mask)
    problem = _ulysses_problem(q.shape, mesh, axis)
    if problem:
        raise ValueError(f"ulysses_attention: {problem}")
    seq_dim, heads_dim = q.ndim - 3, q.ndim - 2
    qkv_spec = _spec(q.shape, mesh, axis, seq_dim=seq_dim, heads=True)

    def to_heads(a):  # (…, L/n, h, d) → (…, L, h/n, d)
        return jax.lax.all_to_all(a, axis, split_axis=heads_dim, concat_axis=seq_dim, tiled=True)

    def to_tokens(a):  # (…, L, h/n, d) → (…, L/n, h, d)
        return jax.lax.all_to_all(a, axis, split_axis=seq_dim, concat_axis=heads_dim, tiled=True)

    def local(q, k, v, *mask):
        o = attention_fn(to_heads(q), to_heads(k), to_heads(v), key_mask=mask[0] if mask else None)
        return to_tokens(o)

    args, specs = (q, k, v), (qkv_spec,) * 3
    if key_mask is not None:  # every device needs the mask of the whole sequence
        args, specs = args + (key_mask,), specs + (_spec(key_mask.shape, mesh, axis, seq_dim=None, heads=False),)
    # check_vma=False: attention_fn is the caller's (a Pallas or cuDNN kernel, a scan whose carries start as
    # constants) and need not type its values as varying over manual axes.
    return parallel.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)


# ----------------------------------------------------------------------------------------------------------
# Ring attention
# ----------------------------------------------------------------------------------------------------------

# Per-key codes travelling with each K/V block. A caller-masked key gets logit finfo.min (as in
# dot_product_attention, so a row whose keys are all masked averages them); a padding key (the ring's padding
# of L to a multiple of n, or a tile's padding of L/n to whole key blocks) gets −inf and never counts. Running
# maxima start at finfo.min, so −inf never meets −inf (no NaN).
_ATTEND, _MASKED, _PADDING = 1, 0, -1
_MIN = float(jnp.finfo(jnp.float32).min)


class _Tiles(NamedTuple):
    """How one device's L/n queries and the L/n keys of a visiting block are cut (attention.block_layout):
    nq strided query blocks of bq tokens, nk strided key blocks of bk tokens (padded up to bq·nq, bk·nk)."""

    bq: int
    nq: int
    bk: int
    nk: int

    @classmethod
    def of(cls, length: int, block_q: int | None, block_k: int | None) -> "_Tiles":
        return cls(*attention.block_layout(length, block_q or attention.BLOCK_Q),
                   *attention.block_layout(length, block_k or attention.BLOCK_K))


def _heads_first(a: jax.Array, length: int) -> jax.Array:
    """(…, L, h, d) → the blockwise kernel's (…, h, length, d), padded with zeros at the end up to `length`."""
    return _pad_axis(jnp.swapaxes(a, -3, -2), -2, length)


def _tokens_first(a: jax.Array, length: int) -> jax.Array:
    """Inverse of `_heads_first`: (…, h, ≥length, d) → (…, length, h, d)."""
    return jnp.swapaxes(a[..., :length, :], -3, -2)


def _tile_logits(qi: jax.Array, kj: jax.Array, cj: jax.Array) -> jax.Array:
    """float32 logits (…, h, bq, bk) of a pre-scaled query block and a key block with codes cj (…, bk):
    masked keys at float32's minimum, padding keys at −inf."""
    s = _dot("logits", qi, kj, False)
    cj = cj[..., None, None, :]
    return jnp.where(cj == _ATTEND, s, jnp.where(cj == _MASKED, _MIN, -jnp.inf))


def _rotate(tree, axis: str, n: int):
    """Sends every array of `tree` one step around the ring (device i → i + 1 along `axis`)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), tree)


def _ring_inputs(q, k, v, code, tiles: _Tiles):
    """The local blocks in the tiled layout: q pre-scaled (…, h, bq·nq, d); k, v (…, h, bk·nk, d); code (…, bk·nk)
    with the tile padding marked as padding keys. Scaling q in its dtype before q·k, as dot_product_attention."""
    qc = _heads_first(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), tiles.bq * tiles.nq)
    kc, vc = (_heads_first(a, tiles.bk * tiles.nk) for a in (k, v))
    pad = tiles.bk * tiles.nk - code.shape[-1]
    code = jnp.pad(code, [(0, 0)] * (code.ndim - 1) + [(0, pad)], constant_values=_PADDING) if pad else code
    return qc, kc, vc, code


def _ring_forward(q, k, v, code, axis: str, n: int, tiles: _Tiles):
    """Online softmax over the n K/V blocks, each visited tile by tile (query blocks × key blocks).

    Returns float32 (o unnormalised (…, h, bq·nq, d), row max m, row sum l (…, h, bq·nq)) in the tiled layout.
    Per device and ring step the temporaries are one tile's logits (…, h, bq, bk), not (…, L/n, h, L/n).
    """
    nq, nk = tiles.nq, tiles.nk
    qc, kc, vc, code = _ring_inputs(q, k, v, code, tiles)
    # zeros_like keeps q's type over the manual mesh axes, so the loop carries type-check under shard_map.
    acc = jnp.zeros_like(qc, dtype=jnp.float32)
    m = jnp.full_like(acc[..., 0], _MIN)
    l = jnp.zeros_like(acc[..., 0])

    def visit(stats, block):
        """Folds one K/V block (…, h, bk·nk, d) into the statistics, query block by query block."""
        kb, vb, cb = block

        def query_step(stats, i):
            acc, m, l = stats
            qi = _block(qc, -2, nq, i)

            def key_step(carry, j):
                acc_i, m_i, l_i = carry
                s = _tile_logits(qi, _block(kb, -2, nk, j), _block(cb, -1, nk, j))
                m_new = jnp.maximum(m_i, s.max(-1))
                p, correction = jnp.exp(s - m_new[..., None]), jnp.exp(m_i - m_new)
                pv = _dot("out", p.astype(vb.dtype), _block(vb, -2, nk, j), False)
                return (acc_i * correction[..., None] + pv, m_new, l_i * correction + p.sum(-1)), None

            rows = (_block(acc, -2, nq, i), _block(m, -1, nq, i), _block(l, -1, nq, i))
            acc_i, m_i, l_i = jax.lax.scan(key_step, rows, jnp.arange(nk))[0]
            return (_set_block(acc, -2, nq, i, acc_i), _set_block(m, -1, nq, i, m_i),
                    _set_block(l, -1, nq, i, l_i)), None

        return jax.lax.scan(query_step, stats, jnp.arange(nq))[0]

    own, stats = (kc, vc, code), (acc, m, l)
    if n == 1:
        return visit(stats, own)
    # The next block is always sent before the current one is used, so the transfer can overlap the compute.
    block, stats = _rotate(own, axis, n), visit(stats, own)

    def step(_, carry):
        block, stats = carry
        return _rotate(block, axis, n), visit(stats, block)

    block, stats = jax.lax.fori_loop(0, n - 2, step, (block, stats))
    return visit(stats, block)


def _ring_backward(q, k, v, code, o, m, l, do, axis: str, n: int, tiles: _Tiles):
    """Gradients (dq, dk, dv) float32 in q's layout; the dK/dV of each block travel with it and come home after
    n steps. Each ring step is FlashAttention-2's backward over the tiles (key blocks outer, query blocks inner),
    recomputing the probabilities from the saved row statistics m, l (tiled layout, as `_ring_forward` gives)."""
    nq, nk, padded_q = tiles.nq, tiles.nk, tiles.bq * tiles.nq
    length, scale = q.shape[-3], q.shape[-1] ** -0.5
    qc, kc, vc, code = _ring_inputs(q, k, v, code, tiles)
    doc = _heads_first(do, padded_q)
    delta = jnp.sum(doc.astype(jnp.float32) * _heads_first(o, padded_q), axis=-1)  # rowsum(dO ∘ O)
    inv_l = 1.0 / l

    def visit(dq, acc, block):
        """Adds one K/V block's terms to dq (…, h, bq·nq, d) and to the block's travelling dK/dV `acc`."""
        kb, vb, cb = block

        def key_step(carry, j):
            dq, dk, dv = carry
            kj, vj, cj = _block(kb, -2, nk, j), _block(vb, -2, nk, j), _block(cb, -1, nk, j)
            attend = (cj == _ATTEND)[..., None, None, :]

            def query_step(carry, i):
                dq, dk_j, dv_j = carry
                qi, do_i = _block(qc, -2, nq, i), _block(doc, -2, nq, i)
                p = jnp.exp(_tile_logits(qi, kj, cj) - _block(m, -1, nq, i)[..., None])
                p = p * _block(inv_l, -1, nq, i)[..., None]
                dv_j = dv_j + _dot("key_grad", p.astype(do_i.dtype), do_i, False)
                dp = _dot("logits", do_i, vj, False)
                # the reference's where() passes no gradient to masked logits
                ds = jnp.where(attend, p * (dp - _block(delta, -1, nq, i)[..., None]), 0.0)
                dq_i = _block(dq, -2, nq, i) + _dot("out", ds.astype(kj.dtype), kj, False)
                dk_j = dk_j + _dot("key_grad", ds.astype(qi.dtype), qi, False)
                return (_set_block(dq, -2, nq, i, dq_i), dk_j, dv_j), None

            zeros = jnp.zeros_like(kj, dtype=jnp.float32)
            dq, dk_j, dv_j = jax.lax.scan(query_step, (dq, zeros, zeros), jnp.arange(nq))[0]
            dk = _set_block(dk, -2, nk, j, _block(dk, -2, nk, j) + dk_j)
            dv = _set_block(dv, -2, nk, j, _block(dv, -2, nk, j) + dv_j)
            return (dq, dk, dv), None

        dq, dk, dv = jax.lax.scan(key_step, (dq, *acc), jnp.arange(nk))[0]
        return dq, (dk, dv)

    own = (kc, vc, code)
    dq, acc = visit(jnp.zeros_like(qc, dtype=jnp.float32), (jnp.zeros_like(kc, dtype=jnp.float32),) * 2, own)
    if n > 1:
        block, acc = _rotate(own, axis, n), _rotate(acc, axis, n)

        def step(_, carry):
            block, dq, acc = carry
            dq, acc = visit(dq, acc, block)
            return _rotate(block, axis, n), dq, _rotate(acc, axis, n)

        block, dq, acc = jax.lax.fori_loop(0, n - 2, step, (block, dq, acc))
        dq, acc = visit(dq, acc, block)
        acc = _rotate(acc, axis, n)
    dk, dv = acc
    return _tokens_first(dq, length) * scale, _tokens_first(dk, length), _tokens_first(dv, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_local(q, k, v, code, axis: str, n: int, tiles: _Tiles):
    """One device's part of ring attention: local blocks (b, *A, L/n, h, d), code (…, L/n) int8."""
    return _ring_local_fwd(q, k, v, code, axis, n, tiles)[0]


def _ring_local_fwd(q, k, v, code, axis, n, tiles):
    o, m, l = _ring_forward(q, k, v, code, axis, n, tiles)
    o = _tokens_first(o / l[..., None], q.shape[-3])
    return o.astype(v.dtype), (q, k, v, code, o, m, l)


def _ring_local_bwd(axis, n, tiles, residuals, do):
    q, k, v, code, o, m, l = residuals
    dq, dk, dv = _ring_backward(q, k, v, code, o, m, l, do, axis, n, tiles)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    key_mask: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Softmax attention over L with L split on mesh axis `axis`: K/V blocks rotate around the ring.

    q, k, v: (B, *A, L, heads, head_dim), one shape (e.g. a joint text+video sequence); key_mask: (..., L)
    bool (False = masked out), leading dims broadcastable to (B, *A). Scale head_dim**-0.5, softmax
    statistics in float32, as `dot_product_attention`'s xla path (a row whose keys are all masked averages
    v over them, as there). Any L: when n (the size of `axis`) does not divide it, the sequence is padded
    at the end with keys that are never attended and the padding cut from the output. Any head count.
    Each ring step runs tile by tile: the device's L/n queries in blocks of at most `block_q` tokens against
    the visiting L/n keys in blocks of at most `block_k` (default attention.BLOCK_Q / BLOCK_K, laid out by
    attention.block_layout), so temporaries are one tile's logits, forward and backward.
    Returns q's shape and dtype of v. Differentiable (custom VJP, see the module docstring).
    """
    _check_layout(q, k, v, "ring_attention")
    key_mask = _expand_mask(key_mask, q, "ring_attention")
    n = parallel.mesh_axis_size(mesh, axis)
    seq_dim, length = q.ndim - 3, q.shape[-3]
    code = jnp.full((1,) * seq_dim + (length,), _ATTEND, jnp.int8) if key_mask is None else key_mask.astype(jnp.int8)
    if n == 1:  # no ring: the same computation on the one block, outside shard_map
        return _ring_local(q, k, v, code, axis, 1, _Tiles.of(length, block_q, block_k))
    pad = -length % n
    if pad:
        q, k, v = (jnp.pad(a, [(0, 0)] * seq_dim + [(0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
        code = jnp.pad(code, [(0, 0)] * seq_dim + [(0, pad)], constant_values=_PADDING)
    tiles = _Tiles.of((length + pad) // n, block_q, block_k)
    qkv_spec = _spec(q.shape, mesh, axis, seq_dim=seq_dim, heads=True)
    code_spec = _spec(code.shape, mesh, axis, seq_dim=seq_dim, heads=False)
    local = lambda q, k, v, code: _ring_local(q, k, v, code, axis, n, tiles)  # noqa: E731
    o = parallel.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (code_spec,), out_specs=qkv_spec)(q, k, v, code)
    return o[..., :length, :, :] if pad else o
