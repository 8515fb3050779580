"""Open-Sora v1.2 VAE: layer semantics against PyTorch, chunking, sizes, input errors, memory, parity."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax.models.vae import OPENSORA_VAE_V1_2_PRESET, OpenSoraVAE, OpenSoraVAEConfig
from opensora_jax.models.vae.layers import GroupNorm
from opensora_jax.models.vae.spatial import SPATIAL_LATENT_SCALE, decode_frames, encode_frames
from opensora_jax.models.vae.temporal import CausalConv3d, depth_to_time

# Smallest config of the same shape: 2D VAE /2, temporal VAE /2 in time, chunks of 4 frames.
SMALL = {
    "micro_frame_size": 4,
    "micro_batch_size": 3,
    "vae_2d": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4},
    "vae_temporal": {
        "filters": 8,
        "num_res_blocks": 1,
        "channel_multipliers": [1, 2],
        "temporal_downsample": [True],
        "num_groups": 4,
    },
}


@pytest.fixture(scope="module")
def small_model() -> OpenSoraVAE:
    """SMALL with random weights drawn in numpy (no per-shape init compiles), incl. non-trivial norm
    affines and biases so that layout mistakes show."""
    from convert.registry import materialize
    from tests.tiny import random_vae_weights

    return materialize(*random_vae_weights(SMALL))


def _video(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


# --------------------------------------------------------------------------- building blocks vs PyTorch


@pytest.mark.parametrize("t_stride", [1, 2])
def test_causal_conv3d_matches_torch_front_padding(t_stride):
    torch = pytest.importorskip("torch")
    conv = CausalConv3d(3, 5, 3, t_stride=t_stride, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(2, 7, 5, 6, 3)).astype(np.float32)
    ours = np.asarray(conv(jnp.asarray(x)))

    weight = torch.from_numpy(np.asarray(conv.conv.kernel[...]).transpose(4, 3, 0, 1, 2).copy())
    bias = torch.from_numpy(np.array(conv.conv.bias[...]))
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    time_pad = 2 + (1 - t_stride)  # zeros in front only
    xt = torch.nn.functional.pad(xt, (1, 1, 1, 1, time_pad, 0))
    ref = torch.nn.functional.conv3d(xt, weight, bias, stride=(t_stride, 1, 1)).numpy().transpose(0, 2, 3, 4, 1)
    assert ours.shape == ref.shape == (2, (7 + time_pad - 3) // t_stride + 1, 5, 6, 5)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_group_norm_matches_torch():
    torch = pytest.importorskip("torch")
    norm = GroupNorm(4, 12, eps=1e-5, rngs=nnx.Rngs(0))
    norm.scale.set_value(jnp.linspace(0.5, 1.5, 12))
    norm.bias.set_value(jnp.linspace(-1, 1, 12))
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(2, 3, 4, 5, 12)).astype(np.float32)
    ours = np.asarray(norm(jnp.asarray(x)))
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    ref = torch.nn.functional.group_norm(xt, 4, torch.linspace(0.5, 1.5, 12), torch.linspace(-1, 1, 12), 1e-5)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 4, 1), rtol=1e-5, atol=1e-5)


def test_depth_to_time_channel_order():
    # Channel c·2 + s of latent frame t becomes channel c of frame 2t + s.
    b, t, c = 1, 3, 2
    x = np.zeros((b, t, 1, 1, 2 * c), np.float32)
    for ti in range(t):
        for ci in range(c):
            for s in range(2):
                x[0, ti, 0, 0, ci * 2 + s] = 100 * (2 * ti + s) + ci
    y = np.asarray(depth_to_time(jnp.asarray(x), 2))
    assert y.shape == (1, 6, 1, 1, 2)
    for frame in range(6):
        np.testing.assert_array_equal(y[0, frame, 0, 0], [100 * frame, 100 * frame + 1])


# --------------------------------------------------------------------------- sizes and errors


def test_latent_size_formula():
    cfg = OpenSoraVAEConfig.from_dict(OPENSORA_VAE_V1_2_PRESET)
    for frames, latent in [(1, 1), (17, 5), (20, 6), (51, 15), (68, 20), (102, 30), (204, 60), (408, 120), (816, 240)]:
        assert cfg.latent_frames(frames) == latent
    for frames in range(1, 120):  # spec §5.4
        rest = frames % 17
        assert cfg.latent_frames(frames) == 5 * (frames // 17) + (-(-rest // 4) if rest else 0)
    assert cfg.latent_size(51, 240, 426) == (15, 30, 53)
    assert cfg.latent_size(17, 480, 854) == (5, 60, 106)
    assert dataclasses.replace(cfg, micro_frame_size=None).latent_frames(51) == 13


def test_released_architecture_odd_width_shapes():
    """426 px → 53 latent columns → 424 px, as the reference (traced only, nothing allocated)."""
    from convert.vae_v1_2 import abstract_model

    model = abstract_model(OPENSORA_VAE_V1_2_PRESET)
    graphdef, state = nnx.split(model)
    video = jax.ShapeDtypeStruct((2, 20, 240, 426, 3), jnp.float32)
    z = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).encode(v), state, video)
    assert z.shape == (2, 6, 30, 53, 4)
    x = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z, 20), state, z)
    assert x.shape == (2, 20, 240, 424, 3)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((17, 32, 32, 3), r"expects a video \(B, T, H, W, 3\)"),
        ((1, 3, 17, 32, 32), "channels-first"),
        ((1, 17, 32, 32, 4), r"expects a video \(B, T, H, W, 3\)"),
        ((1, 0, 32, 32, 3), "at least one"),
        ((1, 4, 1, 8, 3), "at least 2x2 pixels"),
    ],
)
def test_encode_rejects_bad_input(small_model, shape, message):
    with pytest.raises(ValueError, match=message):
        small_model.encode(jnp.zeros(shape))


@pytest.mark.parametrize(
    "shape, num_frames, message",
    [
        ((1, 3, 4, 4), 5, r"expects a latent \(B, T', H', W', 4\)"),
        ((1, 3, 4, 4, 3), 5, r"expects a latent \(B, T', H', W', 4\)"),
        ((1, 3, 4, 4, 4), 0, "positive"),
        ((1, 3, 4, 4, 4), 30, "encode to 15 latent frames, but z has 3"),
        ((1, 0, 4, 4, 4), 1, "non-empty"),
    ],
)
def test_decode_rejects_bad_input(small_model, shape, num_frames, message):
    with pytest.raises(ValueError, match=message):
        small_model.decode(jnp.zeros(shape), num_frames)


def test_config_rejects_unknown_architecture():
    bad = json.loads(json.dumps(SMALL))
    bad["vae_2d"]["down_block_types"] = ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        OpenSoraVAEConfig.from_dict(bad)
    bad = json.loads(json.dumps(SMALL))
    bad["vae_temporal"]["temporal_downsample"] = []
    with pytest.raises(ValueError, match="temporal_downsample needs 1 entries"):
        OpenSoraVAEConfig.from_dict(bad)


# --------------------------------------------------------------------------- chunking semantics


def test_chunked_encode_decode_match_per_chunk_reference(small_model):
    """Batch 2, non-square, 11 frames with chunks of 4 → 4 + 4 + 3 (short last chunk with its own padding)."""
    m = small_model
    video = _video((2, 11, 6, 10, 3))
    z, inter = nnx.jit(lambda m, v: m.encode(v, return_intermediates=True))(m, video)
    assert z.shape == (2, 6, 3, 5, 4) and inter["x_z"].shape == (2, 11, 3, 5, 4)

    # Reference procedure, written out: whole-video 2D pass, then each temporal chunk separately.
    x_z = np.asarray(m.spatial.moments(video.reshape(22, 6, 10, 3))[..., :4])
    x_z = x_z.reshape(2, 11, 3, 5, 4) * np.float32(SPATIAL_LATENT_SCALE)
    np.testing.assert_allclose(inter["x_z"], x_z, rtol=1e-5, atol=1e-6)
    means = [np.asarray(m.temporal.moments(jnp.asarray(x_z[:, s : s + 4]))[..., :4]) for s in (0, 4, 8)]
    expected = (np.concatenate(means, axis=1) - np.asarray(m.shift[...])) / np.asarray(m.scale[...])
    assert [mu.shape[1] for mu in means] == [2, 2, 2]
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)

    x, dec_inter = nnx.jit(lambda m, z: m.decode(z, 11, return_intermediates=True))(m, z)
    assert x.shape == (2, 11, 6, 10, 3)
    zz = np.asarray(z) * np.asarray(m.scale[...]) + np.asarray(m.shift[...])
    parts = [m.temporal.decode(jnp.asarray(zz[:, a:b]), n) for a, b, n in ((0, 2, 4), (2, 4, 4), (4, 6, 3))]
    assert [p.shape[1] for p in parts] == [4, 4, 3]
    x_z_dec = np.concatenate([np.asarray(p) for p in parts], axis=1)
    np.testing.assert_allclose(dec_inter["x_z_dec"], x_z_dec, rtol=1e-5, atol=1e-6)
    frames = m.spatial.decode(jnp.asarray(x_z_dec.reshape(22, 3, 5, 4)) / SPATIAL_LATENT_SCALE)
    np.testing.assert_allclose(x, np.asarray(frames).reshape(2, 11, 6, 10, 3), rtol=1e-5, atol=1e-5)

    # Samples of a batch are independent (GroupNorm statistics are per sample).
    z1 = nnx.jit(lambda m, v: m.encode(v))(m, video[1:])
    np.testing.assert_allclose(z1, z[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # long-running; `pytest -m slow`
def test_micro_batching_and_short_video(small_model):
    """Frame micro-batches are memory-only; a video shorter than one chunk is a single short chunk."""
    m = small_model
    video = _video((1, 3, 4, 4, 3), seed=5)
    mean = encode_frames(m.spatial, video, micro_batch_size=None)
    np.testing.assert_allclose(encode_frames(m.spatial, video, micro_batch_size=2), mean, rtol=1e-6, atol=1e-7)
    x = decode_frames(m.spatial, mean, micro_batch_size=None)
    np.testing.assert_allclose(decode_frames(m.spatial, mean, micro_batch_size=2), x, rtol=1e-6, atol=1e-6)

    z = m.encode(video)
    assert z.shape == (1, 2, 2, 2, 4)
    assert m.decode(z, 3).shape == (1, 3, 4, 4, 3)
    sampled = m.encode(video, sample_key=jax.random.key(0))
    assert sampled.shape == z.shape and not np.allclose(sampled, z)
    np.testing.assert_array_equal(sampled, m.encode(video, sample_key=jax.random.key(0)))


@pytest.mark.slow  # long-running; `pytest -m slow`
def test_peak_memory_flat_in_frame_count(small_model):
    """Compiled working memory (beyond arguments and output) does not grow with the number of chunks."""
    graphdef, state = nnx.split(small_model)
    temps = {"encode": [], "decode": []}
    for frames in (8, 16, 32):
        lt = small_model.config.latent_frames(frames)
        enc = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v))
        dec = jax.jit(lambda s, z, n=frames: nnx.merge(graphdef, s).decode(z, n))
        for name, fn, spec in (
            ("encode", enc, jax.ShapeDtypeStruct((1, frames, 16, 16, 3), jnp.float32)),
            ("decode", dec, jax.ShapeDtypeStruct((1, lt, 8, 8, 4), jnp.float32)),
        ):
            temps[name].append(fn.lower(state, spec).compile().memory_analysis().temp_size_in_bytes)
    for name, values in temps.items():
        assert max(values) - min(values) <= 1024, f"{name} temp bytes grow with frames: {values}"


# --------------------------------------------------------------------------- conversion


def _manifest(fixtures_dir):
    return json.loads((fixtures_dir / "manifests" / "OpenSoraVAE_V1_2.json").read_text())


def test_converter_covers_released_manifest(fixtures_dir):
    from convert.checkpoint import variable_paths
    from convert.keymap import plan
    from convert.vae_v1_2 import abstract_model, table

    manifest = _manifest(fixtures_dir)
    shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    targets = variable_paths(abstract_model(manifest["config"]))  # nnx.eval_shape: nothing allocated
    steps = plan(table(manifest["config"]), shapes, targets)
    assert len(steps) == len(shapes) == manifest["num_tensors"] == len(targets)
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == manifest["num_elements"]


def test_config_inferred_from_manifest_shapes_is_the_released_one(fixtures_dir):
    from convert.vae_v1_2 import config_from_shapes, preset

    manifest = _manifest(fixtures_dir)
    inferred = config_from_shapes({k: tuple(v["shape"]) for k, v in manifest["keys"].items()})
    assert OpenSoraVAEConfig.from_dict(inferred) == OpenSoraVAEConfig.from_dict(preset())
    assert OpenSoraVAEConfig.from_dict(manifest["config"]) == OpenSoraVAEConfig.from_dict(preset())


def test_converter_reports_bad_checkpoint(fixtures_dir):
    from convert.keymap import ConversionError, plan
    from convert.checkpoint import variable_paths
    from convert.vae_v1_2 import abstract_model, table

    manifest = _manifest(fixtures_dir)
    shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    shapes.pop("temporal_vae.decoder.conv_out.conv.bias")
    shapes["spatial_vae.module.quant_conv.weight"] = (8, 8, 3, 3)
    with pytest.raises(ConversionError) as err:
        plan(table(manifest["config"]), shapes, variable_paths(abstract_model(manifest["config"])))
    text = str(err.value)
    assert "temporal_vae.decoder.conv_out.conv.bias" in text and "spatial_vae.module.quant_conv.weight" in text


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["vae_v1_2_tiny_chunked", "vae_v1_2_tiny"])
def test_parity_fixture(fixtures_dir, case):
    from opensora_jax.tools.parity.core import run_case

    result = run_case(fixtures_dir / "opensora_v1_2" / case)
    assert result.passed, result.line()
