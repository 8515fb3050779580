"""RFlow sampler: reference parity, the timestep schedule and its step-0 rounding quirk."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax.models.stdit3 import STDiT3, STDiT3Config
from opensora_jax.tools.parity.core import run_case
from opensora_jax.schedulers import rflow
from opensora_jax.schedulers.rflow import RFlowSampler, timestep_transform


def test_fixture_parity(fixtures_dir):
    cases = [p.parent for p in sorted(fixtures_dir.glob("*/*/case.json"))
             if json.loads(p.read_text())["component"].startswith("RFLOW.sample")]
    assert cases
    for case in cases:
        result = run_case(case)
        assert result.passed, result.line()


def test_default_schedule_matches_the_spec_table():
    """240×426, 51 frames with the ratio rounded in bfloat16 (as the reference's bf16 args do): spec §1.3."""
    sampler = RFlowSampler(num_sampling_steps=30)
    args = [jnp.array([v], jnp.bfloat16) for v in (240.0, 426.0, 51.0)]
    t = np.asarray(sampler.timesteps(*args, batch=1))[:, 0]
    expected_head = [1000.000, 985.962, 971.352, 956.134, 940.271]
    np.testing.assert_allclose(t[:5], expected_head, atol=2e-3)
    np.testing.assert_allclose(t[-1], 77.076, atol=2e-3)


def _torch_shift(h, w, f, dtype):
    """The spec's §1.3 formula written with torch ops, to check bit-level agreement of the rounding."""
    import torch

    t = torch.tensor([1000.0]) / 1000
    h, w, f = (torch.tensor([v], dtype=dtype) for v in (h, w, f))
    frames = torch.ones_like(f) if f[0] == 1 else f // 17 * 5
    ratio = (h * w / 262144).sqrt() * (frames / 1).sqrt() * 1.0
    return (ratio * t / (1 + (ratio - 1) * t) * 1000).item()


@pytest.mark.parametrize("h,w", [(240, 426), (720, 1280), (480, 854), (64, 64), (32, 48), (1080, 1920)])
@pytest.mark.parametrize("frames", [1, 17, 51, 102])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_timestep_rounds_bit_for_bit_like_torch(h, w, frames, dtype):
    import torch

    ours = timestep_transform(jnp.array([[1000.0]]), *(jnp.array([v], dtype) for v in (h, w, frames)))
    assert float(ours[0, 0]) == _torch_shift(h, w, frames, getattr(torch, dtype))


def test_step0_quirk_and_its_switch():
    h, w, f = (jnp.array([v], jnp.float32) for v in (64.0, 64.0, 17.0))
    t0 = float(timestep_transform(jnp.array([[1000.0]]), h, w, f)[0, 0])
    assert t0 > 1000.0  # float32 rounding of the shift with ratio ≈ 0.28
    clipped = RFlowSampler(step0_rounding_quirk=False).timesteps(h, w, f, batch=1)
    assert float(clipped.max()) == 1000.0


def _tiny_model():
    cfg = STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=8, model_max_length=6)
    return STDiT3(cfg, rngs=nnx.Rngs(0))


def _args(b):
    return dict(height=jnp.full((b,), 64.0), width=jnp.full((b,), 96.0), num_frames=jnp.full((b,), 17.0), fps=jnp.full((b,), 24.0))


def test_sampling_is_traced_once_per_shape():
    model = _tiny_model()
    sampler = RFlowSampler(num_sampling_steps=3)
    z = jax.random.normal(jax.random.key(0), (2, 2, 8, 12, 4))
    y = jax.random.normal(jax.random.key(1), (2, 6, 8))
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    before = rflow._denoise._cache_size()
    a = sampler.sample(model, z, y, mask, **_args(2))
    b = sampler.sample(model, z + 1, y, mask, cfg_scale=3.0, **_args(2))
    assert rflow._denoise._cache_size() == before + 1
    assert a.shape == z.shape and not np.allclose(a, b)


def test_conditioned_frames_stay_fixed_and_need_a_key():
    model = _tiny_model()
    sampler = RFlowSampler(num_sampling_steps=4)
    z = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 4))
    y = jax.random.normal(jax.random.key(1), (1, 6, 8))
    cond = jnp.array([[0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="key"):
        sampler.sample(model, z, y, None, cond_mask=cond, **_args(1))
    out = sampler.sample(model, z, y, None, cond_mask=cond, key=jax.random.key(2), **_args(1))
    np.testing.assert_array_equal(out[:, 0], z[:, 0])
    assert not np.allclose(out[:, 1:], z[:, 1:])


def _edit_args():
    """A half-strength edit of every frame: conditioned frames are re-noised once t falls below 500."""
    z = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 4))
    y = jax.random.normal(jax.random.key(1), (1, 6, 8))
    return z, y, jnp.array([[0.0, 0.5, 1.0]])


def test_renoising_draws_come_from_the_key_step_by_step():
    """Same key → same result, another key → another; the draws are fold_in(key, step), so replaying them
    through `noise=` (the fixtures' recorded per-step noise) gives the same result."""
    model, sampler = _tiny_model(), RFlowSampler(num_sampling_steps=4)
    z, y, cond = _edit_args()
    run = lambda **kw: np.asarray(sampler.sample(model, z, y, None, cond_mask=cond, **_args(1), **kw))  # noqa: E731
    key = jax.random.key(7)
    a, b, other = run(key=key), run(key=key), run(key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[:, 1], other[:, 1])
    recorded = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), z.shape) for i in range(4)])
    np.testing.assert_allclose(run(noise=recorded), a, rtol=1e-6, atol=1e-6)


def _sampling_temporaries(steps: int, latent=(1, 4, 32, 32, 4)) -> int:
    """Temporary bytes of one compiled sampling call with a cond_mask (so re-noising draws are needed)."""
    model, sampler = _tiny_model(), RFlowSampler(num_sampling_steps=steps)
    graphdef, state = nnx.split(model)

    def run(state, z, y, cond):
        return sampler.sample(nnx.merge(graphdef, state), z, y, None, cond_mask=cond, key=jax.random.key(0),
                              **_args(1))

    shapes = (jax.ShapeDtypeStruct(latent, jnp.float32), jax.ShapeDtypeStruct((1, 6, 8), jnp.float32),
              jax.ShapeDtypeStruct(latent[:2], jnp.float32))
    return jax.jit(run).lower(state, *shapes).compile().memory_analysis().temp_size_in_bytes


def test_sampling_memory_does_not_grow_with_steps():
    one_draw = 4 * 32 * 32 * 4 * 4  # bytes of one step's noise
    assert _sampling_temporaries(64) - _sampling_temporaries(2) < 8 * one_draw
