"""Resolution / aspect-ratio / frame-count tables and latent sizes against spec §5.4 and §6."""

import numpy as np
import pytest

from opensora_jax import presets

# Spec §6.2, copied row by row: H/W key, then (H, W) at 144p, 240p, 360p, 480p, 720p, 1080p.
SPEC_SIZE_TABLE = """
0.38 117x312 196x522 294x784 392x1046 588x1568 882x2352
0.43 125x291 210x490 314x732 420x980 628x1466 942x2198
0.48 133x277 222x462 332x692 444x925 666x1388 998x2080
0.50 135x270 226x452 340x680 452x904 678x1356 1018x2036
0.53 139x262 232x438 350x662 466x880 698x1318 1048x1980
0.54 141x260 236x436 352x652 470x870 706x1306 1058x1958
0.56 144x256 240x426 360x640 480x854 720x1280 1080x1920
0.62 151x241 252x404 380x608 506x810 758x1212 1138x1820
0.67 156x234 262x393 392x588 522x784 784x1176 1176x1764
0.75 166x221 276x368 416x554 554x738 832x1110 1248x1664
1.00 192x192 320x320 480x480 640x640 960x960 1440x1440
1.33 221x165 370x278 554x416 740x555 1108x832 1662x1246
1.50 235x156 392x262 588x392 784x522 1176x784 1764x1176
1.78 256x144 426x240 640x360 854x480 1280x720 1920x1080
1.89 263x139 440x232 660x350 880x466 1320x698 1980x1048
2.00 271x135 452x226 678x340 906x454 1358x680 2036x1018
2.08 277x132 462x222 692x332 924x444 1386x666 2078x998
"""
SPEC_RESOLUTIONS = ("144p", "240p", "360p", "480p", "720p", "1080p")

# Spec §6.1.
SPEC_ASPECT_RATIOS = {
    "3:8": "0.38", "9:21": "0.43", "12:25": "0.48", "1:2": "0.50", "9:17": "0.53", "27:50": "0.54",
    "9:16": "0.56", "5:8": "0.62", "2:3": "0.67", "3:4": "0.75", "1:1": "1.00", "4:3": "1.33", "3:2": "1.50",
    "16:9": "1.78", "17:9": "1.89", "2:1": "2.00", "50:27": "2.08",
}  # fmt: skip

# Spec §6.2, "Pixel budgets used by buckets".
SPEC_PIXEL_BUDGETS = {
    "144p": 36864, "256": 65536, "240p": 102240, "360p": 230400, "512": 262144, "480p": 409920,
    "720p": 921600, "1024": 1048576, "1080p": 2073600, "2k": 3686400, "2048": 4194304, "2880": 8294400,
    "4k": 8294400,
}  # fmt: skip


def _spec_sizes():
    for line in SPEC_SIZE_TABLE.strip().splitlines():
        key, *sizes = line.split()
        name = {v: k for k, v in SPEC_ASPECT_RATIOS.items()}[key]
        for resolution, size in zip(SPEC_RESOLUTIONS, sizes):
            h, w = map(int, size.split("x"))
            yield resolution, name, (h, w)


def test_every_spec_table_value():
    rows = list(_spec_sizes())
    assert len(rows) == 17 * 6
    for resolution, name, expected in rows:
        assert presets.image_size(resolution, name) == expected, (resolution, name)


def test_aspect_ratio_names_are_h_to_w():
    assert presets.ASPECT_RATIO_MAP == SPEC_ASPECT_RATIOS
    assert presets.image_size("240p", "9:16") == (240, 426)  # landscape: H < W
    assert presets.image_size("720p", "16:9") == (1280, 720)
    for name in set(SPEC_ASPECT_RATIOS) - {"50:27"}:
        h, w = presets.image_size("1080p", name)
        assert abs(h / w - presets.aspect_ratio_value(name)) < 0.02, name
    assert presets.aspect_ratio_value("9:16") == 9 / 16


def test_50_27_quirk_is_kept():
    # The reference maps "50:27" (1.85) to the 2.08 (= 25:12) sizes; we keep its table as is.
    assert presets.aspect_ratio_key("50:27") == "2.08"
    assert presets.image_size("240p", "50:27") == (462, 222)
    assert presets.aspect_ratio_value("50:27") == 50 / 27


def test_pixel_budgets_and_resolution_names():
    assert presets.resolution_names() == list(SPEC_PIXEL_BUDGETS)
    for name, budget in SPEC_PIXEL_BUDGETS.items():
        assert presets.num_pixels(name) == budget
    assert presets.image_size("2k", "9:16") == (1440, 2560)
    assert presets.image_size("4k", "9:16") == (2160, 3840)


def test_pixart_tables_only_match_12_25():
    # Their keys are spelled "0.5", "1.0", so only "12:25" ("0.48") finds a size, and nothing in "2880".
    assert presets.image_size("256", "12:25") == (176, 368)
    assert presets.image_size("1024", "12:25") == (704, 1472)
    assert presets.aspect_ratio_names("512") == ["12:25"]
    assert presets.aspect_ratio_names("2880") == []
    with pytest.raises(ValueError, match=r"'9:16' has no size at resolution '256'.*'12:25'"):
        presets.image_size("256", "9:16")
    with pytest.raises(ValueError, match="valid there: none"):
        presets.image_size("2880", "1:1")


def test_invalid_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown resolution '260p'.*'144p'.*'1080p'"):
        presets.image_size("260p", "9:16")
    with pytest.raises(ValueError, match=r"unknown aspect ratio '16:10'.*'9:16'.*'50:27'"):
        presets.image_size("240p", "16:10")
    with pytest.raises(ValueError, match="unknown aspect ratio"):
        presets.aspect_ratio_value("1.78")
    with pytest.raises(ValueError, match="unknown resolution"):
        presets.num_pixels("8k")


def test_num_frames_names_and_integers():
    names = {"1x": 51, "2s": 51, "2x": 102, "4s": 102, "4x": 204, "8s": 204, "8x": 408, "16s": 408, "16x": 816,
             "32s": 816}  # fmt: skip
    for name, frames in names.items():
        assert presets.num_frames(name) == frames
    assert presets.num_frames(68) == 68
    assert presets.num_frames("1") == 1
    assert presets.num_frames(np.int64(17)) == 17
    for bad in ("3s", "51.0", 51.0, True, None, "", "2 s"):
        with pytest.raises(ValueError, match=r"invalid frame count.*'2s'"):
            presets.num_frames(bad)
    with pytest.raises(ValueError, match="at least 1"):
        presets.num_frames(0)


def test_fps_defaults():
    assert presets.DEFAULT_FPS == 24
    assert presets.IMG_FPS == 120
    assert presets.model_fps(24, 51) == 24
    assert presets.model_fps(24, 1) == 120


@pytest.mark.parametrize(
    "frames, latents",
    [(1, 1), (51, 15), (68, 20), (102, 30), (204, 60), (408, 120), (816, 240),  # spec §5.4 table
     (17, 5), (16, 4), (18, 6), (21, 6), (22, 7), (34, 10)],
)  # fmt: skip
def test_latent_frames(frames, latents):
    assert presets.latent_frames(frames) == latents
    assert presets.latent_frames(frames, 17) == 5 * (frames // 17) + -(-(frames % 17) // 4)  # spec formula


def test_latent_frames_other_chunkings():
    assert presets.latent_frames(51, None) == 13  # one chunk: ceil(51 / 4)
    assert presets.latent_frames(16, 8) == 4
    with pytest.raises(ValueError, match="frames must be at least 1"):
        presets.latent_frames(0)
    with pytest.raises(ValueError, match="micro_frame_size"):
        presets.latent_frames(17, 0)


def test_latent_and_decoded_sizes():
    assert presets.latent_size(51, 240, 426) == (15, 30, 53)  # spec §1.2 step 7
    assert presets.latent_hw(720, 1280) == (90, 160)
    assert presets.decoded_hw(240, 426) == (240, 424)  # spec §1.2 step 11
    assert presets.decoded_hw(144, 256) == (144, 256)


def test_closest_ratio_key():
    assert presets.closest_ratio_key(720, 1280, "240p") == "0.56"
    assert presets.closest_ratio_key(1080, 1080, "480p") == "1.00"
    assert presets.closest_ratio_key(100, 10, "144p") == "2.08"
