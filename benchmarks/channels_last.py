"""Channels-last against the default (contiguous) layout: seconds per training step and per inference batch.

    python benchmarks/channels_last.py [--models efficientnet-lite0 resnet50 simple-cnn] [--img-size 224] [-b 16]

`--channels-last` is on by default on every device because of what this prints: the same network,
batch and weights in both layouts, timed in alternating rounds after one warm-up step each, so
both sides see the same machine state. A ratio above 1 means channels-last is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import synchronize, write_results  # noqa: E402

from detect_waste_cls.models.backbones import create_backbone  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def seconds(model: torch.nn.Module, images: torch.Tensor, *, train: bool, repeats: int) -> float:
    def step() -> None:
        if train:
            model(images).sum().backward()
        else:
            with torch.inference_mode():
                model(images)

    step()  # warm-up: first-call allocations and kernel choices
    synchronize(images.device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(images.device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "resnet50", "simple-cnn"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, results = [], {}
    for name in args.models:
        model = create_backbone(name, 6, pretrained=False).to(device).train()
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        times = {(layout, train): [] for layout in LAYOUTS for train in (True, False)}
        for _ in range(args.rounds):
            for layout, memory_format in LAYOUTS.items():
                model = model.to(memory_format=memory_format)
                batch = images.contiguous(memory_format=memory_format)
                for train in (True, False):
                    times[layout, train].append(seconds(model, batch, train=train, repeats=args.repeats))
        median = {key: statistics.median(value) for key, value in times.items()}
        results[name] = {f"{layout}_{'train' if train else 'inference'}_s": value for (layout, train), value in median.items()}
        for train, label in ((True, "train step"), (False, "inference")):
            ratio = median["contiguous", train] / median["channels_last", train]
            results[name][f"{'train' if train else 'inference'}_speedup"] = ratio
            rows.append(f"| {name} | {label} | {median['contiguous', train]:.3f} | {median['channels_last', train]:.3f} "
                        f"| **{ratio:.2f}x** |")
    table = "\n".join([
        f"Batch {args.batch_size} at {args.img_size} px, random weights, {args.rounds} alternating rounds of "
        f"{args.repeats} timed calls; median seconds per call.",
        "",
        "| model | call | contiguous (s) | channels-last (s) | speed-up |",
        "|---|---|---|---|---|",
        *rows,
    ])
    write_results("channels_last", {"args": vars(args), "models": results}, table)


if __name__ == "__main__":
    main()
