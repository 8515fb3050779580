"""Text pipeline: caption cleaning (one test per rule), score suffixes, tokenizer loading (a SentencePiece model
trained on the fly, no download) and TextEncoder end to end against transformers' PyTorch T5."""

import io
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import convert
from opensora_jax.errors import UserError
from opensora_jax.text import captions
from opensora_jax.text.t5 import TextEncoder
from opensora_jax.text.tokenizer import TruncationWarning, load_tokenizer, tokenize

# (rule, input, output of that rule alone)
RULE_CASES = [
    ("url_unquote", "a%20cat+on%2Fmat", "a cat on/mat"),
    ("strip_lower", "  A Red CAR \n", "a red car"),
    ("person_tag", "<person> walks", "person walks"),
    ("url_http", "see https://example.org/a/b now", "see  now"),
    ("url_http", "visit foo.com today", "visit  today"),
    ("url_www", "go www:abc now", "go bc now"),  # "www:" plus one character, as the reference's regex
    ("url_www", "go www.site.ru/x now", "go  now"),
    ("html", "<b>bold</b> &amp; <i>x</i>", "bold & x"),
    ("nickname", "photo by @john_doe today", "photo by  today"),
    ("cjk", "a猫cat中文b㈱ㇰ", "acatb"),
    ("dashes", "a—b–c‐‐d", "a-b-c-d"),
    ("double_quotes", "«hi» “there” `x´ ¨", '"hi" "there" "x" "'),
    ("single_quotes", "‘it’s’", "'it's'"),
    ("html_quot", "&quot;hi&quot says", "hi says"),
    ("html_amp", "tom &amp jerry", "tom  jerry"),
    ("ip_address", "host 192.168.0.1 up", "host   up"),
    ("article_id", "news 1:23  ", "news "),
    ("literal_newline", "line\\nnext", "line next"),
    ("hash_short_number", "item #12 and #1234", "item  and #1234"),
    ("hash_long_number", "id #12345 and #1234", "id  and #1234"),
    ("long_number", "code 1234567 and 12345", "code  and 12345"),
    ("filename", "see cat_01.jpg and movie.mp4 now", "see  and  now"),
    ("repeated_quotes", "say ''hi\"\" now", 'say "hi" now'),
    ("repeated_dots", "wait... what..", "wait  what "),
    ("bad_punctuation", "***sale*** #1 (new) [a]{b}|c\\d/e ©®™", " sale   1  new   a b c d e  "),
    ("spaced_dot", "end . start", "end start"),
    ("joined_words", "this-is_my-cute_cat", "this is my cute cat"),
    ("joined_words", "a-b-c-d", "a-b-c-d"),  # three separators: kept
    ("basic_clean", "  caf&amp;amp;eacute; Ã©  ", "café é"),
    ("short_alnum_code", "model jc6640 ok", "model  ok"),
    ("letters_digits_letters", "code jc6640vc ok", "code  ok"),
    ("digits_letters_digits", "ref 6640vc231 ok", "ref  ok"),
    ("shipping", "worldwide free shipping now", " now"),
    ("download", "free download free app", " app"),
    ("click_for", "click for details please", " please"),
    ("image_extension", "a png images set", "a  set"),
    ("page_number", "see page 12 here", "see  here"),
    ("mixed_code", "tag j2d1a2a end", "tag   end"),
    ("size", "poster 1920x1080 and 3.5×2 and 10х20", "poster  and  and "),
    ("spaced_colon", "title : subtitle", "title: subtitle"),
    ("space_after_punct", "a,b.c/d 1,2 1.5", "a, b. c/ d 1,2 1.5"),
    ("whitespace", "a \t\n  b", "a b"),
    ("wrapping_quotes", "\"quoted text'", "quoted text"),
    ("leading_punct", ":;hello", ";hello"),
    ("trailing_punct", "hello+", "hello"),
    ("lone_dot_word", ".hidden", ""),
    ("lone_dot_word", ".not alone", ".not alone"),
]


@pytest.mark.parametrize("rule,text,expected", RULE_CASES)
def test_cleaning_rule(rule, text, expected):
    assert captions.apply_rule(rule, text) == expected


def test_every_rule_has_a_case():
    assert set(captions.rule_names()) == {rule for rule, _, _ in RULE_CASES}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A <b>Beautiful</b> SUNSET over the sea!!! https://t.co/abc", "a beautiful sunset over the sea!!!"),
        ("“Hello” — world… 1920x1080 free shipping", '"hello" - world…'),
        ("a cat, sitting on a mat. aesthetic score: 6.5.", "a cat, sitting on a mat. aesthetic score: 6.5."),
        ("  'quoted caption'  ", "quoted caption"),
        ("", ""),
    ],
)
def test_preprocess_examples(text, expected):
    assert captions.preprocess(text) == expected


def test_preprocess_applies_twice():
    # One pass leaves a trailing "-" that only the second pass removes (values from the reference).
    text = "Check out @user: &quot;Amazing&quot; photo #123 at 10.0.0.1 -- IMG_2048.JPG page 2"
    assert captions.clean_caption(text) == 'check out: "amazing" photo at -'
    assert captions.preprocess(text) == 'check out: "amazing" photo at'
    assert captions.preprocess([text, "B"]) == ['check out: "amazing" photo at', "b"]
    assert captions.preprocess("  A B ", clean=False) == "a b"


def test_score_suffixes():
    assert captions.append_scores("a cat", aes=6.5) == "a cat aesthetic score: 6.5."
    assert captions.append_scores("a cat", aes=6, flow=10, camera_motion="pan left") == (
        "a cat aesthetic score: 6.0. motion score: 10.0. camera motion: pan left."
    )
    assert captions.append_scores("x aesthetic score: 5.0.", aes=6.5, flow=1.25) == "x aesthetic score: 5.0. motion score: 1.2."
    assert captions.append_scores("x camera motion: static.", camera_motion="pan") == "x camera motion: static."
    assert captions.append_scores("x") == "x"
    assert captions.append_score_to_prompts(["a", "b"], aes=7.0) == ["a aesthetic score: 7.0.", "b aesthetic score: 7.0."]


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["nested"]])
def test_non_string_prompt_is_rejected(bad):
    with pytest.raises(TypeError, match="must be a str"):
        captions.clean_caption(bad)
    with pytest.raises(TypeError, match="must be a str"):
        captions.preprocess(["ok", bad])
    with pytest.raises(TypeError, match="must be a str"):
        captions.append_scores(bad, aes=6.5)


# --- tokenizer ---------------------------------------------------------------------------------------

CORPUS = [
    "a cat sitting on a mat", "a dog running in the park at sunset", "the quick brown fox jumps over the lazy dog",
    "aerial view of a city at night with lights", "waves crashing on a rocky shore", "aesthetic score",
]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A directory holding only a SentencePiece model trained here (pad 0, eos 1, unk 2, as T5's)."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spiece")
    (path / "spiece.model").write_bytes(out.getvalue())
    return path


def test_tokenizer_from_spiece_dir_pads_and_ends_with_eos(spiece_dir):
    tok = load_tokenizer(spiece_dir)
    assert tok.model_max_length == 300
    ids, mask = tokenize(tok, ["a cat", "the lazy dog at sunset"], max_length=40)
    assert ids.shape == mask.shape == (2, 40) and ids.dtype == mask.dtype == np.int32
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[n - 1] == tok.eos_token_id == 1
        assert (row[n:] == 0).all() and (m[:n] == 1).all() and (m[n:] == 0).all()
    # A vocabulary file path resolves to its directory.
    assert load_tokenizer(spiece_dir / "spiece.model")("a cat")["input_ids"] == tok("a cat")["input_ids"]


def test_tokenizer_from_tokenizer_json_dir(spiece_dir, tmp_path):
    load_tokenizer(spiece_dir).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path)
    assert tok("a dog")["input_ids"] == load_tokenizer(spiece_dir)("a dog")["input_ids"]


def test_tokenizer_from_hub_id_in_local_cache(spiece_dir, tmp_path):
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "models--someorg--tiny-t5"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    load_tokenizer(spiece_dir).save_pretrained(str(snapshot))
    tok = load_tokenizer("someorg/tiny-t5", cache_dir=tmp_path)
    assert tok("a dog")["input_ids"] == load_tokenizer(spiece_dir)("a dog")["input_ids"]


def test_truncation_warns_once_naming_the_prompt(spiece_dir):
    tok = load_tokenizer(spiece_dir)
    long = " ".join(["the quick brown fox"] * 10)
    with pytest.warns(TruncationWarning) as record:
        ids, mask = tokenize(tok, ["a cat", long], max_length=8)
    assert len(record) == 1 and "prompt 1" in str(record[0].message) and "the quick brown fox" in str(record[0].message)
    assert mask[1].all() and ids[1, -1] == 1  # truncated, still ends with </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tok, ["a cat"], max_length=8)


def test_tokenizer_errors(tmp_path, spiece_dir):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        load_tokenizer("no-such-org/no-such-t5-tokenizer")
    tok = load_tokenizer(spiece_dir)
    with pytest.raises(TypeError, match="prompt 1 must be a str"):
        tokenize(tok, ["fine", 42])
    with pytest.raises(TypeError, match="str or a list"):
        tokenize(tok, 42)


# --- end to end ----------------------------------------------------------------------------------------


def test_text_encoder_matches_transformers(spiece_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    tok = load_tokenizer(spiece_dir)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=2,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.T5EncoderModel(cfg).eval()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))

    # Reference (transformers) weights: the library reads converted directories; convert.load_model both.
    with pytest.raises(UserError, match="not a converted checkpoint.*python -m convert"):
        TextEncoder.from_pretrained(spiece_dir, tmp_path, model_max_length=48)
    encoder = TextEncoder.from_pretrained(spiece_dir, tmp_path, model_max_length=48, load=convert.load_model)
    prompts = ["A cat sitting on a mat.", "aerial view of a city at night"]
    out = encoder.encode(prompts, preprocess=True)
    assert 0 < int(out["mask"].sum()) < out["mask"].size  # padded
    assert out["y"].shape == (2, 1, 48, 16) and out["mask"].shape == (2, 48)
    assert encoder.output_dim == 16

    # The reference path: clean twice, tokenize with the same settings, run the PyTorch encoder.
    ref = tok(captions.preprocess(prompts), max_length=48, padding="max_length", truncation=True,
              add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state.numpy()
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref["attention_mask"].numpy())
    got = np.asarray(out["y"][:, 0])
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert out["y"].dtype == jnp.float32
