"""Mesh parsing, logical-axis resolution, and sharded STDiT3 == single-device STDiT3 on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opensora_jax import parallel
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config

# Heads (8), MLP width (256), caption width (32), hidden (64) and 6·hidden all divide 8.
CFG = STDiT3Config(depth=2, hidden_size=64, num_heads=8, caption_channels=32, model_max_length=16)
BATCH, FRAMES, HEIGHT, WIDTH = 8, 2, 8, 8  # S = (8/2)·(8/2) = 16 spatial tokens, divisible by 8
MESHES = ["data=8", "fsdp=8", "tensor=8", "sequence=8", "fsdp=2,tensor=2,sequence=2"]
LEARNING_RATE = 1e-3
# Adam divides by sqrt(v) + eps; near-zero gradients carry rounding noise of either sign, which the default
# eps (1e-8) would blow up to ±lr. A larger eps keeps the update a smooth function of the gradient.
ADAM_EPS = 1e-3


def _abstract_model() -> STDiT3:
    return nnx.eval_shape(lambda: STDiT3(CFG, rngs=nnx.Rngs(0)))


# -- mesh specs ----------------------------------------------------------------------------------------------


def test_parse_mesh_specs():
    assert parallel.MeshConfig.parse("fsdp=8,sequence=8").sizes() == dict(data=1, fsdp=8, tensor=1, sequence=8)
    assert parallel.MeshConfig.parse(" data = -1 ").sizes() == dict(data=-1, fsdp=1, tensor=1, sequence=1)
    assert parallel.MeshConfig.parse("") == parallel.MeshConfig()
    assert parallel.MeshConfig.parse("fsdp=2,data=-1").resolve(8) == dict(data=4, fsdp=2, tensor=1, sequence=1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fsdp8", "not of the form axis=size"),
        ("pipeline=2", "unknown axis 'pipeline'"),
        ("fsdp=2,fsdp=4", "given twice"),
        ("fsdp=two", "not an integer"),
        ("data=-1,fsdp=-1", "only one mesh axis may be -1"),
        ("tensor=0", "positive or -1"),
    ],
)
def test_bad_mesh_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parallel.MeshConfig.parse(spec)


def test_mesh_size_must_match_devices():
    with pytest.raises(ValueError, match="needs 4 devices but 8 are available"):
        parallel.make_mesh("fsdp=4")
    with pytest.raises(ValueError, match="does not divide the 8 available"):
        parallel.make_mesh("tensor=3,data=-1")


def test_make_mesh_axes():
    mesh = parallel.make_mesh("fsdp=2,tensor=2,sequence=2")
    assert mesh.axis_names == parallel.MESH_AXES
    assert dict(mesh.shape) == dict(data=1, fsdp=2, tensor=2, sequence=2)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh().shape)["data"] == 8


# -- logical axes ----------------------------------------------------------------------------------------------


def test_logical_to_spec_rules_and_fallbacks():
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    spec = parallel.logical_to_spec
    assert spec(("layers", "embed", "mlp"), mesh) == P(None, "fsdp", "tensor")
    assert spec(("act_batch", "act_tokens"), mesh) == P(("data", "fsdp"), None)  # sequence has size 1
    assert spec(("embed", "caption"), mesh) == P("fsdp", None)  # fsdp already used by dim 0
    assert spec(("act_batch",), mesh, shape=(2,)) == P("data")  # longest dividing prefix of (data, fsdp)
    assert spec(("heads",), mesh, shape=(3,)) == P(None)  # indivisible: replicated
    assert spec((("act_batch", "act_heads"),), mesh) == P(("data", "fsdp", "tensor"))
    with pytest.raises(KeyError, match="no rule"):
        spec(("nonsense",), mesh)


def test_constrain_is_identity_without_context():
    x = jnp.ones((4, 4))
    assert parallel.constrain(x, ("act_batch", None)) is x
    assert parallel.current_mesh() is None


def test_constrain_applies_rules_inside_context():
    mesh = parallel.make_mesh("data=2,fsdp=2,sequence=2")
    with parallel.sharding_context(mesh):
        assert parallel.current_mesh() is mesh
        y = jax.jit(lambda x: parallel.constrain(x * 2, ("act_batch", "act_frames", "act_tokens")))(jnp.ones((4, 3, 2)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "sequence")), 3)
    assert parallel.current_mesh() is None


def test_rules_cover_every_model_axis_name():
    variables = nnx.to_flat_state(nnx.state(_abstract_model()))
    stdit3_names = {name for _, var in variables for name in var.get_metadata().get("out_sharding", ()) if name}
    t5_and_vae_names = {"layers", "embed", "heads", "kv", "mlp", "vocab", "conv_in", "conv_out", "channels"}
    assert stdit3_names | t5_and_vae_names <= set(parallel.LOGICAL_AXIS_RULES)


def test_shard_batch_splits_leading_dim():
    mesh = parallel.make_mesh("data=2,fsdp=2,sequence=2")
    batch = parallel.shard_batch({"x": np.zeros((8, 3)), "odd": np.zeros((3, 2)), "scalar": np.float32(1)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["odd"].sharding.spec == P(None, None)
    assert batch["scalar"].sharding.spec == P()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
         {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "99", "WORLD_SIZE": "1", "RANK": "0"}, None),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "99", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
          "LOCAL_WORLD_SIZE": "2"},
         {"coordinator_address": "h:99", "num_processes": 4, "process_id": 3, "local_device_ids": [1]}),
    ],
)
def test_detect_launcher(env, expected):
    assert parallel.detect_launcher(env) == expected


def test_initialize_distributed_is_noop_without_launcher():
    assert parallel.initialize_distributed({}) is False


# -- STDiT3 equivalence ------------------------------------------------------------------------------------------


def _model() -> STDiT3:
    """The tiny STDiT3 with every variable random (no zero-initialised projections, so no all-zero gradients).

    Filled from numpy on an abstract model: eager initialisers would compile once per shape (slow on a shared CPU).
    """
    model, rng = _abstract_model(), np.random.default_rng(1)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def _inputs() -> tuple[dict, jax.Array]:
    rng = np.random.default_rng(2)
    lengths = np.arange(BATCH) % CFG.model_max_length + 1
    inputs = dict(
        x=rng.standard_normal((BATCH, FRAMES, HEIGHT, WIDTH, CFG.in_channels)),
        timestep=rng.uniform(0.0, 1000.0, (BATCH,)),
        y=rng.standard_normal((BATCH, CFG.model_max_length, CFG.caption_channels)),
        mask=(np.arange(CFG.model_max_length)[None] < lengths[:, None]).astype(np.int32),
        x_mask=np.arange(BATCH * FRAMES).reshape(BATCH, FRAMES) % 3 != 0,
        fps=np.full((BATCH,), 24.0),
        height=np.full((BATCH,), HEIGHT * 8.0),
        width=np.full((BATCH,), WIDTH * 8.0),
    )
    target = rng.standard_normal((BATCH, FRAMES, HEIGHT, WIDTH, CFG.out_channels))
    inputs = {k: jnp.asarray(v, jnp.float32) if v.dtype == np.float64 else jnp.asarray(v) for k, v in inputs.items()}
    return inputs, jnp.asarray(target, jnp.float32)


# LLVM -O0 halves CPU compile time; the HLO (and so the arithmetic) is unchanged.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _train_step(graphdef, state_shardings=None):
    """A jitted AdamW step on an MSE loss; returns (forward output before the update, loss, grads, new state)."""

    def step(state, inputs, target):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(m):
            out = m(**inputs)
            return jnp.mean(jnp.square(out - target)), out

        (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return out, loss, grads, nnx.state((model, optimizer))

    out_shardings = None if state_shardings is None else (None, None, None, state_shardings)
    return jax.jit(step, out_shardings=out_shardings, compiler_options=_FAST_COMPILE)


def _run(mesh=None) -> dict:
    """Forward output, loss, gradients and the updated state, on `mesh` (sharded) or on one device."""
    model, (inputs, target) = _model(), _inputs()
    optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE, eps=ADAM_EPS), wrt=nnx.Param)
    if mesh is None:
        graphdef, state = nnx.split((model, optimizer))
        out, loss, grads, state = _train_step(graphdef)(state, inputs, target)
    else:
        parallel.shard_params(model, mesh)
        parallel.shard_optimizer_state(optimizer, mesh)
        inputs, target = parallel.shard_batch((inputs, target), mesh)
        graphdef, state = nnx.split((model, optimizer))
        with parallel.sharding_context(mesh):
            step = _train_step(graphdef, parallel.state_shardings(state, mesh))
            out, loss, grads, state = step(state, inputs, target)
    model, optimizer = nnx.merge(graphdef, state)
    return dict(out=out, loss=loss, grads=nnx.to_pure_dict(grads), params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                model=model, optimizer=optimizer)


def _assert_close(actual, expected, rel=1e-5, what=""):
    """max |actual − expected| ≤ rel · max |expected| (reduction order differs between layouts)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rel * scale + 1e-30, f"{what}: max error {err:.3g} > {rel} × {scale:.3g}"


@pytest.fixture(scope="module")
def reference():
    return _run()


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_and_step_match_single_device(spec, reference):
    mesh = parallel.make_mesh(spec)
    got = _run(mesh)
    _assert_close(got["out"], reference["out"], what="forward")
    _assert_close(got["loss"], reference["loss"], what="loss")
    for path, expected in jax.tree_util.tree_leaves_with_path(reference["grads"]):
        _assert_close(_at(got["grads"], path), expected, what=f"grad {jax.tree_util.keystr(path)}")
    # The first AdamW step moves each parameter by about lr · g/(|g| + eps): compare to a fraction of lr.
    for path, expected in jax.tree_util.tree_leaves_with_path(reference["params"]):
        np.testing.assert_allclose(_at(got["params"], path), expected, rtol=0, atol=1e-3 * LEARNING_RATE,
                                   err_msg=f"param {jax.tree_util.keystr(path)}")
    _assert_layout(got["model"], got["optimizer"], mesh)


def _forward(model, inputs, mesh=None):
    fn = jax.jit(lambda m, inputs: m(**inputs), compiler_options=_FAST_COMPILE)
    if mesh is None:
        return fn(model, inputs), None
    with parallel.sharding_context(mesh):
        return fn(model, inputs), str(jax.make_jaxpr(lambda m, inputs: m(**inputs))(model, inputs))


@pytest.mark.parametrize(
    "spec, height, ulysses",
    [
        ("sequence=8", HEIGHT, True),  # S = 16 tokens, 8 heads: Ulysses under shard_map
        ("sequence=8", 6, False),  # S = 3·4 = 12 does not divide by 8: GSPMD constraints, S replicated
    ],
)
def test_spatial_attention_sequence_paths_match_single_device(spec, height, ulysses):
    """sequence=8 runs spatial attention as Ulysses under shard_map when S and the heads divide, else falls back
    to the GSPMD constraints; both equal one device (the full train step under sequence=8 is compared above)."""
    model, (inputs, _) = _model(), _inputs()
    inputs = dict(inputs, x=inputs["x"][:, :, :height], height=jnp.full((BATCH,), height * 8.0))
    expected, _ = _forward(model, inputs)
    mesh = parallel.make_mesh(spec)
    got, jaxpr = _forward(parallel.shard_params(model, mesh), parallel.shard_batch(inputs, mesh), mesh)
    _assert_close(got, expected, what="forward")
    assert ("all_to_all" in jaxpr) == ulysses and ("shard_map" in jaxpr) == ulysses


def _at(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def _assert_layout(model, optimizer, mesh):
    """The parameters and Adam moments are really split the way the rules say."""
    sizes = dict(mesh.shape)
    kernel = model.blocks.spatial.mlp.fc1.kernel  # (layers, embed, mlp)
    expected = P(None, "fsdp" if sizes["fsdp"] > 1 else None, "tensor" if sizes["tensor"] > 1 else None)
    mu = optimizer.opt_state[0].mu["blocks"]["spatial"]["mlp"]["fc1"]["kernel"]
    for array in (kernel.get_value(), mu.get_value()):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, expected), array.ndim), array.sharding


# -- checkpoints across meshes -------------------------------------------------------------------------------


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    source_mesh, target_mesh = parallel.make_mesh("fsdp=8"), parallel.make_mesh("data=2,tensor=4")
    model = parallel.shard_params(_model(), source_mesh)
    saved = nnx.to_pure_dict(nnx.state(model))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "params", saved)
    checkpointer.wait_until_finished()

    target = nnx.to_pure_dict(parallel.abstract_state(_abstract_model(), target_mesh))
    restored = checkpointer.restore(tmp_path / "params", target)

    for path, value in jax.tree_util.tree_leaves_with_path(restored):
        assert value.sharding == _at(target, path).sharding, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(value, _at(saved, path), err_msg=jax.tree_util.keystr(path))
    assert restored["blocks"]["spatial"]["attn"]["qkv_kernel"].sharding.spec == P(None, None, None, "tensor", None)


def test_models_load_sharded_tensor_by_tensor(tiny_checkpoints):
    """load_model(mesh=...) places each parameter per its logical axes (embed on fsdp, vocab/heads on tensor)."""
    from convert.registry import load_model

    ckpts = tiny_checkpoints
    mesh = parallel.make_mesh("fsdp=4,tensor=2")
    t5, _ = load_model("t5", ckpts["t5"], mesh=mesh)
    emb = t5.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp") and len(emb.addressable_shards) == 8
    stdit3, _ = load_model("stdit3", ckpts["stdit3"], mesh=mesh)
    qkv = stdit3.blocks.spatial.attn.qkv_kernel[...]
    assert tuple(qkv.sharding.spec)[:4] == (None, "fsdp", None, "tensor")
    assert qkv.addressable_shards[0].data.shape == (qkv.shape[0], qkv.shape[1] // 4, 3, qkv.shape[3] // 2, qkv.shape[4])
