"""PseudoLabelRefresh: relabels the pseudolabel split per epoch or per batch, and owns the store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from detect_waste_cls.config import PseudoConfig
from detect_waste_cls.data import batch as keys
from detect_waste_cls.pseudo.store import PseudoLabelStore

log = logging.getLogger(__name__)


@runtime_checkable
class PseudoLabelData(Protocol):
    """What the refresh callback needs from the datamodule (WasteDataModule provides it).

    `pseudo_images` has `paths` and `folder_targets` (-1 where no folder label); training batches
    are {keys.LABELED: ..., keys.PSEUDO: {keys.INDEX, keys.IMAGE[, keys.EVAL_IMAGE]}}.
    """

    classes: Sequence[str]

    @property
    def pseudo_images(self): ...

    def pseudo_inference_dataloader(self, rank: int, world_size: int) -> DataLoader: ...


class PseudoLabelRefresh(pl.Callback):
    """Keeps a PseudoLabelStore current and hands each training step the labels of its pseudo batch.

    per_epoch: at the start of each epoch from `pseudo.start` on, the current model (eval
    mode, eval transforms) predicts the whole pseudolabel split; under DDP each rank
    predicts a shard and the shards are gathered, so every rank holds the same store.
    per_batch: right before each training step, the model labels that step's pseudo batch
    from its eval view; the labels of all ranks are gathered into every rank's store.
    """

    def __init__(self, pseudo: PseudoConfig, *, output_csv: Path | None = None):
        """`pseudo` is the same (resolved) config object the LitterClassifier was given."""
        if pseudo.mode == "none" or pseudo.start is None:
            raise ValueError(f"PseudoLabelRefresh needs a resolved pseudo-labeling config, got {pseudo}")
        self.config = pseudo
        self.mode = pseudo.mode
        self.output_csv = output_csv
        self.store: PseudoLabelStore | None = None
        self._restored_state: dict | None = None
        self._inference_loader = None
        self._changed = self._seen = 0

    @property
    def state_key(self) -> str:
        return f"PseudoLabelRefresh[{self.mode}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if not isinstance(data, PseudoLabelData) or data.pseudo_images is None:
            raise TypeError(
                f"PseudoLabelRefresh needs a datamodule with pseudolabel images (classes, pseudo_images, "
                f"pseudo_inference_dataloader), like WasteDataModule; got {type(data).__name__}"
            )
        pseudo = data.pseudo_images
        self.paths, self.classes = pseudo.paths, data.classes
        self.folder_targets = torch.tensor(pseudo.folder_targets, dtype=torch.long)
        self.store = PseudoLabelStore(len(pseudo.paths))
        if self._restored_state is not None:
            self.store.load_state_dict(self._restored_state)

    def state_dict(self) -> dict:
        return {"store": self.store.state_dict()} if self.store is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "store" not in state_dict:
            return
        self._restored_state = state_dict["store"]
        if self.store is not None:
            self.store.load_state_dict(self._restored_state)

    def _gather(self, pl_module: pl.LightningModule, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Concatenate each tensor across ranks; rows whose index (the first tensor) is -1 are padding."""
        if pl_module.trainer.world_size == 1:
            return list(tensors)
        # Shards differ in length by at most one, and all_gather needs equal shapes.
        length = torch.tensor([len(tensors[0])], device=pl_module.device)
        longest = int(pl_module.all_gather(length).max())
        padded = []
        for tensor in tensors:
            pad = torch.full((longest - len(tensor),), -1, dtype=tensor.dtype)
            padded.append(torch.cat([tensor.cpu(), pad]).to(pl_module.device))
        gathered = [pl_module.all_gather(t).reshape(-1).cpu() for t in padded]
        keep = gathered[0] >= 0
        return [t[keep] for t in gathered]

    def _label(self, trainer, pl_module, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with trainer.precision_plugin.forward_context():
            probabilities, indices = pl_module.predict_loader(batches)
        confidence, labels = probabilities.max(dim=1)
        return self._gather(pl_module, indices, labels, confidence)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._changed = self._seen = 0
        if self.mode != "per_epoch" or trainer.current_epoch < self.config.start:
            return
        if self._inference_loader is None:
            self._inference_loader = trainer.datamodule.pseudo_inference_dataloader(trainer.global_rank, trainer.world_size)
        indices, labels, confidence = self._label(trainer, pl_module, self._inference_loader)
        self._changed = self.store.update(indices, labels, confidence, trainer.current_epoch)
        self._seen = len(indices)
        self._log_store(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        pseudo = batch.get(keys.PSEUDO)
        if pseudo is None:
            return
        if self.mode == "per_batch" and trainer.current_epoch >= self.config.start:
            indices, labels, confidence = self._label(
                trainer, pl_module, [{keys.IMAGE: pseudo[keys.EVAL_IMAGE], keys.INDEX: pseudo[keys.INDEX]}]
            )
            self._changed += self.store.update(indices, labels, confidence, trainer.current_epoch)
            self._seen += len(indices)
        labels, confidence = self.store.lookup(pseudo[keys.INDEX])
        pseudo[keys.LABEL], pseudo[keys.CONFIDENCE] = labels.to(pl_module.device), confidence.to(pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "per_batch" and self._seen:
            self._log_store(trainer)

    def store_metrics(self) -> dict[str, float]:
        metrics = {
            "pseudo/label_changes": self._changed / max(1, self._seen),
            "pseudo/confident_fraction": float(self.store.confident(self.config.threshold).float().mean()),
        }
        for name, count in zip(self.classes, self.store.class_counts(len(self.classes))):
            metrics[f"pseudo/count/{name}"] = float(count)
        # Accuracy of every label, and of the labels confident enough to enter the loss.
        for key, threshold in (("pseudo/accuracy", 0.0), ("pseudo/confident_accuracy", self.config.threshold)):
            accuracy = self.store.accuracy(self.folder_targets, threshold)
            if accuracy is not None:
                metrics[key] = accuracy
        return metrics

    def _log_store(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {**self.store_metrics(), "epoch": trainer.current_epoch}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.output_csv is not None:
            self.store.to_frame(self.paths, self.classes).to_csv(self.output_csv, index=False)
            log.info("pseudo-labels written to %s", self.output_csv)
