"""Servers started for real and driven in headless Chromium: shared by tests/test_app.py, tests/test_label_studio.py
and the docs/make_*screenshot*.py scripts. The browser needs playwright (the `test` extra) and a Chromium on PATH."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHART = ".js-plotly-plot .bars path"  # drawn bars, not just the chart's container


def chromium_path() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(model: Path, port: int | None = None, timeout_s: float = 120) -> Iterator[str]:
    """`detect-waste-cls app --model MODEL` in the background; yields its URL once /_stcore/health answers."""
    port = port or free_port()
    url = f"http://localhost:{port}"
    command = [sys.executable, "-m", "detect_waste_cls.cli", "app", "--model", str(model), "--port", str(port)]
    with serve_process(command, f"{url}/_stcore/health", timeout_s=timeout_s, name="the app"):
        yield url


@contextmanager
def serve_process(command: list[str], health_url: str, *, env: dict[str, str] | None = None, timeout_s: float = 120,
                  name: str = "the server") -> Iterator[subprocess.Popen]:
    """Run `command` in the background until the block ends; yields once `health_url` answers 200.

    If it exits or does not answer within `timeout_s`, the error carries the end of its output.
    """
    with tempfile.TemporaryFile() as log:
        # Its own process group, so that stopping it stops whatever it starts too (streamlit, Django).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(health_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{name} did not start (exit code {process.poll()}):\n"
                                       f"{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.5)
            yield process
        finally:
            _stop(process)


def _healthy(health_url: str) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A page in headless Chromium (the one on PATH), closed with its browser when the block ends."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def upload_and_screenshot(url: str, image: Path, screenshot: Path, *, wait_for_text: str, chart: bool = False,
                          timeout_s: float = 120, width: int = 1280, height: int = 900) -> str:
    """Open the page, upload `image`, wait for `wait_for_text` (and the top-5 chart's bars), save a full-page
    screenshot; returns the text of the element that holds `wait_for_text`."""
    timeout_ms = timeout_s * 1000
    with chromium_page(width, height) as page:
        page.goto(url)
        page.set_input_files("input[type=file]", str(image), timeout=timeout_ms)  # once the model has loaded
        found = page.get_by_text(wait_for_text).first
        found.wait_for(timeout=timeout_ms)
        if chart:
            page.locator(CHART).first.wait_for(timeout=timeout_ms)
        page.wait_for_timeout(1000)  # let images and the chart finish drawing
        page.screenshot(path=str(screenshot), full_page=True)
        return found.inner_text()
