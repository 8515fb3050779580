"""MMDiT (Open-Sora 2.0): fixture parity, packing and positions, RoPE layouts, batch independence, dtypes, the
scanned stacks, sharded = unsharded on 8 fake devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import mmdit as conv
from opensora_jax import parallel
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.models.mmdit import (
    MMDiTConfig,
    apply_rope,
    image_position_ids,
    pack,
    preset,
    rope_tables,
    text_position_ids,
    unpack,
)
from opensora_jax.tools.parity.core import run_case, to_channels_last

TINY = dict(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
            depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, cond_embed=True,
            guidance_embed=False, fused_qkv=False, use_liger_rope=True, patch_size=2)


@pytest.fixture(scope="module")
def case_dir(fixtures_dir):
    return fixtures_dir / "opensora_v2_0" / "mmdit_tiny"


@pytest.fixture(scope="module")
def case(case_dir):
    with np.load(case_dir / "io.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _random_model(config: dict, seed: int = 0):
    """Every variable random (so no zero-initialised cond_in hides a wrong path), filled without running init."""
    model, rng = MODELS["mmdit"].abstract(config), np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def _inputs(cfg: MMDiTConfig, batch: int, size: tuple[int, int, int], n_txt: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    t, h, w = size
    c = cfg.latent_channels
    z = rng.standard_normal((batch, t, h, w, c)).astype(np.float32)
    mask = np.zeros((batch, t, h, w, 1), np.float32)
    mask[:, 0] = 1
    ref = np.where(mask > 0, rng.standard_normal(z.shape), 0).astype(np.float32)
    return dict(
        img=pack(jnp.asarray(z), cfg.patch_size),
        img_ids=image_position_ids(batch, size, cfg.patch_size),
        txt=jnp.asarray(rng.standard_normal((batch, n_txt, cfg.context_in_dim)), jnp.float32),
        txt_ids=text_position_ids(batch, n_txt),
        timesteps=jnp.asarray(rng.uniform(0, 1, (batch,)), jnp.float32),
        y_vec=jnp.asarray(rng.standard_normal((batch, cfg.vec_in_dim)), jnp.float32),
        cond=pack(jnp.concatenate([jnp.asarray(mask), jnp.asarray(ref)], -1), cfg.patch_size),
    )


@nnx.jit
def _fwd(model, inputs):
    return model(**inputs)


def _assert_close(actual, expected, rel=1e-5, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err, scale = float(np.max(np.abs(actual - expected))), float(np.max(np.abs(expected)))
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} × {scale:.3g}"


def test_fixture_parity_every_intermediate(case_dir):
    result = run_case(case_dir)
    assert result.passed, result.line()
    assert all(err is not None and err <= 1e-4 for err in result.errors.values()), result.errors
    assert {"intermediate/pe_cos", "intermediate/single_block_1_out", "out"} <= set(result.errors)


def test_pack_positions_and_cond_match_the_reference_prepare(case):
    z = to_channels_last(case["z"])
    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(z), 2)), case["img"])
    cond = np.concatenate([to_channels_last(case["masks"]), to_channels_last(case["masked_ref"])], -1)
    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(cond), 2)), case["cond"])
    np.testing.assert_array_equal(np.asarray(image_position_ids(1, z.shape[1:4], 2)), case["img_ids"])
    np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(case["img"]), z.shape[1:4], 2)), z)


@pytest.mark.parametrize("p", [1, 2])
def test_pack_unpack_roundtrip_non_square(p):
    x = jnp.arange(2 * 3 * 4 * 6 * 5, dtype=jnp.float32).reshape(2, 3, 4, 6, 5)
    tokens = pack(x, p)
    assert tokens.shape == (2, 3 * (4 // p) * (6 // p), 5 * p * p)
    np.testing.assert_array_equal(np.asarray(unpack(tokens, (3, 4, 6), p)), np.asarray(x))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        pack(jnp.zeros((1, 1, 3, 4, 2)), 2)


def test_rope_pairings_are_a_permutation_of_each_other():
    """Interleaved rotation of x equals the rotate-half rotation of x with head dims permuted 2j→j, 2j+1→j+D/2."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 7, 3)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 3, 32)), jnp.float32)
    perm = conv.rope_permutation(32)
    half = apply_rope(x[..., perm], *rope_tables(ids, (8, 12, 12), 10000, True), True)
    inter = apply_rope(x, *rope_tables(ids, (8, 12, 12), 10000, False), False)
    _assert_close(half, inter[..., perm], 1e-6, "rope")
    zero = jnp.zeros((1, 4, 3))  # text ids: identity rotation
    np.testing.assert_allclose(np.asarray(apply_rope(x[:1, :4], *rope_tables(zero, (8, 12, 12), 10000), True)),
                               np.asarray(x[:1, :4]), rtol=0, atol=0)


def test_interleaved_forward_with_interleaved_weights_equals_rotate_half(case):
    """`use_liger_rope=False` (Flux.1-dev pairing) on weights permuted the other way gives the same output."""
    model = _random_model(TINY)
    cfg = model.cfg
    inputs = _inputs(cfg, 1, (3, 8, 8), 12)
    expected = model(**inputs)
    inverse = np.argsort(conv.rope_permutation(cfg.head_dim))
    flux = MODELS["mmdit"].abstract({**TINY, "use_liger_rope": False})
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, var in nnx.to_flat_state(nnx.state(flux)):
        key = "/".join(map(str, path))
        value = values[key]
        if any(f"{n}/" in key for n in ("q_proj", "k_proj")) or key.endswith(("query_norm", "key_norm")):
            value = value[..., inverse]
        var.set_value(value)
    _assert_close(flux(**inputs), expected, 1e-5, "interleaved")


def test_batch_of_two_with_different_conditioning_equals_each_alone():
    model = _random_model(TINY, seed=3)
    inputs = _inputs(model.cfg, 2, (2, 4, 6), 5, seed=4)
    both = _fwd(model, inputs)
    for b in range(2):
        alone = _fwd(model, {k: v[b:b + 1] for k, v in inputs.items()})
        _assert_close(both[b:b + 1], alone, 1e-5, f"sample {b}")


def test_dc_ae_variant_patch_1_and_guidance_embed():
    config = {**TINY, "in_channels": 8, "patch_size": 1, "axes_dim": [8, 12, 12]}
    model = _random_model(config)
    assert model.cond_in.kernel.shape == (9, 64)  # 1 + 8 channels
    out = model(**_inputs(model.cfg, 1, (2, 3, 5), 4))
    assert out.shape == (1, 2 * 3 * 5, 8) and np.isfinite(np.asarray(out)).all()
    flux = _random_model({**TINY, "guidance_embed": True, "cond_embed": False, "use_liger_rope": False})
    inputs = {k: v for k, v in _inputs(flux.cfg, 1, (1, 4, 4), 3).items() if k != "cond"}
    with pytest.raises(ValueError, match="guidance"):
        flux(**inputs)
    a = flux(**inputs, guidance=jnp.asarray([4.0]))
    b = flux(**inputs, guidance=jnp.asarray([2.0]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4  # the guidance embedding is used


def test_guidance_is_ignored_without_guidance_embed_and_cond_is_required():
    model = _random_model(TINY)
    inputs = _inputs(model.cfg, 1, (1, 4, 4), 3)
    np.testing.assert_array_equal(np.asarray(model(**inputs, guidance=jnp.asarray([7.0]))), np.asarray(model(**inputs)))
    with pytest.raises(ValueError, match="cond"):
        model(**{k: v for k, v in inputs.items() if k != "cond"})


def test_bfloat16_close_to_float32():
    model = _random_model(TINY)
    inputs = _inputs(model.cfg, 1, (2, 4, 4), 6)
    f32 = _fwd(model, inputs)
    bf16 = MODELS["mmdit"].abstract({**TINY, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, var in nnx.to_flat_state(nnx.state(bf16)):
        var.set_value(values["/".join(map(str, path))].astype(jnp.bfloat16))
    out = _fwd(bf16, inputs)
    assert out.dtype == jnp.float32
    _assert_close(out, f32, 0.1, "bf16")


def test_stacks_are_scanned_not_unrolled():
    def n_eqns(depth, single):
        model = MODELS["mmdit"].abstract({**TINY, "depth": depth, "depth_single_blocks": single})
        graphdef, state = nnx.split(model)
        inputs = _inputs(model.cfg, 1, (1, 4, 4), 3)
        jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(**i))(state, inputs)
        assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == 2
        return len(jaxpr.eqns)

    assert n_eqns(1, 1) == n_eqns(4, 6)


def test_remat_same_values_and_gradients():
    small = {**TINY, "depth": 1, "depth_single_blocks": 1}
    model = _random_model(small)
    remat = _random_model({**small, "remat": "dots"})
    inputs = _inputs(model.cfg, 1, (1, 4, 4), 3)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.mean(jnp.square(m(**inputs))))(m)

    g1, g2 = grads(model), grads(remat)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
        _assert_close(b.get_value(), a.get_value(), 1e-5, "/".join(map(str, p)))


def test_every_parameter_has_logical_axes():
    model = MODELS["mmdit"].abstract(preset("OpenSora-v2-11B").to_dict())
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.get_value().shape), path
        assert set(a for a in axes if a) <= set(parallel.LOGICAL_AXIS_RULES), path


def test_presets_match_the_released_sizes(fixtures_dir):
    for name, manifest in (("OpenSora-v2-11B", "OpenSora-v2-MMDiT-11B.json"),
                           ("OpenSora-v2-11B-DC-AE", "OpenSora-v2-MMDiT-11B-DC-AE.json")):
        meta = json.loads((fixtures_dir / "manifests" / manifest).read_text())
        model = MODELS["mmdit"].abstract(preset(name).to_dict())
        n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model)))
        assert n == meta["num_elements"], name
        assert MMDiTConfig.from_reference(meta["config"]) == preset(name)
    flux = preset("Flux.1-dev")
    assert flux.guidance_embed and not flux.cond_embed and flux.fused_qkv and not flux.use_liger_rope


def test_config_errors_name_the_problem():
    with pytest.raises(UserError, match="axes_dim"):
        MMDiTConfig(**{**TINY, "axes_dim": (8, 12, 10)})
    with pytest.raises(UserError, match="not divisible"):
        MMDiTConfig(**{**TINY, "num_heads": 3})
    with pytest.raises(UserError, match="unknown MMDiT config keys.*bogus"):
        MMDiTConfig.from_reference({**TINY, "bogus": 1})
    assert MMDiTConfig.from_reference({**TINY, "from_pretrained": "x", "grad_ckpt_settings": [8, 100]}).depth == 2


@pytest.mark.parametrize("spec", ["fsdp=2,tensor=2,sequence=2", "sequence=8", "data=2,tensor=4"])
def test_sharded_forward_equals_unsharded(spec):
    model = _random_model(TINY, seed=5)
    inputs = _inputs(model.cfg, 2, (2, 4, 6), 5, seed=6)  # 5 + 12 = 17 tokens: the ring pads to a multiple of n
    expected = nnx.jit(lambda m, i: m(**i))(model, inputs)
    mesh = parallel.make_mesh(spec)
    parallel.shard_params(model, mesh)
    inputs = parallel.shard_batch(inputs, mesh)
    with parallel.sharding_context(mesh):
        out = nnx.jit(lambda m, i: m(**i))(model, inputs)
    _assert_close(out, expected, 1e-5, spec)
