"""Attention switch xla | cudnn | splash: the splash kernel (Pallas interpreter off TPU) against the xla path,
and the one-time fallback messages where a kernel is not available."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax.models import layers, splash
from opensora_jax.models.layers import dot_product_attention
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config

BACKEND = jax.default_backend()
needs_kernel = pytest.mark.skipif(not splash.kernel_available(), reason=f"jax {jax.__version__} has no splash kernel")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    layers._warned.clear()
    yield
    layers._warned.clear()


def _qkv(key, q_shape, kv_shape, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, q_shape, dtype), jax.random.normal(kk, kv_shape, dtype),
            jax.random.normal(kv, kv_shape, dtype))


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def test_block_size_pads_little():
    assert [splash.block_size(n) for n in (1, 130, 200, 300, 512, 3600, 4096)] == [128, 256, 256, 128, 512, 256, 512]


@needs_kernel
@pytest.mark.parametrize("case", ["self", "cross_masked", "mask_per_frame"])
def test_splash_kernel_matches_xla(case):
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
    want = dot_product_attention(q, k, v, key_mask=mask, implementation="xla")
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_splash_kernel_gradients_match_xla():
    q, k, v = _qkv(jax.random.key(1), (2, 2, 50, 2, 16), (2, 1, 140, 2, 16))
    mask = (jnp.arange(140)[None] < jnp.array([9, 0])[:, None])[:, None, :]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    got = jax.grad(loss(lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_splash_kernel_bfloat16_close_to_xla():
    q, k, v = _qkv(jax.random.key(2), (2, 130, 2, 32), (2, 130, 2, 32), jnp.bfloat16)
    got = splash.splash_attention(q, k, v, interpret=True)
    want = dot_product_attention(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert _max_diff(got, want) < 2e-2


@pytest.mark.skipif(BACKEND == "tpu", reason="splash runs natively on TPU")
def test_splash_falls_back_to_xla_off_tpu_warning_once(caplog):
    q, k, v = _qkv(jax.random.key(3), (2, 20, 2, 8), (2, 140, 2, 8))
    mask = jnp.arange(140)[None] < jnp.array([[5], [140]])
    with caplog.at_level(logging.WARNING, logger=layers.__name__):
        first = dot_product_attention(q, k, v, mask, implementation="splash")
        second = jax.jit(lambda *a: dot_product_attention(*a, implementation="splash"))(q, k, v, mask)
    messages = [r.getMessage() for r in caplog.records if "splash" in r.getMessage()]
    assert messages == [f"splash attention needs a TPU; using xla attention on {BACKEND}"]
    np.testing.assert_array_equal(first, dot_product_attention(q, k, v, mask))
    np.testing.assert_allclose(second, first, rtol=1e-6, atol=1e-6)


def test_splash_short_keys_fall_back_to_xla_warning_once(caplog, monkeypatch):
    """Where the splash kernel could run (pretended TPU, one device), key sequences under 128 tokens still take the
    xla path; that fallback is logged once, whatever the short length."""
    monkeypatch.setattr(layers, "_warned", set())
    monkeypatch.setattr(layers, "_backend", lambda: "tpu")
    monkeypatch.setattr(splash, "kernel_available", lambda: True)
    monkeypatch.setattr(layers, "_multi_device_mesh", lambda: False)
    q, k, v = _qkv(jax.random.key(5), (2, 20, 2, 8), (2, 16, 2, 8))
    with caplog.at_level(logging.WARNING, logger=layers.__name__):
        out = dot_product_attention(q, k, v, implementation="splash")
        dot_product_attention(q, k, v, implementation="splash")
        dot_product_attention(q, k[:, :5], v[:, :5], implementation="splash")
    messages = [r.getMessage() for r in caplog.records if "splash" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "at least 128 tokens" in messages[0] and "using xla attention for 16 keys" in messages[0]
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v))


def test_cudnn_falls_back_where_unavailable_warning_once(caplog):
    q, k, v = _qkv(jax.random.key(4), (2, 20, 2, 8), (2, 20, 2, 8))  # float32: never a cuDNN input
    with caplog.at_level(logging.WARNING, logger=layers.__name__):
        for _ in range(2):
            out = dot_product_attention(q, k, v, implementation="cudnn")
    messages = [r.getMessage() for r in caplog.records if "cudnn" in r.getMessage()]
    expected = ("cudnn attention needs bfloat16 or float16 inputs, got float32; using xla attention"
                if layers._on_cuda_gpu() else f"cudnn attention needs an NVIDIA GPU; using xla attention on {BACKEND}")
    assert messages == [expected]
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v))


def test_unknown_implementation_names_the_choices():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="splash"):
        dot_product_attention(q, q, q, implementation="flash")


TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)  # as test_stdit3


@needs_kernel
def test_stdit3_splash_equals_xla():
    """attention="splash" off TPU runs the xla path (so that model is its own xla reference); forced through
    the interpreted kernel (every attention of the model: spatial, temporal, masked cross) it matches the xla
    output to float32 rounding. Parameters get noise so the zero-initialised temporal projections count."""
    model = STDiT3(STDiT3Config(**TINY, attention="splash"), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)  # numpy noise and inputs: no random-number programs to compile
    noisy = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), nnx.state(model, nnx.Param))
    nnx.update(model, noisy)
    b, t, h, w, cfg = 2, 3, 6, 10, model.cfg
    inputs = dict(
        x=rng.standard_normal((b, t, h, w, cfg.in_channels), np.float32), timestep=np.array([900.0, 120.0]),
        y=rng.standard_normal((b, cfg.model_max_length, cfg.caption_channels), np.float32),
        mask=(np.arange(cfg.model_max_length)[None] < np.array([[5], [9]])).astype(np.int32),
        fps=np.full((b,), 24.0), height=np.full((b,), h * 8.0), width=np.full((b,), w * 8.0))
    inputs = jax.tree.map(jnp.asarray, inputs)
    if BACKEND == "tpu":
        xla_graph = nnx.graphdef(STDiT3(STDiT3Config(**TINY), rngs=nnx.Rngs(1)))
        want = nnx.merge(xla_graph, nnx.state(model))(**inputs)
    else:
        want = model(**inputs)
    with splash.interpret_mode():
        got = model(**inputs)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
