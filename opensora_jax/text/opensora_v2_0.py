"""Open-Sora 2.0 text conditioning: prompts → T5 token embeddings `txt` and the CLIP pooled vector `y_vec`
(spec §1.3, gotcha 3).

`TextConditioner.encode(prompts)` returns
  txt   (B, t5_max_length, d_t5): T5 `last_hidden_state` of the prompts padded/truncated to `t5_max_length`
        (512) tokens and run with NO attention mask: pad tokens are attended, as the reference does;
  y_vec (B, d_clip): CLIP text `pooler_output` (final-LN hidden at the end-of-text token, no projection) of
        the prompts padded/truncated to `clip_max_length` (77) tokens, causal mask only.
The null conditioning for classifier-free guidance is the encoding of the empty string (`null(batch)`), not
zeros. Open-Sora v1.2's masked 300-token T5 path is `opensora_jax.text.t5`, unchanged.

Each encoder is jitted once per input shape (`nnx.jit` caches by shape); `null` is computed once and cached.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.checkpoints import ModelLoader, cached_snapshot, load_model
from opensora_jax.errors import UserError
from opensora_jax.models.clip import CLIPTextModel
from opensora_jax.models.t5 import T5Encoder
from opensora_jax.parallel import constrain
from opensora_jax.text.tokenizer import _check_prompts, default_tokenizer_dir, load_tokenizer, tokenize

T5_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77
CLIP_VOCAB_FILES = ("vocab.json", "merges.txt")
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json")


@nnx.jit
def _encode_t5(model: T5Encoder, ids: jax.Array) -> jax.Array:
    ids = constrain(ids, ("act_batch", "act_text"))
    return constrain(model(ids, None), ("act_batch", "act_text", "act_embed"))  # no mask: pads are attended


@nnx.jit
def _encode_clip(model: CLIPTextModel, ids: jax.Array) -> jax.Array:
    ids = constrain(ids, ("act_batch", "act_text"))
    return constrain(model(ids)["pooler_output"], ("act_batch", "act_embed"))


def load_clip_tokenizer(source: str | os.PathLike, *, model_max_length: int = CLIP_MAX_LENGTH, cache_dir=None):
    """transformers `CLIPTokenizer` from a local directory holding vocab.json + merges.txt (a file in it works
    too) or a hub id already in the local Hugging Face cache; nothing is downloaded."""
    from transformers import CLIPTokenizer

    path = pathlib.Path(source)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        path = cached_snapshot(str(source), "CLIP tokenizer", cache_dir)
    missing = [f for f in CLIP_VOCAB_FILES if not (path / f).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"CLIP tokenizer directory {path} has no {' / '.join(missing)} (found {found})")
    tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise UserError(f"CLIP tokenizer {source} has no padding token")
    tokenizer.model_max_length = model_max_length
    return tokenizer


def default_clip_tokenizer_dir(clip_path) -> pathlib.Path:
    """Where the CLIP tokenizer is looked for when none is given: CLIP_DIR/tokenizer (a converted directory,
    see `convert.clip.after_save`), else the checkpoint's own directory (a transformers repo)."""
    clip_path = pathlib.Path(clip_path)
    directory = clip_path if clip_path.is_dir() else clip_path.parent
    return directory / "tokenizer" if (directory / "tokenizer").is_dir() else directory


class TextConditioner:
    """T5 + CLIP text encoders with their tokenizers, set up as Open-Sora 2.0 uses them (module docstring)."""

    def __init__(self, t5_tokenizer, t5: T5Encoder, clip_tokenizer, clip: CLIPTextModel, *,
                 t5_max_length: int = T5_MAX_LENGTH, clip_max_length: int = CLIP_MAX_LENGTH):
        if t5_max_length < 1 or clip_max_length < 1:
            raise UserError(f"text lengths must be >= 1, got t5_max_length={t5_max_length}, "
                            f"clip_max_length={clip_max_length}")
        if clip_max_length > clip.config.max_position_embeddings:
            raise UserError(f"clip_max_length {clip_max_length} exceeds the CLIP model's "
                            f"{clip.config.max_position_embeddings} positions")
        self.t5_tokenizer = t5_tokenizer
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.clip = clip
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_max_length
        self._null: tuple[jax.Array, jax.Array] | None = None

    @property
    def txt_dim(self) -> int:
        """Width of `txt` (T5 d_model, 4096 for T5-XXL)."""
        return self.t5.config.d_model

    @property
    def vec_dim(self) -> int:
        """Width of `y_vec` (CLIP hidden size, 768 for CLIP-L)."""
        return self.clip.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        t5_weights: str | os.PathLike,
        clip_weights: str | os.PathLike,
        *,
        t5_tokenizer: str | os.PathLike | None = None,
        clip_tokenizer: str | os.PathLike | None = None,
        t5_max_length: int = T5_MAX_LENGTH,
        clip_max_length: int = CLIP_MAX_LENGTH,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        mesh=None,
        load: ModelLoader = load_model,
    ) -> "TextConditioner":
        """Both encoders from their checkpoints and tokenizers (default: beside each checkpoint, or in its
        `tokenizer/` folder). `load` reads a checkpoint (default: converted directories only;
        `convert.load_model` also takes transformers weights). `dtype` computes, `param_dtype` stores."""
        t5_tok = load_tokenizer(t5_tokenizer if t5_tokenizer is not None else default_tokenizer_dir(t5_weights),
                                model_max_length=t5_max_length)
        clip_tok = load_clip_tokenizer(
            clip_tokenizer if clip_tokenizer is not None else default_clip_tokenizer_dir(clip_weights),
            model_max_length=clip_max_length)
        t5, _ = load("t5", t5_weights, dtype=param_dtype, compute_dtype=dtype, mesh=mesh)
        clip, _ = load("clip", clip_weights, dtype=param_dtype, compute_dtype=dtype, mesh=mesh)
        for name, tok, vocab in (("T5", t5_tok, t5.config.vocab_size), ("CLIP", clip_tok, clip.config.vocab_size)):
            if len(tok) > vocab:
                raise UserError(f"{name} tokenizer has {len(tok)} tokens but the {name} embedding only {vocab}")
        return cls(t5_tok, t5, clip_tok, clip, t5_max_length=t5_max_length, clip_max_length=clip_max_length)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(T5 ids (B, t5_max_length), CLIP ids (B, clip_max_length)) int32, padded to the maximum and truncated
        (a TruncationWarning names each prompt that was cut)."""
        prompts = _check_prompts(prompts)
        t5_ids, _ = tokenize(self.t5_tokenizer, prompts, self.t5_max_length)
        clip_ids, _ = tokenize(self.clip_tokenizer, prompts, self.clip_max_length)
        return t5_ids, clip_ids

    def encode(self, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(txt (B, t5_max_length, d_t5), y_vec (B, d_clip)) in the encoders' compute dtype."""
        t5_ids, clip_ids = self.tokenize(prompts)
        return _encode_t5(self.t5, jnp.asarray(t5_ids)), _encode_clip(self.clip, jnp.asarray(clip_ids))

    def null(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        """The CFG null conditioning: `encode("")` repeated `batch` times (computed once, then cached)."""
        if batch < 1:
            raise UserError(f"null conditioning needs batch >= 1, got {batch}")
        if self._null is None:
            self._null = self.encode([""])
        txt, vec = self._null
        return (jnp.broadcast_to(txt, (batch, *txt.shape[1:])), jnp.broadcast_to(vec, (batch, *vec.shape[1:])))
