
import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, make_tree, write_image
from detect_waste_cls.data.images import load_rgb, resolve_images_square, scan_labeled_folder
from detect_waste_cls.config import DataConfig, PseudoConfig
from detect_waste_cls.data.datamodule import DatasetLayout, WasteDataModule
from detect_waste_cls.models.backbones import IMAGENET_NORMALIZATION
from detect_waste_cls.errors import UserInputError


def test_classes_are_sorted_train_subfolders_and_test_may_hold_a_subset(tmp_path):
    root = make_tree(tmp_path, {"train": {"paper": 2, "glass": 2, "metal": 2}, "test": {"metal": 1}})
    layout = DatasetLayout.discover(root, val_split=0)
    assert layout.classes == ["glass", "metal", "paper"]
    assert layout.test.targets == [1]


def test_test_class_missing_from_train_is_an_error_naming_it(tmp_path):
    root = make_tree(tmp_path, {"train": {"glass": 2, "metal": 2}, "test": {"paper": 1}})
    with pytest.raises(UserInputError, match="paper"):
        DatasetLayout.discover(root)


def test_data_may_point_at_root_or_images_square(tiny_tree):
    assert resolve_images_square(tiny_tree) == resolve_images_square(tiny_tree / "images_square")


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(UserInputError, match=str(tmp_path / "nowhere")):
        resolve_images_square(tmp_path / "nowhere")
    root = make_tree(tmp_path, {"train": {"glass": 2}})
    (root / "images_square" / "train" / "metal").mkdir()
    with pytest.raises(UserInputError, match="metal"):
        DatasetLayout.discover(root)


def test_jpegs_decode_at_reduced_size_only_as_far_as_the_views_need(tmp_path):
    from detect_waste_cls.data.datasets import ImageDataset
    from detect_waste_cls.data.transforms import EvalPreset, TrainPreset

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), np.ones((32, 32, 1), np.uint8))
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)  # 384 x 512, as TrashNet's
    Image.fromarray(smooth).save(tmp_path / "photo.png")
    full = load_rgb(tmp_path / "photo.jpg")
    assert full.shape == (384, 512, 3)
    assert load_rgb(tmp_path / "photo.jpg", min_side=142).shape == (192, 256, 3)  # 1/2: both sides stay >= 142
    assert load_rgb(tmp_path / "photo.jpg", min_side=40).shape == (48, 64, 3)  # 1/8 at most
    assert load_rgb(tmp_path / "photo.jpg", min_side=200).shape == full.shape  # 1/2 would leave 192 < 200
    assert load_rgb(tmp_path / "photo.png", min_side=40).shape == full.shape  # only JPEG decodes at reduced size
    # Same picture: the reduced decode matches the full one downscaled by block averages.
    half = load_rgb(tmp_path / "photo.jpg", min_side=142).astype(float)
    averaged = full.reshape(192, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - averaged).mean() < 3

    normalization = IMAGENET_NORMALIZATION
    views = {"image": TrainPreset(size=112, normalization=normalization),
             "eval_image": EvalPreset(size=64, normalization=normalization, interpolation="bilinear")}
    assert ImageDataset([tmp_path / "photo.jpg"], views).decode_side == 142  # the larger view's resize
    assert ImageDataset([tmp_path / "photo.jpg"], {"image": lambda image: image}).decode_side is None


def test_odd_images_become_upright_rgb_and_corrupt_ones_are_skipped(tmp_path, caplog):
    folder = tmp_path / "train" / "glass"
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :10] = 255  # left half white
    folder.mkdir(parents=True)
    Image.fromarray(rgb).convert("L").save(folder / "gray.PNG")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.JPG")
    Image.fromarray(rgb).convert("P").save(folder / "palette.bmp")
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(folder / "transparent.webp", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.fromarray(rgb).save(folder / "rotated.jpeg", exif=exif)
    (folder / "corrupt.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")

    with caplog.at_level("WARNING"):
        images = scan_labeled_folder(tmp_path / "train")
    assert sorted(p.name for p in images.paths) == ["cmyk.JPG", "gray.PNG", "palette.bmp", "rotated.jpeg", "transparent.webp"]
    assert [p.name for p in images.skipped] == ["corrupt.jpg"] and "corrupt.jpg" in caplog.text
    for path in images.paths:
        assert load_rgb(path).ndim == 3 and load_rgb(path).shape[2] == 3
    assert load_rgb(folder / "rotated.jpeg").shape == (20, 10, 3)
    assert (load_rgb(folder / "transparent.webp") == 255).all()  # composited on white, not black
    with pytest.raises(UserInputError, match="corrupt.jpg"):
        load_rgb(folder / "corrupt.jpg")


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    root = make_tree(tmp_path, {"train": {"glass": 10, "metal": 20, "paper": 5}, "test": {"glass": 1}})
    layout = DatasetLayout.discover(root, val_split=0.2, seed=3)
    assert layout.val.class_counts() == [2, 4, 1]
    assert not set(layout.val.paths) & set(layout.train.paths)
    assert len(layout.val.paths) + len(layout.train.paths) == 35
    assert DatasetLayout.discover(root, val_split=0.2, seed=3).val.paths == layout.val.paths
    assert DatasetLayout.discover(root, val_split=0.2, seed=4).val.paths != layout.val.paths
    assert DatasetLayout.discover(root, val_split=0).val.paths == layout.test.paths


def test_pseudolabel_order_and_folder_labels_do_not_depend_on_folder_names(tmp_path):
    root = make_tree(tmp_path, {"train": {name: 2 for name in COLOURS}}, pseudo=9, pseudo_subfolders=True)
    before = DatasetLayout.discover(root).pseudo
    assert sorted(set(before.folder_targets)) == [0, 1, 2]
    pseudo_dir = root / "images_square" / "pseudolabel"
    for i, name in enumerate(COLOURS):
        (pseudo_dir / name).rename(pseudo_dir / f"hidden{i}")
    after = DatasetLayout.discover(root).pseudo
    assert [p.name for p in after.paths] == [p.name for p in before.paths]
    assert set(after.folder_targets) == {-1}


def test_pseudo_mode_without_pseudolabel_images_is_refused(tmp_path):
    root = make_tree(tmp_path, {"train": {"glass": 4, "metal": 4}})
    with pytest.raises(UserInputError, match="pseudolabel"):
        WasteDataModule(DataConfig(root=str(root), image_size=32), normalization=IMAGENET_NORMALIZATION,
                        interpolation="bilinear", pseudo=PseudoConfig(mode="per_epoch"))


def test_batches_carry_indices_targets_and_normalized_images(tiny_tree):
    module = WasteDataModule(DataConfig(root=str(tiny_tree), image_size=32, batch_size=4, num_workers=0),
                             normalization=IMAGENET_NORMALIZATION, interpolation="bilinear",
                             pseudo=PseudoConfig(mode="per_batch"))
    batch = next(iter(module.train_dataloader()["labeled"]))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["target"].shape == (4,)
    pseudo = next(iter(module.train_dataloader()["pseudo"]))
    assert set(pseudo) == {"index", "image", "eval_image"}  # no folder label can reach the loss
    paths = module.layout.train.paths
    for index, target in zip(batch["index"].tolist(), batch["target"].tolist()):
        assert paths[index].parent.name == module.classes[target]


def test_transforms_handle_images_smaller_than_the_crop(tmp_path):
    from detect_waste_cls.data.transforms import EvalPreset, TrainPreset

    image = load_rgb(write_image(tmp_path / "x.png", (1, 2, 3), size=7))
    assert TrainPreset(size=64, normalization=IMAGENET_NORMALIZATION)(image).shape == (3, 64, 64)
    assert EvalPreset(size=64, normalization=IMAGENET_NORMALIZATION, interpolation="bilinear")(image).shape == (3, 64, 64)


def test_each_dataloader_worker_augments_differently_and_reproducibly(tmp_path):
    from functools import partial

    import torch
    from torch.utils.data import DataLoader

    from detect_waste_cls.data.datasets import ImageDataset, seed_worker_augmentations
    from detect_waste_cls.data.transforms import TrainPreset

    image = write_image(tmp_path / "one.png", (120, 80, 40), size=48)

    def augmented(rank):
        torch.manual_seed(0)
        dataset = ImageDataset([image] * 4, {"image": TrainPreset(size=32, normalization=IMAGENET_NORMALIZATION, seed=1)})
        loader = DataLoader(dataset, batch_size=2, num_workers=2,
                            worker_init_fn=partial(seed_worker_augmentations, rank=rank))
        return [batch["image"] for batch in loader]  # batch 0 from worker 0, batch 1 from worker 1

    first, again, other_rank = augmented(0), augmented(0), augmented(1)
    assert not torch.equal(first[0], first[1])  # workers do not replay one stream
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same seeds, same augmentations
    assert not torch.equal(first[0], other_rank[0])  # DDP ranks differ too
