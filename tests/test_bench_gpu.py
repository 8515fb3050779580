"""bench/gpu.py: the GPU proof script, run here in --smoke mode (tiny models on the CPU, the same code paths)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"
sys.path.insert(0, str(REPO))

from bench.gpu_parts import BF16_BOUNDS, MMDIT_STEPS, PARTS, STDIT3_STEPS  # noqa: E402

STEP_PARTS = {"stdit3_360p": STDIT3_STEPS, "stdit3_720p": STDIT3_STEPS, "mmdit_step": MMDIT_STEPS}
DECODE_PARTS = ("vae_decode_720p", "hunyuan_decode")


def _env() -> dict:
    env = dict(os.environ)
    # A plain CPU run: the suite's 8 fake devices only slow the children's compiles down.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("gpu_smoke")
    proc = _run("--smoke", "--out", str(out), "--fixtures", str(fixtures_dir))
    return out, proc


def _load(out: pathlib.Path, part: str) -> dict:
    return json.loads((out / f"{part}.json").read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_every_part_ok(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in PARTS:
        data = _load(out, part.name)
        assert data["part"] == part.name and data["mode"] == "smoke"
        assert data["status"] == "ok", (part.name, data.get("error"))
        assert not data.get("error"), part.name
        assert 0 < data["wall_s"] <= data["timeout_s"]
        assert data["exit_code"] == 0 and (out / data["log"]).is_file()
    # Nothing half-written is left behind.
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_smoke_environment_and_parity_fields(smoke):
    out, _ = smoke
    env = _load(out, "environment")["results"]
    assert env["backend"] == "cpu" and env["versions"]["jax"]
    assert _positive(env["matmul_bfloat16_tflops"]) and _positive(env["matmul_float32_tflops"])
    parity = _load(out, "parity_f32")["results"]
    assert parity["exit_code"] == 0 and parity["failed"] == 0 and parity["passed"] == parity["num_cases"] >= 1
    assert all(c["passed"] and c["worst"] <= c["tol"] for c in parity["cases"])
    assert "opensora_jax.parity" in parity["command"]
    bf16 = _load(out, "parity_bf16")
    assert bf16["bounds"] == BF16_BOUNDS
    for key in ("stdit3", "vae_decode"):
        r = bf16["results"][key]
        # bfloat16 differs from float32, but only by rounding: above 0, under the stated bound.
        assert 0 < r["rel_err"] <= r["bound"] == BF16_BOUNDS[key] and r["within_bound"]


def test_smoke_timing_parts_fields(smoke):
    out, _ = smoke
    for name in [*STEP_PARTS, *DECODE_PARTS, "t5_encode"]:
        data = _load(out, name)
        r = data["results"]
        assert _positive(r["compile_s"]) and _positive(r["run_s_median"]) and r["run_s_all"], name
        assert r["params"] > 0 and r["weights_bytes"] > 0, name
        # A CPU keeps no allocator statistics: null peak, XLA's buffer plan instead.
        assert r["device_peak_bytes"] is None, name
        assert r["xla_memory_bytes"]["peak_estimate"] > 0, name
    for name, steps in STEP_PARTS.items():
        r = _load(out, name)["results"]
        assert r["cfg_batch"] == (3 if name == "mmdit_step" else 2)
        assert r["steps"] == steps and r["projected_denoise_s"] == pytest.approx(steps * r["step_s"])
        assert _positive(r["achieved_tflops"])
    assert _load(out, "stdit3_720p")["results"]["latent_thw"] != _load(out, "stdit3_360p")["results"]["latent_thw"]
    for name in DECODE_PARTS:
        r = _load(out, name)["results"]
        assert r["decode_s"] == r["run_s_median"] and len(r["output_shape"]) == 5
    # The reference's published figures sit beside ours, labelled.
    ref = _load(out, "stdit3_720p")["reference"]
    assert ref["label"] == "reference's published figure" and ref["time_s"] == 130


def test_smoke_summary(smoke):
    out, proc = smoke
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "smoke"
    assert {n: p["status"] for n, p in summary["parts"].items()} == {p.name: "ok" for p in PARTS}
    derived = summary["derived_720p_4s"]
    assert _positive(derived["projected_s"]) and derived["reference"]["time_s"] == 130
    assert "reference's published figure" in proc.stdout
    for part in PARTS:
        assert part.name in summary["table"]


def test_a_part_past_its_limit_is_recorded_as_timeout(tmp_path):
    import bench.gpu as gpu

    (tmp_path / "logs").mkdir()
    data = gpu.run_part(gpu.PART_BY_NAME["environment"], tmp_path, True, tmp_path, timeout_s=0.2)
    assert data["status"] == "timeout" and "limit" in data["error"]
    assert json.loads((tmp_path / "environment.json").read_text())["status"] == "timeout"


def test_unknown_part_is_a_usage_error(tmp_path):
    proc = _run("--smoke", "--parts", "stdit3_1080p", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --parts")


def test_full_run_without_gpu_stops_after_the_environment(tmp_path):
    proc = _run("--parts", "environment,t5_encode", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no GPU")
    assert _load(tmp_path, "environment")["status"] == "failed"
    assert _load(tmp_path, "t5_encode")["status"] == "skipped"


def test_help_documents_parts_timeouts_and_outputs():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0
    for part in PARTS:
        assert f"{part.name}" in proc.stdout and f"{part.timeout_s} s" in proc.stdout
    for word in ("summary.json", "peak_bytes_in_use", "status", "--budget", str(BF16_BOUNDS["stdit3"])):
        assert word in proc.stdout
