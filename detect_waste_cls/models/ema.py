"""The EMA teacher: Lightning's EMA weight averaging, whose averaged model also makes the pseudo-labels."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMATeacher(EMAWeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step.

    Lightning swaps it in for validation, saves it as the checkpoint's `state_dict` (the weights
    in training go to `current_model_state`, so --resume restores both) and leaves it in the
    model when training ends: the average is what is validated, tested and exported.
    """

    def __init__(self, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"--ema-decay {decay}: choose a value between 0 and 1, such as 0.99")
        super().__init__(decay=decay)

    def averaged_model(self) -> pl.LightningModule | None:
        """The averaged copy of the module (None before fit sets it up)."""
        return None if self._average_model is None else self._average_model.module


def find_ema_teacher(trainer: pl.Trainer) -> EMATeacher | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, EMATeacher)), None)
