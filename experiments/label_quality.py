"""How good the teachers' labels of the pseudolabel split are: per teacher and for their ensemble, per threshold.

    python -m experiments.label_quality --data TREE RUN [RUN ...] [--temperature T] [--out label_quality.md]

Each RUN is a teacher-mode run folder whose round 0 trained the teachers (round-0*/). Their labels
are read from the run's teacher-label cache (under its --cache-dir, else <RUN>/teacher-labels/)
when a student made them, else predicted here. The truth is the pseudolabel split's class folders (`prepare split
--keep-pseudo-labels`); the student never sees them. For each threshold: the share of images whose
label is at least that confident, and the accuracy of those labels; over all images, the labels'
negative log-likelihood of the true class and their expected calibration error (a soft-target
student learns the probabilities, not only the argmax). --temperature T shows the labels as a
student distilling at temperature T sees them (softmax(log p / T)). Several RUNs (one per seed)
give mean ± std.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from detect_waste_cls.calibration import expected_calibration_error
from detect_waste_cls.data.images import resolve_images_square, scan_pseudolabel_folder
from detect_waste_cls.export import load_model
from detect_waste_cls.predict import path_probabilities_with_flip
from detect_waste_cls.pseudo.loss import tempered_log_targets
from detect_waste_cls.pseudo.teachers import TeacherLabelCache, labels_key
from detect_waste_cls.rounds import ENSEMBLE
from detect_waste_cls.run_folder import last_checkpoint, teacher_labels_dir

THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 0.95)


def teacher_probabilities(run: Path, paths: list[Path]) -> dict[str, torch.Tensor]:
    """{teacher model name: probabilities of every pseudolabel image}, plus the ensemble's mean when several."""
    cache_dir = json.loads((run / "config.json").read_text()).get("run", {}).get("cache_dir")
    cache = TeacherLabelCache(teacher_labels_dir(run, cache_dir))
    found = {}
    for folder in sorted(run.glob("round-0*")):
        if folder.name.endswith(ENSEMBLE) or not last_checkpoint(folder).is_file():
            continue
        teacher = load_model(last_checkpoint(folder))
        cached = cache.load(labels_key(teacher, paths), len(paths))
        found[teacher.model_name] = cached if cached is not None else path_probabilities_with_flip(
            teacher, paths)
    if len(found) > 1:
        found[ENSEMBLE] = torch.stack(list(found.values())).mean(0)
    return found


def quality(probabilities: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    confidence, labels = probabilities.max(dim=1)
    row = {}
    for threshold in THRESHOLDS:
        passing = confidence >= threshold
        row[f"share ≥ {threshold}"] = float(passing.float().mean())
        row[f"right ≥ {threshold}"] = float((labels[passing] == truth[passing]).float().mean()) if passing.any() else None
    row["NLL"] = float(-probabilities[torch.arange(len(truth)), truth].clamp(min=1e-12).log().mean())
    row["ECE"] = expected_calibration_error(probabilities, truth)
    return row


def label_quality(tree: Path, runs: list[Path], temperature: float = 1.0) -> pd.DataFrame:
    """One row per (teacher, run): quality() of its labels of the tree's pseudolabel split at `temperature`."""
    root = resolve_images_square(tree)
    rows = []
    for run in runs:
        classes = load_model(last_checkpoint(next(run.glob("round-0*")))).classes
        pseudo = scan_pseudolabel_folder(root / "pseudolabel", classes)
        truth = torch.tensor(pseudo.folder_targets)
        if (truth < 0).any():
            raise SystemExit(f"{root / 'pseudolabel'} has images outside class folders: no truth to score labels with")
        for teacher, probabilities in teacher_probabilities(run, pseudo.paths).items():
            tempered = tempered_log_targets(probabilities, temperature).exp()
            rows.append({"teacher": teacher, "run": run.name, **quality(tempered, truth)})
    return pd.DataFrame(rows)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Each teacher's mean ± std over runs (none for one run): shares, accuracies and ECE in %, NLL in nats."""
    cells = {}
    for column in rows.columns.drop(["teacher", "run"]):
        scale, digits = (1, 3) if column == "NLL" else (100, 1)
        grouped = (rows[column] * scale).groupby(rows.teacher, sort=False)
        cells[column] = ["–" if pd.isna(mean) else f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")
                         for mean, std in zip(grouped.mean(), grouped.std())]  # –: no label that confident
    return pd.DataFrame(cells, index=grouped.mean().index).reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the tree the runs trained on")
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="score the labels at this distillation temperature (--pseudo-temperature)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    summary = summarize(label_quality(args.data, args.runs, args.temperature))
    at = "" if args.temperature == 1 else f" at temperature {args.temperature:g}"
    text = (f"Label quality over {len(args.runs)} run(s){at}, in % (NLL in nats)\n\n"
            + summary.to_markdown(index=False, disable_numparse=True))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
