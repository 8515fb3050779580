"""T5 encoder: transformers' PyTorch T5EncoderModel as the oracle on random tiny configs, the public fixture,
structure (one scan, logical axis names) and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert.t5 import load_model  # noqa: E402
from opensora_jax.models.t5 import T5Config, abstract_encoder, preset, relative_position_buckets  # noqa: E402

# (name, config overrides, sequence length). Lengths above max_distance exercise the log-spaced buckets.
CONFIGS = [
    ("v1_1", dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, feed_forward_proj="gated-gelu"), 12),
    ("inner_ne_d_model", dict(d_model=24, d_kv=10, num_heads=3, d_ff=40, num_layers=3, feed_forward_proj="gated-gelu",
                              relative_attention_num_buckets=8, relative_attention_max_distance=10), 23),
    ("relu_v1_0", dict(d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=1, feed_forward_proj="relu",
                       relative_attention_num_buckets=16, relative_attention_max_distance=12), 20),
]


def torch_t5(overrides: dict, seed: int, vocab: int = 50):
    """A random transformers T5EncoderModel (norm weights randomised too, so they are checked)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=vocab, dropout_rate=0.0, layer_norm_epsilon=1e-6, **overrides)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_state(model, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def inputs(batch: int, length: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, length))
    lengths = [length] + list(rng.integers(1, length, size=batch - 1))
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name,overrides,length", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_transformers_float32(tmp_path, name, overrides, length):
    tm = torch_t5(overrides, seed=len(name))
    ids, mask = inputs(3, length, 50, seed=1)
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    cfg = T5Config.from_dict(tm.config.to_dict())
    model = load_model(save_state(tm, tmp_path / "model.safetensors"), cfg)
    hidden, states = model.encode_with_states(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert hidden.shape == (3, length, overrides["d_model"]) and hidden.dtype == jnp.float32
    assert rel_err(hidden, out.last_hidden_state.numpy()) < 1e-5
    # transformers' hidden_states: embeddings, then each block's output (the last one after the final norm).
    for i in range(cfg.num_layers):
        assert rel_err(states[i], out.hidden_states[i].numpy()) < 1e-5, f"hidden state {i}"
    np.testing.assert_allclose(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)), hidden, rtol=0, atol=1e-6)


def test_matches_transformers_bfloat16(tmp_path):
    overrides, length = CONFIGS[0][1], 16
    tm = torch_t5(overrides, seed=7)
    ids, mask = inputs(2, length, 50, seed=2)
    with torch.no_grad():
        ref32 = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        ref16 = tm.to(torch.bfloat16)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        ref16 = ref16.last_hidden_state.float().numpy()
    path = save_state(tm.float(), tmp_path / "model.safetensors")
    model = load_model(path, T5Config.from_dict(tm.config.to_dict()), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.layers.attn.q[...].dtype == jnp.bfloat16
    out = model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref16) < 3e-2
    assert rel_err(out, ref32) < 3e-2


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (8, 10), (16, 12), (6, 7), (64, 1000)]:
        ours = relative_position_buckets(300, 300, buckets, distance)
        rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
        ref = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"buckets={buckets} max_distance={distance}")


def test_public_fixture_passes(fixtures_dir):
    from opensora_jax.tools.parity.core import load_case, relative_error, run_case
    from opensora_jax.tools.parity.t5 import run

    case_dir = fixtures_dir / "opensora_v1_2" / "t5_tiny"
    result = run_case(case_dir)
    assert result.passed, result.line()
    case = load_case(case_dir)
    produced = run(case)
    for name in case.roles("intermediate"):
        assert name in produced, name
        assert relative_error(produced[name], case[name]) <= case.tol, name


def test_layer_stack_is_one_scan_with_logical_axes():
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=5)
    model = abstract_encoder(cfg)  # shapes only: tracing needs no values
    graphdef, state = nnx.split(model)

    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    jaxpr = jax.make_jaxpr(fwd)(state, jnp.zeros((1, 6), jnp.int32))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 5
    axes = {"/".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert axes["embedding"] == ("vocab", "embed")
    assert axes["relative_bias"] == (None, "heads")
    assert axes["layers/attn/q"] == ("layers", "embed", "heads", "kv")
    assert axes["layers/attn/o"] == ("layers", "heads", "kv", "embed")
    assert axes["layers/mlp/wi_0/kernel"] == ("layers", "embed", "mlp")
    assert axes["layers/mlp/wo/kernel"] == ("layers", "mlp", "embed")
    assert axes["layers/attn_norm/scale"] == ("layers", "embed")
    assert axes["final_norm/scale"] == ("embed",)


def test_xxl_preset_abstract():
    cfg = preset("t5-v1_1-xxl")
    model = abstract_encoder(cfg, param_dtype=jnp.bfloat16)
    assert model.layers.attn.q.shape == (24, 4096, 64, 64)
    assert model.layers.mlp.wi_0.kernel.shape == (24, 4096, 10240)
    assert model.embedding.dtype == jnp.bfloat16
    assert isinstance(model.embedding.get_value(), jax.ShapeDtypeStruct)


def test_config_from_dict_and_errors():
    cfg = T5Config.from_dict({"model_type": "t5", "feed_forward_proj": "gated-gelu", "d_model": 8})
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.d_model == 8
    assert T5Config.from_dict({}).feed_forward_proj == "relu"  # transformers' default
    with pytest.raises(ValueError, match="not a T5 config"):
        T5Config.from_dict({"model_type": "bert"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="fancy-gelu")
    with pytest.raises(ValueError, match="activation"):
        T5Config(feed_forward_proj="gated-nope")


def test_bad_inputs():
    model = abstract_encoder(T5Config(vocab_size=20, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_layers=1))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="mask shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5)))
