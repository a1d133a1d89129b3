"""The logger factory: one builder per name in config.LOGGER_NAMES, plus Neptune on request."""

from __future__ import annotations

import csv as csv_module
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from detect_waste_cls.config import LOGGER_NAMES
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.tracking.neptune import NeptuneLogger, _primitive


@dataclass(frozen=True)
class RunIdentity:
    """What every logger is told about a run."""

    run_dir: Path
    name: str
    tags: Sequence[str] = ()


def _require(extra: str, *modules: str) -> None:
    # find_spec, not RequirementCache: it also honours a module blocked in sys.modules.
    if not any(importlib.util.find_spec(module) is not None for module in modules):
        raise UserInputError(
            f"The {extra} logger needs the {modules[0]} package: pip install 'detect-waste-cls[{extra}]'"
        )


def _csv(run: RunIdentity) -> Logger:
    # Empty name and version: Lightning then writes run_dir/metrics.csv and run_dir/hparams.yaml.
    # Flushed at every logging call, so a killed run has every finished epoch on disk.
    csv = CSVLogger(save_dir=run.run_dir, name="", version="", flush_logs_every_n_steps=1)
    # Lightning deletes an existing metrics.csv when it opens its writer; a run continued with --resume auto
    # keeps the rows of its earlier epochs, handed to the writer to be written first.
    earlier = run.run_dir / "metrics.csv"
    kept = []
    if earlier.is_file():
        with earlier.open(newline="") as rows:
            kept = list(csv_module.DictReader(rows))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = csv.experiment  # on DDP ranks other than 0, a stand-in that writes nothing
    if kept and rank_zero_only.rank == 0:
        writer.metrics.extend(kept)
    return csv


def _tensorboard(run: RunIdentity) -> Logger:
    _require("tensorboard", "tensorboard", "tensorboardX")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=run.run_dir, name="tensorboard", version="", default_hp_metric=False)


def _wandb(run: RunIdentity) -> Logger:
    _require("wandb", "wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=str(run.run_dir), name=run.name, tags=list(run.tags),
                       project=os.environ.get("WANDB_PROJECT", "detect-waste-cls"))


def _mlflow(run: RunIdentity) -> Logger:
    _require("mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    # Without a server: a SQLite store in the run folder (MLflow's default backend since 3.7; the
    # ./mlruns file store is legacy), with artifacts beside it rather than in the cwd.
    artifact_location = None if tracking_uri else (run.run_dir / "mlflow-artifacts").resolve().as_uri()
    return MLFlowLogger(
        experiment_name="detect-waste-cls",
        run_name=run.name,
        tracking_uri=tracking_uri or f"sqlite:///{run.run_dir.resolve()}/mlflow.db",
        artifact_location=artifact_location,
        tags={tag: "true" for tag in run.tags} or None,
    )


LOGGER_BUILDERS: dict[str, Callable[[RunIdentity], Logger]] = {
    "csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow,
}
assert tuple(LOGGER_BUILDERS) == LOGGER_NAMES, "config.LOGGER_NAMES lists the builders above"


def build_loggers(
    names: Sequence[str],
    run_dir: Path,
    *,
    run_name: str,
    neptune: bool = False,
    neptune_project: str | None = None,
    tags: Sequence[str] = (),
) -> list[Logger]:
    """Loggers for one training run, all writing inside `run_dir`."""
    unknown = [name for name in names if name not in LOGGER_BUILDERS]
    if unknown:
        raise UserInputError(f"Unknown logger {unknown[0]!r}; choose from {', '.join(LOGGER_BUILDERS)}")
    run = RunIdentity(Path(run_dir), run_name, tuple(tags))
    # dict.fromkeys drops repeats: two CSV loggers would fight over one file.
    loggers = [LOGGER_BUILDERS[name](run) for name in dict.fromkeys(names)]
    if neptune:
        loggers.append(NeptuneLogger(project=neptune_project, name=run_name, tags=tags, data_directory=run.run_dir))
    return loggers


def log_evaluation(
    loggers: Sequence[Logger],
    metrics: Mapping[str, Any],
    files: Mapping[str, Path],
    *,
    step: int | None = None,
) -> None:
    """Send the final test metrics (as `test/<name>`) to every logger and the files to those that take files.

    Pass `step=trainer.global_step` to line the values up with training; non-numeric metrics are left out.
    """
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    values = {key: _primitive(value) for key, value in metrics.items()}
    numbers = {
        key if key.startswith("test/") else f"test/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for logger in loggers:
        if numbers:
            logger.log_metrics(numbers, step=step)
        for key, path in files.items():
            path = Path(path)
            if isinstance(logger, NeptuneLogger):
                logger.log_file(f"test/{key}", path)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif isinstance(logger, WandbLogger):
                if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                    logger.log_image(key=f"test/{key}", images=[str(path)])
                else:
                    logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
            # CSV and TensorBoard take no files.
        # Lightning finalized these loggers when fit/test ended: write out what we just added.
        logger.save()
