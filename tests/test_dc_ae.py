"""Video DC-AE (Open-Sora 2.0): fixture parity, a torch oracle on another architecture (batch 2, non-square, single
frames), config parsing, the released manifest, bad checkpoints and inputs, mesh = one device, bf16, and the
pixel-(un)shuffle channel order against torch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from flax import nnx
from safetensors.numpy import load_file, save_file

import opensora_jax.models.vae.dc_ae as dc
from convert import dc_ae as conv
from convert.checkpoint import variable_paths
from convert.keymap import ConversionError, plan
from convert.registry import load_model
from opensora_jax import parallel
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.tools.parity.core import load_case, relative_error, run_case, to_channels_first, to_channels_last

CASE = ("opensora_v2_0", "dc_ae_tiny")


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """Compile time dominates these tiny runs: lower XLA's optimisation level for the per-item programs."""
    old = dc.COMPILER_OPTIONS
    dc.COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
    yield
    dc.COMPILER_OPTIONS = old


@pytest.fixture(scope="module")
def case(fixtures_dir):
    return load_case(fixtures_dir.joinpath(*CASE))


@pytest.fixture(scope="module")
def model(case):
    return load_model("dc_ae", case.weights_path, config=case.config)[0]


def _cl(x):
    return jnp.asarray(to_channels_last(x))


# ================================================================================================ fixture parity


def test_public_case_passes_with_every_array(fixtures_dir):
    result = run_case(fixtures_dir.joinpath(*CASE))
    assert result.passed, result.line()
    assert set(result.errors) == {"z", "decoded", "z_big_tiled", "decoded_big_tiled", "intermediate/z_big_untiled",
                                  "intermediate/decoded_big_untiled"}
    assert all(e is not None and e <= 1e-5 for e in result.errors.values()), result.errors


def test_batch_of_two_equals_each_video_alone(model, case):
    """Same item shapes as the fixture (compiled once): the batch is looped item by item, tiles included."""
    video = _cl(case["video"])
    z = model.encode(jnp.concatenate([video, -0.5 * video[:, ::-1]]))
    assert relative_error(to_channels_first(z[:1]), case["z"]) < 1e-5
    np.testing.assert_allclose(z[1:], model.encode(-0.5 * video[:, ::-1]), rtol=0, atol=1e-6)

    z_big = _cl(case["z_dec_in_big"])
    other = z_big[:, ::-1, :, ::-1]
    decoded = model.decode(jnp.concatenate([z_big, other]), tiled=True)
    assert relative_error(to_channels_first(decoded[:1]), case["decoded_big_tiled"]) < 1e-5
    np.testing.assert_allclose(decoded[1:], model.decode(other, tiled=True), rtol=0, atol=1e-6)


# ================================================================================================ torch oracle

# Another architecture: 3 stages, all three block types, a temporal stage first, an encoder out_act (which shifts the
# project_out index), per-stage decoder activations, a scaling factor; temporal ×2, spatial ×4, latent 8.
OTHER = {
    "in_channels": 3, "latent_channels": 8, "time_compression_ratio": 2, "spatial_compression_ratio": 4,
    "scaling_factor": 0.5, "use_spatial_tiling": True, "use_temporal_tiling": True,
    "spatial_tile_size": 8, "temporal_tile_size": 4, "tile_overlap_factor": 0.25,
    "encoder": {"width_list": [32, 32, 64], "depth_list": [1, 1, 2],
                "block_type": ["ResBlock", "EViT_GLU", "EViTS5_GLU"], "norm": "rms3d", "act": "silu",
                "downsample_block_type": "Conv", "out_act": "relu", "is_video": True,
                "temporal_downsample": [True, False, False]},
    "decoder": {"width_list": [32, 32, 64], "depth_list": [1, 2, 1],
                "block_type": ["ResBlock", "EViTS5_GLU", "EViT_GLU"], "norm": "rms3d", "act": ["silu", "relu", "silu"],
                "upsample_block_type": "InterpolateConv", "out_norm": "rms3d", "out_act": "relu", "is_video": True,
                "temporal_upsample": [True, False, False]},
}
_ACT = {None: lambda x: x, "silu": F.silu, "relu": F.relu}


def _t_conv(sd, key, x, stride=(1, 1, 1), groups=1):
    w = sd[f"{key}.weight"]
    p = w.shape[-1] // 2
    return F.conv3d(F.pad(x, (p,) * 6), w, sd.get(f"{key}.bias"), stride=stride, groups=groups)


def _t_norm(sd, key, x):
    y = x / torch.sqrt(x.square().mean(1, keepdim=True) + 1e-5)
    return y * sd[f"{key}.weight"].view(1, -1, 1, 1, 1) + sd[f"{key}.bias"].view(1, -1, 1, 1, 1)


def _t_unshuffle(x, r, temporal):
    if temporal:
        return rearrange(x, "b c (t rt) (h rh) (w rw) -> b (c rt rh rw) t h w", rt=r, rh=r, rw=r)
    return rearrange(x, "b c t (h rh) (w rw) -> b (c rh rw) t h w", rh=r, rw=r)


def _t_shuffle(x, r, temporal):
    if temporal:
        return rearrange(x, "b (c rt rh rw) t h w -> b c (t rt) (h rh) (w rw)", rt=r, rh=r, rw=r)
    return rearrange(x, "b (c rh rw) t h w -> b c t (h rh) (w rw)", rh=r, rw=r)


def _t_average(x, out, r, temporal):
    x = _t_unshuffle(x, r, temporal and x.shape[2] != 1)
    return rearrange(x, "b (c g) t h w -> b c g t h w", c=out).mean(2)


def _t_duplicate(x, out, r, temporal):
    temporal = temporal and x.shape[2] != 1
    x = x.repeat_interleave(out * r ** (3 if temporal else 2) // x.shape[1], dim=1)
    return _t_shuffle(x, r, temporal)


def _t_block(sd, key, x, block, act):
    if block == "ResBlock":
        h = _ACT[act](_t_conv(sd, f"{key}.main.conv1.conv", x))
        return x + _t_norm(sd, f"{key}.main.conv2.norm", _t_conv(sd, f"{key}.main.conv2.conv", h))
    m = f"{key}.context_module.main"
    qkv = _t_conv(sd, f"{m}.qkv.conv", x)
    parts = [qkv]
    if f"{m}.aggreg.0.0.weight" in sd:
        w0, w1 = sd[f"{m}.aggreg.0.0.weight"], sd[f"{m}.aggreg.0.1.weight"]
        agg = F.conv3d(qkv, w0, padding=w0.shape[-1] // 2, groups=w0.shape[0])
        parts.append(F.conv3d(agg, w1, groups=w1.shape[0] // w1.shape[1]))
    qkv = torch.cat(parts, 1)
    t, h, w = qkv.shape[2:]
    q, k, v = rearrange(qkv, "b (g three d) t h w -> three b g d (t h w)", three=3, d=32)
    q, k = F.relu(q), F.relu(k)
    num = torch.einsum("bgen,bgdn,bgdm->bgem", v, k, q)
    den = torch.einsum("bgdn,bgdm->bgm", k, q)
    att = rearrange(num / (den[:, :, None] + 1e-15), "b g d (t h w) -> b (g d) t h w", t=t, h=h, w=w)
    x = x + _t_norm(sd, f"{m}.proj.norm", _t_conv(sd, f"{m}.proj.conv", att))
    m = f"{key}.local_module.main"
    y = _ACT[act](_t_conv(sd, f"{m}.inverted_conv.conv", x))
    y = _t_conv(sd, f"{m}.depth_conv.conv", y, groups=y.shape[1])
    y, gate = y.chunk(2, dim=1)
    return x + _t_norm(sd, f"{m}.point_conv.norm", _t_conv(sd, f"{m}.point_conv.conv", y * _ACT[act](gate)))


def _t_encode(sd, cfg, x):
    e = cfg.encoder
    n = len(e.width_list)
    x = _t_conv(sd, "encoder.project_in.conv", x)
    for s in range(n):
        for j in range(e.depth_list[s]):
            x = _t_block(sd, f"encoder.stages.{s}.op_list.{j}", x, e.block_at(s), e.act)
        if s < n - 1:
            key = f"encoder.stages.{s}.op_list.{e.depth_list[s]}"
            temporal = e.temporal_at(s)
            y = _t_conv(sd, f"{key}.main.conv", x, stride=(2 if temporal else 1, 2, 2))
            x = y + _t_average(x, y.shape[1], 2, temporal)
    y = _t_conv(sd, "encoder.project_out.main.op_list.1.conv", _ACT[e.out_act](x))
    return (y + _t_average(x, y.shape[1], 1, False)) / cfg.scaling_factor


def _t_decode(sd, cfg, z):
    d = cfg.decoder
    n = len(d.width_list)
    z = z * cfg.scaling_factor
    x = _t_conv(sd, "decoder.project_in.main.conv", z) + _t_duplicate(z, d.width_list[-1], 1, False)
    for s in reversed(range(n)):
        j = 0
        if s < n - 1:
            temporal = d.temporal_at(s)
            key = f"decoder.stages.{s}.op_list.0"
            up = x.repeat_interleave(2, 2) if temporal and x.shape[2] != 1 else x
            up = up.repeat_interleave(2, 3).repeat_interleave(2, 4)
            x = _t_conv(sd, f"{key}.main.conv.conv", up) + _t_duplicate(x, d.width_list[s], 2, temporal)
            j = 1
        for i in range(d.depth_list[s]):
            x = _t_block(sd, f"decoder.stages.{s}.op_list.{j + i}", x, d.block_at(s), d.act_at(s))
    x = _ACT[d.out_act](_t_norm(sd, "decoder.project_out.op_list.0", x))
    return _t_conv(sd, "decoder.project_out.op_list.2.conv", x)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """(config, reference-layout state_dict, JAX model loaded from it through the converter)."""
    cfg = dc.DCAEConfig.from_reference(OTHER)
    params = dict(nnx.to_flat_state(nnx.state(dc.random_model(cfg))))
    sd = {}
    for rule in conv.table(cfg).rules:
        value = np.asarray(params[tuple(int(p) if p.isdigit() else p for p in rule.target.split("/"))].get_value())
        if rule.target.endswith("kernel"):
            value = value.transpose(4, 3, 0, 1, 2)  # (kT, kH, kW, in, out) → [out, in, kT, kH, kW]
        sd[rule.source] = np.ascontiguousarray(value)
    path = tmp_path_factory.mktemp("dc_ae_other") / "other.safetensors"
    save_file(sd, str(path))
    model, _ = load_model("dc_ae", path, config=cfg.to_dict())
    return cfg, {k: torch.from_numpy(v) for k, v in sd.items()}, model


def test_other_architecture_matches_torch_oracle_batch_two_non_square(other):
    cfg, sd, model = other
    rng = np.random.default_rng(1)
    video = rng.uniform(-1, 1, (2, 3, 4, 8, 12)).astype(np.float32)  # B C T H W, H ≠ W
    with torch.no_grad():
        z_ref = _t_encode(sd, cfg, torch.from_numpy(video)).numpy()
    z = model.encode(_cl(video), tiled=False)
    assert z.shape == (2, 2, 2, 3, 8)
    assert relative_error(to_channels_first(z), z_ref) < 1e-5

    latent = rng.normal(size=(2, 8, 3, 2, 3)).astype(np.float32)  # odd latent frame count
    with torch.no_grad():
        x_ref = _t_decode(sd, cfg, torch.from_numpy(latent)).numpy()
    x = model.decode(_cl(latent), tiled=False)
    assert x.shape == (2, 6, 8, 12, 3)
    assert relative_error(to_channels_first(x), x_ref) < 1e-5


def test_single_frame_takes_the_2d_shortcuts(other):
    """T = 1: temporal stages keep one frame (2D pixel-unshuffle / no temporal upsampling), as in the reference."""
    cfg, sd, model = other
    video = np.random.default_rng(2).uniform(-1, 1, (1, 3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        z_ref = _t_encode(sd, cfg, torch.from_numpy(video))
        x_ref = _t_decode(sd, cfg, z_ref).numpy()
    z = model.encode(_cl(video), tiled=False)
    assert z.shape == (1, 1, 2, 2, 8)
    assert relative_error(to_channels_first(z), z_ref.numpy()) < 1e-5
    assert relative_error(to_channels_first(model.decode(z, tiled=False)), x_ref) < 1e-5


def test_mesh_equals_one_device_with_fsdp_weights(other):
    """8 fake devices (data=4, fsdp=2, weights split on fsdp): a temporally tiled batch-2 decode whose 10 (video,
    tile) items go 8 at a time across temporal tiles (the last step padded), blended across the groups."""
    cfg, _, model = other
    temporal_cfg = dc.DCAEConfig.from_reference({**cfg.to_dict(), "use_spatial_tiling": False})
    temporal_only = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: dc.build(temporal_cfg))), nnx.state(model))
    z = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 2, 3, 8)).astype(np.float32))  # 5 temporal tiles
    x_one = temporal_only.decode(z)
    np.testing.assert_allclose(x_one[1:], temporal_only.decode(z[1:]), rtol=0, atol=1e-6)  # batch 2 = one by one

    mesh = parallel.make_mesh("data=4,fsdp=2")
    sharded = parallel.shard_params(nnx.clone(temporal_only), mesh)
    assert not sharded.decoder.project_in.main.conv.kernel[...].sharding.is_fully_replicated
    with parallel.sharding_context(mesh):
        x_mesh = sharded.decode(z)
    np.testing.assert_allclose(x_mesh, x_one, rtol=0, atol=1e-5)
    # Tiles of 2, 2, 2, 2 and 1 latent frames: 4 frames each (kept 3), and 1 (a single latent frame is not
    # upsampled in time), as the reference does.
    assert x_one.shape == (2, 13, 8, 12, 3)


# ================================================================================================ config


def test_config_spellings(case):
    cfg = dc.DCAEConfig.from_reference(case.config)
    assert cfg.use_spatial_tiling and cfg.use_temporal_tiling  # the case's DC_AE kwargs
    assert (cfg.spatial_tile_size, cfg.temporal_tile_size) == (32, 16)
    assert (cfg.spatial_latent_tile, cfg.temporal_latent_tile) == (4, 4)
    assert dc.DCAEConfig.from_reference(cfg.to_dict()) == cfg
    assert dc.DCAEConfig.from_reference(json.loads(json.dumps(cfg.to_dict()))) == cfg

    # The dotlist alone gives the same architecture (the fixture set its tile sizes in the config separately).
    from_dotlist = dc.DCAEConfig.from_reference({"dotlist": case.config["dotlist"], "tiling": case.config["tiling"]})
    assert (from_dotlist.encoder, from_dotlist.decoder, from_dotlist.latent_channels) == \
        (cfg.encoder, cfg.decoder, cfg.latent_channels)

    # The quirk: DC_AE kwargs replace the pixel tile sizes only; the latent ones stay the config's.
    odd = dc.DCAEConfig.from_reference({**case.config, "tiling": {"spatial_tile_size": 64, "temporal_tile_size": 8}})
    assert (odd.spatial_tile_size, odd.temporal_tile_size, odd.spatial_latent_tile, odd.temporal_latent_tile) == \
        (64, 8, 4, 4)
    assert not odd.use_spatial_tiling  # the resolved config's value where no kwarg is given

    named = dc.DCAEConfig.from_reference({"type": "dc_ae", "model_name": "dc-ae-f32t4c128",
                                          "from_pretrained": "x.safetensors", "scaling_factor": 0.493})
    assert named == dc.preset(scaling_factor=0.493)


@pytest.mark.parametrize("config, names", [
    ({"latent_channels": 16, "laten_channels": 4}, ["laten_channels"]),
    ({"encoder": {"widths": [1], "depth": [1]}}, ["widths", "depth"]),
    ({"resolved": {}, "tilling": {}}, ["tilling"]),
    ({"resolved": {}, "tiling": {"use_spatial_tiles": True}}, ["use_spatial_tiles"]),
])
def test_unknown_config_keys_are_named(config, names):
    with pytest.raises(UserError) as err:
        dc.DCAEConfig.from_reference(config)
    for name in names:
        assert name in str(err.value)


def test_unsupported_architectures_are_user_errors():
    base = dc.preset().to_dict()
    with pytest.raises(UserError, match="is_video"):
        dc.DCAEConfig.from_reference({})  # the reference defaults describe the 2D (image) DC-AE
    with pytest.raises(UserError, match="block_type"):
        dc.DCAEConfig.from_reference({**base, "encoder": {**base["encoder"], "block_type": "MBConv"}})
    with pytest.raises(UserError, match="input channels"):
        dc.DCAEConfig.from_reference({**base, "decoder": {**base["decoder"], "upsample_match_channel": False}})


# ================================================================================================ conversion


def test_released_manifest_maps_both_ways(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / "Video-DC-AE-f32t4c128.json").read_text())
    cfg = dc.DCAEConfig.from_reference(manifest["config"])
    released = dc.preset()
    tiling = ("use_spatial_tiling", "use_temporal_tiling")
    assert {k: v for k, v in cfg.to_dict().items() if k not in tiling} == \
        {k: v for k, v in released.to_dict().items() if k not in tiling}
    assert released.use_spatial_tiling and released.use_temporal_tiling and released.scaling_factor is None
    assert (released.spatial_tile_size, released.temporal_tile_size, released.tile_overlap_factor) == (256, 32, 0.25)
    assert (released.spatial_latent_tile, released.temporal_latent_tile) == (8, 8)

    abstract = conv.abstract_model(manifest["config"])  # nnx.eval_shape: nothing allocated
    targets = variable_paths(abstract)
    sources = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    steps = plan(conv.table(manifest["config"]), sources, targets)
    assert {s.target for s in steps} == set(targets)
    assert {src for s in steps for src in s.sources} == set(sources)
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == manifest["num_elements"]
    assert conv.config_from_source(fixtures_dir / "nowhere" / "F32T4C128_AE.safetensors") == released.to_dict()
    # Logical axis names on every parameter.
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_bad_checkpoint_names_every_offender(case, tmp_path):
    weights = load_file(case.weights_path)
    weights.pop("decoder.stages.2.op_list.1.context_module.main.aggreg.0.1.weight")
    weights["encoder.stages.9.op_list.0.main.conv1.conv.weight"] = np.zeros((32, 32, 3, 3, 3), np.float32)
    weights["encoder.project_in.conv.weight"] = np.zeros((32, 3, 1, 3, 3), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ConversionError) as err:
        load_model("dc_ae", path, config=case.config)
    for key in ("decoder.stages.2.op_list.1.context_module.main.aggreg.0.1.weight",
                "encoder.stages.9.op_list.0.main.conv1.conv.weight", "encoder.project_in.conv.weight"):
        assert key in str(err.value)


# ================================================================================================ inputs


@pytest.mark.parametrize("method, shape, message", [
    ("encode", (8, 32, 32, 3), r"\(B, T, H, W, C\)"),
    ("encode", (1, 3, 8, 32, 32), "channels-first"),
    ("encode", (1, 8, 32, 32, 4), r"C=3"),
    ("encode", (1, 6, 32, 32, 3), "multiple of the time compression 4"),
    ("encode", (1, 8, 36, 32, 3), "multiples of the spatial compression 8"),
    ("encode", (1, 24, 48, 36, 3), "tile"),  # a 12-px wide edge tile does not divide by 8
    ("decode", (1, 2, 4, 4, 3), r"C=16"),
    ("decode", (2, 4, 4, 16), r"\(B, T, H, W, C\)"),
])
def test_bad_inputs_are_named(model, method, shape, message):
    with pytest.raises(UserError, match=message):
        getattr(model, method)(jnp.zeros(shape, jnp.float32), tiled=True)


# ================================================================================================ dtypes


def test_bf16_weights_and_compute(case):
    model, _ = load_model("dc_ae", case.weights_path, config=case.config, dtype=jnp.bfloat16)
    assert model.encoder.project_in.conv.kernel[...].dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16
    z = model.encode(_cl(case["video"]))
    x = model.decode(_cl(case["z_dec_in"]))
    assert z.dtype == x.dtype == jnp.bfloat16
    assert relative_error(to_channels_first(z.astype(jnp.float32)), case["z"]) < 0.05
    assert relative_error(to_channels_first(x.astype(jnp.float32)), case["decoded"]) < 0.05
    assert MODELS["dc_ae"].abstract(case.config, param_dtype="bfloat16", compute_dtype="float32").dtype == jnp.float32


# ================================================================================================ building blocks


def test_pixel_shuffle_channel_order_matches_torch():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 3, 4, 6, 16)).astype(np.float32)  # (B, T, H, W, C·r²), r = 2, C = 4
    ours = dc.pixel_shuffle(jnp.asarray(x), 2, temporal=False)
    frames = torch.from_numpy(x[0]).permute(0, 3, 1, 2)  # per frame (T, C·r², H, W)
    ref = F.pixel_shuffle(frames, 2).permute(0, 2, 3, 1).numpy()[None]
    np.testing.assert_array_equal(np.asarray(ours), ref)
    back = dc.pixel_unshuffle(ours, 2, temporal=False)
    ref_back = F.pixel_unshuffle(torch.from_numpy(ref[0]).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).numpy()[None]
    np.testing.assert_array_equal(np.asarray(back), ref_back)

    # 3D: channel-major, then (rt, rh, rw), written einops-style on the reference's (B, C, T, H, W) layout.
    y = rng.normal(size=(2, 3, 2, 5, 24)).astype(np.float32)  # (B, T, H, W, C·r³), C = 3
    ours = dc.pixel_shuffle(jnp.asarray(y), 2, temporal=True)
    ref = rearrange(torch.from_numpy(y), "b t h w (c rt rh rw) -> b (t rt) (h rh) (w rw) c", rt=2, rh=2, rw=2)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    np.testing.assert_array_equal(np.asarray(dc.pixel_unshuffle(ours, 2, temporal=True)), y)


def test_depthwise_taps_equal_grouped_convolution():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 4, 6)).astype(np.float32))
    for k in (3, 5):
        w = jnp.asarray(rng.normal(size=(k, k, k, 1, 6)).astype(np.float32))
        ref = jax.lax.conv_general_dilated(x, w, (1, 1, 1), ((k // 2, k // 2),) * 3,
                                           dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=6,
                                           precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(dc.depthwise_taps(x, w), ref, rtol=1e-5, atol=1e-5)
