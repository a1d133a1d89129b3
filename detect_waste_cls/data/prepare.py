"""Build `images_square/{train,test,pseudolabel}` from class folders (here) or from boxes (prepare_crops.py).

Each entry point lists every file it writes in a manifest: `split` in DST/manifest.csv, `crop` in
DST/manifest-crop-<split>.csv. Both refuse to replace earlier output unless asked (--overwrite), and
then remove only the files their own manifest lists, and the manifest. If the folder they would
replace holds anything else (images imported from Label Studio, files added by hand, another tool's
output), they stop before removing anything and list those files.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from detect_waste_cls.data.boxes import load_json
from detect_waste_cls.data.images import (IMPORTS_MANIFEST, class_folders, load_rgb,
                                          read_imports_manifest, scan_images)
from detect_waste_cls.errors import UserInputError

log = logging.getLogger(__name__)

IMAGES_DIR = "images_square"
MANIFEST = "manifest.csv"
# Written by the operating system's file browser, not by a person: neither removed nor a reason to stop.
OS_METADATA = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
SHOWN_FILES = 20  # an error lists this many files, then a count

# TACO category name -> detect-waste class, as listed in utils/dataset_converter.py of
# github.com/wimlds-trojmiasto/detect-waste (used by its classifier/cut_bbox_litter.py).
# Names are matched ignoring letter case, which also covers the original's duplicate
# spellings ("Plastic Film", "Food can"); "Rope" is its alias for "Rope & strings".
_DETECTWASTE_CLASSES = {
    "bio": ["Food waste"],
    "glass": ["Glass bottle", "Broken glass", "Glass jar"],
    "metals_and_plastic": [
        "Aluminium foil", "Clear plastic bottle", "Other plastic bottle", "Plastic bottle cap",
        "Metal bottle cap", "Aerosol", "Drink can", "Food Can", "Drink carton",
        "Disposable plastic cup", "Other plastic cup", "Plastic lid", "Metal lid",
        "Single-use carrier bag", "Polypropylene bag", "Plastic film", "Six pack rings",
        "Spread tub", "Tupperware", "Disposable food container", "Other plastic container",
        "Plastic glooves", "Plastic utensils", "Pop tab", "Scrap metal", "Plastic straw",
        "Other plastic", "Crisp packet",
    ],
    "non_recyclable": [
        "Aluminium blister pack", "Carded blister pack", "Meal carton", "Pizza box", "Cigarette",
        "Paper cup", "Foam cup", "Glass cup", "Wrapping paper", "Magazine paper", "Garbage bag",
        "Plastified paper bag", "Other plastic wrapper", "Foam food container", "Rope",
        "Rope & strings", "Shoe", "Squeezable tube", "Paper straw", "Styrofoam piece", "Tissues",
    ],
    "other": ["Battery"],
    "paper": ["Corrugated carton", "Egg carton", "Toilet tube", "Other carton", "Normal paper", "Paper bag"],
    "unknown": ["Unlabeled litter"],
}
DETECTWASTE_MAPPING: dict[str, str] = {
    name: cls for cls, names in _DETECTWASTE_CLASSES.items() for name in names
}
# detect-waste's own annotation files already use the seven class names as categories.
DETECTWASTE_MAPPING.update({cls: cls for cls in _DETECTWASTE_CLASSES})


# ---------------------------------------------------------------- shared helpers


def crop_manifest(dst: Path, split: str) -> Path:
    return dst / f"manifest-crop-{split}.csv"


def _claim_outputs(folder: Path, manifest: Path, overwrite: bool) -> None:
    """Make way for new output in `folder`: refuse earlier output unless `overwrite`, then remove exactly
    the files `manifest` lists (paths relative to its folder), the folders that leaves empty, and `manifest`.

    Anything else in `folder` stops this before one file is removed: it is what a person made.
    """
    remove_claimed(claimable(folder, manifest, overwrite))


@dataclass(frozen=True)
class Claim:
    """What replacing an earlier output removes: its listed files under `folder`, then `manifest`."""

    folder: Path
    manifest: Path
    files: list[str]


def claimable(folder: Path, manifest: Path, overwrite: bool) -> Claim | None:
    """The claim on `folder`, or an error naming what forbids it; removes nothing, so a command writing several
    folders checks them all before it removes anything. None when there is no earlier output."""
    earlier = [path for path in (folder, manifest) if path.exists() or path.is_symlink()]
    if not earlier:
        return None
    if not overwrite:
        raise UserInputError(f"{earlier[0]} already exists: pass --overwrite to replace the files {manifest} lists")
    # Paths as strings, joined the way the folder scan joins them: a dataset can hold 100,000 files.
    listed = {os.path.join(manifest.parent, *path.split("/")) for path in _listed_paths(manifest)}
    ours, others = _sort_files(folder, listed)
    imports = manifest.parent / IMAGES_DIR / IMPORTS_MANIFEST
    if str(imports) not in others and _records_files_in(imports, folder):
        others.append(str(imports))
    if others:
        raise UserInputError(_not_listed_message(folder, manifest, others))
    return Claim(folder, manifest, ours)


def remove_claimed(claim: Claim | None) -> None:
    if claim is not None:
        _remove_files(claim.files, claim.folder)
        claim.manifest.unlink(missing_ok=True)  # last: a run stopped halfway can still be replaced


def _listed_paths(manifest: Path) -> list[str]:
    if not (manifest.exists() or manifest.is_symlink()):
        return []
    try:
        return pd.read_csv(manifest, usecols=["path"], dtype=str)["path"].dropna().tolist()
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise UserInputError(f"{manifest} is not a manifest `prepare` wrote ({error}): move it away, or choose "
                             "another --dst") from error


def _sort_files(folder: Path, listed: set[str]) -> tuple[list[str], list[str]]:
    """(the files under `folder` that `listed` holds, all other files): links are never followed, and empty
    folders are neither."""
    if not (folder.exists() or folder.is_symlink()):
        return [], []
    if folder.is_symlink() or not folder.is_dir():
        return [], [str(folder)]
    ours, others, pending = [], [], [str(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.path in listed:
                    ours.append(entry.path)
                elif entry.name not in OS_METADATA:
                    others.append(entry.path)
    return ours, sorted(others)


def _remove_files(files: list[str], folder: Path) -> None:
    """Remove `files`, then the folders under `folder` (itself included) that this leaves empty, deepest first."""
    for path in files:
        os.unlink(path)
    parents = {Path(parent) for parent in {os.path.dirname(path) for path in files}}
    emptied = {path for parent in parents for path in (parent, *parent.parents) if path.is_relative_to(folder)}
    for path in sorted(emptied, key=lambda path: len(path.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()


def _records_files_in(imports: Path, folder: Path) -> bool:
    """Whether Label Studio imports came from or went to `folder` (replacing it would lose what they record)."""
    images_square = imports.parent
    return any((images_square / path).is_relative_to(folder)
               for pair in read_imports_manifest(images_square).items() for path in pair)


def _not_listed_message(folder: Path, manifest: Path, others: list[str]) -> str:
    shown = "\n  ".join(others[:SHOWN_FILES])
    more = f"\n  and {len(others) - SHOWN_FILES} more" if len(others) > SHOWN_FILES else ""
    labeled = ""
    if any(os.path.basename(path) == IMPORTS_MANIFEST for path in others):
        labeled = (f"\n{IMPORTS_MANIFEST} records images a person labeled in Label Studio: a new split would lose "
                   "them or put them into test/.")
    return (f"nothing removed: --overwrite replaces only the files {manifest} lists, and {folder} also holds "
            f"{len(others)} more:\n  {shown}{more}{labeled}\n"
            f"write to another --dst, or move those files out of {folder} and run again")


def _refuse_overlap(source: Path, output: Path, *, output_inside_source_ok: bool) -> None:
    """An input inside the output would be read and written at once; and an output inside a
    class-folder input would be read back as one more class."""
    if source.resolve().is_relative_to(output.resolve()):
        raise UserInputError(f"input {source} lies inside the output {output}: choose another destination")
    if not output_inside_source_ok and output.resolve().is_relative_to(source.resolve()):
        raise UserInputError(f"output {output} lies inside the input {source}: choose another destination")


def _save_image(image: Image.Image, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    elif suffix == ".webp":
        image.save(path, lossless=True)  # PIL's default WebP is lossy
    else:
        image.save(path)


# ---------------------------------------------------------------- class folders -> splits


def split_dataset(
    src: str | Path, dst: str | Path, *, test: float = 0.2, pseudo: float = 0.6, val: float = 0.0,
    keep_pseudo_labels: bool = False, square: bool = False, size: int | None = None,
    link: bool = False, seed: int = 0, mapping: str | Path | None = None, overwrite: bool = False,
) -> pd.DataFrame:
    """Split `src/<class>/*` into `dst/images_square/<split>/`, stratified and seeded.

    `mapping`: a JSON file {class folder: class, or null to drop it} that merges or drops class folders; it must
    list every class folder. Writes and returns the manifest (source, split, class, path relative to dst).
    """
    src, dst = Path(src), Path(dst)
    shares = {"test": test, "pseudolabel": pseudo, "val": val}
    _check_split_options(shares, square, size, link)
    images_by_class = _scan_classes(src)
    class_of = {cls: cls for cls in images_by_class} if mapping is None else _class_of(images_by_class, Path(mapping),
                                                                                       src)
    _refuse_overlap(src, dst / IMAGES_DIR, output_inside_source_ok=False)
    _claim_outputs(dst / IMAGES_DIR, dst / MANIFEST, overwrite)

    rows = []
    for cls, paths in images_by_class.items():
        if class_of[cls] is None:
            continue
        # Seeding per source class keeps a class's split unchanged when other classes are added, and a mapping
        # relabels images without moving them between splits.
        for split, path in _assign_splits(paths, shares, random.Random(f"{seed}:{cls}"), cls):
            rows.append({"source": str(path.absolute()), "split": split, "class": class_of[cls]})
    manifest = pd.DataFrame(rows, columns=["source", "split", "class"])
    manifest["path"] = _output_paths(manifest, keep_pseudo_labels)
    manifest = _write_split_files(manifest, dst, square, size, link)
    manifest.to_csv(dst / MANIFEST, index=False)
    counts = manifest["split"].value_counts().to_dict()
    log.info("wrote %d images to %s: %s", len(manifest), dst / IMAGES_DIR, counts)
    return manifest


def _check_split_options(shares: dict[str, float], square: bool, size: int | None, link: bool) -> None:
    for split, share in shares.items():
        if not 0 <= share < 1:  # also rejects NaN
            raise UserInputError(f"the {split} share must be in [0, 1), got {share}")
    if sum(shares.values()) >= 1:
        raise UserInputError(f"test + pseudo + val shares must sum below 1 (train gets the rest): {shares}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserInputError(f"size must be a positive number of pixels, got {size}")
    if link and (square or size):
        raise UserInputError("link cannot be combined with square/size: a symlink cannot hold a resized image")


def _class_of(images_by_class: dict[str, list[Path]], mapping: Path, src: Path) -> dict[str, str | None]:
    """Class folder -> its class under `mapping`, None where the mapping drops it."""
    folded = read_mapping(mapping, images_by_class, src)
    unlisted = [cls for cls in images_by_class if cls.casefold() not in folded]
    if unlisted:
        raise UserInputError(f"{mapping} does not list the class folder(s) {', '.join(unlisted)} of {src}: map each "
                             "to a class, or to null to leave it out")
    class_of = {cls: folded[cls.casefold()] for cls in images_by_class}
    if not any(class_of.values()):
        raise UserInputError(f"{mapping} drops every class folder of {src}")
    return class_of


def _scan_classes(src: Path) -> dict[str, list[Path]]:
    classes = class_folders(src)
    if not classes:
        raise UserInputError(f"no class subfolders in {src}: expected {src}/<class>/<image files>")
    images_by_class = {}
    for cls in classes:
        report = scan_images(src / cls)
        report.warn_skipped(src / cls)
        if not report.paths:
            raise UserInputError(f"class folder {src / cls} holds no readable images")
        images_by_class[cls] = report.paths
    return images_by_class


def _assign_splits(
    paths: list[Path], shares: dict[str, float], rng: random.Random, cls: str
) -> list[tuple[str, Path]]:
    order = list(paths)
    rng.shuffle(order)
    assigned, start = [], 0
    for split, share in shares.items():
        # Round half up; capped so rounding in tiny classes never hands out more than exist.
        count = min(int(len(order) * share + 0.5), len(order) - start)
        assigned += [(split, path) for path in order[start : start + count]]
        start += count
    if start == len(order):
        log.warning("class %s gets no training images (%d in total): lower the shares", cls, len(order))
    return assigned + [("train", path) for path in order[start:]]


def _output_paths(manifest: pd.DataFrame, keep_pseudo_labels: bool) -> list[str]:
    """Each image's path: its split's folder (flat for unlabeled pseudolabel images, else per class), under a name
    no other image of that folder has (merged class folders and the flat folder can repeat names)."""
    flat = (manifest["split"] == "pseudolabel") & (not keep_pseudo_labels)
    folders = [f"{IMAGES_DIR}/{split}" if is_flat else f"{IMAGES_DIR}/{split}/{cls}"
               for split, cls, is_flat in zip(manifest["split"], manifest["class"], flat)]
    names = pd.Series([Path(source).name for source in manifest["source"]], index=manifest.index)
    for folder, members in pd.Series(folders, index=manifest.index).groupby(folders).groups.items():
        names[members] = _unique_names(names[members].tolist())
    return [f"{folder}/{name}" for folder, name in zip(folders, names)]


def _unique_names(names: list[str]) -> list[str]:
    """Keep names that occur once; number the others so no file replaces another.

    Compared ignoring case, since on macOS and Windows `A.jpg` and `a.jpg` are one file.
    """
    counts = Counter(name.casefold() for name in names)
    taken = {name.casefold() for name in names if counts[name.casefold()] == 1}
    unique = []
    for name in names:
        if counts[name.casefold()] > 1:
            stem, suffix, number = Path(name).stem, Path(name).suffix, 1
            while f"{stem}_{number}{suffix}".casefold() in taken:
                number += 1
            name = f"{stem}_{number}{suffix}"
            taken.add(name.casefold())
        unique.append(name)
    return unique


def _write_split_files(
    manifest: pd.DataFrame, dst: Path, square: bool, size: int | None, link: bool
) -> pd.DataFrame:
    unreadable = []
    for row in manifest.itertuples():
        target = dst / row.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            target.symlink_to(row.source)
        elif square or size:
            try:
                _save_image(_reshape(load_rgb(row.source), square, size), target)
            except UserInputError:  # passed the header check at scan time, but does not decode
                unreadable.append(row.Index)
        else:
            shutil.copy2(row.source, target)
    if unreadable:
        shown = ", ".join(manifest.loc[unreadable[:3], "source"])
        log.warning("skipped %d image(s) that could not be decoded: %s", len(unreadable), shown)
    return manifest.drop(index=unreadable).reset_index(drop=True)


def _reshape(pixels: np.ndarray, square: bool, size: int | None) -> Image.Image:
    image = Image.fromarray(pixels)
    if square:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if size:
        scale = size / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return image


# ---------------------------------------------------------------- class mappings


def read_mapping(mapping: str | Path, names, source: str | Path) -> dict[str, str | None]:
    """Source name (case-folded) -> class, or None where the mapping drops that name.

    `mapping`: "detectwaste" (the built-in TACO -> detect-waste table), "none" (every name is its own class), or a
    JSON file {name: class or null}: it merges names by giving them one class and drops a name mapped to null.
    `names`: the names the input has (for "none"); `source`: the input, named in errors about "none".
    """
    if mapping == "detectwaste":
        pairs, where = DETECTWASTE_MAPPING, "built-in mapping"
    elif mapping == "none":
        pairs, where = {name: name for name in names}, source
    else:
        pairs, where = load_json(Path(mapping), "mapping file"), mapping
        if not isinstance(pairs, dict):
            raise UserInputError(f"mapping file {mapping} must hold a JSON object: name -> class (or null to drop)")
    folded: dict[str, str | None] = {}
    for name, cls in pairs.items():
        if cls is not None and (not isinstance(cls, str) or not cls.strip() or cls.startswith(".") or "/" in cls
                                or "\\" in cls):
            raise UserInputError(f"{where}: {cls!r} cannot be used as a class folder name")
        if folded.setdefault(str(name).casefold(), cls) != cls:
            raise UserInputError(f"{where}: {name!r} is mapped to two classes (names differ in case)")
    return folded
