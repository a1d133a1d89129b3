"""A real Label Studio on localhost, for tests/test_label_studio.py and docs/make_label_studio_screenshot.py.

Label Studio pins many packages (Django, pydantic, ...), so it lives in a virtualenv of its own made by
scripts/label_studio_venv.sh; this module only starts its `label-studio` command. The server gets a fresh
data folder, one user with a known legacy token, local-files serving from `document_root`, and no reason
to reach the internet (no analytics, no version check, no Sentry, no converter downloads).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from detect_waste_cls.app.browser import free_port, serve_process

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_SCRIPT = REPO_ROOT / "scripts" / "label_studio_venv.sh"
VENV_ENV = "LABEL_STUDIO_VENV"  # where the venv is, if not .venv-labelstudio in the repository
DATABASE_FILE = "label_studio.sqlite3"  # Label Studio's SQLite database, in its --data-dir

OFFLINE = {
    "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
    "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
    "LABEL_STUDIO_CONVERTER_DOWNLOAD_RESOURCES": "false",
    "LABEL_STUDIO_FEATURE_FLAGS_OFFLINE": "true",
    "LABEL_STUDIO_SENTRY_DSN": "",  # empty: Sentry is not started
    "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
}


def label_studio_venv(timeout_s: float = 1800) -> Path:
    """The Label Studio venv, made by scripts/label_studio_venv.sh on first use (about a minute with pip's cache)."""
    command = ["bash", str(VENV_SCRIPT)] + ([os.environ[VENV_ENV]] if os.environ.get(VENV_ENV) else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def migrated_database(venv: Path, timeout_s: float = 600) -> Path:
    """An empty, fully migrated database, made once per venv: a fresh one spends ~45 s migrating, a copy ~5 s."""
    template = venv / "migrated-database" / DATABASE_FILE
    if not template.is_file():
        with tempfile.TemporaryDirectory(dir=venv) as scratch:
            done = subprocess.run([str(venv / "bin" / "label-studio"), "init", "--quiet", "--data-dir", scratch],
                                  env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0 or not (Path(scratch) / DATABASE_FILE).is_file():
                raise RuntimeError(f"label-studio init failed (exit code {done.returncode}):\n{done.stdout[-3000:]}")
            template.parent.mkdir(exist_ok=True)
            os.replace(Path(scratch) / DATABASE_FILE, template)  # in one step: never a half-written template
    return template


@dataclass(frozen=True)
class LocalLabelStudio:
    url: str
    email: str
    password: str
    token: str  # a legacy token: "Authorization: Token <token>"


@contextmanager
def serve_label_studio(venv: Path, document_root: Path, *, port: int | None = None,
                       timeout_s: float = 300) -> Iterator[LocalLabelStudio]:
    """`label-studio start` in the background until the block ends; yields once /health answers.

    The server starts from a copy of migrated_database(venv): seconds rather than the ~45 s of migrations.
    """
    port = port or free_port()
    server = LocalLabelStudio(f"http://localhost:{port}", "annotator@localhost", secrets.token_hex(8),
                              secrets.token_hex(20))
    template = migrated_database(venv)
    with tempfile.TemporaryDirectory(prefix="label-studio-") as data_dir:
        shutil.copyfile(template, Path(data_dir) / DATABASE_FILE)
        env = {**os.environ, **OFFLINE,
               "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(Path(os.path.abspath(document_root))),
               # The first user and the organization it creates, with legacy tokens allowed for the tests' calls.
               "LABEL_STUDIO_USERNAME": server.email, "LABEL_STUDIO_PASSWORD": server.password,
               "LABEL_STUDIO_USER_TOKEN": server.token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}
        command = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "localhost",
                   "--port", str(port), "--data-dir", data_dir]
        with serve_process(command, f"{server.url}/health", env=env, timeout_s=timeout_s, name="Label Studio"):
            yield server
