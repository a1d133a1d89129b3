"""Simulated annotator: which images to label next, measured on TrashNet with the folder labels as the person.

    python -m experiments.select_study --trees TREE0 TREE1 TREE2 --out experiments/results/select_study-5pct-224

Each TREE is a `prepare split --keep-pseudo-labels` tree whose --seed is the study seed (its own 5%
labeled draw). For each seed and strategy, `budget` images of the pseudolabel split are picked from
the model trained on the labeled split (as `detect-waste-cls select` picks them), their folder
labels are added, and the model is retrained with the converged probe (`--finetune linear`: the
same features, the same validation carve-out, the same fit as models/probe.py), then tested.

The frozen lite0 ImageNet features of every image (224 px, image and mirror) do not depend on the
seed or the labels, so they are extracted once and cached in OUT/features.safetensors; every row
is then a probe fit. Fine-tuned retraining (LP-FT) of the picks is a separate, slower step:

    python -m experiments.select_study --trees TREE --materialize OUT/picks/STRATEGY-100-seedS.csv --out NEW_TREE
    python train_effnet.py --data NEW_TREE --seed S ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from detect_waste_cls.config import DataConfig, ModelConfig
from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.datamodule import stratified_split
from detect_waste_cls.data.datasets import ImageDataset
from detect_waste_cls.data.images import resolve_images_square, scan_labeled_folder, scan_pseudolabel_folder
from detect_waste_cls.labeling.strategies import STRATEGIES, Pool, pick
from detect_waste_cls.models.classifier import LitterClassifier
from detect_waste_cls.models.probe import fit_probe

BUDGETS = (100, 300)
MODEL = "efficientnet-lite0"


def view_features(model: LitterClassifier, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for each image and for its mirror image, separately (the pick's probabilities average the
    two softmaxes, as `select` does; the probe's features average the two inputs, as the probe does)."""
    captured = []
    hook = model.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float()))
    loader = DataLoader(ImageDataset(paths, {keys.IMAGE: model.eval_view()}), batch_size=64, num_workers=2)
    plain, mirrored = [], []
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            model(batch[keys.IMAGE])
            model(batch[keys.IMAGE].flip(dims=[3]))
            mirrored.append(captured.pop())
            plain.append(captured.pop())
    hook.remove()
    return torch.cat(plain), torch.cat(mirrored)


def cached_features(trees: list[Path], out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{file name: (plain, mirrored) features} of every image of the trees (the same images in every tree)."""
    cache = out / "features.safetensors"
    if cache.is_file():
        stored = load_file(cache)
        names = json.loads((out / "features-names.json").read_text())
        return {name: (stored["plain"][i], stored["mirrored"][i]) for i, name in enumerate(names)}
    root = resolve_images_square(trees[0])
    paths = sorted(root.rglob("*.jpg"), key=lambda p: p.name)
    model = LitterClassifier(classes=["unused"] * 2, image_size=224,
                             model=ModelConfig(name=MODEL, pretrained=True))
    plain, mirrored = view_features(model, paths)
    save_file({"plain": plain.contiguous(), "mirrored": mirrored.contiguous()}, cache)
    (out / "features-names.json").write_text(json.dumps([p.name for p in paths]))
    return {p.name: (plain[i], mirrored[i]) for i, p in enumerate(paths)}


class Split:
    """Features and folder labels of a list of images, looked up by file name."""

    def __init__(self, features: dict, paths: list[Path], targets: list[int]):
        self.paths, self.targets = list(paths), torch.as_tensor(targets)
        self.plain = torch.stack([features[p.name][0] for p in paths])
        self.mirrored = torch.stack([features[p.name][1] for p in paths])

    @property
    def mean(self) -> torch.Tensor:
        return (self.plain + self.mirrored) / 2


def train_probe(labeled_features: torch.Tensor, labeled_targets: torch.Tensor, classes: int, seed: int):
    """What `--finetune linear` fits: the training images less the 10% validation carve-out (as DatasetLayout
    carves it), C chosen on validation or by k-fold."""
    kept, carved = stratified_split(labeled_targets.tolist(), DataConfig().val_split, seed)
    return fit_probe(labeled_features[kept], labeled_targets[kept], labeled_features[carved],
                     labeled_targets[carved], num_classes=classes, seed=seed)


def probabilities(probe, split: Split) -> torch.Tensor:
    """Mean of the softmaxes of the image and its mirror image, as `select` and the teachers compute them."""
    def softmax(x):
        return (x @ probe.weight.T + probe.bias).softmax(dim=1)
    return (softmax(split.plain) + softmax(split.mirrored)) / 2


def accuracy(probe, test: Split) -> float:
    return float((probabilities(probe, test).argmax(dim=1) == test.targets).float().mean())


def run_seed(tree: Path, seed: int, features: dict, picks_dir: Path) -> list[dict]:
    root = resolve_images_square(tree)
    train = scan_labeled_folder(root / "train")
    classes = train.classes
    test_images = scan_labeled_folder(root / "test", classes)
    pool_images = scan_pseudolabel_folder(root / "pseudolabel", classes)
    labeled, test = Split(features, train.paths, train.targets), Split(features, test_images.paths, test_images.targets)
    unlabeled = Split(features, pool_images.paths, pool_images.folder_targets)
    start = train_probe(labeled.mean, labeled.targets, len(classes), seed)
    rows = [{"seed": seed, "strategy": "start", "added": 0, "labels": len(labeled.paths),
             "ACC": accuracy(start, test)}]
    pool = Pool(probabilities(start, unlabeled).numpy(), unlabeled.mean.numpy(), labeled.mean.numpy())
    for strategy in STRATEGIES:
        for budget in BUDGETS:
            picks = pick(strategy, pool, budget, seed)
            chosen = torch.as_tensor(picks.order)
            features_ = torch.cat([labeled.mean, unlabeled.mean[chosen]])
            targets = torch.cat([labeled.targets, unlabeled.targets[chosen]])
            probe = train_probe(features_, targets, len(classes), seed)
            picked_classes = np.bincount(unlabeled.targets[chosen].numpy(), minlength=len(classes))
            rows.append({"seed": seed, "strategy": strategy, "added": budget, "labels": len(targets),
                         "ACC": accuracy(probe, test), "classes picked": " ".join(map(str, picked_classes))})
            pd.DataFrame({"path": [str(unlabeled.paths[i].resolve()) for i in picks.order],
                          "class": [classes[t] for t in unlabeled.targets[chosen]]}).to_csv(
                picks_dir / f"{strategy}-{budget}-seed{seed}.csv", index=False)
        print(f"seed {seed} {strategy}: " + ", ".join(f"{r['added']}: {r['ACC']:.4f}" for r in rows[-len(BUDGETS):]),
              flush=True)
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std per strategy and budget, and the paired difference from random."""
    random = table[table.strategy == "random"].set_index(["added", "seed"]).ACC
    lines = []
    for (strategy, added), group in table[table.added > 0].groupby(["strategy", "added"], sort=False):
        delta = group.set_index("seed").ACC - random[added]
        lines.append({"strategy": strategy, "added": added, "ACC": f"{group.ACC.mean():.4f} ± {group.ACC.std():.4f}",
                      "Δ vs random": f"{delta.mean():+.4f} ± {delta.std():.4f}",
                      "better than random on": f"{int((delta > 0).sum())} of {len(delta)} seeds",
                      "per seed Δ": " ".join(f"{d:+.3f}" for d in delta)})
    return pd.DataFrame(lines)


def plot(table: pd.DataFrame, out_png: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    ax = figure.subplots()
    start = table[table.strategy == "start"]
    for strategy in STRATEGIES:
        rows = pd.concat([start.assign(strategy=strategy), table[table.strategy == strategy]])
        curve = rows.groupby("added").agg(labels=("labels", "mean"), mean=("ACC", "mean"), std=("ACC", "std"))
        ax.errorbar(curve["labels"], 100 * curve["mean"], yerr=100 * curve["std"], marker="o", capsize=3,
                    label=strategy)
    ax.set(xlabel="labeled images (start: 5% of TrashNet)", ylabel="test accuracy (%)",
           title="converged probe on lite0 features, 224 px; mean ± std over seeds")
    ax.legend()
    figure.savefig(out_png, dpi=110, bbox_inches="tight")
    return out_png


def materialize(tree: Path, picks_csv: Path, out: Path) -> Path:
    """A tree for `train_effnet.py --data OUT`: the tree's train and test splits plus the picks, each in its
    folder-label class, as symbolic links (nothing is copied; the pseudolabel split is left out)."""
    root = resolve_images_square(tree)
    for split in ("train", "test"):
        for image in (root / split).glob("*/*"):
            link = out / "images_square" / split / image.parent.name / image.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image.resolve())
    for path, label in pd.read_csv(picks_csv)[["path", "class"]].itertuples(index=False):
        link = out / "images_square" / "train" / label / Path(path).name
        link.symlink_to(Path(path))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=Path, nargs="+", required=True, help="one tree per seed, in seed order")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0, 1, ... one per tree")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--materialize", metavar="PICKS_CSV", type=Path,
                        help="instead of the study: write --out as a tree of the first --trees tree plus these picks")
    args = parser.parse_args(argv)
    if args.materialize:
        print(f"wrote {materialize(args.trees[0], args.materialize, args.out)}")
        return 0
    seeds = args.seeds or list(range(len(args.trees)))
    (args.out / "picks").mkdir(parents=True, exist_ok=True)
    if (args.out / "table.csv").is_file():  # done before: only the summary, the table and the plot again
        table = pd.read_csv(args.out / "table.csv")
    else:
        features = cached_features(args.trees, args.out)
        table = pd.DataFrame([row for tree, seed in zip(args.trees, seeds)
                              for row in run_seed(tree, seed, features, args.out / "picks")])
        table.to_csv(args.out / "table.csv", index=False)
    summary = summarize(table)
    start = table[table.strategy == "start"].ACC
    (args.out / "table.md").write_text(
        f"# Simulated annotator, converged probe retrained\n\nstart ({int(table.labels[0])} labels): "
        f"{start.mean():.4f} ± {start.std():.4f}\n\n{summary.to_markdown(index=False)}\n\n## Every run\n\n"
        f"{table.to_markdown(index=False)}\n")
    plot(table, args.out / "accuracy-vs-labels.png")
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
