"""Ulysses and ring attention under shard_map equal one-device attention, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from opensora_jax import parallel
from opensora_jax.models.sequence_parallel import ring_attention, ulysses_attention

try:
    from opensora_jax.models.attention import dot_product_attention
except ImportError:
    from opensora_jax.models.layers import dot_product_attention

REL = 1e-5


def _assert_close(actual, expected, what=""):
    """max |actual − expected| ≤ REL · max |expected|."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err, scale = float(np.max(np.abs(actual - expected))), float(np.max(np.abs(expected)))
    assert err <= REL * scale, f"{what}: max error {err:.3g} > {REL} × {scale:.3g}"


def _qkv(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def _reference(q, k, v, key_mask):
    return dot_product_attention(q, k, v, key_mask=key_mask)


def _loss(attention):
    """A scalar whose gradient reaches every output element with a different weight."""
    def loss(q, k, v):
        weights = jnp.arange(q.size, dtype=q.dtype).reshape(q.shape) / q.size
        return jnp.sum(jnp.sin(attention(q, k, v)) * weights)

    return loss


def _run_sharded(fn, mesh, *args):
    with parallel.sharding_context(mesh):
        return jax.jit(fn)(*args)


# -- Ulysses ---------------------------------------------------------------------------------------------------

ULYSSES_SHAPE = (2, 3, 16, 8, 4)  # (B, frames, L, heads, head_dim)


# The unmasked variants add little over the masked ones: they run under `pytest -m slow`.
@pytest.mark.parametrize("spec, batch", [("sequence=8", 2), ("data=2,sequence=4", 2), ("tensor=2,sequence=4", 2),
                                         ("data=2,sequence=4", 1)])  # batch 1: replicated over data
@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no_mask", "mask"])
def test_ulysses_matches_unsharded(spec, batch, masked):
    mesh = parallel.make_mesh(spec)
    shape = (batch,) + ULYSSES_SHAPE[1:]
    q, k, v = _qkv(shape)
    key_mask = None
    if masked:  # per (sample, frame) keys, one frame with every key masked
        key_mask = jnp.asarray(np.random.default_rng(1).random(shape[:3]) < 0.6).at[-1, 2].set(False)

    def ulysses(q, k, v):
        return ulysses_attention(q, k, v, dot_product_attention, mesh=mesh, key_mask=key_mask)

    out = _run_sharded(ulysses, mesh, q, k, v)
    _assert_close(out, _reference(q, k, v, key_mask), "forward")
    expected = parallel.logical_to_spec(("act_batch", None, "act_tokens", "act_heads", None), mesh, shape=out.shape)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, expected), out.ndim), out.sharding

    grads = _run_sharded(jax.grad(_loss(ulysses), argnums=(0, 1, 2)), mesh, q, k, v)
    expected_grads = jax.grad(_loss(lambda q, k, v: _reference(q, k, v, key_mask)), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, expected_grads):
        _assert_close(got, want, f"d{name}")


def test_ulysses_broadcast_mask_and_one_device_axis():
    q, k, v = _qkv(ULYSSES_SHAPE)
    key_mask = jnp.arange(16) < 11  # (L,): the same keys for every sample and frame
    expected = _reference(q, k, v, key_mask)
    mesh = parallel.make_mesh("sequence=8")
    out = _run_sharded(lambda q, k, v: ulysses_attention(q, k, v, dot_product_attention, mesh=mesh, key_mask=key_mask),
                       mesh, q, k, v)
    _assert_close(out, expected, "sequence=8")
    data_only = parallel.make_mesh("data=8")  # no sequence split: plain local attention
    out = ulysses_attention(q, k, v, dot_product_attention, mesh=data_only, key_mask=key_mask)
    _assert_close(out, expected, "data=8")


@pytest.mark.parametrize(
    "spec, shape, message",
    [
        ("sequence=8", (2, 1, 16, 4, 4), "4 heads per device .* not divisible by the size 8"),
        ("tensor=2,sequence=4", (2, 1, 16, 4, 4), "2 heads per device .* not divisible by the size 4"),
        ("sequence=8", (2, 1, 12, 8, 4), "sequence length 12 is not divisible by the size 8"),
    ],
)
def test_ulysses_rejects_indivisible_shapes(spec, shape, message):
    q, k, v = _qkv(shape)
    with pytest.raises(ValueError, match=message):
        ulysses_attention(q, k, v, dot_product_attention, mesh=parallel.make_mesh(spec))


# -- ring attention on a joint text + video sequence -------------------------------------------------------------

HEADS, HEAD_DIM, TEXT_LEN = 6, 4, 5  # 6 heads: Ulysses could not split them over sequence=8


def _joint(batch: int, video_len: int):
    """q, k, v (B, text + video, heads, head_dim) and the key mask: captions padded to TEXT_LEN, sample 0's
    caption 2 tokens long, later ones longer; every video token valid."""
    q, k, v = _qkv((batch, TEXT_LEN + video_len, HEADS, HEAD_DIM), seed=3)
    text_valid = np.arange(TEXT_LEN)[None] < (2 + np.arange(batch))[:, None]
    key_mask = jnp.asarray(np.concatenate([text_valid, np.ones((batch, video_len), bool)], axis=1))
    return q, k, v, key_mask


@pytest.mark.parametrize(
    "spec, batch, video_len",
    [
        ("sequence=8", 2, 19),  # L = 24
        ("sequence=8", 2, 16),  # L = 21: padded to 24 inside
        pytest.param("data=2,sequence=4", 2, 16, marks=pytest.mark.slow),  # batch 1 below covers data=2
        ("data=2,sequence=4", 1, 15),  # batch 1 cannot split over data: replicated there
        ("tensor=2,sequence=4", 2, 15),  # 6 heads split over tensor
    ],
)
def test_ring_matches_unsharded(spec, batch, video_len):
    mesh = parallel.make_mesh(spec)
    q, k, v, key_mask = _joint(batch, video_len)

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, key_mask=key_mask)

    def reference(q, k, v):
        return _reference(q, k, v, key_mask)

    _assert_close(_run_sharded(ring, mesh, q, k, v), reference(q, k, v), "forward")
    grads = _run_sharded(jax.grad(_loss(ring), argnums=(0, 1, 2)), mesh, q, k, v)
    for name, got, want in zip("qkv", grads, jax.grad(_loss(reference), argnums=(0, 1, 2))(q, k, v)):
        _assert_close(got, want, f"d{name}")


def test_ring_without_mask_and_with_every_key_masked():
    """No mask; and a sample whose keys are all masked averages v over them, as dot_product_attention does
    (padding added for an L of 21 on 8 devices does not count)."""
    mesh = parallel.make_mesh("sequence=8")
    q, k, v, key_mask = _joint(2, 16)
    key_mask = key_mask.at[1].set(False)
    for mask in (None, key_mask):
        out = _run_sharded(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, key_mask=mask), mesh, q, k, v)
        _assert_close(out, _reference(q, k, v, mask), f"mask {mask is not None}")
    grads = _run_sharded(jax.grad(_loss(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, key_mask=key_mask)),
                                  argnums=(0, 1, 2)), mesh, q, k, v)
    expected = jax.grad(_loss(lambda q, k, v: _reference(q, k, v, key_mask)), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, expected):
        _assert_close(got, want, f"d{name}")


def test_ring_one_device_axis_and_leading_axes():
    """(B, A, L, h, d) with an extra leading axis, on a mesh without a sequence split (no ring)."""
    q, k, v = _qkv((2, 3, 7, HEADS, HEAD_DIM))
    key_mask = jnp.arange(7) != 3
    out = ring_attention(q, k, v, mesh=parallel.make_mesh("data=8"), key_mask=key_mask)
    _assert_close(out, _reference(q, k, v, key_mask), "forward")


def test_ring_rejects_bad_layouts():
    q, k, v = _qkv((2, 8, HEADS, HEAD_DIM))
    mesh = parallel.make_mesh("sequence=8")
    with pytest.raises(ValueError, match="one shape"):
        ring_attention(q, k[:, :4], v, mesh=mesh)
    with pytest.raises(ValueError, match="key_mask must be"):
        ring_attention(q, k, v, mesh=mesh, key_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="at least 4 dims"):
        ring_attention(q[0], k[0], v[0], mesh=mesh)


# -- ring attention tiled into query × key blocks within each ring step ------------------------------------------


@pytest.mark.parametrize(
    "spec, batch, video_len, block_q, block_k",
    [
        # L = 45 + padding 3 → 6 per device; 2 query blocks of 3, 3 key blocks of 2
        ("sequence=8", 2, 40, 4, 2),
        # L = 42 + padding 2 → 11 per device; 3 query blocks of 4, 4 key blocks of 3 (tiles padded to 12)
        ("tensor=2,sequence=4", 2, 37, 4, 3),
        # no ring: 21 tokens on one device in 3 query blocks of 7 and 5 key blocks of 5 (padded to 25)
        ("data=8", 2, 16, 7, 5),
    ],
)
def test_ring_tiled_matches_untiled_and_unsharded(spec, batch, video_len, block_q, block_k):
    """Ring steps cut into several query and key blocks (with ring padding, tile padding and a sample whose keys
    are all masked) give the one-tile ring's and dot_product_attention's result, forward and gradients."""
    mesh = parallel.make_mesh(spec)
    q, k, v, key_mask = _joint(batch, video_len)
    key_mask = key_mask.at[-1].set(False)

    def ring(block_q, block_k):
        return lambda q, k, v: ring_attention(q, k, v, mesh=mesh, key_mask=key_mask, block_q=block_q,
                                              block_k=block_k)

    tiled, untiled = ring(block_q, block_k), ring(1 << 20, 1 << 20)

    def reference(q, k, v):
        return _reference(q, k, v, key_mask)

    out = _run_sharded(tiled, mesh, q, k, v)
    _assert_close(out, _run_sharded(untiled, mesh, q, k, v), "forward vs untiled")
    _assert_close(out, reference(q, k, v), "forward vs unsharded")
    grads = _run_sharded(jax.grad(_loss(tiled), argnums=(0, 1, 2)), mesh, q, k, v)
    untiled_grads = _run_sharded(jax.grad(_loss(untiled), argnums=(0, 1, 2)), mesh, q, k, v)
    expected = jax.grad(_loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, got, one_tile, want in zip("qkv", grads, untiled_grads, expected):
        _assert_close(got, one_tile, f"d{name} vs untiled")
        _assert_close(got, want, f"d{name} vs unsharded")


def test_ring_temporaries_grow_linearly_in_length():
    """Compiled per-device temporaries (forward, and forward + backward) of the tiled ring grow about linearly
    with L; the one-tile ring's (L/n)² logits grow quadratically (the 768px MMDiT case, scaled down)."""
    mesh = parallel.make_mesh("sequence=8")

    def temporaries(length, block, grad):
        def fn(q, k, v):
            return ring_attention(q, k, v, mesh=mesh, block_q=block, block_k=block)

        if grad:
            fn = jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
        arg = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
        with parallel.sharding_context(mesh):
            return jax.jit(fn).lower(arg, arg, arg).compile().memory_analysis().temp_size_in_bytes

    short, long = 8 * 512, 8 * 2048  # 512 and 2048 tokens per device, 4× longer
    for grad in (False, True):
        tiled_short, tiled_long = temporaries(short, 128, grad), temporaries(long, 128, grad)
        untiled_long = temporaries(long, long, grad)
        logits = 2 * (long // 8) ** 2 * 4  # one float32 (L/n)² · heads buffer
        assert tiled_long < 6 * tiled_short, (grad, tiled_short, tiled_long)  # quadratic would be 16×
        assert tiled_long < logits / 10 and untiled_long > logits, (grad, tiled_long, logits, untiled_long)
