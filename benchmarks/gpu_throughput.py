"""GPU training and inference images/s: fp32 against bf16-mixed + channels_last, synthetic data against the real loader.

    python benchmarks/gpu_throughput.py --data TREE [--models resnet50 efficientnet-b0 efficientnet-b2 efficientnet-lite0]
                                        [--img-size 224] [-b 256] [--steps 30]

TREE: an images_square tree (TrashNet: `detect-waste-cls prepare split --src ../shared/data/trashnet
--dst TREE --test 0.2 --size 512`). For each model: training steps (forward, cross-entropy,
backward, SGD step) on one synthetic batch kept on the GPU, in fp32 and in bf16 autocast with
channels_last (the defaults `train` picks on such a GPU); the same bf16 step fed by the project's
own training loader (WasteDataModule, pinned memory, persistent workers, reduced-size JPEG decoding);
and inference under inference_mode. Targets: the real loader keeps >= 80% of the synthetic rate,
and ResNet-50 bf16 training at 224 px reaches 2,500 img/s on one H100/H200.
`--device cpu` runs the same code on the CPU (a smoke test with small settings, not a benchmark).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import synchronize, write_results  # noqa: E402

from detect_waste_cls.config import DataConfig  # noqa: E402
from detect_waste_cls.data import batch as keys  # noqa: E402
from detect_waste_cls.data.datamodule import WasteDataModule  # noqa: E402
from detect_waste_cls.models.backbones import create_backbone, get_backbone  # noqa: E402

LOADER_TARGET, RESNET50_TARGET = 0.8, 2500
WARMUP_STEPS = 5


def build(name: str, classes: int, device: torch.device, fast: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = create_backbone(name, classes, pretrained=False).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def autocast(device: torch.device, fast: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if fast else nullcontext()


def train_rate(model, optimizer, batches, device: torch.device, fast: bool, steps: int, batch_size: int) -> float:
    """Images/s over `steps` training steps after the warm-up ones; `batches` yields (images, targets)."""
    model.train()
    for step, (images, targets) in enumerate(batches):
        if step == WARMUP_STEPS:
            synchronize(device)
            start = time.perf_counter()
        if step == WARMUP_STEPS + steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, fast):
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def inference_rate(model, images: torch.Tensor, device: torch.device, fast: bool, steps: int) -> float:
    model.eval()
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device, fast):
            model(images)
    synchronize(device)
    return steps * len(images) / (time.perf_counter() - start)


def repeat(batch, times: int):
    for _ in range(times):
        yield batch


def loader_batches(loader):
    while True:
        for batch in loader:
            labeled = batch[keys.LABELED] if keys.LABELED in batch else batch
            yield labeled[keys.IMAGE], labeled[keys.TARGET]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet-b0", "efficientnet-b2", "efficientnet-lite0"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU here: this benchmark measures GPU throughput (--device cpu only smoke-tests the script)")
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        entry = get_backbone(name)
        data = WasteDataModule(DataConfig(root=str(args.data), image_size=args.img_size, batch_size=args.batch_size,
                                          num_workers=args.num_workers), normalization=entry.normalization,
                               interpolation=entry.interpolation)
        classes = len(data.classes)
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        targets = torch.randint(0, classes, (args.batch_size,), device=device)
        row = {"model": name}
        for fast in (False, True):
            model, optimizer = build(name, classes, device, fast)
            fast_images = images.contiguous(memory_format=torch.channels_last) if fast else images
            label = "bf16_channels_last" if fast else "fp32"
            row[f"train_synthetic_{label}"] = train_rate(model, optimizer, repeat((fast_images, targets), 10**9),
                                                         device, fast, args.steps, args.batch_size)
            row[f"inference_{label}"] = inference_rate(model, fast_images, device, fast, args.steps)
            if fast:
                loader = data.train_dataloader()[keys.LABELED]
                row["train_real_loader_bf16_channels_last"] = train_rate(
                    model, optimizer, loader_batches(loader), device, fast, args.steps, args.batch_size)
            del model, optimizer
        row["loader_share"] = row["train_real_loader_bf16_channels_last"] / row["train_synthetic_bf16_channels_last"]
        row["bf16_speedup"] = row["train_synthetic_bf16_channels_last"] / row["train_synthetic_fp32"]
        rows.append({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
        print(rows[-1], flush=True)

    table = "\n".join(
        f"| {r['model']} | {r['train_synthetic_fp32']:.0f} | {r['train_synthetic_bf16_channels_last']:.0f} | "
        f"{r['bf16_speedup']:.2f}x | {r['train_real_loader_bf16_channels_last']:.0f} | **{r['loader_share']:.0%}** | "
        f"{r['inference_fp32']:.0f} | {r['inference_bf16_channels_last']:.0f} |" for r in rows
    )
    markdown = f"""
`python benchmarks/gpu_throughput.py --data {args.data} --img-size {args.img_size} -b {args.batch_size} --steps {args.steps} --num-workers {args.num_workers}`

Images/s at {args.img_size} px, batch {args.batch_size}, {args.steps} timed steps after {WARMUP_STEPS} warm-up steps, on {device}
({args.num_workers} loader workers). Targets: the real loader keeps >= {LOADER_TARGET:.0%} of the synthetic rate;
ResNet-50 bf16 training >= {RESNET50_TARGET} img/s on one H100/H200.

| model | train fp32 | train bf16 + channels_last | bf16 speed-up | train bf16, real loader | real / synthetic | inference fp32 | inference bf16 |
|---|---|---|---|---|---|---|---|
{table}
"""
    if device.type != "cuda":  # a smoke test: nothing to commit
        print(markdown)
        return
    write_results("gpu_throughput", {"img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
                                     "num_workers": args.num_workers, "rows": rows,
                                     "targets": {"loader_share": LOADER_TARGET, "resnet50_bf16_train": RESNET50_TARGET}},
                  markdown)


if __name__ == "__main__":
    main()
