"""CLIP text tower (Open-Sora 2.0's second text encoder): fixture parity, transformers' first-EOS pooling path on
random weights, empty prompts, bf16, the CLIP-L manifest, full CLIPModel files, strict conversion errors, the
converter CLI, and the 2.0 text conditioner (T5 unmasked at 512 tokens + CLIP pooled, null = encode(""))."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import clip as cc  # noqa: E402
from convert.checkpoint import variable_paths  # noqa: E402
from convert.keymap import ConversionError, plan  # noqa: E402
from convert.registry import load_model  # noqa: E402
from opensora_jax.errors import UserError  # noqa: E402
from opensora_jax.families import MODELS  # noqa: E402
from opensora_jax.models.clip import PRESETS, CLIPTextConfig  # noqa: E402
from tests.tiny import write_clip_bpe  # noqa: E402


def rel_err(ours, want) -> float:
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    assert ours.shape == want.shape
    return float(np.max(np.abs(ours - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def case_dir(fixtures_dir) -> pathlib.Path:
    return fixtures_dir / "opensora_v2_0" / "clip_text_tiny"


@pytest.fixture(scope="module")
def case(case_dir):
    from opensora_jax.tools.parity.core import load_case

    return load_case(case_dir)


@pytest.fixture(scope="module")
def tiny_model(case):
    model, _ = load_model("clip", case.weights_path, config=CLIPTextConfig.from_dict(case.config).to_dict())
    return model


def torch_clip(config: dict, state: dict | None = None):
    """transformers' CLIPTextModel (eager attention), with `state` (keys with or without "text_model.") if given."""
    cfg = transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "layer_norm_eps", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")})
    cfg._attn_implementation = "eager"
    model = transformers.CLIPTextModel(cfg).eval()
    if state is not None:
        own = model.state_dict()
        strip = {k.removeprefix("text_model."): torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        missing = [k for k in own if k not in strip and not k.endswith("position_ids")]
        assert not missing, missing
        model.load_state_dict({k: strip[k] for k in own if k in strip}, strict=False)
    return model


# --- parity -----------------------------------------------------------------------------------------------


def test_fixture_parity_outputs_and_intermediates(case, tiny_model):
    with jax.default_matmul_precision("highest"):
        out = tiny_model(case["input_ids"].astype(np.int32), return_hidden_states=True)
    assert rel_err(out["pooler_output"], case["pooler_output"]) <= case.tol
    assert rel_err(out["last_hidden_state"], case["last_hidden_state"]) <= case.tol
    names = case.roles("intermediate")
    assert len(names) == len(out["hidden_states"]) == tiny_model.config.num_hidden_layers + 1
    for n, state in enumerate(out["hidden_states"]):
        assert rel_err(state, case[f"intermediate/hidden_state_{n}"]) <= case.tol, n
    # The legacy eos_token_id == 2 pools at argmax(ids): id 2 itself occurs mid-row and must not be picked.
    ids = case["input_ids"]
    assert (ids == 2).any() and tiny_model.config.eos_token_id == 2
    np.testing.assert_array_equal(np.asarray(tiny_model.pooled_positions(jnp.asarray(ids))), ids.argmax(-1))


def test_parity_handler_passes(case_dir):
    from opensora_jax.tools.parity.core import run_case

    with jax.default_matmul_precision("highest"):
        result = run_case(case_dir)
    assert result.passed, result.line()
    assert set(result.errors) == {"pooler_output", "last_hidden_state", "intermediate/hidden_state_0",
                                  "intermediate/hidden_state_1", "intermediate/hidden_state_2"}


def test_empty_prompt_row_matches_transformers(case, tiny_model):
    """ids = [bos, eot, eot...] (the encoding of ""): pooled at position 1; also a short row padded with eot."""
    bos, eot, length = 97, 98, 77
    ids = np.full((2, length), eot, np.int64)
    ids[:, 0] = bos
    ids[1, 1:4] = [5, 17, 2]
    ids[1, 4] = eot
    with jax.default_matmul_precision("highest"):
        out = tiny_model(ids.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(out["pooler_output"][0]), np.asarray(out["last_hidden_state"][0, 1]))
    np.testing.assert_array_equal(np.asarray(out["pooler_output"][1]), np.asarray(out["last_hidden_state"][1, 4]))
    ref = torch_clip(case.config, load_file(str(case.weights_path)))
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids))
    assert rel_err(out["pooler_output"], want.pooler_output.numpy()) <= 1e-5
    assert rel_err(out["last_hidden_state"], want.last_hidden_state.numpy()) <= 1e-5


SMALL = dict(vocab_size=60, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
             max_position_embeddings=16, layer_norm_eps=1e-5, hidden_act="gelu", bos_token_id=58, eos_token_id=7,
             pad_token_id=1)


def random_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A random transformers CLIPTextModel state dict (numpy, "text_model." keys as transformers 4.x writes),
    with LayerNorms and biases away from their constant init."""
    torch.manual_seed(seed)
    model = torch_clip(config)
    gen = np.random.default_rng(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        array = value.numpy().copy()
        if key.endswith("bias") or "layer_norm" in key:
            array = array + gen.normal(0, 0.1, array.shape).astype(np.float32)
        state[f"text_model.{key}"] = array
    return state


def test_first_eos_pooling_and_padding_mask_match_transformers(tmp_path):
    """eos_token_id != 2: the FIRST position holding eos (not argmax), with and without a padding mask."""
    state = random_state(SMALL)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "clip_text_model", "projection_dim": 8}))
    model, config = load_model("clip", tmp_path)
    assert config["eos_token_id"] == 7 and model.config.hidden_act == "gelu"
    eos, length = SMALL["eos_token_id"], SMALL["max_position_embeddings"]
    ids = np.full((4, length), 1, np.int64)  # pad id 1
    ids[:, 0] = 58
    ids[0, 1:6] = [40, 41, 59, eos, 30]  # eos then more tokens; 59 is the largest id (argmax would pick it)
    ids[0, 9] = eos  # a second eos: the first one counts
    ids[1, 1] = eos  # the empty prompt
    ids[2, 1:length] = np.arange(10, 10 + length - 1) % 57 + 2  # no eos at all: position 0, as transformers
    ids[2, ids[2] == eos] = 8
    ids[3, 1:4] = [20, 21, eos]
    mask = (np.arange(length)[None] <= np.array([9, 1, length - 1, 3])[:, None]).astype(np.int64)
    ref = torch_clip(SMALL, state)
    with jax.default_matmul_precision("highest"):
        out = model(ids.astype(np.int32))
        masked = model(ids.astype(np.int32), mask)
    np.testing.assert_array_equal(np.asarray(model.pooled_positions(jnp.asarray(ids))), [4, 1, 0, 3])
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids))
        want_masked = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    assert rel_err(out["pooler_output"], want.pooler_output.numpy()) <= 1e-5
    assert rel_err(out["last_hidden_state"], want.last_hidden_state.numpy()) <= 1e-5
    assert rel_err(masked["pooler_output"], want_masked.pooler_output.numpy()) <= 1e-5
    assert rel_err(masked["last_hidden_state"], want_masked.last_hidden_state.numpy()) <= 1e-5
    # The padding mask matters where pads are attended (row 0, positions after the mask) ...
    padded_row = np.asarray(masked["last_hidden_state"][0]), np.asarray(out["last_hidden_state"][0])
    assert np.abs(padded_row[0][12] - padded_row[1][12]).max() > 1e-4
    # ... and, with right padding under the causal mask, not before it.
    np.testing.assert_allclose(np.asarray(masked["last_hidden_state"][0, :10]),
                               np.asarray(out["last_hidden_state"][0, :10]), rtol=1e-5, atol=1e-6)

    # transformers 5 writes a CLIPTextModel without the "text_model." prefix: same parameters.
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, str(bare / "model.safetensors"))
    shutil.copy(tmp_path / "config.json", bare / "config.json")
    again, _ = load_model("clip", bare)
    np.testing.assert_array_equal(np.asarray(again.layers.attn.q_kernel[...]),
                                  np.asarray(model.layers.attn.q_kernel[...]))


def test_bf16_smoke(case, tiny_model):
    model, _ = load_model("clip", case.weights_path, config=CLIPTextConfig.from_dict(case.config).to_dict(),
                          dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert model.layers.attn.q_kernel[...].dtype == jnp.bfloat16
    ids = case["input_ids"].astype(np.int32)
    out = model(ids)
    assert out["pooler_output"].dtype == out["last_hidden_state"].dtype == jnp.bfloat16
    pooled = np.asarray(out["pooler_output"], np.float32)
    assert np.isfinite(pooled).all()
    assert rel_err(pooled, case["pooler_output"]) < 5e-2


# --- config -------------------------------------------------------------------------------------------------


def test_config_from_text_full_and_own_dicts(case):
    cfg = CLIPTextConfig.from_dict(case.config)  # a transformers dict with every generic PretrainedConfig key
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.eos_token_id) == (32, 4, 8, 2)
    assert CLIPTextConfig.from_dict(cfg.to_dict()) == cfg
    full = {"model_type": "clip", "projection_dim": 32, "logit_scale_init_value": 2.6592,
            "text_config": case.config, "vision_config": {"hidden_size": 64, "patch_size": 14}}
    assert CLIPTextConfig.from_dict(full) == cfg
    assert CLIPTextConfig.from_dict({"model_type": "clip_text_model"}).hidden_size == 512  # transformers' default
    with pytest.raises(UserError, match="model_type"):
        CLIPTextConfig.from_dict({"model_type": "t5"})
    with pytest.raises(UserError, match="divisible"):
        CLIPTextConfig.from_dict({**case.config, "num_attention_heads": 5})
    with pytest.raises(UserError, match="hidden_act"):
        CLIPTextConfig.from_dict({**case.config, "hidden_act": "mish"})
    built = MODELS["clip"].abstract(case.config, param_dtype=jnp.bfloat16)
    assert built.token_embedding.get_value().dtype == jnp.bfloat16


# --- conversion ---------------------------------------------------------------------------------------------


def test_clip_l_manifest_maps_fully_both_ways(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / "CLIP-ViT-L-14-text.json").read_text())
    cfg = CLIPTextConfig.from_dict(manifest["config"])
    assert cfg == PRESETS["CLIP-ViT-L-14"]
    abstract = cc.abstract_model(manifest["config"], jnp.bfloat16)
    targets = variable_paths(abstract)
    assert all(isinstance(v, jax.ShapeDtypeStruct) and v.dtype == jnp.bfloat16 for v in targets.values())
    sources = {key: tuple(info["shape"]) for key, info in manifest["keys"].items()}
    steps = plan(cc.table(cfg), sources, targets)
    assert {s.target for s in steps} == set(targets)
    assert {k for s in steps for k in s.sources} == set(sources)  # every key used, none twice
    used = sum(int(np.prod(sources[k])) for s in steps for k in s.sources)
    assert used == manifest["num_elements"] == sum(int(np.prod(t.shape)) for t in targets.values())
    assert targets["layers/attn/q_kernel"].shape == (12, 768, 12, 64)


def full_clipmodel_dir(case, directory: pathlib.Path) -> pathlib.Path:
    """The fixture's text tower inside a full CLIPModel-style file (vision tower, projections, logit scale and
    position_ids buffers beside it) with a CLIPConfig config.json."""
    state = load_file(str(case.weights_path))
    gen = np.random.default_rng(0)
    extra = {
        "vision_model.embeddings.class_embedding": (16,),
        "vision_model.embeddings.patch_embedding.weight": (16, 3, 4, 4),
        "vision_model.embeddings.position_ids": (1, 5), "vision_model.encoder.layers.0.mlp.fc1.weight": (32, 16),
        "vision_model.post_layernorm.weight": (16,), "visual_projection.weight": (32, 16),
        "text_projection.weight": (32, 32), "logit_scale": (), "text_model.embeddings.position_ids": (1, 77),
    }
    for key, shape in extra.items():
        buffer = "position_ids" in key
        state[key] = np.zeros(shape, np.int64) if buffer else gen.normal(size=shape).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    config = {"model_type": "clip", "projection_dim": 32, "text_config": case.config,
              "vision_config": {"hidden_size": 16, "patch_size": 4, "model_type": "clip_vision_model"}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_full_clipmodel_checkpoint_converts_ignoring_vision(case, tiny_model, tmp_path):
    src = full_clipmodel_dir(case, tmp_path / "clip")
    assert cc.config_from_source(src) == CLIPTextConfig.from_dict(case.config).to_dict()
    model, _ = load_model("clip", src)
    ids = case["input_ids"].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)["pooler_output"]), np.asarray(tiny_model(ids)["pooler_output"]))


def test_bad_checkpoints_name_every_problem(case, tmp_path):
    state = load_file(str(case.weights_path))
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]  # missing
    state["text_model.encoder.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)  # extra
    state["text_model.encoder.layers.2.layer_norm1.weight"] = np.zeros((32,), np.float32)  # a layer too many
    state["text_model.final_layer_norm.weight"] = np.zeros((33,), np.float32)  # mis-shaped
    state["text_model.encoder.layers.0.mlp.fc1.weight"] = state["text_model.encoder.layers.0.mlp.fc1.weight"].T.copy()
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(case.path / "config.json", tmp_path / "config.json")
    with pytest.raises(ConversionError) as info:
        load_model("clip", tmp_path)
    text = str(info.value)
    for name in ("encoder.layers.1.mlp.fc2.bias", "text_model.encoder.layers.0.self_attn.extra.weight",
                 "text_model.encoder.layers.2.layer_norm1.weight", "text_model.final_layer_norm.weight",
                 "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert name in text, name
    assert len(info.value.problems) == 5
    # A config whose width does not match the weights: shape problems, not a crash.
    wrong = {**case.config, "hidden_size": 64}
    with pytest.raises(ConversionError, match="shape mismatch"):
        load_model("clip", case.weights_path, config=wrong)


def test_converter_cli(case, tiny_model, tmp_path):
    from opensora_jax import checkpoints
    from opensora_jax.text.opensora_v2_0 import default_clip_tokenizer_dir, load_clip_tokenizer

    src = full_clipmodel_dir(case, tmp_path / "src")
    write_clip_bpe(src)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "convert", "clip", str(src), str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "converted 20 arrays" in done.stdout
    model, config = checkpoints.load_model("clip", out)
    assert CLIPTextConfig.from_dict(config) == CLIPTextConfig.from_dict(case.config)
    ids = case["input_ids"].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)["pooler_output"]), np.asarray(tiny_model(ids)["pooler_output"]))
    assert default_clip_tokenizer_dir(out) == out / "tokenizer"
    assert load_clip_tokenizer(out / "tokenizer")("a cat")["input_ids"] == [516, 320, 513, 517]


# --- the Open-Sora 2.0 text conditioner -------------------------------------------------------------------


T5_CORPUS = ["a cat sitting on a mat", "a dog running in the park", "aerial view of a city at night"]


def write_small_spiece(directory: pathlib.Path) -> pathlib.Path:
    """A word-level SentencePiece model (T5's pad 0, eos 1, unk 2) small enough that, with the tokenizer's 100
    sentinel ids, it fits the t5_tiny fixture's 128-token embedding."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 20), model_writer=out, vocab_size=24, model_type="word", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(out.getvalue())
    return directory


CLIP_SMALL = dict(vocab_size=520, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  model_type="clip_text_model")


@pytest.fixture(scope="module")
def conditioner_parts(fixtures_dir, tmp_path_factory):
    """(t5 weights file, clip transformers directory with its tokenizer, t5 tokenizer directory)."""
    root = tmp_path_factory.mktemp("conditioner")
    clip_dir = write_clip_bpe(root / "clip")
    save_file(random_state(CLIP_SMALL, seed=3), str(clip_dir / "model.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps(CLIP_SMALL))
    t5 = fixtures_dir / "opensora_v1_2" / "t5_tiny" / "weights.safetensors"
    return t5, clip_dir, write_small_spiece(root / "spiece")


@pytest.fixture(scope="module")
def conditioner(conditioner_parts):
    from opensora_jax.text.opensora_v2_0 import TextConditioner

    t5, clip_dir, spiece = conditioner_parts
    return TextConditioner.from_pretrained(t5, clip_dir, t5_tokenizer=spiece, load=load_model)


def test_conditioner_t5_unmasked_512_and_clip_pooled(conditioner, conditioner_parts):
    t5_path = conditioner_parts[0]
    prompts = ["a cat sitting on a mat", "a dog"]
    with jax.default_matmul_precision("highest"):
        txt, vec = conditioner.encode(prompts)
    assert txt.shape == (2, 512, 64) and vec.shape == (2, 32)
    assert (conditioner.txt_dim, conditioner.vec_dim) == (64, 32)
    t5_ids, clip_ids = conditioner.tokenize(prompts)
    assert t5_ids.shape == (2, 512) and clip_ids.shape == (2, 77)
    assert (t5_ids[:, 8:] == 0).all() and clip_ids[1, :4].tolist() == [516, 320, 515, 517]
    assert (clip_ids[1, 3:] == 517).all()  # padded with the end-of-text id

    # T5: transformers' T5EncoderModel called with attention_mask=None (pads attended), not the masked run,
    # whose real tokens differ because they no longer see the pads.
    config = json.loads((t5_path.parent / "config.json").read_text())
    ref = transformers.T5EncoderModel(transformers.T5Config(**config)).eval()
    ref.load_state_dict({k: torch.as_tensor(v) for k, v in load_file(str(t5_path)).items()}, strict=False)
    t5_mask = (t5_ids != 0).astype(np.int64)
    with torch.no_grad():
        unmasked = ref(input_ids=torch.as_tensor(t5_ids.astype(np.int64))).last_hidden_state.numpy()
        masked = ref(input_ids=torch.as_tensor(t5_ids.astype(np.int64)),
                     attention_mask=torch.as_tensor(t5_mask)).last_hidden_state.numpy()
    assert rel_err(txt, unmasked) <= 1e-5
    assert np.abs(masked[:, :3] - unmasked[:, :3]).max() > 1e-3 * np.abs(unmasked).max()
    assert rel_err(txt[:, :3], masked[:, :3]) > 1e-3

    # CLIP: the pooled output of the 77-token ids, at the first end-of-text (argmax: eos_token_id is 2).
    with jax.default_matmul_precision("highest"):
        full = conditioner.clip(jnp.asarray(clip_ids))
    np.testing.assert_allclose(np.asarray(vec), np.asarray(full["pooler_output"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vec[1]), np.asarray(full["last_hidden_state"][1, 3]), rtol=1e-5, atol=1e-6)


def test_conditioner_null_is_the_empty_prompt(conditioner):
    txt0, vec0 = conditioner.encode([""])
    txt, vec = conditioner.null(3)
    assert txt.shape == (3, 512, 64) and vec.shape == (3, 32)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(txt[i]), np.asarray(txt0[0]))
        np.testing.assert_array_equal(np.asarray(vec[i]), np.asarray(vec0[0]))
    assert np.abs(np.asarray(vec)).max() > 0 and np.abs(np.asarray(txt)).max() > 0  # not zeros
    t5_ids, clip_ids = conditioner.tokenize("")
    assert t5_ids[0, 0] == 1 and (t5_ids[0, 1:] == 0).all()  # "" is just </s>, then pads
    assert clip_ids[0, :2].tolist() == [516, 517]


def test_conditioner_lengths_are_configurable(conditioner):
    from opensora_jax.text.opensora_v2_0 import TextConditioner
    from opensora_jax.text.tokenizer import TruncationWarning

    short = TextConditioner(conditioner.t5_tokenizer, conditioner.t5, conditioner.clip_tokenizer, conditioner.clip,
                            t5_max_length=16, clip_max_length=8)
    txt, vec = short.encode(["a cat", "a dog"])
    assert txt.shape == (2, 16, 64) and vec.shape == (2, 32)
    with pytest.warns(TruncationWarning, match="prompt 1"):
        t5_ids, clip_ids = short.tokenize(["a cat", " ".join(["a cat sitting on a mat"] * 4)])
    assert t5_ids[1, -1] == 1 and clip_ids[1, -1] == 517  # cut, still ending with </s> / <|endoftext|>
    with pytest.raises(UserError, match="clip_max_length"):
        TextConditioner(conditioner.t5_tokenizer, conditioner.t5, conditioner.clip_tokenizer, conditioner.clip,
                        clip_max_length=78)
