"""The arithmetic of the pseudo-label term: which labels pass (fixed or FlexMatch thresholds), soft targets, the loss."""

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


def confident_mask(labels: torch.Tensor, confidence: torch.Tensor, thresholds: float | torch.Tensor) -> torch.Tensor:
    """The pseudo-labels that enter the loss: set (label >= 0) and at least as confident as their class's threshold.

    `thresholds` is one number for every class, or one per class.
    """
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(confidence.device)[labels.clamp(min=0)]
    return (labels >= 0) & (confidence >= thresholds)


def flex_thresholds(labels: torch.Tensor, confidence: torch.Tensor, threshold: float, num_classes: int) -> torch.Tensor:
    """FlexMatch's class-wise thresholds (Zhang et al. 2021, with its threshold warm-up), from the current labels.

    A class's learning effect is how many pseudolabel images it holds at or above `threshold`,
    over the largest of those counts and of the images no class holds yet (unlabeled, or below
    `threshold`). Its threshold is `threshold` x M(effect) with the convex M(x) = x / (2 - x):
    classes the model has not learned yet get a low bar, well-learned ones the full one.
    """
    passing = confident_mask(labels, confidence, threshold)
    learned = torch.bincount(labels[passing], minlength=num_classes).float()
    not_yet = float(len(labels) - int(passing.sum()))
    effect = learned / max(float(learned.max()), not_yet, 1.0)
    return threshold * effect / (2 - effect)


def align_distribution(probabilities: torch.Tensor, target_prior: torch.Tensor, model_prior: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment (Berthelot et al. 2020): p x target_prior / model_prior, renormalized.

    A class the labeler predicts more often than `target_prior` says it should loses confidence on every image,
    so fewer of its labels pass the threshold; an under-predicted class gains.
    """
    aligned = probabilities * (target_prior / model_prior.clamp(min=1e-6))
    return aligned / aligned.sum(dim=1, keepdim=True)


def image_weights(labels: torch.Tensor, confidence: torch.Tensor, thresholds: float | torch.Tensor,
                  weighting: str = "threshold") -> torch.Tensor:
    """How much each pseudo-label counts in the loss: 0 below its threshold, else 1 ("threshold") or its confidence."""
    passing = confident_mask(labels, confidence, thresholds).float()
    return passing * confidence if weighting == "confidence" else passing


def tempered_log_targets(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(log p / T): the teacher's side of distillation at temperature T (T = 1: log p itself)."""
    return F.log_softmax(probabilities.clamp(min=1e-12).log() / temperature, dim=1)


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """mean(weights x per-image loss): cross-entropy to a class index (hard), or distillation to a distribution (soft).

    Distillation (Hinton et al. 2015): T^2 KL(softmax(log p / T) || softmax(z / T)), zero when the student's
    logits z equal the teacher's log p up to a constant; at T = 1 it has the gradient of cross-entropy to p.
    The mean runs over the whole batch, zero-weight images included, so a batch where nothing passes
    gives an exact zero that still depends on every parameter: under DDP every rank runs the same graph.
    """
    if targets.is_floating_point():
        teacher = tempered_log_targets(targets.to(logits.dtype), temperature)
        student = F.log_softmax(logits / temperature, dim=1)
        per_image = temperature**2 * (teacher.exp() * (teacher - student)).sum(dim=1)
    else:
        per_image = F.cross_entropy(logits, targets, reduction="none")
    return (per_image * weights.to(per_image.dtype)).mean()
