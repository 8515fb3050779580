"""python -m opensora_jax.app (also `opensora-app`): a local web page for making videos.

    python -m opensora_jax.app                                   # the demo model (assets/demo), as sample.py
    python -m opensora_jax.app --stdit3 ckpt/stdit3 --vae ckpt/vae --t5 ckpt/t5 --mesh sequence=8
    python -m opensora_jax.app --family opensora_v2_0 --ckpt-dir ckpts --port 8080

Loads the models once, then serves the page at http://HOST:PORT (printed at start; 127.0.0.1 by default, so only
this machine can reach it). Every flag other than --host/--port is sample.py's (see `python sample.py --help`):
model checkpoints, --mesh, --dtype, --out-dir, and the form's starting values (--steps, --seed, ...). Each video is
saved as sample.py saves it (MP4 or PNG, frame grid, JSON sidecar) in --out-dir (default samples/).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import convert
from opensora_jax.app.controls import Controls
from opensora_jax.app.worker import Generator
from opensora_jax.cli import sample, sample_v2_0
from opensora_jax.config_utils import console_entry, run_cli
from opensora_jax.errors import UserError
from opensora_jax.families import FAMILIES
from opensora_jax.parallel import initialize_distributed
from opensora_jax.pipelines.run import check, load_pipeline

DEFAULT_PORT = 7860
# sample.py flags the page sets per video (here they only set the form's starting values): a result's sample.py
# command gives its own.
PER_VIDEO_FLAGS = ("--prompt", "--prompt-file", "--reference", "--mask-strategy", "--negative-prompt", "--cond-type",
                   "--seed", "--steps", "--cfg-scale", "--guidance", "--num-frames", "--resolution", "--aspect-ratio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opensora_jax.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    return parser


def model_flags(argv: list[str]) -> list[str]:
    """`argv` without the per-video flags (and their values): what a result's sample.py command starts with."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in PER_VIDEO_FLAGS:
            skip = True
        elif arg.split("=", 1)[0] not in PER_VIDEO_FLAGS:
            out.append(arg)
    return out


def starting_config(argv: list[str]):
    """(config, demo): sample.py's config for these flags, and whether it is the demo model. Checks it as sample.py
    does, with a placeholder prompt where none is given."""
    family = sample.requested_family(argv)
    if family not in FAMILIES:
        raise UserError(f"--family {family!r} unknown; choose one of {', '.join(FAMILIES)}")
    if family == "opensora_v2_0":
        config, demo = sample_v2_0.make_config(argv), False
    else:
        config, demo = sample.make_config(argv), sample.uses_demo(argv)
    if demo:
        if not pathlib.Path(config.stdit3).is_dir():
            raise UserError(f"no checkpoints given, and the demo model is not in this checkout ({config.stdit3} is "
                            "missing): pass --stdit3, --vae and --t5")
        ignored = sorted({a.split("=", 1)[0] for a in argv} & set(sample.DEMO_FIXED_FLAGS))
        if ignored:
            raise UserError(f"the demo model samples only 32x32 videos, so {', '.join(ignored)} cannot apply")
    probe = config.copy_and_resolve_references()
    if not list(probe.prompts) and not probe.prompt_file:
        probe.prompts = ["a placeholder prompt"]
    check(probe)
    return config, demo


def load_generator(argv: list[str]) -> Generator:
    """The app's generator for sample.py-style flags: the config, its controls and the pipeline, loaded once."""
    config, demo = starting_config(argv)
    initialize_distributed()
    what = "the demo model (assets/demo)" if demo else config.get("family", "opensora_v1_2")
    print(f"loading {what} ...", flush=True)
    pipeline = load_pipeline(config, load=convert.load_model)
    return Generator(config, pipeline, Controls.for_config(config, demo=demo), model_flags(argv))


def serve(generator: Generator, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """Starts the page's server (in the background); returns (blocks, local URL). One generation runs at a time;
    further requests wait in the queue, which the page shows."""
    from opensora_jax.app.ui import build_page, theme

    page = build_page(generator)
    page.queue(default_concurrency_limit=1)
    out_dir = str(pathlib.Path(generator.base_config.out_dir).resolve())
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        _, url, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                allowed_paths=[out_dir], theme=theme(), ssr_mode=False)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e}); pass another --port") from None
    return page, url


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, model_argv = build_parser().parse_known_args(argv)
    generator = load_generator(model_argv)
    page, url = serve(generator, args.host, args.port)
    print(f"opensora-app: {generator.controls.title} at {url} (Ctrl-C stops it)", flush=True)
    page.block_thread()
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
