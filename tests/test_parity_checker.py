"""The parity checker's contract: result lines, summary, exit status, unsupported components as failures."""

import json
import re
import subprocess
import sys

from opensora_jax.tools.parity.core import find_handler, relative_error, run_case

LINE = re.compile(r"^(PASS|FAIL) (\S+) (\S+) worst=(\S+) tol=(\S+)")


def test_every_v1_2_component_has_a_handler(fixtures_dir):
    for case_json in sorted((fixtures_dir / "opensora_v1_2").glob("*/case.json")):
        component = json.loads(case_json.read_text())["component"]
        assert find_handler(component) is not None, f"{case_json.parent.name}: {component}"


def test_cli_lines_summary_and_exit_status(fixtures_dir):
    cases = [fixtures_dir / "opensora_v1_2" / "t5_tiny", fixtures_dir / "opensora_v2_0" / "clip_text_tiny"]
    done = subprocess.run([sys.executable, "-m", "opensora_jax.tools.parity", *map(str, cases)],
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert LINE.match(lines[0]) and lines[0].startswith("PASS t5_tiny t5 ")
    assert lines[1].startswith("FAIL clip_text_tiny") and "unsupported component" in lines[1]
    assert lines[-1] == "1 passed, 1 failed"
    assert done.returncode == 1


def test_a_wrong_answer_fails(fixtures_dir, tmp_path, monkeypatch):
    import opensora_jax.tools.parity.t5 as handler

    real = handler.run
    monkeypatch.setattr(handler, "run", lambda case: {k: v * 1.001 for k, v in real(case).items()})
    result = run_case(fixtures_dir / "opensora_v1_2" / "t5_tiny")
    assert not result.passed and result.worst > result.tol


def test_relative_error_rule():
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert abs(relative_error([1.0, 2.1], [1.0, 2.0]) - 0.05) < 1e-12
    assert relative_error([1.0], [1.0, 2.0]) == float("inf")
    assert relative_error([float("nan"), 2.0], [1.0, 2.0]) == float("inf")
