"""Conversion table: transformers CLIP text-tower checkpoints (PyTorch names, layouts) → opensora_jax CLIPTextModel.

Accepted sources: a `CLIPTextModel` checkpoint (keys `text_model.*` as transformers 4.x writes them, or without
the prefix as transformers 5 writes them) or a full `CLIPModel` checkpoint such as
openai/clip-vit-large-patch14, whose vision tower, projections and logit scale are consumed without use. The
`position_ids` buffer some files carry is ignored as well (positions are 0..L-1). Everything else must match:
every other source key is used and every parameter filled, and all problems are reported at once.

A transformers directory has config.json beside model.safetensors; a full CLIPConfig's `text_config` is used.
"""

from __future__ import annotations

import json
import pathlib

from convert.keymap import Rule, Table
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.models.clip import CLIPTextConfig, CLIPTextModel, preset

DESCRIPTION = "CLIP text tower (transformers CLIPTextModel or full CLIPModel, e.g. openai/clip-vit-large-patch14)"

# Source keys of a full CLIPModel (or CLIPTextModelWithProjection) that the text tower does not use.
IGNORED = (
    r"vision_model\..*",
    r"visual_projection\..*",
    r"text_projection\..*",
    r"logit_scale",
    r"embeddings\.position_ids",
)


def _config(config) -> CLIPTextConfig:
    return config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)


def table(config: dict | CLIPTextConfig) -> Table:
    """The key map for one architecture (heads and head_dim shape the attention kernels).

    torch `nn.Linear.weight` is [out, in]: q/k/v become (hidden, heads, head_dim) with biases (heads, head_dim),
    out_proj becomes (heads, head_dim, hidden), fc1/fc2 kernels (in, out). Layer i stacks on the "layers" axis.
    """
    cfg = _config(config)
    d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    blk = "encoder.layers.{i}"
    rules = [
        Rule("token_embedding", "embeddings.token_embedding.weight"),
        Rule("position_embedding", "embeddings.position_embedding.weight"),
        Rule("final_layer_norm/scale", "final_layer_norm.weight"),
        Rule("final_layer_norm/bias", "final_layer_norm.bias"),
        Rule("layers/attn/o_kernel", f"{blk}.self_attn.out_proj.weight", lambda w: w.T.reshape(h, k, d)),
        Rule("layers/attn/o_bias", f"{blk}.self_attn.out_proj.bias"),
    ]
    for name in ("q", "k", "v"):
        rules += [
            Rule(f"layers/attn/{name}_kernel", f"{blk}.self_attn.{name}_proj.weight", lambda w: w.T.reshape(d, h, k)),
            Rule(f"layers/attn/{name}_bias", f"{blk}.self_attn.{name}_proj.bias", lambda b: b.reshape(h, k)),
        ]
    for norm in ("layer_norm1", "layer_norm2"):
        rules += [
            Rule(f"layers/{norm}/scale", f"{blk}.{norm}.weight"),
            Rule(f"layers/{norm}/bias", f"{blk}.{norm}.bias"),
        ]
    for fc in ("fc1", "fc2"):
        rules += [
            Rule(f"layers/mlp/{fc}/kernel", f"{blk}.mlp.{fc}.weight", lambda w: w.T),
            Rule(f"layers/mlp/{fc}/bias", f"{blk}.mlp.{fc}.bias"),
        ]
    return Table(name="clip", rules=rules, strip_prefixes=("text_model.",), ignore=IGNORED)


def abstract_model(config: dict | CLIPTextConfig, dtype=None, compute_dtype=None) -> CLIPTextModel:
    """The text tower with abstract (shape-only) parameters of `dtype` (default: the config's, float32)."""
    return MODELS["clip"].abstract(_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


def config_from_source(path) -> dict:
    """The architecture as a `CLIPTextConfig.to_dict()`.

    Read from `config.json` in the checkpoint directory (or beside the file): a transformers CLIPTextConfig,
    a full CLIPConfig (its text_config) or a converted directory's stored config. Without one, the released
    CLIP ViT-L/14 text tower.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if not config_file.is_file():
        return preset("CLIP-ViT-L-14").to_dict()
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: not valid JSON: {e}") from None
    if isinstance(raw.get("config"), dict) and "format" in raw:  # a converted directory
        raw = raw["config"]
    try:
        return CLIPTextConfig.from_dict(raw).to_dict()
    except UserError as e:
        raise UserError(f"{config_file}: {e}") from None


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def after_save(src, out_dir) -> list[str]:
    """Copies the CLIP tokenizer files found beside the source weights into OUT_DIR/tokenizer/ (where
    `opensora_jax.text.opensora_v2_0.default_clip_tokenizer_dir` looks), so a converted directory is
    self-contained. Returns the copied file names."""
    from convert.checkpoint import copy_tokenizer_files

    return copy_tokenizer_files(src, out_dir, TOKENIZER_FILES)
