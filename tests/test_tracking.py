"""Loggers, the offline Neptune run and training curves, checked on a tiny real training run (CPU)."""

from __future__ import annotations

import math
import pickle
import sys
import uuid
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from detect_waste_cls.plots import plot_training_curves
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.tracking import NeptuneLogger, build_loggers, log_evaluation, read_offline_neptune_run

NEPTUNE_ENV = ("NEPTUNE_API_TOKEN", "NEPTUNE_MODE", "NEPTUNE_PROJECT", "NEPTUNE_DATA_DIRECTORY")


class TinyClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1, num_classes: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(8, num_classes)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{split}/accuracy", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    return DataLoader(data, batch_size=8)


def _train(run_dir: Path, loggers: list, epochs: int = 2) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=loggers,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val/loss")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    trainer.fit(TinyClassifier(), train_dataloaders=_loader(), val_dataloaders=_loader())
    return trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real run with CSV + TensorBoard + offline Neptune, then the final-evaluation logging."""
    base = tmp_path_factory.mktemp("tracking")
    run_dir, cwd = base / "run", base / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for name in NEPTUNE_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(cwd)
        loggers = build_loggers(["csv", "tensorboard"], run_dir, run_name="tiny", neptune=True, tags=["test", "tiny"])
        trainer = _train(run_dir, loggers)
        report = base / "report.txt"
        report.write_text("class  precision\nglass  1.00\n")
        metrics = {"accuracy": 0.75, "macro_f1": torch.tensor(0.5), "note": "text"}
        log_evaluation(loggers, metrics, {"classification_report": report}, step=trainer.global_step)
        neptune_logger = next(lg for lg in loggers if isinstance(lg, NeptuneLogger))
        neptune_logger.close()
    return {"run_dir": run_dir, "cwd": cwd, "best": trainer.checkpoint_callback.best_model_path}


def test_offline_neptune_run_lives_in_run_dir_and_matches_csv(trained_run: dict) -> None:
    run_dir = trained_run["run_dir"]
    assert list((run_dir / ".neptune" / "offline").glob("run__*/data-*.log"))
    assert not any(trained_run["cwd"].iterdir()), "nothing may be written to the cwd"

    run = read_offline_neptune_run(run_dir)
    csv = pd.read_csv(run_dir / "metrics.csv")
    for metric in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "epoch"):
        logged = csv.dropna(subset=[metric])
        assert len(logged) == 2 or metric == "epoch"
        expected = list(zip(logged["step"].astype(int), logged[metric]))
        got = run[f"metrics/{metric}"]
        assert [step for step, _ in got] == [step for step, _ in expected]
        assert [value for _, value in got] == pytest.approx([value for _, value in expected])

    assert run["parameters/lr"] == [(None, 0.1)]
    assert run["parameters/num_classes"] == [(None, 3)]
    assert run["sys/tags"] == [(None, ["test", "tiny"])]
    assert run["sys/name"] == [(None, "tiny")]
    assert run["model/best_model_path"] == [(None, trained_run["best"])]
    assert math.isfinite(run["model/best_model_score"][0][1])


def test_log_evaluation_reaches_csv_and_neptune(trained_run: dict) -> None:
    run_dir = trained_run["run_dir"]
    run = read_offline_neptune_run(run_dir / ".neptune")
    assert run["metrics/test/accuracy"][0][1] == pytest.approx(0.75)
    assert run["metrics/test/macro_f1"][0][1] == pytest.approx(0.5)
    assert "metrics/test/note" not in run
    uploaded = run["test/classification_report"][0][1]
    assert uploaded.is_relative_to(run_dir) and "glass" in uploaded.read_text()

    csv = pd.read_csv(run_dir / "metrics.csv")
    assert csv["test/accuracy"].dropna().tolist() == pytest.approx([0.75])


def test_csv_and_tensorboard_write_inside_run_dir(trained_run: dict) -> None:
    run_dir = trained_run["run_dir"]
    assert (run_dir / "metrics.csv").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_csv_in_a_used_run_dir_does_not_warn(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    (tmp_path / "config.json").write_text("{}")  # what the CLI writes before training
    (csv,) = build_loggers(["csv"], tmp_path, run_name="x")
    csv.log_metrics({"val/loss": 0.5}, step=3)
    csv.save()
    assert pd.read_csv(tmp_path / "metrics.csv")["val/loss"].tolist() == [0.5]
    assert not [w for w in recwarn if "Experiment logs directory" in str(w.message)]


def test_training_curves_png(trained_run: dict, tmp_path: Path) -> None:
    out = plot_training_curves(trained_run["run_dir"] / "metrics.csv", tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000


def test_training_curves_skip_missing_columns(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,val/loss\n0,3,0.9\n1,7,0.7\n")
    from PIL import Image

    with Image.open(plot_training_curves(csv, tmp_path / "c.png")) as image:
        pixels = np.asarray(image.convert("L"))
    loss_panel, accuracy_panel = np.array_split(pixels, 2, axis=1)
    # The val loss line is drawn; the accuracy panel, with no column to show, holds only its frame and labels.
    assert (loss_panel < 200).sum() > 1.5 * (accuracy_panel < 200).sum()


def test_token_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    token = f"fake-token-{uuid.uuid4().hex}"
    for name in NEPTUNE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NEPTUNE_API_TOKEN", token)
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    loggers = build_loggers(["csv"], run_dir, run_name="secret", neptune=True)
    _train(run_dir, loggers, epochs=1)
    assert pickle.loads(pickle.dumps(loggers[-1]))._run is None  # a live run is not pickled (ddp_spawn)
    loggers[-1].close()

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(".neptune" in p.parts for p in files)
    assert not [p for p in files if token.encode() in p.read_bytes()]
    out = capsys.readouterr()
    assert token not in out.out + out.err
    assert "read_offline_neptune_run" in out.out


def test_neptune_mode_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in NEPTUNE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert NeptuneLogger(data_directory=tmp_path)._mode == "offline"
    monkeypatch.setenv("NEPTUNE_API_TOKEN", "x")
    with pytest.raises(UserInputError, match="NEPTUNE_PROJECT"):
        NeptuneLogger()  # a token means async, which needs a project
    monkeypatch.setenv("NEPTUNE_PROJECT", "team/waste")
    assert NeptuneLogger()._mode == "async"
    assert NeptuneLogger(mode="debug")._mode == "debug"
    with pytest.raises(UserInputError, match="mode"):
        NeptuneLogger(mode="online")
    assert not list(tmp_path.iterdir()), "no run is created before the logger is used"


def test_unknown_logger_name(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="comet"):
        build_loggers(["csv", "comet"], tmp_path, run_name="x")


@pytest.mark.parametrize(
    "extra, modules", [("wandb", ["wandb"]), ("mlflow", ["mlflow"]), ("tensorboard", ["tensorboard", "tensorboardX"])]
)
def test_missing_extra(extra: str, modules: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UserInputError, match=rf"pip install 'detect-waste-cls\[{extra}\]'"):
        build_loggers([extra], tmp_path, run_name="x")


def test_read_offline_run_without_one(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="No offline Neptune run"):
        read_offline_neptune_run(tmp_path)
