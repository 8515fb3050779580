"""The parity checker's contract: result lines, summary, exit status, unsupported components as failures,
missing intermediates as failures, the --json report, and the README status table rendered from it."""

import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from opensora_jax.tools import status_table
from opensora_jax.tools.parity import core
from opensora_jax.tools.parity.__main__ import main as parity_main
from opensora_jax.tools.parity.core import find_handler, relative_error, run_case

LINE = re.compile(r"^(PASS|FAIL) (\S+) (\S+) worst=(\S+) tol=(\S+)")


def test_every_component_has_a_handler(fixtures_dir):
    for case_json in sorted(fixtures_dir.glob("opensora_v*/*/case.json")):
        component = json.loads(case_json.read_text())["component"]
        assert find_handler(component) is not None, f"{case_json.parent.name}: {component}"


def _unsupported_case(fixtures_dir, directory):
    """clip_text_tiny relabelled as a component no handler serves."""
    source = fixtures_dir / "opensora_v2_0" / "clip_text_tiny"
    directory.mkdir()
    meta = json.loads((source / "case.json").read_text())
    meta.update(case="unknown_tiny", component="FluxAutoEncoder2D (not ported)")
    (directory / "case.json").write_text(json.dumps(meta))
    for name in ("io.npz", "weights.safetensors"):
        (directory / name).symlink_to(source / name)
    return directory


def test_cli_lines_summary_exit_status_and_json(fixtures_dir, tmp_path):
    cases = [fixtures_dir / "opensora_v1_2" / "t5_tiny", _unsupported_case(fixtures_dir, tmp_path / "unknown")]
    report = tmp_path / "parity.json"
    done = subprocess.run([sys.executable, "-m", "opensora_jax.parity", *map(str, cases), "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert LINE.match(lines[0]) and lines[0].startswith("PASS t5_tiny t5 ")
    assert lines[1].startswith("FAIL unknown_tiny") and "unsupported component" in lines[1]
    assert lines[-1] == "1 passed, 1 failed" and len(lines) == 3
    assert done.returncode == 1

    data = json.loads(report.read_text())
    assert (data["passed"], data["failed"]) == (1, 1)
    t5, clip = data["cases"]
    assert {k: t5[k] for k in ("case", "component", "handler", "passed", "detail")} == {
        "case": "t5_tiny", "component": "T5EncoderModel (transformers 4.40.2)", "handler": "t5", "passed": True,
        "detail": ""}
    assert t5["worst"] == pytest.approx(float(LINE.match(lines[0]).group(4)), rel=1e-3)
    assert t5["tol"] == 1e-4
    assert set(t5["errors"]) == {"last_hidden_state", "intermediate/hidden_state_0", "intermediate/hidden_state_1"}
    assert t5["errors"]["last_hidden_state"] == t5["worst"]
    assert all(0 <= err <= t5["tol"] for err in t5["errors"].values())
    assert clip["handler"] is None and not clip["passed"] and clip["detail"] == "unsupported component"
    assert clip["worst"] == "inf" and clip["errors"] and all(err is None for err in clip["errors"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.json", "unknown"]  # no temporary file left


# --------------------------------------------------------------------------- tiny fake cases


def _fake_handler(case):
    """out = 2x, intermediate/a = x + 1, intermediate/b = x - 1; `config` may omit some or scale one."""
    x = case["x"]
    arrays = {"out": 2 * x, "intermediate/a": x + 1, "intermediate/b": x - 1}
    arrays = {k: v * case.config.get("scale", {}).get(k, 1.0) for k, v in arrays.items()}
    return {k: v for k, v in arrays.items() if k not in case.config.get("omit", ())}


@pytest.fixture
def fake_component(monkeypatch):
    """Routes component "Fake" to `_fake_handler`, imported like a real handler module."""
    module = types.ModuleType("fake_parity_handler")
    module.run = _fake_handler
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(core, "_HANDLERS", [(lambda c: c == "Fake", f"{module.__name__}:run", "fake"), *core._HANDLERS])


def _fake_case(root, name, **config):
    """A fixture directory in the shared format: input x, output out, intermediates a and b."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    arrays = {"x": x, "out": 2 * x, "intermediate/a": x + 1, "intermediate/b": x - 1}
    roles = {"x": "input", "out": "output", "intermediate/a": "intermediate", "intermediate/b": "intermediate"}
    path = root / name
    path.mkdir()
    np.savez(path / "io.npz", **arrays)
    meta = {"case": name, "component": "Fake", "config": config, "tolerance": {"max_err_over_max_ref": 1e-4},
            "arrays": [{"name": k, "shape": list(v.shape), "dtype": "float32", "role": roles[k]} for k, v in arrays.items()]}
    (path / "case.json").write_text(json.dumps(meta))
    return path


def test_every_array_right_passes(fake_component, tmp_path):
    result = run_case(_fake_case(tmp_path, "good"))
    assert result.passed and result.line() == "PASS good fake worst=0.000e+00 tol=1.000e-04"
    assert result.errors == {"out": 0.0, "intermediate/a": 0.0, "intermediate/b": 0.0}


def test_a_missing_intermediate_fails_and_is_named(fake_component, tmp_path):
    result = run_case(_fake_case(tmp_path, "lazy", omit=["intermediate/b"]))
    assert not result.passed
    assert result.detail == "missing intermediate intermediate/b"
    assert result.line() == "FAIL lazy fake worst=0.000e+00 tol=1.000e-04 missing intermediate intermediate/b"
    assert result.errors == {"out": 0.0, "intermediate/a": 0.0, "intermediate/b": None}

    result = run_case(_fake_case(tmp_path, "lazier", omit=["intermediate/a", "intermediate/b"]))
    assert result.detail == "missing intermediates intermediate/a, intermediate/b"


def test_a_wrong_intermediate_fails(fake_component, tmp_path):
    result = run_case(_fake_case(tmp_path, "off", scale={"intermediate/a": 1.01}))
    assert not result.passed and result.detail.startswith("intermediate/a err=")
    assert result.worst == 0.0 and result.errors["intermediate/a"] == pytest.approx(0.01, rel=1e-4)


def test_json_report_in_process(fake_component, tmp_path, capsys):
    cases = [_fake_case(tmp_path, "good"), _fake_case(tmp_path, "lazy", omit=["intermediate/b"]),
             _fake_case(tmp_path, "wrong", scale={"out": 1.5})]
    report = tmp_path / "out" / "parity.json"
    report.parent.mkdir()
    assert parity_main([*map(str, cases), "--json", str(report)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "1 passed, 2 failed"
    data = json.loads(report.read_text())
    assert (data["passed"], data["failed"]) == (1, 2)
    good, lazy, wrong = data["cases"]
    assert good == {"case": "good", "component": "Fake", "handler": "fake", "passed": True, "worst": 0.0,
                    "tol": 1e-4, "detail": "", "errors": {"out": 0.0, "intermediate/a": 0.0, "intermediate/b": 0.0}}
    assert lazy["errors"]["intermediate/b"] is None and "missing intermediate" in lazy["detail"]
    assert not wrong["passed"] and wrong["worst"] == pytest.approx(0.5) and wrong["errors"]["out"] == wrong["worst"]
    assert [p.name for p in report.parent.iterdir()] == ["parity.json"]


def test_json_into_a_missing_directory_is_refused_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parity_main([str(tmp_path), "--json", str(tmp_path / "nowhere" / "parity.json")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- README status table

RECORDS = [
    {"case": "t5_tiny", "component": "T5EncoderModel (transformers 4.40.2)", "handler": "t5", "passed": True,
     "worst": 3.98e-07, "tol": 1e-4, "detail": "", "errors": {}},
    {"case": "clip_text_tiny", "component": "CLIPTextModel", "handler": None, "passed": False, "worst": "inf",
     "tol": 1e-4, "detail": "unsupported component", "errors": {}},
]
TABLE = """| case | component | worst error | tolerance | result |
|---|---|---:|---:|---|
| `t5_tiny` | T5EncoderModel (transformers 4.40.2) | 4.0e-7 | 1.0e-4 | PASS |
| `clip_text_tiny` | CLIPTextModel | inf | 1.0e-4 | FAIL |"""


def _report(tmp_path):
    path = tmp_path / "parity.json"
    path.write_text(json.dumps({"passed": 1, "failed": 1, "cases": RECORDS}))
    return path


def test_status_table_renders_one_row_per_case(tmp_path, capsys):
    assert status_table.render_table(RECORDS) == TABLE
    assert status_table.main([str(_report(tmp_path))]) == 0
    assert capsys.readouterr().out == TABLE + "\n"


def test_status_table_replaces_the_text_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    before = "# Title\n\n## Status\n\nParity:\n\n"
    after = "\n\nMore text.\n"
    readme.write_text(f"{before}{status_table.START_MARKER}\n| old | table |\n{status_table.END_MARKER}{after}")
    assert status_table.main([str(_report(tmp_path)), "--readme", str(readme)]) == 0
    expected = f"{before}{status_table.START_MARKER}\n{TABLE}\n{status_table.END_MARKER}{after}"
    assert readme.read_text() == expected
    status_table.main([str(_report(tmp_path)), "--readme", str(readme)])
    assert readme.read_text() == expected  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "parity.json"]


def test_status_table_without_markers_is_a_one_line_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno markers here\n")
    assert status_table.run_cli(status_table.main, [str(_report(tmp_path)), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "parity-table:start" in err
    assert readme.read_text() == "# Title\n\nno markers here\n"


def test_status_table_rejects_a_file_that_is_not_a_parity_report(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert status_table.run_cli(status_table.main, [str(bad)]) == 2
    assert "not a parity --json file" in capsys.readouterr().err


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
