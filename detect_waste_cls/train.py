"""One training run, `train(config)`: data, model, Trainer, then the final checkpoint scored on the test split."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from detect_waste_cls.calibration import calibrate_checkpoint
from detect_waste_cls.config import RECORD_KEY, RESUME_AUTO, RunConfig, TrainConfig, default_num_workers, read_config_file
from detect_waste_cls.data.datamodule import WasteDataModule
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.evaluate import evaluate_folder, format_report
from detect_waste_cls.models.backbones import get_backbone, load_torch_file
from detect_waste_cls.models.classifier import LitterClassifier, resolve_model
from detect_waste_cls.models.ema import EMATeacher
from detect_waste_cls.plots import plot_training_curves
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh
from detect_waste_cls.tracking import NeptuneLogger, build_loggers, log_evaluation

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last"  # checkpoints/last.ckpt: the end of the latest epoch, for --resume
SKIPPED_FILES = "skipped_files.txt"  # every unreadable file of the run: at scan, in training, at evaluation
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample"

# Set while a run trains: DDP's extra ranks read their run folder from it (see shared_run_dir).
RUN_DIR_ENV = "DETECT_WASTE_CLS_RUN_DIR"


def create_run_dir(out: str | Path | None, name: str, *, num_nodes: int = 1) -> Path:
    """A new, empty folder for this run: `out`, or runs/<name>-<timestamp>. Never reuses a non-empty one."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if out is None and num_nodes > 1:
        raise UserInputError(f"--num-nodes {num_nodes} needs --out RUN: the one run folder all machines write, on a "
                             "filesystem they all see")
    if out is not None and rank_zero_only.rank > 0:
        # torchrun or SLURM started this process for another rank, on this machine or another: rank 0 checks
        # and creates the folder, and this rank only writes there once training has synchronized them.
        return Path(out)
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


# What may differ between a run's command and the one that continues it with --resume auto.
RESUME_FREE_FIELDS = {"resume", "out", "progress_bar", "compile", "channels_last"}  # the last two only change speed


def continued_run_dir(config: TrainConfig) -> Path:
    """The folder `--resume auto` continues: --out, holding checkpoints/last.ckpt and the same config.json."""
    if config.run.out is None:
        raise UserInputError(f"--resume {RESUME_AUTO} continues the run folder given by --out RUN")
    run_dir = Path(config.run.out)
    checkpoint = run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    if not checkpoint.is_file():
        raise UserInputError(f"--resume {RESUME_AUTO}: no {checkpoint}, so no completed epoch to continue from")
    saved = resolve_config(TrainConfig.from_dict(read_config_file(run_dir / "config.json"), str(run_dir / "config.json")))
    ours, theirs = config.to_dict(), saved.to_dict()
    changed = [f"{section}.{key}" for section, values in ours.items() for key, value in values.items()
               if value != theirs[section][key] and not (section == "run" and key in RESUME_FREE_FIELDS)]
    if changed:
        raise UserInputError(f"--resume {RESUME_AUTO}: {run_dir} was trained with other settings ({', '.join(changed)}); "
                             f"give its own command again, or --config {run_dir / 'config.json'}")
    return run_dir


def forget_epochs_after(metrics_csv: Path, epoch: int) -> None:
    """Drop the log rows of the epoch a kill interrupted, so a continued run logs each epoch once."""
    if metrics_csv.is_file():
        log_rows = pd.read_csv(metrics_csv)
        log_rows[log_rows["epoch"] <= epoch].to_csv(metrics_csv, index=False)


def device_settings(run: RunConfig) -> dict:
    """Trainer accelerator/devices/strategy from --gpus, or from --accelerator/--devices."""
    if run.gpus is not None:
        if run.gpus == 0:
            accelerator, devices = "cpu", 1
        else:
            available = torch.cuda.device_count()
            if run.gpus > available:
                raise UserInputError(
                    f"--gpus {run.gpus} asks for {run.gpus} GPU(s) but this machine has {available}; "
                    f"use --gpus 0 to train on CPU"
                )
            accelerator, devices = "gpu", run.gpus
    else:
        accelerator, devices = run.accelerator, int(run.devices) if str(run.devices).isdigit() else run.devices
    if run.num_nodes < 1:
        raise UserInputError(f"--num-nodes {run.num_nodes}: at least one machine")
    distributed = (isinstance(devices, int) and devices > 1) or run.num_nodes > 1
    return {"accelerator": accelerator, "devices": devices, "num_nodes": run.num_nodes,
            "strategy": "ddp" if distributed else "auto"}


def trains_on_gpu(run: RunConfig) -> bool:
    accelerator = device_settings(run)["accelerator"]
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_resume_checkpoint(checkpoint: str | Path, classes: Sequence[str], model_name: str) -> int:
    """A checkpoint to continue from must hold the same model and classes (the error names both sides);
    returns the epoch it was saved at."""
    contents = load_torch_file(checkpoint, "checkpoint")
    saved = contents.get("hyper_parameters", {})
    if saved.get("model", {}).get("name") != model_name:
        raise UserInputError(f"{checkpoint} holds model {saved.get('model', {}).get('name')}, but --model is {model_name}")
    if saved.get("classes") != list(classes):
        raise UserInputError(f"{checkpoint} was trained on classes {saved.get('classes')}, but the data has {list(classes)}")
    return contents["epoch"]


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
                f"{kept}. Lower --lr (or --probe-lr), or try --precision 32-true"
            )


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Every value left to a default that depends on something else, decided once; config.json records the result."""
    data, model = config.data, resolve_model(config.model)
    data = dataclasses.replace(
        data,
        root=data.root or str(SAMPLE_DATA),
        image_size=data.image_size or get_backbone(model.name).image_size,
        num_workers=data.num_workers if data.num_workers is not None else default_num_workers(),
    )
    if config.data.root is None:
        weights = "ImageNet weights" if model.pretrained else "random weights"
        print(f"no --data given: training {model.name} from {weights} on the embedded sample {SAMPLE_DATA} "
              f"at {data.image_size} px (pass --data DIR for your own images)")
    optim = config.optim.resolved(starts_from_weights=bool(model.pretrained or model.weights))
    on_gpu = trains_on_gpu(config.run)
    run = config.run.resolved(on_gpu=on_gpu, bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
    return dataclasses.replace(
        config, data=data, model=model, optim=optim, run=run,
        pseudo=config.pseudo.resolved(epochs=optim.epochs, probe_epochs=optim.probe_epochs),
    )


@dataclass(frozen=True)
class RunResult:
    """What a training run left behind (on DDP ranks other than 0, only the config)."""

    config: TrainConfig  # resolved: what config.json holds
    run_dir: Path | None = None
    final_checkpoint: Path | None = None
    test_metrics: dict | None = None  # metrics.json, when there is a test split
    rounds: tuple["RunResult", ...] = ()  # teacher mode: each round's own result, round 0 first


def train(config: TrainConfig = TrainConfig(), *, callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """Train, then score the final checkpoint (--final-checkpoint) on the test split; in teacher mode, once per round.

    Works from a script or a notebook on CPU or one GPU; DDP on several devices re-launches the
    program, so start those runs from the command line (see the README).
    """
    config = resolve_config(config)
    if config.pseudo.mode == "teacher":
        return train_rounds(config, callbacks)
    return fit_and_test(config, callbacks)


@contextmanager
def shared_run_dir(run_dir: Path):
    """DDP re-launches this program once per extra rank, at the first fit; they find the run folder rank 0 chose here."""
    if os.environ.get(RUN_DIR_ENV):  # an extra rank, or a round inside a run that set it
        yield
        return
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def fit_and_test(config: TrainConfig, callbacks: Sequence[pl.Callback] = (), run_dir: Path | None = None) -> RunResult:
    """One run of a resolved config: in a new run folder, or in `run_dir` (a round of a teacher-mode run)."""
    devices = device_settings(config.run)
    pl.seed_everything(config.run.seed, workers=True, verbose=False)
    model_entry = get_backbone(config.model.name)
    datamodule = WasteDataModule(config.data, normalization=model_entry.normalization, pseudo=config.pseudo,
                                 seed=config.run.seed)
    log.info("data: %s", datamodule.layout.describe())
    resume_from = config.run.resume
    if resume_from == RESUME_AUTO:
        run_dir = continued_run_dir(config)
        resume_from = str(run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt")
    if resume_from:
        resumed_epoch = check_resume_checkpoint(resume_from, datamodule.classes, config.model.name)
    if run_dir is None:
        run_dir = create_run_dir(config.run.out, config.model.name, num_nodes=config.run.num_nodes)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.run.resume == RESUME_AUTO and rank_zero_only.rank == 0:
        forget_epochs_after(run_dir / "metrics.csv", resumed_epoch)
    datamodule.skipped_log = None if config.data.strict else run_dir / SKIPPED_FILES
    model = LitterClassifier(classes=datamodule.classes, image_size=config.data.image_size,
                             model=config.model, optim=config.optim, pseudo=config.pseudo)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.run.compile:
        model.model.compile()  # in place: state dict keys and checkpoints stay as without --compile
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch:02d}", monitor="val/loss")
    # Lightning's save_last only rewrites last.ckpt when a new best is saved; --resume needs the latest epoch.
    latest = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=LAST_CHECKPOINT, enable_version_counter=False)
    all_callbacks = [checkpoints, latest, EpochSummary(), StopOnNonFiniteLoss(), *callbacks]
    if config.optim.ema_decay is not None:
        all_callbacks.append(EMATeacher(config.optim.ema_decay, restart_epoch=config.optim.probe_epochs))
    if config.pseudo.mode != "none":
        all_callbacks.append(PseudoLabelRefresh(model.pseudo, output_csv=run_dir / "pseudo_labels.csv"))
    loggers = build_loggers(
        config.run.loggers,
        run_dir,
        run_name=run_dir.name,
        neptune=config.run.neptune,
        neptune_project=config.run.neptune_project,
        tags=[config.model.name, str(datamodule.layout.root), f"pseudo:{config.pseudo.mode}"],
    )
    if devices["strategy"] == "ddp" and config.optim.probe_epochs > 0:
        # The frozen backbone gets no gradients in the probe phase; DDP must be told to expect that.
        devices["strategy"] = "ddp_find_unused_parameters_true"
    trainer = pl.Trainer(
        max_epochs=config.optim.epochs,
        precision=config.run.precision,
        callbacks=all_callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        log_every_n_steps=1,
        enable_progress_bar=config.run.progress_bar if config.run.progress_bar is not None else sys.stderr.isatty(),
        **devices,
    )
    if trainer.is_global_zero and config.run.resume != RESUME_AUTO:  # a continued run keeps its config.json
        write_config(run_dir / "config.json", config, classes=datamodule.classes)
    with shared_run_dir(run_dir):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    # Every rank tracks the same best checkpoint (validation metrics are synced), so every rank knows the next teacher.
    chosen = checkpoints if config.optim.final_checkpoint == "best" else latest
    final = Path(chosen.best_model_path or latest.best_model_path)
    if not trainer.is_global_zero:
        return RunResult(config, run_dir, final)
    if config.run.calibrate:
        calibrate_run(final, datamodule, device=trainer.strategy.root_device)
    metrics = report_run(trainer, datamodule, loggers, final, run_dir)
    return RunResult(config, run_dir, final, metrics)


ROUNDS_TABLE = "rounds.csv"


def train_rounds(config: TrainConfig, callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """Teacher mode (Noisy Student): each round a fresh student learns from the previous round's final model.

    The first teacher is --pseudo-teacher, or a supervised run of the same config trained here as
    round 0. Rounds live in <run>/round-<k>/, each a complete run folder with its own config.json;
    <run>/rounds.csv gets one line per round as it finishes.
    """
    pseudo = config.pseudo
    if config.run.resume == RESUME_AUTO:
        raise UserInputError(f"--resume {RESUME_AUTO} continues a single run; to continue a student round, use "
                             "--pseudo-teacher <its teacher> --pseudo-rounds 1 --resume <round folder>/checkpoints/last.ckpt")
    if config.run.resume and (pseudo.teacher is None or pseudo.rounds > 1):
        raise UserInputError("--resume continues a single run: resume a student round with --pseudo-teacher "
                             "<its teacher> --pseudo-rounds 1 --resume <its last.ckpt>")
    top = create_run_dir(config.run.out, config.model.name, num_nodes=config.run.num_nodes)
    rounds: list[RunResult] = []
    first_process = rank_zero_only.rank == 0  # no Trainer yet to ask; DDP's extra ranks have RANK set
    if first_process:
        write_config(top / "config.json", config)  # replays every round; each round's own config is in its folder
    teacher = pseudo.teacher
    with shared_run_dir(top):
        for number in range(0 if teacher is None else 1, pseudo.rounds + 1):
            if number == 0:  # no teacher given: a supervised run is the first one
                round_config = config.replace(pseudo={"mode": "none"})
            else:
                round_config = config.replace(pseudo={"teacher": teacher, "rounds": 1})
            rounds.append(fit_and_test(round_config, callbacks, top / f"round-{number}"))
            teacher = str(rounds[-1].final_checkpoint)
            if first_process:
                _write_rounds_table(top / ROUNDS_TABLE, rounds)
    last = rounds[-1]
    return RunResult(config, top, last.final_checkpoint, last.test_metrics, rounds=tuple(rounds))


def _write_rounds_table(path: Path, rounds: Sequence[RunResult]) -> None:
    lines = [
        {"round": result.run_dir.name, "teacher": result.config.pseudo.teacher or "",
         **{name: (result.test_metrics or {}).get(name) for name in ("accuracy", "balanced_accuracy", "macro_f1")},
         "checkpoint": str(result.final_checkpoint)}
        for result in rounds
    ]
    pd.DataFrame(lines).to_csv(path, index=False)


def write_config(path: Path, config: TrainConfig, *, classes: Sequence[str] | None = None) -> None:
    """The resolved config, plus facts for people under RECORD_KEY (ignored when the file is read back)."""
    record = {**({"classes": list(classes)} if classes is not None else {}), "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
              "written": datetime.now().isoformat(timespec="seconds")}
    path.write_text(json.dumps({**config.to_dict(), RECORD_KEY: record}, indent=2))


def calibrate_run(checkpoint: Path, datamodule: WasteDataModule, device: torch.device) -> None:
    """Rank 0: the final checkpoint gets its temperature from the validation split (never from test images)."""
    layout = datamodule.layout
    if layout.val is layout.test:
        log.warning("--val-split 0 validates on the test split: not calibrating on test images (temperature 1)")
        return
    calibrate_checkpoint(checkpoint, datamodule.val_dataloader(), torch.tensor(layout.val.targets), device=device)


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
