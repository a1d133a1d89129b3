"""The EMA teacher and teacher/student rounds (Noisy Student), on tiny real models."""

from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from detect_waste_cls import TrainConfig, train
from detect_waste_cls.config import read_config_file
from detect_waste_cls.models.classifier import load_classifier
from detect_waste_cls.models.ema import EMATeacher, find_ema_teacher
from detect_waste_cls.predict import path_logits


def tiny_config(data, out, **sections) -> TrainConfig:
    config = TrainConfig().replace(
        data={"root": str(data), "image_size": 32, "batch_size": 8, "num_workers": 0},
        model={"name": "simple-cnn"}, optim={"epochs": 2, "lr": 3e-3},
        run={"out": str(out), "accelerator": "cpu", "progress_bar": False},
    )
    return config.replace(**sections) if sections else config


def test_ema_teacher_is_what_is_checkpointed_and_resume_restores_both_models(tmp_path, tiny_tree):
    data = tiny_tree
    first = train(tiny_config(data, tmp_path / "first", optim={"ema_decay": 0.5}))
    checkpoint = torch.load(first.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged if k.startswith("model."))
    # What is loaded for testing and export is the average.
    restored = load_classifier(first.run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, averaged[k]) for k, v in restored.state_dict().items())

    seen = {}

    class AtResume(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            ema = next(c for c in trainer.callbacks if isinstance(c, EMATeacher))
            seen["current"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["average"] = {k: v.clone() for k, v in ema.averaged_model().state_dict().items()}

    resumed = tiny_config(data, tmp_path / "second", optim={"ema_decay": 0.5, "epochs": 3},
                          run={"resume": str(first.run_dir / "checkpoints" / "last.ckpt")})
    train(resumed, callbacks=[AtResume()])
    assert all(torch.equal(seen["current"][k], current[k]) for k in current)
    assert all(torch.equal(seen["average"][k], averaged[k]) for k in averaged)


def test_the_ema_restarts_from_the_weights_in_training_when_the_backbone_unfreezes(tmp_path, tiny_tree):
    # Averaged across lp-ft's phase change, the EMA would carry the linear-probe model into fine-tuning.
    average_is_current = []

    class AtSecondStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:  # one update into the epoch
                average = find_ema_teacher(trainer).averaged_model().state_dict()
                average_is_current.append(all(torch.equal(v, average[k]) for k, v in pl_module.state_dict().items()))

    config = tiny_config(tiny_tree, tmp_path / "run",
                         optim={"epochs": 3, "finetune": "lp-ft", "probe_epochs": 1, "ema_decay": 0.5})
    train(config, callbacks=[AtSecondStep()])
    # The first update copies the weights, at the start of training and again after the probe; then it averages.
    assert average_is_current == [True, True, False]


def test_teacher_rounds_each_train_a_student_on_the_previous_rounds_labels(tmp_path, tiny_tree):
    data = tiny_tree
    result = train(tiny_config(data, tmp_path / "run", pseudo={"mode": "teacher", "rounds": 2, "threshold": 0.0}))
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert rounds["round"].tolist() == ["round-0", "round-1", "round-2"]
    assert rounds.accuracy.notna().all() and result.test_metrics["accuracy"] == rounds.accuracy.iloc[-1]
    assert [r.config.pseudo.mode for r in result.rounds] == ["none", "teacher", "teacher"]
    for number in (1, 2):
        teacher = rounds.checkpoint[number - 1]
        assert rounds.teacher[number] == teacher
        # The student's labels are its teacher's predictions on the eval view, made once, from its own softmax:
        # the teacher is calibrated, and its temperature must not move the thresholds.
        labels = pd.read_csv(tmp_path / "run" / f"round-{number}" / "pseudo_labels.csv")
        model = load_classifier(teacher)
        assert model.temperature != 1.0
        logits = path_logits(model, [Path(p) for p in labels.path], batch_size=8)
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        assert labels.label.tolist() == [model.classes[i] for i in predicted]
        assert labels.confidence.to_numpy() == pytest.approx(confidence.numpy(), abs=1e-5)
    # The whole run replays from its top config.json.
    replay = TrainConfig.from_dict(read_config_file(tmp_path / "run" / "config.json"))
    assert (replay.pseudo.mode, replay.pseudo.rounds, replay.pseudo.teacher) == ("teacher", 2, None)
