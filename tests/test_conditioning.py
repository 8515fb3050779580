"""Prompt options, loop prompts, mask strategies, loop helpers and reference loading (spec §1.2, §7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from opensora_jax import frames as F
from opensora_jax.conditioning import masks as M, prompts as P, references as R
from opensora_jax import video_io

# ---------------------------------------------------------------------------------------------- prompts


def test_parse_prompt_without_json():
    assert P.parse_prompt("a cat") == P.PromptOptions(text="a cat")


def test_parse_prompt_with_both_keys():
    p = P.parse_prompt('a cat {"reference_path": "a.png;b.mp4", "mask_strategy": "0;0,1,0,-1,1"}')
    assert p.text == "a cat "  # kept as is, like the reference
    assert p.reference_path == "a.png;b.mp4"
    assert p.mask_strategy == "0;0,1,0,-1,1"
    assert P.parse_prompt('x{"mask_strategy": "0"}') == P.PromptOptions("x", None, "0")


def test_parse_prompt_errors():
    with pytest.raises(ValueError, match=r"invalid key 'fps'.*reference_path, mask_strategy"):
        P.parse_prompt('a cat {"reference_path": "a.png", "fps": 8}')
    with pytest.raises(ValueError, match="invalid JSON"):
        P.parse_prompt('a cat {"reference_path": }')
    with pytest.raises(ValueError, match="one JSON object"):
        P.parse_prompt('a {"mask_strategy": "0"} {"reference_path": "a.png"}')
    with pytest.raises(ValueError, match="must be a string"):
        P.parse_prompt('a {"mask_strategy": 0}')


def test_apply_prompt_options_overrides_given_lists():
    texts, refs, strategies = P.apply_prompt_options(
        ['a {"reference_path": "x.png"}', "b", 'c {"mask_strategy": "0,0,0,0,2"}'],
        ["cfg.png", "cfg2.png", ""],
        None,
    )
    assert texts == ["a ", "b", "c "]
    assert refs == ["x.png", "cfg2.png", ""]
    assert strategies == ["", "", "0,0,0,0,2"]
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        P.apply_prompt_options(["a"], ["", ""])


def test_loop_prompts():
    prompt = "|0| a sunny day |2| a rainy day|5|snow"
    assert P.is_loop_prompt(prompt) and not P.is_loop_prompt("|1|x")
    texts, starts = P.split_loop_prompt(prompt)
    assert (texts, starts) == (["a sunny day", "a rainy day", "snow"], [0, 2, 5])
    assert P.merge_loop_prompt(texts, starts) == "|0|a sunny day|2|a rainy day|5|snow"
    assert P.split_loop_prompt("plain") == (["plain"], None)
    assert P.merge_loop_prompt(["plain"]) == "plain"
    expected = [" a sunny day ", " a sunny day ", " a rainy day", " a rainy day", " a rainy day", "snow", "snow"]
    assert [P.prompt_for_loop(prompt, i) for i in range(7)] == expected
    assert P.prompt_for_loop("plain", 3) == "plain"


@pytest.mark.parametrize(
    "prompt, message",
    [("|0|a|", "pairs"), ("|0|a|b|c", "not an integer"), ("|0|a|3|b|2|c", "must increase"), ("|0|a|0|b", "increase")],
)
def test_loop_prompt_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        P.split_loop_prompt(prompt)


# ---------------------------------------------------------------------------------------- mask strategy


def test_parse_mask_strategy_defaults_and_groups():
    assert M.parse_mask_strategy("") == [] and M.parse_mask_strategy(None) == []
    assert M.parse_mask_strategy("0") == [M.MaskCondition(0, 0, 0, 0, 1, 0.0)]
    assert M.parse_mask_strategy("1,2,-3") == [M.MaskCondition(1, 2, -3, 0, 1, 0.0)]
    conds = M.parse_mask_strategy("0;0,1,0,-1,1;2,0,0,0,15,0.4")
    assert conds == [M.MaskCondition(), M.MaskCondition(0, 1, 0, -1, 1, 0.0), M.MaskCondition(2, 0, 0, 0, 15, 0.4)]
    assert M.format_mask_strategy(conds) == "0,0,0,0,1,0.0;0,1,0,-1,1,0.0;2,0,0,0,15,0.4"
    assert M.parse_mask_strategy(M.format_mask_strategy(conds)) == conds


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("0,0,0,0,1,0,7", "7 fields; at most 6"),
        ("0,x", "ref_id must be an integer, got 'x'"),
        ("0,0,0,0,1,half", "edit_ratio must be a number"),
        ("0,0,0,0,1.5", "length must be an integer"),
        ("0;", r"group '': loop_id must be an integer"),
        ("0,0,0,0,-1", "length must be ≥ 0"),
        ("-1", "loop_id must be ≥ 0"),
        ("0,-1", "ref_id must be ≥ 0"),
        ("0,0,0,0,1,1.5", r"edit_ratio must be in \[0, 1\]"),
    ],
)
def test_parse_mask_strategy_errors(strategy, message):
    with pytest.raises(ValueError, match=message):
        M.parse_mask_strategy(strategy)


def test_find_nearest_point():
    # Round up only when the remainder is above align / 2 and the next multiple stays below the last.
    assert [M.find_nearest_point(v, 5, 20) for v in (0, 2, 3, 7, 8, 12, 13, 18, 19)] == [0, 0, 5, 5, 10, 10, 15, 15, 15]
    assert M.find_nearest_point(14, 5, 15) == 10  # 15 would be the last multiple: no rounding up
    assert M.find_nearest_point(2, 4, 20) == 0  # remainder 2 is not above 4 / 2


def test_resolve_condition_negative_align_and_clip():
    resolve = M.resolve_condition
    assert resolve(M.MaskCondition(ref_start=-1, target_start=-3, length=9), 4, 15) == M.FrameCopy(3, 12, 1, 0.0)
    assert resolve(M.MaskCondition(ref_start=0, target_start=-2, length=5), 10, 15) == M.FrameCopy(0, 13, 2, 0.0)
    assert resolve(M.MaskCondition(ref_start=-5, length=5), 15, 15, align=5) == M.FrameCopy(10, 0, 5, 0.0)
    snapped = resolve(M.MaskCondition(ref_start=-2, target_start=8, length=5), 15, 20, align=5)
    assert snapped == M.FrameCopy(10, 10, 5, 0.0)
    assert resolve(M.MaskCondition(target_start=-1, length=5), 1, 15, align=5) == M.FrameCopy(0, 10, 1, 0.0)
    with pytest.raises(ValueError, match="target_start 15 is outside a latent of 15 frames"):
        resolve(M.MaskCondition(target_start=15), 1, 15)
    with pytest.raises(ValueError, match="ref_start -2 is outside a latent of 1 frames"):
        resolve(M.MaskCondition(ref_start=-2), 1, 15)
    with pytest.raises(ValueError, match="align must be a positive"):
        resolve(M.MaskCondition(), 1, 15, align=0)


def _latents(b=2, t=6, h=2, w=3, c=4, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, h, w, c)).astype(np.float32)


def _ref(t, value):
    return np.full((t, 2, 3, 4), value, np.float32)


def test_apply_image_to_video_and_extension():
    z = _latents()
    refs = [[_ref(1, 7.0)], [_ref(4, 0.0) + np.arange(4, dtype=np.float32)[:, None, None, None]]]
    out, mask = M.apply_mask_strategy(z, refs, ["0", "0,0,0,-2,3"])  # image → frame 0; last 2 of 6 ← ref[0:2]
    assert mask.dtype == np.float32 and mask.shape == (2, 6)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out[0, 0], 7.0)
    np.testing.assert_array_equal(out[0, 1:], z[0, 1:])
    np.testing.assert_array_equal(out[1, 4], 0.0)
    np.testing.assert_array_equal(out[1, 5], 1.0)
    np.testing.assert_array_equal(out[1, :4], z[1, :4])
    assert not np.shares_memory(out, z) and np.array_equal(z, _latents())  # input untouched


def test_apply_connect_images_edit_ratio_and_overwrite():
    z = _latents(b=1)
    refs = [[_ref(1, 1.0), _ref(1, 2.0), _ref(6, 3.0)]]
    # two images at both ends, an SDEdit-like group over frames 1-3, then frame 2 overwritten by image 0
    out, mask = M.apply_mask_strategy(z, refs, ["0;0,1,0,-1,1;0,2,1,1,3,0.4;0,0,0,2,1,0.25"])
    np.testing.assert_allclose(mask, [[0, 0.4, 0.25, 0.4, 1, 0]])
    assert [float(out[0, i, 0, 0, 0]) for i in (0, 1, 2, 3, 5)] == [1.0, 3.0, 1.0, 3.0, 2.0]
    np.testing.assert_array_equal(out[0, 4], z[0, 4])


def test_apply_only_current_loop_and_missing_refs_of_other_loops():
    z = _latents(b=1)
    # group for loop 1 uses reference 3, which does not exist yet: ignored at loop 0
    out, mask = M.apply_mask_strategy(z, [[_ref(2, 5.0)]], ["0,0,0,0,2;1,3,0,0,1"], loop_i=0)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 1]])
    out, mask = M.apply_mask_strategy(z, [[_ref(2, 5.0)]], ["0,0,0,0,2"], loop_i=1)
    np.testing.assert_array_equal(mask, np.ones((1, 6)))
    np.testing.assert_array_equal(out, z)


def test_apply_plain_text_to_video_and_condition_lists():
    z = _latents()
    out, mask = M.apply_mask_strategy(z, None, ["", None])
    np.testing.assert_array_equal(mask, np.ones((2, 6)))
    np.testing.assert_array_equal(out, z)
    _, mask = M.apply_mask_strategy(z, [[_ref(1, 1.0)], []], [[M.MaskCondition(target_start=3)], []])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 1, 1])


def test_apply_with_jax_arrays_keeps_dtype():
    z = jnp.asarray(_latents(b=1), jnp.bfloat16)
    out, mask = M.apply_mask_strategy(z, [[jnp.full((15, 2, 3, 4), 2.0)]], ["0,0,-5,0,5"], align=5)
    assert isinstance(out, jax.Array) and isinstance(mask, jax.Array)
    assert out.dtype == jnp.bfloat16 and mask.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out[0, :5], np.float32), 2.0)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 0, 0, 0, 0, 1]])


def test_apply_errors():
    z = _latents(b=1)
    with pytest.raises(ValueError, match="uses reference 1 but the prompt has 1"):
        M.apply_mask_strategy(z, [[_ref(1, 0.0)]], ["0,1"])
    with pytest.raises(ValueError, match=r"latent has shape \(1, 2, 3, 5\)"):
        M.apply_mask_strategy(z, [[np.zeros((1, 2, 3, 5), np.float32)]], ["0"])
    with pytest.raises(ValueError, match="target_start 6 is outside"):
        M.apply_mask_strategy(z, [[_ref(1, 0.0)]], ["0,0,0,6"])
    with pytest.raises(ValueError, match="2 mask strategies for a batch of 1"):
        M.apply_mask_strategy(z, None, ["", ""])


# ------------------------------------------------------------------------------------------------ loops


def test_loop_group_and_append_generated():
    assert M.loop_condition_group(1, 0, 5, 0.0) == "1,0,-5,0,5,0.0"
    assert M.append_mask_group("", "1,0,-5,0,5,0.0") == "1,0,-5,0,5,0.0"
    assert M.append_mask_group("0", "1,1,-5,0,5,0.0") == "0;1,1,-5,0,5,0.0"
    image = _ref(1, 9.0)
    previous = np.arange(2 * 15, dtype=np.float32).reshape(2, 15, 1, 1, 1) * np.ones((1, 1, 2, 3, 4), np.float32)
    refs, strategies = M.append_generated([[image], []], ["0", ""], previous, loop_i=1, condition_frame_length=5)
    assert [len(r) for r in refs] == [2, 1]
    assert strategies == ["0;1,1,-5,0,5,0.0", "1,0,-5,0,5,0.0"]
    z = np.zeros((2, 15, 2, 3, 4), np.float32)
    out, mask = M.apply_mask_strategy(z, refs, strategies, loop_i=1, align=5)
    np.testing.assert_array_equal(mask, np.repeat([[0.0] * 5 + [1.0] * 10], 2, axis=0))
    np.testing.assert_array_equal(out[:, :5, 0, 0, 0], previous[:, 10:, 0, 0, 0])  # last 5 latents → first 5
    np.testing.assert_array_equal(out[:, 5:], 0.0)


def test_frame_bookkeeping_for_loops():
    assert M.dframe_to_frame(5) == 17 and M.dframe_to_frame(10) == 34 and M.dframe_to_frame(0) == 0
    with pytest.raises(ValueError, match="multiple of 5 latent frames, got 3"):
        M.dframe_to_frame(3)
    assert [M.loop_frames_to_drop(i, 5) for i in range(3)] == [0, 17, 17]
    clips = [np.full((51, 2, 2, 3), i, np.uint8) for i in range(3)]
    joined = M.join_loop_clips(clips, 5)
    assert joined.shape[0] == M.total_loop_frames(51, 3, 5) == 51 + 2 * 34
    assert (joined[:51] == 0).all() and (joined[51:85] == 1).all() and (joined[85:] == 2).all()


# ------------------------------------------------------------------------------------------- references


def test_reference_path_splitting_and_urls():
    assert R.split_reference_paths("") == [] and R.split_reference_paths(None) == []
    assert R.split_reference_paths("a.png; b.mp4") == ["a.png", "b.mp4"]
    with pytest.raises(ValueError, match="empty path"):
        R.split_reference_paths("a.png;")
    assert R.is_url("https://example.com/a.png") and R.is_url("FTP://x/y.mp4") and not R.is_url("./http/a.png")
    with pytest.raises(ValueError, match="downloading is not supported"):
        R.load_reference("https://example.com/a.png", (8, 8))


def test_reference_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such reference file"):
        R.load_reference(str(tmp_path / "missing.png"), (8, 8))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported reference file type '.txt'.*\.mp4.*\.png"):
        R.load_reference(str(tmp_path / "notes.txt"), (8, 8))


def test_fill_size_rounds_half_to_even():
    assert F.fill_size(240, 426, (240, 426)) == (240, 426)
    assert F.fill_size(4, 5, (2, 2)) == (2, 2)  # 5 · 0.5 = 2.5 → 2 (Python round)
    assert F.fill_size(20, 60, (10, 10)) == (10, 30)
    assert F.fill_size(60, 20, (10, 10)) == (30, 10)


def test_bilinear_resize_matches_half_pixel_sampling():
    up = F.bilinear_resize(np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1), (1, 4))
    np.testing.assert_allclose(up.ravel(), [0.0, 0.25, 0.75, 1.0])
    down = F.bilinear_resize(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1), (2, 1))
    np.testing.assert_allclose(down.ravel(), [0.5, 2.5])  # no antialiasing: samples at 0.5 and 2.5


def test_crop_offsets_differ_for_images_and_videos():
    # 10×13 → 10×10: 3 columns too many. Images start at round(1.5) = 2, videos at ⌊1.5⌋ = 1.
    columns = np.broadcast_to(np.arange(13, dtype=np.uint8)[None, :, None] * 10, (10, 13, 3)).copy()
    assert F.resize_crop_image(columns, (10, 10))[0, :, 0].tolist() == list(range(20, 120, 10))
    video = F.resize_crop_video(columns[None].astype(np.float32), (10, 10))
    assert video[0, 0, :, 0].tolist() == list(range(10, 110, 10))


def test_load_image_reference_centre_crop(tmp_path):
    # left third red, middle green, right third blue: a square crop of the centre is green
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :20, 0] = image[:, 20:40, 1] = image[:, 40:, 2] = 255
    Image.fromarray(image).save(tmp_path / "ref.png")
    ref = R.load_reference(str(tmp_path / "ref.png"), (10, 10))
    assert ref.shape == (1, 10, 10, 3) and ref.dtype == np.float32
    np.testing.assert_allclose(ref[0, :, 2:8], np.broadcast_to([-1.0, 1.0, -1.0], (10, 6, 3)), atol=1e-6)
    assert ref.min() >= -1.0 and ref.max() <= 1.0


def test_load_video_references(tmp_path):
    frames = np.zeros((6, 16, 32, 3), np.uint8)
    frames[:3] = (200, 40, 40)
    frames[3:] = (40, 40, 200)
    video_io.write_video(frames, tmp_path / "clip.mp4", 24)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "white.png")
    refs = R.load_references(f"{tmp_path / 'clip.mp4'};{tmp_path / 'white.png'}", (8, 8))
    assert [r.shape for r in refs] == [(6, 8, 8, 3), (1, 8, 8, 3)]
    expected = np.array([(200, 40, 40)] * 3 + [(40, 40, 200)] * 3, np.float32) / 127.5 - 1
    np.testing.assert_allclose(refs[0].mean(axis=(1, 2)), expected, atol=0.06)
    np.testing.assert_array_equal(refs[1], 1.0)
