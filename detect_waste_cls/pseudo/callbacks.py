"""PseudoLabelRefresh: labels the pseudolabel split (once from a teacher, per epoch, or per batch) and owns the store."""

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
from detect_waste_cls.models.ema import find_ema_teacher
from detect_waste_cls.models.inference import TrainedClassifier
from detect_waste_cls.pseudo.loss import flex_thresholds, image_weights, tempered_log_targets
from detect_waste_cls.pseudo.store import PseudoLabelStore
from detect_waste_cls.predict import flip_averaged_probabilities
from detect_waste_cls.shards import gather_shards
from detect_waste_cls.pseudo.teachers import TeacherLabelCache, labels_key, load_teachers

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

    @property
    def train_targets(self) -> Sequence[int]: ...

    def pseudo_inference_dataloader(self, rank: int, world_size: int, view=None) -> DataLoader: ...


class PseudoLabelRefresh(pl.Callback):
    """Keeps a PseudoLabelStore current and hands each training step the targets and mask of its pseudo batch.

    Labels always come from an eval view, by the labeler: the EMA teacher when --ema-decay is
    set, else the model in training (or, in teacher mode, the teacher checkpoint); with
    --pseudo-align the store aligns them to the labeled split's class frequencies.
    teacher: before the first step, the teachers label the whole split once (pseudo/teachers.py), each
    rank a shard; with a `cache`, labels of the same teachers on the same images are read from it.
    per_epoch: at the start of each epoch from `pseudo.start` on, the labeler predicts the whole
    split; under DDP each rank predicts a shard and the shards are gathered, so every rank
    holds the same store.
    per_batch: right before each training step, the labeler labels that step's pseudo batch
    from its eval view; the labels of all ranks are gathered into every rank's store.
    """

    def __init__(self, pseudo: PseudoConfig, *, output_csv: Path | None = None, cache: TeacherLabelCache | None = None):
        """`pseudo` is the same (resolved) config object the LitterClassifier was given."""
        if pseudo.mode == "none" or pseudo.start is None:
            raise ValueError(f"PseudoLabelRefresh needs a resolved pseudo-labeling config, got {pseudo}")
        if pseudo.mode == "teacher" and pseudo.teacher is None:
            raise ValueError("teacher mode needs pseudo.teacher, the checkpoint that labels (train() trains one first)")
        self.config = pseudo
        self.mode = pseudo.mode
        self.output_csv = output_csv
        self.cache = cache
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
                f"PseudoLabelRefresh needs a datamodule with pseudolabel images (classes, train_targets, pseudo_images, "
                f"pseudo_inference_dataloader), like WasteDataModule; got {type(data).__name__}"
            )
        pseudo = data.pseudo_images
        self.paths, self.classes = pseudo.paths, list(data.classes)
        self.folder_targets = torch.tensor(pseudo.folder_targets, dtype=torch.long)
        prior = None
        if self.config.align:  # the labeled split's class frequencies: what the pseudolabel split should look like
            prior = torch.bincount(torch.as_tensor(data.train_targets), minlength=len(self.classes)).float()
            prior /= prior.sum()
        self.store = PseudoLabelStore(len(pseudo.paths), len(self.classes), target_prior=prior)
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

    def thresholds(self) -> float | torch.Tensor:
        """The confidence a label needs to enter the loss: one number, or FlexMatch's per-class values."""
        if self.config.threshold_mode == "flex":
            return flex_thresholds(self.store.labels, self.store.confidence, self.config.threshold, len(self.classes))
        return self.config.threshold

    def _relabel(self, trainer: pl.Trainer, labeler: pl.LightningModule, batches) -> None:
        """`labeler` predicts every image in `batches` on every rank; the gathered predictions go into the store."""
        with trainer.precision_plugin.forward_context():
            logits, indices = labeler.predict_logits(batches)
        # The labeler's own softmax, never a calibration temperature: thresholds and soft targets mean the same in
        # every mode. A calibrated teacher (T = 3-4 at 5% TrashNet labels) passed only 16% of its labels at 0.95.
        probabilities = logits.softmax(dim=1)
        indices, probabilities = gather_shards(trainer.lightning_module, indices, probabilities)
        self._record(trainer, indices, probabilities)

    def _record(self, trainer: pl.Trainer, indices: torch.Tensor, probabilities: torch.Tensor) -> None:
        self._changed += self.store.update(indices, probabilities, trainer.current_epoch)
        self._seen += len(indices)

    @staticmethod
    def labeler(trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule:
        """The EMA teacher when there is one, else the model in training."""
        ema = find_ema_teacher(trainer)
        averaged = ema.averaged_model() if ema is not None else None
        return averaged if averaged is not None else pl_module

    def _labeled_by_teacher(self) -> bool:
        return bool((self.store.epoch >= 0).any())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint restore, or a distilled probe: the student keeps the labels it has.
        if self.mode == "teacher" and not self._labeled_by_teacher():
            self._label_with_teacher(trainer, pl_module)

    def distillation_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(target distribution, weight) of every pseudolabel image, as the student's loss takes them: for a distilled probe.

        Labels with the teachers first (every rank takes part); the weight includes --pseudo-weight.
        """
        if not self._labeled_by_teacher():
            self._label_with_teacher(trainer, pl_module)
        probabilities, labels = self.store.lookup(torch.arange(len(self.paths)))
        weights = self.config.weight * image_weights(labels, probabilities.max(dim=1).values, self.thresholds(),
                                                     self.config.weighting)
        if self.config.targets == "hard":
            targets = torch.nn.functional.one_hot(labels.clamp(min=0), len(self.classes)).float()
        else:
            targets = tempered_log_targets(probabilities, self.config.temperature).exp()
        return targets, weights

    def _label_with_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mean = torch.zeros(len(self.paths), len(self.classes))
        for path, teacher in zip(self.config.teacher, load_teachers(self.config.teacher, self.classes)):
            mean += self._teacher_probabilities(trainer, teacher.to(pl_module.device), path) / len(self.config.teacher)
        self._record(trainer, torch.arange(len(self.paths)), mean)
        if trainer.is_global_zero:
            log.info("%d teacher(s) labeled %d pseudolabel images", len(self.config.teacher), len(self.paths))

    def _teacher_probabilities(self, trainer: pl.Trainer, teacher: TrainedClassifier, path: str) -> torch.Tensor:
        """One teacher's flip-averaged probabilities for every pseudolabel image: from the cache, or each rank a shard."""
        key = labels_key(teacher, self.paths)
        # Rank 0 reads and broadcasts: ranks whose disks differ (nodes without a shared one) still take one path.
        cached = self.cache.load(key, len(self.paths)) if self.cache is not None and trainer.is_global_zero else None
        cached = trainer.strategy.broadcast(cached, src=0)
        if cached is not None:
            if trainer.is_global_zero:
                log.info("labels of %s read from %s", path, self.cache.path(key))
            return cached
        # Each teacher sees the images as it was trained to, whatever the student's size and normalization.
        loader = trainer.datamodule.pseudo_inference_dataloader(trainer.global_rank, trainer.world_size,
                                                                view=teacher.eval_view())
        with trainer.precision_plugin.forward_context():
            indices, probabilities = flip_averaged_probabilities(teacher, loader)
        indices, probabilities = gather_shards(trainer.lightning_module, indices, probabilities)
        ordered = torch.zeros(len(self.paths), len(self.classes))
        ordered[indices] = probabilities
        if trainer.is_global_zero and self.cache is not None:
            self.cache.save(key, ordered, path)
        return ordered

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "teacher":  # the teacher's labels do not change; logged each epoch all the same
            self._log_store(trainer)
            self._changed = 0
            return
        self._changed = self._seen = 0
        if self.mode != "per_epoch" or trainer.current_epoch < self.config.start:
            return
        if self._inference_loader is None:
            self._inference_loader = trainer.datamodule.pseudo_inference_dataloader(trainer.global_rank, trainer.world_size)
        self._relabel(trainer, self.labeler(trainer, pl_module), self._inference_loader)
        self._log_store(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        pseudo = batch.get(keys.PSEUDO)
        if pseudo is None:
            return
        if self.mode == "per_batch" and trainer.current_epoch >= self.config.start:
            eval_view = [{keys.IMAGE: pseudo[keys.EVAL_IMAGE], keys.INDEX: pseudo[keys.INDEX]}]
            self._relabel(trainer, self.labeler(trainer, pl_module), eval_view)
        probabilities, labels = self.store.lookup(pseudo[keys.INDEX])
        weights = image_weights(labels, probabilities.max(dim=1).values, self.thresholds(), self.config.weighting)
        targets = probabilities if self.config.targets == "soft" else labels.clamp(min=0)
        pseudo[keys.PSEUDO_TARGET], pseudo[keys.WEIGHT] = targets.to(pl_module.device), weights.to(pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "per_batch" and self._seen:
            self._log_store(trainer)

    def store_metrics(self) -> dict[str, float]:
        """How far the labels can be trusted: overall and per class, for all labels and for those that pass."""
        thresholds = self.thresholds()
        passing = self.store.confident(thresholds)
        metrics = {"pseudo/label_changes": self._changed / max(1, self._seen),
                   "pseudo/confident_fraction": float(passing.float().mean())}
        for key, bar in (("pseudo/accuracy", 0.0), ("pseudo/confident_accuracy", thresholds)):
            accuracy = self.store.accuracy(self.folder_targets, bar)
            if accuracy is not None:
                metrics[key] = accuracy
        counts = self.store.class_counts(len(self.classes), thresholds)
        for label, name in enumerate(self.classes):
            # Share of each class among the labels that pass: a class the teacher favours shows here.
            metrics[f"pseudo/share/{name}"] = counts[label] / max(1, sum(counts))
            accuracy = self.store.accuracy(self.folder_targets, thresholds, label=label)
            if accuracy is not None:
                metrics[f"pseudo/confident_accuracy/{name}"] = accuracy
            if isinstance(thresholds, torch.Tensor):
                metrics[f"pseudo/threshold/{name}"] = float(thresholds[label])
        return metrics

    def _log_store(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {**self.store_metrics(), "epoch": trainer.current_epoch}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_train_end: a linear student trains no epoch, and its labels are worth a look all the same.
        if trainer.is_global_zero and self.output_csv is not None:
            self.store.to_frame(self.paths, self.classes).to_csv(self.output_csv, index=False)
            log.info("pseudo-labels written to %s", self.output_csv)
