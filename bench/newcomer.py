"""The newcomer path, timed: the README's own commands, as a new user runs them on a fresh clone.

    python bench/newcomer.py [--quick] [--only sample,train]

Reads the commands out of README.md's ```bash blocks (so this and the README cannot drift), runs each in a
scratch copy of the checkout (symbolic links to its files; `../shared/fixtures` points at the reference
fixtures, OPENSORA_FIXTURES overrides), and writes their wall times with the machine they ran on (CPU model,
cores, load average before and after) to bench/results/newcomer_cpu.json. `--quick` appends the small step
counts tests/test_readme_commands.py uses (its figures are not the README's).

STEPS names the README commands by their first words; each command of the README's newcomer path must be
found there exactly once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "newcomer_cpu.json"


# (name, how the README command starts, flags --quick appends, README globs --quick narrows (glob → one case))
STEPS = [
    ("sample", 'python sample.py --prompt "a blue square moving up"', ["--steps", "2", "--no-progress"], {}),
    ("synthetic", "python -m opensora_jax.data.synthetic data/synthetic", [], {}),
    ("train", "python train.py --config configs/demo/train_tiny.py", ["--steps", "1"], {}),
    ("convert", "python -m convert stdit3 ../shared/fixtures/", [], {}),
    ("parity", "python -m opensora_jax.parity ../shared/fixtures/", [],
     {"opensora_v1_2/*/": "opensora_v1_2/stdit3_tiny/", "opensora_v2_0/*/": "opensora_v2_0/mmdit_tiny/"}),
]


def readme_commands(text: str) -> list[str]:
    """Every command line of the README's ```bash blocks, backslash continuations joined, comments kept."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        logical = ""
        for line in block.splitlines():
            logical += line.rstrip()
            if logical.endswith("\\"):
                logical = logical[:-1].rstrip() + " "
                continue
            if logical.strip():
                commands.append(re.sub(r"\s+", " ", logical.strip()))
            logical = ""
    return commands


def find_command(commands: list[str], start: str) -> str:
    """The one README command that begins with `start`."""
    found = [c for c in commands if c.startswith(start)]
    if len(found) != 1:
        raise SystemExit(f"README.md has {len(found)} commands starting {start!r}; expected exactly one")
    return found[0]


def newcomer_commands(readme_text: str, *, quick: bool) -> list[tuple[str, str]]:
    """(name, shell command) for each of STEPS, from the README; `quick` appends the small step counts."""
    commands = readme_commands(readme_text)
    out = []
    for name, start, extra, narrow in STEPS:
        command = find_command(commands, start)
        if quick:
            for pattern, one in narrow.items():
                command = command.replace(pattern, one)
            command = " ".join([command, *map(shlex.quote, extra)])
        out.append((name, command))
    return out


def fixtures_root() -> pathlib.Path:
    env = os.environ.get("OPENSORA_FIXTURES")
    return pathlib.Path(env) if env else ROOT.parent / "shared" / "fixtures"


def fresh_clone(scratch: pathlib.Path) -> pathlib.Path:
    """A checkout-shaped directory under `scratch`: links to the repository's tracked top-level entries (no
    outputs of earlier runs), and `../shared/fixtures` beside it. Returns the clone's root."""
    clone = scratch / "opensora-jax"
    clone.mkdir(parents=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    tops = {p.split("/", 1)[0] for p in tracked} or {p.name for p in ROOT.iterdir()}
    for name in sorted(tops):
        if (ROOT / name).exists() and not name.startswith("."):
            (clone / name).symlink_to(ROOT / name)
    (scratch / "shared").mkdir()
    (scratch / "shared" / "fixtures").symlink_to(fixtures_root())
    return clone


def shell_env(bin_dir: pathlib.Path) -> dict:
    """The environment the README's `python` means: this interpreter first on PATH, CPU jax, no hub."""
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def run_step(command: str, clone: pathlib.Path, env: dict, timeout: float) -> dict:
    """Runs one README command with bash in `clone`; its wall time, exit status and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return {"command": command, "seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode,
            "stdout_tail": proc.stdout[-2000:], "stderr_tail": proc.stderr[-2000:]}


def machine() -> dict:
    """The machine the figures come from: CPU model, cores, load average, platform."""
    model = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="append the test's small step counts")
    parser.add_argument("--only", default="", help="comma-separated step names (default: all of "
                        f"{', '.join(s[0] for s in STEPS)})")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command (default 3600)")
    args = parser.parse_args(argv)
    wanted = [s for s in args.only.split(",") if s]
    steps = [(n, c) for n, c in newcomer_commands(README.read_text(), quick=args.quick) if not wanted or n in wanted]
    before = machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="newcomer-") as scratch:
        clone = fresh_clone(pathlib.Path(scratch))
        env = shell_env(pathlib.Path(scratch) / "bin")
        for name, command in steps:
            print(f"$ {command}", flush=True)
            results[name] = run_step(command, clone, env, args.timeout)
            r = results[name]
            print(f"  {name}: exit {r['returncode']} in {r['seconds']} s", flush=True)
            if r["returncode"]:
                print(r["stderr_tail"], file=sys.stderr)
    payload = {"machine": before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
               "quick": args.quick, "steps": results}
    if not args.quick and not wanted:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
        tmp.write_text(__import__("json").dumps(payload, indent=2) + "\n")
        tmp.replace(RESULTS)
        print(f"wrote {RESULTS}")
    print(f"machine: {before['cpu']}, {before['cores']} cores, load average {before['load_average']} before, "
          f"{payload['load_average_after']} after")
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
