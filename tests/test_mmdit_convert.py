"""MMDiT checkpoint conversion: the released manifests without allocating, the Flux.1-dev layout (fused rows,
interleaved RoPE) giving the same model, architecture read off the keys, bad checkpoints, the CLI."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import mmdit as conv
from convert.checkpoint import variable_paths
from convert.keymap import ConversionError, plan
from convert.registry import load_model
from opensora_jax.errors import UserError


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    case = fixtures_dir / "opensora_v2_0" / "mmdit_tiny"
    meta = json.loads((case / "case.json").read_text())
    with np.load(case / "io.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return case / "weights.safetensors", meta["config"], load_file(case / "weights.safetensors"), arrays


def _forward(model, arrays):
    names = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond")
    return np.asarray(model(**{n: jnp.asarray(arrays[n]) for n in names}))


def _close(actual, expected, rel=1e-4):
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= rel, err


@pytest.mark.parametrize("manifest", ["OpenSora-v2-MMDiT-11B.json", "OpenSora-v2-MMDiT-11B-DC-AE.json"])
def test_released_manifests_map_both_ways_without_allocating(fixtures_dir, manifest):
    meta = json.loads((fixtures_dir / "manifests" / manifest).read_text())
    abstract = conv.abstract_model(meta["config"], jnp.bfloat16)  # nnx.eval_shape: nothing allocated
    targets = variable_paths(abstract)
    sources = {k: tuple(v["shape"]) for k, v in meta["keys"].items()}
    steps = plan(conv.table(meta["config"]), sources, targets)
    assert {s.target for s in steps} == set(targets)
    assert {src for s in steps for src in s.sources} == set(sources)
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == meta["num_elements"]


def _to_flux_layout(weights: dict, config: dict) -> dict:
    """The tiny Open-Sora weights rewritten as Flux.1-dev stores them: fused qkv / linear1 rows and interleaved
    RoPE pairs (q/k rows and q/k-norm scales permuted per head the other way)."""
    d, h = config["hidden_size"], config["num_heads"]
    hd = d // h
    inverse = np.argsort(conv.rope_permutation(hd))

    def rows(w):  # per-head permutation of the output rows of a q or k projection
        return w.reshape(h, hd, *w.shape[1:])[:, inverse].reshape(w.shape)

    out = {}
    for key, value in weights.items():
        if key.endswith(("query_norm.scale", "key_norm.scale")):
            out[key] = value[inverse]
        elif not any(p in key for p in ("_attn.q_proj", "_attn.k_proj", "_attn.v_proj", "single_blocks")) or \
                key.endswith(("linear2.weight", "linear2.bias", "modulation.lin.weight", "modulation.lin.bias")):
            out[key] = value
    for key in weights:
        for part in ("weight", "bias"):
            if key.endswith(f"_attn.q_proj.{part}"):
                stem = key[: -len(f"q_proj.{part}")]
                q, k, v = (weights[f"{stem}{n}_proj.{part}"] for n in "qkv")
                out[f"{stem}qkv.{part}"] = np.concatenate([rows(q), rows(k), v])
            elif key.startswith("single_blocks.") and key.endswith(f".q_proj.{part}"):
                stem = key[: -len(f"q_proj.{part}")]
                q, k, vm = (weights[f"{stem}{n}.{part}"] for n in ("q_proj", "k_proj", "v_mlp"))
                out[f"{stem}linear1.{part}"] = np.concatenate([rows(q), rows(k), vm])
    return out


def test_flux_layout_checkpoint_converts_to_the_same_model(tiny, tmp_path):
    path, config, weights, arrays = tiny
    flux = _to_flux_layout(weights, config)
    assert "double_blocks.0.img_attn.qkv.weight" in flux and "single_blocks.1.linear1.weight" in flux
    assert not any(k.endswith(("q_proj.weight", "v_mlp.weight")) for k in flux)
    save_file(flux, str(tmp_path / "flux.safetensors"))
    flux_config = {**config, "fused_qkv": True, "use_liger_rope": False}
    model, loaded = load_model("mmdit", tmp_path / "flux.safetensors", config=flux_config)
    assert model.cfg.use_liger_rope and not model.cfg.fused_qkv  # one forward: rotate-half
    assert loaded["use_liger_rope"] and not loaded["fused_qkv"]
    _close(_forward(model, arrays), arrays["out"])


def test_flux_manifest_layout_plans_fully(fixtures_dir):
    """The released key set rewritten to Flux.1-dev's names (fused rows, guidance_in, no cond_in) maps 100%."""
    meta = json.loads((fixtures_dir / "manifests" / "OpenSora-v2-MMDiT-11B.json").read_text())
    sources = {}
    for key, info in meta["keys"].items():
        shape = tuple(info["shape"])
        if key.startswith("cond_in."):
            continue
        if "_attn.k_proj" in key or "_attn.v_proj" in key or (key.startswith("single_blocks") and ".k_proj" in key):
            continue
        if "_attn.q_proj" in key:
            sources[key.replace("q_proj", "qkv")] = (3 * shape[0], *shape[1:])
        elif key.startswith("single_blocks") and (".q_proj" in key or ".v_mlp" in key):
            if ".q_proj" in key:
                sources[key.replace("q_proj", "linear1")] = (3 * 3072 + 12288, *shape[1:])
        else:
            sources[key] = shape
    sources.update({"guidance_in.in_layer.weight": (3072, 256), "guidance_in.in_layer.bias": (3072,),
                    "guidance_in.out_layer.weight": (3072, 3072), "guidance_in.out_layer.bias": (3072,)})
    config = conv._infer_from_keys(sources)
    assert config["fused_qkv"] and config["guidance_embed"] and not config["cond_embed"] and config["depth"] == 19
    targets = variable_paths(conv.abstract_model(config))
    steps = plan(conv.table(config), sources, targets)
    assert {s.target for s in steps} == set(targets)
    assert {src for s in steps for src in s.sources} == set(sources)


def test_architecture_read_off_the_keys(tiny, tmp_path):
    _, config, weights, _ = tiny
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="config.json"):  # head_dim 32 does not fit the released axes_dim
        conv.config_from_source(tmp_path / "w.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert conv.config_from_source(tmp_path / "w.safetensors") == conv._cfg(config).to_dict()
    inferred = conv._infer_from_keys({k: v.shape for k, v in weights.items()})
    for field in ("in_channels", "hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim",
                  "vec_in_dim", "patch_size", "cond_embed", "guidance_embed", "mlp_ratio"):
        assert inferred[field] == config[field], field


def test_missing_extra_and_misshaped_keys_are_all_named(tiny, tmp_path):
    _, config, weights, _ = tiny
    bad = dict(weights)
    del bad["single_blocks.1.v_mlp.bias"]
    bad["double_blocks.5.img_mlp.0.weight"] = np.zeros((256, 64), np.float32)
    bad["txt_in.weight"] = np.zeros((64, 41), np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as err:
        load_model("mmdit", tmp_path / "bad.safetensors", config=config)
    for key in ("single_blocks.1.v_mlp.bias", "double_blocks.5.img_mlp.0.weight", "txt_in.weight"):
        assert key in str(err.value)


def test_truncated_file_and_pickle_are_refused(tiny, tmp_path):
    path, config, _, _ = tiny
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="cut.safetensors"):
        load_model("mmdit", tmp_path / "cut.safetensors", config=config)
    (tmp_path / "w.pt").write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match="allow.pickle"):
        load_model("mmdit", tmp_path / "w.pt", config=config)


def test_cli_converts_flux_layout_and_records_the_converted_architecture(tiny, tmp_path):
    _, config, weights, arrays = tiny
    save_file(_to_flux_layout(weights, config), str(tmp_path / "flux.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "fused_qkv": True, "use_liger_rope": False}))
    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, "-m", "convert", "mmdit", str(tmp_path / "flux.safetensors"), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["use_liger_rope"] is True and saved["fused_qkv"] is False
    model, _ = load_model("mmdit", out)
    _close(_forward(model, arrays), arrays["out"])
