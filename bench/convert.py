"""Checkpoint conversion at full scale: wall time and peak host memory of `python -m convert` and of loading
the converted directory back, with and without a mesh.

    python bench/convert.py [--model stdit3|mmdit] [--depth 2 --single-depth 4] [--dtype float32] [--tmp /tmp]

1. Writes a random-weight float32 safetensors checkpoint from a key manifest (tensor by tensor, never holding
   the model): STDiT3-XL/2 whole (`--model stdit3`, 4.8 GB), or the Open-Sora 2.0 MMDiT with full-width
   tensors but only its first `--depth` double and `--single-depth` single blocks (`--model mmdit`).
2. Times `python -m convert MODEL SRC OUT` in a subprocess: wall time, peak RSS (the child's own VmHWM),
   bytes in and out, the largest source tensor and largest output tensor.
3. Times loading OUT back (`convert.load_model`, every array ready) in a subprocess, on one device and on a
   mesh of 8 fake CPU devices (fsdp=8, XLA_FLAGS=--xla_force_host_platform_device_count=8).

Peak RSS is compared with a baseline child that only imports the same modules. On CPU the loaded parameters
live in host memory, so what a load costs beyond them is its peak RSS minus the bytes the devices hold.
The source and converted files are written with direct I/O where the file system allows it, so they are read
back from the disk, not the page cache. Temporary files go under --tmp and are deleted afterwards. Writes
bench/results/convert_<model>_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MANIFESTS = pathlib.Path(os.environ.get("OPENSORA_FIXTURES", "/work/shared/fixtures")) / "manifests"
MANIFEST = {"stdit3": "STDiT3-XL-2.json", "mmdit": "OpenSora-v2-MMDiT-11B.json"}
GB = 1e9


# ------------------------------------------------------------------------------------ the source checkpoint


def reduced_manifest(model: str, depth: int, single_depth: int) -> tuple[dict, dict[str, dict]]:
    """(reference config, {key: {"shape", "dtype"}}) for the benchmarked architecture."""
    manifest = json.loads((MANIFESTS / MANIFEST[model]).read_text())
    config, keys = dict(manifest["config"]), manifest["keys"]
    if model == "mmdit":
        config.update(depth=depth, depth_single_blocks=single_depth)
        limits = {"double_blocks": depth, "single_blocks": single_depth}

        def keep(key: str) -> bool:
            found = re.match(r"(double_blocks|single_blocks)\.(\d+)\.", key)
            return found is None or int(found.group(2)) < limits[found.group(1)]

        keys = {k: v for k, v in keys.items() if keep(k)}
    return config, keys


def write_source(path: pathlib.Path, keys: dict[str, dict], seed: int = 0) -> dict:
    """A random-weight safetensors file of the manifest's shapes, written one tensor at a time.

    Each tensor is a window, at a random offset, of one pool of normal noise as large as the largest tensor:
    random-looking weights at memcpy speed (drawing 1.2e9 normals would take longer than the conversion).
    """
    from opensora_jax.tensor_files import SafetensorsWriter

    rng = np.random.default_rng(seed)
    layout = {k: (np.dtype(v["dtype"]), tuple(v["shape"])) for k, v in keys.items()}
    largest = max(math.prod(shape) for _, shape in layout.values())
    pool = rng.standard_normal(2 * largest, dtype=np.float32) * 0.02
    start = time.perf_counter()
    with SafetensorsWriter(path, layout, metadata={"format": "pt"}) as writer:
        for key, (dtype, shape) in layout.items():
            offset = int(rng.integers(0, largest + 1))
            writer.write(key, pool[offset: offset + math.prod(shape)].reshape(shape).astype(dtype, copy=False))
    sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in layout.values()]
    return {"tensors": len(layout), "bytes": path.stat().st_size, "largest_tensor_bytes": max(sizes),
            "write_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------ measured children


def run_child(job: dict, env: dict | None = None) -> dict:
    """Runs a job of this script in a fresh process: its JSON result, wall time and peak RSS.

    The peak is the child's own VmHWM, read by the child as it ends: its ru_maxrss would also count the
    parent's high-water mark, which Linux carries over when a forked process calls exec.
    """
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(job)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{job} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_module(argv: list[str]) -> dict:
    """Runs `python -m argv[0] argv[1:]` in this process and reports its wall time and peak RSS."""
    import contextlib
    import io
    import runpy

    sys.argv = list(argv)
    out = io.StringIO()
    start = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code or 0
    if code:
        raise SystemExit(f"python -m {' '.join(argv)} exited with {code}:\n{out.getvalue()}")
    return {"run_s": time.perf_counter() - start, "peak_rss_bytes": _vm_hwm_bytes(),
            "output": out.getvalue().strip().splitlines()[-2:]}


def child_baseline(model: str) -> dict:
    """What the convert and load children pay before any tensor: Python, jax, the model code."""
    import jax

    import convert.__main__  # noqa: F401
    import convert.registry

    convert.registry.converter(model)
    jax.devices()
    return {"peak_rss_bytes": _vm_hwm_bytes()}


def child_load(model: str, path: str, mesh: str | None) -> dict:
    import jax
    from flax import nnx

    from convert.registry import load_model
    from opensora_jax.parallel import make_mesh

    devices = jax.devices()
    mesh_obj = make_mesh(mesh) if mesh else None
    baseline = _vm_hwm_bytes()
    start = time.perf_counter()
    module, _ = load_model(model, path, mesh=mesh_obj)
    leaves = [a for a in jax.tree.leaves(nnx.state(module)) if hasattr(a, "addressable_shards")]
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    held = sum(shard.data.nbytes for a in leaves for shard in a.addressable_shards)
    return {"load_s": seconds, "devices": len(devices), "mesh": mesh, "arrays": len(leaves),
            "param_bytes": int(sum(a.nbytes for a in leaves)), "device_bytes": int(held),
            "largest_array_bytes": int(max(a.nbytes for a in leaves)), "rss_before_load_bytes": baseline,
            "peak_rss_bytes": _vm_hwm_bytes()}


# ------------------------------------------------------------------------------------ driver


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _largest_output_tensor(out: pathlib.Path) -> int:
    from opensora_jax.checkpoints import open_converted

    params, _ = open_converted(out)
    with params:
        return max(math.prod(params.shape(p)) * params.dtype(p).itemsize for p in params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MANIFEST), default="stdit3")
    parser.add_argument("--depth", type=int, default=2, help="mmdit: double blocks kept (default 2)")
    parser.add_argument("--single-depth", type=int, default=4, help="mmdit: single blocks kept (default 4)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the converter writes (the source is float32)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    parser.add_argument("--mesh-devices", type=int, default=8, help="fake CPU devices of the mesh load (0: skip)")
    parser.add_argument("--no-load", action="store_true", help="skip loading the converted directory back")
    parser.add_argument("--out", default=None, help="results name (default convert_<model>_<backend>)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        job = json.loads(args.child)
        kind = job.pop("kind")
        print(json.dumps({"baseline": child_baseline, "load": child_load, "module": child_module}[kind](**job)))
        return

    if args.model == "mmdit" and not (ROOT / "convert" / "mmdit.py").is_file():
        raise SystemExit("convert/mmdit.py does not exist yet: the mmdit converter is needed for --model mmdit")
    import jax

    from bench.common import environment, write_json

    config, keys = reduced_manifest(args.model, args.depth, args.single_depth)
    cpu_env = {"JAX_PLATFORMS": "cpu"} if jax.default_backend() == "cpu" else {}
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.tmp))
    try:
        src_dir, out = work / "src", work / "converted"
        src_dir.mkdir()
        (src_dir / "config.json").write_text(json.dumps(config))
        source = write_source(src_dir / "model.safetensors", keys)
        print(f"source: {source['tensors']} tensors, {source['bytes'] / GB:.2f} GB, largest "
              f"{source['largest_tensor_bytes'] / 1e6:.1f} MB, written in {source['write_s']:.1f}s", flush=True)

        baseline = run_child({"kind": "baseline", "model": args.model}, cpu_env)
        print(f"baseline child (imports only): peak RSS {baseline['peak_rss_bytes'] / GB:.2f} GB", flush=True)

        conv = run_child({"kind": "module", "argv": ["convert", args.model, str(src_dir / "model.safetensors"),
                                                      str(out), "--dtype", args.dtype]}, cpu_env)
        conv.update(bytes_in=source["bytes"], bytes_out=_dir_bytes(out),
                    largest_source_tensor_bytes=source["largest_tensor_bytes"],
                    largest_output_tensor_bytes=_largest_output_tensor(out))
        conv["rss_above_baseline_bytes"] = conv["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        conv["rss_above_baseline_minus_largest_tensor_bytes"] = (
            conv["rss_above_baseline_bytes"] - source["largest_tensor_bytes"])
        print(f"convert: {conv['wall_s']:.1f}s wall, peak RSS {conv['peak_rss_bytes'] / GB:.2f} GB "
              f"({conv['rss_above_baseline_bytes'] / GB:.2f} GB above baseline), "
              f"{conv['bytes_in'] / GB:.2f} GB in, {conv['bytes_out'] / GB:.2f} GB out", flush=True)

        loads = []
        if not args.no_load:
            meshes = [(None, {})]
            if args.mesh_devices:
                flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.mesh_devices}"
                meshes.append((f"fsdp={args.mesh_devices}", {"XLA_FLAGS": flags.strip()}))
            for mesh, env in meshes:
                r = run_child({"kind": "load", "model": args.model, "path": str(out), "mesh": mesh}, {**cpu_env, **env})
                r["peak_rss_minus_device_bytes"] = r["peak_rss_bytes"] - r["device_bytes"]
                r["rss_above_baseline_minus_device_bytes"] = (
                    r["peak_rss_minus_device_bytes"] - baseline["peak_rss_bytes"])
                loads.append(r)
                print(f"load (mesh {mesh or 'none'}, {r['devices']} device(s)): {r['load_s']:.1f}s "
                      f"({r['wall_s']:.1f}s wall), peak RSS {r['peak_rss_bytes'] / GB:.2f} GB, devices hold "
                      f"{r['device_bytes'] / GB:.2f} GB: {r['peak_rss_minus_device_bytes'] / GB:.2f} GB beyond them "
                      f"(largest array {r['largest_array_bytes'] / 1e6:.0f} MB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        "benchmark": "convert", "model": args.model, "config": config, "dtype": args.dtype,
        "environment": environment(),
        "note": "Children measured alone (peak RSS: their own VmHWM). Files written and read with direct I/O (no "
                "page cache). On CPU the loaded parameters live in host memory: a load's own cost is its peak "
                "RSS minus the bytes held by the devices (which on CPU alias the buffers read from disk).",
        "source": source, "baseline": baseline, "convert": conv, "load": loads,
    }
    name = args.out or f"convert_{args.model}" + (
        f"_d{args.depth}s{args.single_depth}" if args.model == "mmdit" else "") + f"_{jax.default_backend()}"
    print(f"wrote {write_json(name, payload)}")


if __name__ == "__main__":
    main()
