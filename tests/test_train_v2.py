"""Open-Sora 2.0 training: the recipe's pieces (timestep shift, text dropout, condition mix, caption suffix,
Flux initialisation), a tiny MMDiT trained end to end on the synthetic dataset (loss falls, an interrupted run
resumes to the same losses), and a sharded step equal to one device's."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.opensora_v2_0.train_stage1_i2v import get_config
from opensora_jax.conditioning.training_conditions import (check_weights, draw_types, needed_references,
                                                           training_condition, usable_types)
from opensora_jax.data.synthetic import make_dataset
from opensora_jax.errors import UserError
from opensora_jax.models import mmdit
from opensora_jax.parallel import make_mesh, shard_batch, shard_params, sharding_context
from opensora_jax.training import mmdit_loop
from opensora_jax.training.mmdit_step import StepConfig, drop_text, init_state, shifted_timesteps, train_step
from opensora_jax.training.optim import make_optimizer
from tests.tiny import MMDIT_CONFIG, write_tiny_v2_checkpoints

BUCKETS = {"64px": {17: (1.0, 2)}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_v2")
    ckpts = write_tiny_v2_checkpoints(root / "ckpt")
    csv = make_dataset(root / "data", num_clips=6, frames=20, size=(64, 64), seed=0)
    return root, ckpts, csv


def _config(setup, out_dir, steps, **extra):
    _, ckpts, csv = setup
    c = get_config()
    c.out_dir = str(out_dir)
    c.model_preset = ""
    c.model.update(MMDIT_CONFIG)
    c.model.cond_embed = True
    c.dtype = c.ae_dtype = c.text_dtype = "float32"
    c.remat_blocks = (1, 0)
    c.ae, c.t5, c.clip = str(ckpts["vae"]), str(ckpts["t5"]), str(ckpts["clip"])
    c.t5_max_length = 24
    c.data.csv, c.data.bucket_config, c.data.num_workers = str(csv), BUCKETS, 0
    c.optimizer.lr = 1e-3
    c.steps, c.ckpt_every, c.log_every = steps, 3, 1
    c.export = False
    for key, value in extra.items():
        c[key] = value
    return c


def _losses(out_dir):
    return {rec["step"]: rec for rec in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------------------------ recipe pieces


def test_shifted_timesteps_follow_the_shift():
    key = jax.random.key(0)
    plain = shifted_timesteps(key, 4096, 1.0)
    alpha = 3.0
    shifted = shifted_timesteps(key, 4096, alpha)
    np.testing.assert_allclose(shifted, alpha * plain / (1 + (alpha - 1) * plain), rtol=1e-6)
    assert float(shifted.mean()) > float(plain.mean()) + 0.1  # the shift moves t towards noise (t = 1)
    assert 0.45 < float(plain.mean()) < 0.55


def test_text_dropout_is_independent_and_uses_the_null_encodings():
    b = 20000
    txt, vec = jnp.ones((b, 3, 2)), jnp.ones((b, 5))
    null_txt, null_vec = jnp.zeros((1, 3, 2)), jnp.zeros((1, 5))
    t, v = drop_text(jax.random.key(1), txt, vec, null_txt, null_vec, 0.31622777, 0.31622777)
    dropped_t, dropped_v = np.asarray(t[:, 0, 0] == 0), np.asarray(v[:, 0] == 0)
    assert abs(dropped_t.mean() - 0.3162) < 0.015 and abs(dropped_v.mean() - 0.3162) < 0.015
    assert abs((dropped_t & dropped_v).mean() - 0.1) < 0.01  # independent: both ≈ p² = 0.1


def test_condition_mix_masks_and_references():
    mix = check_weights({"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1})
    assert needed_references([n for n, _ in mix]) == ("head", "tail")
    counts = np.bincount(np.asarray(draw_types(jax.random.key(0), 16000, mix)), minlength=4) / 16000
    np.testing.assert_allclose(counts, [1 / 8, 5 / 8, 1 / 8, 1 / 8], atol=0.015)
    b, t, h, w, c = 4, 5, 2, 2, 3
    refs = {"head": jnp.full((b, 1, h, w, c), 7.0), "tail": jnp.full((b, 1, h, w, c), -3.0)}
    mask, masked = training_condition((b, t, h, w, c), mix, jnp.arange(4), refs)
    frames = np.asarray(mask[:, :, 0, 0, 0])
    np.testing.assert_array_equal(frames, [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    assert float(masked[1, 0].mean()) == 7.0 and float(masked[2, -1].mean()) == -3.0
    assert float(jnp.abs(masked[0]).sum()) == 0 and float(jnp.abs(masked[1, 1:]).sum()) == 0
    # Images never get a condition; v2v types drop out for clips no longer than their reference.
    assert usable_types(mix, 1) == (("t2v", 1.0),)
    assert usable_types(check_weights({"t2v": 1, "v2v_head": 1}), 33) == (("t2v", 1.0),)
    with pytest.raises(UserError, match="i2v_hed"):
        check_weights({"i2v_hed": 1})


def test_caption_suffix_as_the_reference_writes_it():
    assert mmdit_loop.caption_suffix(24.0, 3.6) == " 24 FPS, 4 motion score."
    assert mmdit_loop.caption_suffix(24.0) == " 24 FPS."
    assert mmdit_loop.caption_suffix(float("nan"), float("nan")) == ""


def test_flux_initialisation_drops_guidance_and_zero_inits_cond():
    source_cfg = mmdit.MMDiTConfig(**{**MMDIT_CONFIG, "axes_dim": (4, 6, 6), "guidance_embed": True,
                                      "cond_embed": False})
    source = mmdit.MMDiT(source_cfg, rngs=nnx.Rngs(3))
    target = mmdit.MMDiT(dataclasses.replace(source_cfg, guidance_embed=False, cond_embed=True), rngs=nnx.Rngs(4))
    notes = mmdit_loop.init_from(target, source)
    assert any("cond_in" in n for n in notes) and any("guidance_in" in n for n in notes)
    np.testing.assert_array_equal(target.double_blocks.img_attn.q_proj.kernel[...],
                                  source.double_blocks.img_attn.q_proj.kernel[...])
    assert float(jnp.abs(target.cond_in.kernel[...]).sum()) == 0
    other = mmdit.MMDiT(dataclasses.replace(source_cfg, hidden_size=48, num_heads=3, axes_dim=(4, 6, 6)),
                        rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="shape"):
        mmdit_loop.init_from(other, source)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def features(setup):
    from opensora_jax.cli.features_v2_0 import encode_dataset

    root = setup[0]
    index, batches = encode_dataset(_config(setup, root / "unused", steps=1), root / "features")
    assert batches == 3  # 6 clips, batches of 2
    return root / "features"


def test_features_hold_what_training_encodes_on_the_fly(setup, features):
    from opensora_jax.data.features import load_shard, read_index

    config = _config(setup, setup[0] / "unused", steps=1)
    loader = mmdit_loop.make_loader(config)
    ae, text = mmdit_loop.load_frozen(config)
    encoder = mmdit_loop.BatchEncoder(ae, text, kind="hunyuan_vae", references=("head", "tail"), seed=config.seed)
    iterator = iter(loader)
    batch = next(iterator)
    iterator.close()
    expected = encoder(batch, 0)
    stored = load_shard(read_index(features)[0]["file"])
    assert set(stored) >= {"latent", "txt", "y_vec", "ref_head", "ref_tail"}
    np.testing.assert_allclose(stored["latent"], np.asarray(expected["x0"]), atol=1e-6)
    for key in ("txt", "y_vec", "ref_head", "ref_tail"):
        np.testing.assert_allclose(stored[key], np.asarray(expected[key]), atol=1e-6, err_msg=key)
    # Reference frames are encoded on their own: the head latent is not the clip latent's first frame.
    assert not np.allclose(stored["ref_tail"][:, 0], stored["latent"][:, -1], atol=1e-3)
    assert encoder.captions(batch)[0].endswith(" 24 FPS.")


def test_tiny_mmdit_learns_and_resumes_exactly(setup, features, tmp_path):
    config = _config(setup, tmp_path / "full", steps=30)
    config.ckpt_every = 30
    config.data.features = str(features)
    mmdit_loop.train(config)
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 31))
    assert all(r["shape"] == [2, 5, 8, 8, 4] for r in full.values())  # 17 × 64 × 64 px → 5 × 8 × 8 latents
    first = np.mean([full[s]["loss"] for s in range(1, 6)])
    last = np.mean([full[s]["loss"] for s in range(26, 31)])
    print(f"loss first 5 steps {first:.4f} → last 5 steps {last:.4f}")
    assert last < 0.7 * first

    # Interrupted after 4 updates (checkpoint at 3), then resumed: the same losses as the run that never stopped.
    part = _config(setup, tmp_path / "part", steps=8)
    part.data.features = str(features)
    mmdit_loop.train(part, stop_after=4)
    mmdit_loop.train(part)
    resumed = _losses(tmp_path / "part")
    assert sorted(resumed) == list(range(1, 9))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-7), step


@pytest.mark.slow  # encodes every batch on the fly (the features test checks that encoding against the shards)
def test_training_on_videos_runs_and_exports(setup, tmp_path):
    config = _config(setup, tmp_path / "videos", steps=2, export=True)
    summary = mmdit_loop.train(config)
    assert summary["step"] == 2 and (tmp_path / "videos" / "model" / "config.json").is_file()
    assert sorted(_losses(tmp_path / "videos")) == [1, 2]


def _random_batch(cfg, b=2, t=5, h=8, w=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    c = cfg.latent_channels
    return {"x0": rng.normal(size=(b, t, h, w, c)).astype(np.float32),
            "txt": rng.normal(size=(b, length, cfg.context_in_dim)).astype(np.float32),
            "y_vec": rng.normal(size=(b, cfg.vec_in_dim)).astype(np.float32),
            "null_txt": rng.normal(size=(1, length, cfg.context_in_dim)).astype(np.float32),
            "null_vec": rng.normal(size=(1, cfg.vec_in_dim)).astype(np.float32),
            "ref_head": rng.normal(size=(b, 1, h, w, c)).astype(np.float32),
            "ref_tail": rng.normal(size=(b, 1, h, w, c)).astype(np.float32)}


@pytest.mark.parametrize("mesh_spec", ["fsdp=2,sequence=4",
                                       pytest.param("data=2,fsdp=2,tensor=2", marks=pytest.mark.slow)])
def test_sharded_train_step_equals_one_device(mesh_spec):
    cfg = mmdit.MMDiTConfig(**{**MMDIT_CONFIG, "axes_dim": (4, 6, 6), "num_heads": 2}, remat="everything",
                            remat_blocks=(1, 0))
    step_cfg = StepConfig(cond_weights=check_weights({"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1}))
    tx = make_optimizer(lr=1e-3)
    batch = _random_batch(cfg)

    def run(mesh):
        model = mmdit.MMDiT(cfg, rngs=nnx.Rngs(0))
        if mesh is not None:
            shard_params(model, mesh)
        graphdef, state = init_state(model, tx, nnx.Param, seed=0)
        losses = []
        for _ in range(2):
            if mesh is None:
                state, metrics = train_step(graphdef, tx, step_cfg, state, jax.tree.map(jnp.asarray, batch))
            else:
                with sharding_context(mesh):
                    state, metrics = train_step(graphdef, tx, step_cfg, state, shard_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    single_losses, single_params = run(None)
    sharded_losses, sharded_params = run(make_mesh(mesh_spec))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(sharded_params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # three compiles of the forward and backward pass
def test_remat_block_counts_do_not_change_the_gradients():
    base = mmdit.MMDiTConfig(**{**MMDIT_CONFIG, "axes_dim": (4, 6, 6), "depth": 2, "depth_single_blocks": 2})
    batch = jax.tree.map(jnp.asarray, _random_batch(base))
    grads = []
    for remat, blocks in (("nothing", None), ("everything", (1, 1)), ("dots", (2, 0))):
        model = mmdit.MMDiT(dataclasses.replace(base, remat=remat, remat_blocks=blocks), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            from opensora_jax.training.mmdit_step import flow_loss

            return flow_loss(nnx.merge(graphdef, p, rest), batch, jax.random.key(0), StepConfig())[0]

        grads.append(jax.grad(loss)(params))
    for other in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_lora_run_trains_only_the_adapters(setup, features, tmp_path):
    from opensora_jax.lora_files import load_adapters
    from opensora_jax.models.lora import merge_lora

    config = _config(setup, tmp_path / "lora", steps=3, export=True)
    config.data.features = str(features)
    config.lora.rank, config.lora.alpha = 4, 8.0
    summary = mmdit_loop.train(config)
    state, graphdef = summary["state"], summary["graphdef"]
    base = mmdit.MMDiT(mmdit_loop.model_config(config), rngs=nnx.Rngs(config.seed))
    trained = nnx.merge(graphdef, state.params, state.rest)
    before = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    after = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    adapters = [k for k in after if k not in before]
    assert adapters and all(isinstance(after[k], nnx.LoRAParam) for k in adapters)
    for key, value in before.items():  # every base weight bit-identical
        np.testing.assert_array_equal(np.asarray(after[key].get_value()), np.asarray(value.get_value()))
    assert any(float(jnp.abs(after[k].get_value()).max()) > 0 for k in adapters if k[-1] == "b")  # B moved off 0
    # The exported adapters, loaded onto a fresh base and merged, give the adapter-applied model's output.
    loaded = mmdit.MMDiT(mmdit_loop.model_config(config), rngs=nnx.Rngs(config.seed))
    load_adapters(summary["exported"], loaded)
    batch = jax.tree.map(jnp.asarray, _random_batch(loaded.cfg))
    from opensora_jax.training.mmdit_step import flow_loss

    applied = flow_loss(loaded, batch, jax.random.key(1), StepConfig())[0]
    merged = flow_loss(merge_lora(loaded), batch, jax.random.key(1), StepConfig())[0]
    np.testing.assert_allclose(float(merged), float(applied), rtol=1e-5)


def test_fps_max_subsamples_fast_videos_as_the_reference():
    from opensora_jax.data.buckets import Buckets
    from opensora_jax.presets_v2_0 import TrainingResolutions

    buckets = Buckets({"256px": {33: (1.0, 2), 65: (1.0, 1)}}, resolutions=TrainingResolutions(), fps_max=24)
    assert [buckets.interval(f) for f in (None, 24, 25, 30, 60, 120)] == [1, 1, 2, 2, 3, 5]
    # At 24 fps a 100-frame clip fills the 65-frame bucket; at 60 fps it is read every 3rd frame, so it needs
    # more than 33 × 3 = 99 frames for the 33-frame bucket and cannot fill 65.
    assert buckets.assign_bucket(100, 256, 256, 0, fps=24).num_frames == 65
    assert buckets.assign_bucket(100, 256, 256, 0, fps=60).num_frames == 33
    assert buckets.assign_bucket(99, 256, 256, 0, fps=60) is None


def test_pixel_frames_inverts_the_latent_frame_count():
    from opensora_jax.presets_v2_0 import latent_frames

    for t in (1, 5, 17, 33, 129):
        assert mmdit_loop.pixel_frames(latent_frames(t)) == t
    assert mmdit_loop.pixel_frames(8, causal=False) == 32 == 4 * latent_frames(32, causal=False)
