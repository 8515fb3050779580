"""The memory planner on the Open-Sora 2.0 MMDiT: geometry against the reference tables, a tiny MMDiT compiled on the
8 fake CPU devices of conftest, the planner's train step run for real on it, the 11B preset planned on one device,
the README table and its markers, the CLI."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opensora_jax.models.mmdit import MMDiT, MMDiTConfig
from opensora_jax.tools import plan, plan_cli, plan_table

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# 2 heads of 32 (axes 8 + 12 + 12), 64 latent features = the 16-channel latent packed 2×2, as the 11B model.
TINY = MMDiTConfig(in_channels=64, vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=2, depth=1,
                   depth_single_blocks=1, axes_dim=(8, 12, 12), patch_size=2)
VIDEO = dict(resolution="64px", aspect_ratio="1:1", num_frames=9)  # latent (3, 8, 8, 16): 48 + 512 tokens


def _plan(mesh: str, train: bool, batch: int, **kwargs) -> plan.PlanResult:
    return plan.plan(plan.PlanSpec(model=TINY, mesh=mesh, train=train, batch=batch, steps=2, **VIDEO, **kwargs))


@pytest.fixture(scope="module")
def sampling():
    return {mesh: _plan(mesh, train=False, batch=1) for mesh in ("data=1", "tensor=2,sequence=4")}


@pytest.fixture(scope="module")
def training():
    return {mesh: _plan(mesh, train=True, batch=8) for mesh in ("data=1", "fsdp=8")}


# Spec §1.4 (inference table, D = 16, 129 frames → 33 latent frames): (resolution, W:H) → (H, W), image tokens.
REFERENCE_SIZES = [
    ("256px", "16:9", (192, 336), 8316), ("256px", "9:16", (336, 192), 8316), ("256px", "1:1", (256, 256), 8448),
    ("256px", "2.39:1", (160, 384), 7920), ("256px", "4:3", (224, 288), 8316), ("256px", "3:4", (288, 224), 8316),
    ("256px", "3:2", (208, 304), 8151), ("256px", "2:1", (176, 352), 7986), ("768px", "16:9", (576, 1024), 76032),
    ("768px", "9:16", (1024, 576), 76032), ("768px", "1:1", (768, 768), 76032),
    ("768px", "2.39:1", (496, 1184), 75702), ("768px", "4:3", (656, 880), 74415),
    ("768px", "3:2", (624, 928), 74646), ("768px", "2:1", (544, 1072), 75174),
    ("768px", "1.85:1", (560, 1040), 75075),
]


@pytest.mark.parametrize("resolution, aspect_ratio, size, image_tokens", REFERENCE_SIZES)
def test_geometry_matches_the_reference_table(resolution, aspect_ratio, size, image_tokens):
    assert plan.mmdit_image_size(resolution, aspect_ratio) == size
    spec = plan.PlanSpec(model="mmdit", resolution=resolution, aspect_ratio=aspect_ratio)
    video = plan.VideoShape.of(spec, plan.model_config(spec))
    assert video.latent[0] == 33 and video.latent[3] == 16
    assert video.image_tokens == image_tokens and video.sequence == image_tokens + 512


def test_11b_shapes_and_shift():
    spec = plan.PlanSpec(model="mmdit")
    video = plan.VideoShape.of(spec, plan.model_config(spec))
    assert (video.frames, video.height, video.width) == (129, 192, 336)
    assert video.latent == (33, 24, 42, 16) and video.tokens == (33, 252) and video.sequence == 8828
    dc_ae = plan.PlanSpec(model="OpenSora-v2-11B-DC-AE", resolution="768px", num_frames=128)
    assert plan.VideoShape.of(dc_ae, plan.model_config(dc_ae)).latent == (32, 18, 32, 128)


def test_plan_spec_defaults_follow_the_family():
    mm = plan.PlanSpec(model="mmdit")
    assert (mm.model, mm.family, mm.resolution, mm.aspect_ratio, mm.num_frames, mm.steps) == (
        "OpenSora-v2-11B", "mmdit", "256px", "16:9", 129, 50)
    s3 = plan.PlanSpec()
    assert (s3.model, s3.family, s3.resolution, s3.aspect_ratio, s3.num_frames, s3.steps) == (
        "STDiT3-XL/2", "stdit3", "720p", "9:16", "4s", 30)
    assert plan.PlanSpec(model="stdit3").model == "STDiT3-XL/2" and plan.PlanSpec(model=TINY).family == "mmdit"
    cfg = plan.model_config(plan.PlanSpec(model="mmdit", train=True, remat="dots", attention="xla"))
    assert (cfg.dtype, cfg.param_dtype, cfg.remat, cfg.attention) == ("bfloat16", "float32", "dots", "xla")
    assert plan.model_config(mm).param_dtype == "bfloat16" and plan.model_config(mm).remat == "nothing"
    with pytest.raises(ValueError, match="guidance-distilled model such as Flux.1-dev"):
        plan.model_config(plan.PlanSpec(model="Flux.1-dev"))
    assert plan.model_config(plan.PlanSpec(model="Flux.1-dev", train=True)).guidance_embed


def test_sampling_plan_shrinks_per_device_memory(sampling):
    single, sharded = sampling["data=1"], sampling["tensor=2,sequence=4"]
    assert single.family == "mmdit" and single.model == "custom MMDiT"
    assert single.model_batch == 3  # [prompt, negative, negative without the image condition]
    assert single.video.latent == (3, 8, 8, 16) and single.video.sequence == 560
    assert single.activation_shape == (3, 560, 64) and single.param_dtype == "bfloat16"
    assert sharded.activation_spec == "P(None, 'sequence', None)" and sharded.notes == ()
    assert 0 < sharded.memory.peak < single.memory.peak
    assert sharded.memory.arguments < single.memory.arguments  # heads and MLP split over tensor


def test_training_plan_shrinks_per_device_memory(training):
    single, sharded = training["data=1"], training["fsdp=8"]
    assert single.param_dtype == "float32" and single.dtype == "bfloat16" and single.remat == "everything"
    state_bytes = 3 * 4 * single.params  # float32 params + two AdamW moments, no EMA
    assert state_bytes <= single.memory.arguments < state_bytes + 2**20
    assert single.memory.aliased > 0.9 * state_bytes  # the donated state is updated in place
    assert sharded.memory.arguments < single.memory.arguments / 4
    assert 0 < sharded.memory.peak < single.memory.peak
    assert "no EMA" in single.what


def _random_tiny(seed: int = 0, **changes) -> MMDiT:
    model = nnx.eval_shape(lambda: MMDiT(dataclasses.replace(TINY, **changes), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), var.get_value().dtype))
    return model


def test_train_step_updates_every_parameter():
    """The update the planner compiles (the 2.0 trainer's) reaches every parameter, cond_in included."""
    from opensora_jax.conditioning.training_conditions import check_weights
    from opensora_jax.training import mmdit_step

    model = _random_tiny(seed=2)
    tx = plan.make_optimizer(lr=1e-3)
    graphdef, state = mmdit_step.init_state(model, tx, nnx.Param, seed=0)
    rng = np.random.default_rng(3)
    t, h, w, c = 3, 4, 4, 16

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    batch = dict(x0=normal(2, t, h, w, c), txt=normal(2, 512, 32), y_vec=normal(2, 24), null_txt=normal(1, 512, 32),
                 null_vec=normal(1, 24), ref_head=normal(2, 1, h, w, c))
    cfg = mmdit_step.StepConfig(cond_weights=check_weights({"i2v_head": 1}))
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = jax.jit(lambda s, b: mmdit_step.update(graphdef, tx, cfg, s, b))(state, batch)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = jax.tree.leaves(new.params)
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), after))


def test_notes_explain_the_11b_meshes():
    spec = plan.PlanSpec(model="mmdit", mesh="fsdp=2,sequence=4")
    cfg, video = plan.model_config(spec), plan.VideoShape.of(spec, plan.model_config(spec))
    _, notes = plan.activation_notes(cfg, video, 3, plan.build_mesh(spec))
    assert notes == ("model batch 3 is not divisible by data×fsdp = 2: the batch dim is not split, activations are "
                     "replicated over fsdp (fsdp still splits the weights)",)
    spec = dataclasses.replace(spec, mesh="sequence=8")
    activation_spec, notes = plan.activation_notes(cfg, video, 3, plan.build_mesh(spec))
    assert activation_spec == "P(None, None, None)"
    assert notes[0].startswith("L = 512 + 8316 = 8828 joint tokens is not divisible by sequence = 8")
    big = dataclasses.replace(spec, resolution="768px")
    assert plan.activation_notes(cfg, plan.VideoShape.of(big, cfg), 3, plan.build_mesh(big)) == (
        "P(None, 'sequence', None)", ())


def test_11b_sampling_plan_on_one_device():
    """The released preset compiles (scanned stacks: about a second) and holds its bf16 weights."""
    result = plan.plan(plan.PlanSpec(model="mmdit", steps=2))
    assert result.params == 11_891_390_528 and result.model == "OpenSora-v2-11B"
    assert 2 * result.params <= result.memory.arguments < 2 * result.params + 2**28
    assert 0 < result.memory.temporaries < 8 * plan.GIB
    report = plan.format_report(result)
    for text in ("8316 image tokens (33 × 252) + 512 text tokens = 8828", "16:9 W:H", "model batch 3",
                 "(B, L, C) = (3, 8828, 3072)"):
        assert text in report


def test_table_specs_rows_and_markers(sampling, training, tmp_path):
    specs = plan_table.table_specs(model="mmdit")
    assert all(s.family == "mmdit" and s.aspect_ratio == "16:9" and s.num_frames == 129 for s in specs)
    sample = [(s.resolution, s.mesh) for s in specs if not s.train]
    assert sample[:3] == [("256px", "data=1"), ("256px", "fsdp=8"), ("256px", "tensor=8")]
    assert {r for r, _ in sample} == {"256px", "768px"}
    train = [(s.resolution, s.mesh, s.batch) for s in specs if s.train]
    assert train[:2] == [("256px", "data=1", 1), ("256px", "fsdp=8", 8)] and {r for r, _, _ in train} == {"256px",
                                                                                                        "768px"}
    assert ("256px", "fsdp=8,sequence=8", 8) in train and ("768px", "fsdp=32,sequence=8", 32) in train
    assert not any(s.devices == 256 or "fsdp=32" in s.mesh for s in specs if not s.train)  # 256 devices: training
    assert plan_table.shows_tokens(specs) and not plan_table.shows_tokens(plan_table.table_specs())
    header, align = plan_table.table_header(tokens_column=True)
    assert "| Latent T×H×W | Tokens | Devices |" in header and align.count("|") == header.count("|")
    row = plan_table.table_row(sampling["tensor=2,sequence=4"])
    assert row.startswith("| sample | 64px 64×64 | 3×8×8 | 48 + 512 | 8 | tensor=2,sequence=4 | 1 (CFG 3) |")
    assert plan_table.table_row(training["fsdp=8"]).count("|") == header.count("|")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- mmdit-memory-table:start -->\nold\n<!-- mmdit-memory-table:end -->\nrest\n")
    plan_table.update_readme(readme, "mmdit", "| new |")
    assert readme.read_text() == ("intro\n<!-- mmdit-memory-table:start -->\n| new |\n"
                                  "<!-- mmdit-memory-table:end -->\nrest\n")
    with pytest.raises(ValueError, match="no '<!-- stdit3-memory-table:start -->'"):
        plan_table.update_readme(readme, "stdit3", "| new |")


def test_readme_holds_the_generated_table():
    text = (REPO_ROOT / "README.md").read_text()
    start, end = plan_table.TABLE_MARKERS["mmdit"]
    assert start in text and end in text
    table = text[text.index(start) + len(start):text.index(end)].strip().splitlines()
    assert tuple(table[:2]) == plan_table.table_header(tokens_column=True)
    assert len(table) == 2 + len(plan_table.table_specs(model="mmdit"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mmdit", "--resolution", "720"], "resolution '720' is not a name like '256px'"),
        (["--model", "mmdit", "--aspect-ratio", "7:5"], "unknown aspect ratio '7:5' (names are W:H)"),
        (["--model", "mmdit", "--mesh", "fsdp=8,sequence=8"], "needs 64 devices but jax has 8"),
        (["--model", "mmdit", "--readme", "README.md"], "--readme needs --table"),
        (["--model", "mmdit", "--table", "--readme", "no/such/README.md"], "no/such/README.md not found"),
        (["--table", "--readme", str(REPO_ROOT / "README.md")], "no '<!-- stdit3-memory-table:start -->'"),
        (["--model", "Flux.2"], "unknown model 'Flux.2'"),
    ],
)
def test_cli_errors_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_plans_the_11b(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--model", "mmdit", "--steps", "1", "--mesh", "tensor=8", "--json", str(out)]) == 0
    assert "OpenSora-v2-11B sample" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["family"] == "mmdit" and payload["model_batch"] == 3 and payload["devices"] == 8
    assert payload["video"]["text_tokens"] == 512 and payload["memory_gib"]["arguments"] < 3.0
