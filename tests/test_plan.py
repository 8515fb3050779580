"""The memory planner: compiles a tiny STDiT3 on abstract arrays over the 8 fake CPU devices of conftest."""

import dataclasses
import json

import pytest

from opensora_jax.tools import plan, plan_cli, plan_table
from opensora_jax.models.stdit3 import STDiT3Config

# Heads (8) and S = (18/2)·(32/2) = 144 tokens divide every mesh below; 144p 9:16 is 144×256 pixels.
TINY = STDiT3Config(depth=1, hidden_size=64, num_heads=8, caption_channels=32, model_max_length=16)
VIDEO = dict(resolution="144p", aspect_ratio="9:16", num_frames=17)  # latent (5, 18, 32, 4)


def _plan(mesh: str, train: bool, batch: int, **kwargs) -> plan.PlanResult:
    return plan.plan(plan.PlanSpec(model=TINY, mesh=mesh, train=train, batch=batch, steps=1, **VIDEO, **kwargs))


@pytest.fixture(scope="module")
def sampling():
    return {mesh: _plan(mesh, train=False, batch=1) for mesh in ("data=1", "fsdp=2,sequence=4")}


@pytest.fixture(scope="module")
def training():
    return {mesh: _plan(mesh, train=True, batch=8) for mesh in ("data=1", "fsdp=8")}


def test_sampling_plan_shrinks_per_device_memory(sampling):
    single, sharded = sampling["data=1"], sampling["fsdp=2,sequence=4"]
    assert single.devices == 1 and sharded.devices == 8
    assert single.model_batch == 2  # classifier-free guidance doubles the batch
    assert single.video.latent == (5, 18, 32, 4) and single.video.tokens == (5, 144)
    assert single.param_dtype == "bfloat16" and single.remat == "nothing"  # no backward pass to remat
    assert sharded.activation_spec == "P('fsdp', None, 'sequence', None)"
    assert sharded.notes == ()
    assert 0 < sharded.memory.peak < single.memory.peak
    assert sharded.memory.arguments < single.memory.arguments  # weights split over fsdp


def test_training_plan_shrinks_per_device_memory(training):
    single, sharded = training["data=1"], training["fsdp=8"]
    assert single.param_dtype == "float32" and single.dtype == "bfloat16" and single.remat == "everything"
    # params + two AdamW moments + EMA in float32, all split 8 ways under fsdp (norm scales are tiny and replicated)
    state_bytes = 4 * 4 * single.params
    assert single.memory.arguments >= state_bytes
    assert sharded.memory.arguments < single.memory.arguments / 4
    assert single.memory.aliased > 0.9 * state_bytes  # the donated state is updated in place
    assert 0 < sharded.memory.peak < single.memory.peak
    assert sharded.memory.temporaries < single.memory.temporaries  # batch 8 split over fsdp


@pytest.mark.slow  # default run kept near 15 minutes; run with -m slow
def test_remat_policies_trade_memory():
    """Recomputing everything needs the least, keeping the matmul outputs more, no remat the most (with two
    layers: one layer's backward holds its own forward whatever the policy)."""
    two_layers = dataclasses.replace(TINY, depth=2)
    results = {remat: plan.plan(plan.PlanSpec(model=two_layers, train=True, remat=remat, **VIDEO))
               for remat in ("everything", "dots", "nothing")}
    assert {name: r.remat for name, r in results.items()} == {name: name for name in results}
    temps = {name: r.memory.temporaries for name, r in results.items()}
    assert temps["everything"] < temps["dots"] < temps["nothing"], temps
    assert "remat dots" in plan.format_report(results["dots"])


def test_model_config_takes_remat_and_attention():
    train, sample = plan.PlanSpec(model=TINY, train=True), plan.PlanSpec(model=TINY, remat="dots")
    assert plan.model_config(train).remat == "everything" and plan.model_config(sample).remat == "nothing"
    assert plan.model_config(dataclasses.replace(train, remat="dots")).remat == "dots"
    assert plan.PlanSpec(remat=True).remat == "everything" and plan.PlanSpec(remat=False).remat == "nothing"
    assert plan.model_config(train).attention == TINY.attention  # None keeps the model's own
    assert plan.model_config(dataclasses.replace(train, attention="xla")).attention == "xla"
    assert plan.model_config(plan.PlanSpec()).attention == STDiT3Config().attention


def test_report_and_json(sampling, tmp_path):
    result = sampling["fsdp=2,sequence=4"]
    report = plan.format_report(result)
    for text in ("fsdp=2,sequence=4", "CFG", "peak estimate", "temporaries", "(5, 18, 32, 4)"):
        assert text in report
    payload = json.loads(json.dumps(result.to_json(), default=str))
    assert payload["memory_gib"]["peak"] == pytest.approx(result.memory.peak / plan.GIB)
    row = plan_table.table_row(result)
    assert row.startswith("| sample | 144p 144×256 | 5×18×32 | 8 | fsdp=2,sequence=4 | 1 (CFG 2) |")


def test_notes_explain_replicated_activations():
    mesh = plan.build_mesh(plan.PlanSpec(mesh="fsdp=8"))
    video = plan.VideoShape.of(plan.PlanSpec(resolution="240p"), TINY)  # S = 15·27 = 405 tokens
    spec, notes = plan.activation_notes(TINY, video, 2, mesh)
    assert spec == "P(None, None, None, None)"
    assert notes[0].startswith("model batch 2 is not divisible by data×fsdp = 8: the batch dim is not split, "
                               "activations are replicated over fsdp")
    _, notes = plan.activation_notes(TINY, video, 2, plan.build_mesh(plan.PlanSpec(mesh="sequence=8")))
    assert "S = 405 spatial tokens is not divisible by sequence = 8" in notes[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="STDiT3-XXL/2"), "unknown model 'STDiT3-XXL/2'"),
        (dict(resolution="999p"), "unknown resolution '999p'"),
        (dict(aspect_ratio="7:5"), "unknown aspect ratio '7:5'"),
        (dict(num_frames="4 seconds"), "invalid frame count"),
        (dict(batch=0), "batch must be at least 1"),
        (dict(dtype="int8"), "dtype 'int8' unknown"),
        (dict(mesh="fsdp=8,pipeline=2"), "unknown axis 'pipeline'"),
        (dict(mesh="data=-1"), "give the device count"),
        (dict(mesh="fsdp=4", devices=8), "spans 4 devices but --devices is 8"),
        (dict(mesh="fsdp=8,sequence=8"), "needs 64 devices but jax has 8"),
        (dict(remat="some"), "remat 'some' unknown"),
        (dict(attention="nope"), "attention 'nope'"),
    ],
)
def test_bad_specs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spec = plan.PlanSpec(**kwargs)
        plan.VideoShape.of(spec, plan.model_config(spec))
        plan.build_mesh(spec)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "999p"], "unknown resolution '999p'"),
        (["--mesh", "fsdp8"], "not of the form axis=size"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--table", "--table-devices", "1,16"], "no table mesh for 16 devices"),
        (["--mesh", "tensor=3,data=-1", "--devices", "8"], "does not divide the 8 available"),
        (["--remat", "all"], "invalid choice: 'all'"),
        (["--table", "--table-remat", "everything,some"], "remat 'some' unknown"),
        (["--attention", "nope"], "attention 'nope'"),
    ],
)
def test_cli_errors_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        plan_cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--resolution", "--aspect-ratio", "--num-frames", "--mesh", "--train", "--batch",
                 "--dtype", "--devices", "--steps", "--json", "--table", "--table-modes", "--table-resolutions",
                 "--table-devices", "--table-remat", "--remat", "--attention", "--readme", "OpenSora-v2-11B"):
        assert flag in text


def test_request_cpu_devices_sets_or_raises_the_flag():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"}
    plan.request_cpu_devices(4, env)
    assert env["XLA_FLAGS"].endswith("device_count=8")  # enough already
    plan.request_cpu_devices(64, env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=64"
    env = {}
    plan.request_cpu_devices(2, env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_table_specs():
    specs = plan_table.table_specs(modes=("train",), resolutions=("240p",), devices=(1, 8, 64))
    assert [(s.mesh, s.batch, s.train) for s in specs] == [
        ("data=1", 1, True), ("fsdp=8", 8, True), ("fsdp=8,sequence=8", 8, True)]
    assert all(s.batch == 1 for s in plan_table.table_specs(modes=("sample",)))
    assert not plan_table.shows_remat(specs)


def test_table_rows_per_remat_policy(sampling, training):
    specs = plan_table.table_specs(resolutions=("240p",), devices=(8,), remats=("everything", "dots", "nothing"),
                                   attention="xla")
    assert [(s.mode, s.remat) for s in specs] == [
        ("sample", "everything"), ("train", "everything"), ("train", "dots"), ("train", "nothing")]
    assert all(s.attention == "xla" for s in specs) and plan_table.shows_remat(specs)
    header, align = plan_table.table_header(remat_column=True)
    assert "| Batch | Remat | Arguments |" in header and align.count("|") == header.count("|")
    assert "| 1 (CFG 2) | — | " in plan_table.table_row(sampling["data=1"], remat_column=True)
    assert "| 8 | everything | " in plan_table.table_row(training["fsdp=8"], remat_column=True)
