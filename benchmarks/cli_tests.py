"""What the tests that start the CLI in a fresh Python without training cost, in two checkouts side by side.

    python benchmarks/cli_tests.py --roots BEFORE AFTER [--repeats 3] [NODE_ID ...]

Each repeat runs `pytest NODE_ID ...` once in each root (PYTHONPATH=ROOT, in ROOT), the roots taking turns so that
they see the same load; the time of each test is pytest's own (setup, call and teardown, from --junitxml), the
median over the repeats. A test fails or passes as it does: a test that checks what the change fixed fails in the
root without it, and is timed all the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# The tests that start `python -m detect_waste_cls.cli ...` (or `python -c` over it) and train nothing.
NODE_IDS = (
    "tests/test_startup.py::test_help_of_every_command_imports_neither_torch_nor_lightning",
    "tests/test_startup.py::test_importing_the_package_loads_no_torch_and_its_names_load_on_first_use",
    "tests/test_startup.py::test_predict_select_and_export_import_neither_lightning_nor_torchmetrics",
    "tests/test_end_to_end.py::test_more_gpus_than_exist_is_one_clear_line",
)


def test_seconds(root: Path, node_ids: list[str]) -> dict[str, float]:
    """pytest's time of each test, run once in `root`."""
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *node_ids], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cases = ElementTree.parse(report).getroot().iter("testcase")
        return {f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}": float(case.get("time"))
                for case in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", type=Path, nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("node_ids", nargs="*", default=list(NODE_IDS))
    args = parser.parse_args()
    runs: dict[Path, list[dict[str, float]]] = {root: [] for root in args.roots}
    for _ in range(args.repeats):
        for root in args.roots:
            runs[root].append(test_seconds(root, args.node_ids))
    before, after = ({node: statistics.median(run[node] for run in runs[root]) for node in args.node_ids}
                     for root in args.roots)
    print(f"median of {args.repeats} runs, seconds: `{args.roots[0]}` | `{args.roots[1]}` | ratio\n")
    for node in args.node_ids:
        print(f"| {node.split('::')[1]} | {before[node]:.2f} | {after[node]:.2f} | {before[node] / after[node]:.2f}x |")
    total_before, total_after = sum(before.values()), sum(after.values())
    print(f"| all | {total_before:.2f} | {total_after:.2f} | {total_before / total_after:.2f}x |")


if __name__ == "__main__":
    main()
