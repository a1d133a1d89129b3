"""How long a command takes before it does anything: `--help`, `predict` on 10 images, and `import detect_waste_cls`
against `import torch`.

    python benchmarks/cli_startup.py [--roots ROOT [ROOT ...]] [--repeats 5]

Each ROOT is a checkout of the code (default: this one); every command runs in a fresh Python with PYTHONPATH=ROOT,
as `python -m detect_waste_cls.cli`, the same code as the installed `detect-waste-cls`. The roots take turns within
each repeat, so that all of them see the same load from whatever else the machine runs. predict scores 10 images
of 64 px with an efficientnet-lite0 checkpoint (random weights, 224 px) written once here, the same file for every
root. Median wall time of --repeats. Targets: --help <= 1 s; import detect_waste_cls <= 1.2x import torch.
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
IMAGES = 10
MODEL = "efficientnet-lite0"
CLI = ["-m", "detect_waste_cls.cli"]


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


def seconds(arguments: list[str], root: Path | None, run: int) -> float:
    """Wall time of one fresh `python ARGUMENTS` with PYTHONPATH=root (none: whatever is installed)."""
    env = {**os.environ, "PYTHONPATH": str(root)} if root else dict(os.environ)
    start = time.perf_counter()
    subprocess.run([sys.executable, *(a.replace("{run}", str(run)) for a in arguments)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(roots: list[Path], repeats: int, work: Path) -> dict:
    """{"import torch": [s, ...], root: {command: [s, ...]}}, the roots taking turns within each repeat."""
    sys.path.insert(0, str(roots[0]))  # the checkpoint is written by the first root's code
    table = commands(write_checkpoint(work / "model.ckpt"), write_images(work / "images"), work)
    times: dict = {"import torch": [], **{str(root): {name: [] for name in table} for root in roots}}
    run = 0
    for _ in range(repeats):
        times["import torch"].append(seconds(["-c", "import torch"], None, run))
        for root in roots:
            for name, arguments in table.items():
                run += 1
                times[str(root)][name].append(seconds(arguments, root, run))
    return times


def report(times: dict, roots: list[Path], args) -> tuple[dict, str]:
    torch_s = statistics.median(times["import torch"])
    medians = {str(root): {name: statistics.median(values) for name, values in times[str(root)].items()}
               for root in roots}
    names = list(medians[str(roots[0])])
    header = "| command | " + " | ".join(f"`{root}` (s)" for root in roots) + " |"
    rows = [header, "|---" * (len(roots) + 1) + "|", f"| import torch | " + " | ".join([f"{torch_s:.2f}"] * len(roots)) + " |"]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{medians[str(root)][name]:.2f}" for root in roots) + " |")
    ratio_rows = ["| ratio | " + " | ".join(f"`{root}`" for root in roots) + " |", "|---" * (len(roots) + 1) + "|"]
    for name in ("import detect_waste_cls", f"predict {IMAGES} images"):
        ratio_rows.append(f"| {name} / import torch | "
                          + " | ".join(f"{medians[str(root)][name] / torch_s:.2f}x" for root in roots) + " |")
    lines = [
        f"`python benchmarks/cli_startup.py --roots {' '.join(map(str, roots))} --repeats {args.repeats}`",
        "",
        f"Median wall time of {args.repeats} runs, each a fresh Python; the roots took turns within each repeat, so "
        "they saw the same load (other jobs shared the machine's cores). `import torch` ran once per repeat.",
        "",
        *rows, "", *ratio_rows, "",
    ]
    if len(roots) > 1:
        baseline = medians[str(roots[0])]
        for root in roots[1:]:
            faster = ", ".join(f"{name} {baseline[name] / medians[str(root)][name]:.1f}x" for name in names)
            lines.append(f"`{root}` against `{roots[0]}`: {faster} faster.")
        lines.append("")
    last = medians[str(roots[-1])]
    slowest_help = max(value for name, value in last.items() if name.endswith("--help"))
    lines.append(f"`{roots[-1]}`: slowest --help {slowest_help:.2f} s (target <= {HELP_TARGET_S:.0f} s); "
                 f"import detect_waste_cls {last['import detect_waste_cls'] / torch_s:.2f}x import torch "
                 f"(target <= {IMPORT_TARGET_RATIO}x).")
    results = {"roots": list(map(str, roots)), "repeats": args.repeats, "images": IMAGES, "model": MODEL,
               "import_torch_s": round(torch_s, 3),
               "median_s": {root: {name: round(value, 3) for name, value in per_root.items()}
                            for root, per_root in medians.items()},
               "runs_s": {"import torch": [round(t, 3) for t in times["import torch"]],
                          **{str(root): {name: [round(t, 3) for t in values] for name, values in times[str(root)].items()}
                             for root in roots}},
               "targets": {"help_s": HELP_TARGET_S, "import_ratio": IMPORT_TARGET_RATIO}}
    return results, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", type=Path, nargs="+", default=[REPO_ROOT],
                        help="checkouts to compare, the first the baseline (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    roots = [root.resolve() for root in args.roots]
    with tempfile.TemporaryDirectory() as work:
        times = measure(roots, args.repeats, Path(work))
    results, markdown = report(times, roots, args)
    write_results("cli_startup", results, markdown)


if __name__ == "__main__":
    main()
