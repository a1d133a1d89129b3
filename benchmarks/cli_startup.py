"""How long a command takes before it does anything: `--help`, `predict` on 10 images, and `import detect_waste_cls`
against `import torch`, and `predict` against `import torch` plus its model, built and run.

    python benchmarks/cli_startup.py [--roots ROOT [ROOT ...]] [--repeats 5]

Each ROOT is a checkout of the code (default: this one); every command runs in a fresh Python in ROOT, PYTHONPATH=ROOT,
as `python -m detect_waste_cls.cli`, the same code as the installed `detect-waste-cls`. The roots take turns within
each repeat, so that all of them see the same load from whatever else the machine runs. predict scores 10 images
of 64 px with an efficientnet-lite0 checkpoint (random weights, 224 px) written once here, the same file for every
root. Median wall time of --repeats. Targets: --help <= 1 s; import detect_waste_cls <= 1.2x import torch;
predict <= 1.5x import torch plus the model (timm builds efficientnet-lite0, importing timm imports torchvision's
models, and the model runs on the 10 images).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
HELP_TARGET_S = 1.0
IMPORT_TARGET_RATIO = 1.2
PREDICT_TARGET_RATIO = 1.5
IMAGES = 10
MODEL = "efficientnet-lite0"
CLI = ["-m", "detect_waste_cls.cli"]
# What every root pays alike: torch; torch and MODEL built by timm (as our registry builds it), then also run on
# IMAGES images as predict runs it (channels-last, 224 px); torch with Lightning, which imports torchmetrics and so
# torchvision's models.
BUILD_MODEL = "import timm; model = timm.create_model('tf_efficientnet_lite0', num_classes=3).eval()"
WITH_MODEL, WITH_PREDICTIONS = "import torch, build the model", f"import torch, the model on {IMAGES} images"
REFERENCES = {"import torch": "import torch",
              WITH_MODEL: BUILD_MODEL,
              WITH_PREDICTIONS: f"""{BUILD_MODEL}
import torch
with torch.inference_mode():
    model.to(memory_format=torch.channels_last)(torch.rand({IMAGES}, 3, 224, 224))""",
              "import torch, lightning": "import torch, lightning.pytorch"}


def write_images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"image_{i}.png")
    return folder


def write_checkpoint(path: Path) -> Path:
    """A checkpoint as training writes it, as far as loading reads it: hyperparameters and state dict."""
    from detect_waste_cls.config import ModelConfig
    from detect_waste_cls.models.backbones import get_backbone
    from detect_waste_cls.models.classifier import LitterClassifier

    torch.manual_seed(0)
    model = LitterClassifier(classes=["glass", "metal", "paper"], image_size=get_backbone(MODEL).image_size,
                             model=ModelConfig(name=MODEL, pretrained=False))
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


def commands(checkpoint: Path, images: Path, work: Path) -> dict[str, list[str]]:
    """Name -> python arguments; predict writes a new CSV each time (it refuses an existing one)."""
    return {
        "detect-waste-cls --help": [*CLI, "--help"],
        "prepare split --help": [*CLI, "prepare", "split", "--help"],
        f"predict {IMAGES} images": [*CLI, "predict", "--checkpoint", str(checkpoint), "--images", str(images),
                                     "--out", str(work / "predictions-{run}.csv")],
        "import detect_waste_cls": ["-c", "import detect_waste_cls"],
    }


def seconds(arguments: list[str], root: Path, run: int) -> float:
    """Wall time of one fresh `python ARGUMENTS` that imports detect_waste_cls from `root`.

    It runs in `root` too: `python -c` and `-m` put the working folder before PYTHONPATH on sys.path."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *(a.replace("{run}", str(run)) for a in arguments)], cwd=root, check=True,
                   env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(roots: list[Path], repeats: int, work: Path) -> dict:
    """{"references": {name: [s, ...]}, "roots": {root: {command: [s, ...]}}}, taking turns within each repeat."""
    sys.path.insert(0, str(roots[0]))  # the checkpoint is written by the first root's code
    table = commands(write_checkpoint(work / "model.ckpt"), write_images(work / "images"), work)
    times: dict = {"references": {name: [] for name in REFERENCES},
                   "roots": {str(root): {name: [] for name in table} for root in roots}}
    run = 0
    for _ in range(repeats):
        for name, code in REFERENCES.items():
            times["references"][name].append(seconds(["-c", code], work, run))
        for root in roots:
            for name, arguments in table.items():
                run += 1
                times["roots"][str(root)][name].append(seconds(arguments, root, run))
    return times


def median(times: dict) -> dict:
    """The nesting `measure` gives, each list of runs replaced by its median."""
    return {key: median(value) if isinstance(value, dict) else statistics.median(value) for key, value in times.items()}


def rounded(values):
    """Seconds to the millisecond, in nested dicts and lists."""
    if isinstance(values, dict):
        return {key: rounded(value) for key, value in values.items()}
    if isinstance(values, list):
        return [rounded(value) for value in values]
    return round(values, 3)


def row(label: str, cells) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(medians: dict, roots: list[Path], repeats: int) -> str:
    references, per_root = medians["references"], medians["roots"]
    torch_s, with_model_s, with_predictions_s = (references[name] for name in ("import torch", WITH_MODEL,
                                                                              WITH_PREDICTIONS))
    predict = f"predict {IMAGES} images"
    names, columns = list(per_root[str(roots[0])]), [f"`{root}`" for root in roots]
    rule = "|---" * (len(roots) + 1) + "|"
    lines = [
        f"`python benchmarks/cli_startup.py --roots {' '.join(map(str, roots))} --repeats {repeats}`", "",
        f"Median wall time of {repeats} runs, each a fresh Python; the roots took turns within each repeat, so they "
        "saw the same load (other jobs shared the machine's cores). The references ran once per repeat.", "",
        row("seconds", columns), rule,
        *(row(name, [f"{value:.2f}"] * len(roots)) for name, value in references.items()),
        *(row(name, [f"{per_root[str(root)][name]:.2f}" for root in roots]) for name in names), "",
        row("against", columns), rule,
        *(row(f"{name} / {reference}", [f"{per_root[str(root)][name] / seconds_of:.2f}x" for root in roots])
          for name, reference, seconds_of in (("import detect_waste_cls", "import torch", torch_s),
                                              (predict, "import torch", torch_s),
                                              (predict, WITH_MODEL, with_model_s),
                                              (predict, WITH_PREDICTIONS, with_predictions_s))), "",
    ]
    baseline = per_root[str(roots[0])]
    for root in roots[1:]:
        faster = ", ".join(f"{name} {baseline[name] / per_root[str(root)][name]:.1f}x" for name in names)
        lines.append(f"`{root}` against `{roots[0]}`: {faster} faster.")
    last = per_root[str(roots[-1])]
    slowest_help = max(value for name, value in last.items() if name.endswith("--help"))
    lines.append(f"`{roots[-1]}`: slowest --help {slowest_help:.2f} s (target <= {HELP_TARGET_S:.0f} s); "
                 f"import detect_waste_cls {last['import detect_waste_cls'] / torch_s:.2f}x import torch "
                 f"(target <= {IMPORT_TARGET_RATIO}x); {predict} {last[predict] / with_predictions_s:.2f}x "
                 f"{WITH_PREDICTIONS} (target <= {PREDICT_TARGET_RATIO}x), {last[predict] / with_model_s:.2f}x "
                 f"{WITH_MODEL}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", type=Path, nargs="+", default=[REPO_ROOT],
                        help="checkouts to compare, the first the baseline (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    roots = [root.resolve() for root in args.roots]
    with tempfile.TemporaryDirectory() as work:
        times = measure(roots, args.repeats, Path(work))
    medians = median(times)
    results = {"roots": list(map(str, roots)), "repeats": args.repeats, "images": IMAGES, "model": MODEL,
               "median_s": rounded(medians), "runs_s": rounded(times),
               "targets": {"help_s": HELP_TARGET_S, "import_ratio": IMPORT_TARGET_RATIO,
                           "predict_ratio": PREDICT_TARGET_RATIO}}
    write_results("cli_startup", results, markdown(medians, roots, args.repeats))


if __name__ == "__main__":
    main()
