"""The bad-input matrix: every CLI, run as a user would run it, with one mistake per row.

Each row must end with exit status 2 and exactly one line on stderr (`error: ...`, naming the flag or path),
write nothing (no file or directory appears or changes under the row's working directory or the shared
inputs), and stop before any real work: the child's CPU time (user + system, from wait4) stays under 10 s.
Wall time is printed too, but only bounded loosely (60 s): on a shared 2-core machine under load it measures
the neighbours more than the CLI. Rows run two at a time; the totals are printed at the end (run with -s).
The default run takes 42 rows (at least one per check kind and CLI); `pytest -m slow` runs the other 24.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO_ROOT, fixtures_root

PY = sys.executable
DEMO = REPO_ROOT / "assets" / "demo"
CPU_LIMIT_S = 10.0
WALL_LIMIT_S = 60.0
PARALLEL = 2

SAMPLE = [PY, str(REPO_ROOT / "sample.py")]
V2 = [*SAMPLE, "--family", "opensora_v2_0", "--prompt", "raining, sea"]
TRAIN = [PY, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs/demo/train_tiny.py"),
         "--csv", "{good_csv}", "--config.vae", str(DEMO / "vae"), "--config.t5", str(DEMO / "t5"),
         "--config.model.caption_channels=64", "--out-dir", "run"]
TRAIN_VAE = [PY, str(REPO_ROOT / "train_vae.py"), "--config", str(REPO_ROOT / "configs/demo/vae_tiny.py"),
             "--csv", "{good_csv}", "--out-dir", "run"]
FEATURES = [PY, "-m", "opensora_jax.cli.features", "features", "--vae", str(DEMO / "vae"), "--t5", str(DEMO / "t5")]
CONVERT = [PY, "-m", "convert"]
PLAN = [PY, "-m", "opensora_jax.tools.plan_cli"]
PARITY = [PY, "-m", "opensora_jax.parity"]
STDIT3_FIXTURE = "{fixtures}/opensora_v1_2/stdit3_tiny"
VAE_FIXTURE = "{fixtures}/opensora_v1_2/vae_v1_2_tiny"

# (row id, command line, a word the error line must contain); "{name}" is an input made by `inputs` below.
ROWS = [
    # sample.py, the demo model (v1.2)
    ("sample steps -3", [*SAMPLE, "--prompt", "a red circle", "--steps", "-3"], "--steps"),
    ("sample steps 0", [*SAMPLE, "--prompt", "a red circle", "--steps", "0"], "--steps"),
    ("sample steps not a number", [*SAMPLE, "--prompt", "a red circle", "--steps", "many"], "--steps"),
    ("sample num-sample 0", [*SAMPLE, "--prompt", "a red circle", "--num-sample", "0"], "--num-sample"),
    ("sample batch-size 0", [*SAMPLE, "--prompt", "a red circle", "--batch-size", "0"], "--batch-size"),
    ("sample save-fps 0", [*SAMPLE, "--prompt", "a red circle", "--save-fps", "0"], "--save-fps"),
    ("sample cfg-scale nan", [*SAMPLE, "--prompt", "a red circle", "--cfg-scale", "nan"], "--cfg-scale"),
    ("sample huge num-frames", [*SAMPLE, "--prompt", "a red circle", "--num-frames", "1000000"], "--num-frames"),
    ("sample seed -1", [*SAMPLE, "--prompt", "a red circle", "--seed", "-1"], "--seed"),
    ("sample loop 0", [*SAMPLE, "--prompt", "a red circle", "--loop", "0"], "--loop"),
    ("sample empty prompt", [*SAMPLE, "--prompt", "  "], "--prompt"),
    ("sample no prompt at all", [*SAMPLE, "--prompt-file", "{empty_txt}"], "prompt"),
    ("sample binary prompt file", [*SAMPLE, "--prompt-file", "{binary}"], "--prompt-file"),
    ("sample prompt file is a symlink loop", [*SAMPLE, "--prompt-file", "{loop}"], "--prompt-file"),
    ("sample prompt file is a directory", [*SAMPLE, "--prompt-file", "{a_dir}"], "--prompt-file"),
    ("sample out-dir is a file", [*SAMPLE, "--prompt", "a red circle", "--out-dir", "{a_file}"], "--out-dir"),
    ("sample out-dir under a file", [*SAMPLE, "--prompt", "a red circle", "--out-dir", "{a_file}/out"], "--out-dir"),
    ("sample out-dir unwritable", [*SAMPLE, "--prompt", "a red circle", "--out-dir", "{unwritable}/out"], "--out-dir"),
    ("sample demo resolution", [*SAMPLE, "--prompt", "a red circle", "--resolution", "720p"], "--resolution"),
    ("sample bad dtype", [*SAMPLE, "--prompt", "a red circle", "--dtype", "float64"], "--dtype"),
    ("sample unknown mesh axis", [*SAMPLE, "--prompt", "a red circle", "--mesh", "pipeline=2"], "pipeline"),
    ("sample bad attention", [*SAMPLE, "--prompt", "a red circle", "--attention", "fast"], "--attention"),
    ("sample reference not an image", [*SAMPLE, "--prompt", "a red circle", "--reference", "{fake_png}"], "fake.png"),
    ("sample stdit3 is a VAE", [*SAMPLE, "--prompt", "x", "--stdit3", str(DEMO / "vae"), "--vae", str(DEMO / "vae"),
                                "--t5", str(DEMO / "t5")], "--stdit3"),
    ("sample missing t5", [*SAMPLE, "--prompt", "x", "--stdit3", str(DEMO / "stdit3"), "--vae", str(DEMO / "vae"),
                           "--t5", "{missing}"], "--t5"),
    ("sample unknown family", [*SAMPLE, "--family", "opensora_v9", "--prompt", "x"], "--family"),
    # sample.py --family opensora_v2_0
    ("v2 guidance nan", [*V2, "--guidance", "nan"], "--guidance"),
    ("v2 num-frames not 4k+1", [*V2, "--num-frames", "100"], "--num-frames"),
    ("v2 steps 0", [*V2, "--steps", "0"], "--steps"),
    ("v2 mmdit is an STDiT3", [*V2, "--mmdit", str(DEMO / "stdit3")], "--mmdit"),
    ("v2 ckpt-dir missing", [*V2, "--ckpt-dir", "{missing}"], "--ckpt-dir"),
    ("v2 unknown cond-type", [*V2, "--cond-type", "x2y"], "cond"),
    ("v2 i2v without reference", [*V2, "--cond-type", "i2v_head"], "--reference"),
    ("v2 unknown aspect ratio", [*V2, "--aspect-ratio", "7:5"], "7:5"),
    # train.py
    ("train steps 0", [*TRAIN, "--steps", "0"], "--steps"),
    ("train lr nan", [*TRAIN, "--lr", "nan"], "--lr"),
    ("train ckpt-every 0", [*TRAIN, "--ckpt-every", "0"], "--ckpt-every"),
    ("train bad dtype", [*TRAIN, "--dtype", "float64"], "--dtype"),
    ("train unknown mesh axis", [*TRAIN, "--mesh", "pipeline=2"], "pipeline"),
    ("train csv missing", [*TRAIN, "--csv", "{missing}.csv"], "--csv"),
    ("train csv without columns", [*TRAIN, "--csv", "{nocols_csv}"], "path"),
    ("train csv is a directory", [*TRAIN, "--csv", "{a_dir}"], "--csv"),
    ("train empty features dir", [*TRAIN, "--features", "{a_dir}"], "--features"),
    ("train t5 is a VAE", [*TRAIN, "--config.t5", str(DEMO / "vae")], "--config.t5"),
    ("train out-dir is a file", [*TRAIN, "--out-dir", "{a_file}"], "--out-dir"),
    ("train unknown config field", [*TRAIN, "--config.no_such_field=1"], "no_such_field"),
    # train_vae.py
    ("train_vae stage 7", [*TRAIN_VAE, "--stage", "7"], "stage"),
    ("train_vae lr inf", [*TRAIN_VAE, "--lr", "inf"], "--lr"),
    ("train_vae binary csv", [*TRAIN_VAE, "--csv", "{binary}"], "--csv"),
    ("train_vae from a T5", [*TRAIN_VAE, "--config.from_pretrained", str(DEMO / "t5")], "from_pretrained"),
    # opensora-features
    ("features csv missing", [*FEATURES, "--csv", "{missing}.csv"], "--csv"),
    ("features vae is a T5", [*FEATURES, "--csv", "{good_csv}", "--vae", str(DEMO / "t5")], "--vae"),
    ("features frame-interval 0", [*FEATURES, "--csv", "{good_csv}", "--frame-interval", "0"], "--frame-interval"),
    ("features unknown bucket config", [*FEATURES, "--csv", "{good_csv}", "--bucket-config", "huge"], "bucket_config"),
    # python -m convert
    ("convert wrong model family", [*CONVERT, "stdit3", VAE_FIXTURE, "out"], "stdit3"),
    ("convert src missing", [*CONVERT, "stdit3", "{missing}", "out"], "SRC"),
    ("convert out-dir is a file", [*CONVERT, "stdit3", STDIT3_FIXTURE, "{a_file}"], "OUT_DIR"),
    ("convert out-dir not empty", [*CONVERT, "stdit3", STDIT3_FIXTURE, "{non_empty}"], "--overwrite"),
    ("convert bad dtype", [*CONVERT, "stdit3", STDIT3_FIXTURE, "out", "--dtype", "float64"], "--dtype"),
    ("convert binary config", [*CONVERT, "stdit3", STDIT3_FIXTURE, "out", "--config", "{binary}"], "--config"),
    # opensora-plan
    ("plan batch 0", [*PLAN, "--batch", "0"], "--batch"),
    ("plan unknown mesh axis", [*PLAN, "--mesh", "pipeline=2"], "pipeline"),
    ("plan unknown resolution", [*PLAN, "--resolution", "999p"], "999p"),
    # opensora-parity
    ("parity case missing", [*PARITY, "{missing}"], "missing"),
    ("parity file as case", [*PARITY, "{a_file}"], "a_file"),
    ("parity json is a directory", [*PARITY, STDIT3_FIXTURE, "--json", "{a_dir}"], "--json"),
]


@dataclasses.dataclass
class Result:
    row: str
    code: int
    stderr: str
    cpu_s: float
    wall_s: float
    changed: list


def _make_inputs(root: pathlib.Path) -> dict[str, str]:
    """The files the rows point at, in one shared directory that no row may change."""
    root.mkdir()
    (root / "good.csv").write_text("path,text,num_frames,height,width,fps\nclip.npy,a red circle moving left,17,32,32,8\n")
    (root / "nocols.csv").write_text("file,caption\nclip.npy,a red circle\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "empty.txt").write_text("\n\n")
    (root / "a_file").write_text("a plain file\n")
    (root / "fake.png").write_text("this is text, not a PNG\n")
    (root / "a_dir").mkdir()
    (root / "non_empty").mkdir()
    (root / "non_empty" / "keep.txt").write_text("mine\n")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    if os.geteuid() == 0:  # root writes anywhere a mode bit forbids; /proc/sys refuses even root
        unwritable = pathlib.Path("/proc/sys")
    else:
        unwritable = root / "read_only"
        unwritable.mkdir()
        unwritable.chmod(0o555)
    return {"good_csv": str(root / "good.csv"), "nocols_csv": str(root / "nocols.csv"),
            "binary": str(root / "binary.bin"), "empty_txt": str(root / "empty.txt"), "a_file": str(root / "a_file"),
            "fake_png": str(root / "fake.png"), "a_dir": str(root / "a_dir"), "non_empty": str(root / "non_empty"),
            "loop": str(root / "loop_a"), "missing": str(root / "missing"), "unwritable": str(unwritable),
            "fixtures": str(fixtures_root())}


def _snapshot(*roots: pathlib.Path) -> dict[str, tuple]:
    """Every path under `roots` (symlinks not followed) with its type, size and modification time."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def _run(argv: list[str], cwd: pathlib.Path) -> tuple[int, str, float, float]:
    """(exit status, stderr, child CPU seconds, wall seconds) of one command."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    killer = threading.Timer(2 * WALL_LIMIT_S, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # waits and reaps, with this child's resource usage
    finally:
        killer.cancel()
    wall = time.perf_counter() - start
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err[0].decode("utf-8", "replace"), usage.ru_utime + usage.ru_stime, wall


def _run_row(row, inputs: dict[str, str], work: pathlib.Path) -> Result:
    name, argv, _ = row
    cwd = work / name.replace(" ", "_")
    cwd.mkdir()
    argv = [a.format(**inputs) for a in argv]
    roots = [cwd, pathlib.Path(inputs["a_dir"]).parent]
    before = _snapshot(*roots)
    code, stderr, cpu, wall = _run(argv, cwd)
    after = _snapshot(*roots)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return Result(name, code, stderr, cpu, wall, changed)


# The rows of the default run (one or more per check kind and CLI); the rest run with `pytest -m slow`.
DEFAULT_ROWS = {
    "sample steps -3", "sample steps 0", "sample steps not a number", "sample num-sample 0", "sample batch-size 0",
    "sample save-fps 0", "sample cfg-scale nan", "sample huge num-frames", "sample empty prompt",
    "sample binary prompt file", "sample prompt file is a symlink loop", "sample prompt file is a directory",
    "sample out-dir is a file", "sample out-dir unwritable", "sample demo resolution", "sample reference not an image",
    "sample stdit3 is a VAE", "v2 guidance nan", "v2 num-frames not 4k+1", "v2 mmdit is an STDiT3",
    "v2 i2v without reference", "train steps 0", "train lr nan", "train bad dtype", "train unknown mesh axis",
    "train csv missing", "train csv without columns", "train empty features dir", "train t5 is a VAE",
    "train_vae stage 7", "train_vae from a T5", "features vae is a T5", "features frame-interval 0",
    "convert wrong model family", "convert src missing", "convert out-dir not empty", "convert binary config",
    "plan batch 0", "plan unknown resolution", "parity case missing", "parity file as case",
    "parity json is a directory",
}


def _check_rows(rows, tmp_path) -> None:
    """Runs `rows` (PARALLEL at a time), prints the table and its totals, and fails listing every bad row."""
    inputs = _make_inputs(tmp_path / "inputs")
    if not fixtures_root().is_dir():
        pytest.fail(f"fixture directory {fixtures_root()} not found; set OPENSORA_FIXTURES")
    work = tmp_path / "rows"
    work.mkdir()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda row: _run_row(row, inputs, work), rows))

    failures = []
    for (name, _, word), r in zip(rows, results):
        lines = r.stderr.strip().splitlines()
        problems = []
        if r.code != 2:
            problems.append(f"exit status {r.code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{len(lines)} stderr lines")
        elif word.lower() not in lines[0].lower():
            problems.append(f"the error does not name {word!r}")
        if r.changed:
            problems.append(f"wrote {r.changed[:3]}")
        if r.cpu_s >= CPU_LIMIT_S or r.wall_s >= WALL_LIMIT_S:
            problems.append(f"took {r.cpu_s:.1f} s CPU / {r.wall_s:.1f} s wall")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    stderr: {r.stderr.strip()[-600:]!r}")
    for r in results:
        print(f"  {r.row:38s} exit {r.code}  {r.cpu_s:4.1f} s CPU  {r.wall_s:4.1f} s wall  {r.stderr.strip()[:100]}")
    slowest = max(results, key=lambda r: r.wall_s)
    print(f"bad-input matrix: {len(rows)} rows, {len(rows) - len(failures)} passed; max {max(r.cpu_s for r in results):.1f} s"
          f" CPU per row (limit {CPU_LIMIT_S:.0f}), max {slowest.wall_s:.1f} s wall ({slowest.row}); {PARALLEL} at a time")
    assert not failures, "\n".join(failures)


def test_bad_input_matrix(tmp_path):
    rows = [row for row in ROWS if row[0] in DEFAULT_ROWS]
    assert len(rows) == len(DEFAULT_ROWS) >= 40
    _check_rows(rows, tmp_path)


@pytest.mark.slow
def test_bad_input_matrix_more_rows(tmp_path):
    _check_rows([row for row in ROWS if row[0] not in DEFAULT_ROWS], tmp_path)


# ------------------------------------------------------------------ what the model does not know, bad files


def test_words_outside_the_vocabulary_are_named_once_per_prompt():
    import warnings

    from opensora_jax.text.tokenizer import UnknownWordsWarning, load_tokenizer, tokenize

    tok = load_tokenizer(DEMO / "t5" / "tokenizer")  # the demo's word tokenizer: colours, shapes, directions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize(tok, ["a blue square moving up", "a purple dragon flying over a dragon"], 16)
    unknown = [w for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(unknown) == 1
    message = str(unknown[0].message)
    assert message.startswith("prompt 1 ") and "'dragon', 'flying', 'over'" in message and "'purple'" not in message


def test_cli_warnings_are_one_line(tmp_path):
    code = ("import warnings, sys\n"
            "from opensora_jax.config_utils import run_cli\n"
            "from opensora_jax.text.tokenizer import UnknownWordsWarning\n"
            "def main(argv):\n"
            "    warnings.warn('prompt 0: the tokenizer does not know x', UnknownWordsWarning)\n"
            "    return 0\n"
            "sys.exit(run_cli(main, []))\n")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and proc.stderr.splitlines() == ["warning: prompt 0: the tokenizer does not know x"]


def test_an_undecodable_training_video_is_one_line(tmp_path, caplog):
    import logging

    from opensora_jax.data.csv_dataset import CsvDataset
    from opensora_jax.video_io import VideoDecodeError, read_video

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 not a video " * 300)
    with pytest.raises(VideoDecodeError) as error:
        read_video(bad)
    assert "\n" not in str(error.value) and "broken.mp4" in str(error.value) and "ffmpeg version" not in str(error.value)
    (tmp_path / "data.csv").write_text("path,text\nbroken.mp4,a red circle\n")  # no metadata: the file is probed
    with caplog.at_level(logging.WARNING):
        dataset = CsvDataset(tmp_path / "data.csv")
    assert dataset.skipped == {"decode_error": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "broken.mp4" in lines[0], lines
