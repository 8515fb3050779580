"""LoRA: adapters at init change nothing, merged = adapter-applied, training moves only the adapters, adapter files
round-trip and fail clearly, sharded = unsharded, and `sample.py --lora` samples with the merged adapter."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opensora_jax import parallel, video_io
from opensora_jax.config_utils import run_cli
from opensora_jax.errors import UserError
from opensora_jax.lora_files import META_FILE, TENSORS_FILE, load_adapters, read_adapter_meta, save_adapters
from opensora_jax.models import lora
from opensora_jax.models.lora import LoRAConfig, apply_lora, lora_filter, merge_lora
from opensora_jax.models.mmdit import MMDiT, MMDiTConfig, image_position_ids, pack, text_position_ids
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config

# Two blocks in each stack (the scan slices stacked adapters); xla attention compiles fastest.
MMDIT = dict(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=64, num_heads=2, depth=2,
             depth_single_blocks=2, axes_dim=(8, 12, 12), patch_size=2, attention="xla")
STDIT3 = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16, attention="xla")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"


@functools.lru_cache(maxsize=None)
def _abstract(kind: str, overrides: tuple):
    """The (graphdef, abstract state) of a tiny model: traced once per configuration."""
    model_cls, config_cls, base = (MMDiT, MMDiTConfig, MMDIT) if kind == "mmdit" else (STDiT3, STDiT3Config, STDIT3)
    cfg = config_cls(**{**base, **dict(overrides)})
    return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))


def _model(kind: str, seed: int = 0, **overrides):
    """A tiny model with every variable random (no zero-initialised kernel hides a wrong path), held on the host
    (so that `shard_params` places it without a resharding program per shape)."""
    graphdef, abstract = _abstract(kind, tuple(sorted(overrides.items())))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
    return nnx.merge(graphdef, state)


def _inputs(model, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    if isinstance(model, MMDiT):
        b, size, n_txt = 2, (2, 4, 6), 5
        z = jnp.asarray(rng.standard_normal((b, *size, cfg.latent_channels)), jnp.float32)
        cond = jnp.asarray(rng.standard_normal((b, *size, cfg.latent_channels + 1)), jnp.float32)
        return dict(img=pack(z, cfg.patch_size), img_ids=image_position_ids(b, size, cfg.patch_size),
                    txt=jnp.asarray(rng.standard_normal((b, n_txt, cfg.context_in_dim)), jnp.float32),
                    txt_ids=text_position_ids(b, n_txt), timesteps=jnp.asarray([0.3, 0.8], jnp.float32),
                    y_vec=jnp.asarray(rng.standard_normal((b, cfg.vec_in_dim)), jnp.float32),
                    cond=pack(cond, cfg.patch_size))
    b, t, h, w = 2, 2, 4, 6
    mask = (np.arange(cfg.model_max_length)[None] < np.array([[5], [9]])).astype(np.int32)
    return dict(x=jnp.asarray(rng.standard_normal((b, t, h, w, cfg.in_channels)), jnp.float32),
                timestep=jnp.asarray([900.0, 120.0]), mask=jnp.asarray(mask),
                y=jnp.asarray(rng.standard_normal((b, cfg.model_max_length, cfg.caption_channels)), jnp.float32),
                fps=jnp.full((b,), 24.0), height=jnp.full((b,), h * 8.0), width=jnp.full((b,), w * 8.0))


_COMPILED: dict = {}


def _forward(model, inputs):
    """model(**inputs), compiled once per graph (a merged model has its base's graph again: no recompilation)."""
    graphdef, state = nnx.split(model)
    if graphdef not in _COMPILED:
        _COMPILED[graphdef] = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs),
                                      compiler_options=FAST_COMPILE)
    return _COMPILED[graphdef](state, inputs)


def _randomize_adapters(model, seed: int = 7, std: float = 0.3):
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, lora_filter)):
        var.set_value(jnp.asarray(std * rng.standard_normal(var.get_value().shape), var.get_value().dtype))


def _max_err(actual, expected) -> tuple[float, float]:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected))), float(np.max(np.abs(expected)))


def _base_arrays(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.array(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(lora_filter)))}


# -------------------------------------------------------------------------------------------------- the forward


# The attention q, k, v and output projections of every block: the default targets.
DEFAULT_ADAPTERS = {
    "mmdit": {*(f"double_blocks/{s}_attn/{p}" for s in ("img", "txt")
                for p in ("q_proj/kernel_lora", "k_proj/kernel_lora", "v_proj/kernel_lora", "proj_kernel_lora")),
              "single_blocks/q_proj/kernel_lora", "single_blocks/k_proj/kernel_lora",
              "single_blocks/v_proj/kernel_lora", "single_blocks/attn_out_kernel_lora"},
    "stdit3": {f"blocks/{s}/{p}_kernel_lora" for s in ("spatial", "temporal")
               for p in ("attn/qkv", "attn/proj", "cross_attn/q", "cross_attn/kv", "cross_attn/proj")},
}


@pytest.mark.parametrize("kind", ["mmdit", "stdit3"])
def test_default_adapters_at_init_leave_the_output_unchanged(kind):
    model = _model(kind)
    inputs = _inputs(model)
    base = _forward(model, inputs)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(3))
    adapters = lora.adapter_arrays(model)
    assert {k.rsplit("/", 1)[0] for k in adapters} == DEFAULT_ADAPTERS[kind]
    assert all(np.any(np.asarray(v)) for k, v in adapters.items() if k.endswith("/a"))  # A random, B zeros
    assert not any(np.any(np.asarray(v)) for k, v in adapters.items() if k.endswith("/b"))
    err, scale = _max_err(_forward(model, inputs), base)
    assert err <= 1e-6 * scale, f"{err} vs {scale}"  # float32 rounding of a recompiled layer scan at most


@pytest.mark.parametrize("kind", ["mmdit", "stdit3"])
def test_merged_model_equals_the_adapter_applied_model(kind):
    model = _model(kind)
    inputs = _inputs(model)
    base, base_arrays = _forward(model, inputs), _base_arrays(model)
    apply_lora(model, LoRAConfig(rank=3, alpha=5.0, targets=("*",)), rngs=nnx.Rngs(1))  # every kind of kernel
    _randomize_adapters(model)
    adapted = _forward(model, inputs)
    err, scale = _max_err(adapted, base)
    assert err > 0.05 * scale  # the adapters really act
    merged = merge_lora(model)
    assert merged is model and not lora.has_lora(model) and not nnx.state(model, lora_filter)
    err, scale = _max_err(_forward(model, inputs), adapted)
    assert err <= 1e-5 * scale, f"{err} vs {scale}"
    merged_arrays = _base_arrays(model)
    changed = {k for k in base_arrays if not np.array_equal(merged_arrays[k], base_arrays[k])}
    assert changed == {k for k in base_arrays if k.endswith("kernel") and "patch" not in k}, sorted(changed)


def test_every_projection_kind_adapts_and_stacked_adapters_carry_the_layer_axis():
    model = _model("stdit3")
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("blocks/*/attn/qkv", "blocks/spatial/attn/proj",
                                                               "t_block")))
    state = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, lora_filter))}
    assert state["blocks/spatial/attn/qkv_kernel_lora/a"].get_value().shape == (2, 64, 2)
    assert state["blocks/spatial/attn/qkv_kernel_lora/b"].get_value().shape == (2, 2, 3, 4, 16)
    assert state["blocks/spatial/attn/qkv_kernel_lora/a"].get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert state["blocks/spatial/attn/proj_kernel_lora/a"].get_metadata()["out_sharding"] == \
        ("layers", "heads", "head_dim", None)
    assert state["blocks/spatial/attn/proj_kernel_lora/b"].get_metadata()["out_sharding"] == ("layers", None, "embed")
    assert state["t_block/kernel_lora/b"].get_metadata()["out_sharding"] == (None, "mlp")
    assert "blocks/temporal/attn/proj_kernel_lora/a" not in state
    assert all(isinstance(v, nnx.LoRAParam) for v in state.values())


def test_config_and_target_mistakes_are_user_errors():
    with pytest.raises(UserError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(UserError, match="alpha"):
        LoRAConfig(rank=4, alpha=-1)
    with pytest.raises(UserError, match="unknown LoRA config keys.*bogus"):
        LoRAConfig.from_dict({"rank": 4, "bogus": 1})
    assert LoRAConfig.from_dict({"rank": 4, "alpha": 4, "targets": ["a", "b"]}).targets == ("a", "b")
    model = _model("mmdit")
    with pytest.raises(UserError, match="'double_blocks/\\*/qkv' matches no projection.*double_blocks/img_attn/q_proj"):
        apply_lora(model, LoRAConfig(rank=2, targets=("double_blocks/*_attn/q_proj", "double_blocks/*/qkv")))
    assert not lora.has_lora(model)  # nothing attached when a pattern fails
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))


# ----------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["mmdit", pytest.param("stdit3", marks=pytest.mark.slow)])
def test_training_moves_only_the_adapters_and_lowers_the_loss(kind):
    model = _model(kind)
    inputs = _inputs(model)
    target = 0.5 * _forward(model, inputs) + 0.1  # reachable-ish: a change of the output the adapters can make
    apply_lora(model, LoRAConfig(rank=4, alpha=4.0), rngs=nnx.Rngs(0))
    before = _base_arrays(model)
    graphdef, adapters, rest = nnx.split(model, lora_filter, ...)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(adapters)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(adapters, rest, opt_state):
        def loss_fn(adapters):
            out = nnx.merge(graphdef, adapters, rest)(**inputs)
            return jnp.mean(jnp.square(out - target))

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    start = jax.tree.map(np.array, adapters)
    losses = []
    for _ in range(4):
        adapters, opt_state, loss = step(adapters, rest, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    nnx.update(model, adapters)
    after = _base_arrays(model)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)  # every base array bit-identical
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), start, adapters))
    assert all(changed) and len(changed) == len(lora.adapter_arrays(model))  # every A and B moved


# -------------------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    model = _model("mmdit")
    cfg = LoRAConfig(rank=3, alpha=6.0)
    apply_lora(model, cfg)
    _randomize_adapters(model)
    out = save_adapters(tmp_path / "adapter", model, cfg, base="ckpts/Open_Sora_v2.safetensors")
    assert sorted(p.name for p in out.iterdir()) == [TENSORS_FILE, META_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left
    meta = json.loads((out / META_FILE).read_text())
    assert meta["model"] == "mmdit" and meta["base"] == "ckpts/Open_Sora_v2.safetensors"
    assert meta["lora"]["rank"] == 3 and meta["lora"]["targets"] == list(lora.DEFAULT_TARGETS["mmdit"])
    assert meta["architecture"]["hidden_size"] == 64 and "dtype" not in meta["architecture"]

    fresh = _model("mmdit")  # the same base weights (same seed)
    assert load_adapters(out, fresh) == LoRAConfig(rank=3, alpha=6.0, targets=lora.DEFAULT_TARGETS["mmdit"])
    saved, loaded = lora.adapter_arrays(model), lora.adapter_arrays(fresh)
    assert saved.keys() == loaded.keys()
    assert all(np.array_equal(np.asarray(saved[k]), np.asarray(loaded[k])) for k in saved)
    inputs = _inputs(model)
    np.testing.assert_array_equal(_forward(fresh, inputs), _forward(model, inputs))
    save_adapters(out, fresh, cfg)  # replacing an adapter directory is allowed
    with pytest.raises(UserError, match="exists and is not empty"):
        save_adapters(out, fresh, cfg, overwrite=False)


@pytest.fixture(scope="module")
def stdit3_adapter(tmp_path_factory):
    model = _model("stdit3")
    cfg = LoRAConfig(rank=2, alpha=2.0)
    apply_lora(model, cfg)
    _randomize_adapters(model)
    return save_adapters(tmp_path_factory.mktemp("lora") / "stdit3_adapter", model, cfg)


def test_adapter_file_mistakes_name_the_file_and_the_tensor(stdit3_adapter, tmp_path):
    with pytest.raises(UserError, match="is for a stdit3 model, this one is mmdit"):
        load_adapters(stdit3_adapter, _model("mmdit"))
    wider = _model("stdit3", hidden_size=96)
    with pytest.raises(UserError, match=r"adapters\.safetensors: tensor 'blocks/spatial/attn/qkv_kernel_lora/a' has "
                                        r"shape \(2, 64, 2\), this model needs \(2, 96, 2\).*hidden_size=64 "
                                        r"\(model: 96\)"):
        load_adapters(stdit3_adapter, wider)
    assert not lora.has_lora(wider)  # nothing attached when the file does not fit
    deeper = _model("stdit3", depth=3)
    with pytest.raises(UserError, match="has shape \\(2, .*needs \\(3, .*depth=2 \\(model: 3\\)"):
        load_adapters(stdit3_adapter, deeper)
    with pytest.raises(UserError, match="nowhere.*no such directory"):
        load_adapters(tmp_path / "nowhere", _model("stdit3"))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_bytes((stdit3_adapter / META_FILE).read_bytes())
    with pytest.raises(UserError, match="has no adapters.safetensors"):
        read_adapter_meta(broken)
    (broken / TENSORS_FILE).write_bytes((stdit3_adapter / TENSORS_FILE).read_bytes()[:-100])
    with pytest.raises(UserError, match="broken/adapters.safetensors: file is truncated"):
        load_adapters(broken, _model("stdit3"))
    (broken / TENSORS_FILE).write_bytes((stdit3_adapter / TENSORS_FILE).read_bytes())
    (broken / META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="broken/lora.json: unreadable LoRA metadata"):
        load_adapters(broken, _model("stdit3"))
    (broken / META_FILE).write_text(json.dumps({"format": "opensora_jax.converted/2"}))
    with pytest.raises(UserError, match="not a LoRA adapter file"):
        load_adapters(broken, _model("stdit3"))


# ----------------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("kind,spec", [("mmdit", "fsdp=2,tensor=2"),
                                       pytest.param("stdit3", "fsdp=2,sequence=2", marks=pytest.mark.slow)])
def test_sharded_adapter_forward_equals_unsharded(kind, spec):
    model = _model(kind)
    apply_lora(model, LoRAConfig(rank=3, alpha=5.0, targets=("*",)))  # as the merge test: its program is reused
    _randomize_adapters(model)
    inputs = _inputs(model)
    expected = _forward(model, inputs)
    mesh = parallel.make_mesh(spec, devices=jax.devices()[:4])
    parallel.shard_params(model, mesh)
    a = next(v for p, v in nnx.to_flat_state(nnx.state(model, lora_filter)) if p[-1] == "a" and "kernel_lora" in p
             and v.get_metadata()["out_sharding"][1] == "embed")
    assert "fsdp" in a.get_value().sharding.spec  # adapters follow the logical axis rules
    with parallel.sharding_context(mesh):
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda s, i: nnx.merge(graphdef, s)(**i), compiler_options=FAST_COMPILE)
        out = run(state, parallel.shard_batch(inputs, mesh))
    err, scale = _max_err(out, expected)
    assert err <= 1e-5 * scale, f"{spec}: {err} vs {scale}"
    merge_lora(model)  # keeps each kernel's sharding
    kernel = model.double_blocks.img_attn.q_proj.kernel if kind == "mmdit" else model.blocks.spatial.attn.qkv_kernel
    assert "fsdp" in kernel.get_value().sharding.spec


def test_adapters_attached_to_a_sharded_model_are_placed_on_its_mesh():
    model = _model("mmdit")
    mesh = parallel.make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])
    parallel.shard_params(model, mesh)
    apply_lora(model, LoRAConfig(rank=2))
    b = model.double_blocks.img_attn.q_proj.kernel_lora.b.get_value()
    assert b.sharding.mesh == mesh and b.sharding.spec[2] == "tensor"  # (layers, rank, heads, head_dim)


# ------------------------------------------------------------------------------------------------------ sampling


def _sample(tmp_path, name: str, *extra) -> np.ndarray:
    from opensora_jax.cli import sample

    out = tmp_path / name
    argv = ["--prompt", "a red circle moving left", "--steps", "2", "--no-progress", "--out-dir", str(out), *extra]
    assert run_cli(sample.main, argv) == 0
    return video_io.read_video(out / "sample_0000.mp4").frames


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory):
    """A random (non-zero) adapter for the demo STDiT3, and the merged demo checkpoint it makes."""
    from opensora_jax.checkpoints import load_model, save_module

    root = tmp_path_factory.mktemp("demo_lora")
    model, meta = load_model("stdit3", DEMO / "stdit3")
    cfg = LoRAConfig(rank=4, alpha=4.0)
    apply_lora(model, cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, lora_filter)):
        var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.get_value().shape), jnp.float32))
    adapter = save_adapters(root / "adapter", model, cfg, base=str(DEMO / "stdit3"))
    merged = save_module(root / "merged", merge_lora(model), config=meta, model="stdit3")
    return adapter, merged


def test_sample_with_lora_differs_from_the_base_and_equals_the_merged_model(demo_adapter, tmp_path):
    adapter, merged = demo_adapter
    with_lora = _sample(tmp_path, "lora", "--lora", str(adapter))
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora"] == str(adapter)
    base = _sample(tmp_path, "base")
    assert np.mean(np.abs(with_lora.astype(int) - base.astype(int))) > 1.0
    with_merged = _sample(tmp_path, "merged", "--config", str(REPO / "configs" / "demo" / "sample.py"),
                          "--stdit3", str(merged))
    np.testing.assert_array_equal(with_lora, with_merged)


@pytest.mark.parametrize("family,lora_path,message", [
    ("opensora_v1_2", "nowhere", "nowhere': no such directory"),
    ("opensora_v2_0", "ADAPTER", "is for a stdit3 model, this one is mmdit"),
])
def test_sample_lora_mistakes_fail_before_any_model_loads(family, lora_path, message, stdit3_adapter, tmp_path,
                                                          capsys):
    from opensora_jax.cli import sample

    lora_path = str(stdit3_adapter) if lora_path == "ADAPTER" else str(tmp_path / lora_path)
    argv = ["--family", family, "--prompt", "a cat", "--lora", lora_path, "--out-dir", str(tmp_path / "out")]
    if family == "opensora_v2_0":
        argv += ["--mmdit", "no/mmdit", "--vae", "no/vae", "--t5", "no/t5", "--clip", "no/clip"]
    assert run_cli(sample.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_v2_0_pipeline_merges_the_adapter_into_the_mmdit(tmp_path):
    from opensora_jax.checkpoints import load_model
    from opensora_jax.pipelines.opensora_v2_0 import Pipeline
    from tests.tiny import write_tiny_v2_checkpoints

    ckpts = write_tiny_v2_checkpoints(tmp_path / "ckpts")
    model, _ = load_model("mmdit", ckpts["mmdit"])
    cfg = LoRAConfig(rank=2, alpha=2.0)
    apply_lora(model, cfg)
    _randomize_adapters(model)
    adapter = save_adapters(tmp_path / "adapter", model, cfg)
    expected = _base_arrays(merge_lora(model))
    pipeline = Pipeline.from_checkpoints(mmdit=ckpts["mmdit"], vae=ckpts["vae"], t5=ckpts["t5"], clip=ckpts["clip"],
                                         dtype="float32", t5_max_length=32, lora=str(adapter))
    got = _base_arrays(pipeline.model)
    assert got.keys() == expected.keys() and not lora.has_lora(pipeline.model)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
