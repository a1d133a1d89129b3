"""`detect-waste-cls app`: the Streamlit page through AppTest, its limits, launch(), and one real browser run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, final_checkpoint, make_tree, train_args, write_image
from detect_waste_cls import app
from detect_waste_cls.cli import main
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.export import export_model
from detect_waste_cls.run_folder import run_checkpoint

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One tiny run trained once and exported once, side by side in a folder of runs."""
    root = tmp_path_factory.mktemp("app")
    data = make_tree(root / "data", {"train": {name: 8 for name in COLOURS}, "test": {name: 3 for name in COLOURS}})
    runs = root / "runs"
    # One epoch: trained longer, these trivially separable colours get 100% confidence, which no threshold warns about.
    assert main(train_args(data, runs / "tiny-run", "--epochs", "1")) == 0
    checkpoint = final_checkpoint(runs / "tiny-run")
    exported = export_model(checkpoint, runs / "tiny-export")
    return {"runs": runs, "checkpoint": checkpoint, "exported": exported}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def class_photo(tmp_path: Path, name: str) -> Path:
    return write_image(tmp_path / f"{name}.png", COLOURS[name], seed=12345)


def app_test(model: Path, monkeypatch) -> "streamlit_testing.AppTest":
    """The page as `launch()` starts it: the model path arrives in sys.argv after streamlit's own arguments."""
    monkeypatch.setattr(sys, "argv", [str(app.SCRIPT), "--model", str(model)])
    return streamlit_testing.AppTest.from_file(str(app.SCRIPT), default_timeout=TIMEOUT_S).run()


def upload(at, name: str, data: bytes, mime: str = "image/png"):
    at.file_uploader[0].upload(name, data, mime)
    return at.run()


def test_an_upload_gets_its_class_a_chart_and_the_model_panel(models, monkeypatch, tmp_path):
    at = app_test(models["exported"], monkeypatch)
    assert not at.exception and len(at.file_uploader) == 1 and not at.get("plotly_chart")
    assert set(at.file_uploader[0].allowed_type) == {".jpg", ".jpeg", ".png", ".webp"}
    sidebar = " ".join(str(element.value) for element in at.sidebar.markdown)
    assert "glass, metal, paper" in sidebar
    assert [metric.label for metric in at.sidebar.metric][:3] == ["Accuracy", "Balanced accuracy", "Macro F1"]

    upload(at, "paper.png", class_photo(tmp_path, "paper").read_bytes())
    assert not at.exception and not at.error
    top1 = at.main.subheader[0].value
    assert top1.startswith("Top-1: paper (") and top1.endswith("%)")
    # The tiny run's few validation images fit no temperature, and the page says so.
    caption = at.main.caption[0].value
    assert "not calibrated (T = 1):" in caption and "validation images are too few" in caption
    assert len(at.get("plotly_chart")) == 1

    # A threshold above any confidence warns; flip TTA still predicts the same class.
    at.slider[0].set_value(1.0)
    at.checkbox[0].check()
    at.run()
    assert not at.exception and at.main.subheader[0].value.startswith("Top-1: paper")
    assert "below the 100% threshold" in at.warning[0].value


def test_a_folder_of_runs_offers_each_run_most_recent_first(models, monkeypatch, tmp_path):
    old = models["runs"] / "tiny-run" / "checkpoints"
    for path in old.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    at = app_test(models["runs"], monkeypatch)
    assert not at.exception
    assert at.selectbox[0].options == ["tiny-export", f"tiny-run ({models['checkpoint'].name})"]
    assert at.selectbox[0].value.path == models["exported"]
    at.selectbox[0].select_index(1).run()
    assert not at.exception and at.selectbox[0].value.path == models["checkpoint"]
    upload(at, "glass.png", class_photo(tmp_path, "glass").read_bytes())
    assert not at.exception and at.main.subheader[0].value.startswith("Top-1: glass")


def test_a_text_file_renamed_jpg_gets_a_message_not_a_traceback(models, monkeypatch):
    at = upload(app_test(models["exported"], monkeypatch), "notes.jpg", b"shopping list: milk, eggs\n", "image/jpeg")
    assert not at.exception
    assert "notes.jpg is not an image" in at.error[0].value
    assert not at.get("plotly_chart") and not at.main.subheader


def test_too_many_pixels_are_refused_from_the_header(models, monkeypatch):
    huge = png_bytes(Image.new("1", (8000, 6000)))  # 48 megapixels in a few kB
    assert len(huge) < 100_000
    at = upload(app_test(models["exported"], monkeypatch), "huge.png", huge)
    assert not at.exception
    assert "8000 x 6000 = 48 megapixels; the limit is 40 megapixels" in at.error[0].value


def test_read_upload_limits(monkeypatch):
    small = png_bytes(Image.new("RGB", (20, 10), (1, 2, 3)))
    assert app.read_upload(small).shape == (10, 20, 3)
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", len(small) - 1)
    with pytest.raises(UserInputError, match="the limit is 10 MB"):
        app.read_upload(small, "x.png")
    monkeypatch.undo()
    with pytest.raises(UserInputError, match="x.png is damaged"):
        app.read_upload(small[:-30], "x.png")  # a good header over cut-short pixel data
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL's own limit refuses at open
    with pytest.raises(UserInputError, match="too many pixels"):
        app.read_upload(small, "x.png")


def test_top_k_is_sorted_and_cut():
    rows = app.top_k(np.array([0.1, 0.5, 0.05, 0.3, 0.02, 0.03]), list("abcdef"), k=5)
    assert rows == [("b", 0.5), ("d", 0.3), ("a", 0.1), ("c", 0.05), ("f", 0.03)]
    assert app.top_k([0.4, 0.6], ["x", "y"]) == [("y", 0.6), ("x", 0.4)]


def test_launch_runs_streamlit_with_the_limits_and_the_model(models, monkeypatch):
    calls = []

    class FakeProcess:
        def __init__(self, command, **kwargs):
            calls.append((command, kwargs))

        def wait(self, timeout=None):
            return 3

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    assert app.launch(models["exported"], port=8765) == 3
    (command, kwargs), = calls
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(app.SCRIPT)] and not kwargs
    options = dict(zip(command[5:-3:2], command[6:-3:2]))
    assert options == {"--server.address": "localhost", "--server.port": "8765", "--server.maxUploadSize": "10",
                       "--server.headless": "true", "--browser.gatherUsageStats": "false"}
    assert command[-3:] == ["--", "--model", str(models["exported"].resolve())]
    assert app.script_model_argument(command[-2:]) == models["exported"].resolve()


def test_launch_refuses_a_missing_model_or_an_empty_folder_before_starting(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(subprocess, "Popen", None)  # starting anything would fail loudly
    assert main(["app", "--model", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: model not found:") and error.count("\n") == 1
    with pytest.raises(UserInputError, match="holds no model"):
        app.launch(tmp_path)


@pytest.mark.parametrize("missing", ["streamlit", "plotly"])
def test_a_missing_app_extra_says_how_to_install_it(monkeypatch, tmp_path, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    assert main(["app", "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'detect-waste-cls[app]'" in error and missing in error


@pytest.fixture(scope="module")  # module scope: set up, or skipped, before the module-scoped model
def browser():
    """The browser helper, or a skip when playwright or chromium is missing (before any model is trained)."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    from detect_waste_cls.app import browser

    if browser.chromium_path() is None:
        pytest.skip("no chromium on PATH")
    return browser


def test_the_page_in_a_real_browser(browser, models, tmp_path):
    screenshot = tmp_path / "app.png"
    with browser.serve_app(models["exported"]) as url:
        text = browser.upload_and_screenshot(url, class_photo(tmp_path, "metal"), screenshot,
                                             wait_for_text="Top-1:", chart=True)
    assert text.startswith("Top-1: metal (")
    assert screenshot.stat().st_size > 20_000
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width >= 1000


def test_a_run_folder_is_served_by_the_checkpoint_its_training_tested(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best-epoch=03.ckpt"):  # the best one written last, so the newest
        (run / "checkpoints" / name).write_bytes(b"")
    (run / "config.json").write_text('{"optim": {"final_checkpoint": "last"}}')
    assert run_checkpoint(run).name == "last.ckpt"
    (run / "config.json").write_text('{"optim": {"final_checkpoint": "best"}}')
    assert run_checkpoint(run).name == "best-epoch=03.ckpt"
