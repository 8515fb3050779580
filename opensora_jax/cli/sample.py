r"""Open-Sora v1.2 text/image-to-video sampling with opensora-jax.

    python sample.py --prompt "a blue square moving up"      # the demo model in assets/demo
    python sample.py --prompt "a red circle moving left" --stdit3 ckpt/stdit3 --vae ckpt/vae --t5 ckpt/t5
    python sample.py --config configs/opensora_v1_2/sample.py --config.num_frames=4s --prompt "..." \
        --stdit3 ckpt/stdit3 --vae ckpt/vae --t5 ckpt/t5

The first runs on a fresh clone; the others need Open-Sora v1.2 weights (converted with python -m convert, or
the reference's files).

Without checkpoints (--stdit3/--vae/--t5) and without --config, sample.py uses the demo model this
project trained on its synthetic shapes dataset (configs/demo/sample.py: 32×32, 17 frames). Every flag
sets a field of the config (configs/opensora_v1_2/sample.py when checkpoints are given); any field can
also be set as --config.FIELD=VALUE. The final config is saved as OUT_DIR/config.json beside the videos, and each
video gets a JSON sidecar (prompt as sent to T5, seed, timings).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import convert
from opensora_jax.config_utils import config_from_cli, config_parser, console_entry, load_config_file, run_cli
from opensora_jax.errors import UserError
from opensora_jax.families import CONFIGS_DIR, FAMILIES
from opensora_jax.parallel import initialize_distributed
from opensora_jax.pipelines.run import run

DEFAULT_CONFIG = FAMILIES["opensora_v1_2"].sample_config
DEMO_CONFIG = CONFIGS_DIR / "demo" / "sample.py"
DEMO_FIXED_FLAGS = ("--resolution", "--aspect-ratio", "--config.resolution", "--config.aspect_ratio")
CHECKPOINT_FLAGS = ("--stdit3", "--vae", "--t5", "--config.stdit3", "--config.vae", "--config.t5")

# flag → (config field, type, help)
FLAGS = {
    "--prompt": ("prompts", str, "a prompt; repeat the flag for several. A prompt may end with a JSON object "
                 "{\"reference_path\": ..., \"mask_strategy\": ...} and may use the |0|text|k|text loop syntax"),
    "--prompt-file": ("prompt_file", str, "text file with one prompt per line"),
    "--resolution": ("resolution", str, "144p, 240p, 360p, 480p, 720p, 1080p (default 240p)"),
    "--aspect-ratio": ("aspect_ratio", str, "H:W, e.g. 9:16 (landscape 240x426 at 240p), 1:1, 16:9 (default 9:16)"),
    "--num-frames": ("num_frames", str, "pixel frames: a number (1 = image, 17, 51, ...) or 2s, 4s, 8s, 16s (default 51)"),
    "--fps": ("fps", int, "frame rate given to the model (default 24)"),
    "--save-fps": ("save_fps", int, "frame rate of the written MP4 (default 24)"),
    "--steps": ("scheduler.num_sampling_steps", int, "denoising steps (default 30)"),
    "--cfg-scale": ("scheduler.cfg_scale", float, "classifier-free guidance scale (default 7.0)"),
    "--seed": ("seed", int, "random seed of the initial noise (default 42)"),
    "--aes": ("aes", float, "aesthetic score appended to the prompt (default 6.5)"),
    "--flow": ("flow", float, "motion score appended to the prompt (default: none)"),
    "--camera-motion": ("camera_motion", str, "camera motion appended to the prompt, e.g. 'pan left'"),
    "--reference": ("reference_path", str, "reference image/video path(s) for conditioning, ';'-separated; "
                    "repeat the flag once per prompt or give one for all"),
    "--mask-strategy": ("mask_strategy", str, "mask strategy 'loop,ref,ref_start,target_start,length,edit;...' "
                        "(latent frames); repeat per prompt or give one for all"),
    "--loop": ("loop", int, "number of clips generated in sequence, each conditioned on the previous (default 1)"),
    "--batch-size": ("batch_size", int, "prompts per batch (default 1)"),
    "--num-sample": ("num_sample", int, "videos per prompt (default 1)"),
    "--out-dir": ("out_dir", str, "where videos, sidecars and config.json go (default samples/)"),
    "--dtype": ("dtype", str, "STDiT3 and VAE dtype: bfloat16 (default, as the reference) or float32; T5 runs in float32"),
    "--attention": ("attention", str, "attention: auto (default: in bfloat16 cudnn on NVIDIA GPUs, splash on TPUs; "
                   "blockwise otherwise), blockwise (memory-efficient, pure JAX), xla (naive), cudnn or splash; "
                   "where a kernel is unavailable, auto's choice runs and a warning says why"),
    "--mesh": ("mesh", str, "device mesh, e.g. 'sequence=8' (sequence parallel over 8 GPUs) or 'data=2,sequence=4'; "
               "axes data/fsdp/tensor/sequence, -1 fills the rest; default: one device"),
    "--stdit3": ("stdit3", str, "STDiT3 checkpoint: a converted directory, the reference's safetensors, or a hub id in the local cache"),
    "--vae": ("vae", str, "VAE checkpoint: a converted directory, the reference's safetensors, or a hub id in the local cache"),
    "--t5": ("t5", str, "T5 encoder checkpoint: a converted directory, a transformers T5 directory, or a hub id in the local cache"),
    "--tokenizer": ("tokenizer", str, "T5 tokenizer directory (spiece.model or tokenizer.json); default: the T5 directory"),
    "--lora": ("lora", str, "LoRA adapter directory (lora.json + adapters.safetensors), merged into the STDiT3 "
               "as it loads"),
}
LIST_FIELDS = {"prompts", "reference_path", "mask_strategy"}
# What `python sample.py` with no flags at all makes: the demo model on one of the captions it was trained on.
DEMO_PROMPT = "a red circle moving left"


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "sample.py", __doc__, "ml_collections config file with get_config() (default: configs/opensora_v1_2/sample.py "
        "when --stdit3/--vae/--t5 are given, else the demo model's configs/demo/sample.py)", FLAGS, LIST_FIELDS,
        config_required=False)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars [config: progress=False]")
    parser.add_argument("--overwrite", action="store_true",
                        help="number files from sample_0000 again, replacing earlier ones; default: the next free "
                        "index in --out-dir [config: overwrite=True]")
    parser.add_argument("--family", default="opensora_v1_2",
                        help="model family: opensora_v1_2 (this help) or opensora_v2_0 (see "
                        "`sample.py --family opensora_v2_0 --help`); default: the --config file's, else v1.2")
    parser.add_argument("--no-clean-captions", action="store_true",
                        help="skip the reference's caption cleaning [config: clean_captions=False]")
    return parser


def uses_demo(argv: list[str]) -> bool:
    """True when neither a --config nor any checkpoint flag is given: sample with the demo model."""
    names = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return "--config" not in names and not names & set(CHECKPOINT_FLAGS)


def make_config(argv: list[str]):
    parser = build_parser()
    parser.set_defaults(config=str(DEMO_CONFIG if uses_demo(argv) else DEFAULT_CONFIG))
    config, args = config_from_cli(argv, parser, FLAGS, LIST_FIELDS)
    if args.no_progress:
        config.progress = False
    if args.overwrite:
        config.overwrite = True
    if args.no_clean_captions:
        config.clean_captions = False
    return config


def requested_family(argv: list[str]) -> str:
    """The family a command line asks for: `--family NAME`, else the `family` of the --config file, else v1.2."""
    for i, arg in enumerate(argv):
        if arg == "--family" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--family="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] \
            if arg.startswith("--config=") else None
        if path:
            return load_config_file(path).get("family", "opensora_v1_2")
    return "opensora_v1_2"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    family = requested_family(argv)
    if family not in FAMILIES:
        raise UserError(f"--family {family!r} unknown; choose one of {', '.join(FAMILIES)}")
    if family == "opensora_v2_0":
        from opensora_jax.cli import sample_v2_0

        return sample_v2_0.main(argv)
    config = make_config(argv)
    if uses_demo(argv) and "-h" not in argv and "--help" not in argv:
        if not pathlib.Path(config.stdit3).is_dir():
            raise UserError(
                f"no checkpoints given, and the demo model is not in this checkout ({config.stdit3} is missing): "
                "pass --stdit3, --vae and --t5 (converted directories or the reference's weights)")
        ignored = sorted({a.split("=", 1)[0] for a in argv} & set(DEMO_FIXED_FLAGS))
        if ignored:
            raise UserError(f"the demo model samples only 32x32 videos, so {', '.join(ignored)} cannot apply; "
                            "pass --stdit3/--vae/--t5 for Open-Sora v1.2 weights to choose the size")
        print(f"no checkpoints given: sampling with the demo model ({config.stdit3.rsplit('/', 1)[0]}, "
              "32x32, 17 frames); pass --stdit3/--vae/--t5 for Open-Sora v1.2 weights", flush=True)
        if not config.prompts and not config.prompt_file:
            config.prompts = [DEMO_PROMPT]
            print(f"no prompt given: using {DEMO_PROMPT!r} (pass --prompt TEXT for your own)", flush=True)
    initialize_distributed()  # multi-process launches (SLURM, torchrun-style env, JAX_COORDINATOR_ADDRESS)
    run(config, load=convert.load_model)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
