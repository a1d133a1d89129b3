"""Test mode: predictions, metrics, classification report, confusion matrix for a folder of class subfolders."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from detect_waste_cls.calibration import ECE_BINS, calibration_summary
from detect_waste_cls.data.images import keep_decodable, resolve_test_folder, scan_labeled_folder
from detect_waste_cls.export import load_model
from detect_waste_cls.models.inference import describe_calibration, temperature_scaled
from detect_waste_cls.plots import plot_confusion, plot_reliability
from detect_waste_cls.predict import path_logits, path_probabilities_with_flip

EVALUATION_FILES = ("metrics.json", "classification_report.txt", "confusion_matrix.png", "reliability_diagram.png",
                    "predictions.csv")


def compute_metrics(targets: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy, and balanced accuracy / macro F1 averaged over the classes present in `targets`.

    A folder holding only some of the model's classes is scored on those classes alone;
    predictions into the others still count as errors.
    """
    num_classes = len(classes)
    per_class = {
        "precision": multiclass_precision(predictions, targets, num_classes, average=None),
        "recall": multiclass_recall(predictions, targets, num_classes, average=None),
        "f1": multiclass_f1_score(predictions, targets, num_classes, average=None),
    }
    support = torch.bincount(targets, minlength=num_classes)
    present = support > 0
    return {
        "accuracy": float((predictions == targets).float().mean()),
        "balanced_accuracy": float(per_class["recall"][present].mean()),
        "macro_f1": float(per_class["f1"][present].mean()),
        "per_class": {
            classes[i]: {**{name: float(values[i]) for name, values in per_class.items()}, "support": int(support[i])}
            for i in present.nonzero().flatten().tolist()
        },
        "classes": list(classes),
        "num_images": len(targets),
    }


def format_report(metrics: dict) -> str:
    table = pd.DataFrame(metrics["per_class"]).T[["precision", "recall", "f1", "support"]]
    table["support"] = table["support"].astype(int)
    summary = (
        f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
        f"macro F1 {metrics['macro_f1']:.4f}   ({metrics['num_images']} images)\n"
        f"ECE {metrics['ece']:.4f} at temperature {metrics['temperature']:.3f} ({metrics['ece_uncalibrated']:.4f} at 1)"
        f"\nconfidences {metrics['calibration']}"
    )
    return table.to_string(float_format=lambda v: f"{v:.4f}") + "\n\n" + summary + "\n"


def write_evaluation(
    out_dir: Path, paths: Sequence[Path], targets: torch.Tensor, logits: torch.Tensor, classes: Sequence[str],
    *, calibration: dict | None = None, skipped: Sequence[Path] = (),
) -> dict:
    """Write metrics.json, classification_report.txt, confusion_matrix.png, reliability_diagram.png and
    predictions.csv into out_dir. Confidences are calibrated with the temperature of the model's `calibration`
    record (none: 1); metrics.json has the ECE with it and without it, and says where the temperature came from.

    `skipped`: images of the folder that could not be read and are not in the metrics.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = calibration or {}
    temperature = calibration.get("temperature", 1.0)
    probabilities = temperature_scaled(logits, temperature)
    confidence, predictions = probabilities.max(dim=1)
    metrics = {
        **compute_metrics(targets, predictions, classes),
        **calibration_summary(logits, targets, temperature),
        "calibration": describe_calibration(calibration),
        "skipped_images": [str(path) for path in skipped],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "classification_report.txt").write_text(format_report(metrics))
    # The functional form never syncs: rank 0 alone holds every prediction, other DDP ranks have left.
    plot_confusion(multiclass_confusion_matrix(predictions, targets, len(classes)), classes, out_dir / "confusion_matrix.png")
    plot_reliability(
        {"uncalibrated": temperature_scaled(logits, 1.0).max(dim=1).values, f"temperature {temperature:.2f}": confidence},
        predictions == targets, out_dir / "reliability_diagram.png", bins=ECE_BINS,
    )
    pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "true": [classes[i] for i in targets.tolist()],
            "predicted": [classes[i] for i in predictions.tolist()],
            "confidence": confidence.tolist(),
        }
    ).to_csv(out_dir / "predictions.csv", index=False)
    return metrics


def _test_images(folder: str | Path, classes: Sequence[str]) -> tuple[list[Path], torch.Tensor, list[Path]]:
    """(decodable paths, their targets, skipped paths) of a folder of class subfolders (only classes the model knows)."""
    images = scan_labeled_folder(resolve_test_folder(folder), list(classes))
    decodable = keep_decodable(images.paths, Path(folder))
    kept = set(decodable.paths)
    targets = torch.tensor([target for path, target in zip(images.paths, images.targets) if path in kept])
    return decodable.paths, targets, images.skipped + decodable.skipped


def evaluate_folder(
    model_path: str | Path, folder: str | Path, out_dir: str | Path, *, batch_size: int = 64, num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Score a checkpoint or exported folder on a folder of class subfolders (only classes the model knows)."""
    model = load_model(model_path).to(device)
    paths, targets, skipped = _test_images(folder, model.classes)
    logits = path_logits(model, paths, batch_size=batch_size, num_workers=num_workers)
    return write_evaluation(Path(out_dir), paths, targets, logits, model.classes, calibration=model.calibration,
                            skipped=skipped)


def evaluate_ensemble(
    model_paths: Sequence[str | Path], folder: str | Path, out_dir: str | Path, *, batch_size: int = 64,
    num_workers: int = 0, device: str | torch.device = "cpu",
) -> dict:
    """Score the mean of several models' probabilities, each model over the image and its flip at its own size:
    the labels an ensemble of teachers gives (pseudo/teachers.py), measured on a labeled folder."""
    first = load_model(model_paths[0])
    classes = first.classes
    others = [load_model(path, classes, classes_of=str(model_paths[0])) for path in model_paths[1:]]
    models = [model.to(device) for model in (first, *others)]
    paths, targets, skipped = _test_images(folder, classes)
    probabilities = torch.stack([path_probabilities_with_flip(model, paths, batch_size=batch_size,
                                                              num_workers=num_workers) for model in models]).mean(0)
    return write_evaluation(Path(out_dir), paths, targets, probabilities.clamp(min=1e-12).log(), classes,
                            skipped=skipped)
