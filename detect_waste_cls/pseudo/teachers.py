"""Teachers of the pseudolabel split: one model or an ensemble, and their cached labels.

Each teacher sees the images at its own size and normalization and predicts the image and its
mirror image; the label is the mean of those probabilities over the views and the teachers (its
own softmax, never a calibration temperature: thresholds mean the same whichever teacher labels).
Each teacher's labels are kept under a key made of its weights and the images, so a second student
with the same teachers and data reads them instead of running the teachers again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from detect_waste_cls.export import load_model
from detect_waste_cls.models.inference import TrainedClassifier

log = logging.getLogger(__name__)


def load_teachers(paths: Sequence[str], classes: Sequence[str]) -> list[TrainedClassifier]:
    """Checkpoints or exported folders, each checked to know the data's classes in the data's order."""
    return [load_model(path, classes) for path in paths]


def labels_key(teacher: TrainedClassifier, paths: Sequence[Path]) -> str:
    """A digest of what a teacher's labels depend on: its weights and input view, and the images (name, size)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([teacher.classes, teacher.image_size, teacher.normalization]).encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for path in paths:
        digest.update(f"{path.name}\t{path.stat().st_size if path.is_file() else -1}\n".encode())
    return digest.hexdigest()[:24]


class TeacherLabelCache:
    """<folder>/<key>.safetensors: one teacher's probabilities of every pseudolabel image, in the split's order.

    One entry per teacher, so an ensemble's members are reused by students of any one of them.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str, num_images: int) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            probabilities = load_file(path)["probabilities"]
        except (SafetensorError, KeyError, OSError) as error:
            log.warning("ignoring unreadable teacher labels %s (%s); the teachers label again", path, error)
            return None
        return probabilities if len(probabilities) == num_images else None

    def save(self, key: str, probabilities: torch.Tensor, teacher: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        partial = path.with_suffix(".partial")  # renamed when complete: a killed run leaves no half-written labels
        save_file({"probabilities": probabilities.contiguous()}, partial, metadata={"teacher": str(teacher)})
        partial.replace(path)
        return path
