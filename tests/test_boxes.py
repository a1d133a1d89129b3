"""Litter in the wild: boxes in (every format, bad rows counted), one crop geometry at training and inference,
`predict --boxes` (COCO results; --relabel, annotations) and `evaluate-boxes` (COCO mAP, box-level confusion)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detect_waste_cls import predict_boxes as predict_boxes_module
from detect_waste_cls.cli import main
from detect_waste_cls.data.boxes import read_boxes
from detect_waste_cls.data.crops import CropGeometry, recorded_geometry
from detect_waste_cls.data.prepare_crops import crop_boxes
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.evaluate_boxes import evaluate_boxes
from detect_waste_cls.export import load_model
from detect_waste_cls.predict_boxes import PhotoCrops, predict_boxes

from conftest import final_checkpoint, train_args

WIDTH, HEIGHT = 64, 48
# The file's ids are not the model's: its classes sort as background, glass, paper (model ids 1, 2, 3).
CATEGORIES = {1: "glass", 2: "paper", 7: "background"}
COLOUR_OF = {"glass": (30, 160, 60), "paper": (220, 40, 40), "background": (90, 90, 90)}


def write_scene(path: Path, seed: int) -> list[tuple[str, list[float]]]:
    """A noisy dark photo with a green, a red and a grey patch; returns (class, COCO bbox) per patch."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(20, 15, (HEIGHT, WIDTH, 3)), 0, 255)
    boxes = []
    for number, name in enumerate(COLOUR_OF):
        w, h = int(rng.integers(8, 16)), int(rng.integers(6, 12))
        x, y = 2 + 21 * number + int(rng.integers(0, 4)), int(rng.integers(0, HEIGHT - h))
        pixels[y:y + h, x:x + w] = np.clip(np.asarray(COLOUR_OF[name]) + rng.normal(0, 20, (h, w, 3)), 0, 255)
        boxes.append((name, [x + 0.5, y + 0.25, w - 1.0, h - 0.5]))  # fractional, as detectors give them
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return boxes


def write_coco(folder: Path, photos: int, first_seed: int = 0) -> Path:
    """Photos in folder/images/ (one in a subfolder) and their COCO annotations."""
    images, annotations = [], []
    for image_id in range(1, photos + 1):
        file_name = f"{'sub/' if image_id == 1 else ''}scene_{image_id}.png"
        images.append({"id": image_id, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        for name, bbox in write_scene(folder / "images" / file_name, first_seed + image_id):
            category = next(number for number, known in CATEGORIES.items() if known == name)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = folder / "annotations.json"
    categories = [{"id": number, "name": name} for number, name in CATEGORIES.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


GEOMETRY = CropGeometry(square=True, zoom=1.25)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A simple-cnn trained on `prepare crop` output of its scenes; (annotations, images, checkpoint)."""
    root = tmp_path_factory.mktemp("wild")
    annotations = write_coco(root / "photos", photos=10)
    for split in ("train", "test"):
        crop_boxes(annotations, root / "photos" / "images", root / "data", square=GEOMETRY.square,
                  zoom=GEOMETRY.zoom, mapping="none", split=split)
    assert main(train_args(root / "data", root / "run", "--epochs", "4")) == 0
    return annotations, root / "photos" / "images", final_checkpoint(root / "run")


# ---------------------------------------------------------------- boxes in


def test_every_format_reads_into_the_same_table(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path, photos=2)
    images = tmp_path / "images"
    coco = json.loads(annotations.read_text())
    file_of = {image["id"]: image["file_name"] for image in coco["images"]}
    name_of = {category["id"]: category["name"] for category in coco["categories"]}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": a["image_id"], "bbox": a["bbox"], "category_id": a["category_id"],
                                    "score": 0.5} for a in coco["annotations"]]))
    corners = tmp_path / "corners.csv"
    pd.DataFrame([{"image_name": file_of[a["image_id"]], "x_min": a["bbox"][0], "y_min": a["bbox"][1],
                   "x_max": a["bbox"][0] + a["bbox"][2], "y_max": a["bbox"][1] + a["bbox"][3],
                   "class_name": name_of[a["category_id"]]} for a in coco["annotations"]]).to_csv(corners, index=False)
    yolo, names = tmp_path / "labels", list(CATEGORIES.values())
    yolo.mkdir()
    for image_id, file_name in file_of.items():
        lines = [f"{names.index(name_of[a['category_id']])} {(a['bbox'][0] + a['bbox'][2] / 2) / WIDTH} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / HEIGHT} {a['bbox'][2] / WIDTH} {a['bbox'][3] / HEIGHT}"
                 for a in coco["annotations"] if a["image_id"] == image_id]
        (yolo / f"{Path(file_name).stem}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text(json.dumps({"names": names}))  # JSON is YAML
    image_list = tmp_path / "images.csv"
    pd.DataFrame({"image_id": list(file_of), "file_name": list(file_of.values())}).to_csv(image_list, index=False)

    tables = {
        "coco": read_boxes(annotations, images=images),
        "results": read_boxes(results, images=images, image_list=annotations),
        "results, image list": read_boxes(results, images=images, image_list=image_list),
        "corners": read_boxes(corners, images=images),
        "yolo": read_boxes(yolo, images=images, names=tmp_path / "data.yaml"),
    }
    expected = tables["coco"].boxes
    assert len(expected) == 6 and expected["score"].isna().all()
    for form, read in tables.items():
        assert read.report.problems == [], form
        boxes = read.boxes.sort_values(["file_name", "x"]).reset_index(drop=True)
        reference = expected.sort_values(["file_name", "x"]).reset_index(drop=True)
        assert list(boxes["file_name"]) == list(reference["file_name"]), form
        if form != "results, image list":  # no categories: no class names
            assert list(boxes["class_name"]) == list(reference["class_name"]), form
        np.testing.assert_allclose(boxes[["x", "y", "width", "height"]], reference[["x", "y", "width", "height"]],
                                   atol=1e-6, err_msg=form)
    assert (tables["results"].boxes["score"] == 0.5).all()
    # Formats without image ids number the folder's images in path order, so two such files agree.
    assert dict(zip(tables["corners"].images["file_name"], tables["corners"].images["image_id"])) == {
        "scene_2.png": 1, "sub/scene_1.png": 2}


def test_every_malformed_row_in_each_format_is_counted_and_named(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path, photos=1)
    images = tmp_path / "images"
    coco = json.loads(annotations.read_text())
    coco["images"].append({"id": 9, "file_name": "gone.png", "width": WIDTH, "height": HEIGHT})
    coco["images"].append({"id": 8, "file_name": "sub/scene_1.png", "width": HEIGHT, "height": WIDTH})  # sideways
    good = coco["annotations"][0]
    coco["annotations"] += [
        {**good, "bbox": [1, 2, 0, 5]},                 # zero width
        {**good, "bbox": [1, 2, "x", 5]},               # not a number
        {key: value for key, value in good.items() if key != "bbox"},  # no box
        {**good, "bbox": [70, 2, 5, 5]},                # outside the image
        {**good, "image_id": 99},                       # unknown image
        {**good, "image_id": 9},                        # image file missing
        {**good, "image_id": 8},                        # size disagrees with the file
        {**good, "category_id": 5},                     # unknown category
        {**good, "category_id": [1]},                   # not an id
        {**good, "image_id": {"id": 1}},                # not an id
        "not an annotation",
    ]
    coco_file = tmp_path / "bad.json"
    coco_file.write_text(json.dumps(coco))
    read = read_boxes(coco_file, images=images)
    assert len(read.boxes) == 3
    assert read.report.skipped == {"invalid_box": 3, "outside_image": 1, "unknown_image": 2, "missing_image": 1,
                                   "image_size_mismatch": 1, "unknown_category": 2, "not_an_object": 1}
    assert (str(coco_file), "annotations[3]", "invalid_box") in read.report.problems
    assert "annotations[3]: invalid_box" in read.report.summary()

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1, "score": 0.9},
                                   {"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1, "score": "high"},
                                   {"image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 1, "score": 0.9},
                                   {"image_id": 1, "bbox": [1, 1, -5, 5], "category_id": 1, "score": 0.9},
                                   {"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 4, "score": 0.9}]))
    read = read_boxes(results, images=images, image_list=annotations)
    assert len(read.boxes) == 1
    assert read.report.skipped == {"invalid_score": 1, "unknown_image": 1, "invalid_box": 1, "unknown_category": 1}
    assert (str(results), "[1]", "invalid_score") in read.report.problems

    corners = tmp_path / "corners.csv"
    corners.write_text("image_name,x_min,y_min,x_max,y_max,class_name\n"
                       "sub/scene_1.png,1,1,9,9,glass\n"
                       "sub/scene_1.png,9,1,1,9,glass\n"        # right of its left edge: negative width
                       "sub/scene_1.png,1,,9,9,glass\n"         # empty field
                       "sub/scene_1.png,one,1,9,9,glass\n"      # not a number
                       "elsewhere.png,1,1,9,9,glass\n"          # not in the image folder
                       "sub/scene_1.png,100,100,120,120,glass\n")  # outside
    read = read_boxes(corners, images=images)
    assert len(read.boxes) == 1
    assert read.report.skipped == {"invalid_box": 3, "unknown_image": 1, "outside_image": 1}
    assert (str(corners), "line 3", "invalid_box") in read.report.problems

    yolo = tmp_path / "labels"
    yolo.mkdir()
    (yolo / "scene_1.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5\n1.5 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"
                                      "0 0.5 0.5 0 0.2\n0 3 3 0.1 0.1\n0 0.5 0.5 0.2 0.2 0.8\n")
    (yolo / "nobody.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "names.txt").write_text("glass\npaper\n")
    read = read_boxes(yolo, images=images, names=tmp_path / "names.txt")
    assert len(read.boxes) == 2 and sorted(read.boxes["score"].fillna(-1)) == [-1, 0.8]
    assert read.report.skipped == {"malformed_line": 2, "unknown_category": 1, "invalid_box": 1,
                                   "outside_image": 1, "unknown_image": 1}
    assert (str(yolo / "scene_1.txt"), "line 2", "malformed_line") in read.report.problems


def test_a_file_of_no_known_format_is_one_clear_error(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "corners.csv").write_text("file,left\na.png,1\n")
    with pytest.raises(UserInputError, match="corners.csv lacks the column"):
        read_boxes(tmp_path / "corners.csv", images=images)
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(UserInputError, match="results.json holds COCO results"):
        read_boxes(tmp_path / "results.json", images=images)
    with pytest.raises(UserInputError, match="needs --images"):
        read_boxes(tmp_path / "corners.csv")


# ---------------------------------------------------------------- one crop geometry


def test_same_box_gives_the_same_pixels_at_training_and_at_inference(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path / "photos", photos=2)
    images = tmp_path / "photos" / "images"
    crop_boxes(annotations, images, tmp_path / "data", square=True, zoom=1.4, mapping="none", split="pseudolabel")
    geometry = recorded_geometry(tmp_path / "data")
    assert geometry == CropGeometry(square=True, zoom=1.4)

    boxes = read_boxes(annotations, images=images).boxes
    annotation_ids = [a["id"] for a in json.loads(annotations.read_text())["annotations"]]
    inference = PhotoCrops(images, boxes, geometry, view=None, size=0)
    checked = 0
    for photo, (file_name, _) in enumerate(inference.photos):
        for position, crop in zip(*inference.crops(photo)):
            crops = tmp_path / "data" / "images_square" / "pseudolabel"
            saved = crops / f"{Path(file_name).stem}_{annotation_ids[position]}.png"
            np.testing.assert_array_equal(np.asarray(Image.open(saved)), crop)
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------- predict --boxes


def test_predict_boxes_writes_coco_results_for_every_box(trained, tmp_path: Path, capsys) -> None:
    annotations, images, checkpoint = trained
    out = tmp_path / "results.json"
    assert main(["predict", "--boxes", str(annotations), "--checkpoint", str(checkpoint), "--images", str(images),
                 "--out", str(out), "--keep-background", "-b", "4"]) == 0
    assert "cropped with square True, zoom 1.25" in capsys.readouterr().out  # what prepare crop recorded

    truth = COCO(str(annotations))
    detections = truth.loadRes(str(out))
    records = json.loads(out.read_text())
    originals = truth.dataset["annotations"]
    assert len(records) == len(originals) == 30
    assert sorted((r["image_id"], tuple(r["bbox"])) for r in records) == sorted(
        (a["image_id"], tuple(a["bbox"])) for a in originals)
    assert {r["category_id"] for r in records} <= set(CATEGORIES) and len(detections.getAnnIds()) == 30
    for record in records:  # the category of the class the model chose, whatever the model's own class order
        chosen = max(record["class_probabilities"], key=record["class_probabilities"].get)
        assert CATEGORIES[record["category_id"]] == chosen
        assert record["score"] == pytest.approx(record["class_probabilities"][chosen])
        assert sum(record["class_probabilities"].values()) == pytest.approx(1, abs=1e-5)

    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == 30 and set(table["class"]) <= set(CATEGORIES.values())
    # The probabilities are the model's, flip-averaged, on the crop prepare crop would have cut.
    model, first = load_model(checkpoint), truth.dataset["annotations"][0]
    pixels = np.asarray(Image.open(images / truth.imgs[first["image_id"]]["file_name"]).convert("RGB"))
    expected = model.predict_images([GEOMETRY.crop(pixels, first["bbox"])], flip_tta=True)[0]
    record = next(r for r in records if r["image_id"] == first["image_id"] and r["bbox"] == first["bbox"])
    np.testing.assert_allclose(list(record["class_probabilities"].values()), expected.numpy(), atol=1e-5)


def test_predict_boxes_scores_filters_and_drops_background(trained, tmp_path: Path) -> None:
    annotations, images, checkpoint = trained
    originals = json.loads(annotations.read_text())["annotations"]
    detector = tmp_path / "detector.json"
    detector.write_text(json.dumps([{"image_id": a["image_id"], "bbox": a["bbox"], "category_id": 1,
                                     "score": (number % 10) / 10} for number, a in enumerate(originals)]))
    common = dict(image_list=annotations, batch_size=5)
    kept = predict_boxes(detector, checkpoint, images, tmp_path / "all.json", keep_background=True,
                         score="product", **common)
    assert kept.written == 30 and kept.skipped == {}
    table = pd.read_csv(tmp_path / "all.csv")
    np.testing.assert_allclose(table["score"], table["classifier_score"] * table["detector_score"])

    report = predict_boxes(detector, checkpoint, images, tmp_path / "some.json", min_score=0.5, score="detector",
                           **common)
    background = int(((table["class"] == "background") & (table["detector_score"] >= 0.5)).sum())
    assert background > 0 and report.skipped == {"below_min_score": 15, "background": background}
    records = json.loads((tmp_path / "some.json").read_text())
    assert len(records) == report.written == 15 - background
    assert all(r["score"] >= 0.5 and CATEGORIES[r["category_id"]] != "background" for r in records)


def test_predict_boxes_decodes_each_photo_once(trained, tmp_path: Path, monkeypatch) -> None:
    annotations, images, checkpoint = trained
    decoded = []
    load_rgb = predict_boxes_module.load_rgb
    monkeypatch.setattr(predict_boxes_module, "load_rgb", lambda path, **options: decoded.append(path) or
                        load_rgb(path, **options))
    predict_boxes(annotations, checkpoint, images, tmp_path / "r.json", keep_background=True, batch_size=2)
    assert len(decoded) == len(set(decoded)) == 10


def test_predict_boxes_refuses_what_it_cannot_do_before_any_work(trained, tmp_path: Path) -> None:
    annotations, images, checkpoint = trained
    taken = tmp_path / "taken.json"
    taken.write_text("[]")
    with pytest.raises(UserInputError, match="taken.json already exists"):
        predict_boxes(annotations, checkpoint, images, taken)
    with pytest.raises(UserInputError, match="--score detector .*have none"):
        predict_boxes(annotations, checkpoint, images, tmp_path / "r.json", score="detector")
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(exported)]) == 0
    config = json.loads((exported / "config.json").read_text())
    del config["crop_geometry"]  # as a model trained on whole photos has none
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="--square or --no-square, and --zoom"):
        predict_boxes(annotations, exported, images, tmp_path / "r.json")
    other = json.loads(annotations.read_text())
    other["categories"] = [{"id": 1, "name": "litter"}]
    other["annotations"] = [{**a, "category_id": 1} for a in other["annotations"]]
    (tmp_path / "litter.json").write_text(json.dumps(other))
    with pytest.raises(UserInputError, match="--categories model"):
        predict_boxes(tmp_path / "litter.json", checkpoint, images, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.csv").exists()
    report = predict_boxes(tmp_path / "litter.json", exported, images, tmp_path / "r.json", categories="model",
                           square=True, zoom=1.25, keep_background=True)
    assert report.written == 30
    assert {r["category_id"] for r in json.loads((tmp_path / "r.json").read_text())} <= {1, 2, 3}


def write_unlabeled(annotations: Path, out: Path) -> Path:
    """The scenes as a TACO-like file: every paper box and the glass boxes of odd photos are "Unlabeled litter"
    (id 9), and the file has no paper category; extra fields everywhere, as real files have."""
    coco = json.loads(annotations.read_text())
    coco["info"], coco["licenses"] = {"description": "wild"}, [{"id": 1, "name": "CC BY 4.0"}]
    coco["categories"] = [{**c, "supercategory": "litter"} for c in coco["categories"] if c["name"] != "paper"]
    coco["categories"].append({"id": 9, "name": "Unlabeled litter", "supercategory": "litter"})
    for annotation in coco["annotations"]:
        annotation["segmentation"] = [[0, 0, 1, 0, 1, 1]]
        if annotation["category_id"] == 2 or (annotation["category_id"] == 1 and annotation["image_id"] % 2):
            annotation["category_id"] = 9
    out.write_text(json.dumps(coco, indent=2))
    return out


def relabel_args(annotations: Path, checkpoint: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--boxes", str(annotations), "--checkpoint", str(checkpoint), "--images", str(images),
            "--out", str(out), "--relabel", "unlabeled litter", *extra]


def test_relabel_classifies_the_unlabeled_boxes_into_a_new_annotations_file(trained, tmp_path: Path,
                                                                            capsys) -> None:
    annotations, images, checkpoint = trained
    source = write_unlabeled(annotations, tmp_path / "taco.json")
    given, out = source.read_bytes(), tmp_path / "relabeled.json"
    assert main(relabel_args(source, checkpoint, images, out, "--review", "4", "-b", "4")) == 0
    assert source.read_bytes() == given
    printed = capsys.readouterr().out
    assert "relabeled" in printed and "label-studio export --data" in printed

    original, relabeled = json.loads(given), json.loads(out.read_text())
    assert {key: value for key, value in relabeled.items() if key not in ("annotations", "categories")} == {
        key: value for key, value in original.items() if key not in ("annotations", "categories")}
    assert relabeled["categories"] == original["categories"] + [{"id": 10, "name": "paper"}]  # the model's, added
    coco = COCO(str(out))
    assert {a["category_id"] for a in relabeled["annotations"]} <= set(coco.getCatIds())
    unlabeled = [number for number, a in enumerate(original["annotations"]) if a["category_id"] == 9]
    changed = [number for number, a in enumerate(relabeled["annotations"]) if "classifier_score" in a]
    assert len(unlabeled) == 15 and set(changed) <= set(unlabeled) and len(changed) >= 10
    for number, (before, after) in enumerate(zip(original["annotations"], relabeled["annotations"], strict=True)):
        if number not in changed:
            assert after == before  # every value as it was; the background ones keep their category
            continue
        chosen = max(after["class_probabilities"], key=after["class_probabilities"].get)
        assert coco.cats[after["category_id"]]["name"] == chosen != "background"
        assert after["classifier_score"] == pytest.approx(after["class_probabilities"][chosen])
        assert {key: value for key, value in after.items() if key not in (
            "category_id", "classifier_score", "class_probabilities")} == {
            key: value for key, value in before.items() if key != "category_id"}
    assert len(pd.read_csv(out.with_suffix(".csv"))) == len(changed)

    # The 4 least confident, least first, cut as the model's training crops were, go to Label Studio.
    review = tmp_path / "relabeled-review"
    selection = pd.read_csv(review / "selection.csv")
    scores = sorted(relabeled["annotations"][number]["classifier_score"] for number in changed)
    np.testing.assert_allclose(selection["confidence"], scores[:4], rtol=1e-6)
    by_name = {f"{Path(coco.imgs[a['image_id']]['file_name']).stem}_{a['id']}.png": a
               for a in relabeled["annotations"]}
    for path, predicted in zip(selection["path"], selection["predicted"]):
        box = by_name[Path(path).name]
        assert coco.cats[box["category_id"]]["name"] == predicted
        pixels = np.asarray(Image.open(images / coco.imgs[box["image_id"]]["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(path)), GEOMETRY.crop(pixels, box["bbox"]))
    project = tmp_path / "project"
    assert main(["label-studio", "export", "--data", str(review), "--selection", str(review / "selection.csv"),
                 "--out", str(project)]) == 0
    tasks = json.loads((project / "tasks.json").read_text())
    assert [task["data"]["path"] for task in tasks] == list(selection["path"])
    assert [task["predictions"][0]["result"][0]["value"]["choices"] for task in tasks] == [
        [name] for name in selection["predicted"]]


def test_relabel_never_overwrites_and_refuses_before_any_work(trained, tmp_path: Path, capsys) -> None:
    annotations, images, checkpoint = trained
    source = write_unlabeled(annotations, tmp_path / "taco.json")
    given = source.read_bytes()
    (tmp_path / "taken.csv").write_text("mine")
    for out, extra, message in ((source, (), "is the --boxes file"),
                                (tmp_path / "taken.json", (), "taken.csv already exists"),
                                (tmp_path / "new" / "r.json", ("--categories", "model"), "leave out --categories")):
        with pytest.raises(UserInputError, match=message):
            predict_boxes(source, checkpoint, images, out, relabel="Unlabeled litter",
                          categories=extra[1] if extra else "boxes")
    with pytest.raises(UserInputError, match="'unknown': .* has no such category .*Unlabeled litter"):
        predict_boxes(source, checkpoint, images, tmp_path / "new" / "r.json", relabel="unknown")
    with pytest.raises(UserInputError, match="needs a COCO annotations file"):
        predict_boxes(tmp_path / "taken.csv", checkpoint, images, tmp_path / "new" / "r.json", relabel="unknown")
    with pytest.raises(UserInputError, match="--review N: .* --relabel"):
        predict_boxes(annotations, checkpoint, images, tmp_path / "new" / "r.json", review=3)
    with pytest.raises(SystemExit):
        main(relabel_args(source, checkpoint, images, tmp_path / "new" / "r.json", "--review", "-1"))
    assert "argument --review: -1: must be >= 0" in capsys.readouterr().err
    assert source.read_bytes() == given
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taco.json", "taken.csv"]


@pytest.mark.parametrize("relabel", [None, "Unlabeled litter"])
def test_a_failure_while_writing_leaves_no_output_and_the_retry_works(trained, tmp_path: Path, monkeypatch,
                                                                      relabel) -> None:
    annotations, images, checkpoint = trained
    source = annotations if relabel is None else write_unlabeled(annotations, tmp_path / "taco.json")
    out = tmp_path / "new" / "out.json"  # its parent is made for it, and goes with it
    options = {} if relabel is None else {"relabel": relabel}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(pd.DataFrame, "to_csv", disk_full)  # the JSON is written by then
        with pytest.raises(OSError, match="disk full"):
            predict_boxes(source, checkpoint, images, out, **options)
    assert [path for path in tmp_path.iterdir() if path != source] == []
    report = predict_boxes(source, checkpoint, images, out, **options)
    assert sorted(path.name for path in out.parent.iterdir()) == sorted(path.name for path in report.outputs)
    assert len(report.outputs) == (3 if relabel else 2)


MOVED_GEOMETRY = CropGeometry(square=False, zoom=1.5)


@pytest.fixture(scope="module")
def moved_dataset(tmp_path_factory):
    """A simple-cnn trained on `prepare crop` output, whose dataset folder was then renamed;
    (annotations, images, run folder, the dataset's new place)."""
    root = tmp_path_factory.mktemp("moved")
    annotations = write_coco(root / "photos", photos=6)
    crop_boxes(annotations, root / "photos" / "images", root / "data", square=MOVED_GEOMETRY.square,
              zoom=MOVED_GEOMETRY.zoom, mapping="none", split="train")
    assert main(train_args(root / "data", root / "run", "--epochs", "1")) == 0
    (root / "data").rename(root / "renamed")
    return annotations, root / "photos" / "images", root / "run", root / "renamed"


def assert_classifies_the_prepared_crops(model_path: Path, moved_dataset, out: Path) -> None:
    """predict --boxes without geometry flags classifies each box as the model classifies prepare crop's own crop
    of it (a PNG, so the same pixels)."""
    annotations, images, _, dataset = moved_dataset
    assert main(["predict", "--boxes", str(annotations), "--checkpoint", str(model_path), "--images", str(images),
                 "--out", str(out), "--keep-background"]) == 0
    records = {(r["image_id"], tuple(r["bbox"])): r for r in json.loads(out.read_text())}
    boxes = {a["id"]: (a["image_id"], tuple(a["bbox"])) for a in json.loads(annotations.read_text())["annotations"]}
    crops = pd.read_csv(dataset / "manifest-crop-train.csv")
    assert len(records) == len(boxes) == len(crops) == 18
    model = load_model(model_path)
    prepared = [np.asarray(Image.open(dataset / path).convert("RGB")) for path in crops["path"]]
    expected = model.predict_images(prepared, flip_tta=True).numpy()
    got = [list(records[boxes[box_id]]["class_probabilities"].values()) for box_id in
           crops["box_id"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_model_whose_dataset_moved_predicts_boxes_with_its_recorded_geometry(moved_dataset, tmp_path: Path,
                                                                              capsys) -> None:
    run = moved_dataset[2]
    assert_classifies_the_prepared_crops(run, moved_dataset, tmp_path / "results.json")
    assert "cropped with square False, zoom 1.5" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["recorded"]["crop_geometry"] == {"square": False,
                                                                                          "zoom": 1.5}


def test_an_exported_model_predicts_boxes_with_its_recorded_geometry(moved_dataset, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(moved_dataset[2]), "--out", str(exported)]) == 0
    assert_classifies_the_prepared_crops(exported, moved_dataset, tmp_path / "results.json")
    assert json.loads((exported / "config.json").read_text())["crop_geometry"] == {"square": False, "zoom": 1.5}
    assert "square False, zoom 1.5" in (exported / "README.md").read_text()


# ---------------------------------------------------------------- evaluate-boxes


def hand_built_case(tmp_path: Path) -> tuple[Path, Path]:
    """Two images, two classes: hits, a wrong class, a duplicate, a miss and a false positive."""
    truth = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "glass"}, {"id": 2, "name": "paper"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [60, 10, 20, 30], "area": 600, "iscrowd": 0},
        ],
    }
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 12, 20, 19], "score": 0.9},   # glass hit
        {"image_id": 1, "category_id": 1, "bbox": [52, 50, 28, 22], "score": 0.8},   # paper box called glass
        {"image_id": 1, "category_id": 1, "bbox": [10, 11, 21, 20], "score": 0.3},   # duplicate of the first
        {"image_id": 2, "category_id": 1, "bbox": [2, 1, 36, 40], "score": 0.7},     # glass hit
        {"image_id": 2, "category_id": 2, "bbox": [70, 70, 20, 20], "score": 0.6},   # false positive
        {"image_id": 2, "category_id": 2, "bbox": [60, 14, 20, 30], "score": 0.5},   # paper hit (IoU 0.87)
    ]
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    return tmp_path / "truth.json", tmp_path / "detections.json"


def test_evaluate_boxes_matches_pycocotools_on_a_hand_built_case(tmp_path: Path) -> None:
    truth, detections = hand_built_case(tmp_path)
    assert main(["evaluate-boxes", "--ground-truth", str(truth), "--detections", str(detections),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    coco = COCO(str(truth))
    evaluation = COCOeval(coco, coco.loadRes(str(detections)), "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert metrics["map"] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert metrics["map_50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
    for category_id, name in ((1, "glass"), (2, "paper")):
        evaluation.params.catIds = [category_id]
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        assert metrics["per_class"][name]["ap"] == pytest.approx(evaluation.stats[0], abs=1e-6)
        assert metrics["per_class"][name]["ap_50"] == pytest.approx(evaluation.stats[1], abs=1e-6)

    # Matched greedily by score at IoU >= 0.5: three right, one paper box called glass; the duplicate and
    # the false positive match nothing.
    assert metrics["matched"] == 4 and metrics["box_accuracy"] == 0.75
    assert metrics["unmatched_detections"] == 2 and metrics["missed_ground_truth"] == 0
    assert metrics["confusion"] == {"glass": {"glass": 2, "paper": 0}, "paper": {"glass": 1, "paper": 1}}
    confusion = pd.read_csv(tmp_path / "eval" / "confusion.csv", index_col=0)
    assert confusion.loc["paper", "glass"] == 1
    assert "mAP@0.5" in (tmp_path / "eval" / "report.md").read_text()


def test_a_classifier_right_on_every_ground_truth_box_scores_map_50_of_one(tmp_path: Path) -> None:
    truth, _ = hand_built_case(tmp_path)
    annotations = json.loads(truth.read_text())["annotations"]
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{**copy.deepcopy(a), "score": 0.4 + a["id"] / 10} for a in annotations]))
    metrics = evaluate_boxes(truth, perfect, tmp_path / "eval")
    assert metrics["map_50"] == 1.0 and metrics["map"] == 1.0 and metrics["box_accuracy"] == 1.0

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    with pytest.raises(UserInputError, match="taken already exists"):
        evaluate_boxes(truth, perfect, tmp_path / "taken")
