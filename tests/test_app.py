"""The web app (opensora_jax.app) through Gradio's own client: one server on the demo model for the whole module.

A generation returns an MP4 of the demo's shape, equal frame for frame to `python sample.py` with the same settings;
bad input comes back as a clear message while the server keeps serving; two requests at once both complete, the
second shown as queued; progress reaches the client.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import socket
import time

import numpy as np
import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


from opensora_jax import video_io  # noqa: E402
from opensora_jax.app import cli as app_cli  # noqa: E402
from opensora_jax.app.controls import (Controls, Request, page_message, request_config,  # noqa: E402
                                       sample_command)
from opensora_jax.app.ui import run_with_progress  # noqa: E402
from opensora_jax.cli import sample  # noqa: E402
from opensora_jax.config_utils import run_cli  # noqa: E402
from opensora_jax.errors import UserError  # noqa: E402
from opensora_jax.pipelines.run import check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own use of pandas

PROMPT = "a blue square moving up"
STEPS = 3  # few steps: the tests check the plumbing, not the pictures
DEMO_SHAPE = (17, 128, 128, 3)  # 17 frames of 32x32, saved enlarged 4x (configs/demo/sample.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form(prompt=PROMPT, *, resolution="32x32", aspect_ratio="1:1", num_frames="17", steps=STEPS, guidance=2.5,
         seed=7, random_seed=False, reference=None, conditioning="none"):
    """The "/generate" endpoint's arguments, in the page's order (opensora_jax.app.ui.FORM)."""
    return (prompt, "", resolution, aspect_ratio, num_frames, steps, guidance, seed, random_seed, reference,
            conditioning)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("app_out")
    generator = app_cli.load_generator(["--out-dir", str(out_dir)])
    page, url = app_cli.serve(generator, "127.0.0.1", free_port())
    client = gradio_client.Client(url, verbose=False)
    yield generator, client, out_dir
    client.close()
    page.close()


@pytest.fixture(scope="module")
def first_result(server):
    _, client, _ = server
    return client.predict(*form(), api_name="/generate")


def test_a_generation_returns_an_mp4_of_the_demo_shape_with_its_files_and_settings(first_result):
    video, grid, files, settings, seed = first_result
    frames = video_io.read_video(video).frames
    assert frames.shape == DEMO_SHAPE and frames.dtype == np.uint8
    assert frames.max() > 0, "an all-black video: nothing was drawn"
    assert pathlib.Path(grid).suffix == ".png" and video_io.read_image(grid).ndim == 3
    assert sorted(pathlib.Path(f).suffix for f in files) == [".json", ".mp4"]
    sidecar = json.loads(next(pathlib.Path(f) for f in files if f.endswith(".json")).read_text())
    assert sidecar["prompt_sent"] == PROMPT and sidecar["seed"] == 7 and sidecar["frames"] == 17
    assert sidecar["config"]["scheduler"]["num_sampling_steps"] == STEPS
    assert seed == 7
    assert settings["steps"] == STEPS and settings["seed"] == 7 and settings["size"].startswith("32x32")
    assert shlex.split(settings["command"])[:2] == ["python", "sample.py"]


def test_the_app_makes_the_same_video_as_sample_py(first_result, tmp_path, capsys):
    """The acceptance check: the page's video and `python sample.py` with the same prompt, seed and steps have the
    same decoded frames (and the command the page shows is that sample.py command)."""
    video, _, _, settings, _ = first_result
    argv = ["--prompt", PROMPT, "--seed", "7", "--steps", str(STEPS), "--out-dir", str(tmp_path)]
    assert run_cli(sample.main, argv) == 0
    ours = video_io.read_video(video).frames
    theirs = video_io.read_video(tmp_path / "sample_0000.mp4").frames
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    shown = sample.make_config(shlex.split(settings["command"])[2:])
    wanted = sample.make_config(argv)
    for field in ("prompts", "seed", "num_frames", "stdit3", "vae", "t5"):
        assert shown[field] == wanted[field], field
    assert shown.scheduler.to_dict() == wanted.scheduler.to_dict()


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "the prompt is empty"),
    (dict(num_frames="0"), "17-frame videos only"),
    (dict(num_frames="many"), "17-frame videos only"),
    (dict(resolution="240p"), "trained at 32x32 only"),
    (dict(steps=0), "Steps must be a whole number ≥ 1, got 0"),
    (dict(steps=2.5), "Steps must be a whole number ≥ 1, got 2.5"),
    (dict(conditioning="0"), "needs a reference image or video"),
    ("unreadable reference", "reference 'broken.png' could not be decoded as an image"),
])
def test_bad_input_comes_back_as_a_clear_message(server, tmp_path, changes, message):
    _, client, _ = server
    if changes == "unreadable reference":
        broken = tmp_path / "broken.png"
        broken.write_text("not an image")
        changes = dict(reference=gradio_client.handle_file(str(broken)), conditioning="0")
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        client.predict(*form(**changes), api_name="/generate")
    assert message in str(caught.value)
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)


def test_two_requests_at_once_both_complete_one_at_a_time_with_progress(server, first_result):
    _, client, _ = server
    # One step more than the other tests: a new scan length compiles, so the first request surely outlasts the
    # moment the second arrives (with a warm cache a 32x32 generation can end before the second is queued).
    first = client.submit(*form(seed=1, steps=STEPS + 1), api_name="/generate")
    second = client.submit(*form(seed=2, random_seed=True), api_name="/generate")
    generator = server[0]
    runs_before = len(generator.intervals)
    stages = set()
    while not (first.done() and second.done()):
        stages |= {p.desc for p in (first.status().progress_data or [])}
        time.sleep(0.05)
    a, b = first.result(), second.result()
    # One at a time: the server ran the two generations one after the other (its own record; a client-side poll
    # of the second's IN_QUEUE status can miss it), and progress reached the client.
    (start_1, end_1), (start_2, end_2) = generator.intervals[runs_before:]
    assert start_2 >= end_1, generator.intervals[runs_before:]
    assert stages & {"denoising", "VAE decode"}, f"no progress reached the client: {stages}"
    for video, _, _, settings, seed in (a, b):
        assert video_io.read_video(video).frames.shape == DEMO_SHAPE
        assert settings["seed"] == seed
    assert a[4] == 1 and isinstance(b[4], (int, float)) and 0 <= b[4] < 2**31, "random seed: a fresh one is shown"
    assert not np.array_equal(*(video_io.read_video(r[0]).frames for r in (a, b)))
    assert a[3]["prompt"] == b[3]["prompt"] == PROMPT


def test_progress_reports_each_denoising_step_and_the_decode(server):
    generator, _, _ = server
    events = []
    result = generator.generate(Request(PROMPT, resolution="32x32", aspect_ratio="1:1", num_frames="17", steps=STEPS,
                                        guidance=2.5, seed=3), on_progress=lambda *e: events.append(e))
    assert [e for e in events if e[0] == "denoising"] == [("denoising", i, STEPS) for i in range(1, STEPS + 1)]
    assert events[-2:] == [("VAE decode", 0, 1), ("VAE decode", 1, 1)]
    assert result.video.is_file() and result.settings["steps"] == STEPS


def test_an_image_reference_conditions_the_first_frame(server, tmp_path):
    _, client, _ = server
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = (255, 255, 0)  # a yellow square in the middle
    video_io.write_image(image, tmp_path / "first.png")
    video, _, _, settings, _ = client.predict(
        *form(reference=gradio_client.handle_file(str(tmp_path / "first.png")), conditioning="0"),
        api_name="/generate")
    frames = video_io.read_video(video).frames
    assert frames.shape == DEMO_SHAPE
    assert settings["conditioning"] == "0" and settings["reference"].endswith("first.png")
    assert "--mask-strategy 0 --reference" in settings["command"]
    centre, corner = frames[0, 48:80, 48:80].astype(float), frames[0, :16, :16].astype(float)
    assert centre[..., 0].mean() > 100 and centre[..., 1].mean() > 100 and corner.mean() < 60, \
        "the first frame should show the reference's yellow square"


# -------------------------------------------------------------------------------- no model, no server

class _FakeGenerator:
    def __init__(self, error=None):
        self.error = error

    def generate(self, request, on_progress):
        on_progress("denoising", 1, 2)
        on_progress("denoising", 2, 2)
        if self.error:
            raise self.error
        return "result"


def test_progress_is_forwarded_from_the_worker_thread_and_errors_are_raised_in_the_request_thread():
    calls = []
    progress = lambda value, desc=None, unit=None: calls.append((value, desc))  # noqa: E731
    assert run_with_progress(_FakeGenerator(), None, progress) == "result"
    assert calls[1:] == [((1, 2), "denoising"), ((2, 2), "denoising")]
    with pytest.raises(UserError, match="boom"):
        run_with_progress(_FakeGenerator(UserError("boom")), None, progress)


def _v1_2_config():
    """A v1.2 config with checkpoints given (the demo's files stand in: nothing is loaded)."""
    demo = pathlib.Path(__file__).resolve().parent.parent / "assets" / "demo"
    config = sample.make_config([a for part in ("stdit3", "vae", "t5") for a in (f"--{part}", str(demo / part))])
    return config, Controls.for_config(config)


def test_a_v1_2_model_offers_its_trained_sizes_and_rejects_others():
    config, controls = _v1_2_config()
    assert "240p" in controls.resolutions and "1080p" not in controls.resolutions
    base = Request("a cat", resolution="240p", aspect_ratio="9:16", num_frames="51", steps=30, guidance=7.0, seed=1)
    made = request_config(config, controls, base)
    assert (made.resolution, made.aspect_ratio, made.num_frames, made.seed) == ("240p", "9:16", "51", 1)
    assert config.prompts == [] and made.prompts == ["a cat"], "the starting config must stay untouched"
    with pytest.raises(UserError, match="was trained at 144p, 240p, 360p, 480p, 720p; resolution '1080p'"):
        request_config(config, controls, dataclasses.replace(base, resolution="1080p"))
    with pytest.raises(UserError) as caught:
        check(request_config(config, controls, dataclasses.replace(base, num_frames="0")))
    assert page_message(caught.value) == "frame count must be at least 1, got 0"
    with pytest.raises(UserError) as caught:
        check(request_config(config, controls, dataclasses.replace(base, num_frames="2000")))
    assert page_message(caught.value).startswith("Frames '2000' is 2000 frames; at most 816")


def test_shared_check_messages_name_the_page_controls():
    assert page_message(UserError("--num-frames '0' is bad; --cfg-scale too")) == "Frames '0' is bad; Guidance too"


def test_the_app_refuses_bad_model_flags_with_one_error_line(capsys, tmp_path):
    status = run_cli(app_cli.main, ["--stdit3", str(tmp_path / "missing"), "--vae", "v", "--t5", "t",
                                    "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_a_results_command_starts_with_the_apps_model_flags_only():
    argv = ["--stdit3", "s", "--steps", "4", "--prompt", "x", "--seed=3", "--mesh", "sequence=2", "--cfg-scale", "2"]
    assert app_cli.model_flags(argv) == ["--stdit3", "s", "--mesh", "sequence=2"]


def test_a_v2_0_model_offers_negative_prompts_and_cond_types_and_its_command_reproduces_the_request():
    from opensora_jax.cli import sample_v2_0

    config = sample_v2_0.make_config([])
    controls = Controls.for_config(config)
    assert controls.negative_prompt and "i2v_head" in dict(controls.conditioning).values()
    assert controls.resolutions == ("256px", "768px") and controls.defaults["num_frames"] == "129"
    request = Request("raining, sea", negative_prompt="blurry", resolution="256px", aspect_ratio="9:16",
                      num_frames="33", steps=10, guidance=5.0, seed=4, reference="/data/first.png",
                      conditioning="i2v_head")
    made = request_config(config, controls, request)
    command = sample_command(made, ["--family", "opensora_v2_0"], controls)
    again = sample_v2_0.make_config(shlex.split(command)[4:])
    for field in ("prompts", "negative_prompt", "resolution", "aspect_ratio", "num_frames", "num_steps", "guidance",
                  "seed", "cond_type", "reference_path"):
        assert again[field] == made[field], field
    with pytest.raises(UserError, match="needs a reference"):
        request_config(config, controls, dataclasses.replace(request, reference=None))
