"""The arithmetic of the pseudo-label term: confidence mask and linear warm-up weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_rampup(progress: float, start: float, length: float) -> float:
    """0 before `start` epochs, then rising linearly to 1 over `length` epochs (at once when length is 0)."""
    if progress < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (progress - start) / length)


def confident_mask(labels: torch.Tensor, confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """The pseudo-labels that enter the loss: set (label >= 0) and at least `threshold` confident."""
    return (labels >= 0) & (confidence >= threshold)


def masked_pseudo_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(mask * CE(logits, labels)) with mask = labelled (label >= 0) and confidence >= threshold.

    The mean runs over the whole batch, masked samples included, so a fully masked batch
    gives an exact zero that still depends on every parameter: under DDP every rank runs
    the same graph whatever its mask.
    """
    mask = confident_mask(labels, confidence, threshold)
    per_image = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per_image * mask).mean(), mask
