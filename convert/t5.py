"""Conversion table: transformers T5 encoder checkpoints (PyTorch names and layouts) → opensora_jax T5Encoder.

Accepted sources: a `T5EncoderModel` or a full `T5ForConditionalGeneration` checkpoint (its decoder and
LM head are ignored, with one warning), as one .safetensors file, a sharded set with its index, or a
directory holding either. The token embedding is read from `shared.weight`, or from
`encoder.embed_tokens.weight` when `shared.weight` is absent (the two are the same tied tensor).

`load_params` is the entry point that handles all of that; `table(config)` alone works with the shared
engine (`convert.checkpoint.load_params`) for checkpoints that store `shared.weight`, which is what
transformers writes.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from convert.checkpoint import load_params as engine_load, open_params
from convert.keymap import ConversionError, Rule, Table
from opensora_jax.tensor_files import SourceReader, open_source
from opensora_jax.checkpoints import materialize
from opensora_jax.families import MODELS
from opensora_jax.models.t5 import T5Config, T5Encoder

DESCRIPTION = "T5 v1.1 text encoder (transformers T5EncoderModel or full T5 checkpoint, e.g. DeepFloyd/t5-v1_1-xxl)"

log = logging.getLogger(__name__)

EMBEDDING = "shared.weight"
ENCODER_EMBEDDING = "encoder.embed_tokens.weight"
_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_DECODER = (r"decoder\..*", r"lm_head\..*")


def _config(config) -> T5Config:
    return config if isinstance(config, T5Config) else T5Config.from_dict(config)


def table(config: dict | T5Config) -> Table:
    """The key map for one architecture (heads and d_kv shape the attention kernels).

    torch `nn.Linear.weight` is [out, in]; q/k/v become (d_model, heads, d_kv), o becomes
    (heads, d_kv, d_model), feed-forward kernels (in, out). Layer i's tensors stack on the "layers" axis.
    """
    cfg = _config(config)
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    blk = "encoder.block.{i}.layer"
    rules = [
        Rule("embedding", EMBEDDING),
        Rule("relative_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        Rule("layers/attn_norm/scale", f"{blk}.0.layer_norm.weight"),
        Rule("layers/attn/q", f"{blk}.0.SelfAttention.q.weight", lambda w: w.T.reshape(d, h, k)),
        Rule("layers/attn/k", f"{blk}.0.SelfAttention.k.weight", lambda w: w.T.reshape(d, h, k)),
        Rule("layers/attn/v", f"{blk}.0.SelfAttention.v.weight", lambda w: w.T.reshape(d, h, k)),
        Rule("layers/attn/o", f"{blk}.0.SelfAttention.o.weight", lambda w: w.T.reshape(h, k, d)),
        Rule("layers/mlp_norm/scale", f"{blk}.1.layer_norm.weight"),
        Rule("layers/mlp/wo/kernel", f"{blk}.1.DenseReluDense.wo.weight", lambda w: w.T),
        Rule("final_norm/scale", "encoder.final_layer_norm.weight"),
    ]
    names = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)
    rules += [Rule(f"layers/mlp/{n}/kernel", f"{blk}.1.DenseReluDense.{n}.weight", lambda w: w.T) for n in names]
    # The encoder's copy of the tied embedding, and a full T5's decoder, are consumed without use.
    return Table(name="t5", rules=rules, ignore=(re.escape(ENCODER_EMBEDDING), *_DECODER))


def abstract_model(config: dict | T5Config, dtype=None, compute_dtype=None) -> T5Encoder:
    """The encoder with abstract (shape-only) parameters of `dtype` (default float32); nothing is allocated."""
    return MODELS["t5"].abstract(_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


class T5Source(SourceReader):
    """A checkpoint reader seen as a T5 encoder checkpoint.

    Checks it is a T5 (block 0's query weight must be there), hides the decoder / LM head of a full T5
    (warning once), and exposes the token embedding as `shared.weight` only.
    """

    def __init__(self, inner: SourceReader):
        self.inner = inner
        self.path = inner.path
        keys = inner.keys()
        if _PROBE not in keys:
            inner.close()
            sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            raise ConversionError(
                [f"no tensor {_PROBE!r} (found {len(keys)} tensors: {sample})"],
                f"{self.path} is not a T5 encoder checkpoint",
            )
        decoder = [key for key in keys if any(re.fullmatch(p, key) for p in _DECODER)]
        if decoder:
            log.warning("%s: full T5 checkpoint; ignoring its %d decoder/lm_head tensors", self.path, len(decoder))
        self._alias = {}
        if EMBEDDING not in keys and ENCODER_EMBEDDING in keys:
            self._alias[EMBEDDING] = ENCODER_EMBEDDING
        elif EMBEDDING in keys and ENCODER_EMBEDDING in keys and inner.shape(EMBEDDING) != inner.shape(ENCODER_EMBEDDING):
            raise ConversionError(
                [f"{EMBEDDING} {inner.shape(EMBEDDING)} vs {ENCODER_EMBEDDING} {inner.shape(ENCODER_EMBEDDING)}"],
                f"{self.path}: tied embeddings differ in shape",
            )
        hidden = set(decoder) | {ENCODER_EMBEDDING}
        self._keys = [key for key in keys if key not in hidden] + list(self._alias)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self._alias.get(key, key))

    def dtype(self, key: str) -> np.dtype:
        return self.inner.dtype(self._alias.get(key, key))

    def get(self, key: str) -> np.ndarray:
        return self.inner.get(self._alias.get(key, key))

    def close(self) -> None:
        self.inner.close()


def open_t5_source(path, *, allow_pickle: bool = False) -> T5Source:
    """Opens a T5 checkpoint (file, sharded index or directory) lazily; see `T5Source`."""
    return T5Source(open_source(path, allow_pickle=allow_pickle))


# How the shared engine opens T5 reference weights (the converter CLI streams through it): see `T5Source`.
open_reference = open_t5_source


def load_params(path, config: dict | T5Config | None = None, *, dtype=None, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Flat {variable path: array} for a `T5Encoder` from a T5 checkpoint or a converted directory.

    `config` defaults to `config_from_source(path)`. Tensors are read one at a time from the file(s) into
    preallocated arrays of `dtype` (default float32): the result is the whole model in memory.
    """
    cfg = _config(config if config is not None else config_from_source(path, allow_pickle=allow_pickle))
    return engine_load(table(cfg), path, abstract_model(cfg, dtype), dtype=dtype, allow_pickle=allow_pickle,
                       opener=open_t5_source)


def load_model(path, config: dict | T5Config | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
               allow_pickle: bool = False, mesh=None) -> T5Encoder:
    """A ready `T5Encoder` with the weights at `path` (parameters stored in `param_dtype`, compute in `dtype`).

    Tensors are read (and, from reference weights, converted) one at a time; with a `mesh`, each is placed
    sharded (per its logical axes, e.g. embed on fsdp) as it loads.
    """
    cfg = _config(config if config is not None else config_from_source(path, allow_pickle=allow_pickle))
    with open_params(table(cfg), path, abstract_model(cfg, param_dtype), dtype=param_dtype,
                     allow_pickle=allow_pickle, opener=open_t5_source) as params:
        return materialize(abstract_model(cfg, param_dtype, dtype), params, mesh)


def config_from_source(path, *, allow_pickle: bool = False) -> dict:
    """The architecture as a transformers-style T5Config dict.

    Read from `config.json` in the checkpoint directory (or beside the file); a converted directory's
    stored config is used as is. Without a config.json, the sizes are inferred from the tensor shapes and
    the rest (max distance 128, eps 1e-6, tanh-GELU when gated, ReLU otherwise) is assumed, with a warning.
    Raises ValueError for a config that is not a T5's and for weights that are not a T5 encoder's.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"T5 checkpoint not found: {path}")
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON: {e}") from None
        if isinstance(raw.get("config"), dict) and "format" in raw:  # a converted directory
            raw = raw["config"]
        try:
            return T5Config.from_dict(raw).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_file}: {e}") from None
    with open_t5_source(path, allow_pickle=allow_pickle) as source:
        cfg = _infer_config(source)
    log.warning(
        "%s: no config.json; inferred %s from tensor shapes, assuming relative_attention_max_distance=128, "
        "layer_norm_epsilon=1e-6 and feed_forward_proj=%r", path,
        {k: cfg[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
        cfg["feed_forward_proj"],
    )
    return cfg


def _infer_config(source: T5Source) -> dict:
    keys = set(source.keys())
    prefix = "encoder.block.{}.layer"
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if EMBEDDING not in keys or bias_key not in keys:
        missing = [k for k in (EMBEDDING, bias_key) if k not in keys]
        raise ValueError(f"{source.path}: cannot infer the T5 config (no config.json, and no {missing})")
    vocab, d_model = source.shape(EMBEDDING)
    buckets, heads = source.shape(bias_key)
    layers = 0
    while f"{prefix.format(layers)}.0.SelfAttention.q.weight" in keys:
        layers += 1
    inner = source.shape(_PROBE)[0]
    gated = f"{prefix.format(0)}.1.DenseReluDense.wi_0.weight" in keys
    wi = f"{prefix.format(0)}.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"
    if wi not in keys or inner % heads:
        raise ValueError(f"{source.path}: cannot infer the T5 config (no {wi} or q rows {inner} not divisible by {heads} heads)")
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=source.shape(wi)[0], num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
    ).to_dict()


TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def after_save(src, out_dir) -> list[str]:
    """Copies the tokenizer files found beside the source weights into OUT_DIR/tokenizer/ (where sample.py
    looks by default), so a converted T5 directory is self-contained. Returns the copied file names."""
    from convert.checkpoint import copy_tokenizer_files

    return copy_tokenizer_files(src, out_dir, TOKENIZER_FILES)
