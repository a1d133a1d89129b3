"""PseudoLabelStore: the machine's label for each pseudolabel image, addressed by dataset index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.pseudo.loss import confident_mask


class PseudoLabelStore:
    """label (-1 until first set), confidence and the epoch it was last set, per pseudolabel image.

    Lives in the main process only. Dataloader workers never see it, so a label can't go
    stale in a worker's copy of the dataset; batches carry indices and labels are looked up here.
    """

    def __init__(self, size: int):
        self.labels = torch.full((size,), -1, dtype=torch.long)
        self.confidence = torch.zeros(size, dtype=torch.float32)
        self.epoch = torch.full((size,), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def lookup(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.cpu()
        return self.labels[indices], self.confidence[indices]

    def update(self, indices: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, epoch: int) -> int:
        """Record new labels; return how many of them differ from what was stored before."""
        indices, labels = indices.cpu().long(), labels.cpu().long()
        changed = int((self.labels[indices] != labels).sum())
        self.labels[indices] = labels
        self.confidence[indices] = confidence.cpu().float()
        self.epoch[indices] = epoch
        return changed

    def class_counts(self, num_classes: int) -> list[int]:
        labelled = self.labels[self.labels >= 0]
        return torch.bincount(labelled, minlength=num_classes).tolist()

    def confident(self, threshold: float) -> torch.Tensor:
        """Which images hold a label that the loss would use at this confidence threshold."""
        return confident_mask(self.labels, self.confidence, threshold)

    def accuracy(self, folder_targets: torch.Tensor, threshold: float = 0.0) -> float | None:
        """Agreement with folder labels over images that have both (and pass the threshold); None when there are none."""
        known = (folder_targets >= 0) & self.confident(threshold)
        if not known.any():
            return None
        return float((self.labels[known] == folder_targets[known]).float().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"labels": self.labels.clone(), "confidence": self.confidence.clone(), "epoch": self.epoch.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state["labels"]) != len(self):
            raise UserInputError(
                f"the checkpoint's pseudo-labels cover {len(state['labels'])} images, "
                f"but the pseudolabel split has {len(self)}: resume with the same data"
            )
        self.labels, self.confidence, self.epoch = (state[key].clone() for key in ("labels", "confidence", "epoch"))

    def to_frame(self, paths: Sequence[Path], classes: Sequence[str]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": [str(p) for p in paths],
                "label": [classes[i] if i >= 0 else "" for i in self.labels.tolist()],
                "confidence": self.confidence.tolist(),
                "epoch": self.epoch.tolist(),
            }
        )
