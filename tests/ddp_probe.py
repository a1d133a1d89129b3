"""Runs one training with the CLI's arguments and saves every rank's pseudo-label store and starting head,
and the teacher-labeled rows rank 0 fits a distilled probe to.

Used by the DDP tests: `python tests/ddp_probe.py DUMP_DIR <train arguments>`. DDP re-runs this
script for the second rank, so both ranks get the dumping callback.
"""

import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from detect_waste_cls.cli import build_parser, config_from_args
from detect_waste_cls.models import probe
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh
from detect_waste_cls.train import train


class DumpStores(pl.Callback):
    def __init__(self, folder: Path):
        self.folder = folder

    def _dump(self, trainer: pl.Trainer, moment: str) -> None:
        refresh = next(c for c in trainer.callbacks if isinstance(c, PseudoLabelRefresh))
        torch.save(refresh.store.state_dict(), self.folder / f"{moment}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        self._dump(trainer, "start")
        head = {k: v.detach().cpu() for k, v in pl_module.head.state_dict().items()}
        torch.save(head, self.folder / f"head_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, "end")


def recording_soft_rows(fit_probe, folder: Path):
    """fit_probe as it is, saving the soft rows it was given (only rank 0 fits)."""
    def fit(*args, soft=None, **kwargs):
        if soft is not None:
            torch.save({"features": soft.features, "probabilities": soft.probabilities}, folder / "soft_rows.pt")
        return fit_probe(*args, soft=soft, **kwargs)
    return fit


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # as the CLI: the probe says what it was fitted to
    dump_dir = Path(sys.argv[1])
    dump_dir.mkdir(parents=True, exist_ok=True)
    probe.fit_probe = recording_soft_rows(probe.fit_probe, dump_dir)
    args = build_parser().parse_args(sys.argv[2:])
    train(config_from_args(args, "simple-cnn"), callbacks=[DumpStores(dump_dir)])
