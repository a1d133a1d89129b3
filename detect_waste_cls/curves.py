"""Training curves from Lightning's CSV log."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_training_curves(metrics_csv: Path, out_png: Path) -> Path:
    """Plot loss and accuracy (train and val) per epoch from `metrics.csv` into `out_png`."""
    log = pd.read_csv(metrics_csv)
    # Rows are sparse (each logging call fills a few columns): keep each column's last value per epoch.
    per_epoch = log.dropna(subset=["epoch"]).groupby("epoch").last()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, quantity in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            # Metrics logged both on step and on epoch get an `_epoch` column; prefer it.
            column = next((c for c in (f"{split}/{quantity}_epoch", f"{split}/{quantity}") if c in per_epoch), None)
            values = per_epoch[column].dropna() if column else None
            if values is not None and not values.empty:
                ax.plot(values.index, values.to_numpy(), marker="o", label=split)
        ax.set(title=quantity, xlabel="epoch")
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
