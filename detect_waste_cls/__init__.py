"""Waste-image classification with PyTorch Lightning and pseudo-labeling.

    from detect_waste_cls import TrainConfig, train
    result = train(TrainConfig().replace(data={"root": "DATA"}, optim={"epochs": 10}))
"""

__version__ = "0.2.0"

from detect_waste_cls.config import DataConfig, ModelConfig, OptimConfig, PseudoConfig, RunConfig, TrainConfig  # noqa: E402
from detect_waste_cls.evaluate import evaluate_folder  # noqa: E402
from detect_waste_cls.export import export_model, load_model, load_pretrained  # noqa: E402
from detect_waste_cls.models.backbones import create_backbone, list_backbones, register_backbone  # noqa: E402
from detect_waste_cls.models.classifier import load_classifier  # noqa: E402
from detect_waste_cls.predict import predict_folder  # noqa: E402
from detect_waste_cls.train import RunResult, train  # noqa: E402

__all__ = [
    "DataConfig", "ModelConfig", "OptimConfig", "PseudoConfig", "RunConfig", "RunResult", "TrainConfig",
    "create_backbone", "evaluate_folder", "export_model", "list_backbones", "load_classifier", "load_model",
    "load_pretrained", "predict_folder",
    "register_backbone", "train",
]
