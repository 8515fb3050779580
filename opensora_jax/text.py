"""Open-Sora v1.2 text conditioning: prompts → T5 tokens → T5 encoder embeddings (spec §1.2 step 5, §4).

`load_tokenizer(source)` opens a T5 SentencePiece tokenizer from a local directory (spiece.model or
tokenizer.json) or a hub id already in the local Hugging Face cache; nothing is downloaded.
`TextEncoder.encode(prompts)` pads/truncates to `model_max_length` (300) tokens, `</s>` included, and
returns `y` (B, 1, L, d_model) and `mask` (B, L) int32 (1 = token, 0 = padding), like the reference's
`T5Encoder.encode`. Like the reference, `encode` does not clean captions: run
`opensora_jax.captions.preprocess` (and `append_scores`) first, or pass `preprocess=True`.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax import captions
from opensora_jax.models.t5 import T5Encoder
from opensora_jax.parallel import constrain

MODEL_MAX_LENGTH = 300
VOCAB_FILES = ("spiece.model", "tokenizer.json")
_CONFIG_FILES = ("tokenizer_config.json", "config.json")


class TruncationWarning(UserWarning):
    """A prompt had more tokens than `model_max_length` and was cut."""


def _t5_tokenizer_class():
    import transformers

    # transformers 4.x: T5TokenizerFast; 5.x: T5Tokenizer is the tokenizers-backed class.
    return getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer


def load_tokenizer(source: str | os.PathLike, *, model_max_length: int = MODEL_MAX_LENGTH, cache_dir=None):
    """A transformers T5 tokenizer from a local directory, a vocabulary file in one, or a cached hub id.

    Always loads with `from_pretrained(directory)` (a `vocab_file=` argument would be silently ignored).
    Raises FileNotFoundError for a directory without spiece.model/tokenizer.json and for a name that is
    neither a local path nor in the local cache (`cache_dir`, default: the Hugging Face hub cache).
    """
    path = pathlib.Path(source)
    if path.is_file():
        if path.name not in VOCAB_FILES:
            raise ValueError(f"{path}: not a tokenizer vocabulary (expected one of {VOCAB_FILES} or their directory)")
        path = path.parent
    if not path.is_dir():
        path = _cached_snapshot(str(source), cache_dir)
    found = sorted(p.name for p in path.iterdir())
    if not any((path / f).is_file() for f in VOCAB_FILES):
        raise FileNotFoundError(
            f"tokenizer directory {path} has no vocabulary: expected {' or '.join(VOCAB_FILES)}, found {found}"
        )
    if any((path / f).is_file() for f in _CONFIG_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = _t5_tokenizer_class().from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {source} has no padding token; a T5 tokenizer pads with <pad> (id 0)")
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _cached_snapshot(repo_id: str, cache_dir) -> pathlib.Path:
    """The local snapshot directory of a hub repo already in the cache (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - hub errors vary by version; all mean "not available offline"
        raise FileNotFoundError(
            f"tokenizer {repo_id!r} is neither a local directory nor in the local Hugging Face cache "
            f"(nothing is downloaded): {type(e).__name__}: {e}"
        ) from None


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r:.80}")
    if not prompts:
        raise ValueError("no prompts given")
    return list(prompts)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = MODEL_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, max_length) int32 and mask (B, max_length) int32, padded to `max_length` and truncated to it
    (the last kept token is `</s>`), with one TruncationWarning per prompt that was cut."""
    prompts = _check_prompts(prompts)
    # One token more than allowed tells which prompts were cut, without transformers' own length warning.
    probe = tokenizer(prompts, max_length=max_length + 1, truncation=True, add_special_tokens=True)["input_ids"]
    for i, (prompt, ids) in enumerate(zip(prompts, probe)):
        if len(ids) > max_length:
            shown = prompt if len(prompt) <= 120 else prompt[:117] + "..."
            warnings.warn(
                f"prompt {i} is longer than {max_length} tokens and was truncated: {shown!r}",
                TruncationWarning,
                stacklevel=2,
            )
    out = tokenizer(
        prompts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


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
    ) -> "TextEncoder":
        """Tokenizer from `tokenizer` (see `load_tokenizer`), encoder from a T5 checkpoint or converted dir."""
        from convert.t5 import load_model

        tok = load_tokenizer(tokenizer, model_max_length=model_max_length)
        model = load_model(weights, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        if len(tok) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tok)} tokens but the T5 embedding only {model.config.vocab_size}")
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
