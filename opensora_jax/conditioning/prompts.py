"""Prompt syntax of Open-Sora sampling (spec §7): trailing JSON options and multi-segment loop prompts.

A prompt may end with a JSON object giving its `reference_path` (";"-separated image/video files) and
`mask_strategy`; a loop prompt `|0|text0|k1|text1...` changes text at loop iteration k1.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from opensora_jax.errors import UserError

# ---------------------------------------------------------------------------------------------- prompts

PROMPT_JSON_KEYS = ("reference_path", "mask_strategy")
LOOP_PROMPT_PREFIX = "|0|"


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """A prompt split from its trailing JSON options; a field is None when the JSON did not set it."""

    text: str
    reference_path: str | None = None
    mask_strategy: str | None = None


def parse_prompt(prompt: str) -> PromptOptions:
    """Split `text{"reference_path": ..., "mask_strategy": ...}` into the text and its options.

    The JSON object starts at the first "{" and runs to the end; the text before it is kept as is
    (trailing space included, like the reference). Only the keys in PROMPT_JSON_KEYS are allowed,
    with string values. Raises ValueError naming the offending part.
    """
    start = prompt.find("{")
    if start < 0:
        return PromptOptions(text=prompt)
    text, blob = prompt[:start], prompt[start:]
    if "{" in blob[1:]:
        raise UserError(f"prompt may hold one JSON object without nested braces, got {blob!r} in {prompt!r}")
    try:
        options = json.loads(blob)
    except json.JSONDecodeError as err:
        raise UserError(f"prompt ends with invalid JSON {blob!r}: {err}") from None
    for key, value in options.items():
        if key not in PROMPT_JSON_KEYS:
            raise UserError(f"invalid key {key!r} in prompt JSON {blob!r}; allowed: {', '.join(PROMPT_JSON_KEYS)}")
        if not isinstance(value, str):
            raise UserError(f"prompt JSON key {key!r} must be a string, got {value!r}")
    return PromptOptions(text=text, **options)


def apply_prompt_options(
    prompts: Sequence[str],
    reference_paths: Sequence[str] | None = None,
    mask_strategies: Sequence[str] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Per-prompt (texts, reference_paths, mask_strategies); a prompt's JSON overrides the given lists.

    The lists default to "" per prompt (no reference, no strategy), like the reference's inference script.
    """
    n = len(prompts)
    refs = list(reference_paths) if reference_paths is not None else [""] * n
    strategies = list(mask_strategies) if mask_strategies is not None else [""] * n
    for name, values in (("reference_paths", refs), ("mask_strategies", strategies)):
        if len(values) != n:
            raise UserError(f"{name} has {len(values)} entries for {n} prompts")
    texts = []
    for i, prompt in enumerate(prompts):
        options = parse_prompt(prompt)
        texts.append(options.text)
        if options.reference_path is not None:
            refs[i] = options.reference_path
        if options.mask_strategy is not None:
            strategies[i] = options.mask_strategy
    return texts, refs, strategies


def is_loop_prompt(prompt: str) -> bool:
    """True for a multi-segment loop prompt `|0|text0|k1|text1...`."""
    return prompt.startswith(LOOP_PROMPT_PREFIX)


def _loop_segments(prompt: str) -> list[tuple[int, str]]:
    """[(first loop, text)] of a loop prompt, texts unstripped; starts must rise strictly from 0."""
    fields = prompt.split("|")[1:]
    if len(fields) % 2:
        raise UserError(f"loop prompt must be |k|text pairs (a '|' inside a text is not allowed): {prompt!r}")
    segments = []
    for k, text in zip(fields[0::2], fields[1::2]):
        try:
            start = int(k)
        except ValueError:
            raise UserError(f"loop index {k!r} is not an integer in loop prompt {prompt!r}") from None
        if segments and start <= segments[-1][0]:
            raise UserError(f"loop indices must increase, got {start} after {segments[-1][0]} in {prompt!r}")
        segments.append((start, text))
    return segments


def split_loop_prompt(prompt: str) -> tuple[list[str], list[int] | None]:
    """(stripped segment texts, their first loop indices) of a loop prompt; ([prompt], None) otherwise."""
    if not is_loop_prompt(prompt):
        return [prompt], None
    segments = _loop_segments(prompt)
    return [text.strip() for _, text in segments], [start for start, _ in segments]


def merge_loop_prompt(texts: Sequence[str], loop_starts: Sequence[int] | None = None) -> str:
    """Inverse of `split_loop_prompt`: `|k0|text0|k1|text1...`, or the only text when loop_starts is None."""
    if loop_starts is None:
        if len(texts) != 1:
            raise UserError(f"without loop indices give exactly one text, got {len(texts)}")
        return texts[0]
    if len(texts) != len(loop_starts):
        raise UserError(f"{len(texts)} texts for {len(loop_starts)} loop indices")
    return "".join(f"|{k}|{text}" for k, text in zip(loop_starts, texts))


def prompt_for_loop(prompt: str, loop_i: int) -> str:
    """The text used at loop iteration `loop_i`: the last segment whose start is ≤ loop_i.

    A plain prompt is returned unchanged; segment texts are not stripped (as in the reference).
    """
    if not is_loop_prompt(prompt):
        return prompt
    if loop_i < 0:
        raise UserError(f"loop index must be ≥ 0, got {loop_i}")
    return [text for start, text in _loop_segments(prompt) if start <= loop_i][-1]


