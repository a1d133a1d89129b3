"""Issue 11's acceptance run: TrashNet plus three broken and four odd-but-valid files trains to the end.

    python experiments/broken_files_run.py --trashnet ../shared/data/trashnet --work /tmp/tn-broken

Builds a 64 px copy of TrashNet with `prepare split`, adds to its train/glass folder a zero-byte
.jpg, a JPEG cut to a third of its length, a text file named .jpg (the broken three), a CMYK JPEG,
a 16-bit grayscale PNG, an RGBA PNG (odd but valid) and a .DS_Store, trains one epoch, and checks
that skipped_files.txt names exactly the broken three while the odd ones are among the training images.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from detect_waste_cls.cli import main
from detect_waste_cls.data.datamodule import DatasetLayout
from detect_waste_cls.run_folder import SKIPPED_FILES


def add_files(folder: Path, photo: Path) -> tuple[list[Path], list[Path]]:
    """The broken three and the odd-but-valid three (plus a .DS_Store, which is not an image at all)."""
    broken = [folder / "zero-bytes.jpg", folder / "cut-to-a-third.jpg", folder / "text.jpg"]
    broken[0].write_bytes(b"")
    data = photo.read_bytes()
    broken[1].write_bytes(data[: len(data) // 3])
    broken[2].write_text("this is not an image\n")
    odd = [folder / "cmyk.jpg", folder / "sixteen-bit.png", folder / "rgba.png"]
    with Image.open(photo) as image:
        image.convert("CMYK").save(odd[0])
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(odd[1])  # mode I;16
        rgba = image.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(odd[2])
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    return broken, odd


def run(trashnet: Path, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    assert main(["prepare", "split", "--src", str(trashnet), "--dst", str(work / "data"), "--test", "0.2",
                 "--size", "64", "--seed", "0"]) == 0
    train_glass = work / "data" / "images_square" / "train" / "glass"
    broken, odd = add_files(train_glass, next(iter(sorted(train_glass.glob("*.jpg")))))
    out = work / "run"
    assert main(["train", "--data", str(work / "data"), "--out", str(out), "--img-size", "64", "--epochs", "1",
                 "-b", "32", "--num-workers", "2", "--val-split", "0.1", "--seed", "0", "--no-progress-bar"]) == 0
    skipped = sorted(Path(line) for line in (out / SKIPPED_FILES).read_text().splitlines())
    layout = DatasetLayout.discover(work / "data", val_split=0.1, seed=0)
    split_of = {**{p: "train" for p in layout.train.paths}, **{p: "val" for p in layout.val.paths}}
    print(f"\n{SKIPPED_FILES}:", *skipped, sep="\n  ")
    print("odd but valid:", *[f"{p.name}: {split_of.get(p, 'not used')}" for p in odd], sep="\n  ")
    assert skipped == sorted(broken), skipped
    # The validation carve-out (10% per class, seeded) decides whether an odd file trains or validates.
    assert all(p in split_of for p in odd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trashnet", type=Path, default=Path("../shared/data/trashnet"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tn-broken"))
    args = parser.parse_args()
    run(args.trashnet, args.work)
