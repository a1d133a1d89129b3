"""Temperature scaling (Guo et al., 2017): one scalar fitted on the validation split by minimising NLL with
LBFGS, stored in the checkpoint; and the expected calibration error (ECE) that judges it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_calibration_error

from detect_waste_cls.checkpoint_io import AtomicCheckpointIO
from detect_waste_cls.config import MIN_CALIBRATION_IMAGES
from detect_waste_cls.models.backbones import load_torch_file
from detect_waste_cls.models.inference import CALIBRATION_KEY, describe_calibration, load_checkpoint, temperature_scaled

log = logging.getLogger(__name__)

ECE_BINS = 15
MAX_LBFGS_STEPS = 100
# A validation split the model gets all right pushes the fit towards T -> 0 (ever more confident); the NLL is
# convex in 1/T, so clamping the unconstrained optimum gives the best temperature inside this range.
TEMPERATURE_RANGE = (0.25, 10.0)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T), within TEMPERATURE_RANGE; argmax, so
    accuracy, is unchanged."""
    log_temperature = torch.zeros(1, requires_grad=True)  # T = exp(.) stays positive
    optimizer = torch.optim.LBFGS([log_temperature], max_iter=MAX_LBFGS_STEPS, line_search_fn="strong_wolfe")
    # Tensors made under inference_mode cannot enter autograd as they are.
    logits, targets = logits.detach().float().clone(), targets.clone()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = log_temperature.detach().exp().item()
    low, high = TEMPERATURE_RANGE
    if not low <= fitted <= high:
        log.warning("temperature %.3g is outside %s, kept at the nearest end: the %d validation images cannot pin "
                    "it down", fitted, TEMPERATURE_RANGE, len(targets))
    return min(max(fitted, low), high)


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """ECE over ECE_BINS equal-width confidence bins (torchmetrics, L1 norm)."""
    return float(multiclass_calibration_error(probabilities, targets, num_classes=probabilities.shape[1],
                                              n_bins=ECE_BINS, norm="l1"))


def calibration_summary(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """NLL and ECE at temperature 1 and at `temperature`."""
    logits = logits.float()
    return {
        "temperature": temperature,
        "nll_uncalibrated": float(F.cross_entropy(logits, targets)),
        "nll": float(F.cross_entropy(logits / temperature, targets)),
        "ece_uncalibrated": expected_calibration_error(temperature_scaled(logits, 1.0), targets),
        "ece": expected_calibration_error(temperature_scaled(logits, temperature), targets),
    }


def calibrate_checkpoint(checkpoint: str | Path, loader: DataLoader, targets: torch.Tensor,
                         device: str | torch.device = "cpu") -> dict[str, float]:
    """Fit the temperature on `loader` (eval view of labeled images whose classes are `targets`, by dataset index)
    and write it into the checkpoint file, atomically; returns the fit's summary on those images.

    Fewer than MIN_CALIBRATION_IMAGES images keep temperature 1: a temperature fitted on a handful can make the
    confidences worse. The record says how many images there were and whether the temperature was fitted.
    """
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint).to(device)
    logits, indices = model.predict_logits(loader)
    targets = torch.as_tensor(targets)[indices]
    fitted = len(targets) >= MIN_CALIBRATION_IMAGES
    temperature = fit_temperature(logits, targets) if fitted else 1.0
    summary = {**calibration_summary(logits, targets, temperature), "images": len(targets), "fitted": fitted}
    contents = load_torch_file(checkpoint, "checkpoint")
    contents[CALIBRATION_KEY] = summary
    AtomicCheckpointIO().save_checkpoint(contents, checkpoint)  # a crash leaves the old file whole
    if fitted:
        log.info("calibration: %s (validation ECE %.4f -> %.4f)", describe_calibration(summary),
                 summary["ece_uncalibrated"], summary["ece"])
    else:
        log.warning("calibration: %s; a larger --val-split or an images_square/val folder gives one",
                    describe_calibration(summary))
    return summary
