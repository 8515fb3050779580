"""Tiny random checkpoints of the three v1.2 models (and a tokenizer trained here) for end-to-end tests."""

from __future__ import annotations

import io
import pathlib

import numpy as np
from flax import nnx

from convert.checkpoint import save_converted

CORPUS = [
    "a red circle moving left on a black background", "a blue square moving up on a black background",
    "a green triangle moving right on a black background", "a yellow circle moving down on a black background",
    "aesthetic score", "motion score", "camera motion",
]
T5_CONFIG = dict(vocab_size=192, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="t5")
STDIT3_CONFIG = dict(depth=1, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=32)
VAE_CONFIG = {
    "micro_frame_size": 17, "micro_batch_size": 4,
    "vae_2d": {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
               "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 8, 8],
               "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4},
    "vae_temporal": {"in_out_channels": 4, "latent_embed_dim": 4, "embed_dim": 4, "filters": 8, "num_res_blocks": 1,
                     "channel_multipliers": [1, 1, 1, 1], "temporal_downsample": [False, True, True],
                     "num_groups": 4, "activation_fn": "swish"},
}


def write_clip_bpe(directory: pathlib.Path) -> pathlib.Path:
    """A tiny CLIP BPE tokenizer laid out like CLIP's (opensora_jax.tools.tiny_v2.write_clip_bpe)."""
    from opensora_jax.tools.tiny_v2 import write_clip_bpe as write

    return write(directory)


def write_spiece(directory: pathlib.Path) -> pathlib.Path:
    """A SentencePiece model trained on CORPUS (pad 0, eos 1, unk 2, as T5's) saved as directory/spiece.model."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(out.getvalue())
    return directory


def _save(module, out_dir: pathlib.Path, config: dict, name: str) -> pathlib.Path:
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module))}
    return save_converted(out_dir, flat, config=config, model=name)


def write_tiny_checkpoints(root: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
    """Converted directories {stdit3, vae, t5} under root; the tokenizer sits in t5/tokenizer."""
    from opensora_jax.models.stdit3 import STDiT3, STDiT3Config
    from opensora_jax.models.t5 import T5Config, T5Encoder
    from opensora_jax.models.vae.opensora_v1_2 import build

    stdit3 = STDiT3(STDiT3Config(**STDIT3_CONFIG), rngs=nnx.Rngs(seed))
    t5 = T5Encoder(T5Config.from_dict(T5_CONFIG), rngs=nnx.Rngs(seed + 1))
    vae = build(VAE_CONFIG, rngs=nnx.Rngs(seed + 2))
    paths = {
        "stdit3": _save(stdit3, root / "stdit3", STDiT3Config(**STDIT3_CONFIG).to_dict(), "stdit3"),
        "vae": _save(vae, root / "vae", VAE_CONFIG, "vae"),
        "t5": _save(t5, root / "t5", T5_CONFIG, "t5"),
    }
    write_spiece(paths["t5"] / "tokenizer")
    return paths


def random_vae_weights(config: dict, seed: int = 0):
    """(abstract OpenSoraVAE, flat float32 weights) for a VAE config, drawn in numpy (no per-shape init
    compiles): kernels N(0, 1/fan_in), GroupNorm scales around 1 and biases around 0 (so layout mistakes
    show), and the config's scale/shift."""
    from opensora_jax.models.vae import OpenSoraVAE, OpenSoraVAEConfig

    cfg = OpenSoraVAEConfig.from_dict(config)
    abstract = nnx.eval_shape(lambda: OpenSoraVAE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        name, shape = "/".join(map(str, path)), var.get_value().shape
        if name in ("scale", "shift"):
            flat[name] = np.asarray(getattr(cfg, name), np.float32)
        elif path[-1] == "kernel":
            flat[name] = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
        else:
            centre = 1.0 if path[-1] == "scale" else 0.0
            flat[name] = (centre + rng.normal(0, 0.1, shape)).astype(np.float32)
    return abstract, flat


# --- Open-Sora 2.0 -----------------------------------------------------------------------------------------

CLIP_CONFIG = dict(vocab_size=520, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                   pad_token_id=1, model_type="clip_text_model")
MMDIT_CONFIG = dict(in_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=32, mlp_ratio=2.0, num_heads=2,
                    depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True,
                    guidance_embed=False, cond_embed=True, fused_qkv=False, use_liger_rope=True, patch_size=2)
HUNYUAN_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                          block_out_channels=[8, 8, 8, 8], scale_factor=0.476986, shift_factor=0,
                          time_compression_ratio=4, spatial_compression_ratio=8, mid_block_add_attention=True,
                          sample_size=64, sample_tsize=64, use_spatial_tiling=True, use_temporal_tiling=False,
                          tile_overlap_factor=0.25)


def _random_init(name: str, config: dict, seed: int):
    """MODELS[name] with every variable drawn in numpy (no per-shape init compiles; no zero-initialised layers)."""
    from opensora_jax.families import MODELS

    module, rng = MODELS[name].abstract(config), np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module)):
        shape = var.get_value().shape
        if path[-1] in ("kernel", "embedding") and len(shape) > 1:
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif path[-1] in ("scale", "query_norm", "key_norm") or "norm" in str(path[-2] if len(path) > 1 else ""):
            value = 1.0 + rng.normal(0, 0.05, shape)
        else:
            value = rng.normal(0, 0.05, shape)
        var.set_value(np.asarray(value, np.float32))
    return module


def write_tiny_v2_checkpoints(root: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
    """Converted directories {mmdit, vae (Hunyuan), t5, clip} of tiny random Open-Sora 2.0 models, with the T5
    (spiece) and CLIP (BPE) tokenizers in t5/tokenizer and clip/tokenizer."""
    from opensora_jax.models.t5 import T5Config, T5Encoder

    t5 = T5Encoder(T5Config.from_dict(T5_CONFIG), rngs=nnx.Rngs(seed + 1))
    paths = {
        "mmdit": _save(_random_init("mmdit", MMDIT_CONFIG, seed), root / "mmdit", MMDIT_CONFIG, "mmdit"),
        "vae": _save(_random_init("hunyuan_vae", HUNYUAN_VAE_CONFIG, seed + 2), root / "vae", HUNYUAN_VAE_CONFIG,
                     "hunyuan_vae"),
        "t5": _save(t5, root / "t5", T5_CONFIG, "t5"),
        "clip": _save(_random_init("clip", CLIP_CONFIG, seed + 3), root / "clip", CLIP_CONFIG, "clip"),
    }
    write_spiece(paths["t5"] / "tokenizer")
    write_clip_bpe(paths["clip"] / "tokenizer")
    return paths
