"""One training run: data, model, Trainer, then an evaluation of the best checkpoint on the test split."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from detect_waste_cls.curves import plot_training_curves
from detect_waste_cls.data.datamodule import WasteDataModule
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.evaluate import evaluate_folder, format_report
from detect_waste_cls.models.backbones import get_backbone, load_torch_file
from detect_waste_cls.models.classifier import LitterClassifier
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh
from detect_waste_cls.tracking import NeptuneLogger, build_loggers, log_evaluation

log = logging.getLogger(__name__)

# DDP re-launches this program once per extra rank; they find the run folder rank 0 chose here.
RUN_DIR_ENV = "DETECT_WASTE_CLS_RUN_DIR"


def create_run_dir(out: str | Path | None, name: str) -> Path:
    """A new, empty folder for this run: `out`, or runs/<name>-<timestamp>. Never reuses a non-empty one."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserInputError(f"--out {out} already exists and is not empty; choose a new folder")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, suffix = base, 1
    while candidate.exists():
        candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    candidate.mkdir(parents=True)
    return candidate


def device_settings(args: argparse.Namespace) -> dict:
    """Trainer accelerator/devices/strategy from --gpus, or from --accelerator/--devices."""
    if args.gpus is not None:
        if args.gpus == 0:
            accelerator, devices = "cpu", 1
        else:
            available = torch.cuda.device_count()
            if args.gpus > available:
                raise UserInputError(
                    f"--gpus {args.gpus} asks for {args.gpus} GPU(s) but this machine has {available}; "
                    f"use --gpus 0 to train on CPU"
                )
            accelerator, devices = "gpu", args.gpus
    else:
        accelerator, devices = args.accelerator, int(args.devices) if str(args.devices).isdigit() else args.devices
    distributed = isinstance(devices, int) and devices > 1
    return {"accelerator": accelerator, "devices": devices, "strategy": "ddp" if distributed else "auto"}


def check_checkpoint_classes(checkpoint: Path, classes: Sequence[str]) -> None:
    saved = load_torch_file(checkpoint, "checkpoint").get("hyper_parameters", {}).get("classes")
    if saved != list(classes):
        raise UserInputError(f"{checkpoint} was trained on classes {saved}, but the data has {list(classes)}")


class EpochSummary(pl.Callback):
    """One readable line per epoch, for logs where a progress bar is noise."""

    SHOWN = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/balanced_accuracy", "pseudo/mask_rate")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = trainer.callback_metrics
        shown = "  ".join(f"{name} {float(values[name]):.4f}" for name in self.SHOWN if name in values)
        pl.utilities.rank_zero_info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}")


def build_datamodule(args: argparse.Namespace, image_size: int) -> WasteDataModule:
    return WasteDataModule(
        args.data,
        image_size=image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        val_split=args.val_split,
        weighted_sampler=args.weighted_sampler,
        seed=args.seed,
        pseudo_mode=args.pseudo,
        pseudo_ratio=args.pseudo_ratio,
    )


def run_training(args: argparse.Namespace, extra_callbacks: Sequence[pl.Callback] = ()) -> Path | None:
    """Train, then evaluate the best checkpoint on the test split. Returns the run folder on rank 0."""
    devices = device_settings(args)
    if args.pseudo_start is None:
        # The teacher should have trained for a while first; see the README's pseudo-labeling study.
        args.pseudo_start = args.epochs // 2
    pl.seed_everything(args.seed, workers=True, verbose=False)
    image_size = args.img_size or get_backbone(args.model).image_size
    datamodule = build_datamodule(args, image_size)
    log.info("data: %s", datamodule.layout.describe())
    if args.resume:
        check_checkpoint_classes(args.resume, datamodule.classes)
    run_dir = create_run_dir(args.out, args.model)
    model = LitterClassifier(
        model_name=args.model,
        classes=datamodule.classes,
        image_size=image_size,
        lr=args.lr,
        decay=args.decay,
        optimizer=args.optimizer,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        pseudo_threshold=args.pseudo_threshold,
        pseudo_weight=args.pseudo_weight,
        pseudo_start=args.pseudo_start,
        pseudo_rampup=args.pseudo_rampup,
        pretrained=args.pretrained,
        weights=args.weights,
    )
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-{epoch:02d}", monitor="val/loss", mode="min", save_last=True
    )
    callbacks = [checkpoints, EpochSummary(), *extra_callbacks]
    if args.pseudo != "none":
        callbacks.append(PseudoLabelRefresh(args.pseudo, start_epoch=args.pseudo_start, output_csv=run_dir / "pseudo_labels.csv"))
    loggers = build_loggers(
        args.logger,
        run_dir,
        run_name=run_dir.name,
        neptune=args.neptune,
        neptune_project=args.neptune_project,
        tags=[args.model, str(datamodule.layout.root), f"pseudo:{args.pseudo}"],
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        precision=args.precision,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        log_every_n_steps=1,
        enable_progress_bar=args.progress_bar,
        **devices,
    )
    if trainer.is_global_zero:
        config = {**vars(args), "image_size": image_size, "classes": datamodule.classes, "run_dir": str(run_dir),
                  "versions": {"torch": torch.__version__, "lightning": lightning.__version__}}
        (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=args.resume)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if not trainer.is_global_zero:
        return None
    report_run(trainer, datamodule, loggers, Path(checkpoints.best_model_path or checkpoints.last_model_path), run_dir)
    return run_dir


def report_run(trainer: pl.Trainer, datamodule: WasteDataModule, loggers, best: Path, run_dir: Path) -> None:
    """Rank 0, after training: curves, then the best checkpoint scored on the test split, sent to every logger."""
    if (run_dir / "metrics.csv").is_file():
        plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png")
    if datamodule.layout.test is None:
        log.warning("no test split at %s: skipped the final evaluation", datamodule.layout.root / "test")
    else:
        # One process, every test image once: DDP samplers would pad and duplicate images.
        metrics = evaluate_folder(
            best, datamodule.layout.root / "test", run_dir, batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers, device=trainer.strategy.root_device,
        )
        artifacts = {"confusion_matrix": run_dir / "confusion_matrix.png",
                     "classification_report": run_dir / "classification_report.txt"}
        log_evaluation(loggers, metrics, artifacts, step=trainer.global_step)
        print(f"\ntest metrics of {best}:\n{format_report(metrics)}\nrun folder: {run_dir}")
    for logger in loggers:
        if isinstance(logger, NeptuneLogger):
            logger.close()
