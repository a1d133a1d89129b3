"""The two stages of the study's fine-tuned rows, with the ground-truth boxes as the detector: for every finished run
of the given results folders, `predict --boxes` on its seed's test-half boxes, then `evaluate-boxes`; then one table.

    python -m experiments.wild_two_stage --trees /work/cache/wild/trees --images ../shared/data/aquatrash/images \
        --results experiments/results/wild_study-cpu160 experiments/results/wild_study-cpu160-100-cluster-margin \
        --out experiments/results/wild_study-cpu160/two_stage.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from experiments.wild_features import GEOMETRY
from experiments.wild_trees import TEST_BOXES

FOLDER = "two-stage"  # in each run folder: boxes.json (+ .csv) and eval/


def two_stage(run: Path, tree: Path, images: Path) -> dict:
    folder = run / FOLDER
    metrics = folder / "eval" / "metrics.json"
    if not metrics.exists():
        cli = [sys.executable, "-m", "detect_waste_cls.cli"]
        boxes = tree / TEST_BOXES
        subprocess.run([*cli, "predict", "--boxes", str(boxes), "--images", str(images), "--checkpoint", str(run),
                        "--out", str(folder / "boxes.json"), "--square" if GEOMETRY.square else "--no-square",
                        "--zoom", str(GEOMETRY.zoom)], check=True)
        subprocess.run([*cli, "evaluate-boxes", "--ground-truth", str(boxes), "--images", str(images),
                        "--detections", str(folder / "boxes.json"), "--out", str(folder / "eval")], check=True)
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--results", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = []
    for results in args.results:
        for marker in sorted((results / "runs").glob("*/runner.json")):
            runner = json.loads(marker.read_text())
            tree = Path(runner["command"][runner["command"].index("--data") + 1])
            base = tree.parent / f"seed{runner['seed']}"  # the seed's tree: its test boxes (a picks tree has none)
            run = marker.parent
            metrics = json.loads((run / "metrics.json").read_text())
            boxes = two_stage(run, base, args.images)
            records.append({"table": results.name, "row": runner["row"], "seed": runner["seed"],
                            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                            "box_accuracy": boxes["box_accuracy"], "map_50": boxes["map_50"]})
    table = pd.DataFrame(records)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    columns = ["accuracy", "macro_f1", "box_accuracy", "map_50"]
    lines = ["| table | row | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for (results, row), runs in table.groupby(["table", "row"]):
        cells = [f"{runs[c].mean() * 100:.1f} ± {runs[c].std() * 100:.1f}" for c in columns]
        lines.append(f"| {results} | {row} | {len(runs)} | " + " | ".join(cells) + " |")
    args.out.write_text("# Two stages, ground-truth boxes as the detector (mean ± std over seeds, %)\n\n"
                        + "\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
