"""The one command line, `detect-waste-cls <command>` (train, test, predict, export, app, prepare, select,
label-studio, evaluate-boxes); train_*.py call it with another default model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from detect_waste_cls.config import (BOX_CATEGORY_SOURCES, BOX_SCORES, DEFAULT_MODEL, REVIEW_BOXES, SEEDS,
                                     ModelConfig, Range, TrainConfig, above, at_least, field_doc, field_type, merge,
                                     read_config_file)
from detect_waste_cls.errors import UserInputError

PORTS = Range(1, 65535)


def number(kind: type, allowed: Range):
    """An argparse type for the flags outside TrainConfig: a number in `allowed`, else argparse's one-line error
    naming the flag, before any work."""
    def parse(text: str):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value"
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_training_arguments(parser: argparse.ArgumentParser, default_model: str, default_mode: str) -> None:
    """One flag per TrainConfig field, named, typed and explained by the field itself.

    Defaults stay in the dataclasses: a flag not typed is absent from the parsed namespace, so
    --config FILE can fill it and the dataclass default applies last.
    """
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON or YAML file of {section: {field: value}}, e.g. a run's config.json; "
                             "flags given on the command line override it")
    defaults = TrainConfig(model=ModelConfig(name=default_model))
    for section_name, section in defaults.sections().items():
        group = parser.add_argument_group(section_name)
        for item in dataclasses.fields(section):
            meta, kind = item.metadata, field_type(type(section), item.name)
            options = {"dest": f"{section_name}.{item.name}", "default": argparse.SUPPRESS,
                       "help": field_help(item, getattr(section, item.name)).replace("%", "%%")}  # argparse formats %
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options.update(type=str if kind is tuple else kind, choices=meta["choices"], nargs=meta["nargs"])
                options["metavar"] = item.name.upper() if meta["choices"] is None else None
            group.add_argument(*meta["flags"], **options)
    run = parser.add_argument_group("test mode")
    run.add_argument("--mode", choices=("train", "test"), default=default_mode,
                     help="test: score --checkpoint on --data, a folder of class subfolders, instead of training "
                          "(detect-waste-cls test is train --mode test)")
    run.add_argument("--checkpoint", type=Path, default=None,
                     help="the checkpoint or exported model folder to score in test mode")


def field_help(item: dataclasses.Field, default) -> str:
    """The field's help, then the range it must be in and its default."""
    meaning, shown = field_doc(item, default)
    notes = [f"must be {item.metadata['allowed']}"] if item.metadata["allowed"] else []
    notes += [f"default: {shown}"] if shown is not None else []
    return f"{meaning} ({'; '.join(notes)})" if notes else meaning


def config_from_args(args: argparse.Namespace, default_model: str) -> TrainConfig:
    """Dataclass defaults, then --config FILE, then the flags typed: the one conversion from the command line."""
    typed: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            typed.setdefault(section, {})[name] = value
    from_file = read_config_file(args.config) if args.config else {}
    values = merge({"model": {"name": default_model}}, from_file, typed)
    return TrainConfig.from_dict(values, str(args.config or "command line"))


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True)
    split = tasks.add_parser("split", help="class folders -> images_square/{train,test,pseudolabel} + manifest.csv")
    split.add_argument("--src", type=Path, required=True, help="folder with one subfolder of images per class "
                                                               "(only read)")
    split.add_argument("--dst", type=Path, required=True,
                       help="dataset folder to write: DST/images_square/<split>/ and DST/manifest.csv, which lists "
                            "every file written")
    split.add_argument("--test", type=float, default=0.2, help="share of each class for test/ (default: %(default)s)")
    split.add_argument("--pseudo", type=float, default=0.6,
                       help="share of each class for pseudolabel/, the unlabeled images (default: %(default)s)")
    split.add_argument("--val", type=float, default=0.0,
                       help="share of each class for val/; with 0, training carves --val-split out of train/ "
                            "(default: %(default)s)")
    split.add_argument("--keep-pseudo-labels", action="store_true",
                       help="keep class subfolders in pseudolabel/ (default: one flat folder, labels dropped)")
    split.add_argument("--square", action="store_true", help="pad images with black to squares (default: off)")
    split.add_argument("--size", type=number(int, at_least(1)), default=None,
                       help="resize so the longer side is this many px (default: keep the size)")
    mode = split.add_mutually_exclusive_group()
    mode.add_argument("--link", action="store_true", help="symlink to the sources instead of copying (default: copy)")
    mode.add_argument("--copy", dest="link", action="store_false", help="copy files (default)")
    split.add_argument("--seed", type=number(int, SEEDS), default=0,
                       help="seed of the shuffle: the same seed gives the same split (default: %(default)s)")
    split.add_argument("--overwrite", action="store_true",
                       help="replace an earlier split in DST: removes only the files DST/manifest.csv lists, and stops "
                            "before removing any if DST/images_square holds anything else (default: off, an existing "
                            "DST/images_square is refused)")

    split.add_argument("--mapping", type=Path, default=None,
                       help="JSON file {class folder: class, or null to leave it out} that merges or drops class "
                            "folders; it lists every class folder (default: none, each folder is a class)")

    crop = tasks.add_parser("crop", help="bounding boxes (COCO, COCO results, corner CSV, YOLO) -> class-folder crops")
    crop.add_argument("--boxes", "--annotations", dest="boxes", type=Path, required=True,
                      help="COCO annotations or results .json, a corner .csv (image_name,x_min,y_min,x_max,y_max,"
                           "class_name) or a folder of YOLO .txt files (docs/boxes.md)")
    crop.add_argument("--images", type=Path, required=True, help="folder the box file's image names are relative to")
    crop.add_argument("--image-list", type=Path, default=None,
                      help="for COCO results: the annotations file or CSV of image_id,file_name their ids refer to "
                           "(default: none)")
    crop.add_argument("--names", type=Path, default=None,
                      help="for YOLO: data.yaml or a text file of class names (default: none)")
    crop.add_argument("--dst", type=Path, required=True,
                      help="dataset folder to write: DST/images_square/SPLIT/<class>/ and DST/manifest-crop-SPLIT.csv, "
                           "which lists every crop written")
    crop.add_argument("--square", action="store_true", help="grow boxes to squares before cropping (default: off)")
    crop.add_argument("--zoom", type=number(float, above(0)), default=1.0,
                      help="scale boxes about their centre, e.g. 1.2 for some context (default: %(default)s)")
    crop.add_argument("--mapping", default="detectwaste",
                      help="detectwaste (TACO categories -> the seven detect-waste classes), none (category names "
                           "are the classes), or a JSON file {category: class, or null to drop it}; categories it "
                           "does not list are skipped and counted (default: %(default)s)")
    crop.add_argument("--split", choices=("train", "test", "pseudolabel"), default="train",
                      help="the folder of images_square the crops go to (default: %(default)s)")
    crop.add_argument("--test", type=number(float, Range(0, 1, high_open=True)), default=0.0,
                      help="share of the photos whose crops go to test/ instead, chosen by --seed; a photo's boxes "
                           "never straddle two splits (default: %(default)s)")
    crop.add_argument("--seed", type=number(int, SEEDS), default=0,
                      help="seed of the photo split and of the background crops (default: %(default)s)")
    crop.add_argument("--keep-pseudo-labels", action="store_true",
                      help="keep class subfolders in pseudolabel/ (default: one flat folder, labels dropped)")
    crop.add_argument("--background", type=number(int, at_least(0)), default=0,
                      help="also cut up to this many crops per photo from regions that overlap no box (IoU < 0.1), "
                           "sized like the boxes, into the class `background` that predict --boxes drops "
                           "(default: %(default)s)")
    crop.add_argument("--overwrite", action="store_true",
                      help="replace an earlier crop into DST/images_square/SPLIT: removes only the files "
                           "DST/manifest-crop-SPLIT.csv lists, and stops before removing any if the folder holds "
                           "anything else (default: off, an existing folder is refused)")


def add_box_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--boxes", type=Path, help="classify these boxes: COCO annotations or results .json, a corner "
                                                  "CSV (image_name,x_min,y_min,x_max,y_max[,class_name][,score]) "
                                                  "or a folder of YOLO .txt")
    group.add_argument("--image-list", type=Path, help="for COCO results: the annotations file (or a CSV of "
                                                       "image_id,file_name) their image ids refer to")
    group.add_argument("--names", type=Path, help="for YOLO: data.yaml or a text file of class names")
    group.add_argument("--score", choices=BOX_SCORES, default="classifier",
                       help="each result's score: the classifier's confidence, the detector's score, or their "
                            "product (default: classifier)")
    group.add_argument("--min-score", type=float, help="leave out boxes the detector scored below this")
    group.add_argument("--keep-background", action="store_true",
                       help="keep the boxes the model calls background (dropped by default)")
    group.add_argument("--categories", choices=BOX_CATEGORY_SOURCES, default="boxes",
                       help="category ids: the box file's categories of the same names, or the model's classes "
                            "numbered from 1 (default: boxes; model when the file has none)")
    group.add_argument("--square", action=argparse.BooleanOptionalAction, default=None,
                       help="crop geometry (default: what `prepare crop` recorded for the model's training data, "
                            "kept in its config.json)")
    group.add_argument("--zoom", type=number(float, above(0)), default=None,
                       help="crop geometry (default: as recorded, see --square)")
    group.add_argument("--num-workers", type=number(int, at_least(0)), default=0,
                       help="DataLoader workers decoding photos")
    group.add_argument("--relabel", metavar="CATEGORY",
                       help="on COCO annotations: classify only the boxes of this category (e.g. unknown, "
                            "'Unlabeled litter') and write --out as a new annotations file in which they have the "
                            "model's class; every other annotation stays as it was")
    group.add_argument("--review", type=number(int, at_least(0)), metavar="N",
                       help=f"with --relabel: cut the N least confident relabeled boxes into OUT-review/, a "
                            f"selection for `label-studio export` (default: {REVIEW_BOXES}; 0: none)")


def build_parser(default_model: str = DEFAULT_MODEL) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-waste-cls", description="Waste-image classification with pseudo-labeling.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_training_arguments(commands.add_parser("train", help="train, then score the final checkpoint "
                                                                   "(--final-checkpoint) on test"),
                           default_model, "train")
    add_training_arguments(commands.add_parser("test", help="score a checkpoint on a folder of class subfolders"),
                           default_model, "test")
    predict = commands.add_parser("predict", help="top-5 predictions for a folder of images, or with --boxes a "
                                                  "class for every box of a detector's output")
    predict.add_argument("--checkpoint", type=Path, required=True,
                         help="a .ckpt file, an exported model folder or a run folder")
    predict.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    predict.add_argument("--out", type=Path, required=True,
                         help="CSV file to write (must not exist); with --boxes a COCO results .json (with --relabel, "
                              "annotations), a CSV beside it")
    predict.add_argument("-b", "--batch-size", type=number(int, at_least(1)), default=64)
    add_box_arguments(predict.add_argument_group("boxes (the second stage of a detector)"))
    export = commands.add_parser("export", help="a checkpoint as a Hugging Face-style folder (safetensors, card, ONNX)")
    export.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt file or a run folder")
    export.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder with huggingface_hub ($HF_TOKEN)")
    app = commands.add_parser("app", help="a Streamlit page on localhost: upload a photo, see the top-5 classes")
    app.add_argument("--model", type=Path, required=True,
                     help="an exported folder, a .ckpt file, or a folder of runs to choose from")
    app.add_argument("--port", type=number(int, PORTS), default=8501)
    add_prepare_arguments(commands.add_parser("prepare", help="build an images_square tree"))
    add_label_studio_arguments(commands.add_parser(
        "label-studio", help="selection -> Label Studio tasks, the model's guess pre-selected; JSON export -> train/"))
    add_select_arguments(commands.add_parser("select", help="rank the pseudolabel images worth labeling next"))
    evaluate = commands.add_parser("evaluate-boxes", help="COCO mAP and box-level accuracy of classified detections "
                                                          "against ground-truth boxes")
    evaluate.add_argument("--ground-truth", type=Path, required=True,
                          help="ground-truth boxes with classes: COCO annotations, a corner CSV or a YOLO folder")
    evaluate.add_argument("--detections", type=Path, required=True,
                          help="COCO results (e.g. from predict --boxes) with the ground truth's image and "
                               "category ids")
    evaluate.add_argument("--images", type=Path, help="the image folder (needed for a CSV or YOLO ground truth)")
    evaluate.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    return parser


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    from detect_waste_cls.labeling import STRATEGY_NAMES

    parser.add_argument("--model", type=Path, required=True, help="a run folder, a .ckpt file or an exported folder")
    parser.add_argument("--data", type=Path, required=True, help="dataset root with images_square/{train,pseudolabel}")
    parser.add_argument("--budget", type=number(int, at_least(1)), required=True, help="how many images to pick")
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, default="cluster-margin",
                        help="cluster-margin: the most uncertain image of each of --budget k-means clusters; "
                             "typiclust: one typical image per k-means cluster no labeled image is in; coreset: "
                             "k-center greedy; margin / entropy: the most uncertain; random (default: "
                             "cluster-margin, +4.2 points over random at 100 labels on TrashNet, "
                             "experiments/results/select_study-5pct-224)")
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--review-per-class", type=number(int, at_least(0)), default=0, metavar="K",
                        help="also list the K most confident pseudo-labels of each class, to accept or fix")
    parser.add_argument("--label-issues", action="store_true",
                        help="also list the training images cleanlab finds likely mislabeled")
    parser.add_argument("--seed", type=number(int, SEEDS), default=0)
    parser.add_argument("-b", "--batch-size", type=number(int, at_least(1)), default=64)


def add_label_studio_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True)
    export = tasks.add_parser("export", help="selection CSVs -> a project folder (label_config.xml, tasks.json, "
                                             "README.md)")
    export.add_argument("--data", type=Path, required=True, help="the dataset (DATA or DATA/images_square)")
    export.add_argument("--selection", type=Path, action="append", required=True,
                        help="a CSV from `detect-waste-cls select` (path,predicted,confidence,score,rank,source); "
                             "repeat for more")
    export.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    export.add_argument("--model-version", help="the predictions' model_version in Label Studio (default: "
                                                "detect-waste-cls)")
    export.add_argument("--title", help="project title (default: DATA's folder name and the task count)")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--project-dir", type=Path, required=True, help="the folder `label-studio export` wrote")
    server.add_argument("--token", help="a Personal Access Token or a Legacy Token (default: $LABEL_STUDIO_API_KEY)")
    push = tasks.add_parser("push", parents=[server], help="create the project, its image storage and its tasks "
                                                           "through Label Studio's API")
    push.add_argument("--url", default="http://localhost:8080")
    pull = tasks.add_parser("pull", parents=[server], help="download the pushed project's JSON export")
    pull.add_argument("--url", help="default: the URL it was pushed to")
    pull.add_argument("--out", type=Path, help="file to write (default: PROJECT_DIR/export-<time>.json)")
    imported = tasks.add_parser("import", help="Label Studio's JSON export -> labeled images into train/<class>/")
    imported.add_argument("--data", type=Path, required=True, help="the dataset the tasks were exported from")
    imported.add_argument("--export", type=Path, required=True, help="the JSON export (not JSON_MIN)")


def run_label_studio(args: argparse.Namespace) -> None:
    if args.task == "export":
        from detect_waste_cls.labeling.label_studio import export_project

        print(export_project(args.data, args.selection, args.out, model_version=args.model_version,
                             title=args.title).summary())
    elif args.task == "import":
        from detect_waste_cls.labeling.label_studio_import import import_annotations

        print(import_annotations(args.data, args.export).summary())
    elif args.task == "push":
        from detect_waste_cls.labeling.label_studio_api import push_project

        pushed = push_project(args.project_dir, args.url, args.token)
        print(f"created project {pushed.project_id} with {pushed.tasks} tasks: {pushed.page}")
    else:
        from detect_waste_cls.labeling.label_studio_api import pull_export

        print(f"wrote {pull_export(args.project_dir, args.token, url=args.url, out=args.out)}")


def run_test_mode(args: argparse.Namespace, config: TrainConfig) -> None:
    from detect_waste_cls.evaluate import evaluate_folder, format_report
    from detect_waste_cls.output_folder import new_output_folder
    from detect_waste_cls.resolve import SAMPLE_DATA
    from detect_waste_cls.run_folder import new_run_path

    if args.checkpoint is None:
        raise UserInputError("--mode test needs --checkpoint CKPT")
    out = Path(config.run.out) if config.run.out is not None else new_run_path("test")
    with new_output_folder(out) as folder:
        metrics = evaluate_folder(args.checkpoint, config.data.root or SAMPLE_DATA, folder,
                                  batch_size=4 * config.data.batch_size, num_workers=config.data.num_workers or 0)
    print(f"{format_report(metrics)}\nresults in {out}")


def run_prepare(args: argparse.Namespace) -> None:
    from detect_waste_cls.data import prepare

    if args.task == "split":
        manifest = prepare.split_dataset(
            args.src, args.dst, test=args.test, pseudo=args.pseudo, val=args.val,
            keep_pseudo_labels=args.keep_pseudo_labels, square=args.square, size=args.size,
            link=args.link, seed=args.seed, mapping=args.mapping, overwrite=args.overwrite,
        )
        print(manifest.groupby(["split", "class"]).size().unstack(fill_value=0).to_string())
    else:
        from detect_waste_cls.data.prepare_crops import crop_boxes

        report = crop_boxes(
            args.boxes, args.images, args.dst, image_list=args.image_list, names=args.names, square=args.square,
            zoom=args.zoom, mapping=args.mapping, split=args.split, test=args.test, seed=args.seed,
            keep_pseudo_labels=args.keep_pseudo_labels, background=args.background, overwrite=args.overwrite,
        )
        print(report.summary())


def dispatch(args: argparse.Namespace, default_model: str) -> None:
    if args.command == "prepare":
        run_prepare(args)
    elif args.command == "label-studio":
        run_label_studio(args)
    elif args.command == "predict" and args.boxes is not None:
        from detect_waste_cls.predict_boxes import predict_boxes

        report = predict_boxes(args.boxes, args.checkpoint, args.images, args.out, image_list=args.image_list,
                               names=args.names, score=args.score, min_score=args.min_score,
                               keep_background=args.keep_background, categories=args.categories,
                               square=args.square, zoom=args.zoom, batch_size=args.batch_size,
                               num_workers=args.num_workers, relabel=args.relabel, review=args.review)
        print(report.summary())
    elif args.command == "predict":
        from detect_waste_cls.predict import predict_folder

        print(f"wrote {predict_folder(args.checkpoint, args.images, args.out, batch_size=args.batch_size)}")
    elif args.command == "evaluate-boxes":
        from detect_waste_cls.evaluate_boxes import evaluate_boxes

        metrics = evaluate_boxes(args.ground_truth, args.detections, args.out, images=args.images)
        print(f"mAP@0.5 {metrics['map_50']}, mAP@0.5:0.95 {metrics['map']}, box-level accuracy "
              f"{metrics['box_accuracy']} on {metrics['matched']} matched boxes; results in {args.out}")
    elif args.command == "select":
        from detect_waste_cls.labeling.select import select_images

        selection = select_images(args.model, args.data, args.out, budget=args.budget, strategy=args.strategy,
                                  seed=args.seed, review_per_class=args.review_per_class,
                                  review_label_issues=args.label_issues, batch_size=args.batch_size)
        print(f"wrote {selection}")
    elif args.command == "export":
        from detect_waste_cls.export import export_model

        print(f"wrote {export_model(args.checkpoint, args.out, onnx=args.onnx, push_to_hub=args.push_to_hub)}")
    elif args.command == "app":
        from detect_waste_cls.app import launch

        sys.exit(launch(args.model, port=args.port))
    elif args.mode == "test":
        run_test_mode(args, config_from_args(args, default_model))
    else:
        from detect_waste_cls.train import train

        train(config_from_args(args, default_model))


def configure_logging() -> None:
    """Our own messages on stderr; Lightning's loggers keep the handlers they set up themselves."""
    package_log = logging.getLogger("detect_waste_cls")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None, default_model: str = DEFAULT_MODEL) -> int:
    configure_logging()
    args = build_parser(default_model).parse_args(argv)
    try:
        dispatch(args, default_model)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main_script(default_model: str) -> int:
    """Entry for train_effnet.py / train_resnet.py: the `train` command (with --mode) without naming it."""
    return main(["train", *sys.argv[1:]], default_model=default_model)


if __name__ == "__main__":
    sys.exit(main())
