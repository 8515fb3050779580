"""`python -m opensora_jax.tools.status_table PARITY_JSON [--readme README.md]`: the README status table's
parity figures, rendered from the JSON that `python -m opensora_jax.parity CASES... --json PARITY_JSON` writes.

Without --readme the Markdown table goes to stdout; with it, the table replaces whatever lies between the
`<!-- parity-table:start -->` and `<!-- parity-table:end -->` markers of that file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from opensora_jax.config_utils import run_cli
from opensora_jax.errors import UserError
from opensora_jax.tools.parity.core import write_text_atomic

START_MARKER = "<!-- parity-table:start -->"
END_MARKER = "<!-- parity-table:end -->"
TABLE_HEADER = ("| case | component | worst error | tolerance | result |", "|---|---|---:|---:|---|")


def load_results(path: str | pathlib.Path) -> list[dict]:
    """The per-case records of a parity `--json` file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parity results {path} not found (write them with python -m opensora_jax.parity "
                                "CASES... --json FILE)")
    try:
        cases = json.loads(path.read_text())["cases"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a parity --json file: {type(e).__name__}: {e}") from None
    return cases


def _error(value) -> str:
    """A relative error in short scientific notation (3.3e-6); the JSON's "inf"/"nan" strings stay words."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def table_row(record: dict) -> str:
    """One Markdown row: case, component, worst error, tolerance, PASS/FAIL."""
    cells = (f"`{record['case']}`", record["component"], _error(record["worst"]), _error(record["tol"]),
             "PASS" if record["passed"] else "FAIL")
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def render_table(records: list[dict]) -> str:
    """The Markdown table, one row per case in the file's order."""
    return "\n".join([*TABLE_HEADER, *(table_row(r) for r in records)])


def replace_between_markers(text: str, table: str, where: str = "README") -> str:
    """`text` with everything between the start and end markers replaced by `table` (on its own lines)."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise UserError(f"{where} has no '{START_MARKER}' ... '{END_MARKER}' markers (in that order) to put the "
                        "parity table between")
    return f"{text[:start + len(START_MARKER)]}\n{table}\n{text[end:]}"


def update_readme(readme: str | pathlib.Path, table: str) -> None:
    """Replaces the table between the markers of `readme` (written under a temporary name, then renamed)."""
    readme = pathlib.Path(readme)
    if not readme.is_file():
        raise FileNotFoundError(f"{readme} not found")
    write_text_atomic(readme, replace_between_markers(readme.read_text(), table, str(readme)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.tools.status_table",
        description="Render the README status table's parity figures from a parity --json file.")
    parser.add_argument("parity_json", help="file written by python -m opensora_jax.parity CASES... --json FILE")
    parser.add_argument("--readme", help=f"replace the table between {START_MARKER} and {END_MARKER} in this "
                        "file instead of printing it")
    args = parser.parse_args(argv)
    table = render_table(load_results(args.parity_json))
    if args.readme:
        update_readme(args.readme, table)
        print(f"updated the parity table in {args.readme}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
