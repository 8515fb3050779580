"""STDiT3 training-step benchmark: step time after compile, compile time and peak memory, per compute dtype
(float32 master weights throughout) and remat on/off.

    python bench/train.py [--dtypes float32,bfloat16] [--remat on,off] [--hidden 384 --heads 6 --depth 2]
                          [--latent 5,16,16] [--batch 2] [--preset STDiT3-XL/2]

The step is the training loop's own: `init_state` + `train_step` (AdamW with clipping, EMA, frame masks of
stage 1/2, logit-normal timesteps) on random latents and text embeddings. Each variant runs in its own
process, so its peak RSS (and on GPU the allocator's peak) is its own. Memory figures: XLA's memory analysis
of the compiled step (arguments, outputs, temporaries; with the donated state aliased to the outputs,
arguments + temporaries is the step's footprint) and the process's peak RSS.

The defaults ("medium": hidden 384, depth 2, 300 caption tokens of width 4096, a 5×16×16 latent = 17
frames at 128×128 px, batch 2) finish on a 2-core CPU in a few minutes; on an accelerator use e.g.
`--preset STDiT3-XL/2 --latent 15,32,32 --batch 4`. Writes bench/results/train_<backend>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import block, device_peak_bytes, environment, host_peak_rss_bytes, write_json  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "


def _on_off(text: str) -> list[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    try:
        return [table[t.strip().lower()] for t in text.split(",")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a comma list of on/off, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


def model_config(args, dtype: str, remat: bool):
    from opensora_jax.models.stdit3 import STDiT3Config, preset

    execution = dict(dtype=dtype, param_dtype="float32", remat=remat, attention=args.attention)
    if args.preset:
        return preset(args.preset, **execution)
    return STDiT3Config(depth=args.depth, hidden_size=args.hidden, num_heads=args.heads,
                        caption_channels=args.caption_channels, model_max_length=args.model_max_length, **execution)


def step_flops(cfg, batch: int, latent_thw) -> float:
    """Matmul FLOPs of one step: forward + backward (2× forward), + one more forward with remat."""
    from bench.stdit3 import forward_flops

    return forward_flops(cfg, batch, latent_thw) * (4 if cfg.remat != "nothing" else 3)


def bench_one(args, dtype: str, remat: bool) -> dict:
    """Compile and time one variant in this process."""
    from flax import nnx

    from configs.opensora_v1_2.train_common import MASK_RATIOS_STAGE12
    from opensora_jax.models.stdit3 import STDiT3
    from opensora_jax.training.optim import make_optimizer, trainable_filter
    from opensora_jax.training.state import StepConfig, init_state, train_step

    cfg = model_config(args, dtype, remat)
    model = STDiT3(cfg, rngs=nnx.Rngs(0))
    optimizer = dict(lr=1e-4, warmup_steps=0, grad_clip=1.0)
    tx = make_optimizer(**optimizer)
    trainable = trainable_filter(freeze_y_embedder=args.freeze_y_embedder)
    graphdef, state = init_state(model, tx, trainable, seed=0)
    del model
    step_cfg = StepConfig(mask_ratios=tuple(sorted(MASK_RATIOS_STAGE12.items())) if args.masks else ())

    b, (t, h, w) = args.batch, args.latent
    k1, k2 = jax.random.split(jax.random.key(1))
    sizes = {k: jnp.full((b,), v, cfg.dtype) for k, v in
             (("height", h * 8.0), ("width", w * 8.0), ("num_frames", t * 4.0 - 3.0), ("fps", 24.0))}
    batch = dict(x0=jax.random.normal(k1, (b, t, h, w, cfg.in_channels), jnp.float32),
                 y=jax.random.normal(k2, (b, cfg.model_max_length, cfg.caption_channels), jnp.float32),
                 mask=jnp.ones((b, cfg.model_max_length), jnp.int32), **sizes)

    start = time.perf_counter()
    compiled = train_step.lower(graphdef, tx, step_cfg, state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()

    losses, times = [], []
    for i in range(args.warmup + args.repeats):  # the state is donated: each step feeds the next
        start = time.perf_counter()
        state, metrics = block(compiled(state, batch))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))

    n_trainable = sum(a.size for a in jax.tree.leaves(state.params))
    n_total = n_trainable + sum(a.size for a in jax.tree.leaves(state.rest))
    flops = step_flops(cfg, b, args.latent)
    run_s = sorted(times)[len(times) // 2]
    xla = None
    if mem is not None:
        xla = {
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "peak_estimate": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes,
            "peak_with_donation": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes,
        }
    return {
        "dtype": dtype, "param_dtype": cfg.param_dtype, "remat": remat,
        "config": {
            "model": {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype", "remat")},
            "preset": args.preset or None, "batch": b, "latent_thw": list(args.latent),
            "mask_ratios": dict(step_cfg.mask_ratios), "freeze_y_embedder": args.freeze_y_embedder,
            "optimizer": optimizer, "ema_decay": step_cfg.ema_decay, "timestep_method": step_cfg.timestep_method,
        },
        "params": {"trainable": int(n_trainable), "total": int(n_total)},
        "compile_s": compile_s, "step_s_median": run_s, "step_s_all": times, "warmup_steps": args.warmup,
        "losses": losses, "model_flops": flops, "achieved_flops_per_s": flops / run_s,
        "xla_memory_bytes": xla, "device_peak_bytes": device_peak_bytes(), "host_peak_rss_bytes": host_peak_rss_bytes(),
    }


def _child_argv(args, dtype: str, remat: bool) -> list[str]:
    argv = [sys.executable, __file__, "--child", "--dtypes", dtype, "--remat", "on" if remat else "off",
            "--hidden", str(args.hidden), "--heads", str(args.heads), "--depth", str(args.depth),
            "--caption-channels", str(args.caption_channels), "--model-max-length", str(args.model_max_length),
            "--latent", ",".join(map(str, args.latent)), "--batch", str(args.batch), "--attention", args.attention,
            "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.preset:
        argv += ["--preset", args.preset]
    if not args.masks:
        argv.append("--no-masks")
    if not args.freeze_y_embedder:
        argv.append("--train-y-embedder")
    return argv


def run_isolated(args, dtype: str, remat: bool) -> dict:
    """bench_one in a fresh process (its own peak RSS and allocator peak)."""
    proc = subprocess.run(_child_argv(args, dtype, remat), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {dtype} remat={remat} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of compute dtypes: float32, bfloat16 "
                        "(master weights, optimizer state and EMA stay float32)")
    parser.add_argument("--remat", type=_on_off, default=[True, False], help="comma list of on/off (default on,off)")
    parser.add_argument("--preset", default="", help="an STDiT3 preset (STDiT3-XL/2, STDiT3-3B/2) instead of the "
                        "size flags below")
    parser.add_argument("--hidden", type=int, default=384, help="hidden size (default 384)")
    parser.add_argument("--heads", type=int, default=6, help="attention heads (default 6)")
    parser.add_argument("--depth", type=int, default=2, help="number of spatial+temporal block pairs (default 2)")
    parser.add_argument("--caption-channels", type=int, default=4096, help="T5 width (default 4096, T5-XXL's)")
    parser.add_argument("--model-max-length", type=int, default=300, help="caption tokens (default 300)")
    parser.add_argument("--latent", type=_ints, default=(5, 16, 16), help="latent T,H,W (default 5,16,16: 17 "
                        "frames at 128×128 px)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="attention implementation")
    parser.add_argument("--no-masks", dest="masks", action="store_false", help="no frame-conditioning masks "
                        "(default: stage 1/2 mask ratios, as training)")
    parser.add_argument("--train-y-embedder", dest="freeze_y_embedder", action="store_false",
                        help="also train the caption projection (default frozen, as the v1.2 configs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (default 3; the median is reported)")
    parser.add_argument("--in-process", action="store_true", help="run every variant in this process (peak RSS "
                        "is then the running maximum)")
    parser.add_argument("--out", default=None, help="result name under bench/results (default train_<backend>)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if len(args.latent) != 3:
        raise SystemExit(f"--latent needs T,H,W, got {args.latent}")
    variants = [(d, r) for d in args.dtypes.split(",") for r in args.remat]
    if args.child:
        (dtype, remat), = variants
        print(RESULT_PREFIX + json.dumps(bench_one(args, dtype, remat)), flush=True)
        return {}

    results, load_before = [], os.getloadavg()
    for dtype, remat in variants:
        r = bench_one(args, dtype, remat) if args.in_process else run_isolated(args, dtype, remat)
        results.append(r)
        xla = r["xla_memory_bytes"] or {}
        print(f"{dtype:9s} remat {'on ' if remat else 'off'}  compile {r['compile_s']:6.1f} s  step "
              f"{r['step_s_median'] * 1e3:8.1f} ms  {r['achieved_flops_per_s'] / 1e9:6.1f} GFLOP/s  XLA args+temp "
              f"{(xla.get('arguments', 0) + xla.get('temporaries', 0)) / 2**20:7.1f} MiB (temp "
              f"{xla.get('temporaries', 0) / 2**20:.1f})  peak RSS {r['host_peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
    payload = {"benchmark": "stdit3_train_step", "environment": environment(), "isolated_processes": not args.in_process,
               # other jobs on a shared host slow every figure down: the 1/5/15-min load before and after
               "host_load_average": {"before": list(load_before), "after": list(os.getloadavg())},
               "results": results}
    path = write_json(args.out or f"train_{jax.default_backend()}", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
