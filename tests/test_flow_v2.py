"""Open-Sora 2.0 sampler: fixture trajectories, the shift table, guidance schedules, the 2-branch t2v batch,
latent conditions for every cond type, paste-back, sharded = unsharded."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax import parallel
from opensora_jax.conditioning.latent_conditions import COND_TYPES, inference_condition, paste_references
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.models.mmdit import image_position_ids, pack
from opensora_jax.schedulers import flow_v2
from opensora_jax.tools.parity.core import run_case

TINY = dict(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
            depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, cond_embed=True)


@pytest.mark.parametrize("case", ["sampler_t2v_tiny", "sampler_i2v_tiny"])
def test_fixture_trajectories(fixtures_dir, case):
    result = run_case(fixtures_dir / "opensora_v2_0" / case)
    assert result.passed, result.line()
    assert all(err is not None for err in result.errors.values())


def test_shift_matches_the_spec_table():
    # 256px 16:9, 129 frames: latent 24x42 → 252 tokens per frame, 33 latent frames.
    assert flow_v2.shift_alpha(252, 33) == pytest.approx(5.7326, abs=1e-4)
    assert flow_v2.shift_alpha(2304, 33) == pytest.approx(11.8721, abs=1e-4)
    assert flow_v2.shift_alpha(2304, 1) == pytest.approx(2.0667, abs=1e-4)
    ts = flow_v2.timesteps(50, 252, 33)
    assert ts.dtype == np.float32 and len(ts) == 51
    np.testing.assert_allclose(ts[:3], [1.0, 0.99645, 0.99278], atol=1e-5)
    np.testing.assert_allclose(ts[-3:], [0.19281, 0.10474, 0.0], atol=1e-5)
    np.testing.assert_allclose(flow_v2.timesteps(4, 252, 33, shift=False), [1, 0.75, 0.5, 0.25, 0])
    assert flow_v2.timesteps(4, 252, 33, alpha=1.0)[1] == pytest.approx(0.75)  # flow_shift overrides α
    with pytest.raises(UserError):
        flow_v2.timesteps(0, 1, 1)


def test_guidance_schedules_oscillate_and_ramp():
    g = flow_v2.GuidanceV2(guidance=7.5, guidance_img=3.0)
    text, image = g.schedules(14, 4, image_condition=True)
    assert list(text[9:14]) == [7.5, 7.5, 1.0, 7.5, 1.0]
    np.testing.assert_allclose(image[0], np.linspace(1.0, 3.0, 4))
    upper = np.linspace(3.0, 1.0, 15)
    np.testing.assert_allclose(image[12], np.linspace(1.0, upper[12], 4), rtol=1e-6)
    assert (image[11] == 1.0).all()  # odd step ≥ 10: oscillated to 1, so no ramp
    _, image_t2v = g.schedules(14, 4, image_condition=False)
    assert (image_t2v[0] == 3.0).all()
    text_off, image_off = flow_v2.GuidanceV2(text_osci=False, image_osci=False, scale_temporal_osci=False).schedules(
        12, 3, True)
    assert (text_off == 7.5).all() and (image_off == 3.0).all()


def _model():
    model, rng = MODELS["mmdit"].abstract(TINY), np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def _run(model, cond, branches=3, b=2, size=(2, 4, 6)):
    rng = np.random.default_rng(1)
    t, h, w = size
    noise = pack(jnp.asarray(rng.standard_normal((b, t, h, w, 4)), jnp.float32), 2)
    txt = jnp.asarray(rng.standard_normal((3 * b, 5, 40)), jnp.float32)
    txt = txt.at[2 * b:].set(txt[b:2 * b])  # negatives twice, as the pipeline passes them
    vec = jnp.asarray(rng.standard_normal((3 * b, 24)), jnp.float32)
    vec = vec.at[2 * b:].set(vec[b:2 * b])
    ts = flow_v2.timesteps(4, (h // 2) * (w // 2), t)
    text_s, image_s = flow_v2.GuidanceV2().schedules(4, t, image_condition=cond is not None)
    return flow_v2.sample_jit(model, noise, cond, txt, vec, image_position_ids(b, size, 2), ts, text_s, image_s,
                              tokens_per_frame=(h // 2) * (w // 2), branches=branches)


def test_t2v_two_branch_batch_equals_three():
    model = _model()
    three, two = _run(model, None, 3), _run(model, None, 2)
    err = float(jnp.max(jnp.abs(three - two)))
    assert err <= 1e-5 * float(jnp.max(jnp.abs(three))), err
    with pytest.raises(ValueError, match="2-branch"):
        _run(model, jnp.zeros((2, 12, 20)), 2)


@pytest.mark.parametrize("cond_type", COND_TYPES)
def test_conditions_mark_the_reference_frames(cond_type):
    shape = (2, 20, 2, 3, 4)
    head, tail = np.full((1, 2, 3, 4), 1.0), np.full((1, 2, 3, 4), 2.0)
    video = np.arange(20)[:, None, None, None] + np.zeros((20, 2, 3, 4))
    refs = {"i2v_loop": [head, tail], "i2v_tail": [tail]}.get(cond_type, [video if "v2v" in cond_type else head])
    mask, masked = inference_condition(shape, cond_type, [refs, None])
    frames = np.flatnonzero(mask[0, :, 0, 0, 0])
    expected = {"t2v": [], "i2v_head": [0], "i2v_tail": [19], "i2v_loop": [0, 19], "v2v_head": range(9),
                "v2v_tail": range(11, 20), "v2v_head_easy": range(17), "v2v_tail_easy": range(3, 20)}[cond_type]
    assert list(frames) == list(expected)
    assert not mask[1].any() and not masked[1].any()  # no references: no condition
    if cond_type == "i2v_loop":
        assert (masked[0, 0] == 1).all() and (masked[0, -1] == 2).all()
    if cond_type == "v2v_tail":
        assert masked[0, 11, 0, 0, 0] == 11 and masked[0, 19, 0, 0, 0] == 19
    image_mask, _ = inference_condition((2, 1, 2, 3, 4), cond_type, [refs, None])
    assert not image_mask.any()  # T = 1: no condition, as the reference
    with pytest.raises(UserError, match="cond type"):
        inference_condition(shape, "i2v_middle", [refs, None])


def test_paste_back_first_sample_only_unless_asked():
    x = np.zeros((2, 3, 2, 2, 4), np.float32)
    refs = [[np.ones((1, 2, 2, 4))], [np.full((1, 2, 2, 4), 5.0)]]
    out = paste_references(x, "i2v_head", refs)
    assert (out[0, 0] == 1).all() and not out[0, 1:].any() and not out[1].any()
    out = paste_references(x, "i2v_head", refs, all_samples=True)
    assert (out[1, 0] == 5).all()
    assert not paste_references(x, "v2v_head", refs).any()


def test_sharded_sampling_equals_unsharded():
    model = _model()
    cond = pack(jnp.asarray(np.random.default_rng(3).standard_normal((2, 2, 4, 6, 5)), jnp.float32), 2)
    expected = _run(model, cond)
    mesh = parallel.make_mesh("fsdp=2,tensor=2,sequence=2")
    parallel.shard_params(model, mesh)
    with parallel.sharding_context(mesh):
        out = _run(model, cond)
    err = float(jnp.max(jnp.abs(out - expected)))
    assert err <= 1e-5 * float(jnp.max(jnp.abs(expected))), err
