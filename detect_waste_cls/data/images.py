"""Finding images and classes on disk, and reading them as RGB arrays.

Everything that looks at the user's folders goes through here, so every bad-input case
(missing folder, empty class, unreadable file, class mismatch) is reported in one way.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detect_waste_cls.errors import UserInputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLITS = ("train", "test", "pseudolabel")


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Files in `folder` with an image extension (any case); hidden files and folders are left out.

    os.scandir tells files from folders by the directory entry itself: no stat per file, which
    is most of the cost of listing a folder of 50,000 images. Linked files count (`prepare --link`
    makes them); linked folders are not followed, so a link cycle cannot loop.
    """
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(Path(entry.path))
                elif recursive and entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return found


# What PIL raises for a file it cannot decode: not an image, truncated, or over its pixel limit
# (Image.MAX_IMAGE_PIXELS, the guard against decompression bombs).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def load_rgb(path: str | Path, *, min_side: int | None = None) -> np.ndarray:
    """Read an image as an HxWx3 uint8 array, upright (EXIF orientation applied).

    Transparent images are composited on white rather than on whatever colour hides
    under the alpha channel; CMYK, palette and grayscale images are converted to RGB;
    16-bit grayscale keeps its top 8 bits (PIL's own conversion would clip it to white).

    `min_side`: the caller resizes to about this many px per side, so a JPEG may be decoded at
    1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, PIL's draft mode) as long as both sides
    stay at least `min_side`: several times less decoding work, and a smoother downscale than a
    bilinear resize of the full image.
    """
    try:
        with Image.open(path) as image:
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
            if image.mode in SIXTEEN_BIT_MODES:
                high_bits = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(high_bits[..., None], 3, axis=2)
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except DECODE_ERRORS as error:
        raise UserInputError(f"cannot read image {path}: {error}") from error


def is_readable_image(path: Path) -> bool:
    """Cheap header check: catches empty, truncated-header, oversized and non-image files at scan time.

    A file whose header is fine but whose pixel data is cut short passes; it fails at its first decode,
    where the datasets replace it (see ImageDataset) and list it in the run's skipped_files.txt.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
        return width > 0 and height > 0
    except DECODE_ERRORS:
        return False


@dataclass
class ScanReport:
    """Images found under a folder, plus the files that were skipped and why."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def warn_skipped(self, folder: Path) -> None:
        if self.skipped:
            shown = ", ".join(str(p) for p in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            log.warning("skipped %d unreadable image(s) under %s: %s%s", len(self.skipped), folder, shown, more)


def keep_decodable(paths: list[Path], where: Path) -> ScanReport:
    """Decode each image once; the ones that cannot be decoded are skipped, warned about and counted.

    For the images where a replacement would give a wrong answer (test, predict): a file that
    fails mid-prediction would stop the job, so they are checked up front and left out.
    """
    report = ScanReport()
    for path in paths:
        try:
            load_rgb(path)
            report.paths.append(path)
        except UserInputError:
            report.skipped.append(path)
    report.warn_skipped(where)
    return report


def scan_images(folder: Path, recursive: bool = False) -> ScanReport:
    """Image files in `folder` (case-insensitive extensions), unreadable ones skipped and counted."""
    report = ScanReport()
    # Sorted by file name first so that renaming a class folder never reorders images.
    for path in sorted(image_files(folder, recursive), key=lambda p: (p.name, str(p))):
        (report.paths if is_readable_image(path) else report.skipped).append(path)
    return report


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    if not folder.is_dir():
        raise UserInputError(f"folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class LabeledImages:
    """Images of a class-folder split, each with the index of its class in `classes`."""

    paths: list[Path]
    targets: list[int]
    classes: list[str]
    skipped: list[Path]

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes)).tolist()


def scan_labeled_folder(folder: Path, classes: list[str] | None = None) -> LabeledImages:
    """Read a class-folder split.

    With `classes=None` the split defines the classes (its sorted subfolders, each of which
    must hold at least one image). Otherwise the split's subfolders must be a subset of
    `classes`; an unknown one is an error naming it.
    """
    found = class_folders(folder)
    if not found:
        raise UserInputError(f"no class subfolders in {folder}: expected one folder per class")
    defines_classes = classes is None
    if defines_classes:
        classes = found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UserInputError(
            f"{folder} has class folder(s) {', '.join(unknown)} that are not among the known classes "
            f"({', '.join(classes)})"
        )
    paths, targets, skipped = [], [], []
    for name in found:
        report = scan_images(folder / name)
        report.warn_skipped(folder / name)
        skipped += report.skipped
        if not report.paths and defines_classes:
            raise UserInputError(f"class folder {folder / name} holds no readable images")
        paths += report.paths
        targets += [classes.index(name)] * len(report.paths)
    if not paths:
        raise UserInputError(f"no readable images under {folder}")
    return LabeledImages(paths, targets, list(classes), skipped)


# Written by `detect-waste-cls label-studio import` in images_square/: what a person labeled, and where it went.
IMPORTS_MANIFEST = "label_studio_imports.csv"


def read_imports_manifest(images_square: Path) -> dict[str, str]:
    """Where each imported image went: source -> destination (relative to images_square), the latest row wins."""
    manifest = images_square / IMPORTS_MANIFEST
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as file:
        return {row["source"]: row["destination"] for row in csv.DictReader(file)}


def labeled_by_import(images_square: Path) -> set[Path]:
    """The pseudolabel/ images a person labeled (their copies are in train/): no longer unlabeled, so neither
    pseudo-labeled nor offered for labeling again."""
    return {(images_square / source).resolve() for source in read_imports_manifest(images_square)
            if source.startswith("pseudolabel/")}


@dataclass
class PseudoImages:
    """The pseudolabel split: image paths and, where class subfolders exist, their folder labels.

    Folder labels (-1 where unknown) only measure pseudo-label accuracy; they never go into
    a dataset, so they cannot reach a loss.
    """

    paths: list[Path]
    folder_targets: list[int]
    skipped: list[Path]


def scan_pseudolabel_folder(folder: Path, classes: list[str]) -> PseudoImages:
    """Images directly in `folder` and in any subfolders; a subfolder named after a class gives a folder label.

    Images a person has labeled since (`label-studio import` copied them into train/) are left out.
    """
    report = scan_images(folder, recursive=True)
    report.warn_skipped(folder)
    labeled = labeled_by_import(folder.parent)
    if labeled:
        kept = [path for path in report.paths if path.resolve() not in labeled]
        log.info("%d image(s) of %s are labeled now (%s): not pseudo-labeled", len(report.paths) - len(kept),
                 folder, folder.parent / IMPORTS_MANIFEST)
        report.paths = kept
    folder_targets = [
        classes.index(path.parent.name) if path.parent != folder and path.parent.name in classes else -1
        for path in report.paths
    ]
    return PseudoImages(report.paths, folder_targets, report.skipped)


def data_folder(data: str | Path) -> Path:
    """--data as a folder: a missing path or a file is named as such before anything looks inside."""
    data = Path(data)
    if not data.exists():
        raise UserInputError(f"--data {data} does not exist")
    if not data.is_dir():
        raise UserInputError(f"--data {data} is a file, not a dataset folder")
    return data


def resolve_images_square(data: str | Path) -> Path:
    """Accept either a dataset root holding `images_square/` or the `images_square` folder itself."""
    data = data_folder(data)
    if (data / "images_square" / "train").is_dir():
        return data / "images_square"
    if (data / "train").is_dir():
        return data
    raise UserInputError(
        f"no training data at {data}: expected {data}/images_square/train/<class>/ "
        f"(or {data}/train/<class>/)"
    )


def resolve_test_folder(folder: str | Path) -> Path:
    """For test mode: a dataset root, an images_square folder, or any folder of class subfolders."""
    folder = data_folder(folder)
    for candidate in (folder / "images_square" / "test", folder / "test"):
        if candidate.is_dir():
            return candidate
    return folder
