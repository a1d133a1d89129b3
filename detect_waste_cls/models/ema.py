"""The EMA teacher: Lightning's EMA weight averaging, whose averaged model also makes the pseudo-labels."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMATeacher(EMAWeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step.

    Lightning swaps it in for validation, saves it as the checkpoint's `state_dict` (the weights
    in training go to `current_model_state`, so --resume restores both) and leaves it in the
    model when training ends: the average is what is validated, tested and exported.

    The average restarts from the weights in training at `restart_epoch`, the first epoch after
    lp-ft's linear probe: averaged across the moment the backbone unfreezes, it would carry the
    probe-phase model far into fine-tuning (at decay 0.99, 28% of it after 126 more steps).
    """

    def __init__(self, decay: float, restart_epoch: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"--ema-decay {decay}: choose a value between 0 and 1, such as 0.99")
        super().__init__(decay=decay)
        self.restart_epoch = restart_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.restart_epoch > 0 and self._average_model is not None:
            # AveragedModel copies the weights at its next update when it has averaged none yet.
            self._average_model.n_averaged.zero_()

    def averaged_model(self) -> pl.LightningModule | None:
        """The averaged copy of the module (None before fit sets it up)."""
        return None if self._average_model is None else self._average_model.module


def find_ema_teacher(trainer: pl.Trainer) -> EMATeacher | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, EMATeacher)), None)
