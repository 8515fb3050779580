"""Open-Sora v1.2 prompt preprocessing: score suffixes and caption cleaning (spec §1.2 steps 3–4).

`append_scores` adds the inference script's " aesthetic score: 6.5." style suffixes; `preprocess`
runs the cleaning twice, as the reference does before T5 (`text_preprocessing`). The cleaning is the
PixArt / DeepFloyd-IF caption cleaner: an ordered list of named rules (`RULES`), each a small text
transform, so that every rule can be tested on its own (`apply_rule`). Needs `ftfy` and `beautifulsoup4`.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from typing import Callable, Iterable, Sequence

__all__ = ["RULES", "append_scores", "append_score_to_prompts", "apply_rule", "clean_caption", "preprocess", "rule_names"]


def _require_str(text, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.80}")
    return text


# --- score suffixes (scripts/inference.py: append_score_to_prompts) --------------------------------------


def append_scores(prompt: str, aes: float | None = None, flow: float | None = None, camera_motion: str | None = None) -> str:
    """Appends " aesthetic score: {aes:.1f}.", " motion score: {flow:.1f}." and " camera motion: {cm}."
    in that order, each only when given and when the prompt does not already contain its marker."""
    original = _require_str(prompt)
    if aes is not None and "aesthetic score:" not in original:
        prompt = f"{prompt} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in original:
        prompt = f"{prompt} motion score: {flow:.1f}."
    if camera_motion is not None and "camera motion:" not in original:
        prompt = f"{prompt} camera motion: {camera_motion}."
    return prompt


def append_score_to_prompts(prompts: Sequence[str], aes=None, flow=None, camera_motion=None) -> list[str]:
    """`append_scores` over a list of prompts."""
    return [append_scores(p, aes, flow, camera_motion) for p in prompts]


# --- caption cleaning ------------------------------------------------------------------------------------


def _sub(pattern: str, repl: str) -> Callable[[str], str]:
    regex = re.compile(pattern)
    return lambda text: regex.sub(repl, text)


def _strip_html(text: str) -> str:
    from bs4 import BeautifulSoup

    return BeautifulSoup(text, features="html.parser").text


def _basic_clean(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


_SEPARATOR = re.compile(r"[-_]")


def _split_joined_words(text: str) -> str:
    """this-is-my-cute-cat / this_is_my_cute_cat: more than three '-'/'_' become spaces."""
    return _SEPARATOR.sub(" ", text) if len(_SEPARATOR.findall(text)) > 3 else text


_TLDS = "com|co|ru|net|org|edu|gov|it"
_FILE_EXTS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
    "\ufe31\ufe32\ufe58\ufe63\uff0d"
)
# CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A), Yijing hexagrams
# and unified ideographs: the reference removes these adjacent blocks one by one, i.e. U+31C0..U+9FFF.
_CJK = "\u31c0-\u9fff"
_BAD_PUNCT = r"#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*"

# (name, transform) in the reference's order.
RULES: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("url_unquote", urllib.parse.unquote_plus),
    ("strip_lower", lambda t: t.strip().lower()),
    ("person_tag", _sub(r"<person>", "person")),
    ("url_http", _sub(rf"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:{_TLDS})[\w/-]*\b\/?(?!@)))", "")),
    ("url_www", _sub(rf"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:{_TLDS})[\w/-]*\b\/?(?!@)))", "")),
    ("html", _strip_html),
    ("nickname", _sub(r"@[\w\d]+\b", "")),
    ("cjk", _sub(rf"[{_CJK}]+", "")),
    ("dashes", _sub(rf"[{_DASHES}]+", "-")),
    ("double_quotes", _sub(r"[`´«»“”¨]", '"')),
    ("single_quotes", _sub(r"[‘’]", "'")),
    ("html_quot", _sub(r"&quot;?", "")),
    ("html_amp", _sub(r"&amp", "")),
    ("ip_address", _sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ")),
    ("article_id", _sub(r"\d:\d\d\s+$", "")),
    ("literal_newline", _sub(r"\\n", " ")),
    ("hash_short_number", _sub(r"#\d{1,3}\b", "")),
    ("hash_long_number", _sub(r"#\d{5,}\b", "")),
    ("long_number", _sub(r"\b\d{6,}\b", "")),
    ("filename", _sub(rf"[\S]+\.(?:{_FILE_EXTS})", "")),
    ("repeated_quotes", _sub(r"[\"']{2,}", '"')),
    ("repeated_dots", _sub(r"[.]{2,}", " ")),
    ("bad_punctuation", _sub(rf"[{_BAD_PUNCT}]+", " ")),
    ("spaced_dot", _sub(r"\s+\.\s+", " ")),
    ("joined_words", _split_joined_words),
    ("basic_clean", _basic_clean),
    ("short_alnum_code", _sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "")),
    ("letters_digits_letters", _sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "")),
    ("digits_letters_digits", _sub(r"\b\d+[a-zA-Z]+\d+\b", "")),
    ("shipping", _sub(r"(worldwide\s+)?(free\s+)?shipping", "")),
    ("download", _sub(r"(free\s)?download(\sfree)?", "")),
    ("click_for", _sub(r"\bclick\b\s(?:for|on)\s\w+", "")),
    ("image_extension", _sub(rf"\b(?:{_FILE_EXTS})(\simage[s]?)?", "")),
    ("page_number", _sub(r"\bpage\s+\d+\b", "")),
    ("mixed_code", _sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " ")),
    ("size", _sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "")),
    ("spaced_colon", _sub(r"\b\s+\:\s+", ": ")),
    ("space_after_punct", _sub(r"(\D[,\./])\b", r"\1 ")),
    ("whitespace", _sub(r"\s+", " ")),
    # No strip here: the reference calls caption.strip() without keeping the result.
    ("wrapping_quotes", _sub(r"^[\"']([\w\W]+)[\"']$", r"\1")),
    ("leading_punct", _sub(r"^['_,\-:;]", "")),
    ("trailing_punct", _sub(r"['_,\-:+]$", "")),
    ("lone_dot_word", _sub(r"^\.\S+$", "")),
)

_RULES = dict(RULES)


def rule_names() -> list[str]:
    """Names of the cleaning rules, in the order they run."""
    return [name for name, _ in RULES]


def apply_rule(name: str, text: str) -> str:
    """Runs the single cleaning rule `name` on `text` (for tests and debugging)."""
    if name not in _RULES:
        raise KeyError(f"unknown caption rule {name!r}; known: {rule_names()}")
    return _RULES[name](text)


def clean_caption(caption: str) -> str:
    """One pass of the caption cleaner (all `RULES` in order), result stripped.

    Unlike the reference, which calls str() on anything, a non-str caption raises TypeError.
    """
    text = _require_str(caption, "caption")
    for _, rule in RULES:
        text = rule(text)
    return text.strip()


def preprocess(prompts: str | Iterable[str], clean: bool = True) -> str | list[str]:
    """Open-Sora's `text_preprocessing`: `clean_caption` applied twice (clean=False: lower().strip()).

    Accepts one prompt or a list of prompts and returns the same kind.
    """
    if isinstance(prompts, str):
        text = prompts
        return clean_caption(clean_caption(text)) if clean else text.lower().strip()
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        _require_str(p, f"prompt {i}")
        out.append(preprocess(p, clean))
    return out
