"""PseudoLabelStore: the machine's class distribution for each pseudolabel image, addressed by dataset index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.pseudo.loss import align_distribution, confident_mask


class PseudoLabelStore:
    """Predicted probabilities and the epoch they were last set (-1: never), per pseudolabel image.

    The label is the most probable class and the confidence its probability. Lives in the main
    process only. Dataloader workers never see it, so a label can't go stale in a worker's copy
    of the dataset; batches carry indices and labels are looked up here.

    With a `target_prior` (class frequencies), every probability read from the store is
    distribution-aligned to it, against the mean of the stored predictions as the labeler's own
    prior: a function of the stored predictions alone, so it is the same on every DDP rank and
    comes back with them on --resume.
    """

    def __init__(self, size: int, num_classes: int, target_prior: torch.Tensor | None = None):
        self.predicted = torch.zeros(size, num_classes, dtype=torch.float32)  # as the labeler gave them
        self.epoch = torch.full((size,), -1, dtype=torch.long)
        self.target_prior = target_prior

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def probabilities(self) -> torch.Tensor:
        """Each image's class distribution: the labeler's, distribution-aligned when there is a target prior."""
        labeled = self.epoch >= 0
        if self.target_prior is None or not labeled.any():
            return self.predicted
        aligned = align_distribution(self.predicted, self.target_prior, self.predicted[labeled].mean(dim=0))
        return torch.where(labeled[:, None], aligned, self.predicted)

    @property
    def confidence(self) -> torch.Tensor:
        return self.probabilities.max(dim=1).values

    @property
    def labels(self) -> torch.Tensor:
        """The most probable class, or -1 where nothing was predicted yet."""
        return torch.where(self.epoch >= 0, self.probabilities.argmax(dim=1), -1)

    def lookup(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, labels) of these images."""
        indices = indices.cpu()
        return self.probabilities[indices], self.labels[indices]

    def update(self, indices: torch.Tensor, probabilities: torch.Tensor, epoch: int) -> int:
        """Record new predictions; return how many of their labels differ from what was stored before."""
        indices = indices.cpu().long()
        before = self.labels[indices]
        self.predicted[indices] = probabilities.cpu().float()
        self.epoch[indices] = epoch
        return int((self.labels[indices] != before).sum())

    def class_counts(self, num_classes: int, thresholds: float | torch.Tensor = 0.0) -> list[int]:
        """Images per label, among those that pass `thresholds`."""
        passing = self.labels[self.confident(thresholds)]
        return torch.bincount(passing, minlength=num_classes).tolist()

    def confident(self, thresholds: float | torch.Tensor) -> torch.Tensor:
        """Which images hold a label that the loss would use at these thresholds (one, or one per class)."""
        return confident_mask(self.labels, self.confidence, thresholds)

    def accuracy(
        self, folder_targets: torch.Tensor, thresholds: float | torch.Tensor = 0.0, label: int | None = None
    ) -> float | None:
        """Agreement with folder labels over images that have both and pass `thresholds` (only those labeled
        `label`, when given); None when there are none."""
        known = (folder_targets >= 0) & self.confident(thresholds)
        if label is not None:
            known &= self.labels == label
        if not known.any():
            return None
        return float((self.labels[known] == folder_targets[known]).float().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"probabilities": self.predicted.clone(), "epoch": self.epoch.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "probabilities" not in state:
            raise UserInputError("this checkpoint's pseudo-labels come from an older version that kept no "
                                 "probabilities; start a new run (or --weights CHECKPOINT to keep its model)")
        if state["probabilities"].shape != self.predicted.shape:
            raise UserInputError(
                f"the checkpoint's pseudo-labels cover {len(state['probabilities'])} images of "
                f"{state['probabilities'].shape[1]} classes, but the pseudolabel split has {len(self)} images of "
                f"{self.predicted.shape[1]}: resume with the same data"
            )
        self.predicted, self.epoch = state["probabilities"].clone(), state["epoch"].clone()

    def to_frame(self, paths: Sequence[Path], classes: Sequence[str]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": [str(p) for p in paths],
                "label": [classes[i] if i >= 0 else "" for i in self.labels.tolist()],
                "confidence": self.confidence.tolist(),
                "epoch": self.epoch.tolist(),
            }
        )
