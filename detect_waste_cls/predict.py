"""Predictions for a list of images, and top-k predictions for a folder written as a CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.datasets import ImageDataset
from detect_waste_cls.data.images import keep_decodable, scan_images
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.export import load_model
from detect_waste_cls.models.inference import TrainedClassifier
from detect_waste_cls.models.flip import flip_averaged


def flip_averaged_probabilities(model: TrainedClassifier, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(dataset indices, mean of softmax(model(image)) and softmax(model(mirror image))) for every item of `loader`."""
    outputs = flip_averaged(model, loader, num_classes=len(model.classes))
    return outputs.indices, outputs.probabilities


def path_logits(model: TrainedClassifier, paths: Sequence[Path], *, batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Raw logits for each image, in the order of `paths`, at the model's own size and normalization."""
    dataset = ImageDataset(paths, {keys.IMAGE: model.eval_view()})
    logits, indices = model.predict_logits(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers))
    return logits[indices.argsort()]


def path_probabilities_with_flip(model: TrainedClassifier, paths: Sequence[Path], *, batch_size: int = 64,
                                 num_workers: int = 0) -> torch.Tensor:
    """The model's own softmax (no calibration), averaged over each image and its mirror image, in the order of `paths`."""
    dataset = ImageDataset(paths, {keys.IMAGE: model.eval_view()})
    indices, probabilities = flip_averaged_probabilities(model, DataLoader(dataset, batch_size=batch_size,
                                                                           num_workers=num_workers))
    return probabilities[indices.argsort()]


def predict_paths(model: TrainedClassifier, paths: Sequence[Path], *, batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Calibrated class probabilities for each image, in the order of `paths`."""
    return model.calibrated(path_logits(model, paths, batch_size=batch_size, num_workers=num_workers))


def predict_folder(checkpoint: str | Path, images: str | Path, out_csv: str | Path, *, batch_size: int = 64, top_k: int = 5) -> Path:
    """One row per image: path, top-1 label and calibrated confidence, then the top-k labels and confidences.

    `checkpoint`: a .ckpt file or an exported folder.
    """
    images, out_csv = Path(images), Path(out_csv)
    if out_csv.exists():
        raise UserInputError(f"{out_csv} already exists; choose another --out")
    if not images.is_dir():
        raise UserInputError(f"folder not found: {images}")
    model = load_model(checkpoint)
    report = scan_images(images, recursive=True)
    report.warn_skipped(images)
    paths = keep_decodable(report.paths, images).paths
    if not paths:
        raise UserInputError(f"no readable images under {images}")
    probabilities = predict_paths(model, paths, batch_size=batch_size)
    confidences, labels = probabilities.topk(min(top_k, len(model.classes)), dim=1)
    rows = []
    for path, label_row, confidence_row in zip(paths, labels.tolist(), confidences.tolist()):
        row = {"path": str(path), "label": model.classes[label_row[0]], "confidence": confidence_row[0]}
        for rank, (label, confidence) in enumerate(zip(label_row, confidence_row), start=1):
            row[f"top{rank}_label"], row[f"top{rank}_confidence"] = model.classes[label], confidence
        rows.append(row)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as file:  # the csv module, not pandas: predict starts 0.5 s sooner
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out_csv
