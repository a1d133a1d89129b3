"""LitterClassifier: backbone + head + metrics, supervised loss plus the optional pseudo-label term."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import create_backbone, load_torch_file
from detect_waste_cls.pseudo.loss import linear_rampup, masked_pseudo_label_loss

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("exponential", "cosine", "none")


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


class LitterClassifier(pl.LightningModule):
    """Defaults follow the original project: Adam, lr 1e-4, learning rate x0.99 every epoch."""

    def __init__(
        self,
        *,
        model_name: str,
        classes: list[str],
        image_size: int,
        lr: float = 1e-4,
        decay: float = 0.99,
        optimizer: str = "adam",
        scheduler: str = "exponential",
        weight_decay: float = 0.0,
        pseudo_threshold: float = 0.0,
        pseudo_weight: float = 1.0,
        pseudo_start: int = 0,
        pseudo_rampup: float = 0.0,
        pretrained: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UserInputError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise UserInputError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        # Initial weights matter only once: a restored classifier must not download anything.
        self.save_hyperparameters(ignore=["pretrained", "weights"])
        self.classes = list(classes)
        self.model = create_backbone(model_name, len(classes), pretrained=pretrained, weights=weights)
        self.train_metrics = _metrics(len(classes), "train/")
        self.val_metrics = _metrics(len(classes), "val/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def pseudo_ramp(self, batch_idx: int) -> float:
        """The warm-up factor of the pseudo-label term at this step (same on every rank)."""
        progress = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        return linear_rampup(progress, self.hparams.pseudo_start, self.hparams.pseudo_rampup)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, pseudo = batch["labeled"], batch.get("pseudo")
        # The ramp depends only on the step, so every rank makes the same choice here.
        ramp = self.pseudo_ramp(batch_idx) if pseudo is not None else 0.0
        images = labeled["image"] if ramp == 0 else torch.cat([labeled["image"], pseudo["image"]])
        logits = self(images)
        labeled_logits = logits[: len(labeled["image"])]
        loss = F.cross_entropy(labeled_logits, labeled["target"])
        if ramp > 0:
            pseudo_loss, mask = masked_pseudo_label_loss(
                logits[len(labeled["image"]) :], pseudo["label"], pseudo["confidence"], self.hparams.pseudo_threshold
            )
            loss = loss + self.hparams.pseudo_weight * ramp * pseudo_loss
            self.log_dict(
                {"pseudo/loss": pseudo_loss, "pseudo/mask_rate": mask.float().mean(), "pseudo/ramp": ramp},
                on_step=False, on_epoch=True, sync_dist=True, batch_size=len(mask),
            )
        self.train_metrics.update(labeled_logits.detach(), labeled["target"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labeled_logits))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_metrics.update(logits, batch["target"])
        loss = F.cross_entropy(logits, batch["target"])
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay)
        else:
            optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        else:
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @torch.inference_mode()
    def predict_loader(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and dataset indices for every item of `loader`, in eval mode."""
        was_training = self.training
        self.eval()
        probabilities, indices = [], []
        try:
            for batch in loader:
                logits = self(batch["image"].to(self.device, non_blocking=True))
                probabilities.append(logits.float().softmax(dim=1).cpu())
                indices.append(torch.as_tensor(batch["index"]).cpu())
        finally:
            self.train(was_training)
        if not probabilities:
            return torch.empty(0, len(self.classes)), torch.empty(0, dtype=torch.long)
        return torch.cat(probabilities), torch.cat(indices)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> LitterClassifier:
    """Rebuild a LitterClassifier from one of our checkpoints without unpickling arbitrary code."""
    checkpoint = load_torch_file(path, "checkpoint", map_location)
    hparams = checkpoint.get("hyper_parameters", {})
    if "classes" not in hparams or "model_name" not in hparams:
        raise UserInputError(f"{path} is not a detect-waste-cls checkpoint (no class list or model name in it)")
    model = LitterClassifier(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    return model
