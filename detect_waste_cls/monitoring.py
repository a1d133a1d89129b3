"""What a run shows: a readable line per epoch, a clean stop when the loss stops being a number, no library noise."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.run_folder import LAST_CHECKPOINT

LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def hide_library_noise() -> None:
    """Lightning's tips (adverts for its cloud services) and a deprecation warning that Lightning's own code
    triggers in torch: nothing a user can act on. Other warnings and Lightning's messages still show."""
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(_not_a_tip)  # once: a filter already there is not added again
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


class EpochSummary(pl.Callback):
    """One readable line per epoch, for logs where a progress bar is noise."""

    SHOWN = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/balanced_accuracy", "pseudo/mask_rate")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = trainer.callback_metrics
        shown = "  ".join(f"{name} {float(values[name]):.4f}" for name in self.SHOWN if name in values)
        pl.utilities.rank_zero_info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}")


class TrainingDiverged(UserInputError):
    """The loss stopped being a number; the checkpoints written before that are kept as they are."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stops at the first NaN or infinite training loss, on every DDP rank at once, before it is saved anywhere."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        diverged = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):  # any rank: all ranks stop together
            folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
            last = Path(folder) / f"{LAST_CHECKPOINT}.ckpt" if folder else None
            kept = f"; the last good checkpoint is {last}" if last is not None and last.is_file() else ""
            raise TrainingDiverged(
                f"the training loss became {float(loss):.4g} at epoch {trainer.current_epoch}, step {trainer.global_step}"
                f"{kept}. Lower --lr, or try --precision 32-true"
            )
