"""STDiT3: reference parity on the shared fixtures, plus behaviour the fixtures do not pin down."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax.models.stdit3 import STDiT3, STDiT3Config, preset
from opensora_jax.tools.parity.core import run_case

TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)


def _cases(root: pathlib.Path, component: str) -> list[pathlib.Path]:
    found = []
    for case_json in sorted(root.glob("*/*/case.json")):
        if json.loads(case_json.read_text()).get("component") == component:
            found.append(case_json.parent)
    return found


def test_fixture_parity(fixtures_dir):
    cases = _cases(fixtures_dir, "STDiT3")
    assert cases, f"no STDiT3 cases under {fixtures_dir}"
    for case in cases:
        result = run_case(case)
        assert result.passed, result.line()


def _inputs(cfg, key, b=2, t=3, h=6, w=10, text_lens=(5, 9)):
    k = jax.random.split(key, 4)
    x = jax.random.normal(k[0], (b, t, h, w, cfg.in_channels))
    y = jax.random.normal(k[1], (b, cfg.model_max_length, cfg.caption_channels))
    mask = (jnp.arange(cfg.model_max_length)[None] < jnp.asarray(text_lens)[:, None]).astype(jnp.int32)
    return dict(x=x, timestep=jnp.array([900.0, 120.0])[:b], y=y, mask=mask,
                fps=jnp.full((b,), 24.0), height=jnp.full((b,), h * 8.0), width=jnp.full((b,), w * 8.0))


def _model(**overrides):
    return STDiT3(STDiT3Config(**{**TINY, **overrides}), rngs=nnx.Rngs(1))


@pytest.mark.slow  # default run kept near 15 minutes; run with -m slow
def test_text_mask_equals_truncated_text():
    """A padded caption with its mask gives the same output as the caption cut to its valid tokens."""
    model = _model()
    inputs = _inputs(model.cfg, jax.random.key(0))
    full = model(**inputs)
    for b, length in enumerate((5, 9)):
        single = {k: v[b : b + 1] for k, v in inputs.items()}
        single["y"] = single["y"][:, :length]
        single["mask"] = None
        np.testing.assert_allclose(model(**single)[0], full[b], rtol=1e-5, atol=1e-5)


def test_mask_and_fps_repeat_for_cfg_batch():
    """A (B, L) mask / (B,) fps with a 2B batch is repeated, as the reference does for the null branch."""
    model = _model()
    inputs = _inputs(model.cfg, jax.random.key(1))
    doubled = {k: jnp.concatenate([v, v]) for k, v in inputs.items()}
    explicit = model(**doubled)
    repeated = model(**{**doubled, "mask": inputs["mask"], "fps": inputs["fps"]})
    np.testing.assert_array_equal(explicit, repeated)


def test_odd_sizes_are_padded_then_cropped():
    model = _model(patch_size=(2, 2, 2))
    inputs = _inputs(model.cfg, jax.random.key(2), t=3, h=5, w=7)
    out = model(**inputs)
    assert out.shape == (2, 3, 5, 7, 2 * model.cfg.in_channels)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_all_true_x_mask_equals_no_x_mask():
    model = _model()
    inputs = _inputs(model.cfg, jax.random.key(3))
    np.testing.assert_array_equal(model(**inputs), model(**inputs, x_mask=jnp.ones((2, 3), bool)))


def test_layer_stack_is_scanned_not_unrolled():
    """The traced program has the same size whatever the depth: one scan over stacked layers."""
    def n_eqns(depth):
        model = _model(depth=depth)
        inputs = _inputs(model.cfg, jax.random.key(4))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(**i))(state, inputs)
        assert any(e.primitive.name == "scan" for e in jaxpr.eqns)
        return len(jaxpr.eqns)

    assert n_eqns(2) == n_eqns(5)


def test_no_qk_norm_other_mlp_ratio_head_dim_72():
    model = STDiT3(STDiT3Config(depth=1, hidden_size=144, num_heads=2, mlp_ratio=2.5, qk_norm=False,
                                caption_channels=16, model_max_length=8), rngs=nnx.Rngs(0))
    assert model.cfg.head_dim == 72
    assert not hasattr(model.blocks.spatial.attn, "q_norm")
    out = model(**_inputs(model.cfg, jax.random.key(5)))
    assert out.shape[-1] == 8


@pytest.mark.slow  # long-running; `pytest -m slow`
def test_bfloat16_close_to_float32():
    f32 = _model()
    bf16 = _model(dtype="bfloat16", param_dtype="bfloat16")
    nnx.update(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(f32)))
    inputs = _inputs(f32.cfg, jax.random.key(6))
    a, b = f32(**inputs), bf16(**inputs)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 5e-2


def test_remat_same_values_and_gradients():
    plain, remat = _model(), _model(remat=True)
    inputs = _inputs(plain.cfg, jax.random.key(7))

    def loss(m):
        return jnp.mean(m(**inputs) ** 2)

    l1, g1 = nnx.value_and_grad(loss)(plain)
    l2, g2 = nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_training_mode_dropout_needs_key_and_is_random():
    model = _model(class_dropout_prob=0.5, drop_path=0.2)
    inputs = _inputs(model.cfg, jax.random.key(8))
    with pytest.raises(ValueError, match="dropout_key"):
        model(**inputs, train=True)
    outs = [model(**inputs, train=True, dropout_key=jax.random.key(i)) for i in range(4)]
    assert any(not np.allclose(outs[0], o) for o in outs[1:])
    np.testing.assert_array_equal(model(**inputs), model(**inputs))  # eval mode is deterministic


def test_class_dropout_uses_null_caption():
    model = _model(class_dropout_prob=1.0)
    inputs = _inputs(model.cfg, jax.random.key(9))
    dropped = model(**inputs, train=True, dropout_key=jax.random.key(0))
    null = model(**{**inputs, "y": model.null_caption(2)})
    np.testing.assert_allclose(dropped, null, rtol=1e-5, atol=1e-6)


def test_every_parameter_has_logical_axes():
    model = _model()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.shape.__len__(), path
    assert model.blocks.spatial.attn.qkv_kernel.get_metadata()["out_sharding"][0] == "layers"


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="bogus"):
        STDiT3Config.from_reference({"hidden_size": 64, "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        STDiT3Config(hidden_size=65, num_heads=4)
    with pytest.raises(ValueError, match="channels-last"):
        model = _model()
        model(**{**_inputs(model.cfg, jax.random.key(0)), "x": jnp.zeros((2, 4, 3, 6, 10))})


def test_presets_match_the_reference_sizes():
    xl, big = preset("STDiT3-XL/2"), preset("STDiT3-3B/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.head_dim) == (1152, 28, 16, 72)
    assert (big.hidden_size, big.depth, big.num_heads, big.head_dim) == (1872, 28, 26, 72)
    with pytest.raises(ValueError, match="STDiT3-XL/2"):
        preset("STDiT3-XXL")
