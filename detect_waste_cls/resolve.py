"""Every default that depends on something else (the model, the machine), decided once before a run starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from detect_waste_cls.config import RunConfig, TrainConfig, default_num_workers
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import get_backbone
from detect_waste_cls.models.classifier import resolve_model

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample"


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
    distributed = (isinstance(devices, int) and devices > 1) or run.num_nodes > 1
    return {"accelerator": accelerator, "devices": devices, "num_nodes": run.num_nodes,
            "strategy": "ddp" if distributed else "auto"}


def trains_on_gpu(run: RunConfig) -> bool:
    accelerator = device_settings(run)["accelerator"]
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


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
    pseudo = config.pseudo.resolved(epochs=optim.epochs, starts_from_probe=optim.starts_from_probe,
                                    probe_only=optim.finetune == "linear")
    if optim.finetune == "linear" and pseudo.mode != "none" and not pseudo.distill_probe:
        raise UserInputError(f"--finetune linear fits the probe once and trains no epochs, so nothing learns from "
                             f"--pseudo {pseudo.mode} but the probe itself (teacher mode with --pseudo-distill-probe); "
                             "use --finetune lp-ft (--pseudo-teacher-finetune linear makes round 0's teachers probes)")
    on_gpu = trains_on_gpu(config.run)
    run = config.run.resolved(on_gpu=on_gpu, bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
    return dataclasses.replace(config, data=data, model=model, optim=optim, run=run, pseudo=pseudo)
