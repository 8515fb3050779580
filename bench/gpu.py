"""GPU proof in one script: environment, parity, and the released models' step / decode / encode figures.

    python bench/gpu.py                        # on one NVIDIA GPU: every part, about 8 minutes at most
    python bench/gpu.py --parts stdit3_720p    # some parts only
    python bench/gpu.py --smoke --out /tmp/s   # the same code paths on a CPU with tiny models (< 1 minute)

Weights are random, in the released architectures (nothing is downloaded). Every part runs in its own process
under its own time limit (and the whole run under --budget): a part that fails, runs out of memory or out of
time is recorded with that status and the next part runs. Each part writes OUT/<part>.json (rewritten as it
measures, so a part stopped by its limit keeps what it had), its output goes to OUT/logs/<part>.log, and the
run ends with OUT/summary.json and a summary table on stdout, with the reference's published figures
(../shared/spec/performance_claims.md) beside ours where it has any, labelled as the reference's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import write_json_at  # noqa: E402
from bench.gpu_parts import (BF16_BOUNDS, MMDIT_STEPS, PART_BY_NAME, PARTS, REFERENCE, STDIT3_STEPS,  # noqa: E402
                             Record, full_sizes, json_safe, smoke_sizes)
from opensora_jax.config_utils import run_cli  # noqa: E402
from opensora_jax.errors import UserError  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "gpu"
BUDGET_S = 470  # the whole run, start to summary, stays within 8 minutes
SMOKE_BUDGET_S = 900
MIN_PART_S = 15  # a part is skipped, not started, with less than this left of the budget
STATUSES = ("ok", "failed", "error", "oom", "timeout", "crashed", "skipped")


def _epilog() -> str:
    rows = "\n".join(f"  {p.name:16s} {p.timeout_s:4d} s  {p.what}" for p in PARTS)
    return f"""parts (name, time limit on a GPU; each has {PARTS[0].smoke_timeout_s} s in --smoke):
{rows}

The limits add up to more than --budget ({BUDGET_S} s): a part gets min(its limit, what is left of the budget)
and is skipped when under {MIN_PART_S} s are left. Parts start in the order listed.

outputs (OUT: --out, default bench/results/gpu; --smoke without --out writes to a new temporary folder):
  OUT/<part>.json   {{part, status, mode, what, reference, timeout_s, wall_s, exit_code, log, error, results}}
                    status: {" | ".join(STATUSES)}
                    (failed: a check did not pass, e.g. a parity case or the bf16 bound; oom: the device ran
                    out of memory; crashed: the process died without a status, e.g. killed by the host)
                    results: the part's measurements: compile_s (jit lower + compile, once per shape),
                    run_s_median / run_s_all (steady state after one warm-up call, block_until_ready),
                    device_peak_bytes (device.memory_stats()["peak_bytes_in_use"] of the part's own process,
                    weights included; null where the backend keeps no statistics, e.g. a CPU),
                    xla_memory_bytes (the compiled program's buffer plan), params, weights_bytes, init_s;
                    denoiser steps: step_s, projected_denoise_s (= {STDIT3_STEPS} steps for STDiT3, {MMDIT_STEPS} for
                    MMDiT), achieved_tflops (analytic matmul FLOPs / step time)
                    reference: the reference's published figure for that setting (a whole generation on the
                    reference's GPU, copied, not re-measured), or null
  OUT/logs/<part>.log  the part's stdout and stderr
  OUT/summary.json  every part's status and wall time, the table's rows, and a projected v1.2 720p 4 s
                    generation (T5 encode + {STDIT3_STEPS} steps + VAE decode) beside the reference's

bf16 bounds: parity_bf16 checks max|bf16 - f32| / max|f32| <= {BF16_BOUNDS['stdit3']:g} for one STDiT3 forward
(depth 2 at the released width: hidden 1152, 16 heads, 4096-channel captions of 300 tokens; timesteps 1000
and 500, which bfloat16 holds exactly) and <= {BF16_BOUNDS['vae_decode']:g} for one VAE v1.2 decode (released
architecture, 17 frames at 128x128), both with the models' own random initialisation; the float32 run uses
matmul precision 'highest', the bfloat16 run the same weights rounded to bfloat16.

exit status: 0 when every part is ok, 1 otherwise, 2 for a usage error (and for a full run without a GPU)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for the JSON files (default bench/results/gpu; with "
                                                    "--smoke, a new temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: the same code paths in < 1 min")
    parser.add_argument("--parts", default=None, help="comma list of parts to run (default all): " +
                        ",".join(PART_BY_NAME))
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {BUDGET_S}; --smoke {SMOKE_BUDGET_S})")
    parser.add_argument("--fixtures", default=None,
                        help="fixture root (holds opensora_v1_2/ and opensora_v2_0/; default $OPENSORA_FIXTURES, "
                             "else ../shared/fixtures or ./shared/fixtures next to the repository)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parts run at once (default 1: one GPU; --smoke: 2, the CPU's cores are shared)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_fixtures() -> pathlib.Path:
    env = os.environ.get("OPENSORA_FIXTURES")
    if env:
        return pathlib.Path(env)
    for candidate in (REPO_ROOT.parent / "shared" / "fixtures", REPO_ROOT / "shared" / "fixtures"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "fixtures"


# ------------------------------------------------------------------------------------------------ child


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def run_child(args) -> int:
    """Runs one part in this process and records it in OUT/<part>.json."""
    part = PART_BY_NAME[args.child]
    sizes = smoke_sizes() if args.smoke else full_sizes()
    out = pathlib.Path(args.out)
    rec = Record(out / f"{part.name}.json", part.name, mode=sizes.name, what=part.what,
                 reference=REFERENCE.get(part.name),
                 started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        status = part.run(rec, sizes, {"out": str(out), "fixtures": args.fixtures})
    except Exception as e:  # noqa: BLE001 - recorded as the part's status; the traceback goes to its log
        traceback.print_exc()
        rec.set(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:2000]}")
        return 1
    rec.set(status=status)
    return 0


# ------------------------------------------------------------------------------------------------ parent


def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    return env


_LIVE: set[subprocess.Popen] = set()  # the parts' processes now running
_LIVE_LOCK = threading.Lock()


def _stop(proc: subprocess.Popen) -> None:
    """Ends the part's whole process group (the parity part starts the checker as a grandchild)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _read(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_part(part, out: pathlib.Path, smoke: bool, fixtures: pathlib.Path, timeout_s: float) -> dict:
    """Runs `part` in a child process under `timeout_s`; returns its final record (also written to disk)."""
    path, log = out / f"{part.name}.json", out / "logs" / f"{part.name}.log"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", part.name, "--out", str(out),
           "--fixtures", str(fixtures)] + (["--smoke"] if smoke else [])
    start = time.perf_counter()
    timed_out = False
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(smoke),
                                start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
            rc = proc.returncode
        except BaseException:  # Ctrl-C: do not leave the part running on the device
            _stop(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    wall = time.perf_counter() - start
    data = _read(path) or {"part": part.name, "status": "running", "results": {}}
    if timed_out:
        data["status"] = "timeout"
        data["error"] = f"ran past its {timeout_s:.0f} s limit and was stopped; results hold what it measured by then"
    elif data.get("status") in (None, "running"):
        data["status"] = "crashed"
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        data["error"] = f"the part's process ended without a status ({how}); log tail:\n{_log_tail(log)}"
    data.update(timeout_s=round(timeout_s, 1), wall_s=round(wall, 2), exit_code=rc, log=str(log.relative_to(out)))
    write_json_at(path, json_safe(data))
    return data


def skipped(part, out: pathlib.Path, smoke: bool, reason: str) -> dict:
    data = {"part": part.name, "status": "skipped", "mode": "smoke" if smoke else "full", "what": part.what,
            "reference": REFERENCE.get(part.name), "error": reason, "wall_s": 0.0, "results": {}}
    write_json_at(out / f"{part.name}.json", json_safe(data))
    return data


# ------------------------------------------------------------------------------------------------ summary


def _secs(x) -> str:
    if x is None:
        return "?"
    return f"{x:.0f} s" if x >= 100 else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.1f} ms"


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _peak(r: dict) -> str:
    if r.get("device_peak_bytes") is not None:
        return f"peak {_gib(r['device_peak_bytes'])}"
    plan = (r.get("xla_memory_bytes") or {}).get("peak_estimate")
    return f"peak n/a (XLA plan {_gib(plan)})" if plan is not None else "peak n/a"


def measured(data: dict) -> str:
    """One line of what a part measured."""
    r, name = data.get("results") or {}, data["part"]
    if data["status"] == "skipped":
        return data.get("error", "")
    if name == "environment":
        smi = ((r.get("nvidia_smi") or {}).get("gpus") or [{}])[0]
        mem = f"{int(smi['memory_total_mib']) / 1024:.0f} GiB" if smi.get("memory_total_mib", "").isdigit() else \
            _gib(r.get("device_bytes_limit")) + " usable" if r.get("device_bytes_limit") else "memory ?"
        v = r.get("versions") or {}
        bf16, f32 = r.get("matmul_bfloat16_tflops"), r.get("matmul_float32_tflops")
        return (f"{r.get('device_kind', '?')}, {mem}, driver {smi.get('driver_version', 'n/a')}, "
                f"jax {v.get('jax', '?')}/jaxlib {v.get('jaxlib', '?')}; matmul bf16 {bf16:.3g} TFLOP/s, f32 {f32:.3g}"
                if bf16 is not None and f32 is not None else f"{r.get('device_kind', '?')}")
    if name == "parity_f32":
        if "passed" not in r:
            done = r.get("lines") or []
            return f"{sum(x.startswith('PASS') for x in done)} PASS, {sum(x.startswith('FAIL') for x in done)} FAIL " \
                   f"of {r.get('num_cases', '?')} cases before it stopped" if done else ""
        worst = max((c["worst"] for c in r["cases"] if isinstance(c["worst"], (int, float))), default=None)
        bad = [c["case"] for c in r["cases"] if not c["passed"]]
        return (f"{r['passed']}/{r['passed'] + r['failed']} PASS, worst {worst:.1e}" if worst is not None else
                f"{r['passed']}/{r['passed'] + r['failed']} PASS") + (f"; FAIL: {', '.join(bad)}" if bad else "")
    if name == "parity_bf16":
        return ", ".join(f"{k} {r[key]['rel_err']:.1e} (bound {r[key]['bound']:g})"
                         for k, key in (("STDiT3", "stdit3"), ("VAE", "vae_decode")) if key in r)
    if "compile_s" not in r:
        return ""
    text = f"compile {_secs(r['compile_s'])}, "
    if "step_s" in r:
        text += f"step {_secs(r['step_s'])}, {_peak(r)}; {r['steps']} steps {_secs(r['projected_denoise_s'])}"
    elif "decode_s" in r:
        text += f"decode {_secs(r['decode_s'])}, {_peak(r)}"
    elif "encode_s" in r:
        text += f"encode {_secs(r['encode_s'])}, {_peak(r)}"
    return text


def reference_text(data: dict) -> str:
    ref = data.get("reference")
    if not ref:
        return "-"
    text = f"{ref['gpu']}, {ref['case']}: {_secs(ref['time_s'])}, {ref['peak_memory_gb']} GB"
    if "h200_v1_3_97_frames" in ref:
        h200 = ref["h200_v1_3_97_frames"]
        text += f"; H200 v1.3 97 f: {_secs(h200['time_s'])}, {h200['peak_memory_gb']} GB"
    return text


def derived(records: dict[str, dict]) -> dict | None:
    """A v1.2 720p 4 s generation projected from its parts: T5 encode + 30 STDiT3 steps + VAE decode."""
    parts = ("t5_encode", "stdit3_720p", "vae_decode_720p")
    if not all(records.get(p, {}).get("status") == "ok" for p in parts):
        return None
    t5, step, vae = (records[p]["results"] for p in parts)
    total = t5["encode_s"] + step["projected_denoise_s"] + vae["decode_s"]
    peaks = [r.get("device_peak_bytes") for r in (t5, step, vae)]
    return {"what": f"v1.2 720p 4 s generation, projected: T5 encode + {STDIT3_STEPS} STDiT3 steps + VAE decode "
                    "(each part measured in its own process; the peak is the largest of the three)",
            "projected_s": total, "peak_bytes": max(peaks) if all(p is not None for p in peaks) else None,
            "reference": REFERENCE["stdit3_720p"]}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])])


def summarize(records: dict[str, dict], out: pathlib.Path, smoke: bool, budget: float, total_wall: float) -> str:
    rows = [["part", "status", "wall", "measured (ours)", "reference's published figure (whole generation)"]]
    for name, data in records.items():
        rows.append([name, data["status"], _secs(data.get("wall_s")), measured(data), reference_text(data)])
    extra = derived(records)
    if extra:
        peak = _gib(extra["peak_bytes"]) if extra["peak_bytes"] is not None else "n/a"
        rows.append(["=> 720p 4s total", "", "", f"T5 + {STDIT3_STEPS} steps + VAE: {_secs(extra['projected_s'])}, "
                     f"peak {peak}", reference_text({"reference": extra["reference"]})])
    text = table(rows)
    write_json_at(out / "summary.json", json_safe({
        "mode": "smoke" if smoke else "full", "budget_s": budget, "total_wall_s": round(total_wall, 2),
        "parts": {n: {"status": d["status"], "wall_s": d.get("wall_s"), "error": d.get("error")}
                  for n, d in records.items()},
        "derived_720p_4s": extra, "table": text,
        "reference_note": "reference figures are the reference repository's published claims "
                          "(../shared/spec/performance_claims.md), whole generations on other GPUs; not re-measured",
    }))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    names = list(PART_BY_NAME) if args.parts is None else [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PART_BY_NAME]
    if unknown or not names:
        raise UserError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(PART_BY_NAME)}")
    budget = args.budget if args.budget is not None else (SMOKE_BUDGET_S if args.smoke else BUDGET_S)
    if budget <= 0:
        raise UserError(f"--budget must be positive, got {budget:g}")
    fixtures = pathlib.Path(args.fixtures) if args.fixtures else default_fixtures()
    if "parity_f32" in names and not fixtures.is_dir():
        raise UserError(f"fixture root {fixtures} not found: pass --fixtures DIR or set OPENSORA_FIXTURES")
    out = pathlib.Path(args.out) if args.out else (pathlib.Path(tempfile.mkdtemp(prefix="gpu_smoke_")) if args.smoke
                                                    else DEFAULT_OUT)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"bench/gpu.py {'--smoke ' if args.smoke else ''}-> {out} (budget {budget:.0f} s)", flush=True)

    jobs = args.jobs if args.jobs is not None else (2 if args.smoke else 1)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    start = time.perf_counter()
    records: dict[str, dict] = {}
    state = {"no_gpu": None, "done": 0}
    lock = threading.Lock()

    def one(name: str) -> None:
        part = PART_BY_NAME[name]
        left = budget - (time.perf_counter() - start)
        if state["no_gpu"]:
            data = skipped(part, out, args.smoke, state["no_gpu"])
        elif left < MIN_PART_S:
            data = skipped(part, out, args.smoke, f"the overall budget ({budget:.0f} s) was spent")
        else:
            limit = min(part.smoke_timeout_s if args.smoke else part.timeout_s, left)
            data = run_part(part, out, args.smoke, fixtures, limit)
        with lock:
            records[name] = data
            state["done"] += 1
            print(f"[{state['done']}/{len(names)}] {name:16s} {data['status']:8s} {_secs(data.get('wall_s')):>8s}  "
                  f"{measured(data)}"
                  + (f"\n    {data['error'].splitlines()[0]}" if data["status"] != "ok" and data.get("error") else ""),
                  flush=True)
            if name == "environment" and not args.smoke and data["results"].get("backend") not in (None, "gpu"):
                state["no_gpu"] = (f"no GPU: jax's backend is {data['results'].get('backend')!r}; the full run needs "
                                   "one NVIDIA GPU (pip install -e \".[cuda]\"), --smoke runs on a CPU")

    rest = list(names)
    if rest[0] == "environment":  # first and alone: the full run stops early without a GPU
        one(rest.pop(0))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, name) for name in rest]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C or a bug: start nothing more, and leave no part running on the device
            pool.shutdown(wait=False, cancel_futures=True)
            with _LIVE_LOCK:
                live = list(_LIVE)
            for proc in live:
                _stop(proc)
            raise
    records = {name: records[name] for name in names}
    no_gpu = state["no_gpu"]
    total = time.perf_counter() - start
    print("\n" + summarize(records, out, args.smoke, budget, total))
    print(f"\nwrote {out}/<part>.json and summary.json in {_secs(total)}")
    if no_gpu:
        raise UserError(no_gpu)
    return 0 if all(d["status"] == "ok" for d in records.values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
