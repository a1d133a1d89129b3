"""What Lightning and our LitterClassifier add to a training step, against a plain PyTorch loop.

    python benchmarks/step_overhead.py [--model efficientnet-lite0] [--img-size 112] [-b 32] [--steps 20] [--rounds 3]

Same model, same batch (one fixed batch of random images, reused every step, so no data loading
is measured), same optimizer (Adam over the head and backbone groups, the LambdaLR schedule).
ours: `Trainer.fit` of a LitterClassifier (metrics, logging, the fine-tuning hooks, the
CSV logger writing every step as in a real run); plain: forward, cross-entropy, backward, step.
The first steps of each round warm up and are not timed; rounds alternate. Target: <= 5% overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402

from detect_waste_cls.config import ModelConfig, OptimConfig  # noqa: E402
from detect_waste_cls.data import batch as keys  # noqa: E402
from detect_waste_cls.models.classifier import LitterClassifier  # noqa: E402

warnings.filterwarnings("ignore")
TARGET = 0.05
WARMUP_STEPS = 3


def make_model(args) -> LitterClassifier:
    torch.manual_seed(0)
    return LitterClassifier(classes=[f"class{i}" for i in range(6)], image_size=args.img_size,
                            model=ModelConfig(name=args.model, pretrained=False),
                            optim=OptimConfig(epochs=1, finetune="full"))


class FixedBatch(Dataset):
    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return self.batch


class StepTimer(pl.Callback):
    """Wall time from the start of the first timed step to the end of the last one."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning_seconds(args, batch: dict, log_dir: Path) -> float:
    model, timer = make_model(args), StepTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=CSVLogger(log_dir), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    same_batch = DataLoader(FixedBatch(batch, WARMUP_STEPS + args.steps), batch_size=None)  # no workers, no collation
    trainer.fit(model, train_dataloaders={keys.LABELED: same_batch})
    return timer.end - timer.start


def plain_seconds(args, batch: dict) -> float:
    model = make_model(args)
    optimizer = model.configure_optimizers()["optimizer"]
    network, images, targets = model.model.train(), batch[keys.IMAGE], batch[keys.TARGET]
    for step in range(WARMUP_STEPS + args.steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loss = F.cross_entropy(network(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    batch = {keys.IMAGE: torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator),
             keys.TARGET: torch.randint(0, 6, (args.batch_size,), generator=generator),
             keys.INDEX: torch.arange(args.batch_size)}
    times = {"plain": [], "ours": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_number in range(args.rounds):
            times["plain"].append(plain_seconds(args, batch))
            times["ours"].append(lightning_seconds(args, batch, Path(log_dir) / str(round_number)))
            print({name: round(values[-1], 3) for name, values in times.items()}, flush=True)
    plain, ours = (statistics.median(times[name]) for name in ("plain", "ours"))
    overhead = ours / plain - 1
    results = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
               "threads": torch.get_num_threads(), "plain_s_per_step": round(plain / args.steps, 4),
               "ours_s_per_step": round(ours / args.steps, 4), "overhead": round(overhead, 4), "target": TARGET,
               "rounds": {name: [round(value, 3) for value in values] for name, values in times.items()}}
    markdown = f"""
`python benchmarks/step_overhead.py --model {args.model} --img-size {args.img_size} -b {args.batch_size} --steps {args.steps} --rounds {args.rounds}`

{args.model} at {args.img_size} px, batch {args.batch_size}, CPU ({torch.get_num_threads()} threads), {args.steps} timed
steps after {WARMUP_STEPS} warm-up steps, median of {args.rounds} alternating rounds.

| loop | s / step |
|---|---|
| plain PyTorch | {plain / args.steps:.4f} |
| Lightning + LitterClassifier | {ours / args.steps:.4f} |

Overhead: **{overhead:+.1%}** (target <= {TARGET:.0%}).
"""
    write_results("step_overhead", results, markdown)


if __name__ == "__main__":
    main()
