"""The run folder: where a run writes, how DDP's extra ranks find it, and what --resume needs from it.

Lightning and pandas are imported by the functions that use them: reading a run folder (which checkpoint serves
it, for predict, export and the app) needs neither.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from detect_waste_cls.config import RECORD_KEY, TrainConfig
from detect_waste_cls.data.crops import GEOMETRY_KEY, CropGeometry
from detect_waste_cls.errors import UserInputError, check_new_folder
from detect_waste_cls.models.backbones import load_torch_file

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last"  # checkpoints/last.ckpt: the end of the latest epoch, for --resume
BEST_CHECKPOINTS = "best-*.ckpt"  # checkpoints/best-epoch=NN.ckpt: the lowest val/loss so far
# A checkpoint being written; the name matches neither pattern above, so --resume auto never trusts one.
PARTIAL_SUFFIX = ".partial"
SKIPPED_FILES = "skipped_files.txt"  # every unreadable file of the run: at scan, in training, at evaluation
TEACHER_LABELS_DIR = "teacher-labels"  # <run or --cache-dir>/teacher-labels/<key>.safetensors

# Set while a run trains: DDP's extra ranks read their run folder from it (see shared_run_dir).
RUN_DIR_ENV = "DETECT_WASTE_CLS_RUN_DIR"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"


def teacher_labels_dir(run_dir: Path, cache_dir: str | Path | None) -> Path:
    """Where a teacher-mode run caches its teachers' labels: under --cache-dir, else inside its own folder."""
    return Path(cache_dir if cache_dir is not None else run_dir) / TEACHER_LABELS_DIR


def run_checkpoint(run: Path) -> Path | None:
    """The checkpoint a run folder is served by: the one its training tested and calibrated (the run's
    --final-checkpoint: its newest best-*.ckpt, or last.ckpt), else its newest .ckpt."""
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    config = run / "config.json"
    final = json.loads(config.read_text()).get("optim", {}).get("final_checkpoint") if config.is_file() else None
    if final == "last":
        preferred = [path for path in checkpoints if path.stem == LAST_CHECKPOINT]
    else:
        preferred = [path for path in checkpoints if path.name.startswith("best")]
    return (preferred or checkpoints or [None])[0]


def partial_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (checkpoint_io.AtomicCheckpointIO)."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint --resume auto continues from: last.ckpt, or a best-*.ckpt of a later epoch where a kill
    landed between the epoch's two checkpoint writes. Ordered by the global step saved in each file (file times
    can lie after a copy); a file that cannot be read is passed over with a warning."""
    candidates = [last_checkpoint(run_dir), *sorted(last_checkpoint(run_dir).parent.glob(BEST_CHECKPOINTS))]
    steps = {}
    for path in candidates:
        if path.is_file():
            try:
                steps[path] = load_torch_file(path, "checkpoint")["global_step"]
            except (UserInputError, KeyError) as error:
                log.warning("not resuming from %s: %s", path, error)
    return max(steps, key=steps.get) if steps else None  # a tie keeps last.ckpt, the first candidate


def catch_up_last_checkpoint(run_dir: Path, newest: Path) -> None:
    """Rank 0, before a continued run: make last.ckpt the newest complete checkpoint again (an atomic copy of a
    later best-*.ckpt), so that --final-checkpoint last is the latest epoch, as in a run never killed."""
    last = last_checkpoint(run_dir)
    if newest != last:
        log.warning("%s is newer than %s (a kill landed between the two writes of an epoch): continuing from it",
                    newest, last)
        shutil.copyfile(newest, partial_path(last))
        os.replace(partial_path(last), last)


def create_run_dir(out: str | Path | None, name: str, *, num_nodes: int = 1) -> Path:
    """A new, empty folder for this run: `out`, or runs/<name>-<timestamp>. Never reuses a non-empty one."""
    from lightning.pytorch.utilities import rank_zero_only

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
        out = check_new_folder(Path(out))
        out.mkdir(parents=True, exist_ok=True)
        return out
    folder = new_run_path(name)
    folder.mkdir(parents=True)
    return folder


def new_run_path(name: str) -> Path:
    """runs/<name>-<timestamp>, not yet taken (a suffix when it is): a default run folder is never reused."""
    base = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, suffix = base, 1
    while candidate.exists():
        candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return candidate


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


def forget_epochs_after(metrics_csv: Path, epoch: int) -> None:
    """Drop the log rows of the epoch a kill interrupted, so a continued run logs each epoch once."""
    import pandas as pd

    if metrics_csv.is_file():
        log_rows = pd.read_csv(metrics_csv)
        log_rows[log_rows["epoch"] <= epoch].to_csv(metrics_csv, index=False)


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


def write_config(path: Path, config: TrainConfig, *, classes: Sequence[str] | None = None,
                 crop_geometry: CropGeometry | None = None) -> None:
    """The resolved config, plus facts under RECORD_KEY (ignored when the file is read back as a config): for
    people, and the crop geometry of the training data, which `predict --boxes` and `export` take from here."""
    import lightning

    record = {**({"classes": list(classes)} if classes is not None else {}),
              **({GEOMETRY_KEY: asdict(crop_geometry)} if crop_geometry is not None else {}),
              "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
              "written": datetime.now().isoformat(timespec="seconds")}
    path.write_text(json.dumps({**config.to_dict(), RECORD_KEY: record}, indent=2))
