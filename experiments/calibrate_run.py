"""Calibrate a finished run's checkpoint after the fact, as training does now, and score it on its test split.

    python experiments/calibrate_run.py RUN --checkpoint RUN/checkpoints/last.ckpt --out OUT

For runs made before calibration existed: rebuilds the run's validation split from its config.json
(same seed, same split), fits the temperature on it into a copy of the checkpoint in OUT, then writes
test mode's files into OUT, whose metrics.json holds the ECE before (ece_uncalibrated) and after (ece).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from detect_waste_cls.config import TrainConfig, read_config_file
from detect_waste_cls.data.datamodule import WasteDataModule
from detect_waste_cls.evaluate import evaluate_folder
from detect_waste_cls.fit import calibrate_run
from detect_waste_cls.models.backbones import get_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = TrainConfig.from_dict(read_config_file(args.run / "config.json"))
    entry = get_backbone(config.model.name)
    datamodule = WasteDataModule(config.data, normalization=entry.normalization, interpolation=entry.interpolation,
                                 seed=config.run.seed)
    args.out.mkdir(parents=True, exist_ok=False)
    checkpoint = shutil.copy(args.checkpoint, args.out / args.checkpoint.name)
    calibrate_run(Path(checkpoint), datamodule, device="cpu")
    metrics = evaluate_folder(checkpoint, datamodule.layout.root / "test", args.out,
                              batch_size=datamodule.eval_batch_size, num_workers=datamodule.num_workers)
    print(json.dumps({key: metrics[key] for key in ("accuracy", "temperature", "ece_uncalibrated", "ece",
                                                     "nll_uncalibrated", "nll")}, indent=2))


if __name__ == "__main__":
    main()
