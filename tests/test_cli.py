"""Console entry points and the CLIs' error contract: a user's mistake is one `error:` line and exit status 2;
any other exception is a bug of ours and keeps its traceback."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from opensora_jax.config_utils import run_cli
from opensora_jax.errors import CheckpointError, UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# Each console command and the module it must share its code with.
SAME_AS = {
    "opensora-sample": "opensora_jax.cli.sample",
    "opensora-train": "opensora_jax.cli.train",
    "opensora-train-vae": "opensora_jax.cli.train_vae",
    "opensora-features": "opensora_jax.cli.features",
    "opensora-features-v2": "opensora_jax.cli.features_v2_0",
    "opensora-app": "opensora_jax.app.cli",
    "opensora-convert": "convert.__main__",
    "opensora-parity": "opensora_jax.tools.parity.__main__",
    "opensora-plan": "opensora_jax.tools.plan_cli",
}


def _entry(name: str):
    module, _, attr = SCRIPTS[name].partition(":")
    return importlib.import_module(module), getattr(importlib.import_module(module), attr)


def test_every_command_is_declared_and_wraps_its_module():
    assert set(SCRIPTS) == set(SAME_AS)
    for name, module in SAME_AS.items():
        entry_module, entry = _entry(name)
        assert entry_module.__name__ == module and callable(entry), name


@pytest.mark.parametrize("name", sorted(SAME_AS))
def test_every_command_explains_itself(name, monkeypatch, capsys):
    _, entry = _entry(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_user_errors_are_one_line_and_exit_2(capsys):
    for error in (UserError("bad --mesh 'x'"), FileNotFoundError("no such file: a.csv"),
                  CheckpointError(["missing parameter: w"], "loading ckpt")):
        def main(argv, error=error):
            raise error

        assert run_cli(main, []) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_our_bugs_keep_their_traceback():
    def main(argv):
        raise KeyError("a bug of ours, not the user's")

    with pytest.raises(KeyError):
        run_cli(main, [])

    def main(argv):
        raise ValueError("also ours: a plain ValueError is no longer taken for a user error")

    with pytest.raises(ValueError):
        run_cli(main, [])


def test_a_console_command_reports_a_missing_file(tmp_path):
    command = shutil.which("opensora-convert", path=str(pathlib.Path(sys.executable).parent)) or \
        shutil.which("opensora-convert")
    if command is None:
        pytest.fail("opensora-convert is not installed: run `pip install -e .`")
    proc = subprocess.run([command, "stdit3", str(tmp_path / "nope.safetensors"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_mesh_and_unknown_config_field_are_user_errors(tmp_path):
    from opensora_jax.cli import sample

    with pytest.raises(UserError, match="no field 'nope'"):
        sample.make_config(["--prompt", "x", "--config.nope=1"])
    from opensora_jax.parallel import MeshConfig

    with pytest.raises(UserError, match="unknown axis"):
        MeshConfig.parse("pipeline=2")


def _run(argv, **kw):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


def test_convert_refuses_a_non_empty_out_dir_before_reading(tmp_path, fixtures_dir):
    src = fixtures_dir / "opensora_v1_2" / "stdit3_tiny" / "weights.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run(["-m", "convert", "stdit3", str(src), str(out)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: OUT_DIR {str(out)!r} is not empty; pass --overwrite to replace it"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_convert_with_the_wrong_architecture_says_how_to_fix_it(tmp_path, fixtures_dir):
    src = fixtures_dir / "opensora_v1_2" / "stdit3_tiny" / "weights.safetensors"  # no config.json beside it
    proc = _run(["-m", "convert", "stdit3", str(src), str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "more" in proc.stderr and "pass --config FILE" in proc.stderr and len(proc.stderr.splitlines()) < 20
    assert not (tmp_path / "out").exists()


def test_a_killed_writers_partial_directory_is_removed_by_the_next_save(tmp_path):
    import os

    from opensora_jax.checkpoints import save_converted

    dead = tmp_path / ".ckpt.partial-999999999-deadbeef"
    alive = tmp_path / f".ckpt.partial-{os.getpid()}-cafe"
    for d in (dead, alive):
        d.mkdir()
    save_converted(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, config={}, model="t5")
    assert not dead.exists() and alive.exists() and (tmp_path / "ckpt" / "config.json").is_file()


def test_ctrl_c_during_compilation_exits_130_without_a_crash(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "sample.py", "--prompt", "a red circle moving left", "--no-progress",
                             "--out-dir", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "no checkpoints given: sampling with the demo model ..." then it loads/compiles
    assert "demo model" in line
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert not list((tmp_path / "out").glob("sample_*.mp4"))
