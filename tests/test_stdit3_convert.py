"""STDiT3 checkpoint conversion: full-size manifest coverage, reference loader variants, bad files, CLI."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import stdit3 as conv
from convert.checkpoint import variable_paths
from convert.keymap import ConversionError, plan
from convert.registry import load_model
from opensora_jax.models.stdit3 import STDiT3Config


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    case = fixtures_dir / "opensora_v1_2" / "stdit3_tiny"
    config = json.loads((case / "case.json").read_text())["config"]
    return case / "weights.safetensors", config, load_file(case / "weights.safetensors")


def test_full_size_manifest_maps_both_ways(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / "STDiT3-XL-2.json").read_text())
    abstract = conv.abstract_model(manifest["config"])  # nnx.eval_shape: nothing allocated
    targets = variable_paths(abstract)
    sources = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    steps = plan(conv.table(manifest["config"]), sources, targets)
    assert {s.target for s in steps} == set(targets)
    consumed = {src for s in steps for src in s.sources}
    assert consumed == set(sources)
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == manifest["num_elements"]


def _write(tmp_path, tensors, name="w.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def _load(path, config):
    return load_model("stdit3", path, config=config)[0]


def test_missing_extra_and_misshaped_keys_are_all_named(tiny, tmp_path):
    _, config, weights = tiny
    bad = dict(weights)
    del bad["spatial_blocks.1.mlp.fc1.bias"]
    bad["temporal_blocks.7.attn.proj.weight"] = np.zeros((64, 64), np.float32)
    bad["final_layer.linear.weight"] = np.zeros((31, 64), np.float32)
    with pytest.raises(ConversionError) as err:
        _load(_write(tmp_path, bad), config)
    text = str(err.value)
    for key in ("spatial_blocks.1.mlp.fc1.bias", "temporal_blocks.7.attn.proj.weight", "final_layer.linear.weight"):
        assert key in text


def test_truncated_file_names_the_file(tiny, tmp_path):
    path, config, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="cut.safetensors"):
        _load(cut, config)


def test_reference_loader_variants_are_accepted(tiny, tmp_path):
    """`module.` prefixes, stored pos_embed buffers and a shorter y_embedding load as the reference's loader does."""
    path, config, weights = tiny
    variant = {f"module.{k}": v for k, v in weights.items()}
    variant["module.pos_embed"] = np.zeros((1, 16, 64), np.float32)
    variant["module.y_embedder.y_embedding"] = weights["y_embedder.y_embedding"][:10]
    model = _load(_write(tmp_path, variant), config)
    y_emb = np.asarray(model.y_embedder.y_embedding[...])
    np.testing.assert_array_equal(y_emb[:10], weights["y_embedder.y_embedding"][:10])
    np.testing.assert_array_equal(y_emb[10:], np.repeat(weights["y_embedder.y_embedding"][9:10], 6, axis=0))


def test_pickle_is_refused_without_flag(tmp_path, tiny):
    _, config, _ = tiny
    path = tmp_path / "model.pt"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(Exception, match="allow.pickle"):
        _load(path, config)


def test_cli_converts_and_loader_reads_both_forms(tiny, tmp_path):
    path, config, _ = tiny
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "convert", "stdit3", str(path), str(out), "--config", str(config_file)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "converted" in again.stderr  # refuses to overwrite

    from_dir, stored_config = load_model("stdit3", out)
    from_file = _load(path, config)
    assert STDiT3Config.from_reference(stored_config) == STDiT3Config.from_reference(config)
    np.testing.assert_array_equal(from_dir.blocks.temporal.attn.qkv_kernel[...], from_file.blocks.temporal.attn.qkv_kernel[...])

    bf16 = tmp_path / "bf16"
    assert subprocess.run(cmd[:-3] + [str(bf16), "--config", str(config_file), "--dtype", "bfloat16"]).returncode == 0
    model, _ = load_model("stdit3", bf16, dtype=jnp.bfloat16)
    assert model.patch_kernel[...].dtype == jnp.bfloat16


def test_cli_help_lists_every_flag():
    done = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--dtype", "--config", "--allow-pickle", "--overwrite"):
        assert flag in done.stdout
