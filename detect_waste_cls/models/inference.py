"""A trained classifier without Lightning: the network with its classes, input view and calibration temperature.

`TrainedClassifier` is what the commands that run a trained model (predict, predict --boxes, select, test mode,
export, the app) and the teachers load; LitterClassifier (classifier.py, the Lightning module that trains) predicts
through the same `ClassifierPredictions`. Neither this module nor what it imports loads Lightning or torchmetrics,
which cost seconds at every start of a command.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from detect_waste_cls.config import MIN_CALIBRATION_IMAGES
from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import (Backbone, Normalization, create_backbone, get_backbone, in_our_names,
                                               load_torch_file)

log = logging.getLogger(__name__)

# Where calibration.py stores its record in a checkpoint: {"temperature": T, "images": N, "fitted": bool, ...}, plain
# values: N validation images, and whether T was fitted on them (too few keep T = 1).
CALIBRATION_KEY = "calibration"
# What a checkpoint's hyper_parameters hold (LitterClassifier saves them): the class list, input size and configs.
CHECKPOINT_HPARAMS = frozenset({"classes", "image_size", "model", "optim", "pseudo"})
NETWORK_PREFIX = "model."  # the network's tensors in a checkpoint's state dict: the classifier's `model` attribute


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the calibrated probabilities (calibration.py fits T; T = 1 is the plain softmax)."""
    return (logits.float() / temperature).softmax(dim=1)


def describe_calibration(record: dict) -> str:
    """A calibration record in words (the run's log and report, the model card and the app say the same): the
    temperature and the validation images it was fitted on, or why it is 1."""
    temperature = record.get("temperature", 1.0)
    if record.get("fitted", temperature != 1.0):  # older records have no flag: a temperature other than 1 was fitted
        images = f"{record['images']} validation images" if "images" in record else "a validation split"
        return f"calibrated by temperature scaling: T = {temperature:.3f}, fitted on {images}"
    if "images" in record:
        return (f"not calibrated (T = 1): {record['images']} validation images are too few to fit a temperature on "
                f"(at least {MIN_CALIBRATION_IMAGES})")
    return "not calibrated (T = 1): no temperature was fitted"


class ClassifierPredictions:
    """Calibrated prediction, for a module with `model` (the network), `classes`, `image_size`, `backbone_entry`
    and `calibration` (calibration.py's record, {} before one): TrainedClassifier and LitterClassifier."""

    model: nn.Module
    classes: list[str]
    image_size: int
    backbone_entry: Backbone
    calibration: dict

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.backbone_entry.head)

    @property
    def normalization(self) -> Normalization:
        return self.backbone_entry.normalization

    @property
    def temperature(self) -> float:
        """The calibration temperature; 1 when none was fitted."""
        return self.calibration.get("temperature", 1.0)

    def eval_view(self) -> EvalPreset:
        """The transform this model predicts through: its own input size and normalization."""
        return EvalPreset(size=self.image_size, normalization=self.normalization,
                          interpolation=self.backbone_entry.interpolation)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities after temperature scaling (temperature 1 until calibration sets it)."""
        return temperature_scaled(logits, self.temperature)

    @torch.inference_mode()
    def predict_logits(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits and dataset indices for every item of `loader`, in eval mode."""
        was_training = {name: module.training for name, module in self.named_modules()}
        self.eval()
        device = next(self.model.parameters()).device
        logits, indices = [], []
        try:
            for batch in loader:
                logits.append(self(batch[keys.IMAGE].to(device, non_blocking=True)).float().cpu())
                indices.append(torch.as_tensor(batch[keys.INDEX]).cpu())
        finally:
            for name, module in self.named_modules():  # per module: a frozen backbone stays in eval mode
                module.train(was_training[name])
        if not logits:
            return torch.empty(0, len(self.classes)), torch.empty(0, dtype=torch.long)
        return torch.cat(logits), torch.cat(indices)

    @torch.inference_mode()
    def predict_images(self, images: Sequence[np.ndarray], *, flip_tta: bool = False) -> torch.Tensor:
        """Calibrated probabilities for RGB uint8 arrays (as `load_rgb` gives); flip_tta averages in the mirror image."""
        view = self.eval_view()
        batch = torch.stack([view(image) for image in images]).to(next(self.model.parameters()).device)
        was_training = self.training
        self.eval()
        try:
            probabilities = self.calibrated(self(batch))
            if flip_tta:
                probabilities = (probabilities + self.calibrated(self(batch.flip(dims=[3])))) / 2
        finally:
            self.train(was_training)
        return probabilities.cpu()


class TrainedClassifier(ClassifierPredictions, nn.Module):
    """Network `model_name` from the registry, with a head for `classes`, seeing `image_size` px through its
    eval view, and its calibration record: a model to predict with, as `load_checkpoint` and
    export.load_pretrained give it. Its state dict names the network's tensors as a checkpoint's does."""

    def __init__(self, model_name: str, classes: Sequence[str], image_size: int, calibration: dict | None = None):
        super().__init__()
        self.model_name, self.classes, self.image_size = model_name, list(classes), image_size
        self.backbone_entry = get_backbone(model_name)
        self.model = create_backbone(model_name, len(self.classes))
        self.calibration = dict(calibration or {})


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """One of our Lightning checkpoints as the dict it holds, read without unpickling code (or Lightning)."""
    checkpoint = load_torch_file(path, "Lightning checkpoint or exported model folder", map_location)
    if not CHECKPOINT_HPARAMS <= set(checkpoint.get("hyper_parameters", {})):
        raise UserInputError(f"{path} is not a detect-waste-cls checkpoint (no class list or model config in it)")
    return checkpoint


def network_weights(checkpoint: dict, network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors of a checkpoint, in `network`'s names: one saved before a model moved libraries
    (the lite models to timm) gets them renamed."""
    hparams = checkpoint["hyper_parameters"]
    name, image_size = hparams["model"]["name"], hparams["image_size"]
    weights = {key.removeprefix(NETWORK_PREFIX): value for key, value in checkpoint["state_dict"].items()
               if key.startswith(NETWORK_PREFIX)}
    renamed = in_our_names(name, weights, network)
    if renamed is not weights and image_size != get_backbone(name).image_size:
        log.warning("this %s checkpoint comes from efficientnet-lite-pytorch at %d px: timm pads its convolutions for "
                    "the actual input size, that library for %d px, so its predictions can differ slightly; test it "
                    "again (detect-waste-cls test)", name, image_size, get_backbone(name).image_size)
    return renamed


def load_checkpoint(path: str | Path) -> TrainedClassifier:
    """The trained classifier of one of our Lightning checkpoints, on the CPU in eval mode, its calibration included."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    model = TrainedClassifier(hparams["model"]["name"], hparams["classes"], hparams["image_size"],
                              calibration=checkpoint.get(CALIBRATION_KEY))
    model.model.load_state_dict(network_weights(checkpoint, model.model))
    return model.eval()
