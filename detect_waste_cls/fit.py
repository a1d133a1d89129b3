"""One run of a resolved config: data, model, Trainer, then the final checkpoint scored on the test split."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from detect_waste_cls.calibration import calibrate_checkpoint
from detect_waste_cls.checkpoint_io import AtomicCheckpointIO
from detect_waste_cls.config import RESUME_AUTO, TrainConfig, read_config_file
from detect_waste_cls.data.crops import CropGeometry, recorded_geometry
from detect_waste_cls.data.datamodule import WasteDataModule
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.evaluate import evaluate_folder, format_report
from detect_waste_cls.models.backbones import get_backbone
from detect_waste_cls.models.classifier import LitterClassifier
from detect_waste_cls.models.ema import EMATeacher
from detect_waste_cls.models.probe import ConvergedProbe
from detect_waste_cls.monitoring import EpochSummary, StopOnNonFiniteLoss, hide_library_noise
from detect_waste_cls.plots import plot_training_curves
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh
from detect_waste_cls.pseudo.teachers import TeacherLabelCache
from detect_waste_cls.resolve import device_settings, resolve_config
from detect_waste_cls.run_folder import (
    BEST_CHECKPOINTS, LAST_CHECKPOINT, SKIPPED_FILES, catch_up_last_checkpoint,
    check_resume_checkpoint, create_run_dir, forget_epochs_after, last_checkpoint, newest_complete_checkpoint,
    shared_run_dir, write_config,
)
from detect_waste_cls.tracking import NeptuneLogger, build_loggers, log_evaluation

log = logging.getLogger(__name__)

# What may differ between a run's command and the one that continues it with --resume auto.
# compile and channels_last only change speed; cache_dir only where reusable results are kept; verbose only output.
RESUME_FREE_FIELDS = {"resume", "out", "progress_bar", "verbose", "compile", "channels_last", "cache_dir"}


@dataclass(frozen=True)
class RunResult:
    """What a training run left behind (on DDP ranks other than 0, only the config)."""

    config: TrainConfig  # resolved: what config.json holds
    run_dir: Path | None = None
    final_checkpoint: Path | None = None
    test_metrics: dict | None = None  # metrics.json, when there is a test split
    rounds: tuple["RunResult", ...] = ()  # teacher mode: each round's own result (round 0's teachers first)


def training_crop_geometry(datamodule: WasteDataModule) -> CropGeometry | None:
    """The geometry `prepare crop` cut the training data with, if it did: the run records it so the model keeps it
    when the dataset moves or is exported. A dataset whose splits were cut differently trains, with no record."""
    try:
        return recorded_geometry(datamodule.layout.root.parent)
    except UserInputError as error:
        log.warning("%s; the run records no crop geometry", error)
        return None


def continued_run_dir(config: TrainConfig) -> tuple[Path, Path]:
    """The folder `--resume auto` continues (--out, holding the same config.json) and its newest complete checkpoint."""
    if config.run.out is None:
        raise UserInputError(f"--resume {RESUME_AUTO} continues the run folder given by --out RUN")
    run_dir = Path(config.run.out)
    checkpoint = newest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise UserInputError(f"--resume {RESUME_AUTO}: no readable {last_checkpoint(run_dir)} or {BEST_CHECKPOINTS} "
                             "beside it, so no completed epoch to continue from")
    saved = resolve_config(TrainConfig.from_dict(read_config_file(run_dir / "config.json"), str(run_dir / "config.json")))
    ours, theirs = config.to_dict(), saved.to_dict()
    changed = [f"{section}.{key}" for section, values in ours.items() for key, value in values.items()
               if value != theirs[section][key] and not (section == "run" and key in RESUME_FREE_FIELDS)]
    if changed:
        raise UserInputError(f"--resume {RESUME_AUTO}: {run_dir} was trained with other settings ({', '.join(changed)}); "
                             f"give its own command again, or --config {run_dir / 'config.json'}")
    return run_dir, checkpoint


def fit_and_test(config: TrainConfig, callbacks: Sequence[pl.Callback] = (), run_dir: Path | None = None,
                 teacher_labels: TeacherLabelCache | None = None) -> RunResult:
    """One run of a resolved config: in a new run folder, or in `run_dir` (a round of a teacher-mode run).

    `teacher_labels`: where a student reads and writes its teachers' labels (train_rounds shares one per study).
    """
    hide_library_noise()
    devices = device_settings(config.run)
    pl.seed_everything(config.run.seed, workers=True, verbose=False)
    model_entry = get_backbone(config.model.name)
    datamodule = WasteDataModule(config.data, normalization=model_entry.normalization,
                                 interpolation=model_entry.interpolation, pseudo=config.pseudo, seed=config.run.seed)
    log.info("data: %s", datamodule.layout.describe())
    resume_from = config.run.resume
    if resume_from == RESUME_AUTO:
        run_dir, resume_from = continued_run_dir(config)
        if rank_zero_only.rank == 0:
            catch_up_last_checkpoint(run_dir, resume_from)
    if resume_from:
        resumed_epoch = check_resume_checkpoint(resume_from, datamodule.classes, config.model.name)
    # Built before the run folder exists: a refused model (weights missing, unreadable) leaves no empty --out.
    model = LitterClassifier(classes=datamodule.classes, image_size=config.data.image_size,
                             model=config.model, optim=config.optim, pseudo=config.pseudo)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.run.compile:
        model.model.compile()  # in place: state dict keys and checkpoints stay as without --compile
    if run_dir is None:
        run_dir = create_run_dir(config.run.out, config.model.name, num_nodes=config.run.num_nodes)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.run.resume == RESUME_AUTO and rank_zero_only.rank == 0:
        forget_epochs_after(run_dir / "metrics.csv", resumed_epoch)
    datamodule.skipped_log = None if config.data.strict else run_dir / SKIPPED_FILES
    probe_only = config.optim.finetune == "linear"  # the probe is the whole model: no epochs
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch:02d}", monitor="val/loss")
    # Lightning's save_last only rewrites last.ckpt when a new best is saved; --resume needs the latest epoch.
    latest = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=LAST_CHECKPOINT, enable_version_counter=False)
    all_callbacks = [checkpoints, latest, EpochSummary(), StopOnNonFiniteLoss(), *callbacks]
    pseudo_labels = None
    if config.pseudo.mode != "none":
        pseudo_labels = PseudoLabelRefresh(model.pseudo, output_csv=run_dir / "pseudo_labels.csv", cache=teacher_labels)
    if config.optim.starts_from_probe:  # first: pseudo-labels and the EMA start from the probe's head
        all_callbacks.insert(0, ConvergedProbe(distill_from=pseudo_labels if config.pseudo.distill_probe else None))
    if config.optim.ema_decay and not probe_only:
        all_callbacks.append(EMATeacher(config.optim.ema_decay))
    if pseudo_labels is not None:
        all_callbacks.append(pseudo_labels)
    loggers = build_loggers(
        config.run.loggers,
        run_dir,
        run_name=run_dir.name,
        neptune=config.run.neptune,
        neptune_project=config.run.neptune_project,
        tags=[config.model.name, str(datamodule.layout.root), f"pseudo:{config.pseudo.mode}"],
    )
    trainer = pl.Trainer(
        max_epochs=0 if probe_only else config.optim.epochs,
        precision=config.run.precision,
        callbacks=all_callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        log_every_n_steps=1,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=config.run.progress_bar if config.run.progress_bar is not None else sys.stderr.isatty(),
        enable_model_summary=config.run.verbose,
        **devices,
    )
    if trainer.is_global_zero and config.run.resume != RESUME_AUTO:  # a continued run keeps its config.json
        write_config(run_dir / "config.json", config, classes=datamodule.classes,
                     crop_geometry=training_crop_geometry(datamodule))
    with shared_run_dir(run_dir):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    if probe_only:
        trainer.save_checkpoint(last_checkpoint(run_dir))
        final = last_checkpoint(run_dir)
    else:
        # Every rank tracks the same best checkpoint (validation metrics are synced), so every rank knows the next teacher.
        # last.ckpt by its path: a run continued at its final epoch from a best-*.ckpt saves nothing more, and the
        # `latest` callback's state restored from that file predates its own write of the epoch.
        best = config.optim.final_checkpoint == "best" and checkpoints.best_model_path
        final = Path(checkpoints.best_model_path) if best else last_checkpoint(run_dir)
    if not trainer.is_global_zero:
        return RunResult(config, run_dir, final)
    if config.run.calibrate:
        calibrate_run(final, datamodule, device=trainer.strategy.root_device)
    metrics = report_run(trainer, datamodule, loggers, final, run_dir)
    return RunResult(config, run_dir, final, metrics)


def calibrate_run(checkpoint: Path, datamodule: WasteDataModule, device: torch.device) -> None:
    """Rank 0: the final checkpoint gets its temperature from the validation split (never from test images)."""
    if not datamodule.has_own_val:
        log.warning("--val-split 0 validates on the test split: not calibrating on test images (temperature 1)")
        return
    calibrate_checkpoint(checkpoint, datamodule.val_dataloader(), torch.tensor(datamodule.layout.val.targets),
                         device=device)


def report_run(trainer: pl.Trainer, datamodule: WasteDataModule, loggers, final: Path, run_dir: Path) -> dict | None:
    """Rank 0, after training: curves, then the final checkpoint scored on the test split, sent to every logger."""
    if (run_dir / "metrics.csv").is_file():
        plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png")
    metrics = None
    skipped = {str(path) for path in datamodule.layout.skipped}
    if (run_dir / SKIPPED_FILES).is_file():
        skipped |= set((run_dir / SKIPPED_FILES).read_text().splitlines())
    if datamodule.layout.test is None:
        log.warning("no test split at %s: skipped the final evaluation", datamodule.layout.root / "test")
    else:
        # One process, every test image once: DDP samplers would pad and duplicate images.
        metrics = evaluate_folder(
            final, datamodule.layout.root / "test", run_dir, batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers, device=trainer.strategy.root_device,
        )
        artifacts = {"confusion_matrix": run_dir / "confusion_matrix.png",
                     "classification_report": run_dir / "classification_report.txt"}
        log_evaluation(loggers, metrics, artifacts, step=trainer.global_step)
        print(f"\ntest metrics of {final}:\n{format_report(metrics)}\nrun folder: {run_dir}")
        skipped |= set(metrics["skipped_images"])
    if skipped:
        (run_dir / SKIPPED_FILES).write_text("".join(f"{path}\n" for path in sorted(skipped)))
        log.warning("%d unreadable file(s) were left out; listed in %s", len(skipped), run_dir / SKIPPED_FILES)
    for logger in loggers:
        if isinstance(logger, NeptuneLogger):
            logger.close()
    return metrics
