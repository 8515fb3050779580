"""Streaming conversion and loading: equal to the whole-model path, bounded memory, old format, atomic writes."""

import json
import os
import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from convert.checkpoint import convert_to_dir, open_params
from convert.keymap import ConversionError, Rule, Table, convert, transposed
from opensora_jax import checkpoints as ckpt
from opensora_jax import tensor_files
from opensora_jax.checkpoints import (
    FORMAT,
    FORMAT_ORBAX,
    ConvertedWriter,
    is_converted_dir,
    load_converted,
    materialize,
    open_converted,
    save_converted,
    variable_paths,
)
from opensora_jax.models.layers import buffer, param
from opensora_jax.parallel import make_mesh
from opensora_jax.tensor_files import SafetensorsFile, SafetensorsWriter, open_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Toy(nnx.Module):
    """A stacked kernel split along its width under fsdp, a kernel split along its rows, a replicated bias
    and a scalar buffer."""

    def __init__(self, layers: int, width: int, rngs: nnx.Rngs, dtype=jnp.float32):
        init = nnx.initializers.normal(1.0)
        self.stack = param(rngs, init, (layers, width, 2 * width), ("layers", "embed", "mlp"), dtype)
        self.rows = param(rngs, init, (2 * width, width), ("embed", None), dtype)
        self.bias = param(rngs, init, (width,), (None,), dtype)
        self.scalar = buffer(jnp.asarray(0.0, dtype), ())


TABLE = Table("toy", [
    Rule("stack", "blocks.{i}.weight", lambda w: w.T),
    Rule("rows", "rows.weight", lambda w: w.T),
    Rule("bias", "bias"),
    Rule("scalar", "scalar"),
], strip_prefixes=("module.",))


def abstract(layers: int, width: int, dtype=jnp.float32):
    return nnx.eval_shape(lambda: Toy(layers, width, nnx.Rngs(0), dtype))


def reference(layers: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {f"blocks.{i}.weight": rng.standard_normal((2 * width, width), np.float32) for i in range(layers)}
    sd["rows.weight"] = rng.standard_normal((width, 2 * width), np.float32)
    sd["bias"] = rng.standard_normal(width, np.float32)
    sd["scalar"] = np.asarray(1.5, np.float32)
    return sd


def expected(sd: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    return {"stack": np.stack([sd[f"blocks.{i}.weight"].T for i in range(layers)]), "rows": sd["rows.weight"].T,
            "bias": sd["bias"], "scalar": sd["scalar"]}


def write_source(path, sd):
    safetensors.numpy.save_file(sd, str(path))
    return path


def assert_equal(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)


def stream(src, out, model, **kw):
    with open_source(src) as source:
        return convert_to_dir(TABLE, source, model, out, config={"layers": 3}, model="toy", **kw)


# --- conversion ---


def test_streamed_conversion_equals_the_whole_model_path(tmp_path):
    sd = reference(3, 16)
    src = write_source(tmp_path / "m.safetensors", sd)
    out, layout = stream(src, tmp_path / "out", abstract(3, 16), extra_meta={"source": "m"})
    assert is_converted_dir(out) and sorted(os.listdir(tmp_path)) == ["m.safetensors", "out"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == FORMAT and meta["config"] == {"layers": 3} and meta["conversion"]["source"] == "m"
    params, meta2 = open_converted(out)
    with params, open_source(src) as source:
        eager = convert(TABLE, source, variable_paths(abstract(3, 16)))
        assert_equal({k: params[k] for k in params}, eager)
    assert_equal(load_converted(out)[0], expected(sd, 3))
    # params/ is an ordinary sharded safetensors set: other tools read it
    index = json.loads((out / "params" / ckpt.INDEX_FILE).read_text())
    shard = safetensors.numpy.load_file(str(out / "params" / index["weight_map"]["stack"]))
    np.testing.assert_array_equal(shard["stack"], expected(sd, 3)["stack"])


def test_bfloat16_output_and_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 4096)
    sd = reference(4, 16)
    out, _ = stream(write_source(tmp_path / "m.safetensors", sd), tmp_path / "out", abstract(4, 16),
                    dtype=jnp.bfloat16)
    assert len(list((out / "params").glob("*.safetensors"))) > 1
    flat, _ = load_converted(out)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    assert_equal(flat, {k: v.astype(ml_dtypes.bfloat16) for k, v in expected(sd, 4).items()})


def test_conversion_holds_about_one_tensor(tmp_path, monkeypatch):
    # All buffers from numpy (no direct I/O, no anonymous maps), so tracemalloc sees every byte held.
    monkeypatch.setattr(tensor_files, "DIRECT_MIN_BYTES", 1 << 62)
    layers, width = 40, 256
    sd = reference(layers, width)
    src = write_source(tmp_path / "m.safetensors", sd)
    largest = max(v.nbytes for v in sd.values())
    model_bytes = sum(v.nbytes for v in sd.values())
    del sd
    model = abstract(layers, width)
    with open_source(src) as source:
        convert(TABLE, source, variable_paths(model))  # warm jax's tracing caches used by plan

        tracemalloc.start()
        try:
            convert(TABLE, source, variable_paths(model))
            whole = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            convert_to_dir(TABLE, source, model, tmp_path / "out", config={}, model="toy")
            streamed = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert whole >= model_bytes  # the instrument sees the whole-model path hold the model
    assert streamed < 6 * largest < model_bytes / 5, (streamed, largest, model_bytes)


def test_a_bad_checkpoint_is_refused_before_anything_is_written(tmp_path):
    sd = reference(3, 16)
    del sd["bias"]
    sd["extra"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as err:
        stream(write_source(tmp_path / "m.safetensors", sd), tmp_path / "out", abstract(3, 16))
    assert len(err.value.problems) == 2
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


class FailOnCall:
    """A transform that raises at its n-th call on real data (shape inference still passes)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, w):
        if isinstance(w, np.ndarray):
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("disk full")
        return w.T


def test_a_failure_mid_write_leaves_no_out_dir_and_keeps_the_old_one(tmp_path):
    src = write_source(tmp_path / "m.safetensors", reference(3, 16))
    for overwrite in (False, True):
        table = Table("toy", [Rule("stack", "blocks.{i}.weight", FailOnCall(2)), *TABLE.rules[1:]])
        with open_source(src) as source, pytest.raises(RuntimeError, match="disk full"):
            convert_to_dir(table, source, abstract(3, 16), tmp_path / "out", config={}, model="toy",
                           overwrite=overwrite)
        assert sorted(os.listdir(tmp_path)) == ["m.safetensors"] + (["out"] if overwrite else [])
        stream(src, tmp_path / "out", abstract(3, 16), overwrite=True)  # a good one, for the overwrite round
    old = load_converted(tmp_path / "out")[0]
    assert_equal(old, expected(reference(3, 16), 3))


def test_an_incomplete_tensor_is_never_committed(tmp_path):
    with pytest.raises(ValueError, match=r"never written: stack\[1\]"):
        with ConvertedWriter(tmp_path / "out", {"stack": (np.float32, (2, 3))}, config={}, model="toy") as writer:
            writer.write("stack", np.zeros(3, np.float32), index=0)
    assert os.listdir(tmp_path) == []


def test_a_killed_writers_partial_directory_is_cleaned_up(tmp_path):
    stale = tmp_path / ".out.partial-999999999-abcdef12"
    stale.mkdir()
    save_converted(tmp_path / "out", {"a": np.zeros(2, np.float32)}, config={}, model="toy")
    assert os.listdir(tmp_path) == ["out"]


# --- loading back ---


def _read_counter(params, monkeypatch):
    sizes = []
    original = type(params).read

    def read(self, key, index=None):
        x = original(self, key, index)
        sizes.append((key, x.nbytes))
        return x

    monkeypatch.setattr(type(params), "read", read)
    return sizes


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=8"])
def test_load_back_tensor_by_tensor(tmp_path, monkeypatch, mesh_spec):
    layers, width = 8, 32
    sd = reference(layers, width)
    out, _ = stream(write_source(tmp_path / "m.safetensors", sd), tmp_path / "out", abstract(layers, width))
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    row = 2 * width * width * 4
    monkeypatch.setattr(ckpt, "READ_CHUNK_BYTES", 2 * row)  # the width-split stack is read 2 layers at a time
    params, _ = open_converted(out)
    sizes = _read_counter(params, monkeypatch)
    with params:
        model = materialize(abstract(layers, width), params, mesh)
    assert_equal({k: v.get_value() for k, v in ckpt._variables(model).items()}, expected(sd, layers))
    if mesh is None:
        assert sorted(k for k, _ in sizes) == ["bias", "rows", "scalar", "stack"]
    else:
        assert max(n for k, n in sizes if k == "stack") == 2 * row
        assert model.stack.get_value().sharding.spec[1] == "fsdp" and model.rows.get_value().sharding.spec[0] == "fsdp"
        assert {n for k, n in sizes if k == "rows"} == {sd["rows.weight"].nbytes // 8}  # each row range alone


def test_reference_weights_load_lazily_onto_a_mesh(tmp_path):
    sd = reference(8, 32)
    src = write_source(tmp_path / "m.safetensors", sd)
    with open_params(TABLE, src, abstract(8, 32), dtype=jnp.bfloat16) as params:
        model = materialize(abstract(8, 32), params, make_mesh("fsdp=8"))
        np.testing.assert_array_equal(params.read("stack", (slice(2, 4), slice(0, 5))),
                                      expected(sd, 8)["stack"][2:4, :5].astype(ml_dtypes.bfloat16))
    got = {k: v.get_value() for k, v in ckpt._variables(model).items()}
    assert all(v.dtype == jnp.float32 for v in got.values())  # converted to bfloat16, placed as the variables'
    assert_equal(got, {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in expected(sd, 8).items()})


def test_old_orbax_format_still_loads():
    demo = os.path.join(ROOT, "assets", "demo", "stdit3")
    assert json.loads(open(os.path.join(demo, "config.json")).read())["format"] == FORMAT_ORBAX
    assert is_converted_dir(demo)
    flat, meta = load_converted(demo)
    params, _ = open_converted(demo)
    with params:
        assert sorted(params) == sorted(flat) and all(params.shape(k) == flat[k].shape for k in flat)
    model, config = ckpt.load_model("stdit3", demo, mesh=make_mesh("fsdp=8"))
    assert config == meta["config"]
    for key, var in ckpt._variables(model).items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), flat[key], err_msg=key)


# --- files ---


def test_writer_and_reader_agree_with_safetensors_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((40, 300, 100), np.float32), "b": np.ones(5, ml_dtypes.bfloat16),
              "c": np.asarray(7, np.int32), "d": rng.standard_normal((3, 400_000), np.float32)}
    layout = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    for order in (["a", "b", "c", "d"], ["d", "c", "a", "b"]):
        path = tmp_path / f"{order[0]}.safetensors"
        with SafetensorsWriter(path, layout) as writer:
            for key in order:
                if key in ("a", "d"):
                    for i in range(arrays[key].shape[0]):
                        writer.write(key, arrays[key][i], index=i)
                else:
                    writer.write(key, arrays[key])
        assert_equal(safetensors.numpy.load_file(str(path)), arrays)
        with SafetensorsFile(path) as f:
            assert_equal({k: f.get(k) for k in arrays}, arrays)
            np.testing.assert_array_equal(f.read("a", (slice(3, 9),)), arrays["a"][3:9])
            np.testing.assert_array_equal(f.read("a", (slice(None), slice(2, 5))), arrays["a"][:, 2:5])
            assert f.get("a").ctypes.data % tensor_files.ARRAY_ALIGN == 0


def test_without_direct_io_or_when_it_fails(tmp_path, monkeypatch):
    arrays = {"x": np.arange(3 * 700_000, dtype=np.float32).reshape(3, 700_000), "y": np.ones(3, np.float32)}
    layout = {k: (v.dtype, v.shape) for k, v in arrays.items()}

    def check(name):
        with SafetensorsWriter(tmp_path / name, layout) as writer:
            for key, value in arrays.items():
                writer.write(key, value)
        assert_equal(safetensors.numpy.load_file(str(tmp_path / name)), arrays)
        with SafetensorsFile(tmp_path / name) as f:
            assert_equal({k: f.get(k) for k in arrays}, arrays)

    check("plain.safetensors")
    # Descriptors that refuse the operation stand for file systems that reject direct I/O mid-way.
    monkeypatch.setattr(tensor_files, "_open_direct",
                        lambda path, flags: os.open(path, os.O_RDONLY if flags & os.O_WRONLY else os.O_WRONLY))
    monkeypatch.setattr(tensor_files._DirectStream, "CHUNK", 1 << 20)
    check("refused.safetensors")
    monkeypatch.setattr(tensor_files, "_open_direct", lambda path, flags: False)
    check("none.safetensors")


def test_fast_transpose_matches_numpy():
    rng = np.random.default_rng(0)
    for shape, axes in [((300, 200), None), ((30, 20, 10), (2, 0, 1)), ((5, 6, 7, 8), (1, 3, 0, 2)), ((7,), None)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = transposed(x, axes)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.transpose(x, axes))
