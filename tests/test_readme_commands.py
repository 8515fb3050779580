"""The README runs as written: its newcomer commands, read out of README.md's ```bash blocks, run on a
fresh-clone-shaped copy of the checkout with only what the repository ships (plus `../shared/fixtures`).

The commands come from `bench/newcomer.py` (the same parser that times them for the README), with small step
counts appended: sampling with the demo model (`--steps 2`), the synthetic dataset, one training step from the
demo parts in assets/demo, conversion of a fixture checkpoint, and parity on one case per family (the README's
`*/` globs narrowed to stdit3_tiny and mmdit_tiny). Each must exit 0 and leave what the README says it leaves.
"""

from __future__ import annotations

import json
import re

import pytest

from bench import newcomer
from tests.conftest import REPO_ROOT, fixtures_root

README = (REPO_ROOT / "README.md").read_text()


def test_every_newcomer_command_is_in_the_readme_once():
    commands = newcomer.readme_commands(README)
    for _, start, _, narrow in newcomer.STEPS:
        found = [c for c in commands if c.startswith(start)]
        assert len(found) == 1, (start, found)
        for pattern in narrow:
            assert pattern in found[0]


SHIPPED = ("assets/", "configs/", "data/synthetic", "../shared/fixtures", "outputs/", "samples", "ckpt/stdit3_tiny",
           "README.md", "bench/", "/tmp/")
SAYS_WHAT_TO_BRING = ("bring", "weights", "download", "checkpoints of", "your ")


def _foreign_paths(command: str) -> list[str]:
    words = [w.strip("\"'") for w in re.split(r"[\s=]", command)]
    return [w for w in words if "/" in w and not w.startswith(("--", "http", "/path/to/")) and not w.endswith(".py")
            and not w.startswith(SHIPPED)]


def test_readme_commands_that_need_your_files_say_so():
    """A README block using paths the checkout does not ship (ckpt/, ckpts/, data.csv, ...) follows text that
    says what to bring; a block that runs on a fresh clone uses only shipped paths."""
    checked = 0
    for match in re.finditer(r"```bash\n(.*?)```", README, re.S):
        foreign = [p for c in newcomer.readme_commands(match.group(0)) for p in _foreign_paths(c)]
        if foreign:
            checked += 1
            before = README[max(0, match.start() - 800):match.start()].lower()
            assert any(word in before for word in SAYS_WHAT_TO_BRING), (foreign, before[-300:])
    assert checked >= 3


def test_the_readme_runs_as_written(tmp_path):
    if not fixtures_root().is_dir():
        pytest.fail(f"fixture directory {fixtures_root()} not found; set OPENSORA_FIXTURES")
    clone = newcomer.fresh_clone(tmp_path)
    env = newcomer.shell_env(tmp_path / "bin")
    ran = {}
    for name, command in newcomer.newcomer_commands(README, quick=True):
        result = newcomer.run_step(command, clone, env, timeout=900)
        ran[name] = result
        assert result["returncode"] == 0, f"{command}\n{result['stdout_tail']}\n{result['stderr_tail']}"
    print("\nREADME commands: " + ", ".join(f"{n} {r['seconds']} s" for n, r in ran.items()))

    # Sampling: the files the README names, a fresh index, and the demo's size (32×32 enlarged 4×).
    samples = clone / "samples"
    assert {p.name for p in samples.iterdir()} >= {"sample_0000.mp4", "sample_0000_grid.png", "sample_0000.json",
                                                    "config.json"}
    sidecar = json.loads((samples / "sample_0000.json").read_text())
    assert (sidecar["frames"], sidecar["height"], sidecar["width"]) == (17, 128, 128)
    # Training: a run directory with metrics of the step taken and the exported EMA model.
    run = clone / "outputs" / "demo"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert (run / "ema_model" / "config.json").is_file()
    # Conversion: a converted STDiT3 directory.
    converted = json.loads((clone / "ckpt" / "stdit3_tiny" / "config.json").read_text())
    assert converted["model"] == "stdit3"
    # Parity: both cases passed.
    assert ran["parity"]["stdout_tail"].strip().splitlines()[-1] == "2 passed, 0 failed"


def test_readme_timings_name_their_command_and_machine():
    """Every timing the newcomer sections quote comes from bench/newcomer.py's results and names the machine."""
    results = json.loads((REPO_ROOT / "bench" / "results" / "newcomer_cpu.json").read_text())
    assert not results["quick"] and {"sample", "train"} <= set(results["steps"])
    sample_s = results["steps"]["sample"]["seconds"]
    assert f"{sample_s:.0f} s" in README and "bench/newcomer.py" in README
    assert results["machine"]["cpu"] in README
