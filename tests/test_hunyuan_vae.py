"""Open-Sora 2.0's Hunyuan causal 3D VAE: fixture parity, a PyTorch oracle of the reference semantics
(batch 2, non-square tiles, images, temporal tiles), sampling, conversion, input errors, meshes, bf16.

Speed: the model runs eagerly around one compiled step per work-item shape, and that step's cache is keyed on the
encoder/decoder structure and the item shape only. The tests therefore reuse the public tiled case's architecture
and tile shapes (most steps compile once, in the parity test), and compile with XLA's cheap optimisation level
(`jax_disable_most_optimizations`, restored afterwards): numerics stay float32-exact to ~1e-6.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file

from opensora_jax.errors import UserError
from opensora_jax.models.vae.hunyuan import (
    PRESETS,
    HunyuanVAEConfig,
    block_layout,
    build,
    decode_jit,
    encode_jit,
    preset,
)

TILED_CASE = ("opensora_v2_0", "hunyuan_vae_tiny_tiled")


# --------------------------------------------------------------------------- a torch oracle
# Written from the reference's documented semantics (fixture README, spec §3.2), channels-first, with the
# reference's in-place tile blending, on reference-layout weights. It reproduces the public fixtures to
# float32 noise (test_oracle_reproduces_the_fixtures), so it stands in for the reference on the
# shapes the fixtures lack.


class Oracle:
    """The reference's maths in float32 torch on (B, C, T, H, W) (float64 is 3× slower on CPU, no better here)."""

    def __init__(self, cfg: dict, sd: dict):
        self.c = HunyuanVAEConfig.from_reference(cfg)
        self.sd = {k: torch.as_tensor(np.array(v), dtype=torch.float32) for k, v in sd.items()}

    def conv(self, name, x, stride=(1, 1, 1)):
        w = self.sd[name + ".weight"]
        k = w.shape[-1]
        if k > 1:
            x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, k - 1, 0), mode="replicate")
        return F.conv3d(x, w, self.sd[name + ".bias"], stride=stride)

    def gn(self, name, x):
        return F.group_norm(x, self.c.norm_num_groups, self.sd[name + ".weight"], self.sd[name + ".bias"], eps=1e-6)

    def res(self, name, x):
        h = self.conv(name + ".conv1.conv", F.silu(self.gn(name + ".norm1", x)))
        h = self.conv(name + ".conv2.conv", F.silu(self.gn(name + ".norm2", h)))
        if name + ".conv_shortcut.conv.weight" in self.sd:
            x = self.conv(name + ".conv_shortcut.conv", x)
        return x + h

    def attention(self, name, x):
        b, c, t, h, w = x.shape
        seq = x.reshape(b, c, t * h * w)
        y = self.gn(name + ".group_norm", seq).transpose(1, 2)
        lin = lambda p, v: v @ self.sd[f"{name}.{p}.weight"].T + self.sd[f"{name}.{p}.bias"]  # noqa: E731
        q, k, v = lin("to_q", y), lin("to_k", y), lin("to_v", y)
        frame = torch.arange(t * h * w) // (h * w)
        bias = torch.where(frame[None, :] <= frame[:, None], 0.0, float("-inf"))
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c) + bias, -1) @ v
        return (lin("to_out.0", out) + seq.transpose(1, 2)).transpose(1, 2).reshape(x.shape)

    def mid(self, name, x):
        x = self.res(name + ".resnets.0", x)
        if name + ".attentions.0.to_q.weight" in self.sd:
            x = self.attention(name + ".attentions.0", x)
        return self.res(name + ".resnets.1", x)

    def blocks(self, prefix, kind):
        i = 0
        while f"{prefix}.{i}.resnets.0.norm1.weight" in self.sd:
            j = 0
            while f"{prefix}.{i}.resnets.{j}.norm1.weight" in self.sd:
                yield "res", f"{prefix}.{i}.resnets.{j}", i
                j += 1
            if f"{prefix}.{i}.{kind}.0.conv.conv.weight" in self.sd:
                yield kind, f"{prefix}.{i}.{kind}.0.conv.conv", i
            i += 1

    def encoder(self, x):
        layout = block_layout(self.c)
        x = self.conv("encoder.conv_in.conv", x)
        for kind, name, i in self.blocks("encoder.down_blocks", "downsamplers"):
            ft, fs = layout[i]
            x = self.res(name, x) if kind == "res" else self.conv(name, x, (ft, fs, fs))
        x = self.mid("encoder.mid_block", x)
        return self.conv("encoder.conv_out.conv", F.silu(self.gn("encoder.conv_norm_out", x)))

    def decoder(self, x):
        layout = block_layout(self.c)
        x = self.mid("decoder.mid_block", self.conv("decoder.conv_in.conv", x))
        for kind, name, i in self.blocks("decoder.up_blocks", "upsamplers"):
            if kind == "res":
                x = self.res(name, x)
                continue
            ft, fs = layout[i]
            first = F.interpolate(x[:, :, 0], scale_factor=(fs, fs), mode="nearest")[:, :, None]
            if x.shape[2] > 1:
                first = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=(ft, fs, fs), mode="nearest")], 2)
            x = self.conv(name, first)
        return self.conv("decoder.conv_out.conv", F.silu(self.gn("decoder.conv_norm_out", x)))

    def plain(self, name, x):
        return F.conv3d(x, self.sd[name + ".weight"], self.sd[name + ".bias"])

    @staticmethod
    def blend(a, b, extent, dim):  # in place on b, like the reference
        extent = min(a.shape[dim], b.shape[dim], extent)
        for y in range(extent):
            ia, ib = [slice(None)] * 5, [slice(None)] * 5
            ia[dim], ib[dim] = a.shape[dim] - extent + y, y
            b[tuple(ib)] = a[tuple(ia)] * (1 - y / extent) + b[tuple(ib)] * (y / extent)
        return b

    def spatial(self, x, fn, tile, tile_out):
        stride, blend = int(tile * (1 - self.c.tile_overlap_factor)), int(tile_out * self.c.tile_overlap_factor)
        keep = tile_out - blend
        rows = [[fn(x[..., i:i + tile, j:j + tile]) for j in range(0, x.shape[-1], stride)]
                for i in range(0, x.shape[-2], stride)]
        out = []
        for i, row in enumerate(rows):
            kept = []
            for j, t in enumerate(row):
                if i > 0:
                    t = self.blend(rows[i - 1][j], t, blend, 3)
                if j > 0:
                    t = self.blend(row[j - 1], t, blend, 4)
                kept.append(t[..., :keep, :keep])
            out.append(torch.cat(kept, -1))
        return torch.cat(out, -2)

    def run(self, x, fn, sp, tp, encode):
        c = self.c
        s_in, s_out = (c.sample_size, c.tile_latent_size) if encode else (c.tile_latent_size, c.sample_size)
        t_in, t_out = (c.sample_tsize, c.tile_latent_tsize) if encode else (c.tile_latent_tsize, c.sample_tsize)

        def maybe_spatial(v):
            if sp and (v.shape[-1] > s_in or v.shape[-2] > s_in):
                return self.spatial(v, fn, s_in, s_out)
            return fn(v)

        if not (tp and x.shape[2] > t_in):
            return maybe_spatial(x)
        stride, blend = int(t_in * (1 - c.tile_overlap_factor)), int(t_out * c.tile_overlap_factor)
        row = []
        for i in range(0, x.shape[2], stride):
            out = maybe_spatial(x[:, :, i:i + t_in + 1])
            row.append(out[:, :, 1:] if i > 0 else out)
        kept = [row[0][:, :, :t_out - blend + 1]]
        for i in range(1, len(row)):
            kept.append(self.blend(row[i - 1], row[i], blend, 2)[:, :, :t_out - blend])
        return torch.cat(kept, 2)

    def encode(self, video, sp=False, tp=False):
        """(z, mean, clamped logvar), all (B, C, T', H', W')."""
        fn = lambda v: self.plain("quant_conv", self.encoder(v))  # noqa: E731
        mean, logvar = self.run(torch.as_tensor(np.array(video), dtype=torch.float32), fn, sp, tp, True).chunk(2, 1)
        return self.c.scale_factor * (mean - self.c.shift_factor), mean, logvar.clamp(-30, 20)

    def decode(self, z, sp=False, tp=False):
        z = torch.as_tensor(np.array(z), dtype=torch.float32) / self.c.scale_factor + self.c.shift_factor
        return self.run(z, lambda v: self.decoder(self.plain("post_quant_conv", v)), sp, tp, False)


# --------------------------------------------------------------------------- helpers


def _write(tmp_path, tensors, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def _load(path, config, **kw):
    from convert.registry import load_model

    return load_model("hunyuan_vae", path, config=config, **kw)[0]


def _rel(ours, expected) -> float:
    expected = np.asarray(expected, np.float64)
    ours = np.asarray(ours, np.float64)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def _cl(x):  # (B, C, T, H, W) → (B, T, H, W, C)
    return jnp.asarray(np.moveaxis(np.asarray(x), 1, -1))


def _cf(x):
    return np.moveaxis(np.asarray(x, np.float32), -1, 1)


def _uniform(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _cheap_compiles():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def tiled_case(fixtures_dir):
    """(config, state_dict, model loaded through the converter, oracle) of the public tiled case: widths
    16/32/32/32, one ResNet per encoder level, 8 groups, latent 4, 32 px tiles, spatial tiling on."""
    from safetensors.numpy import load_file

    case = fixtures_dir.joinpath(*TILED_CASE)
    config = json.loads((case / "case.json").read_text())["config"]
    sd = load_file(case / "weights.safetensors")
    return config, sd, _load(case / "weights.safetensors", config), Oracle(config, sd)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["hunyuan_vae_tiny", "hunyuan_vae_tiny_tiled"])
def test_parity_fixture(fixtures_dir, case):
    from opensora_jax.tools.parity.core import run_case

    result = run_case(fixtures_dir / "opensora_v2_0" / case)
    assert result.passed, result.line()


def _tiled_io(fixtures_dir):
    return np.load(fixtures_dir.joinpath(*TILED_CASE) / "io.npz")


def test_oracle_reproduces_the_fixtures(fixtures_dir, tiled_case):
    """The torch oracle used below is the reference on the public tiled case (the per-tile maths and blending)."""
    _, _, _, oracle = tiled_case
    io = _tiled_io(fixtures_dir)
    z, _, logvar = oracle.encode(io["video"], sp=True)
    assert _rel(z, io["z_tiled"]) < 1e-5
    assert _rel(logvar, io["intermediate/posterior_logvar_tiled"]) < 1e-5
    assert _rel(oracle.decode(io["z_dec_in"], sp=True), io["decoded_tiled"]) < 1e-5


# --------------------------------------------------------------------------- what the fixtures lack


def test_batch_of_two_non_square_tiled(fixtures_dir, tiled_case):
    """Batch 2 at 48×40 px (> 32 px tiles of four shapes) through the config's spatial tiling: the fixture's video
    next to another gives the fixture's tiled results, and the other video what it gives alone."""
    _, _, model, _ = tiled_case
    io = _tiled_io(fixtures_dir)
    other = _uniform(io["video"].shape, 0)
    z, post = model.encode(_cl(np.concatenate([io["video"], other])), return_posterior=True)
    assert z.shape == (2, 2, 6, 5, 4)
    assert _rel(_cf(z[:1]), io["z_tiled"]) < 1e-4
    assert _rel(_cf(post.logvar[:1]), io["intermediate/posterior_logvar_tiled"]) < 1e-4
    np.testing.assert_allclose(z[1:], model.encode(_cl(other)), rtol=1e-5, atol=1e-6)
    z_other = np.asarray(z[1:])
    x = model.decode(jnp.concatenate([_cl(io["z_dec_in"]), z_other]))
    assert x.shape == (2, 5, 48, 40, 3)
    assert _rel(_cf(x[:1]), io["decoded_tiled"]) < 1e-4
    np.testing.assert_allclose(x[1:], model.decode(jnp.asarray(z_other)), rtol=1e-5, atol=1e-5)


def test_single_images_jitted(tiled_case):
    """T = 1 (images), a batch of two: one latent frame each, decoded to one frame, through the whole-program jit
    (the items loop inside one compiled program; the other tests run the eager per-item steps)."""
    _, _, model, oracle = tiled_case
    images = _uniform((2, 3, 1, 32, 32), 1)
    z = encode_jit(model, _cl(images))
    assert z.shape == (2, 1, 4, 4, 4)
    assert _rel(_cf(z), oracle.encode(images)[0]) < 1e-4
    x = decode_jit(model, z)
    assert x.shape == (2, 1, 32, 32, 3)
    assert _rel(_cf(x), oracle.decode(_cf(z))) < 1e-4


def test_temporal_tiling_matches_the_oracle(tiled_case):
    """sample_tsize 16: 17-frame tiles every 12 frames, 5-latent tiles every 3 latents, blended over 1 latent /
    4 frames; the frame counts are the untiled ones (the strides are frame-aligned)."""
    from convert.hunyuan_vae import abstract_model
    from opensora_jax.checkpoints import flat_params, materialize

    config, sd, base, _ = tiled_case
    cfg = dict(config, sample_tsize=16, use_temporal_tiling=True)
    model = materialize(abstract_model(cfg), flat_params(base))
    oracle = Oracle(cfg, sd)
    video = _uniform((1, 3, 21, 32, 32), 2)
    z = model.encode(_cl(video))
    assert z.shape == (1, 6, 4, 4, 4)
    assert _rel(_cf(z), oracle.encode(video, sp=True, tp=True)[0]) < 1e-4
    x = model.decode(z)
    assert x.shape == (1, 21, 32, 32, 3)
    assert _rel(_cf(x), oracle.decode(_cf(z), sp=True, tp=True)) < 1e-4


def test_released_tiling_geometry_keeps_frame_counts():
    """Released tile sizes (64 frames / 16 latents, 256 px / 32 latents): 129 frames ↔ 33 latents and
    288 px ↔ 36 latent rows with both tilings on, as untiled (shapes only, nothing computed)."""
    cfg = preset("OpenSora-v2", block_out_channels=(4, 4, 4, 4), norm_num_groups=4, layers_per_block=1,
                 mid_block_add_attention=False, use_temporal_tiling=True)
    model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    z = jax.eval_shape(lambda m, v: m.encode(v), model, jax.ShapeDtypeStruct((1, 129, 288, 64, 3), jnp.float32))
    assert z.shape == (1, 33, 36, 8, 16)
    x = jax.eval_shape(lambda m, v: m.decode(v), model, jax.ShapeDtypeStruct((1, 33, 36, 8, 16), jnp.float32))
    assert x.shape == (1, 129, 288, 64, 3)


def test_posterior_sampling(tiled_case):
    _, _, model, _ = tiled_case
    video = _cl(_uniform((1, 3, 5, 48, 40), 4))
    key = jax.random.key(7)
    mean, post = model.encode(video, tiled=False, return_posterior=True)
    z = model.encode(video, tiled=False, sample=True, key=key)
    assert z.shape == mean.shape and not np.allclose(z, mean)
    np.testing.assert_array_equal(z, model.encode(video, tiled=False, sample=True, key=key))
    noise = jax.random.normal(key, post.mean.shape, jnp.float32)
    expected = 0.476986 * (post.mean + jnp.exp(0.5 * post.logvar) * noise)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    assert float(post.logvar.min()) >= -30 and float(post.logvar.max()) <= 20
    with pytest.raises(ValueError, match="key"):
        model.encode(video, sample=True)


# --------------------------------------------------------------------------- config, conversion, errors


def test_config_keys(tiled_case):
    config = tiled_case[0]
    cfg = HunyuanVAEConfig.from_reference(config)  # from_pretrained, use_slicing, dropout, channel: ignored
    assert HunyuanVAEConfig.from_reference(cfg.to_dict()) == cfg
    assert cfg.latent_size(5, 48, 40) == (2, 6, 5) and cfg.num_frames(2) == 5
    with pytest.raises(UserError, match="bogus_key"):
        HunyuanVAEConfig.from_reference(dict(config, bogus_key=1))
    with pytest.raises(UserError, match="time_compression_ratio"):
        HunyuanVAEConfig.from_reference(dict(config, time_compression_ratio=2))
    with pytest.raises(UserError, match="norm_num_groups"):
        HunyuanVAEConfig.from_reference(dict(config, norm_num_groups=3))


def test_full_size_manifest_maps_both_ways(fixtures_dir):
    import convert.hunyuan_vae as conv
    from convert.checkpoint import variable_paths
    from convert.keymap import plan

    manifest = json.loads((fixtures_dir / "manifests" / "HunyuanVideo-VAE-OpenSora-v2.json").read_text())
    assert HunyuanVAEConfig.from_reference(manifest["config"]) == preset("OpenSora-v2")
    assert PRESETS["OpenSora-v2"]["use_spatial_tiling"] and not PRESETS["OpenSora-v2"]["use_temporal_tiling"]
    assert conv.config_from_source(fixtures_dir / "no_such_dir" / "w.safetensors") == preset().to_dict()
    abstract = conv.abstract_model(manifest["config"])  # nnx.eval_shape: nothing allocated
    targets = variable_paths(abstract)
    sources = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    steps = plan(conv.table(manifest["config"]), sources, targets)
    assert {s.target for s in steps} == set(targets)
    assert {src for s in steps for src in s.sources} == set(sources)
    assert len(sources) == manifest["num_tensors"]
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == manifest["num_elements"]
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):  # logical axes on every parameter
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_bad_checkpoint_names_every_problem(tiled_case, tmp_path):
    from convert.keymap import ConversionError

    config, sd, _, _ = tiled_case
    bad = dict(sd)
    del bad["decoder.up_blocks.1.resnets.0.norm2.bias"]
    bad["encoder.down_blocks.9.resnets.0.conv1.conv.weight"] = np.zeros((4, 4, 3, 3, 3), np.float32)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        _load(_write(tmp_path, bad), config)
    text = str(err.value)
    for key in ("decoder.up_blocks.1.resnets.0.norm2.bias", "encoder.down_blocks.9.resnets.0.conv1.conv.weight",
                "quant_conv.weight"):
        assert key in text


@pytest.mark.parametrize(
    "method, shape, message",
    [
        ("encode", (5, 16, 16, 3), r"\(B, T, H, W, 3\)"),
        ("encode", (1, 3, 5, 16, 16), "channels-first"),
        ("encode", (1, 5, 16, 16, 4), r"\(B, T, H, W, 3\)"),
        ("encode", (1, 4, 16, 16, 3), r"T = 1 \+ 4k"),
        ("decode", (1, 2, 2, 2), r"\(B, T', H', W', 4\)"),
        ("decode", (1, 2, 2, 2, 3), r"\(B, T', H', W', 4\)"),
    ],
)
def test_bad_input_is_named(tiled_case, method, shape, message):
    model = tiled_case[2]
    with pytest.raises(UserError, match=message):
        getattr(model, method)(jnp.zeros(shape, jnp.float32))


# --------------------------------------------------------------------------- meshes and dtypes


def _sharded_copy(config, model, mesh):
    from convert.hunyuan_vae import abstract_model
    from opensora_jax.checkpoints import flat_params, materialize

    return materialize(abstract_model(config), flat_params(model), mesh)


def test_mesh_split_equals_one_device(tiled_case):
    """A batch of 2 videos split over 8 fake devices (fsdp-split weights): the same posterior samples as on one
    device, batch-split like any batch array. Tiles are items of the same `sharded_item_map` loop (slow test)."""
    from opensora_jax import parallel

    config, _, model, _ = tiled_case
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = _sharded_copy(config, model, mesh)
    video = _cl(_uniform((2, 3, 5, 48, 40), 5))
    key = jax.random.key(2)
    z = model.encode(video, sample=True, key=key, tiled=False)
    with parallel.sharding_context(mesh):  # the mesh of the active context
        z_mesh = sharded.encode(video, sample=True, key=key, tiled=False)
    np.testing.assert_allclose(z_mesh, z, rtol=1e-6, atol=1e-6)
    assert z_mesh.sharding.is_equivalent_to(parallel.batch_sharding(z.shape, mesh), z.ndim)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_tiles_on_a_mesh_equal_one_device(tiled_case, spec):
    """Batch 2 × 4 tiles of four shapes, encode (sampled) and decode, on 8 fake devices."""
    from opensora_jax import parallel

    config, _, model, _ = tiled_case
    mesh = parallel.make_mesh(spec)
    sharded = _sharded_copy(config, model, mesh)
    video = _cl(_uniform((2, 3, 5, 48, 40), 0))
    key = jax.random.key(3)
    z = model.encode(video, sample=True, key=key)
    np.testing.assert_allclose(sharded.encode(video, sample=True, key=key, mesh=mesh), z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sharded.decode(z, mesh=mesh), model.decode(z), rtol=1e-6, atol=1e-6)


def test_bfloat16_smoke(tiled_case):
    """bfloat16 weights and compute: bfloat16 latents and video, close to float32 (random weights, ~30 layers)."""
    config, _, model, _ = tiled_case
    from convert.hunyuan_vae import abstract_model
    from opensora_jax.checkpoints import flat_params, materialize

    bf16 = materialize(abstract_model(config, jnp.bfloat16, jnp.bfloat16), flat_params(model))
    images = _cl(_uniform((2, 3, 1, 32, 32), 1))  # as test_single_images_jitted: its float32 programs are reused
    z = encode_jit(bf16, images)
    assert z.dtype == jnp.bfloat16
    assert _rel(z.astype(jnp.float32), encode_jit(model, images)) < 0.05  # measured 0.015
    x = decode_jit(bf16, z)
    assert x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
    assert _rel(x.astype(jnp.float32), decode_jit(model, z.astype(jnp.float32))) < 0.15  # measured 0.058
