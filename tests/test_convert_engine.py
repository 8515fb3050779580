"""The generic conversion engine (convert.keymap / sources / checkpoint) on a toy module and tiny files."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from opensora_jax import checkpoints as ckpt
from convert.checkpoint import (
    is_converted_dir,
    load_converted,
    load_flat_into,
    load_params,
    save_converted,
    variable_paths,
)
from convert.keymap import ConversionError, Rule, Table, convert, plan
from opensora_jax.errors import CheckpointError
from opensora_jax.tensor_files import open_source
from opensora_jax.models.layers import Dense, buffer

N_BLOCKS = 2


class Toy(nnx.Module):
    """A dense layer, a stack of vmapped dense layers and a buffer; RNG state to be skipped."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = Dense(3, 4, axes=(None, None), rngs=rngs)

        @nnx.split_rngs(splits=N_BLOCKS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Dense(4, 4, axes=(None, None), rngs=rngs)

        self.blocks = blocks(rngs)
        self.null = buffer(jnp.full((5, 4), 7.0), (None, None))
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


def transpose(w):
    return w.T


TABLE = Table(
    "toy",
    [
        Rule("proj/kernel", "proj.weight", transpose),
        Rule("proj/bias", "proj.bias"),
        Rule("blocks/kernel", "blocks.{i}.weight", transpose),
        Rule("blocks/bias", "blocks.{i}.bias"),
        Rule("null", "y_embedding", resize_rows=True),
    ],
    strip_prefixes=("module.",),
    ignore=(r"pos_embed(_temporal)?",),
)


def reference_state(prefix: str = "", y_rows: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sd = {
        "proj.weight": rng.standard_normal((4, 3)),
        "proj.bias": rng.standard_normal(4),
        "y_embedding": rng.standard_normal((y_rows, 4)),
    }
    for i in range(N_BLOCKS):
        sd[f"blocks.{i}.weight"] = rng.standard_normal((4, 4))
        sd[f"blocks.{i}.bias"] = rng.standard_normal(4)
    return {prefix + k: v.astype(np.float32) for k, v in sd.items()}


def expected_flat(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "proj/kernel": sd["proj.weight"].T,
        "proj/bias": sd["proj.bias"],
        "blocks/kernel": np.stack([sd[f"blocks.{i}.weight"].T for i in range(N_BLOCKS)]),
        "blocks/bias": np.stack([sd[f"blocks.{i}.bias"] for i in range(N_BLOCKS)]),
        "null": sd["y_embedding"],
    }


@pytest.fixture(scope="module")
def abstract():
    return nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))


@pytest.fixture(scope="module")
def targets(abstract):
    return variable_paths(abstract)


def write(path, sd):
    safetensors.numpy.save_file(sd, str(path))
    return path


def shapes(sd):
    return {k: v.shape for k, v in sd.items()}


def assert_flat_equal(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), err_msg=k)


def problems_of(table, sd, targets):
    with pytest.raises(ConversionError) as err:
        plan(table, shapes(sd), targets)
    return err.value


# --- keymap ---


def test_variable_paths_skip_rng_state(targets):
    assert set(targets) == {"proj/kernel", "proj/bias", "blocks/kernel", "blocks/bias", "null"}
    assert targets["blocks/kernel"].shape == (N_BLOCKS, 4, 4)


def test_plan_on_abstract_shapes(targets):
    steps = plan(TABLE, shapes(reference_state()), targets)
    by_target = {s.target: s for s in steps}
    assert set(by_target) == set(targets)
    assert by_target["blocks/kernel"].sources == ("blocks.0.weight", "blocks.1.weight")


def test_round_trip_transpose_and_stacking(tmp_path, targets):
    sd = reference_state()
    with open_source(write(tmp_path / "m.safetensors", sd)) as src:
        flat = convert(TABLE, src, targets)
    assert_flat_equal(flat, expected_flat(sd))
    model = Toy(nnx.Rngs(1))
    load_flat_into(model, flat)
    np.testing.assert_array_equal(np.asarray(model.blocks.kernel[...]), flat["blocks/kernel"])
    np.testing.assert_array_equal(np.asarray(model.null[...]), flat["null"])


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda sd: sd.pop("blocks.1.bias"), "missing source key for blocks/bias: blocks.1.bias"),
        (lambda sd: sd.update({"blocks.2.bias": np.zeros(4, np.float32)}), "unused source key: blocks.2.bias"),
        (lambda sd: sd.update({"proj.weight": np.zeros((4, 5), np.float32)}), "source proj.weight (shape (4, 5)"),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_single_problem_names_key(targets, edit, needle):
    sd = reference_state()
    edit(sd)
    err = problems_of(TABLE, sd, targets)
    assert len(err.problems) == 1
    assert needle in str(err)


def test_all_problems_reported_at_once(targets):
    sd = reference_state()
    del sd["proj.bias"]
    sd["extra.weight"] = np.zeros(2, np.float32)
    sd["blocks.0.weight"] = np.zeros((4, 2), np.float32)
    table = Table("toy", [r for r in TABLE.rules if r.target != "null"] + [Rule("nowhere", "y_embedding")])
    err = problems_of(table, sd, targets)
    text = str(err)
    for needle in [
        "missing source key for proj/bias: proj.bias",
        "unused source key: extra.weight (shape (2,))",
        "shape mismatch: source blocks.0.weight (shape (4, 2) → (2, 4) after transform) vs parameter blocks/kernel",
        "unknown parameter in rule: nowhere",
        "unfilled parameter: null (shape (5, 4))",
    ]:
        assert needle in text
    assert len(err.problems) == 5


def test_failing_transform_is_a_problem(targets):
    rules = [Rule(r.target, r.source, lambda w: w.reshape(5)) if r.target == "proj/kernel" else r for r in TABLE.rules]
    err = problems_of(Table("toy", rules), reference_state(), targets)
    assert len(err.problems) == 1
    assert "transform failed for source proj.weight (shape (4, 3)) → parameter proj/kernel" in str(err)


def test_prefix_strip_and_ignore(tmp_path, targets):
    sd = reference_state(prefix="module.")
    sd["pos_embed"] = sd["module.pos_embed_temporal"] = np.zeros(3, np.float32)
    with open_source(write(tmp_path / "m.safetensors", sd)) as src:
        flat = convert(TABLE, src, targets)
    assert_flat_equal(flat, expected_flat(reference_state()))
    sd["pos_embed_spatial"] = np.zeros(3, np.float32)
    assert "unused source key: pos_embed_spatial" in str(problems_of(TABLE, sd, targets))


@pytest.mark.parametrize("rows", [3, 7])
def test_resize_rows(tmp_path, targets, rows):
    sd = reference_state(y_rows=rows)
    with open_source(write(tmp_path / "m.safetensors", sd)) as src:
        null = convert(TABLE, src, targets)["null"]
    y = sd["y_embedding"]
    want = np.concatenate([y, np.repeat(y[-1:], 5 - rows, axis=0)]) if rows < 5 else y[:5]
    np.testing.assert_array_equal(null, want)
    strict = Table("toy", [Rule(r.target, r.source, r.transform) for r in TABLE.rules])
    assert "shape mismatch: source y_embedding" in str(problems_of(strict, sd, targets))


def test_convert_dtype_cast(tmp_path, targets):
    with open_source(write(tmp_path / "m.safetensors", reference_state())) as src:
        flat = convert(TABLE, src, targets, dtype=jnp.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())


def test_optional_source_keeps_module_value(tmp_path, targets):
    table = Table("toy", TABLE.rules, optional_sources=(r"y_embedding",))
    sd = reference_state()
    del sd["y_embedding"]
    path = write(tmp_path / "m.safetensors", sd)
    with open_source(path) as src:
        assert "null" not in convert(table, src, targets)
    flat = load_params(table, path, Toy(nnx.Rngs(0)))
    np.testing.assert_array_equal(flat["null"], np.full((5, 4), 7.0, np.float32))
    with pytest.raises(ConversionError, match="null keeps the module's value"):
        load_params(table, path, nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))


def test_load_flat_into_is_strict():
    flat = expected_flat(reference_state())
    del flat["proj/bias"]
    flat["bogus"] = np.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_flat_into(Toy(nnx.Rngs(0)), flat)
    assert "missing parameter: proj/bias" in str(err.value)
    assert "unexpected parameter: bogus" in str(err.value)


# --- sources ---


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        open_source(tmp_path / "nope.safetensors")


def test_truncated_safetensors_names_file_and_key(tmp_path):
    path = write(tmp_path / "cut.safetensors", reference_state())
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError) as err:
        open_source(path)
    assert str(path) in str(err.value) and repr(last) in str(err.value)


def test_bf16_source(tmp_path):
    values = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    path = write(tmp_path / "b.safetensors", {"w": values.astype(ml_dtypes.bfloat16)})
    with open_source(path) as src:
        assert src.dtype("w") == ml_dtypes.bfloat16 and src.shape("w") == (2, 2)
        np.testing.assert_array_equal(src.get("w").astype(np.float32), values)


def split_in_two(tmp_path, sd):
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        write(tmp_path / name, {k: sd[k] for k in names})
    return {k: name for name, names in shards.items() for k in names}


def test_sharded_index_and_directory(tmp_path, targets):
    sd = reference_state()
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": split_in_two(tmp_path, sd)}))
    for path in [index, tmp_path]:
        with open_source(path) as src:
            assert_flat_equal(convert(TABLE, src, targets), expected_flat(sd))
    index.unlink()
    with open_source(tmp_path) as src:  # several files, no index: read together
        assert sorted(src.keys()) == sorted(sd)


def test_index_must_match_shards(tmp_path):
    weight_map = split_in_two(tmp_path, reference_state())
    weight_map["ghost"] = "a.safetensors"
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="ghost is mapped to a.safetensors but missing"):
        open_source(index)


def test_directory_duplicate_key(tmp_path):
    write(tmp_path / "a.safetensors", {"w": np.zeros(2, np.float32)})
    write(tmp_path / "b.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="'w' is present in both"):
        open_source(tmp_path)


def test_pickle_needs_opt_in(tmp_path, targets):
    torch = pytest.importorskip("torch")
    sd = reference_state()
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}}, path)
    with pytest.raises(ValueError, match="--allow-pickle"):
        open_source(path)
    with open_source(path, allow_pickle=True) as src:
        assert src.dtype("proj.bias") == ml_dtypes.bfloat16
        flat = convert(TABLE, src, targets)
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in expected_flat(sd).items()}
    assert_flat_equal(flat, want)


# --- converted checkpoints ---


def test_save_load_converted(tmp_path):
    flat = expected_flat(reference_state())
    out = tmp_path / "out" / "toy"
    assert save_converted(out, flat, config={"depth": 2}, model="toy", extra_meta={"source": "x"}) == out
    assert os.listdir(out.parent) == ["toy"]  # no staging directory left behind
    assert is_converted_dir(out) and not is_converted_dir(tmp_path)
    loaded, meta = load_converted(out)
    assert_flat_equal(loaded, flat)
    assert meta["model"] == "toy" and meta["config"] == {"depth": 2} and meta["conversion"]["source"] == "x"
    with pytest.raises(FileExistsError):
        save_converted(out, flat, config={}, model="toy")
    save_converted(out, {"a/b": np.zeros(1)}, config={}, model="toy", overwrite=True)
    assert sorted(load_converted(out)[0]) == ["a/b"] and os.listdir(out.parent) == ["toy"]
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        load_converted(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(staged, out_dir):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "_move_into_place", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_converted(tmp_path / "toy", expected_flat(reference_state()), config={}, model="toy")
    assert os.listdir(tmp_path) == []


def test_load_params_from_raw_and_converted(tmp_path, abstract):
    sd = reference_state()
    raw = write(tmp_path / "m.safetensors", sd)
    from_raw = load_params(TABLE, raw, abstract)
    assert_flat_equal(from_raw, expected_flat(sd))
    save_converted(tmp_path / "conv", from_raw, config={}, model="toy")
    from_dir = load_params(TABLE, tmp_path / "conv", abstract, dtype=jnp.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in from_dir.values())
    assert_flat_equal(from_dir, {k: v.astype(ml_dtypes.bfloat16) for k, v in from_raw.items()})
