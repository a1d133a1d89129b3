"""Our own small Neptune logger and a reader for the runs it writes offline.

Lightning no longer ships a Neptune logger, and the hosted Neptune service is gone, so Neptune runs
are usually written offline into the training run folder (`<run_dir>/.neptune/`) and read back with
`read_offline_neptune_run`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import warnings
from argparse import Namespace
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from detect_waste_cls.errors import UserInputError

NEPTUNE_MODES = ("async", "sync", "offline", "debug")
# The client's own folder name: keeping it lets `neptune sync --path <run_dir>` find offline runs.
NEPTUNE_DIR_NAME = ".neptune"

_Step = int | float | None


def _import_neptune() -> Any:
    # neptune 1.x pulls in bravado/jsonschema, which warn on import; none of that is ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import neptune

    return neptune


@contextlib.contextmanager
def _neptune_data_directory(path: Path | None) -> Iterator[None]:
    """Point the client at `path` while a run is created.

    neptune 1.x has no init_run argument for this: it reads NEPTUNE_DATA_DIRECTORY (default `.neptune`
    in the cwd) once, when the run's operation processor is built inside init_run.
    """
    if path is None:
        yield
        return
    old = os.environ.get("NEPTUNE_DATA_DIRECTORY")
    os.environ["NEPTUNE_DATA_DIRECTORY"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NEPTUNE_DATA_DIRECTORY", None)
        else:
            os.environ["NEPTUNE_DATA_DIRECTORY"] = old


def _primitive(value: Any) -> bool | int | float | str:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return str(value)


class NeptuneLogger(Logger):
    """Logs a Lightning run to Neptune (neptune client >= 1.10).

    The API token is read by the client from NEPTUNE_API_TOKEN and never passes through here.
    Mode: `mode`, else NEPTUNE_MODE, else `async` with a token and `offline` without one.
    Offline runs go under `data_directory/.neptune` (the cwd's `.neptune` when not given).

    `finalize` flushes but keeps the run open, because Lightning finalizes after `fit` and again after
    `test`, and an offline run cannot be reopened: call `close()` when done (the client also stops
    open runs at interpreter exit).
    """

    def __init__(
        self,
        *,
        project: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
        data_directory: Path | None = None,
    ) -> None:
        super().__init__()
        self._project = project or os.environ.get("NEPTUNE_PROJECT") or None
        has_token = bool(os.environ.get("NEPTUNE_API_TOKEN"))
        self._mode = mode or os.environ.get("NEPTUNE_MODE") or ("async" if has_token else "offline")
        if self._mode not in NEPTUNE_MODES:
            raise UserInputError(f"Unknown Neptune mode {self._mode!r}; choose one of {', '.join(NEPTUNE_MODES)}")
        # Fail before training rather than at the first logged value.
        if self._mode in ("async", "sync") and not has_token:
            raise UserInputError(
                f"Neptune mode {self._mode!r} needs NEPTUNE_API_TOKEN (and a Neptune server); "
                "use NEPTUNE_MODE=offline to keep the run on disk"
            )
        if self._mode in ("async", "sync") and not self._project:
            raise UserInputError(f"Neptune mode {self._mode!r} needs a project (workspace/name): set NEPTUNE_PROJECT")
        self._name = name
        self._tags = list(tags)
        self._data_directory = Path(data_directory) / NEPTUNE_DIR_NAME if data_directory is not None else None
        self._run: Any = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The `neptune.Run`, created on first use (rank 0 only)."""
        if self._run is None:
            neptune = _import_neptune()
            with _neptune_data_directory(self._data_directory):
                self._run = neptune.init_run(
                    project=self._project,
                    name=self._name,
                    tags=self._tags or None,
                    mode=self._mode,
                )
            if self._mode == "offline":
                where = self._data_directory or Path(os.environ.get("NEPTUNE_DATA_DIRECTORY", NEPTUNE_DIR_NAME))
                where = where.resolve()
                print(
                    f"Neptune is logging offline to {where}; read it back with "
                    f"detect_waste_cls.tracking.read_offline_neptune_run('{where}')"
                )
        return self._run

    def __getstate__(self) -> dict[str, Any]:
        # A live run (threads, open files) cannot be pickled, e.g. for ddp_spawn; each process makes its own.
        return {**self.__dict__, "_run": None}

    @property
    def name(self) -> str:
        return self._name or ""

    @property
    def version(self) -> str | None:
        # The client's own id of the run (a UUID offline); there is none until the run exists.
        return getattr(self._run, "_id", None)

    @property
    def save_dir(self) -> str | None:
        return str(self._data_directory) if self._data_directory is not None else None

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        flat = _flatten_dict(_convert_params(params), delimiter="/")
        for key, value in flat.items():
            self.experiment[f"parameters/{key}"] = _primitive(value)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.experiment[f"metrics/{key}"].append(_primitive(value), step=step)

    @rank_zero_only
    def log_file(self, key: str, path: Path) -> None:
        """Upload a file (image, text) as field `key`.

        The bytes are copied into the run (offline: into its `upload_path/`), so the run stays whole when
        the original file is moved; a plain path upload would only record the path.
        """
        neptune = _import_neptune()
        path = Path(path)
        extension = path.suffix.lstrip(".") or None
        self.experiment[key].upload(neptune.types.File.from_content(path.read_bytes(), extension=extension))

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if checkpoint_callback.best_model_path:
            self.experiment["model/best_model_path"] = checkpoint_callback.best_model_path
        if checkpoint_callback.best_model_score is not None:
            self.experiment["model/best_model_score"] = float(checkpoint_callback.best_model_score)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is None:
            return
        self._run["status"] = status
        self._run.wait()  # offline: everything is on disk after this

    @rank_zero_only
    def close(self) -> None:
        """Stop the run; a later use of `experiment` would start a new one."""
        if self._run is not None:
            self._run.stop()
            self._run = None


def _find_neptune_container(path: Path) -> Path:
    """The folder of one run (holding metadata.json and data-*.log) at or under `path`."""
    candidates = [path, *path.glob("*"), *path.glob("*/*"), *path.glob(f"{NEPTUNE_DIR_NAME}/*/*")]
    found = sorted({c for c in candidates if (c / "metadata.json").is_file() and any(c.glob("data-*.log"))})
    if not found:
        raise UserInputError(
            f"No offline Neptune run under {path} (expected {NEPTUNE_DIR_NAME}/offline/run__*/data-*.log)"
        )
    if len(found) > 1:
        raise UserInputError(f"{len(found)} Neptune runs under {path}; pass one of their folders, e.g. {found[0]}")
    return found[0]


def read_offline_neptune_run(path: Path | str) -> dict[str, list[tuple[_Step, Any]]]:
    """Read back what a run wrote to disk, from the run folder, its `.neptune` folder or the run's own folder.

    Returns field path -> [(step, value), ...]: series (metrics/..., monitoring/...) in logged order with the
    steps Neptune would give them; single values (parameters/..., model/...) as one `(None, value)` entry.
    Uploaded files come back as paths, tags (`sys/tags`) as a sorted list.
    """
    container = _find_neptune_container(Path(path))
    _import_neptune()
    from neptune.core.components.queue.json_file_splitter import JsonFileSplitter
    from neptune.internal import operation as ops

    assignments = (ops.AssignFloat, ops.AssignInt, ops.AssignBool, ops.AssignString, ops.AssignDatetime)
    fields: dict[str, list[tuple[_Step, Any]]] = {}
    string_sets: dict[str, set[str]] = {}
    log_files = sorted(container.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[-1]))
    for log_file in log_files:
        splitter = JsonFileSplitter(log_file)
        try:
            while (record := splitter.get()) is not None:
                op = ops.Operation.from_dict(record["obj"])
                key = "/".join(op.path)
                if isinstance(op, assignments):
                    fields[key] = [(None, op.value)]
                elif isinstance(op, (ops.LogFloats, ops.LogStrings)):
                    series = fields.setdefault(key, [])
                    for item in op.values:
                        # Like the server: a value logged without a step gets the previous step + 1.
                        step = item.step if item.step is not None else (series[-1][0] + 1 if series else 0)
                        series.append((step, item.value))
                elif isinstance(op, (ops.ClearFloatLog, ops.ClearStringLog, ops.ClearImageLog)):
                    fields[key] = []
                elif isinstance(op, (ops.AddStrings, ops.RemoveStrings, ops.ClearStringSet)):
                    tags = string_sets.setdefault(key, set())
                    if isinstance(op, ops.AddStrings):
                        tags.update(op.values)
                    elif isinstance(op, ops.RemoveStrings):
                        tags.difference_update(op.values)
                    else:
                        tags.clear()
                    fields[key] = [(None, sorted(tags))]
                elif isinstance(op, ops.UploadFile):
                    file = Path(op.file_path) if op.file_path else container / "upload_path" / op.tmp_file_name
                    fields[key] = [(None, file)]
                elif isinstance(op, ops.UploadFileContent):
                    fields[key] = [(None, base64.b64decode(op.file_content))]
                elif isinstance(op, ops.DeleteAttribute):
                    fields.pop(key, None)
                    string_sets.pop(key, None)
                # Series configs, file sets and artifacts carry no values worth returning.
        finally:
            splitter.close()
    return fields
