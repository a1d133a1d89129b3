"""Screenshots of `detect-waste-cls app` for the docs: docs/app-prediction.png and docs/app-not-an-image.png.

    python docs/make_app_screenshots.py --model EXPORTED_FOLDER_OR_CKPT --image PHOTO.jpg

Serves the app on a free port and drives it in headless Chromium (playwright and a chromium on PATH),
with the same helper as the browser test in tests/test_app.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from detect_waste_cls.app.browser import serve_app, upload_and_screenshot

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported folder, a .ckpt or a folder of runs")
    parser.add_argument("--image", type=Path, required=True, help="a photo to classify")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the two PNG files")
    args = parser.parse_args()
    with serve_app(args.model) as url, tempfile.TemporaryDirectory() as scratch:
        text = upload_and_screenshot(url, args.image, args.out / "app-prediction.png",
                                     wait_for_text="Top-1:", chart=True)
        print(f"{args.out / 'app-prediction.png'}: {text}")
        not_an_image = Path(scratch) / "notes.jpg"
        not_an_image.write_text("A shopping list, not a photo: milk, eggs, bread.\n")
        text = upload_and_screenshot(url, not_an_image, args.out / "app-not-an-image.png",
                                     wait_for_text="is not an image")
        print(f"{args.out / 'app-not-an-image.png'}: {text}")


if __name__ == "__main__":
    main()
