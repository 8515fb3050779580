"""Tokenizers of the text encoders: loading one from local files, padding and truncating prompts.

`load_tokenizer(source)` opens a T5 SentencePiece tokenizer from a local directory (spiece.model or
tokenizer.json) or a hub id already in the local Hugging Face cache; nothing is downloaded. `tokenize` pads
and truncates to a fixed length, `</s>` included, and warns once per prompt that was cut.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Sequence

import numpy as np

from opensora_jax.checkpoints import cached_snapshot
from opensora_jax.errors import UserError

MODEL_MAX_LENGTH = 300
VOCAB_FILES = ("spiece.model", "tokenizer.json")
_CONFIG_FILES = ("tokenizer_config.json", "config.json")


class TruncationWarning(UserWarning):
    """A prompt had more tokens than `model_max_length` and was cut."""


class UnknownWordsWarning(UserWarning):
    """Words of a prompt that the tokenizer maps to its unknown token: the model never sees what they say."""


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words (or characters) of `prompt` that `tokenizer` turns into its unknown token, in order, each once."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    try:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        spans = [prompt[a:b].strip() for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a tokenizer without offsets: word by word
        spans = [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    found = []
    for span in spans:
        if span and span not in found:
            found.append(span)
    return found


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
            raise UserError(f"{path}: not a tokenizer vocabulary (expected one of {VOCAB_FILES} or their directory)")
        path = path.parent
    if not path.is_dir():
        path = cached_snapshot(str(source), "tokenizer", cache_dir)
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
        raise UserError(f"tokenizer {source} has no padding token; a T5 tokenizer pads with <pad> (id 0)")
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r:.80}")
    if not prompts:
        raise UserError("no prompts given")
    return list(prompts)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = MODEL_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, max_length) int32 and mask (B, max_length) int32, padded to `max_length` and truncated to it
    (the last kept token is `</s>`), with one TruncationWarning per prompt that was cut and one
    UnknownWordsWarning per prompt holding words the vocabulary lacks (they become `<unk>`)."""
    prompts = _check_prompts(prompts)
    # One token more than allowed tells which prompts were cut, without transformers' own length warning.
    probe = tokenizer(prompts, max_length=max_length + 1, truncation=True, add_special_tokens=True)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    # Without the special tokens: CLIP's unknown token is also its end-of-text token.
    plain = tokenizer(prompts, add_special_tokens=False)["input_ids"] if unk is not None else [[]] * len(prompts)
    for i, (prompt, ids, words_ids) in enumerate(zip(prompts, probe, plain)):
        if unk is not None and unk in words_ids:
            words = unknown_words(tokenizer, prompt) or ["(some characters)"]
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            warnings.warn(f"prompt {i} {shown!r}: the tokenizer does not know {', '.join(map(repr, words))} "
                          f"(each becomes {tokenizer.unk_token}, which the model reads as no word)",
                          UnknownWordsWarning, stacklevel=2)
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




def default_tokenizer_dir(t5_path) -> pathlib.Path:
    """Where the T5 tokenizer is looked for when none is given: T5_DIR/tokenizer (a converted directory),
    else the T5 checkpoint's own directory (a transformers repo)."""
    t5_path = pathlib.Path(t5_path)
    directory = t5_path if t5_path.is_dir() else t5_path.parent
    return directory / "tokenizer" if (directory / "tokenizer").is_dir() else directory
