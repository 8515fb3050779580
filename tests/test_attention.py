"""The one attention function: blockwise against the naive (xla) path, forward and gradients; how `auto` and the
fallbacks resolve; cudnn's argument plumbing; the splash kernel (Pallas interpreter off TPU), alone and through
shard_map on the 8 fake devices; blockwise memory; the models (STDiT3, the VAE mid block) through it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax import parallel
from opensora_jax.models import attention, splash
from opensora_jax.models.attention import blockwise_attention, dot_product_attention, naive_attention
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config
from opensora_jax.models.vae.spatial import MidAttention2D, SpatialVAEConfig

BACKEND = jax.default_backend()
needs_kernel = pytest.mark.skipif(not splash.kernel_available(), reason=f"jax {jax.__version__} has no splash kernel")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    attention._warned.clear()
    yield
    attention._warned.clear()


def _qkv(key, q_shape, kv_shape, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, q_shape, dtype), jax.random.normal(kk, kv_shape, dtype),
            jax.random.normal(kv, kv_shape, dtype))


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def _close(got, want, rtol=1e-5):
    """Equal up to float32 rounding, relative to the array's scale."""
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _prefix(lengths, length):
    return jnp.arange(length) < jnp.asarray(lengths)[..., None]


# ------------------------------------------------------------------------------------------------------------
# blockwise = naive
# ------------------------------------------------------------------------------------------------------------

# name: (q shape, kv shape, key mask or None, (block_q, block_k)); small blocks force several query and key
# blocks with padding at the end of both.
BLOCKWISE_CASES = {
    "self_odd_lengths": ((2, 3, 37, 2, 8), (2, 3, 37, 2, 8), None, (8, 5)),
    "padded_keys": ((2, 45, 2, 8), (2, 45, 2, 8), _prefix(jnp.array([45, 13]), 45), (16, 7)),
    "cross_text_lengths": ((3, 2, 21, 2, 8), (3, 1, 19, 2, 8),
                           _prefix(jnp.array([19, 4, 1]), 19)[:, None, :], (8, 4)),
    "fully_masked_rows": ((2, 2, 30, 2, 8), (2, 1, 26, 2, 8),
                          _prefix(jnp.array([[26, 0], [0, 3]]), 26), (9, 6)),
    "scattered_mask": ((2, 17, 2, 8), (2, 23, 2, 8), jax.random.bernoulli(jax.random.key(9), 0.4, (2, 23)), (4, 4)),
    "broadcast_leading": ((2, 3, 20, 2, 8), (20, 2, 8), _prefix(jnp.array([20, 5, 0]), 20), (6, 6)),
    "one_block": ((2, 33, 3, 16), (2, 40, 3, 16), None, (None, None)),
}


@pytest.mark.parametrize("case", sorted(BLOCKWISE_CASES))
def test_blockwise_matches_naive(case):
    q_shape, kv_shape, mask, (bq, bk) = BLOCKWISE_CASES[case]
    q, k, v = _qkv(jax.random.key(0), q_shape, kv_shape)
    got = blockwise_attention(q, k, v, mask, block_q=bq, block_k=bk)
    want = naive_attention(q, k, v, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want)


@pytest.mark.parametrize("case", sorted(BLOCKWISE_CASES))
def test_blockwise_gradients_match_naive(case):
    q_shape, kv_shape, mask, (bq, bk) = BLOCKWISE_CASES[case]
    q, k, v = _qkv(jax.random.key(1), q_shape, kv_shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    got = jax.jit(jax.grad(loss(lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=bq, block_k=bk)),
                           (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: naive_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        _close(g, w)


def test_blockwise_fully_masked_row_is_mean_of_v():
    q, k, v = _qkv(jax.random.key(2), (1, 5, 1, 4), (1, 9, 1, 4))
    out = blockwise_attention(q, k, v, jnp.zeros((1, 9), bool), block_q=2, block_k=4)
    np.testing.assert_allclose(out, jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), out.shape), rtol=1e-6)


def test_blockwise_bfloat16_close_to_naive():
    q, k, v = _qkv(jax.random.key(3), (2, 70, 2, 32), (2, 70, 2, 32), jnp.bfloat16)
    got = blockwise_attention(q, k, v, block_q=32, block_k=16)
    assert got.dtype == jnp.bfloat16
    assert _max_diff(got, naive_attention(q, k, v)) < 2e-2


def test_key_lengths_equal_prefix_mask_on_every_path():
    q, k, v = _qkv(jax.random.key(4), (3, 2, 12, 2, 8), (3, 1, 10, 2, 8))
    lengths = jnp.array([[10], [3], [0]])
    want = naive_attention(q, k, v, _prefix(lengths, 10))
    for implementation in ("xla", "blockwise", "auto"):
        _close(dot_product_attention(q, k, v, key_lengths=lengths, implementation=implementation), want)
    with pytest.raises(ValueError, match="not both"):
        dot_product_attention(q, k, v, _prefix(lengths, 10), key_lengths=lengths)


def test_valid_first_turns_any_mask_into_lengths():
    """Keys packed valid-first with their count attend exactly as the original keys under the original mask."""
    q, k, v = _qkv(jax.random.key(5), (2, 7, 2, 8), (2, 11, 2, 8))
    mask = jnp.array([[0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0], [0] * 11], bool)
    order, lengths = attention.valid_first(mask)
    np.testing.assert_array_equal(lengths, [4, 0])
    np.testing.assert_array_equal(order[0, :4], [1, 2, 5, 8])
    packed = [jnp.take_along_axis(a, order[..., None, None], axis=1) for a in (k, v)]
    got = dot_product_attention(q, *packed, key_lengths=lengths)
    _close(got, naive_attention(q, k, v, mask))


def test_block_layout_pads_less_than_one_token_per_block():
    assert attention.block_layout(100, 512) == (100, 1)
    assert attention.block_layout(4096, 1024) == (1024, 4)
    assert attention.block_layout(1025, 1024) == (513, 2)
    for length, limit in ((4097, 512), (77, 8), (16384, 1000)):
        block, count = attention.block_layout(length, limit)
        assert block <= limit and length <= block * count < length + count


# ------------------------------------------------------------------------------------------------------------
# memory: blockwise never holds L × L
# ------------------------------------------------------------------------------------------------------------


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """At L = 4096 (one head) the naive path holds at least one L × L float32 logits array, forward and backward;
    blockwise stays under a quarter of that (a few 1024 × 512 blocks), and doubling L does not double its
    temporaries (only O(L × head_dim) arrays grow) while the naive path's quadruple."""
    def grad(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2))

    def temps(fn, length):
        q = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
        return _temp_bytes(fn, q, q, q), _temp_bytes(grad(fn), q, q, q)

    square = 4096 * 4096 * 4
    naive, block = temps(naive_attention, 4096), temps(blockwise_attention, 4096)
    assert min(naive) >= square
    assert max(block) < square / 4
    block_twice = temps(blockwise_attention, 8192)
    assert all(twice < 2 * once for twice, once in zip(block_twice, block))


# ------------------------------------------------------------------------------------------------------------
# choosing the implementation
# ------------------------------------------------------------------------------------------------------------


def _pretend(monkeypatch, backend: str, *, cuda: bool = False, kernel: bool = True):
    monkeypatch.setattr(attention, "_backend", lambda: backend)
    monkeypatch.setattr(attention, "_on_cuda_gpu", lambda: cuda)
    monkeypatch.setattr(splash, "kernel_available", lambda: kernel)


@pytest.mark.skipif(BACKEND != "cpu", reason="checks the CPU choice")
def test_auto_is_blockwise_on_cpu_without_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert attention.resolve_attention("auto", dtype, 64, 4096) == "blockwise"
    assert not caplog.records


@pytest.mark.parametrize("backend, cuda, dtype, head_dim, kv_len, want", [
    ("gpu", True, jnp.bfloat16, 72, 300, "cudnn"),
    ("gpu", True, jnp.float16, 128, 8, "cudnn"),
    ("gpu", True, jnp.float32, 72, 300, "blockwise"),  # parity and float32 runs
    ("gpu", True, jnp.bfloat16, 512, 300, "blockwise"),  # the VAE's single 512-wide head
    ("gpu", False, jnp.bfloat16, 72, 300, "blockwise"),  # ROCm
    ("tpu", False, jnp.bfloat16, 72, 300, "splash"),
    ("tpu", False, jnp.float16, 72, 128, "splash"),
    ("tpu", False, jnp.float32, 72, 300, "blockwise"),  # parity and float32 runs
    ("tpu", False, jnp.bfloat16, 512, 300, "splash"),  # any head_dim (padded to 128 lanes)
    ("tpu", False, jnp.bfloat16, 72, 16, "blockwise"),  # temporal attention: too few keys
])
def test_auto_choice_per_backend(monkeypatch, backend, cuda, dtype, head_dim, kv_len, want):
    _pretend(monkeypatch, backend, cuda=cuda)
    assert attention.resolve_attention("auto", dtype, head_dim, kv_len) == want


def test_explicit_choices_that_cannot_run_fall_back_to_auto_warning_once(monkeypatch, caplog):
    _pretend(monkeypatch, "gpu", cuda=True)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for _ in range(2):
            assert attention.resolve_attention("splash", jnp.bfloat16, 72, 300) == "cudnn"
            assert attention.resolve_attention("cudnn", jnp.float32, 72, 300) == "blockwise"
            assert attention.resolve_attention("cudnn", jnp.bfloat16, 100, 300) == "blockwise"
        assert attention.resolve_attention("xla", jnp.bfloat16, 72, 300) == "xla"
    assert [r.getMessage() for r in caplog.records] == [
        "splash attention needs a TPU; using cudnn attention on gpu",
        "cudnn attention needs bfloat16 or float16 inputs, got float32; using blockwise attention",
        "cudnn attention needs a head_dim that is a multiple of 8 and at most 128, got 100; using blockwise attention",
    ]


@pytest.mark.skipif(BACKEND == "tpu", reason="splash runs natively on TPU")
def test_splash_falls_back_off_tpu_warning_once(caplog):
    q, k, v = _qkv(jax.random.key(3), (2, 20, 2, 8), (2, 140, 2, 8))
    mask = jnp.arange(140)[None] < jnp.array([[5], [140]])
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        first = dot_product_attention(q, k, v, mask, implementation="splash")
        second = jax.jit(lambda *a: dot_product_attention(*a, implementation="splash"))(q, k, v, mask)
    messages = [r.getMessage() for r in caplog.records if "splash" in r.getMessage()]
    assert messages == [f"splash attention needs a TPU; using blockwise attention on {BACKEND}"]
    np.testing.assert_array_equal(first, dot_product_attention(q, k, v, mask, implementation="blockwise"))
    np.testing.assert_allclose(second, first, rtol=1e-6, atol=1e-6)


def test_splash_short_keys_fall_back_warning_once(caplog, monkeypatch):
    """Where the splash kernel could run (pretended TPU), key sequences under 128 tokens still take another path
    (auto's: blockwise); that fallback is logged once, whatever the short length."""
    _pretend(monkeypatch, "tpu")
    q, k, v = _qkv(jax.random.key(5), (2, 20, 2, 8), (2, 16, 2, 8))
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        out = dot_product_attention(q, k, v, implementation="splash")
        dot_product_attention(q, k, v, implementation="splash")
        dot_product_attention(q, k[:, :5], v[:, :5], implementation="splash")
    messages = [r.getMessage() for r in caplog.records if "splash" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "at least 128 tokens" in messages[0] and "using blockwise attention for 16 keys" in messages[0]
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, implementation="blockwise"))


def test_cudnn_falls_back_where_unavailable_warning_once(caplog):
    q, k, v = _qkv(jax.random.key(4), (2, 20, 2, 8), (2, 20, 2, 8))  # float32: never a cuDNN input
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for _ in range(2):
            out = dot_product_attention(q, k, v, implementation="cudnn")
    messages = [r.getMessage() for r in caplog.records if "cudnn" in r.getMessage()]
    expected = ("cudnn attention needs bfloat16 or float16 inputs, got float32; using blockwise attention"
                if attention._on_cuda_gpu() else
                f"cudnn attention needs an NVIDIA GPU; using blockwise attention on {BACKEND}")
    assert messages == [expected]
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, implementation="blockwise"))


def test_unknown_implementation_names_the_choices():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="blockwise"):
        dot_product_attention(q, q, q, implementation="flash")


# ------------------------------------------------------------------------------------------------------------
# cudnn: argument plumbing (through jax.nn.dot_product_attention's xla implementation without a GPU)
# ------------------------------------------------------------------------------------------------------------


def test_cudnn_seq_lengths():
    q_lens, kv_lens = attention.cudnn_seq_lengths(jnp.array([[7], [0]]), (2, 3), q_len=5, kv_len=9)
    assert q_lens.dtype == kv_lens.dtype == jnp.int32
    np.testing.assert_array_equal(q_lens, [5] * 6)
    np.testing.assert_array_equal(kv_lens, [7, 7, 7, 1, 1, 1])  # 0 → 1: the row is replaced afterwards


@pytest.mark.parametrize("masking", ["lengths", "mask", "none"])
def test_cudnn_arguments_match_naive(masking):
    """STDiT3's cross-attention layout: q (B, T, S, h, d), k/v (B, 1, L, h, d), per-sample text lengths (one 0)."""
    q, k, v = _qkv(jax.random.key(6), (3, 2, 10, 2, 8), (3, 1, 12, 2, 8))
    lengths = jnp.array([[12], [5], [0]])
    mask = _prefix(lengths, 12)
    kwargs = {"lengths": dict(key_lengths=lengths), "mask": dict(key_mask=mask), "none": {}}[masking]
    got = attention.cudnn_attention(q, k, v, implementation="xla", **kwargs)
    want = naive_attention(q, k, v, None if masking == "none" else mask)
    assert got.shape == want.shape
    _close(got, want)


# ------------------------------------------------------------------------------------------------------------
# splash: the kernel alone, and through shard_map on 8 devices
# ------------------------------------------------------------------------------------------------------------


def test_block_size_pads_little():
    assert [splash.block_size(n) for n in (1, 130, 200, 300, 512, 3600, 4096)] == [128, 256, 256, 128, 512, 256, 512]


@needs_kernel
@pytest.mark.parametrize("case", ["self", "cross_masked", "mask_per_frame"])
def test_splash_kernel_matches_naive(case):
    """Leading dims, lengths that are not block multiples, several kv blocks, key masks with a row where all
    but one key is masked and a row where every key is masked."""
    key = jax.random.key(0)
    if case == "self":  # (B, T, S, h, d) self-attention, S = 150 over two padded q/kv blocks
        q, k, v = _qkv(key, (2, 3, 150, 2, 24), (2, 3, 150, 2, 24))
        mask = None
    elif case == "cross_masked":  # STDiT3 cross-attention: k/v (B, 1, L) broadcast over frames, fold into q
        q, k, v = _qkv(key, (3, 2, 70, 2, 24), (3, 1, 300, 2, 24))
        mask = (jnp.arange(300)[None] < jnp.array([300, 1, 0])[:, None])[:, None, :]
    else:  # a mask that differs per frame: no folding, the kernel is vmapped over B·T
        q, k, v = _qkv(key, (2, 2, 40, 2, 16), (2, 1, 130, 2, 16))
        lengths = jnp.array([[130, 3], [0, 77]])
        mask = jnp.arange(130)[None, None] < lengths[..., None]
    got = splash.splash_attention(q, k, v, mask, interpret=True)
    want = naive_attention(q, k, v, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_splash_kernel_gradients_match_naive():
    q, k, v = _qkv(jax.random.key(1), (2, 2, 50, 2, 16), (2, 1, 140, 2, 16))
    mask = (jnp.arange(140)[None] < jnp.array([9, 0])[:, None])[:, None, :]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    got = jax.grad(loss(lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: naive_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_splash_kernel_bfloat16_close_to_naive():
    q, k, v = _qkv(jax.random.key(2), (2, 130, 2, 32), (2, 130, 2, 32), jnp.bfloat16)
    got = splash.splash_attention(q, k, v, interpret=True)
    assert got.dtype == jnp.bfloat16
    assert _max_diff(got, naive_attention(q, k, v)) < 2e-2


@needs_kernel
@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake devices of tests/conftest.py")
def test_splash_through_shard_map_on_eight_devices_matches_naive():
    """On a data=2, tensor=2, sequence=2 mesh splash runs inside shard_map (batch split over data, heads over
    tensor×sequence; each device runs the interpreted kernel on its shard), cross-attention layout with key
    masks including a fully masked sample; forward and gradients equal the naive path."""
    mesh = parallel.make_mesh("data=2,tensor=2,sequence=2")
    q, k, v = _qkv(jax.random.key(7), (2, 2, 40, 4, 16), (2, 1, 130, 4, 16))
    mask = (jnp.arange(130)[None] < jnp.array([77, 0])[:, None])[:, None, :]

    def loss(q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, implementation="splash")))

    with parallel.sharding_context(mesh), splash.interpret_mode():
        jaxpr = str(jax.make_jaxpr(loss)(q, k, v))
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="splash"))(q, k, v)
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    assert "shard_map" in jaxpr
    _close(out, naive_attention(q, k, v, mask))
    want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(naive_attention(q, k, v, mask))), (0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        _close(g, w)


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------

TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)  # as test_stdit3


def _noisy_stdit3(attention_impl: str):
    model = STDiT3(STDiT3Config(**TINY, attention=attention_impl), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)  # numpy noise and inputs: no random-number programs to compile
    noisy = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), nnx.state(model, nnx.Param))
    nnx.update(model, noisy)
    b, t, h, w, cfg = 2, 3, 6, 10, model.cfg
    inputs = dict(
        x=rng.standard_normal((b, t, h, w, cfg.in_channels), np.float32), timestep=np.array([900.0, 120.0]),
        y=rng.standard_normal((b, cfg.model_max_length, cfg.caption_channels), np.float32),
        mask=(np.arange(cfg.model_max_length)[None] < np.array([[5], [9]])).astype(np.int32),
        fps=np.full((b,), 24.0), height=np.full((b,), h * 8.0), width=np.full((b,), w * 8.0))
    return model, jax.tree.map(jnp.asarray, inputs)


@pytest.mark.slow  # default run kept near 15 minutes; run with -m slow
def test_stdit3_defaults_to_auto_and_matches_xla():
    """Every attention of the model (spatial, temporal, cross with a non-prefix text mask, packed to lengths):
    the default (auto: blockwise on CPU) matches the naive path. Parameters get noise so the zero-initialised
    temporal projections count."""
    assert STDiT3Config().attention == "auto"
    model, inputs = _noisy_stdit3("auto")
    inputs["mask"] = inputs["mask"].at[0, 2].set(0).at[1, 12].set(1)  # holes and a stray token: not a prefix
    xla_graph = nnx.graphdef(STDiT3(STDiT3Config(**TINY, attention="xla"), rngs=nnx.Rngs(1)))
    want = nnx.merge(xla_graph, nnx.state(model))(**inputs)
    _close(model(**inputs), want)


@needs_kernel
def test_stdit3_splash_equals_xla():
    """attention="splash" off TPU runs auto's choice (blockwise); forced through the interpreted kernel (every
    attention of the model: spatial, temporal, masked cross) it matches the naive output to float32 rounding."""
    model, inputs = _noisy_stdit3("splash")
    xla_graph = nnx.graphdef(STDiT3(STDiT3Config(**TINY, attention="xla"), rngs=nnx.Rngs(1)))
    want = nnx.merge(xla_graph, nnx.state(model))(**inputs)
    with splash.interpret_mode():
        got = model(**inputs)
    _close(got, want)


def test_vae_mid_attention_uses_the_setting():
    """The VAE's single-head mid-block attention: default auto, every implementation equal to the naive path."""
    assert SpatialVAEConfig().attention == "auto"
    with pytest.raises(ValueError, match="vae_2d.attention"):
        SpatialVAEConfig(attention="flash").validate()
    x = jax.random.normal(jax.random.key(8), (2, 5, 7, 32))
    outs = {}
    for implementation in ("xla", "blockwise", "auto"):
        layer = MidAttention2D(32, SpatialVAEConfig(norm_num_groups=8, attention=implementation), rngs=nnx.Rngs(0),
                               dtype=jnp.float32, param_dtype=jnp.float32)
        assert layer.implementation == implementation
        outs[implementation] = layer(x)
    _close(outs["blockwise"], outs["xla"])
    _close(outs["auto"], outs["xla"])


def test_sequences_of_one_block_take_the_naive_path_and_longer_ones_do_not():
    from opensora_jax.models import attention

    assert attention.fits_one_block(30, 30) and attention.fits_one_block(1024, 300)
    assert not attention.fits_one_block(1025, 300) and not attention.fits_one_block(8, 9, block_k=8)
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 40, 2, 8)) for i in range(3))

    def ops(**blocks):
        text = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="blockwise",
                                                                      **blocks)).lower(q, k, v).as_text()
        return "while" in text or "scan" in text

    assert not ops() and ops(block_q=16, block_k=16)  # several blocks: the scanned kernel
