"""Waste-image classification with PyTorch Lightning and pseudo-labeling.

    from detect_waste_cls import TrainConfig, train
    result = train(TrainConfig().replace(data={"root": "DATA"}, optim={"epochs": 10}))
"""

import importlib
import sys
import types

__version__ = "0.2.0"

# Each public name and the module it lives in. They load on first use (PEP 562), so that the CLI's --help and
# `import detect_waste_cls` cost no torch, Lightning or torchmetrics import.
_EXPORTS = {
    "DataConfig": "config", "ModelConfig": "config", "OptimConfig": "config", "PseudoConfig": "config",
    "RunConfig": "config", "TrainConfig": "config",
    "evaluate_folder": "evaluate",
    "export_model": "export", "load_model": "export", "load_pretrained": "export",
    "create_backbone": "models.backbones", "list_backbones": "models.backbones",
    "register_backbone": "models.backbones",
    "load_classifier": "models.classifier",
    "predict_folder": "predict",
    "RunResult": "train", "train": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on the package; `train` names both a module and the public function,
        # and the function must win, as it did when this file imported it eagerly.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
