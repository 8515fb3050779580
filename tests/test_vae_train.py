"""VAE training (spec §12): each loss term against a hand computation, stage trainable sets, LPIPS loading
and its missing-weights error, the discriminator step, the loss falling, and exact resume + export."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.demo.vae_tiny import get_config
from opensora_jax.data.synthetic import make_dataset, render_clip
from opensora_jax.errors import UserError
from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAEConfig
from opensora_jax.training import vae_losses as vl
from opensora_jax.training import vae_train as vt

# 2D VAE /2 without mid attention, temporal VAE /4 in time: the smallest model with the v1.2 structure.
TEST_VAE = {
    "micro_frame_size": 17,
    "micro_batch_size": 4,
    "vae_2d": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
               "mid_block_add_attention": False},
    "vae_temporal": {"filters": 8, "num_res_blocks": 1, "channel_multipliers": [1, 1, 1],
                     "temporal_downsample": [True, True], "num_groups": 4},
}
FRAMES, SIZE = 5, 16


def _config(**overrides) -> ml_collections.ConfigDict:
    """The demo config on TEST_VAE with a small discriminator from step 1 on. The step tests share it (and
    the clip shape), so the step compiles once for all of them."""
    c = get_config()
    c.model = ml_collections.ConfigDict(TEST_VAE)
    c.stage = 3  # every term and every parameter in play
    c.loss.update(dict(use_real_rec_loss=True, use_z_rec_loss=True, use_image_identity_loss=True))
    c.discriminator.update(dict(enabled=True, ndf=8, n_layers=2, start=1))
    c.data.num_frames, c.data.image_size, c.data.batch_size = FRAMES, (SIZE, SIZE), 2
    c.optimizer.lr = 3e-3
    c.async_checkpoint = False
    c.export = False
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _clips(n: int, seed: int = 0) -> np.ndarray:
    """(n, FRAMES, SIZE, SIZE, 3) synthetic shape clips in [-1, 1]."""
    clips = [render_clip("circle" if k % 2 else "square", "red" if k % 3 else "cyan",
                         ("left", "right", "up", "down")[k % 4], FRAMES, SIZE, SIZE, np.random.default_rng([seed, k]))
             for k in range(n)]
    return np.stack(clips).astype(np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------- loss terms


def test_nll_is_a_sum_divided_by_frames():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 2, 2, 3)), rng.normal(size=(2, 3, 2, 2, 3))
    n = 2 * 3  # B·T frames
    assert np.isclose(vl.nll_loss(jnp.asarray(a), jnp.asarray(b)), np.abs(a - b).sum() / n, rtol=1e-6)
    # logvar: r / e^lv + lv per element
    lv = 0.5
    want = (np.abs(a - b) / np.exp(lv) + lv).sum() / n
    assert np.isclose(vl.nll_loss(jnp.asarray(a), jnp.asarray(b), logvar=lv), want, rtol=1e-6)
    # per-frame perceptual values broadcast over each frame's H·W·C = 12 elements, weight 0.1
    p = rng.uniform(size=n)
    want = (np.abs(a - b).sum() + 0.1 * 12 * p.sum()) / n
    got = vl.nll_loss(jnp.asarray(a), jnp.asarray(b), perceptual=jnp.asarray(p), perceptual_weight=0.1)
    assert np.isclose(got, want, rtol=1e-6)


def test_kl_sums_everything_and_divides_by_batch():
    rng = np.random.default_rng(1)
    mean, logvar = rng.normal(size=(3, 2, 2, 2, 4)), rng.normal(size=(3, 2, 2, 2, 4))
    want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar) / 3
    assert np.isclose(vl.kl_loss(jnp.asarray(mean), jnp.asarray(logvar)), want, rtol=1e-6)


def _fake_out(t: int, rng) -> dict:
    t_lat = -(-t // 4)
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {"x_z": arr(2, t, 2, 2, 4), "x_z_rec": arr(2, t, 2, 2, 4), "z": arr(2, t_lat, 2, 2, 4),
            "mean": arr(2, t_lat, 2, 2, 4), "logvar": arr(2, t_lat, 2, 2, 4), "x_rec": arr(2, t, 16, 16, 3)}


def test_terms_and_stage_flags():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 1, 16, 16, 3)), jnp.float32)
    out = _fake_out(1, rng)
    stage1 = vl.VAELossConfig(use_real_rec_loss=False, use_z_rec_loss=True, use_image_identity_loss=True)
    terms = vl.vae_loss_terms(x, out, stage1)
    xz, z = np.asarray(out["x_z"]), np.asarray(out["z"])
    assert np.isclose(terms["identity"], np.abs(xz - z).sum() / 2, rtol=1e-6)  # [4, 1, h, w] summed, / B
    assert np.isclose(terms["z_nll"], np.abs(xz - np.asarray(out["x_z_rec"])).sum() / 2, rtol=1e-6)
    assert np.isclose(terms["nll"], np.abs(np.asarray(x) - np.asarray(out["x_rec"])).sum() / 2, rtol=1e-6)
    kl = 0.5 * np.sum(np.asarray(out["mean"]) ** 2 + np.exp(out["logvar"]) - 1 - np.asarray(out["logvar"])) / 2
    assert np.isclose(terms["kl"], 1e-6 * kl, rtol=1e-5)
    assert vl.term_weights(terms, stage1) == {"nll": 0.0, "kl": 0.0, "z_nll": 1.0, "identity": 1.0}
    # videos (T > 1) have no identity term; stage 3 trains pixel NLL + KL only
    video_terms = vl.vae_loss_terms(jnp.zeros((2, 5, 16, 16, 3)), _fake_out(5, rng), stage1)
    assert "identity" not in video_terms
    stage3 = vl.VAELossConfig(use_real_rec_loss=True, use_z_rec_loss=False)
    assert vl.term_weights(video_terms, stage3) == {"nll": 1.0, "kl": 1.0, "z_nll": 0.0}


def test_adversarial_formulas():
    real, fake = jnp.asarray([2.0, -0.5, 0.3]), jnp.asarray([-2.0, 0.5, 1.5])
    assert np.isclose(vl.generator_loss(fake, "hinge"), -np.mean(fake))
    assert np.isclose(vl.generator_loss(fake, "non-saturating"), np.mean(np.log1p(np.exp(-np.asarray(fake)))))
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    assert np.isclose(vl.discriminator_loss(real, fake, "hinge"), hinge)
    ns = 0.5 * (np.mean(np.log1p(np.exp(-np.asarray(real)))) + np.mean(np.log1p(np.exp(np.asarray(fake)))))
    assert np.isclose(vl.discriminator_loss(real, fake, "non-saturating"), ns)
    assert np.isclose(vl.discriminator_loss(real, fake, "vanilla"), ns)  # identical in the reference
    with pytest.raises(ValueError, match="vanilla"):
        vl.generator_loss(fake, "vanilla")
    assert float(vl.gan_gate(4, 1.0, 5)) == 0.0 and float(vl.gan_gate(5, 1.0, 5)) == 1.0
    assert float(vl.gan_gate(0, 0.7, -1)) == pytest.approx(0.7)
    g_nll, g_g = jnp.asarray([3.0, 4.0]), jnp.asarray([0.0, 1.0])
    assert float(vl.adaptive_weight(g_nll, g_g, 0.5)) == pytest.approx(0.5 * 5.0 / (1.0 + 1e-4))
    assert float(vl.adaptive_weight(g_nll, jnp.zeros(2), 0.5)) == pytest.approx(0.5 * 1e4)  # clipped


# --------------------------------------------------------------------------------------------- LPIPS


def test_lpips_enabled_without_weights_names_the_missing_file(tmp_path):
    c = _config(lpips__enabled=True, lpips__weights="")
    with pytest.raises(FileNotFoundError, match="lpips.weights"):
        vt.build_lpips(c)
    missing = tmp_path / "nowhere" / "vgg_lpips.npz"
    c.lpips.weights = str(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        vt.build_lpips(c)
    c.lpips.enabled = False
    assert vt.build_lpips(c) is None


def test_lpips_loads_reference_layouts(tmp_path):
    lp = vl.random_lpips(jax.random.key(0))
    # taming names for the VGG part in one file, torchvision names + lin layers in another
    vgg = {}
    for j, i in enumerate(vl.VGG16_CONV_INDICES):
        vgg[f"features.{i}.weight"] = np.asarray(lp.conv_kernels[j]).transpose(3, 2, 0, 1)
        vgg[f"features.{i}.bias"] = np.asarray(lp.conv_biases[j]) + 0.01 * j
    lins = {f"lin{k}.model.1.weight": np.asarray(w).reshape(1, -1, 1, 1) for k, w in enumerate(lp.lin_weights)}
    np.savez(tmp_path / "vgg16.npz", **vgg)
    np.savez(tmp_path / "lins.npz", **lins)
    loaded = vl.load_lpips(f"{tmp_path / 'vgg16.npz'},{tmp_path / 'lins.npz'}")
    for j in range(len(vl.VGG16_CONV_INDICES)):
        np.testing.assert_array_equal(loaded.conv_kernels[j], lp.conv_kernels[j])
        np.testing.assert_allclose(loaded.conv_biases[j], np.asarray(lp.conv_biases[j]) + 0.01 * j)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    b = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    d = jax.jit(lambda p, x, y: p(jnp.concatenate([x, x]), jnp.concatenate([y, x])))(loaded, a, b)
    assert d.shape == (4,) and bool(jnp.all(d[:2] > 0))
    np.testing.assert_allclose(d[2:], 0.0, atol=1e-7)  # LPIPS(x, x) = 0
    with pytest.raises(KeyError, match="lin0.model.1.weight"):
        vl.load_lpips(tmp_path / "vgg16.npz")


# --------------------------------------------------------------------------------------------- stages & mixing


def _top(params) -> set[str]:
    return {"/".join(str(p) for p in path[:2]) for path, _ in nnx.to_flat_state(params)}


def test_stage_trainable_sets():
    vae = vt.build_vae(_config())
    spatial_parts = {"spatial/encoder", "spatial/decoder", "spatial/quant_conv", "spatial/post_quant_conv"}
    temporal_parts = {"temporal/encoder", "temporal/decoder", "temporal/quant_conv", "temporal/post_quant_conv"}
    expected = {0: spatial_parts, 1: temporal_parts, 2: temporal_parts | {"spatial/encoder", "spatial/quant_conv"},
                3: temporal_parts | spatial_parts}
    for stage, parts in expected.items():
        _, params, rest = nnx.split(vae, vt.stage_trainable_filter(stage), ...)
        assert _top(params) == parts, stage
        assert {"scale", "shift"} <= _top(rest)  # buffers never train
    with pytest.raises(ValueError, match="stage"):
        vt.stage_trainable_filter(4)


def test_mixing_is_a_function_of_seed_and_step():
    image = [vt.mixed_num_frames("mixed_video_image", 17, seed=42, step=s, image_ratio=0.2) for s in range(500)]
    assert set(image) == {1, 17} and 0.12 < image.count(1) / 500 < 0.28
    assert image == [vt.mixed_num_frames("mixed_video_image", 17, seed=42, step=s, image_ratio=0.2) for s in range(500)]
    rand = [vt.mixed_num_frames("mixed_video_random", 33, seed=42, step=s) for s in range(2000)]
    assert min(rand) == 1 and max(rand) == 33
    assert vt.mixed_num_frames("none", 17, seed=0, step=3) == 17
    with pytest.raises(ValueError, match="mixed_strategy"):
        vt.mixed_num_frames("images_only", 17, seed=0, step=0)
    with pytest.raises(ValueError, match="mixed_strategy"):  # checked before any model is built
        vt.train_vae(_config(mixed_strategy="images_only"))
    with pytest.raises(ValueError, match="generator_loss_type"):
        vt.validate_config(_config(discriminator__generator_loss_type="vanilla"))


def test_forward_shapes_and_padding():
    vae = vt.build_vae(_config())
    graphdef, state = nnx.split(vae)
    x = jax.ShapeDtypeStruct((2, FRAMES, SIZE, SIZE, 3), jnp.float32)

    def shapes(key, decode_pixels=True):
        run = lambda st, v: vl.vae_forward(nnx.merge(graphdef, st), v, key, decode_pixels=decode_pixels)  # noqa: E731
        return {k: v.shape for k, v in jax.eval_shape(run, state, x).items()}

    out = shapes(jax.random.key(0))
    assert out["x_z"] == out["x_z_rec"] == (2, FRAMES, 8, 8, 4)
    assert out["z"] == out["mean"] == out["logvar"] == (2, 2, 8, 8, 4)  # 5 frames + 3 front pad → 2 latents
    assert out["x_rec"] == (2, FRAMES, SIZE, SIZE, 3)
    assert "x_rec" not in shapes(None, decode_pixels=False)


# --------------------------------------------------------------------------------------------- steps


def _setup(config):
    vae = vt.build_vae(config)
    disc = vt.build_discriminator(config)
    tx = vt.optimizer_from_config(config)
    graphdef, disc_graphdef, state = vt.init_vae_state(vae, tx, vt.stage_trainable_filter(config.stage),
                                                       config.seed, disc, tx if disc is not None else None)
    return graphdef, disc_graphdef, tx, state


@pytest.mark.slow  # default run kept near 15 minutes; run with -m slow
def test_loss_falls_on_synthetic_clips():
    config = _config()
    graphdef, disc_graphdef, tx, state = _setup(config)
    cfg = vt.step_config(config)
    clips = _clips(8)
    rec = []
    for step in range(20):
        batch = jnp.asarray(clips[(2 * step) % 8:(2 * step) % 8 + 2])
        state, metrics = vt.vae_train_step(graphdef, disc_graphdef, tx, tx, cfg, state, batch, None)
        rec.append(float(metrics["nll"]) + float(metrics["z_nll"]))
    first, last = np.mean(rec[:4]), np.mean(rec[-4:])
    print(f"tiny VAE reconstruction loss (pixel + z NLL): first 4 steps {first:.1f} → last 4 steps {last:.1f}")
    assert np.all(np.isfinite(rec)) and last < 0.7 * first


def test_discriminator_step_and_adaptive_weight():
    config = _config()
    graphdef, disc_graphdef, tx, state = _setup(config)
    cfg = vt.step_config(config)
    assert cfg.use_discriminator and cfg.discriminator_start == 1
    clips = jnp.asarray(_clips(2))
    d0 = jax.tree.map(np.asarray, state.disc_params)
    state, m0 = vt.vae_train_step(graphdef, disc_graphdef, tx, tx, cfg, state, clips, None)
    # step 0 < start: gated off, so D does not move and g has no weight; λ is computed all the same
    assert float(m0["gan_gate"]) == 0.0 and float(m0["disc_loss"]) == 0.0
    assert float(m0["loss"]) == pytest.approx(float(m0["nll"] + m0["kl"] + m0["z_nll"]), rel=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.disc_params), d0)
    state, m1 = vt.vae_train_step(graphdef, disc_graphdef, tx, tx, cfg, state, clips, None)
    assert float(m1["gan_gate"]) == 1.0
    for name in ("adaptive_weight", "g", "disc_loss", "loss", "nll"):
        assert np.isfinite(float(m1[name])), name
    assert 0 < float(m1["adaptive_weight"]) <= 0.5 * 1e4 and float(m1["disc_loss"]) > 0
    adv = float(m1["adaptive_weight"]) * float(m1["g"])
    assert float(m1["loss"]) == pytest.approx(float(m1["nll"] + m1["kl"] + m1["z_nll"]) + adv, rel=1e-5)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.disc_params, d0)
    assert any(jax.tree.leaves(moved))
    # BatchNorm running stats: 3 forwards per step (D(x̂) in the G step, D(x), D(x̂) in the D step)
    counts = [np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.disc_rest)
              if p[-1] == "num_batches_tracked"]
    assert counts and all(int(c) == 6 for c in counts)


# --------------------------------------------------------------------------------------------- run, resume, export


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_data")
    return make_dataset(root / "data", num_clips=4, frames=8, size=(SIZE, SIZE), seed=0)


def _run_config(dataset, out_dir, steps):
    c = _config(mixed_strategy="none")  # same step shapes as test_loss_falls: its compiled step is reused
    c.data.csv = str(dataset)
    c.out_dir = str(out_dir)
    c.steps, c.ckpt_every, c.log_every = steps, 100, 1  # saves only when a run ends (forced)
    return c


def _losses(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_reproduces_uninterrupted_run_and_export_loads(dataset, tmp_path):
    reference = _run_config(dataset, tmp_path / "reference", steps=4)
    reference.export = True
    reference.eval.csv = str(dataset)
    reference.eval.num_batches = 1
    summary = vt.train_vae(reference)
    expected = _losses(tmp_path / "reference")
    assert sorted(expected) == [1, 2, 3, 4]
    assert np.isfinite(summary["eval_l1"])

    interrupted = _run_config(dataset, tmp_path / "resumed", steps=4)
    vt.train_vae(interrupted, stop_after=2)
    vt.train_vae(interrupted)  # resumes from the step-2 checkpoint
    got = _losses(tmp_path / "resumed")
    for step in (1, 2, 3, 4):
        for key in ("loss", "z_nll", "nll", "kl", "g", "adaptive_weight", "disc_loss", "frames"):
            assert got[step][key] == expected[step][key], (step, key)

    from convert.registry import load_model

    model, cfg = load_model("vae", summary["exported"])
    assert OpenSoraVAEConfig.from_dict(cfg) == OpenSoraVAEConfig.from_dict(TEST_VAE)
    kernel = model.temporal.decoder.conv_out.conv.kernel.get_value()
    assert kernel.shape == (3, 3, 3, 8, 4)
    fresh = vt.build_vae(reference).temporal.decoder.conv_out.conv.kernel.get_value()
    assert not np.allclose(kernel, fresh)  # trained weights, not the init


def test_spatial_weights_from_a_diffusers_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    from convert import vae_v1_2

    source_vae = vt.build_vae(_config(seed=7))
    values = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(source_vae))}
    tensors = {}
    for rule in vae_v1_2.table(source_vae.config).rules:
        if not rule.target.startswith("spatial/"):
            continue
        v = values[rule.target]
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
        tensors[rule.source.removeprefix("spatial_vae.module.")] = np.ascontiguousarray(v)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    c = _config(vae_2d_pretrained=str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="load_spatial_weights"):  # the library core does not read them itself
        vt.build_vae(c)
    vae = vt.build_vae(c, load_spatial=vae_v1_2.load_spatial_weights)  # as train_vae.py passes it
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae))}
    for k, v in values.items():
        if k.startswith("spatial/"):
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    last = "temporal/decoder/conv_out/conv/kernel"
    assert not np.allclose(got[last], values[last])  # the temporal VAE stays random


def test_stage0_trains_the_2d_vae_alone_as_an_image_autoencoder():
    """Stage 0 (ours): frames through the 2D VAE only; the temporal VAE does not move, the 2D
    reconstruction improves, and the KL term is the 2D posterior's, per image."""
    config = _config(stage=0, mixed_strategy="none")
    config.discriminator.enabled = False
    config.loss.update(dict(use_real_rec_loss=True, use_z_rec_loss=False, use_image_identity_loss=False))
    vae = vt.build_vae(config)
    tx = vt.optimizer_from_config(config)
    graphdef, _, state = vt.init_vae_state(vae, tx, vt.stage_trainable_filter(0), 0, last=vt.last_layer(0))
    temporal_before = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, state.params, state.rest).temporal))
    cfg = vt.step_config(config)
    assert cfg.spatial_only
    clips = jnp.asarray(_clips(4))
    out = vl.spatial_forward(nnx.merge(graphdef, state.params, state.rest), clips, None)
    assert out["x_rec"].shape == clips.shape and out["mean"].shape == (4 * FRAMES, 8, 8, 4)
    before = vt.reconstruction_l1(graphdef, state, clips, spatial_only=True)
    for _ in range(15):
        state, metrics = vt.vae_train_step(graphdef, None, tx, None, cfg, state, clips, None)
    assert set(metrics) >= {"nll", "kl"} and "z_nll" not in metrics and "identity" not in metrics
    after = vt.reconstruction_l1(graphdef, state, clips, spatial_only=True)
    print(f"stage 0: 2D reconstruction L1 {before:.4f} → {after:.4f} in 15 steps")
    assert after < 0.8 * before
    temporal_after = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, state.params, state.rest).temporal))
    jax.tree.map(np.testing.assert_array_equal, temporal_after, temporal_before)
    with pytest.raises(ValueError, match="conv_out"):
        vt.init_vae_state(vt.build_vae(config), tx, vt.stage_trainable_filter(0), 0)  # temporal last layer frozen
