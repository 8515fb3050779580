"""What the page offers for the loaded model, and how one filled-in form becomes a sampling config.

`Controls.for_config` reads the family (and whether it is the demo model) from the app's starting config: example
prompts, the resolutions and aspect ratios the model was trained for, frame counts, the conditioning choices (v1.2
mask strategies, 2.0 cond types) and the form's starting values. `request_config` copies the starting config and
sets the form's values on it, the same fields sample.py's flags set, so `pipelines.run.run` then checks and samples
it exactly as sample.py would. A form value the model cannot take raises UserError, worded for the page.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import re
import shlex
from typing import Any

import ml_collections

from opensora_jax import presets, presets_v2_0
from opensora_jax.conditioning.latent_conditions import COND_TYPES
from opensora_jax.errors import UserError

DEMO_EXAMPLES = ("a blue square moving up", "a red circle moving left", "a yellow triangle moving right",
                 "a white square moving down on a black background", "a green circle moving up")
V1_2_EXAMPLES = ("a red panda eating bamboo in a misty forest, close-up",
                 "waves breaking on a rocky shore at sunset, aerial view",
                 "a busy city street at night, neon lights reflecting on wet asphalt",
                 "a hot air balloon drifting over snowy mountains")
V2_0_EXAMPLES = ("raining, sea", "a cat chasing a ball of yarn across a sunlit wooden floor",
                 "time-lapse of clouds rolling over a green valley",
                 "an astronaut walking on a red desert planet, cinematic")
# Open-Sora v1.2 was trained from 144p to 720p; 2.0 at 256px and 768px.
V1_2_RESOLUTIONS = ("144p", "240p", "360p", "480p", "720p")
V2_0_RESOLUTIONS = ("256px", "768px")
V1_2_FRAMES = ("1", "51", "2s", "4s", "8s", "16s")
V2_0_FRAMES_CAUSAL = ("1", "33", "65", "97", "129")
V2_0_FRAMES_DC_AE = ("1", "32", "64", "128")
NO_CONDITION = "none"
# v1.2 mask strategies (latent frames; spec §7): label → strategy. Any strategy string may be typed instead.
V1_2_CONDITIONING = (
    ("none: text to video", NO_CONDITION),
    ("image to video: the reference is the first frame", "0"),
    ("extend a video: its last 5 latent frames start the new one", "0,0,-5,0,5"),
    ("edit a video: regenerate it at strength 0.4", "0,0,0,0,1000,0.4"),
)
# The page's names for sample.py's flags, so that a message from the shared checks names the control.
FLAG_LABELS = {
    "--prompt": "Prompt", "--negative-prompt": "Negative prompt", "--num-frames": "Frames", "--steps": "Steps",
    "--cfg-scale": "Guidance", "--guidance": "Guidance", "--seed": "Seed", "--reference": "Reference",
    "--mask-strategy": "Conditioning", "--cond-type": "Conditioning", "--resolution": "Resolution",
    "--aspect-ratio": "Aspect ratio",
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One filled-in form. `seed` None: draw one (the page's "random seed")."""

    prompt: str
    negative_prompt: str = ""
    resolution: str = ""
    aspect_ratio: str = ""
    num_frames: str = ""
    steps: Any = None
    guidance: Any = None
    seed: Any = 42
    reference: str | None = None
    conditioning: str = NO_CONDITION


@dataclasses.dataclass(frozen=True)
class Controls:
    """The page's choices and starting values for one loaded model."""

    family: str
    title: str
    examples: tuple[str, ...]
    resolutions: tuple[str, ...]
    aspect_ratios: tuple[str, ...]
    frames: tuple[str, ...]
    conditioning: tuple[tuple[str, str], ...]
    fixed_size: tuple[int, int] | None  # the demo's (H, W): resolution and aspect ratio cannot change
    fixed_frames: str | None  # the demo's frame count
    negative_prompt: bool
    defaults: dict

    @classmethod
    def for_config(cls, config: ml_collections.ConfigDict, *, demo: bool = False) -> "Controls":
        """The controls for the model `config` names (`demo`: the project's demo model, assets/demo)."""
        family = config.get("family", "opensora_v1_2")
        fixed = tuple(int(v) for v in config.image_size) if config.get("image_size") else None
        # A config with an explicit image_size (the demo's 32x32) samples that size only.
        fixed_choices = ((f"{fixed[0]}x{fixed[1]}",), (_ratio(*fixed),)) if fixed else None
        if family == "opensora_v2_0":
            sizes, ratios = fixed_choices or (V2_0_RESOLUTIONS,
                                              tuple(presets_v2_0.aspect_ratio_sizes(config.resolution)))
            defaults = dict(resolution=sizes[0] if fixed else config.resolution,
                            aspect_ratio=ratios[0] if fixed else config.aspect_ratio,
                            num_frames=str(config.num_frames), steps=config.num_steps, guidance=config.guidance,
                            seed=config.seed, conditioning=config.cond_type, prompt=_first(config.prompts, ""))
            frames = V2_0_FRAMES_CAUSAL if config.vae_kind == "hunyuan_vae" else V2_0_FRAMES_DC_AE
            return cls(family, "Open-Sora 2.0", V2_0_EXAMPLES, sizes, ratios, frames,
                       tuple((c, c) for c in COND_TYPES), fixed, None, True, defaults)
        if demo:
            (size,), (ratio,) = fixed_choices
            return cls(family, f"the demo model ({size}, {config.num_frames} frames, shapes and colours)",
                       DEMO_EXAMPLES, (size,), (ratio,), (str(config.num_frames),), V1_2_CONDITIONING, fixed,
                       str(config.num_frames), False, _v1_2_defaults(config, size, ratio))
        sizes, ratios = fixed_choices or (V1_2_RESOLUTIONS, tuple(presets.aspect_ratio_names("144p")))
        return cls(family, "Open-Sora v1.2", V1_2_EXAMPLES, sizes, ratios,
                   tuple(dict.fromkeys((str(config.num_frames), *V1_2_FRAMES))), V1_2_CONDITIONING, fixed, None,
                   False, _v1_2_defaults(config, sizes[0] if fixed else config.resolution,
                                         ratios[0] if fixed else config.aspect_ratio))


def _ratio(height: int, width: int) -> str:
    g = math.gcd(height, width)
    return f"{height // g}:{width // g}"


def _first(values, default):
    return (list(values or []) or [default])[0]


def _v1_2_defaults(config, resolution: str, aspect_ratio: str) -> dict:
    return dict(resolution=resolution, aspect_ratio=aspect_ratio, num_frames=str(config.num_frames),
                steps=config.scheduler.num_sampling_steps, guidance=config.scheduler.cfg_scale, seed=config.seed,
                conditioning=_first(config.mask_strategy, NO_CONDITION), prompt=_first(config.prompts, ""))


def page_message(error: Exception, reference: str | None = None) -> str:
    """A user mistake's message for the page: its first line, sample.py's flag names replaced by the page's control
    names, and an uploaded `reference` named by its file name rather than its path in the server's upload cache."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if reference:
        text = text.replace(str(reference), pathlib.Path(reference).name)
    for flag, label in sorted(FLAG_LABELS.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", label, text)
    return text


def _whole_number(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < low:
        raise UserError(f"{name} must be a whole number ≥ {low}, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _check_size(controls: Controls, request: Request) -> None:
    if controls.fixed_size is not None:
        h, w = controls.fixed_size
        if request.resolution not in ("", controls.resolutions[0]) or \
                request.aspect_ratio not in ("", controls.aspect_ratios[0]):
            raise UserError(f"{controls.title} was trained at {h}x{w} only, so resolution {request.resolution!r} "
                            f"(aspect ratio {request.aspect_ratio!r}) is not available; start the app with a model "
                            "that takes other sizes (--stdit3/--vae/--t5) to choose one")
        return
    if request.resolution not in controls.resolutions:
        raise UserError(f"{controls.title} was trained at {', '.join(controls.resolutions)}; resolution "
                        f"{request.resolution!r} is not one of them")
    if request.aspect_ratio not in controls.aspect_ratios:
        raise UserError(f"aspect ratio {request.aspect_ratio!r} unknown; choose one of "
                        f"{', '.join(controls.aspect_ratios)}")


def request_config(base: ml_collections.ConfigDict, controls: Controls, request: Request) -> ml_collections.ConfigDict:
    """A copy of the app's starting config with the form's values set, as sample.py's flags would set them.

    Checks what the shared checks (`pipelines.run.check`) cannot know: an empty prompt, a size or frame count the
    loaded model was not trained for, a reference without a conditioning choice. `request.seed` must be set."""
    prompt = (request.prompt or "").strip()
    if not prompt:
        raise UserError("the prompt is empty: type what the video should show")
    _check_size(controls, request)
    frames = str(request.num_frames or "").strip() or controls.defaults["num_frames"]
    if controls.fixed_frames is not None and frames != controls.fixed_frames:
        raise UserError(f"{controls.title} makes {controls.fixed_frames}-frame videos only; a frame count of "
                        f"{frames!r} is not available")
    seed = _whole_number("Seed", request.seed, 0)
    steps = _whole_number("Steps", request.steps, 1)
    guidance = _number("Guidance", request.guidance)
    conditioning = (request.conditioning or NO_CONDITION).strip()
    reference = str(request.reference) if request.reference else ""
    if reference and conditioning in (NO_CONDITION, "t2v"):
        raise UserError("a reference image or video needs a conditioning choice (how the reference is used); "
                        "choose one, or remove the reference")
    if conditioning not in (NO_CONDITION, "t2v") and not reference:
        raise UserError(f"conditioning {conditioning!r} needs a reference image or video: upload one")

    config = copy.deepcopy(base)
    config.prompts = [prompt]
    config.prompt_file = ""
    config.seed = seed
    config.batch_size = config.num_sample = 1
    config.reference_path = [reference] if reference else []
    if controls.fixed_size is None:
        config.resolution, config.aspect_ratio = request.resolution, request.aspect_ratio
    if controls.family == "opensora_v2_0":
        try:
            config.num_frames = int(frames)
        except ValueError:
            raise UserError(f"Frames must be a whole number, got {frames!r}") from None
        config.num_steps, config.guidance = steps, guidance
        config.negative_prompt = [request.negative_prompt] if (request.negative_prompt or "").strip() else []
        config.cond_type = "t2v" if conditioning == NO_CONDITION else conditioning
    else:
        config.num_frames = frames
        config.scheduler.num_sampling_steps, config.scheduler.cfg_scale = steps, guidance
        config.mask_strategy = [] if conditioning == NO_CONDITION else [conditioning]
    return config


def sample_command(config: ml_collections.ConfigDict, model_argv: list[str], controls: Controls) -> str:
    """The sample.py command line that makes the same video as `config` (a result's exact settings)."""
    argv = ["python", "sample.py", *model_argv, "--prompt", config.prompts[0], "--seed", str(config.seed)]
    if controls.fixed_size is None:
        argv += ["--resolution", config.resolution, "--aspect-ratio", config.aspect_ratio]
    if controls.family == "opensora_v2_0":
        argv += ["--num-frames", str(config.num_frames), "--steps", str(config.num_steps),
                 "--guidance", repr(config.guidance)]
        argv += [a for n in config.negative_prompt for a in ("--negative-prompt", n)]
        argv += ["--cond-type", config.cond_type] if config.cond_type != "t2v" else []
    else:
        argv += ["--num-frames", str(config.num_frames), "--steps", str(config.scheduler.num_sampling_steps),
                 "--cfg-scale", repr(config.scheduler.cfg_scale)]
        argv += [a for s in config.mask_strategy for a in ("--mask-strategy", s)]
    argv += [a for r in config.reference_path for a in ("--reference", r)]
    return shlex.join(argv)
