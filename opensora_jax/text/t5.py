"""Open-Sora v1.2 text conditioning: prompts → T5 tokens → T5 encoder embeddings (spec §1.2 step 5, §4).

`TextEncoder.encode(prompts)` pads/truncates to `model_max_length` (300) tokens, `</s>` included, and
returns `y` (B, 1, L, d_model) and `mask` (B, L) int32 (1 = token, 0 = padding), like the reference's
`T5Encoder.encode`. Like the reference, `encode` does not clean captions: run
`opensora_jax.text.captions.preprocess` (and `append_scores`) first, or pass `preprocess=True`.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.checkpoints import ModelLoader, load_model
from opensora_jax.errors import UserError
from opensora_jax.models.t5 import T5Encoder
from opensora_jax.parallel import constrain
from opensora_jax.text import captions
from opensora_jax.text.tokenizer import MODEL_MAX_LENGTH, _check_prompts, load_tokenizer, tokenize

@nnx.jit
def _encode(model: T5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    # Inside a sharding_context the prompts are split over the batch axes (a no-op without one).
    ids, mask = (constrain(a, ("act_batch", "act_text")) for a in (ids, mask))
    return constrain(model(ids, mask), ("act_batch", "act_text", "act_embed"))


class TextEncoder:
    """Tokenizer + T5 encoder with Open-Sora's settings (300 tokens, padded to the maximum)."""

    def __init__(self, tokenizer, model: T5Encoder, *, model_max_length: int = MODEL_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.model = model
        self.model_max_length = model_max_length

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(
        cls,
        tokenizer: str | os.PathLike,
        weights: str | os.PathLike,
        *,
        model_max_length: int = MODEL_MAX_LENGTH,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        mesh=None,
        load: ModelLoader = load_model,
    ) -> "TextEncoder":
        """Tokenizer from `tokenizer` (see `load_tokenizer`), encoder from the T5 checkpoint `weights`.

        `load` reads the checkpoint (default: converted directories only; `convert.load_model` also
        takes the reference's transformers weights).
        """
        tok = load_tokenizer(tokenizer, model_max_length=model_max_length)
        model, _ = load("t5", weights, dtype=param_dtype, compute_dtype=dtype, mesh=mesh)
        if len(tok) > model.config.vocab_size:
            raise UserError(f"tokenizer has {len(tok)} tokens but the T5 embedding only {model.config.vocab_size}")
        return cls(tok, model, model_max_length=model_max_length)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids, mask: (B, model_max_length) int32."""
        return tokenize(self.tokenizer, prompts, self.model_max_length)

    def encode(self, prompts: str | Sequence[str], *, preprocess: bool = False) -> dict[str, jax.Array]:
        """{"y": (B, 1, L, d_model) embeddings in the model's dtype, "mask": (B, L) int32}.

        `preprocess=True` first runs the reference's caption cleaning (`captions.preprocess`).
        """
        prompts = _check_prompts(prompts)
        if preprocess:
            prompts = captions.preprocess(prompts)
        ids, mask = self.tokenize(prompts)
        y = _encode(self.model, jnp.asarray(ids), jnp.asarray(mask))
        return {"y": y[:, None], "mask": jnp.asarray(mask)}
