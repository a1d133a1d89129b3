"""The one command line: `detect-waste-cls {train,test,predict,prepare}`; train_*.py call it with another default model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.pseudo import PSEUDO_MODES

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample"
# The sample's images are 128 px on their longer side: upscaling them to a native 224+ px adds only compute.
SAMPLE_IMAGE_SIZE = 96


def add_training_arguments(parser: argparse.ArgumentParser, default_model: str, default_mode: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=None,
                      help="dataset root holding images_square/{train,test,pseudolabel}, or the images_square folder "
                           f"itself; in test mode any folder of class subfolders (default: the embedded sample, "
                           f"at {SAMPLE_IMAGE_SIZE} px unless --img-size is given)")
    data.add_argument("--out", type=Path, default=None,
                      help="run folder to create; must be new or empty (default: runs/<model>-<timestamp>)")
    data.add_argument("--img-size", type=int, default=None, help="input size in px (default: the model's native size)")
    data.add_argument("--val-split", type=float, default=0.1,
                      help="share of train held out, per class, to pick the best checkpoint; 0 validates on test as "
                           "the original code did (default: 0.1; an images_square/val folder takes precedence)")
    data.add_argument("--weighted-sampler", "--weighted_sampler", action="store_true",
                      help="draw training images with inverse class frequency weights (works under DDP)")
    data.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="dataloader workers per rank")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--model", default=default_model, help=f"model name from the registry (default: {default_model})")
    model.add_argument("--pretrained", action="store_true", help="start from the library's ImageNet weights (downloads)")
    model.add_argument("--weights", type=Path, default=None, help="start from a local state dict or checkpoint")
    model.add_argument("--epochs", type=int, default=20)
    model.add_argument("-b", "--batch-size", type=int, default=16)
    model.add_argument("--lr", type=float, default=1e-4)
    model.add_argument("--decay", type=float, default=0.99, help="learning-rate factor per epoch (exponential schedule)")
    model.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    model.add_argument("--scheduler", choices=("exponential", "cosine", "none"), default="exponential")
    model.add_argument("--weight-decay", type=float, default=0.0)
    model.add_argument("--seed", type=int, default=42)

    pseudo = parser.add_argument_group("pseudo-labeling")
    pseudo.add_argument("--pseudo", "--pseudolabel_mode", choices=PSEUDO_MODES, default="none",
                        help="relabel the pseudolabel split every epoch or every batch (default: none)")
    pseudo.add_argument("--pseudo-start", type=int, default=None,
                        help="first epoch that uses pseudo-labels (default: half of --epochs)")
    pseudo.add_argument("--pseudo-threshold", type=float, default=0.9,
                        help="only pseudo-labels at least this confident enter the loss; 0 uses all (default: 0.9)")
    pseudo.add_argument("--pseudo-weight", type=float, default=1.0, help="weight of the pseudo-label loss term")
    pseudo.add_argument("--pseudo-rampup", type=float, default=5.0,
                        help="epochs over which that weight rises linearly from 0 after --pseudo-start")
    pseudo.add_argument("--pseudo-ratio", type=float, default=1.0, help="pseudolabel images per labeled image in a step")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--gpus", type=int, default=None, help="0 = CPU, N > 1 = DDP on N GPUs")
    hardware.add_argument("--accelerator", default="auto", help="Lightning accelerator when --gpus is not given")
    hardware.add_argument("--devices", default="1", help="Lightning devices when --gpus is not given (>1 = DDP)")
    hardware.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 16-mixed, bf16-mixed")

    run = parser.add_argument_group("run")
    run.add_argument("--mode", choices=("train", "test"), default=default_mode)
    run.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to score in test mode")
    run.add_argument("--resume", type=Path, default=None, help="continue training from this checkpoint (e.g. last.ckpt)")
    run.add_argument("--logger", nargs="+", default=["csv"], choices=("csv", "tensorboard", "wandb", "mlflow"))
    run.add_argument("--neptune", action="store_true",
                     help="also log to Neptune (NEPTUNE_API_TOKEN from the environment; offline without one)")
    run.add_argument("--neptune-project", default=None, help="Neptune project (default: $NEPTUNE_PROJECT)")
    run.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True)
    split = tasks.add_parser("split", help="class folders -> images_square/{train,test,pseudolabel} + manifest.csv")
    split.add_argument("--src", type=Path, required=True, help="folder with one subfolder of images per class")
    split.add_argument("--dst", type=Path, required=True)
    split.add_argument("--test", type=float, default=0.2)
    split.add_argument("--pseudo", type=float, default=0.6)
    split.add_argument("--val", type=float, default=0.0)
    split.add_argument("--keep-pseudo-labels", action="store_true", help="keep class subfolders in pseudolabel/")
    split.add_argument("--square", action="store_true", help="pad images to squares")
    split.add_argument("--size", type=int, default=None, help="resize to this many px (longer side)")
    mode = split.add_mutually_exclusive_group()
    mode.add_argument("--link", action="store_true", help="symlink instead of copying")
    mode.add_argument("--copy", dest="link", action="store_false", help="copy files (default)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--overwrite", action="store_true")

    crop = tasks.add_parser("crop", help="COCO bounding boxes -> class-folder crops")
    crop.add_argument("--annotations", type=Path, required=True, help="COCO detection json")
    crop.add_argument("--images", type=Path, required=True, help="folder the json's file_name entries are relative to")
    crop.add_argument("--dst", type=Path, required=True)
    crop.add_argument("--square", action="store_true", help="grow boxes to squares before cropping")
    crop.add_argument("--zoom", type=float, default=1.0, help="scale boxes about their centre (context)")
    crop.add_argument("--mapping", default="detectwaste", help="detectwaste, none, or a JSON file {category: class}")
    crop.add_argument("--split", choices=("train", "test", "pseudolabel"), default="train")
    crop.add_argument("--overwrite", action="store_true")


def build_parser(default_model: str = "efficientnet-b0") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-waste-cls", description="Waste-image classification with pseudo-labeling.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_training_arguments(commands.add_parser("train", help="train, then score the best checkpoint on test"),
                           default_model, "train")
    add_training_arguments(commands.add_parser("test", help="score a checkpoint on a folder of class subfolders"),
                           default_model, "test")
    predict = commands.add_parser("predict", help="top-5 predictions for a folder of images")
    predict.add_argument("--checkpoint", type=Path, required=True)
    predict.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    predict.add_argument("--out", type=Path, required=True, help="CSV file to write (must not exist)")
    predict.add_argument("-b", "--batch-size", type=int, default=64)
    add_prepare_arguments(commands.add_parser("prepare", help="build an images_square tree"))
    return parser


def run_test_mode(args: argparse.Namespace) -> None:
    from detect_waste_cls.evaluate import evaluate_folder, format_report
    from detect_waste_cls.train import create_run_dir

    if args.checkpoint is None:
        raise UserInputError("--mode test needs --checkpoint CKPT")
    out = create_run_dir(args.out, "test")
    metrics = evaluate_folder(args.checkpoint, args.data, out, batch_size=4 * args.batch_size, num_workers=args.num_workers)
    print(f"{format_report(metrics)}\nresults in {out}")


def run_prepare(args: argparse.Namespace) -> None:
    from detect_waste_cls.data import prepare

    if args.task == "split":
        manifest = prepare.split_dataset(
            args.src, args.dst, test=args.test, pseudo=args.pseudo, val=args.val,
            keep_pseudo_labels=args.keep_pseudo_labels, square=args.square, size=args.size,
            link=args.link, seed=args.seed, overwrite=args.overwrite,
        )
        print(manifest.groupby(["split", "class"]).size().unstack(fill_value=0).to_string())
    else:
        report = prepare.crop_coco(
            args.annotations, args.images, args.dst, square=args.square, zoom=args.zoom,
            mapping=args.mapping, split=args.split, overwrite=args.overwrite,
        )
        print(report.summary())


def use_sample_data(args: argparse.Namespace) -> None:
    """No --data: the embedded sample, at a size that suits its small images, said out loud."""
    args.data = SAMPLE_DATA
    if args.img_size is None:
        args.img_size = SAMPLE_IMAGE_SIZE
    print(f"no --data given: training on the embedded sample {SAMPLE_DATA} at {args.img_size} px "
          f"(pass --data DIR for your own images)")


def dispatch(args: argparse.Namespace) -> None:
    if getattr(args, "data", "") is None:
        use_sample_data(args)
    if args.command == "prepare":
        run_prepare(args)
    elif args.command == "predict":
        from detect_waste_cls.predict import predict_folder

        print(f"wrote {predict_folder(args.checkpoint, args.images, args.out, batch_size=args.batch_size)}")
    elif args.mode == "test":
        run_test_mode(args)
    else:
        from detect_waste_cls.train import run_training

        run_training(args)


def configure_logging() -> None:
    """Our own messages on stderr; Lightning's loggers keep the handlers they set up themselves."""
    package_log = logging.getLogger("detect_waste_cls")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None, default_model: str = "efficientnet-b0") -> int:
    configure_logging()
    args = build_parser(default_model).parse_args(argv)
    try:
        dispatch(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main_script(default_model: str) -> int:
    """Entry for train_effnet.py / train_resnet.py: the `train` command (with --mode) without naming it."""
    return main(["train", *sys.argv[1:]], default_model=default_model)


if __name__ == "__main__":
    sys.exit(main())
