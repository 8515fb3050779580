"""Console entry points and the CLIs' error contract: a user's mistake is one `error:` line and exit status 2;
any other exception is a bug of ours and keeps its traceback."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import subprocess
import sys
import tomllib

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
