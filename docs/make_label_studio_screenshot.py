"""The screenshot of a Label Studio task with the model's guess pre-selected: docs/label-studio-preannotation.png.

    python docs/make_label_studio_screenshot.py --model RUN_OR_CKPT [--data data/sample] [--budget 6]

Runs `detect-waste-cls select` on the sample's unlabeled images (or takes --selection CSV), exports the
picks, starts Label Studio from its own venv (scripts/label_studio_venv.sh) serving the dataset folder,
pushes the project through the API, logs in with headless Chromium (playwright and a chromium on PATH,
the same helper as the app's screenshots) and saves the labeling page of the first task.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from detect_waste_cls.app.browser import chromium_page
from detect_waste_cls.cli import main as cli
from detect_waste_cls.labeling.label_studio import export_project
from detect_waste_cls.labeling.label_studio_api import LabelStudioClient, push_project
from detect_waste_cls.labeling.label_studio_server import label_studio_venv, serve_label_studio

DOCS = Path(__file__).resolve().parent
SAMPLE = DOCS.parent / "data" / "sample"
TIMEOUT_MS = 120_000


def log_in(page, url: str, email: str, password: str) -> None:
    """Label Studio's own login form: the session cookie it sets is what serves the page and the images."""
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda address: "/user/login" not in address, timeout=TIMEOUT_MS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a run folder, .ckpt or exported folder, for `select`")
    parser.add_argument("--selection", type=Path, help="a selection.csv to use instead of running `select`")
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--out", type=Path, default=DOCS / "label-studio-preannotation.png")
    args = parser.parse_args()
    if (args.model is None) == (args.selection is None):
        parser.error("give --model (to run select) or --selection")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        selection = args.selection
        if selection is None:
            assert cli(["select", "--model", str(args.model), "--data", str(args.data), "--budget", str(args.budget),
                        "--strategy", "margin", "--out", str(scratch / "selection")]) == 0
            selection = scratch / "selection" / "selection.csv"
        export_project(args.data, [selection], scratch / "project", title="detect-waste-cls: label these first")
        with serve_label_studio(label_studio_venv(), Path(args.data)) as server:
            pushed = push_project(scratch / "project", server.url, server.token)
            first = min(LabelStudioClient(server.url, server.token).call(
                "GET", f"/api/tasks/?project={pushed.project_id}")["tasks"], key=lambda task: task["id"])
            with chromium_page(1280, 1000) as page:
                log_in(page, server.url, server.email, server.password)
                page.goto(f"{pushed.page}?task={first['id']}")
                # Drawn: the image has loaded, and the model's guess is the one checked choice.
                page.locator("img[src*='local-files']").first.wait_for(timeout=TIMEOUT_MS)
                guess = page.locator(f"input[type=checkbox][name='{first['data']['predicted']}']")
                guess.wait_for(timeout=TIMEOUT_MS)
                page.wait_for_function("name => document.querySelector(`input[type=checkbox][name='${name}']`)"
                                       ".checked", arg=first["data"]["predicted"], timeout=TIMEOUT_MS)
                page.wait_for_timeout(1500)  # let the image finish drawing
                page.screenshot(path=str(args.out))
    print(f"{args.out}: task {first['id']} of project {pushed.project_id}, the model's guess: "
          f"{first['data']['predicted']} ({first['data']['confidence']:.0%})")


if __name__ == "__main__":
    main()
