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
Why ring rather than Ulysses here, with N = L·heads·head_dim elements per q/k/v and n devices:
  - Heads: Ulysses needs (heads / tensor) % n == 0. MMDiT has 24 heads: tensor=2 leaves 12, which
    sequence=8 does not divide, and sequence=16 never divides 24. Ring has no condition on heads, and
    supports any L (padded up to a multiple of n with keys that are never attended).
  - Memory per device: both hold O(N/n) of q/k/v/o (ring: q, o, the current and the next K/V block). Logits:
    Ulysses' local attention sees L × L·heads/n of them (70 GB per sample in float32 at 76.5k tokens, 24
    heads, n=8, so it needs a blockwise or fused local attention); a ring step forms (L/n)² · heads, n times
    fewer (8.8 GB there). Tiling each ring step into key blocks would bound that further; not done here.
  - Communication per device and forward pass: Ulysses 4 all-to-alls of ~N/n each (≈ 4N/n, shrinking
    with n); ring (n−1) steps of the K and V blocks (≈ 2N, constant in n; backward ≈ 4N). Ring sends more,
    but each step's ppermute is independent of that step's block computation ((L/n)²·heads·head_dim
    flops against L·heads·head_dim/n elements sent), so it hides behind compute when L/n is large,
    which is the long-sequence case this is for. Ulysses stays the cheaper choice where heads divide.
  - Key masks (padded captions in the joint sequence) travel with their K/V block; nothing about the
    text/video boundary needs the text on one device.
The ring has a custom VJP (flash-attention style): forward saves q, k, v, o and the per-row softmax max and
sum, backward runs a second ring in which dK/dV accumulators travel with their K/V block and arrive home
after n steps, so no device holds more than two K/V blocks (and one dK/dV pair) or one block of logits.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from opensora_jax import parallel

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
# dot_product_attention, so a row whose keys are all masked averages them); a padding key gets −inf and
# never counts. Running maxima start at finfo.min or above, so −inf never meets −inf (no NaN).
_ATTEND, _MASKED, _PADDING = 1, 0, -1
_MIN = float(jnp.finfo(jnp.float32).min)


def _logits(q_scaled: jax.Array, k: jax.Array, code: jax.Array) -> jax.Array:
    """(…, Lq, h, d) · (…, Lk, h, d) → float32 (…, Lq, h, Lk), with masked and padding keys filled in."""
    s = jnp.einsum("...qhd,...khd->...qhk", q_scaled, k, preferred_element_type=jnp.float32)
    code = code[..., None, None, :]
    return jnp.where(code == _ATTEND, s, jnp.where(code == _MASKED, _MIN, -jnp.inf))


def _rotate(tree, axis: str, n: int):
    """Sends every array of `tree` one step around the ring (device i → i + 1 along `axis`)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), tree)


def _ring_forward(q, k, v, code, axis: str, n: int):
    """Online softmax over the n K/V blocks: returns (o float32 unnormalised, row max m, row sum l)."""
    q_scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def accumulate(stats, block):
        o, m, l = stats
        bk, bv, bcode = block
        s = _logits(q_scaled, bk, bcode)
        m_new = jnp.maximum(m, s.max(-1))
        p, correction = jnp.exp(s - m_new[..., None]), jnp.exp(m - m_new)
        pv = jnp.einsum("...qhk,...khd->...qhd", p.astype(bv.dtype), bv, preferred_element_type=jnp.float32)
        return o * correction[..., None] + pv, m_new, l * correction + p.sum(-1)

    def first(block):  # the own block starts the statistics, so they carry the block's sharding type
        bk, bv, bcode = block
        s = _logits(q_scaled, bk, bcode)
        m = jnp.maximum(s.max(-1), _MIN)
        p = jnp.exp(s - m[..., None])
        o = jnp.einsum("...qhk,...khd->...qhd", p.astype(bv.dtype), bv, preferred_element_type=jnp.float32)
        return o, m, p.sum(-1)

    own = (k, v, code)
    if n == 1:
        return first(own)
    # The next block is always sent before the current one is used, so the transfer can overlap the compute.
    block, stats = _rotate(own, axis, n), first(own)

    def step(_, carry):
        block, stats = carry
        return _rotate(block, axis, n), accumulate(stats, block)

    block, stats = jax.lax.fori_loop(0, n - 2, step, (block, stats))
    return accumulate(stats, block)


def _ring_backward(q, k, v, code, o, m, l, do, axis: str, n: int):
    """Gradients (dq, dk, dv) float32; the dK/dV of each block travel with it and come home after n steps."""
    scale = q.shape[-1] ** -0.5
    q_scaled = q * jnp.asarray(scale, q.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1)  # (…, Lq, h): rowsum(dO ∘ O)

    def grads(block):
        bk, bv, bcode = block
        p = jnp.exp(_logits(q_scaled, bk, bcode) - m[..., None]) / l[..., None]
        dv = jnp.einsum("...qhk,...qhd->...khd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("...qhd,...khd->...qhk", do, bv, preferred_element_type=jnp.float32)
        ds = jnp.where(bcode[..., None, None, :] == _ATTEND, p * (dp - delta[..., None]), 0.0)
        dq = jnp.einsum("...qhk,...khd->...qhd", ds.astype(bk.dtype), bk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("...qhk,...qhd->...khd", ds.astype(q.dtype), q_scaled, preferred_element_type=jnp.float32)
        return dq * scale, dk, dv

    own = (k, v, code)
    if n == 1:
        return grads(own)
    dq, dk, dv = grads(own)
    block, acc = _rotate(own, axis, n), _rotate((dk, dv), axis, n)

    def step(_, carry):
        block, dq, acc = carry
        gq, gk, gv = grads(block)
        return _rotate(block, axis, n), dq + gq, _rotate((acc[0] + gk, acc[1] + gv), axis, n)

    block, dq, acc = jax.lax.fori_loop(0, n - 2, step, (block, dq, acc))
    gq, gk, gv = grads(block)
    dk, dv = _rotate((acc[0] + gk, acc[1] + gv), axis, n)
    return dq + gq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_local(q, k, v, code, axis: str, n: int):
    """One device's part of ring attention: local blocks (b, *A, L/n, h, d), code (…, L/n) int8."""
    o, _, l = _ring_forward(q, k, v, code, axis, n)
    return (o / l[..., None]).astype(v.dtype)


def _ring_local_fwd(q, k, v, code, axis, n):
    o, m, l = _ring_forward(q, k, v, code, axis, n)
    o = o / l[..., None]
    return o.astype(v.dtype), (q, k, v, code, o, m, l)


def _ring_local_bwd(axis, n, residuals, do):
    q, k, v, code, o, m, l = residuals
    dq, dk, dv = _ring_backward(q, k, v, code, o, m, l, do, axis, n)
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
) -> jax.Array:
    """Softmax attention over L with L split on mesh axis `axis`: K/V blocks rotate around the ring.

    q, k, v: (B, *A, L, heads, head_dim), one shape (e.g. a joint text+video sequence); key_mask: (..., L)
    bool (False = masked out), leading dims broadcastable to (B, *A). Scale head_dim**-0.5, softmax
    statistics in float32, as `dot_product_attention`'s xla path (a row whose keys are all masked averages
    v over them, as there). Any L: when n (the size of `axis`) does not divide it, the sequence is padded
    at the end with keys that are never attended and the padding cut from the output. Any head count.
    Returns q's shape and dtype of v. Differentiable (custom VJP, see the module docstring).
    """
    _check_layout(q, k, v, "ring_attention")
    key_mask = _expand_mask(key_mask, q, "ring_attention")
    n = parallel.mesh_axis_size(mesh, axis)
    seq_dim, length = q.ndim - 3, q.shape[-3]
    code = jnp.full((1,) * seq_dim + (length,), _ATTEND, jnp.int8) if key_mask is None else key_mask.astype(jnp.int8)
    if n == 1:  # no ring: the same computation on the one block, outside shard_map
        return _ring_local(q, k, v, code, axis, 1)
    pad = -length % n
    if pad:
        q, k, v = (jnp.pad(a, [(0, 0)] * seq_dim + [(0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
        code = jnp.pad(code, [(0, 0)] * seq_dim + [(0, pad)], constant_values=_PADDING)
    qkv_spec = _spec(q.shape, mesh, axis, seq_dim=seq_dim, heads=True)
    code_spec = _spec(code.shape, mesh, axis, seq_dim=seq_dim, heads=False)
    local = lambda q, k, v, code: _ring_local(q, k, v, code, axis, n)  # noqa: E731
    o = parallel.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (code_spec,), out_specs=qkv_spec)(q, k, v, code)
    return o[..., :length, :, :] if pad else o
