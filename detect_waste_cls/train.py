"""`train(config)`: one run (fit.py), or in teacher mode its teacher and student rounds (rounds.py)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from detect_waste_cls.config import TrainConfig
from detect_waste_cls.fit import RunResult, fit_and_test
from detect_waste_cls.resolve import resolve_config
from detect_waste_cls.rounds import train_rounds

__all__ = ["RunResult", "train"]


def train(config: TrainConfig = TrainConfig(), *, callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """Train, then score the final checkpoint (--final-checkpoint) on the test split; in teacher mode, once per round.

    Works from a script or a notebook on CPU or one GPU; DDP on several devices re-launches the
    program, so start those runs from the command line (see the README).
    """
    resolved = resolve_config(config)
    if resolved.pseudo.mode == "teacher":
        # The rounds resolve the rest per model; the data folder is decided (and announced) once, here.
        return train_rounds(config.replace(data={"root": resolved.data.root}), callbacks)
    return fit_and_test(resolved, callbacks)
