"""Every figure a run writes: training curves, the confusion matrix and the reliability diagram.

Figures are built with matplotlib's object API (`Figure`, not pyplot), which renders to files
without any backend: nothing here needs a display or changes the backend of a notebook that
imports the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure


def _save(figure: Figure, out_png: Path, dpi: int = 100) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=dpi, bbox_inches="tight")
    return out_png


def plot_training_curves(metrics_csv: Path, out_png: Path) -> Path:
    """Plot loss and accuracy (train and val) per epoch from `metrics.csv` into `out_png`."""
    log = pd.read_csv(metrics_csv)
    # Rows are sparse (each logging call fills a few columns): keep each column's last value per epoch.
    per_epoch = log.dropna(subset=["epoch"]).groupby("epoch").last()

    figure = Figure(figsize=(10, 4))
    for ax, quantity in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        for split in ("train", "val"):
            # Metrics logged both on step and on epoch get an `_epoch` column; prefer it.
            column = next((c for c in (f"{split}/{quantity}_epoch", f"{split}/{quantity}") if c in per_epoch), None)
            values = per_epoch[column].dropna() if column else None
            if values is not None and not values.empty:
                ax.plot(values.index, values.to_numpy(), marker="o", label=split)
        ax.set(title=quantity, xlabel="epoch")
        if ax.has_data():
            ax.legend()
    return _save(figure, out_png)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], out_png: Path) -> Path:
    """Counts per (true, predicted) class pair, annotated."""
    from torchmetrics.utilities.plot import plot_confusion_matrix  # here: select's contact sheets need no torchmetrics

    figure = Figure(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2))
    plot_confusion_matrix(confusion, ax=figure.subplots(), labels=list(classes))
    return _save(figure, out_png, dpi=120)


def plot_reliability(confidences: dict[str, torch.Tensor], correct: torch.Tensor, out_png: Path, bins: int) -> Path:
    """Reliability diagram: accuracy against mean confidence per equal-width confidence bin, one line per
    set of confidences (e.g. before and after temperature scaling); the diagonal is perfect calibration."""
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    edges = torch.linspace(0, 1, bins + 1)
    for name, confidence in confidences.items():
        which = torch.bucketize(confidence, edges[1:-1])
        used = [b for b in range(bins) if (which == b).any()]
        mean_confidence = [float(confidence[which == b].mean()) for b in used]
        accuracy = [float(correct[which == b].float().mean()) for b in used]
        ax.plot(mean_confidence, accuracy, marker="o", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(loc="upper left")
    return _save(figure, out_png)


def plot_contact_sheet(images: Sequence, captions: Sequence[str], out_png: Path, *, title: str = "",
                       columns: int = 10) -> Path:
    """A grid of thumbnails (HxWx3 uint8 arrays), each with its caption above it."""
    rows = max(1, -(-len(images) // columns))
    columns = max(1, min(columns, len(images)))
    figure = Figure(figsize=(1.6 * columns, 1.8 * rows + (0.4 if title else 0)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, out_png, dpi=80)
