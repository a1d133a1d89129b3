"""Tests for `prepare`: class folders -> seeded splits, and COCO boxes -> pixel-exact crops."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from detect_waste_cls.cli import build_parser
from detect_waste_cls.data.crops import CropGeometry
from detect_waste_cls.data.prepare import DETECTWASTE_MAPPING, split_dataset
from detect_waste_cls.data.prepare_crops import crop_boxes
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling.label_studio import Dataset, choice_result
from detect_waste_cls.labeling.label_studio_import import import_annotations

TRASHNET = Path(__file__).resolve().parents[1].parent / "shared/data/trashnet"
CLASS_COUNTS = {"cardboard": 10, "glass": 7, "paper": 3}


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def random_pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def class_dataset(tmp_path: Path) -> Path:
    """Class folders whose files share names across classes (000.png in every class)."""
    src = tmp_path / "src"
    for class_index, (cls, count) in enumerate(CLASS_COUNTS.items()):
        for i in range(count):
            write_image(src / cls / f"{i:03d}.png", random_pixels(12, 16, seed=100 * class_index + i))
    return src


def source_files(src: Path) -> set[str]:
    return {str(p.absolute()) for p in src.rglob("*") if p.is_file()}


def files_on_disk(dst: Path) -> set[str]:
    root = dst / "images_square"
    return {p.relative_to(dst).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def snapshot(dst: Path) -> dict[str, bytes]:
    """Every file under `dst` and its bytes."""
    return {p.relative_to(dst).as_posix(): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()}


def label_in_label_studio(dst: Path, labels: dict[str, str], export: Path) -> None:
    """What a person does: label pseudolabel images (name -> class) in Label Studio, export the project as
    JSON, and bring the labels in with `label-studio import` (which copies the images into train/<class>/)."""
    dataset = Dataset.open(dst)
    tasks = [{"id": number, "data": {"image": dataset.url(dataset.images_square / "pseudolabel" / name)},
              "annotations": [{"id": number, "result": choice_result(label), "was_cancelled": False}]}
             for number, (name, label) in enumerate(labels.items(), start=1)]
    export.write_text(json.dumps(tasks))
    assert len(import_annotations(dst, export).copied) == len(labels)


# ---------------------------------------------------------------- split_dataset


def test_split_puts_every_image_in_exactly_one_split(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, test=0.2, pseudo=0.5, val=0.1)

    assert manifest.groupby("class").size().to_dict() == CLASS_COUNTS
    assert sorted(manifest["source"]) == sorted(source_files(class_dataset))
    assert manifest["path"].is_unique
    assert set(manifest["split"]) == {"train", "test", "pseudolabel", "val"}
    # Shares are rounded per class: 10 images -> 2 test, 5 pseudolabel, 1 val, 2 train.
    cardboard = manifest[manifest["class"] == "cardboard"]["split"].value_counts().to_dict()
    assert cardboard == {"test": 2, "pseudolabel": 5, "val": 1, "train": 2}
    assert files_on_disk(dst) == set(manifest["path"])
    on_file = pd.read_csv(dst / "manifest.csv")
    assert list(on_file.columns) == ["source", "split", "class", "path"]
    pd.testing.assert_frame_equal(on_file, manifest, check_dtype=False)
    for source, split, cls, path in manifest.itertuples(index=False, name=None):
        assert (dst / path).read_bytes() == Path(source).read_bytes()  # copies are byte-identical
        assert Path(path).parent.name == (split if split == "pseudolabel" else cls)


def test_split_is_seeded(class_dataset: Path, tmp_path: Path) -> None:
    def assignment(seed: int, name: str) -> list[tuple[str, str]]:
        manifest = split_dataset(class_dataset, tmp_path / name, seed=seed)
        return sorted(zip(manifest["source"], manifest["split"]))

    assert assignment(0, "a") == assignment(0, "b")
    assert assignment(0, "a2") != assignment(1, "c")


def test_flat_pseudolabel_names_are_unique_and_nothing_is_overwritten(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, test=0.0, pseudo=0.9)
    pseudo = manifest[manifest["split"] == "pseudolabel"]
    folder = dst / "images_square" / "pseudolabel"
    assert all(p.is_file() for p in folder.iterdir())  # flat: no class folders
    assert len(list(folder.iterdir())) == len(pseudo) == 9 + 6 + 3
    # 000.png exists in every class: all copies survive under distinct names.
    assert {(dst / p).read_bytes() for p in pseudo["path"]} == {Path(s).read_bytes() for s in pseudo["source"]}


def test_keep_pseudo_labels_keeps_class_folders(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, keep_pseudo_labels=True)
    folder = dst / "images_square" / "pseudolabel"
    assert sorted(p.name for p in folder.iterdir()) == sorted(CLASS_COUNTS)
    for cls in CLASS_COUNTS:
        expected = manifest[(manifest["split"] == "pseudolabel") & (manifest["class"] == cls)]
        assert len(list((folder / cls).iterdir())) == len(expected)


def test_overwrite_replaces_exactly_the_files_the_manifest_lists(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    first = split_dataset(class_dataset, dst, seed=0, keep_pseudo_labels=True)
    notes = dst / "notes.txt"  # beside images_square: not in the folder --overwrite replaces
    notes.write_text("mine")

    with pytest.raises(UserInputError, match="images_square.*--overwrite"):
        split_dataset(class_dataset, dst, seed=1)
    assert files_on_disk(dst) == set(first["path"])
    manifest = split_dataset(class_dataset, dst, seed=1, overwrite=True)

    assert notes.read_text() == "mine"
    assert files_on_disk(dst) == set(manifest["path"])
    # The class folders of the first split's pseudolabel/ were left empty, so they went too.
    assert all(p.is_file() for p in (dst / "images_square" / "pseudolabel").iterdir())


def test_overwrite_refuses_and_keeps_everything_when_a_person_added_files(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, seed=0)
    unlabeled = manifest[manifest["split"] == "pseudolabel"]["path"].map(lambda path: Path(path).name).tolist()
    labels = dict(zip(unlabeled[:3], ["glass", "cardboard", "glass"]))
    label_in_label_studio(dst, labels, tmp_path / "export.json")
    write_image(dst / "images_square" / "train" / "glass" / "mine_extra.jpg", random_pixels(8, 8, seed=5))
    (dst / "images_square" / "NOTES.txt").write_text("where these photos came from")
    before = snapshot(dst)

    with pytest.raises(UserInputError) as refused:
        split_dataset(class_dataset, dst, seed=1, overwrite=True)

    message = str(refused.value)
    assert message.startswith("nothing removed") and "6 more" in message and "another --dst" in message
    person_made = ["train/glass/mine_extra.jpg", "NOTES.txt", "label_studio_imports.csv",
                   *(f"train/{label}/{name}" for name, label in labels.items())]
    for path in person_made:
        assert str(dst / "images_square" / path) in message
    assert "put them into test/" in message
    assert snapshot(dst) == before  # not one file removed, the imported labels and the manifest included


def test_existing_manifest_alone_is_refused(class_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.csv").write_text("keep me")
    with pytest.raises(UserInputError, match="manifest.csv"):
        split_dataset(class_dataset, tmp_path / "out")
    with pytest.raises(UserInputError, match="manifest.csv is not a manifest `prepare` wrote"):
        split_dataset(class_dataset, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "manifest.csv").read_text() == "keep me"


def test_link_mode_makes_symlinks_to_absolute_sources(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, link=True)
    for row in manifest.itertuples():
        link = dst / row.path
        assert link.is_symlink()
        assert Path(link.readlink()).is_absolute()
        assert link.resolve() == Path(row.source).resolve()


@pytest.mark.parametrize(
    ("square", "size", "expected"), [(True, 8, (8, 8)), (False, 8, (8, 6)), (True, None, (16, 16))]
)
def test_square_and_size(class_dataset: Path, tmp_path: Path, square: bool, size: int | None, expected) -> None:
    dst = tmp_path / "out"
    manifest = split_dataset(class_dataset, dst, square=square, size=size)
    for row in manifest.itertuples():
        with Image.open(dst / row.path) as image:
            assert image.size == expected


def test_square_pads_centred_in_black(class_dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    row = split_dataset(class_dataset, dst, square=True).iloc[0]
    padded = np.asarray(Image.open(dst / row["path"]))
    original = np.asarray(Image.open(row["source"]))  # 12x16 -> 2 black rows above and below
    assert (padded[:2] == 0).all() and (padded[-2:] == 0).all()
    np.testing.assert_array_equal(padded[2:14], original)


def test_unreadable_files_are_skipped_and_reported(class_dataset: Path, tmp_path: Path, caplog) -> None:
    (class_dataset / "glass" / "corrupt.png").write_bytes(b"not an image")
    truncated = class_dataset / "paper" / "truncated.jpg"
    Image.fromarray(random_pixels(64, 64, seed=1)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # header reads fine, pixels do not decode
    dst = tmp_path / "out"

    with caplog.at_level(logging.WARNING):
        manifest = split_dataset(class_dataset, dst, size=8)

    assert "corrupt.png" not in " ".join(manifest["source"])
    assert "truncated.jpg" not in " ".join(manifest["source"])
    assert manifest.groupby("class").size().to_dict() == CLASS_COUNTS
    assert files_on_disk(dst) == set(manifest["path"])
    assert "skipped 1 unreadable" in caplog.text and "skipped 1 image(s) that could not be decoded" in caplog.text


def test_tiny_classes_never_lose_or_duplicate_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for cls, count in {"one": 1, "two": 2, "three": 3}.items():
        for i in range(count):
            write_image(src / cls / f"{i}.png", random_pixels(4, 4, seed=i))
    manifest = split_dataset(src, tmp_path / "out", test=0.3, pseudo=0.3, val=0.3, link=True)
    assert manifest.groupby("class").size().to_dict() == {"one": 1, "two": 2, "three": 3}
    assert manifest["source"].is_unique


@pytest.mark.parametrize(
    "shares",
    [{"test": 1.0}, {"test": -0.1}, {"test": 0.5, "pseudo": 0.5}, {"val": float("nan")}, {"pseudo": 0.7, "val": 0.3}],
)
def test_bad_shares_are_refused(class_dataset: Path, tmp_path: Path, shares: dict) -> None:
    with pytest.raises(UserInputError, match="share"):
        split_dataset(class_dataset, tmp_path / "out", **shares)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_path(class_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="missing"):
        split_dataset(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserInputError, match="flat"):
        split_dataset(tmp_path / "flat", tmp_path / "out")
    (class_dataset / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty"):
        split_dataset(class_dataset, tmp_path / "out")


def test_refuses_link_with_resize_and_output_inside_input(class_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="link"):
        split_dataset(class_dataset, tmp_path / "out", link=True, square=True)
    with pytest.raises(UserInputError, match="inside"):
        split_dataset(class_dataset, class_dataset)


@pytest.mark.skipif(not TRASHNET.is_dir(), reason=f"TrashNet not found at {TRASHNET}")
def test_split_real_trashnet(tmp_path: Path) -> None:
    manifest = split_dataset(TRASHNET, tmp_path, link=True)
    expected = {p.name: sum(1 for f in p.iterdir() if f.suffix.lower() == ".jpg") for p in TRASHNET.iterdir()}
    assert len(manifest) == 2527
    assert manifest.groupby("class").size().to_dict() == expected
    assert manifest["source"].is_unique and files_on_disk(tmp_path) == set(manifest["path"])


# ---------------------------------------------------------------- crop_boxes

WIDTH, HEIGHT = 40, 30
CATEGORIES = [{"id": 1, "name": "Glass bottle"}, {"id": 2, "name": "Drink can"}, {"id": 3, "name": "Mystery thing"}]


@pytest.fixture
def coco(tmp_path: Path):
    """Two PNG images with known pixels and a COCO file; returns (annotations path, images dir, pixels)."""
    images = tmp_path / "images"
    pixels = {
        "a": write_image(images / "batch_1" / "a.png", random_pixels(HEIGHT, WIDTH, seed=1)),
        "b": write_image(images / "b.png", random_pixels(HEIGHT, WIDTH, seed=2)),
    }
    pixels = {name: np.asarray(Image.open(path)) for name, path in pixels.items()}

    def write(annotations: list[dict], extra_images: list[dict] = ()) -> Path:
        coco_file = tmp_path / "annotations.json"
        coco_images = [
            {"id": 1, "file_name": "batch_1/a.png", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "b.png", "width": WIDTH, "height": HEIGHT},
            *extra_images,
        ]
        coco_file.write_text(json.dumps({"images": coco_images, "annotations": annotations, "categories": CATEGORIES}))
        return coco_file

    return write, images, pixels


def box(ann_id: int, bbox: list[float], image_id: int = 1, category_id: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def read(path: Path) -> np.ndarray:
    assert path.is_file(), f"expected crop {path}"
    return np.asarray(Image.open(path))


def test_crops_are_pixel_exact_and_clipped(coco, tmp_path: Path) -> None:
    write, images, pixels = coco
    annotations = write([
        box(10, [5.5, 3.2, 10.1, 7.7]),                   # fractional: floor left/top, ceil right/bottom
        box(11, [30, 20, 20, 20], image_id=2, category_id=2),  # runs off the bottom-right corner
    ])
    report = crop_boxes(annotations, images, tmp_path / "out")

    out = tmp_path / "out" / "images_square" / "train"
    np.testing.assert_array_equal(read(out / "glass" / "a_10.png"), pixels["a"][3:11, 5:16])
    np.testing.assert_array_equal(read(out / "metals_and_plastic" / "b_11.png"), pixels["b"][20:30, 30:40])
    assert report.written == 2 and report.skipped == {}
    assert report.per_class == {"glass": 1, "metals_and_plastic": 1}


def test_invalid_boxes_are_skipped_and_counted(coco, tmp_path: Path, caplog) -> None:
    write, images, pixels = coco
    annotations = write(
        [
            box(1, [1, 1, 0, 5]),                 # zero width
            box(2, [1, 1, 5, -2]),                # negative height
            box(3, [1, 1, float("nan"), 5]),      # non-finite (JSON NaN)
            box(4, [50, 50, 5, 5]),               # fully outside
            box(5, [-9, 3, 9, 5]),                # touches the left edge from outside: empty after clipping
            box(6, [1, 1, 5, 5], category_id=3),  # category with no detect-waste class
            box(7, [1, 1, 5, 5], image_id=3),     # image file missing
            box(8, [1, 1, 5, 5], image_id=99),    # image id not in the file
            box(9, [1, 1, 5, 5]),                 # the one good box
            box(9, [2, 2, 5, 5]),                 # repeated id: must not replace the crop above
        ],
        extra_images=[{"id": 3, "file_name": "gone.png"}],
    )
    with caplog.at_level(logging.WARNING):
        report = crop_boxes(annotations, images, tmp_path / "out")

    assert report.written == 1
    assert report.skipped == {
        "invalid_box": 3, "outside_image": 2, "unmapped": 1, "missing_image": 1, "unknown_image": 1,
        "duplicate_box_id": 1,
    }
    np.testing.assert_array_equal(read(tmp_path / "out/images_square/train/glass/a_9.png"), pixels["a"][1:6, 1:6])
    assert "skipped 9 box(es)" in caplog.text and "annotations[0]: invalid_box" in caplog.text  # named: file, row
    assert "wrote 1 crops (glass 1; train 1); skipped 9" in report.summary()


def test_image_whose_size_disagrees_with_the_coco_entry_is_skipped(coco, tmp_path: Path) -> None:
    write, images, _ = coco
    # Boxes drawn on the sideways (pre-EXIF) image would crop the wrong pixels: skip, do not guess.
    sideways = {"id": 3, "file_name": "b.png", "width": HEIGHT, "height": WIDTH}
    annotations = write([box(1, [0, 0, 4, 4], image_id=3), box(2, [0, 0, 4, 4], image_id=2)], [sideways])
    report = crop_boxes(annotations, images, tmp_path / "out")
    assert report.skipped == {"image_size_mismatch": 1} and report.written == 1


def test_zoom_and_square_scale_the_box_about_its_centre(coco, tmp_path: Path) -> None:
    write, images, pixels = coco
    annotations = write([box(1, [10, 10, 10, 6]), box(2, [10, 10, 10, 4]), box(3, [0, 0, 4, 2])])

    crop_boxes(annotations, images, tmp_path / "zoom", zoom=1.5, split="test")
    out = tmp_path / "zoom" / "images_square" / "test" / "glass"
    # centre (15, 13); 15x9 box -> x 7.5..22.5, y 8.5..17.5 -> rounded outwards
    np.testing.assert_array_equal(read(out / "a_1.png"), pixels["a"][8:18, 7:23])

    crop_boxes(annotations, images, tmp_path / "square", square=True)
    out = tmp_path / "square" / "images_square" / "train" / "glass"
    np.testing.assert_array_equal(read(out / "a_2.png"), pixels["a"][7:17, 10:20])  # 10x4 -> 10x10 about y=12
    np.testing.assert_array_equal(read(out / "a_3.png"), pixels["a"][0:3, 0:4])  # squared upwards, then clipped


def test_mapping_file_none_and_pseudolabel_layout(coco, tmp_path: Path) -> None:
    write, images, pixels = coco
    annotations = write([box(1, [0, 0, 4, 4]), box(2, [0, 0, 4, 4], category_id=2), box(3, [0, 0, 4, 4], category_id=3)])
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"glass bottle": "bottles", "Drink can": "cans"}))  # case does not matter

    report = crop_boxes(annotations, images, tmp_path / "file", mapping=mapping)
    assert report.per_class == {"bottles": 1, "cans": 1} and report.skipped == {"unmapped": 1}
    assert (tmp_path / "file" / "images_square" / "train" / "cans" / "a_2.png").is_file()

    report = crop_boxes(annotations, images, tmp_path / "none", mapping="none")
    assert report.per_class == {"Glass bottle": 1, "Drink can": 1, "Mystery thing": 1}
    assert (tmp_path / "none" / "images_square" / "train" / "Mystery thing" / "a_3.png").is_file()

    crop_boxes(annotations, images, tmp_path / "pseudo", split="pseudolabel")
    folder = tmp_path / "pseudo" / "images_square" / "pseudolabel"
    assert sorted(p.name for p in folder.iterdir()) == ["a_1.png", "a_2.png"]


def test_crop_refuses_existing_split_unless_overwrite(coco, tmp_path: Path) -> None:
    write, images, _ = coco
    annotations = write([box(1, [0, 0, 4, 4]), box(2, [0, 0, 4, 4], category_id=2)])
    dst = tmp_path / "out"
    crop_boxes(annotations, images, dst)
    crop_boxes(annotations, images, dst, split="test")  # another split is a different folder
    (dst / "notes.txt").write_text("mine")

    with pytest.raises(UserInputError, match="train.*--overwrite"):
        crop_boxes(annotations, images, dst)
    crop_boxes(write([box(3, [0, 0, 4, 4])]), images, dst, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine"
    assert (dst / "images_square" / "test" / "glass" / "a_1.png").is_file()
    train = {path for path in files_on_disk(dst) if path.startswith("images_square/train/")}
    assert train == {"images_square/train/glass/a_3.png"}  # the first crops and their emptied class folder went
    assert not (dst / "images_square" / "train" / "metals_and_plastic").exists()
    listed = pd.read_csv(dst / "manifest-crop-train.csv")
    assert listed[["box_id", "split", "class", "path"]].values.tolist() == [
        [3, "train", "glass", "images_square/train/glass/a_3.png"]]


def test_crop_overwrite_refuses_and_keeps_everything_when_a_person_added_files(coco, tmp_path: Path) -> None:
    write, images, _ = coco
    dst = tmp_path / "out"
    unlabeled = write([box(11, [4, 4, 8, 8]), box(12, [9, 9, 8, 8])]).rename(tmp_path / "unlabeled.json")
    labeled = write([box(1, [0, 0, 4, 4]), box(2, [0, 0, 4, 4], category_id=2)])
    crop_boxes(labeled, images, dst)
    crop_boxes(unlabeled, images, dst, split="pseudolabel")
    label_in_label_studio(dst, {"a_11.png": "metals_and_plastic"}, tmp_path / "export.json")
    write_image(dst / "images_square" / "train" / "glass" / "mine_extra.jpg", random_pixels(8, 8, seed=5))
    before = snapshot(dst)

    with pytest.raises(UserInputError) as refused:
        crop_boxes(labeled, images, dst, overwrite=True)
    for path in ("train/glass/mine_extra.jpg", "train/metals_and_plastic/a_11.png", "label_studio_imports.csv"):
        assert str(dst / "images_square" / path) in str(refused.value)
    # pseudolabel/ holds only its own crops, but a person labeled one of them: replacing it would lose that.
    with pytest.raises(UserInputError, match="label_studio_imports.csv"):
        crop_boxes(unlabeled, images, dst, split="pseudolabel", overwrite=True)
    assert snapshot(dst) == before


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("task, function", [("split", split_dataset), ("crop", crop_boxes)])
def test_every_prepare_option_says_its_default_and_it_is_the_functions_own(task: str, function) -> None:
    parser = subcommand(subcommand(build_parser(), "prepare"), task)
    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for action in parser._actions:
        if action.dest == "help" or action.required:
            continue
        assert "default" in (action.help or ""), f"{action.option_strings} does not say its default"
        assert parser.get_default(action.dest) == defaults[action.dest], action.option_strings


def test_jpeg_sources_give_jpeg_crops(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "photo.jpg", random_pixels(HEIGHT, WIDTH, seed=3))
    coco_file = tmp_path / "coco.json"
    coco_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "photo.jpg"}], "categories": CATEGORIES,
        "annotations": [box(1, [2, 2, 8, 6], image_id=7)],
    }))
    crop_boxes(coco_file, tmp_path / "images", tmp_path / "out")
    with Image.open(tmp_path / "out" / "images_square" / "train" / "glass" / "photo_1.jpg") as crop:
        assert crop.format == "JPEG" and crop.size == (8, 6)


def test_crop_bad_inputs_name_the_path(coco, tmp_path: Path) -> None:
    write, images, _ = coco
    annotations = write([box(1, [0, 0, 4, 4])])
    with pytest.raises(UserInputError, match="nope.json"):
        crop_boxes(tmp_path / "nope.json", images, tmp_path / "out")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserInputError, match="broken.json"):
        crop_boxes(annotations, images, tmp_path / "out", mapping=broken)
    broken.write_text(json.dumps({"Glass bottle": "../escape"}))
    with pytest.raises(UserInputError, match="class folder"):
        crop_boxes(annotations, images, tmp_path / "out", mapping=broken)
    with pytest.raises(UserInputError, match="split"):
        crop_boxes(annotations, images, tmp_path / "out", split="val")
    with pytest.raises(UserInputError, match="zoom"):
        crop_boxes(annotations, images, tmp_path / "out", zoom=0)


def test_detectwaste_mapping_has_the_seven_classes() -> None:
    assert set(DETECTWASTE_MAPPING.values()) == {
        "bio", "glass", "metals_and_plastic", "non_recyclable", "other", "paper", "unknown",
    }
    assert DETECTWASTE_MAPPING["Cigarette"] == "non_recyclable"
    assert DETECTWASTE_MAPPING["Battery"] == "other"
    assert DETECTWASTE_MAPPING["Unlabeled litter"] == "unknown"


@settings(max_examples=20, deadline=None)
@given(
    counts=st.dictionaries(st.sampled_from(["glass", "metal", "paper", "trash"]), st.integers(1, 12), min_size=1, max_size=4),
    test=st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    pseudo=st.sampled_from([0.0, 0.25, 0.5]),
    seed=st.integers(0, 3),
)
def test_split_property_every_image_once_stratified_and_seeded(counts, test, pseudo, seed):
    """Every source image lands in exactly one split, each class within one image of its share, same seed same split."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, count in counts.items():
            for i in range(count):
                write_image(root / "src" / name / f"{name}{i}.png", random_pixels(4, 4, seed=i))
        first = split_dataset(root / "src", root / "a", test=test, pseudo=pseudo, link=True, seed=seed)
        again = split_dataset(root / "src", root / "b", test=test, pseudo=pseudo, link=True, seed=seed)
        sources = sorted(str(p.absolute()) for p in (root / "src").rglob("*.png"))
        assert sorted(first.source) == sources  # each exactly once
        for name, count in counts.items():
            per_split = first[first["class"] == name].split.value_counts()
            for split, share in (("test", test), ("pseudolabel", pseudo)):
                assert abs(per_split.get(split, 0) - count * share) <= 1, (name, split)
        assert first[["source", "split"]].equals(again[["source", "split"]])


# ---------------------------------------------------------------- class mappings, corner CSVs, photo split, background


def test_split_mapping_merges_and_drops_class_folders(class_dataset: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"cardboard": "paper", "Paper": "paper", "glass": None}))  # case does not matter
    manifest = split_dataset(class_dataset, tmp_path / "out", test=0.2, pseudo=0.0, mapping=mapping)
    assert set(manifest["class"]) == {"paper"} and len(manifest) == CLASS_COUNTS["cardboard"] + CLASS_COUNTS["paper"]
    written = [path for path in (tmp_path / "out" / "images_square").rglob("*.*")]
    assert len(written) == len(manifest)  # a name both folders use is numbered, not overwritten
    # A mapping relabels, it does not reshuffle: each image keeps the split it gets without one.
    plain = split_dataset(class_dataset, tmp_path / "plain", test=0.2, pseudo=0.0).set_index("source")["split"]
    assert (manifest.set_index("source")["split"] == plain[manifest["source"]]).all()

    mapping.write_text(json.dumps({"cardboard": "paper"}))
    with pytest.raises(UserInputError, match=r"mapping.json does not list the class folder\(s\) glass, paper"):
        split_dataset(class_dataset, tmp_path / "again", mapping=mapping)
    mapping.write_text("[1, 2]")
    with pytest.raises(UserInputError, match="mapping.json must hold a JSON object"):
        split_dataset(class_dataset, tmp_path / "again", mapping=mapping)
    assert not (tmp_path / "again").exists()


def write_corner_csv(tmp_path: Path, photos: int = 8) -> tuple[Path, Path]:
    """Photos p0..p<n> of 40x30 px with two boxes each (class a and b) in a corner CSV, plus three bad lines."""
    images = tmp_path / "photos"
    lines = ["image_name,x_min,y_min,x_max,y_max,class_name"]
    for number in range(photos):
        write_image(images / f"p{number}.png", random_pixels(HEIGHT, WIDTH, seed=number))
        lines += [f"p{number}.png,2,2,12,10,a", f"p{number}.png,20,14,36,28,b"]
    lines += ["p0.png,5,5,5,9,a", "p0.png,x,1,4,4,a", "gone.png,1,1,4,4,a"]  # empty box, not a number, no such photo
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "boxes.csv", images


def test_crop_splits_by_photo_reproducibly_and_counts_every_bad_csv_line(tmp_path: Path) -> None:
    boxes, images = write_corner_csv(tmp_path)
    first = crop_boxes(boxes, images, tmp_path / "one", mapping="none", split="pseudolabel", test=0.5, seed=3,
                       keep_pseudo_labels=True)
    assert first.skipped == {"invalid_box": 2, "unknown_image": 1}
    assert first.per_split == {"pseudolabel": 8, "test": 8} and first.per_class == {"a": 8, "b": 8}
    manifests = pd.concat([pd.read_csv(tmp_path / "one" / f"manifest-crop-{split}.csv") for split in ("pseudolabel",
                                                                                                       "test")])
    assert (manifests.groupby("source")["split"].nunique() == 1).all()  # no photo straddles two splits
    assert {Path(path).parts[2] for path in manifests["path"]} == {"a", "b"}  # labels kept in pseudolabel/<class>/
    again = crop_boxes(boxes, images, tmp_path / "two", mapping="none", split="pseudolabel", test=0.5, seed=3)
    assert sorted((row["source"], row["split"]) for row in again.crops) == sorted(
        (row["source"], row["split"]) for row in first.crops)
    other = crop_boxes(boxes, images, tmp_path / "three", mapping="none", split="pseudolabel", test=0.5, seed=4)
    assert {row["source"] for row in other.crops if row["split"] == "test"} != {
        row["source"] for row in first.crops if row["split"] == "test"}


def test_crop_mapping_null_drops_a_class_and_counts_it(tmp_path: Path) -> None:
    boxes, images = write_corner_csv(tmp_path, photos=2)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"a": "kept", "b": None}))
    report = crop_boxes(boxes, images, tmp_path / "out", mapping=mapping)
    assert report.per_class == {"kept": 2} and report.skipped["dropped"] == 2


def box_iou(a, b) -> float:  # written out again here, so the test does not trust the code it checks
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_background_crops_overlap_no_box_and_are_cut_with_the_crop_geometry(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    pixels = write_image(images / "big.png", random_pixels(120, 160, seed=9))
    pixels = np.asarray(Image.open(pixels))
    boxes = [(10, 10, 30, 20), (60, 50, 25, 25), (100, 80, 40, 30)]
    (tmp_path / "boxes.csv").write_text("image_name,x_min,y_min,x_max,y_max,class_name\n" + "".join(
        f"big.png,{x},{y},{x + w},{y + h},can\n" for x, y, w, h in boxes))
    report = crop_boxes(tmp_path / "boxes.csv", images, tmp_path / "out", mapping="none", background=4, zoom=1.2,
                        square=True, seed=1)
    listed = pd.read_csv(tmp_path / "out" / "manifest-crop-train.csv")
    background = listed[listed["class"] == "background"]
    assert len(background) == 4 and report.per_class == {"can": 3, "background": 4}
    for row in background.itertuples():
        region = (row.x, row.y, row.width, row.height)
        assert all(box_iou(region, other) < 0.1 for other in boxes)
        assert (row.width, row.height) in {(w, h) for _, _, w, h in boxes}  # sized like the boxes
        expected = CropGeometry(square=True, zoom=1.2).crop(pixels, region)
        np.testing.assert_array_equal(read(tmp_path / "out" / row.path), expected)
    # A photo too full for them: counted, not a crash.
    full = crop_boxes(tmp_path / "boxes.csv", images, tmp_path / "full", mapping="none", background=40, seed=1)
    assert full.skipped.get("background_not_placed", 0) > 0


MALFORMED = {  # box format -> (file contents by name, what prepare crop skips)
    "corner CSV": ({"boxes.csv": "image_name,x_min,y_min,x_max,y_max,class_name\n"
                                 "a.png,1,1,9,9,glass\n"     # the good box
                                 "a.png,abc,1,9,9,glass\n"   # not a number
                                 "a.png,9,1,1,9,glass\n"     # right of its left
                                 "gone.png,1,1,9,9,glass\n"  # no such image
                                 "a.png,50,40,60,50,glass\n"  # outside the image
                                 "a.png,1,1,9,9,\n"},         # no class, and train/ needs one
                   {"invalid_box": 2, "unknown_image": 1, "outside_image": 1, "no_class": 1}),
    "COCO results": ({"results.json": json.dumps([
        {"image_id": 1, "bbox": [1, 1, 8, 8], "score": 0.9, "category_id": 1},
        "not a box",
        {"image_id": 1, "bbox": [1, 1, 8, 8], "score": 0.9, "category_id": 9},
        {"image_id": 42, "bbox": [1, 1, 8, 8], "score": 0.9, "category_id": 1},
        {"image_id": 1, "bbox": [1, 1, -8, 8], "score": 0.9, "category_id": 1},
        {"image_id": 1, "bbox": [1, 1, 8, 8], "score": "high", "category_id": 1},
    ])}, {"not_an_object": 1, "unknown_category": 1, "unknown_image": 1, "invalid_box": 1, "invalid_score": 1}),
    "YOLO": ({"labels/a.txt": "0 0.2 0.2 0.2 0.2\n0 0.5\n5 0.5 0.5 0.1 0.1\n0 1.5 1.5 0.2 0.2\n",
              "labels/ghost.txt": "0 0.5 0.5 0.1 0.1\n"},
             {"malformed_line": 1, "unknown_category": 1, "outside_image": 1, "unknown_image": 1}),
}


@pytest.mark.parametrize("box_format", list(MALFORMED))
def test_prepare_crop_counts_every_malformed_row_of_each_box_format(box_format: str, tmp_path: Path) -> None:
    files, expected = MALFORMED[box_format]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(content)
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "images" / name, random_pixels(HEIGHT, WIDTH, seed=len(name)))
    image_list = tmp_path / "annotations.json"
    image_list.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                                      "annotations": [], "categories": [{"id": 1, "name": "glass"}]}))
    (tmp_path / "names.txt").write_text("glass\nmetal\n")

    report = crop_boxes(tmp_path / Path(next(iter(files))).parts[0], tmp_path / "images", tmp_path / "out",
                        image_list=image_list, names=tmp_path / "names.txt", mapping="none")

    assert report.written == 1 and report.per_class == {"glass": 1}
    assert report.skipped == expected
    assert f"skipped {sum(expected.values())} (" in report.summary()


def test_crop_with_a_test_share_removes_nothing_while_either_split_holds_a_persons_file(tmp_path: Path) -> None:
    boxes, images = write_corner_csv(tmp_path)
    dst = tmp_path / "out"
    crop_boxes(boxes, images, dst, mapping="none", split="pseudolabel", test=0.5)
    write_image(dst / "images_square" / "test" / "a" / "mine.png", random_pixels(8, 8, seed=1))
    before = snapshot(dst)
    with pytest.raises(UserInputError, match="mine.png"):
        crop_boxes(boxes, images, dst, mapping="none", split="pseudolabel", test=0.5, seed=1, overwrite=True)
    assert snapshot(dst) == before  # pseudolabel/ (sorted first) was not cleared either
