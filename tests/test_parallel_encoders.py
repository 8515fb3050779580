"""T5 encode and VAE encode/decode on device meshes (8 fake CPU devices) equal their one-device results.

T5: parameters placed per the logical-axis rules (embed on fsdp, heads/mlp/vocab on tensor), prompts split over
the batch axes inside a sharding_context. VAE: work items (temporal chunks, then single frames) split over every
device, whatever the batch size; checked on the numbers and on the compiled program's per-device shapes.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opensora_jax import parallel

MESHES = ["data=8", "fsdp=8", "tensor=8", "sequence=8", "data=2,fsdp=2,tensor=2"]
# LLVM -O0 halves CPU compile time; the HLO (and so the arithmetic) is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _assert_close(actual, expected, tol=1e-5, what=""):
    """max |actual − expected| ≤ tol · (1 + max |expected|): layouts change the reduction order only."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * (1.0 + float(np.max(np.abs(expected)))), f"{what}: max abs difference {err:.3g}"


def _is_replicated(array) -> bool:
    return array.sharding.is_fully_replicated


# ================================================================================================== T5

# Heads (8), d_model (32), d_ff (64) and vocab (192) all divide 8, so every rule applies without fallback.
T5_CONFIG = dict(vocab_size=192, d_model=32, d_kv=4, d_ff=64, num_layers=2, num_heads=8,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="t5")
PROMPTS = ["a red circle moving left", "a blue square moving up on a black background", "camera motion",
           "a green triangle", "aesthetic score", "a yellow circle moving down", "motion score", "a red square"]
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """A converted tiny T5 (random, non-trivial norm scales) and a SentencePiece tokenizer next to it."""
    from convert.checkpoint import save_converted
    from opensora_jax.models.t5 import T5Config, abstract_encoder
    from tests.tiny import write_spiece

    root = tmp_path_factory.mktemp("t5")
    rng = np.random.default_rng(0)
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_encoder(T5Config.from_dict(T5_CONFIG)))):
        shape = var.get_value().shape
        centre = 1.0 if path[-1] == "scale" else 0.0
        flat["/".join(map(str, path))] = (centre + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    weights = save_converted(root / "t5", flat, config=T5_CONFIG, model="t5")
    return write_spiece(root / "tokenizer"), weights


def _t5_encode(t5_dirs, mesh=None):
    from opensora_jax.text.t5 import TextEncoder

    encoder = TextEncoder.from_pretrained(*t5_dirs, model_max_length=MAX_LENGTH, mesh=mesh)
    if mesh is None:
        return encoder, encoder.encode(PROMPTS)
    with parallel.sharding_context(mesh):
        return encoder, encoder.encode(PROMPTS)


@pytest.fixture(scope="module")
def t5_reference(t5_dirs):
    return np.asarray(_t5_encode(t5_dirs)[1]["y"])


@pytest.mark.parametrize("spec", MESHES)
def test_t5_encode_on_a_mesh_equals_one_device(spec, t5_dirs, t5_reference):
    mesh = parallel.make_mesh(spec)
    encoder, out = _t5_encode(t5_dirs, mesh)
    _assert_close(out["y"], t5_reference, what=f"T5 on {spec}")
    assert out["mask"].sum() > len(PROMPTS) and not out["mask"].all()  # real padding in the batch

    # Every parameter sits where the rules say, and the rules really split something on fsdp/tensor meshes.
    sizes = dict(mesh.shape)
    for path, var in nnx.to_flat_state(nnx.state(encoder.model)):
        value = var.get_value()
        expected = parallel.variable_sharding(var, mesh)
        assert value.sharding.is_equivalent_to(expected, value.ndim), (path, value.sharding, expected)
    q = encoder.model.layers.attn.q[...]  # (layers, embed, heads, kv)
    wi = encoder.model.layers.mlp.wi_0.kernel[...]  # (layers, embed, mlp)
    if sizes["fsdp"] > 1:
        assert q.sharding.spec[1] == "fsdp" and q.addressable_shards[0].data.shape[1] == 32 // sizes["fsdp"]
    if sizes["tensor"] > 1:
        assert q.sharding.spec[2] == "tensor" and q.addressable_shards[0].data.shape[2] == 8 // sizes["tensor"]
        assert wi.sharding.spec[2] == "tensor" and wi.addressable_shards[0].data.shape[2] == 64 // sizes["tensor"]
    if sizes["fsdp"] == sizes["tensor"] == 1:
        assert _is_replicated(q) and _is_replicated(wi)

    # The 8 prompts are split over the batch axes (data, fsdp) inside the sharding context.
    batch_ways = sizes["data"] * sizes["fsdp"]
    assert out["y"].addressable_shards[0].data.shape[0] == len(PROMPTS) // batch_ways


# ================================================================================================== VAE

# 2D VAE /2, temporal VAE /2 in time, chunks of 4 frames, 3 frames per 2D micro-batch (as tests/test_vae.py).
VAE_CONFIG = {
    "micro_frame_size": 4,
    "micro_batch_size": 3,
    "vae_2d": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4},
    "vae_temporal": {"filters": 8, "num_res_blocks": 1, "channel_multipliers": [1, 2],
                     "temporal_downsample": [True], "num_groups": 4},
}
VAE_SHIFT, VAE_SCALE = (-0.10, 0.34, 0.27, 0.98), (3.85, 2.32, 2.33, 3.06)  # the v1.2 defaults
# 11 frames = chunks 4 + 4 + 3 (latent 2 + 2 + 2); latent 3×5 → 6×10 pixels.
FRAMES, LATENT_FRAMES, LATENT_HW = 11, 6, (3, 5)


@pytest.fixture(scope="module")
def vae_flat():
    from tests.tiny import random_vae_weights

    return random_vae_weights(VAE_CONFIG)


def _vae(vae_flat, mesh=None):
    """The VAE with its weights placed per the rules on `mesh` (fsdp splits conv output channels)."""
    from convert.registry import materialize

    abstract, flat = vae_flat
    return materialize(abstract, flat, mesh)


def _latent(batch, seed=1):
    shape = (batch, LATENT_FRAMES, *LATENT_HW, 4)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _compiled_decode(model, z, mesh):
    """(compiled decode with intermediates, its state) so that a test can run it and read its HLO."""
    graphdef, state = nnx.split(model)

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z, FRAMES, return_intermediates=True, mesh=mesh)

    return jax.jit(decode, compiler_options=FAST_COMPILE).lower(state, z).compile(), state


def _conv_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Output shapes of every convolution in a compiled (per-device, after partitioning) HLO module."""
    shapes = re.findall(r"= f32\[([0-9,]+)\]\{[^}]*\} convolution\(", hlo)
    return [tuple(int(d) for d in dims.split(",")) for dims in shapes]


@pytest.fixture(scope="module")
def decode_reference(vae_flat):
    compiled, state = _compiled_decode(_vae(vae_flat), _latent(2), None)
    video, inter = compiled(state, _latent(2))
    return np.asarray(video), np.asarray(inter["x_z_dec"]), _conv_shapes(compiled.as_text())


@pytest.mark.parametrize("spec", MESHES)
def test_vae_decode_on_a_mesh_equals_one_device_and_is_split(spec, vae_flat, decode_reference):
    """Batch 2 on 8 devices: 4 full + 2 short temporal chunks and 22 frames, each padded to 8 devices' worth."""
    mesh = parallel.make_mesh(spec)
    model = _vae(vae_flat, mesh)
    z = _latent(2)
    compiled, state = _compiled_decode(model, z, mesh)
    video, inter = compiled(state, z)
    ref_video, ref_x_z, ref_convs = decode_reference
    _assert_close(video, ref_video, what=f"video on {spec}")
    _assert_close(inter["x_z_dec"], ref_x_z, what=f"temporal decoder output on {spec}")
    if dict(mesh.shape)["fsdp"] > 1:
        assert not _is_replicated(model.spatial.decoder.conv_in.kernel[...])  # conv_out channels on fsdp

    # The compiled program is per device. One device: per temporal chunk both videos at once (batch 2), then
    # that chunk's frames 3 at a time (8 → 3 + 3 + 2, 6 → 3 + 3). On 8 devices: one (video, chunk) pair per
    # device and step, and ⌈22/8⌉ = 3 frames per device in a single 2D step.
    convs = _conv_shapes(compiled.as_text())
    assert {s[0] for s in ref_convs if len(s) == 5} == {2} and {s[0] for s in ref_convs if len(s) == 4} == {2, 3}
    assert {s[0] for s in convs if len(s) == 5} == {1}
    assert {s[0] for s in convs if len(s) == 4} == {3}
    assert any(s[-1] == 3 and s[1:3] == (6, 10) for s in convs)  # the 2D decoder's last conv ran split


def _jit(model, method, *args, **kwargs):
    """`model.method(*args, **kwargs)` compiled fast; the mesh, if any, comes from the caller's context."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a, **kwargs),
                 compiler_options=FAST_COMPILE)
    return fn(state, *args)


def test_vae_decode_splits_a_full_batch_through_the_sharding_context(vae_flat):
    """What sampling with --mesh does (Pipeline.generate traces decode_jit inside sharding_context, no mesh
    argument). Batch 8 on data=2,fsdp=2,tensor=2: the result comes back split over the batch axes (data, fsdp)."""
    z = _latent(8, seed=4)
    expected = _jit(_vae(vae_flat), "decode", z, num_frames=FRAMES)
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    model = _vae(vae_flat, mesh)
    with parallel.sharding_context(mesh):
        video = _jit(model, "decode", parallel.shard_batch(z, mesh), num_frames=FRAMES)
    _assert_close(video, expected, what="batch 8")
    assert video.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), video.ndim)
    assert video.addressable_shards[0].data.shape[0] == 2


def test_vae_encode_on_a_mesh_equals_one_device_including_the_samples(vae_flat):
    """Sampled posteriors too: the split encode draws the one-device noise (same keys, same shapes)."""
    video = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, FRAMES, 6, 10, 3)).astype(np.float32))
    key = jax.random.key(7)
    kw = dict(sample_key=key, return_intermediates=True)
    z_ref, inter_ref = _jit(_vae(vae_flat), "encode", video, **kw)
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    z, inter = _jit(_vae(vae_flat, mesh), "encode", video, mesh=mesh, **kw)
    assert z.shape == (3, LATENT_FRAMES, *LATENT_HW, 4)
    _assert_close(z, z_ref, what="sampled z")
    for name, expected in inter_ref.items():
        _assert_close(inter[name], expected, what=name)
    # The samples are not the means, and batch 3 divides no batch axis: the result is replicated.
    means = (np.asarray(inter["temporal_mean"]) - np.asarray(VAE_SHIFT)) / np.asarray(VAE_SCALE)
    assert float(np.max(np.abs(np.asarray(z) - means))) > 0.1
    assert _is_replicated(z)


def test_item_split_helpers():
    from opensora_jax.models.vae.layers import item_devices, sharded_item_map
    from opensora_jax.models.vae.opensora_v1_2 import _item_split

    mesh = parallel.make_mesh("data=2,fsdp=2,sequence=2")
    assert item_devices(mesh) == 8 and parallel.logical_axis_size("act_batch", mesh) == 4
    assert _item_split(None) is None
    with parallel.sharding_context(mesh):
        assert _item_split(None)[0] is mesh
    # Rules that give the VAE no axis turn the split off (the one-device code runs).
    with parallel.sharding_context(mesh, {**parallel.LOGICAL_AXIS_RULES, "act_vae_items": None}):
        assert _item_split(None) is None
    # Items are padded to 8, split one block per device, and come back in order without the padding.
    x = jnp.arange(5 * 2, dtype=jnp.float32).reshape(5, 2)
    seen = []

    def fn(block):
        seen.append(block.shape)
        return {"twice": 2 * block}

    out = jax.jit(lambda x: sharded_item_map(fn, x, mesh=mesh, micro=None))(x)
    np.testing.assert_array_equal(out["twice"], 2 * np.asarray(x))
    assert set(seen) == {(8, 2)}  # ⌈5/8⌉ = 1 item per device, one step
