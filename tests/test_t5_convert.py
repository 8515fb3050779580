"""T5 checkpoint conversion: XXL manifest (shapes only), single/sharded files, embedding aliases, full T5
checkpoints, converted directories, config discovery and clear errors."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from convert import t5 as ct5  # noqa: E402
from convert.checkpoint import load_params as engine_load_params  # noqa: E402
from convert.checkpoint import save_converted, variable_paths  # noqa: E402
from convert.keymap import ConversionError, plan  # noqa: E402
from opensora_jax.models.t5 import T5Config  # noqa: E402

TINY = dict(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2, feed_forward_proj="gated-gelu",
            dropout_rate=0.0)


def tiny_state(full: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """(state dict with cloned tensors, config.json dict) of a random tiny T5 encoder (or full T5)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**TINY)
    cls = transformers.T5ForConditionalGeneration if full else transformers.T5EncoderModel
    model = cls(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, cfg.to_dict()


def write(tmp_path, state: dict, config: dict | None, name="model.safetensors"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp_path / name))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / name


def expected_flat(state: dict) -> dict:
    """What the converter must produce, written out independently of the table."""
    d, h, k, n = TINY["d_model"], TINY["num_heads"], TINY["d_kv"], TINY["num_layers"]
    g = lambda key: state[key].numpy()  # noqa: E731
    blk = "encoder.block.{}.layer"
    stack = lambda fmt, f: np.stack([f(g(fmt.format(i))) for i in range(n)])  # noqa: E731
    return {
        "embedding": g("shared.weight"),
        "relative_bias": g("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        "final_norm/scale": g("encoder.final_layer_norm.weight"),
        "layers/attn_norm/scale": stack(blk + ".0.layer_norm.weight", lambda w: w),
        "layers/mlp_norm/scale": stack(blk + ".1.layer_norm.weight", lambda w: w),
        "layers/attn/q": stack(blk + ".0.SelfAttention.q.weight", lambda w: w.T.reshape(d, h, k)),
        "layers/attn/k": stack(blk + ".0.SelfAttention.k.weight", lambda w: w.T.reshape(d, h, k)),
        "layers/attn/v": stack(blk + ".0.SelfAttention.v.weight", lambda w: w.T.reshape(d, h, k)),
        "layers/attn/o": stack(blk + ".0.SelfAttention.o.weight", lambda w: w.T.reshape(h, k, d)),
        "layers/mlp/wi_0/kernel": stack(blk + ".1.DenseReluDense.wi_0.weight", lambda w: w.T),
        "layers/mlp/wi_1/kernel": stack(blk + ".1.DenseReluDense.wi_1.weight", lambda w: w.T),
        "layers/mlp/wo/kernel": stack(blk + ".1.DenseReluDense.wo.weight", lambda w: w.T),
    }


def assert_same(flat: dict, want: dict):
    assert sorted(flat) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(flat[key], np.float32), want[key], err_msg=key)


def test_xxl_manifest_plans_without_allocating(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / "T5-v1_1-XXL-encoder.json").read_text())
    cfg = T5Config.from_dict(manifest["config"])
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (4096, 64, 64, 10240, 24)
    abstract = ct5.abstract_model(manifest["config"], jnp.bfloat16)
    targets = variable_paths(abstract)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in targets.values())
    sources = {key: tuple(info["shape"]) for key, info in manifest["keys"].items()}
    steps = plan(ct5.table(manifest["config"]), sources, targets)
    assert {s.target for s in steps} == set(targets)
    # Every tensor but the encoder's alias of the tied embedding is used once.
    used = sum(int(np.prod(sources[k])) for s in steps for k in s.sources)
    assert used == manifest["num_elements"] - int(np.prod(sources["encoder.embed_tokens.weight"]))
    assert sum(int(np.prod(t.shape)) for t in targets.values()) == used


def test_single_file_and_generic_engine(tmp_path):
    state, config = tiny_state()
    path = write(tmp_path, state, config)
    want = expected_flat(state)
    assert_same(ct5.load_params(path), want)
    cfg = ct5.config_from_source(path)
    flat = engine_load_params(ct5.table(cfg), path, ct5.abstract_model(cfg))
    assert_same(flat, want)


def test_sharded_checkpoint(tmp_path):
    state, config = tiny_state(seed=1)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / name))
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    want = expected_flat(state)
    assert_same(ct5.load_params(tmp_path), want)
    assert_same(ct5.load_params(tmp_path / "model.safetensors.index.json"), want)


def test_embedding_from_either_key(tmp_path):
    state, config = tiny_state(seed=2)
    want = expected_flat(state)
    only_encoder = {k: v for k, v in state.items() if k != "shared.weight"}
    assert_same(ct5.load_params(write(tmp_path / "a", only_encoder, config)), want)
    only_shared = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    assert_same(ct5.load_params(write(tmp_path / "b", only_shared, config)), want)


def test_full_t5_checkpoint_loads_encoder_and_warns_once(tmp_path, caplog):
    state, config = tiny_state(full=True, seed=3)
    assert any(k.startswith("decoder.") for k in state)
    path = write(tmp_path, state, config)
    with caplog.at_level(logging.WARNING, logger="convert.t5"):
        flat = ct5.load_params(path)
    assert_same(flat, expected_flat(state))
    warnings = [r for r in caplog.records if "decoder" in r.getMessage()]
    assert len(warnings) == 1


def test_converted_dir_round_trip_and_bf16(tmp_path):
    state, config = tiny_state(seed=4)
    path = write(tmp_path / "src", state, config)
    cfg = ct5.config_from_source(path)
    flat = ct5.load_params(path, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in flat.values())
    out = save_converted(tmp_path / "converted", ct5.load_params(path), config=cfg, model="t5")
    assert ct5.config_from_source(out) == cfg
    assert_same(ct5.load_params(out), expected_flat(state))
    model = ct5.load_model(out)
    assert model.layers.attn.q.shape == (2, 16, 2, 4)


def test_config_inferred_without_config_json(tmp_path, caplog):
    state, config = tiny_state(seed=5)
    path = write(tmp_path, state, None)
    with caplog.at_level(logging.WARNING, logger="convert.t5"):
        cfg = ct5.config_from_source(path)
    assert "no config.json" in caplog.text
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj"):
        assert cfg[key] == config[key], key


def test_not_a_t5_checkpoint(tmp_path):
    path = write(tmp_path, {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, None)
    with pytest.raises(ConversionError, match="not a T5 encoder checkpoint"):
        ct5.load_params(path, T5Config(**{k: v for k, v in TINY.items() if k != "dropout_rate"}))
    with pytest.raises(ConversionError, match="not a T5 encoder checkpoint"):
        ct5.config_from_source(path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a T5 config"):
        ct5.config_from_source(path)


def test_wrong_architecture_lists_problems(tmp_path):
    state, config = tiny_state(seed=6)
    path = write(tmp_path, state, config)
    wrong = dict(config, num_heads=4, d_kv=2, num_layers=3)
    with pytest.raises(ConversionError) as info:
        ct5.load_params(path, wrong)
    text = str(info.value)
    assert "encoder.block.2.layer.0.SelfAttention.q.weight" in text  # missing layer
    assert "relative_attention_bias" in text  # (buckets, 2 heads) vs 4 heads


def test_cli_api_present():
    assert isinstance(ct5.DESCRIPTION, str) and ct5.DESCRIPTION
    for name in ("table", "abstract_model", "config_from_source"):
        assert callable(getattr(ct5, name))


def test_cli_copies_the_tokenizer_into_the_converted_directory(fixtures_dir, tmp_path):
    """python -m convert t5 keeps the tokenizer beside the weights, where sample.py looks by default."""
    import shutil
    import subprocess
    import sys

    from opensora_jax.text.tokenizer import default_tokenizer_dir
    from opensora_jax.text.tokenizer import load_tokenizer
    from tests.tiny import write_spiece

    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "opensora_v1_2" / "t5_tiny", src)
    write_spiece(src)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "convert", "t5", str(src), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert default_tokenizer_dir(out) == out / "tokenizer"
    assert load_tokenizer(out / "tokenizer")("a red circle")["input_ids"][-1] == 1  # ends with </s>
