"""Training data: CSV parsing, temporal crop, bucket assignment, batch plans, the grain loader (shapes,
determinism, resume, bad files), stored features and the synthetic dataset. Clips are tiny (32 px)."""

import csv
import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from opensora_jax import video_io
from opensora_jax.data import bucket_configs, synthetic
from opensora_jax.data.buckets import BucketKey, Buckets, plan_epoch
from opensora_jax.data.csv_dataset import CsvDataset
from opensora_jax.data.features import FeatureLoader, write_features
from opensora_jax.data.loader import VideoLoader
from opensora_jax.data.video import TooShortError, load_sample, sample_rng, temporal_crop_indices

# A one-resolution table small enough for 32-px clips; 8-frame video buckets take clips of > 8 frames.
RES = {"32px": (1024, {"0.50": (16, 32), "1.00": (32, 32)})}
CFG = {"32px": {1: (1.0, 2), 8: (1.0, 2)}}
LOADER_KW = dict(resolutions=RES, process_index=0, process_count=1)


def _write_csv(path, rows, columns=("path", "text", "num_frames", "height", "width", "fps")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """6 square clips (12 frames), 4 wide clips (32×64, 10 frames), 3 square images, and train.csv."""
    root = tmp_path_factory.mktemp("data")
    square = synthetic.make_dataset(root / "square", num_clips=6, frames=12, size=(32, 32), seed=0)
    wide = synthetic.make_dataset(root / "wide", num_clips=4, frames=10, size=(32, 64), seed=1)
    rows = []
    for sub, csv_path in (("square", square), ("wide", wide)):
        with open(csv_path) as f:
            for r in csv.DictReader(f):
                rows.append([f"{sub}/{r['path']}", r["text"], r["num_frames"], r["height"], r["width"], r["fps"]])
    rng = np.random.default_rng(0)
    for k in range(3):
        video_io.write_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), root / f"image{k}.png")
        rows.append([f"image{k}.png", f"image {k}", 1, 32, 32, ""])
    _write_csv(root / "train.csv", rows)
    return root


# -- CSV -------------------------------------------------------------------------------------------------------


def test_csv_parsing_and_bad_rows(data_dir):
    rows = [
        ["square/clips/clip_00000.mp4", "a clip", 12, 32, 32, 24, 5.5],  # relative to the CSV
        [str(data_dir / "image0.png"), "an image", "", "", "", "", ""],  # absolute; metadata probed
        ["nope/missing.mp4", "missing", 12, 32, 32, 24, ""],
        ["notes.txt", "unsupported", 1, 32, 32, "", ""],
        ["square/clips/clip_00001.mp4", "bad value", "abc", 32, 32, 24, ""],
        ["square/clips/clip_00002.mp4", "probed", "", "", "", "", ""],
    ]
    path = _write_csv(data_dir / "mixed.csv", rows, ("path", "text", "num_frames", "height", "width", "fps", "aes"))
    ds = CsvDataset(path)
    assert ds.num_rows == 6
    assert [s.index for s in ds.samples] == [0, 1, 5]
    assert ds.skipped == {"bad_metadata": 1, "missing": 1, "unsupported": 1}
    clip, image, probed = ds.samples
    assert clip.path == str(data_dir / "square/clips/clip_00000.mp4")
    assert (clip.num_frames, clip.height, clip.width, clip.fps, clip.extra["aes"]) == (12, 32, 32, 24.0, "5.5")
    assert (image.num_frames, image.height, image.width, image.is_image) == (1, 32, 32, True)
    assert (probed.num_frames, probed.height, probed.width, probed.fps) == (12, 32, 32, 24.0)


def test_csv_missing_required_column(tmp_path):
    path = _write_csv(tmp_path / "x.csv", [["a.mp4", 1]], ("path", "num_frames"))
    with pytest.raises(ValueError, match="required column.*text"):
        CsvDataset(path)


# -- temporal crop and sample loading --------------------------------------------------------------------------


def test_temporal_crop_formula():
    begin = int(np.random.default_rng(0).integers(0, 100 - 20 - 1 + 1))  # U{0 .. n − T·interval − 1}
    idx = temporal_crop_indices(100, 10, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, begin + np.array([0, 2, 4, 6, 8, 10, 12, 14, 16, 19]))
    # n == T·interval: the only start is 0; n < T·interval but ≥ T: linspace over what there is.
    np.testing.assert_array_equal(
        temporal_crop_indices(20, 10, 2, np.random.default_rng(5)), [0, 2, 4, 6, 8, 10, 12, 14, 16, 19]
    )
    np.testing.assert_array_equal(temporal_crop_indices(9, 8, 2, np.random.default_rng(5)), [0, 1, 2, 3, 4, 5, 6, 8])
    starts = {int(temporal_crop_indices(12, 8, 1, np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == {0, 1, 2, 3}  # max(0, 12 − 8 − 1) = 3, inclusive
    with pytest.raises(TooShortError):
        temporal_crop_indices(5, 8, 1, np.random.default_rng(0))


def test_load_sample(data_dir):
    clip = data_dir / "wide/clips/clip_00000.mp4"
    a, fps = load_sample(clip, 4, (16, 32), frame_interval=2, rng=sample_rng(0, 0, 3))
    b, _ = load_sample(clip, 4, (16, 32), frame_interval=2, rng=sample_rng(0, 0, 3))
    assert a.shape == (4, 16, 32, 3) and a.dtype == np.float32 and fps == 12.0  # 24 // 2
    assert -1 <= a.min() and a.max() <= 1 and a.max() > 0.5  # a bright shape on black
    np.testing.assert_array_equal(a, b)
    image, fps = load_sample(data_dir / "image0.png", 1, (16, 32), rng=sample_rng(0, 0, 0))
    assert image.shape == (1, 16, 32, 3) and fps == 120.0


# -- bucket assignment -----------------------------------------------------------------------------------------

# Trial order: 240p (budget 102240) T=17 → 0, T=1 → 1; 144p (36864) T=34 → 2, T=17 → 3, T=1 → 4.
HAND_CFG = {"144p": {1: (1.0, 4), 17: (1.0, 2), 34: ((1.0, 0.0), 2)}, "240p": {1: (0.0, 4), 17: (1.0, 2)}}


@pytest.mark.parametrize(
    "t, h, w, expected",
    [
        (20, 240, 426, ("240p", 17, "0.56")),  # 20 > 17: the 240p 17-frame bucket
        (20, 480, 640, ("240p", 17, "0.75")),  # larger videos go to the largest resolution; H/W 0.75
        (17, 240, 426, None),  # 17 > 17 fails (strict); 144p's 34 bucket has p_T = 0; T=1 takes no video
        (40, 144, 256, ("144p", 17, "0.56")),  # 36864 px < 0.8·102240; 34 skipped (p_T = 0)
        (1, 240, 426, ("144p", 1, "0.56")),  # image: 240p keeps images with p = 0, 144p with p = 1
        (1, 100, 295, ("144p", 1, "0.38")),  # 29500 px ≥ 0.8·36864 = 29491.2; H/W 0.339 → "0.38"
        (1, 100, 294, None),  # 29400 px: below every resolution
    ],
)
def test_assign_bucket_rules(t, h, w, expected):
    buckets = Buckets(HAND_CFG)
    assert buckets.num_bucket == 5 * 17
    assert [
        buckets.bucket_index(*k) for k in [("240p", 17), ("240p", 1), ("144p", 34), ("144p", 17), ("144p", 1)]
    ] == list(range(5))
    for sample_id in range(5):  # every probability here is 0 or 1: the outcome does not depend on the draw
        got = buckets.assign_bucket(t, h, w, sample_id, seed=7)
        assert got == (None if expected is None else BucketKey(*expected))


def test_assign_bucket_frame_interval():
    buckets = Buckets(HAND_CFG, frame_interval=2)
    assert buckets.assign_bucket(20, 240, 426, 0) is None  # 20 > 17·2 fails everywhere
    assert buckets.assign_bucket(35, 240, 426, 0) == BucketKey("240p", 17, "0.56")


def test_keep_probabilities_zero_and_one():
    buckets = Buckets({"144p": {1: (0.0, 1), 17: (1.0, 1)}})
    for i in range(300):
        assert buckets.assign_bucket(1, 144, 256, i, seed=i) is None
        assert buckets.assign_bucket(30, 144, 256, i, seed=i) == BucketKey("144p", 17, "0.56")


def test_keep_probabilities_draws():
    """p_T then p_res from one generator per (sample, bucket), seeded seed + epoch + id·num_bucket + index."""
    buckets = Buckets({"144p": {17: (0.5, 1), 34: ((0.7, 0.4), 1)}})
    num_bucket, seed, epoch = 2 * 17, 11, 3
    outcomes = set()
    for i in range(300):
        base = seed + epoch + i * num_bucket
        r34 = np.random.default_rng(base + 0)  # T=34 is tried first
        if r34.random() <= 0.4:  # passes p_T; 40 > 34
            expected = 34 if r34.random() < 0.7 else None  # failing p_res moves to the next resolution
        else:
            expected = 17 if np.random.default_rng(base + 1).random() < 0.5 else None
        got = buckets.assign_bucket(40, 144, 256, i, seed=seed, epoch=epoch)
        assert (got and got.num_frames) == expected
        outcomes.add(expected)
    assert outcomes == {34, 17, None}


def test_stage_configs_parse():
    for name, cfg in bucket_configs.STAGES.items():
        buckets = Buckets(cfg)
        assert buckets.resolutions[0] == "2048" and buckets.resolutions[-1] == "144p", name
    assert Buckets(bucket_configs.STAGE1).num_bucket == 626
    assert bucket_configs.STAGE3["480p"][408] == (0.0, None)
    assert Buckets(bucket_configs.STAGE3).assign_bucket(500, 480, 854, 0) != BucketKey("480p", 408, "0.56")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"999p": {1: (1.0, 1)}}, "unknown resolution '999p'"),
        ({"144p": {1: (1.5, 1)}}, r"\[1\]: a keep probability"),
        ({"144p": {17: (0.5, None)}}, "batch_size None"),
        ({"144p": {17: (0.5, 0)}}, "batch_size must be a positive integer"),
    ],
)
def test_bad_bucket_config(cfg, message):
    with pytest.raises(ValueError, match=message):
        Buckets(cfg)


# -- batch plan ------------------------------------------------------------------------------------------------

A, B = BucketKey("144p", 17, "0.56"), BucketKey("144p", 1, "1.00")
PLAN_CFG = {"144p": {1: (1.0, 2), 17: (1.0, 3)}}
GROUPS = {A: list(range(10)), B: list(range(100, 105))}


def test_plan_drops_tails_and_is_deterministic():
    buckets = Buckets(PLAN_CFG)
    plan = plan_epoch(GROUPS, buckets, seed=1, epoch=0)
    assert sorted(b.bucket for b in plan.batches) == sorted([A] * 3 + [B] * 2)  # 10 // 3, 5 // 2
    assert all(len(b.indices) == buckets.batch_size(b.bucket) for b in plan.batches)
    used = [i for b in plan.batches for i in b.indices]
    assert len(used) == len(set(used)) == 13
    assert plan == plan_epoch(GROUPS, buckets, seed=1, epoch=0)
    orders = {tuple(plan_epoch(GROUPS, buckets, seed=1, epoch=e).batches) for e in range(5)}
    assert len(orders) > 1  # the epoch reshuffles


@pytest.mark.parametrize("shard", ["rows", "batches"])
def test_plan_process_shards(shard):
    buckets = Buckets(PLAN_CFG)
    plans = [
        plan_epoch(GROUPS, buckets, seed=3, epoch=1, process_index=p, process_count=2, shard=shard) for p in (0, 1)
    ]
    assert len(plans[0].batches) == len(plans[1].batches) > 0
    used = [i for plan in plans for b in plan.batches for i in b.indices]
    assert len(used) == len(set(used))  # no sample twice
    if shard == "rows":  # same bucket for every process at every step, each its batch_size rows
        assert [b.bucket for b in plans[0].batches] == [b.bucket for b in plans[1].batches]
        # Global batches of batch_size·2: 10 // 6 = 1 of A, 5 // 4 = 1 of B.
        assert sorted(b.bucket for b in plans[0].batches) == sorted([A, B])
    assert all(len(b.indices) == buckets.batch_size(b.bucket) for plan in plans for b in plan.batches)


# -- loader ----------------------------------------------------------------------------------------------------


def _summary(batch):
    return batch["index"].tolist(), batch["video"].shape, round(float(np.asarray(batch["video"], np.float64).sum()), 3)


def test_batches_follow_bucket_config(data_dir):
    loader = VideoLoader(str(data_dir / "train.csv"), CFG, seed=0, num_epochs=1, **LOADER_KW)
    batches = list(loader)
    shapes = sorted(b["video"].shape for b in batches)
    # 6 square clips → 3 batches of 8×32×32; 4 wide → 2 of 8×16×32; 3 images → 1 (the odd one dropped).
    assert shapes == [(2, 1, 32, 32, 3)] + [(2, 8, 16, 32, 3)] * 2 + [(2, 8, 32, 32, 3)] * 3
    for b in batches:
        _, t, h, w, _ = b["video"].shape
        assert b["video"].dtype == np.float32 and -1 <= b["video"].min() and b["video"].max() <= 1
        assert b["text"].dtype.kind == "U" and b["text"].shape == (2,)
        for key, value in (("num_frames", t), ("height", h), ("width", w), ("ar", h / w)):
            assert b[key].dtype == np.float32 and np.allclose(b[key], value), key
        assert b["fps"].tolist() == ([120.0] * 2 if t == 1 else [24.0] * 2)
        assert b["index"].dtype == np.int64
    assert all(
        re.fullmatch(r"a \w+ \w+ moving \w+ on a black background", t)
        for b in batches
        if b["video"].shape[1] > 1
        for t in b["text"]
    )
    assert loader.skipped == {}


def test_loader_determinism(data_dir):
    def run(seed):
        return [
            _summary(b) for b in VideoLoader(str(data_dir / "train.csv"), CFG, seed=seed, num_epochs=1, **LOADER_KW)
        ]

    assert run(0) == run(0)
    loader = VideoLoader(str(data_dir / "train.csv"), CFG, seed=0, **LOADER_KW)
    assert loader.plan(0) != VideoLoader(str(data_dir / "train.csv"), CFG, seed=5, **LOADER_KW).plan(0)


def test_iterator_state_resumes_at_next_batch(data_dir):
    def loader():
        return VideoLoader(str(data_dir / "train.csv"), CFG, seed=2, num_epochs=2, **LOADER_KW)

    full = [_summary(b) for b in loader()]
    assert len(full) == 12
    for stop in (4, 6, 7):  # inside epoch 0, at its end, inside epoch 1
        it = iter(loader())
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(loader())
        resumed.set_state(state)
        assert [_summary(next(resumed)) for _ in range(2)] == full[stop : stop + 2]
    other = iter(VideoLoader(str(data_dir / "train.csv"), CFG, seed=3, **LOADER_KW))
    with pytest.raises(ValueError, match="seed=2"):
        other.set_state(state)


def test_worker_processes_match_in_process(data_dir):
    kw = dict(seed=0, num_epochs=1, **LOADER_KW)
    in_process = [_summary(b) for b in VideoLoader(str(data_dir / "train.csv"), CFG, **kw)]
    with iter(VideoLoader(str(data_dir / "train.csv"), CFG, num_workers=1, **kw)) as it:
        assert [_summary(b) for b in it] == in_process


def test_missing_and_corrupt_files(data_dir, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not an mp4 file" * 10)
    rows = [[str(data_dir / f"square/clips/clip_{k:05d}.mp4"), f"clip {k}", 12, 32, 32, 24] for k in range(4)]
    rows += [[str(tmp_path / "gone.mp4"), "missing", 12, 32, 32, 24], [str(corrupt), "corrupt", 12, 32, 32, 24]]
    path = _write_csv(tmp_path / "bad.csv", rows)
    loader = VideoLoader(path, {"32px": {8: (1.0, 1)}}, seed=0, num_epochs=1, **LOADER_KW)
    batches = list(loader)
    assert len(batches) == 5  # the 4 good clips and the corrupt one (substituted); the missing one dropped
    assert 5 not in [int(b["index"][0]) for b in batches]
    assert loader.skipped == {"decode_error": 1, "missing": 1}
    assert loader.substitutions == 1


# -- stored features -------------------------------------------------------------------------------------------


def _encode_video(video):
    return (video[:, ::4, ::8, ::8, :] * 2).astype(ml_dtypes.bfloat16)  # (B, T', H', W', C)


def _encode_text(texts):
    y = np.array([[[len(t), k] for k in range(3)] for t in texts], np.float32)  # (B, L=3, C=2)
    return y, np.ones(y.shape[:2], np.int32)


def test_features_roundtrip_and_resume(data_dir, tmp_path):
    loader = VideoLoader(str(data_dir / "train.csv"), CFG, seed=0, num_epochs=1, **LOADER_KW)
    batches = list(loader)
    write_features(batches, tmp_path, _encode_video, _encode_text, name="part0")
    assert sorted(os.listdir(tmp_path)) == [f"part0-{k:06d}.npz" for k in range(6)] + ["part0.index.json"]

    reader = FeatureLoader(tmp_path, seed=1, num_epochs=2, process_index=0, process_count=1)
    read = list(reader)
    assert len(read) == 12
    by_index = {tuple(b["index"].tolist()): b for b in batches}
    for r in read:
        src = by_index[tuple(r["index"].tolist())]
        assert set(r) == {"latent", "y", "mask", "num_frames", "height", "width", "fps", "ar", "index"}
        assert r["latent"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(r["latent"], _encode_video(src["video"]))
        np.testing.assert_array_equal(r["y"], _encode_text(src["text"])[0])
        np.testing.assert_array_equal(r["height"], src["height"])

    it = iter(FeatureLoader(tmp_path, seed=1, num_epochs=2, process_index=0, process_count=1))
    for _ in range(7):
        next(it)
    resumed = iter(FeatureLoader(tmp_path, seed=1, num_epochs=2, process_index=0, process_count=1))
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert next(resumed)["index"].tolist() == read[7]["index"].tolist()

    halves = [
        list(FeatureLoader(tmp_path, seed=1, num_epochs=1, process_index=p, process_count=2, shard="rows"))
        for p in (0, 1)
    ]
    for a, b, whole in zip(*halves, read[:6], strict=True):
        assert a["index"].tolist() + b["index"].tolist() == whole["index"].tolist()


# -- synthetic dataset -----------------------------------------------------------------------------------------


def test_synthetic_dataset(tmp_path, capsys):
    a = synthetic.make_dataset(tmp_path / "a", num_clips=3, frames=9, size=(32, 48), seed=4)
    b = synthetic.make_dataset(tmp_path / "b", num_clips=3, frames=9, size=(32, 48), seed=4)
    text_a = a.read_text()
    assert text_a == b.read_text()
    assert text_a.splitlines()[0] == "path,text,num_frames,height,width,fps"
    ds = CsvDataset(a)
    assert len(ds) == 3 and ds.skipped == {}
    for s in ds.samples:
        assert re.fullmatch(
            r"a (red|green|blue|yellow|cyan|magenta|white|purple) (circle|square|triangle) "
            r"moving (left|right|up|down) on a black background",
            s.text,
        )
        assert (s.num_frames, s.height, s.width, s.fps) == (9, 32, 48, 24.0)
        frames = video_io.read_frames(s.path)
        assert frames.shape == (9, 32, 48, 3)
        np.testing.assert_array_equal(
            frames, video_io.read_frames(s.path.replace(os.sep + "a" + os.sep, os.sep + "b" + os.sep))
        )
    assert synthetic.make_dataset(tmp_path / "c", num_clips=3, frames=9, size=(32, 48), seed=5).read_text() != text_a

    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("OUT_DIR", "--num-clips", "--frames", "--size", "--seed", "--fps"):
        assert flag in help_text


def test_synthetic_npy_clips_and_short_captions(tmp_path):
    """--format npy stores the exact rendered frames (lossless, no decoder); short captions drop the
    background suffix for about the asked fraction of clips, and never change the clips themselves."""
    npy = synthetic.make_dataset(tmp_path / "npy", num_clips=40, frames=6, size=(16, 16), seed=3, format="npy",
                                 short_caption_ratio=0.5)
    mp4 = synthetic.make_dataset(tmp_path / "mp4", num_clips=40, frames=6, size=(16, 16), seed=3)
    ds = CsvDataset(npy)
    assert len(ds) == 40 and ds.skipped == {}
    short = [s for s in ds.samples if not s.text.endswith(" on a black background")]
    assert 10 <= len(short) <= 30
    for s in short:
        assert re.fullmatch(r"a \w+ (circle|square|triangle) moving (left|right|up|down)", s.text)
    long_texts = {r.split(",")[1] for r in mp4.read_text().splitlines()[1:]}
    for k, s in enumerate(ds.samples):
        assert s.path.endswith(f"clip_{k:05d}.npy")
        frames = video_io.read_frames(s.path)
        rng = np.random.default_rng([3, k])
        shape = synthetic.SHAPES[rng.integers(3)]
        colour = list(synthetic.COLOURS)[rng.integers(len(synthetic.COLOURS))]
        direction = list(synthetic.DIRECTIONS)[rng.integers(4)]
        np.testing.assert_array_equal(frames, synthetic.render_clip(shape, colour, direction, 6, 16, 16, rng))
        assert synthetic.caption(shape, colour, direction) in long_texts
    assert load_probe_frames(ds.samples[0].path) == (6, 16, 16)
    with pytest.raises(ValueError, match="format"):
        synthetic.make_dataset(tmp_path / "bad", num_clips=1, frames=2, size=(16, 16), format="gif")


def load_probe_frames(path):
    from opensora_jax.data.video import probe

    info = probe(path)
    return info.num_frames, info.height, info.width


def test_array_video_rejects_wrong_arrays(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="bad.npy.*uint8"):
        video_io.read_video(bad)
    with pytest.raises(TypeError, match="uint8"):
        video_io.write_array_video(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.npy")
    video_io.write_array_video(np.full((2, 8, 8, 3), 7, np.uint8), tmp_path / "ok.npy")
    assert video_io.read_video(tmp_path / "ok.npy").frames.sum() == 7 * 2 * 8 * 8 * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "ok.npy"]  # no temporaries left


def test_synthetic_motion_direction():
    rng = np.random.default_rng(0)
    for direction, axis, sign in (("left", 2, -1), ("right", 2, 1), ("up", 1, -1), ("down", 1, 1)):
        frames = synthetic.render_clip("circle", "red", direction, 5, 32, 32, rng)
        centroids = [np.argwhere(f[..., 0] > 0).mean(0)[axis - 1] for f in frames]
        assert all(sign * np.diff(centroids) > 0), direction
        assert frames[..., 1:].max() == 0  # pure red
