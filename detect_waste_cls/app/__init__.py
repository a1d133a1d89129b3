"""`detect-waste-cls app`: a Streamlit page on localhost where a photo gets its top-5 classes.

`launch()` starts `streamlit run streamlit_app.py`; the page itself is in streamlit_app.py. What the page does
that is worth testing on its own (the upload limits, the top-k rows, finding the runs to choose from) is here,
and imports neither streamlit nor plotly, so that `launch()` can say how to install them when they are missing.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from detect_waste_cls.data.images import DECODE_ERRORS, load_rgb
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.export import find_models

# Limits on an uploaded file, in one place. Streamlit counts megabytes as MiB.
MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_PIXELS = 40_000_000  # width x height, checked from the header before decoding
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp")
TOP_K = 5
DEFAULT_THRESHOLD = 0.5
DEFAULT_PORT = 8501

SCRIPT = Path(__file__).with_name("streamlit_app.py")
INSTALL_HINT = "pip install 'detect-waste-cls[app]'"


def launch(model: Path, port: int = DEFAULT_PORT) -> int:
    """Serve the page on http://localhost:PORT for `model`; returns streamlit's exit code."""
    try:
        import plotly  # noqa: F401
        import streamlit  # noqa: F401
    except ImportError as error:
        raise UserInputError(f"the app needs streamlit and plotly ({error.name or error} is missing): "
                             f"{INSTALL_HINT}") from None
    model = Path(model)
    find_models(model)  # a missing path, or nothing to choose from: say so now rather than on the page
    command = [sys.executable, "-m", "streamlit", "run", str(SCRIPT),
               "--server.address", "localhost", "--server.port", str(port),
               "--server.maxUploadSize", str(MAX_UPLOAD_MB),
               "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--", "--model", str(model.resolve())]
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:  # Ctrl-C reached streamlit too: let it shut down
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return 130


def script_model_argument(argv: list[str]) -> Path:
    """The --model that `launch()` passes to the page script after `--` (streamlit sets sys.argv to them)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", type=Path)
    model = parser.parse_known_args(argv)[0].model
    if model is None:
        raise UserInputError("no model given: start the page with `detect-waste-cls app --model PATH`")
    return model


def read_upload(data: bytes, name: str = "the file") -> np.ndarray:
    """An uploaded file as an HxWx3 uint8 array, or a UserInputError saying which limit it broke.

    Size in bytes, then pixel count from the header, are checked before anything is decoded.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise UserInputError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own, higher, limit: refused at open
        raise UserInputError(f"{name} has too many pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except DECODE_ERRORS:
        raise UserInputError(f"{name} is not an image this app can read: upload a JPEG, PNG or WebP photo") from None
    if width * height > MAX_PIXELS:
        raise UserInputError(f"{name} is {width} x {height} = {width * height / 1e6:.0f} megapixels; "
                             f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
    try:
        return load_rgb(io.BytesIO(data))
    except UserInputError:  # a good header over broken pixel data
        raise UserInputError(f"{name} is damaged: its image data cannot be decoded") from None


def top_k(probabilities, classes: list[str], k: int = TOP_K) -> list[tuple[str, float]]:
    """(class, probability) pairs of the k most probable classes, most probable first."""
    probabilities = np.asarray(probabilities, dtype=float)
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]
