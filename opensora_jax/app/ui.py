"""The page: a Gradio Blocks app over a `Generator` (the form, a progress bar, the result and its settings).

`build_page(generator)` lays out the controls `generator.controls` offers and wires the Generate button to
`generate` (API name "/generate", which gradio_client calls with the form's values in the order of `FORM`). A user
mistake becomes a `gr.Error` with a one-line message in the page; the server keeps serving. The queue lets one
generation run at a time and shows later requests as queued.
"""

from __future__ import annotations

import os
import queue
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read at import: no usage reports, no version check
import gradio as gr  # noqa: E402

from opensora_jax.app.controls import Request, page_message  # noqa: E402
from opensora_jax.app.worker import Generator, Result  # noqa: E402
from opensora_jax.config_utils import USER_ERRORS  # noqa: E402

# The form's inputs, in the order the Generate button (and the "/generate" API) takes them.
FORM = ("prompt", "negative_prompt", "resolution", "aspect_ratio", "num_frames", "steps", "guidance", "seed",
        "random_seed", "reference", "conditioning")
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def theme() -> gr.Theme:
    """The default theme with system fonts only (the page must not fetch web fonts: it may run offline)."""
    return gr.themes.Default(**THEME_FONTS)


def run_with_progress(generator: Generator, request: Request, progress) -> Result:
    """`generator.generate(request)` in a worker thread while this thread forwards its progress to `progress`
    (gr.Progress reports only from the request's own thread)."""
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = generator.generate(request, on_progress=lambda *e: events.put(e))
        except BaseException as e:  # handed to the request's thread, which raises it
            outcome["error"] = e
        finally:
            events.put(None)

    progress(0.0, desc="checking the settings")
    worker = threading.Thread(target=work, name="opensora-app-generate", daemon=True)
    worker.start()
    while (event := events.get()) is not None:
        stage, done, total = event
        progress((done, total), desc=stage, unit="steps" if stage == "denoising" else "calls")
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_page(generator: Generator) -> gr.Blocks:
    """The app's page for `generator`'s loaded model."""
    c = generator.controls
    d = c.defaults
    with gr.Blocks(title="opensora-jax", analytics_enabled=False) as page:
        gr.Markdown(f"## opensora-jax: text/image to video with {c.title}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, value=d.get("prompt", ""), elem_id="prompt",
                                    placeholder="what the video should show")
                gr.Examples([[e] for e in c.examples], inputs=[prompt], label="Example prompts")
                negative = gr.Textbox(label="Negative prompt", visible=c.negative_prompt,
                                      placeholder="what the video should not show (default: none)")
                fixed = c.fixed_size is not None
                with gr.Row():
                    resolution = gr.Dropdown(list(c.resolutions), value=d["resolution"], label="Resolution",
                                             allow_custom_value=True, interactive=not fixed)
                    aspect = gr.Dropdown(list(c.aspect_ratios), value=d["aspect_ratio"], label="Aspect ratio",
                                         allow_custom_value=True, interactive=not fixed,
                                         info="W:H" if c.family == "opensora_v2_0" else "H:W (9:16 is landscape)")
                    frames = gr.Dropdown(list(c.frames), value=d["num_frames"], label="Frames",
                                         allow_custom_value=True, interactive=c.fixed_frames is None,
                                         info="frame count, or a duration such as 4s" if c.family != "opensora_v2_0"
                                         else "frame count")
                with gr.Row():
                    steps = gr.Number(value=d["steps"], label="Steps")
                    guidance = gr.Number(value=d["guidance"], label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=d["seed"], label="Seed")
                    random_seed = gr.Checkbox(value=False, label="random seed")
                with gr.Accordion("Reference image or video", open=False):
                    reference = gr.File(label="Reference", type="filepath", file_types=["image", "video"])
                    conditioning = gr.Dropdown(list(c.conditioning), value=d["conditioning"], label="Conditioning",
                                               allow_custom_value=True,
                                               info="cond type" if c.family == "opensora_v2_0" else
                                               "mask strategy: loop,ref,ref_start,target_start,length,edit "
                                               "(latent frames); pick one or type your own")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, height=360,
                                 elem_id="result-video")
                grid = gr.Image(label="Frame grid", type="filepath", interactive=False, height=220,
                                elem_id="result-grid")
                files = gr.File(label="Download: MP4 and its JSON sidecar", file_count="multiple",
                                interactive=False)
                settings = gr.JSON(label="Settings of this result (the command makes the same video)")

        def generate(prompt, negative_prompt, resolution, aspect_ratio, num_frames, steps, guidance, seed,
                     random_seed, reference, conditioning, progress=gr.Progress()):
            request = Request(prompt=prompt, negative_prompt=negative_prompt or "", resolution=resolution or "",
                              aspect_ratio=aspect_ratio or "", num_frames=str(num_frames or ""), steps=steps,
                              guidance=guidance, seed=None if random_seed else seed, reference=reference,
                              conditioning=conditioning or "")
            try:
                result = run_with_progress(generator, request, progress)
            except USER_ERRORS as e:
                raise gr.Error(page_message(e, reference), duration=None, title="Cannot generate",
                               print_exception=False) from None
            shown = str(result.video)
            return (shown if result.is_video else None, str(result.grid or result.video),
                    [shown, str(result.sidecar)], result.settings, result.settings["seed"])

        inputs = [prompt, negative, resolution, aspect, frames, steps, guidance, seed, random_seed, reference,
                  conditioning]
        assert len(inputs) == len(FORM)
        button.click(generate, inputs, [video, grid, files, settings, seed], api_name="generate")
    return page
