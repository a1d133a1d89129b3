"""`detect-waste-cls label-studio push / pull`: an exported project through Label Studio's REST API.

Plain urllib: the commands need neither Label Studio nor its SDK in the project's venv.

How Label Studio (1.23, the community edition) authenticates an API call, and what this client does:
- a Personal Access Token (PAT, Account & Settings; on by default in new organizations) is a JWT refresh
  token. It is not sent itself: POST /api/token/refresh/ {"refresh": PAT} returns an access token that
  lasts five minutes, sent as "Authorization: Bearer <access>". The client exchanges it, and again on a 401.
- a legacy token (40 hex digits) is sent as "Authorization: Token <key>". Label Studio refuses it unless the
  organization allows legacy tokens: Organization > Settings > Access Token Settings, or
  LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true (or `label-studio start --enable-legacy-api-token`) when the
  first user creates the organization.
A token with three dot-separated parts is taken for a PAT, anything else for a legacy token.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling.label_studio import LABEL_CONFIG_FILE, PROJECT_FILE, TASKS_FILE

TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the variable Label Studio's own SDK reads
PUSHED_FILE = "label_studio_project.json"  # written by push: where the project went, for pull
ACCESS_TOKEN_LIFETIME_S = 240  # Label Studio's access tokens last 300 s; renewed a minute early


def is_personal_access_token(token: str) -> bool:
    return token.count(".") == 2


class LabelStudioClient:
    """JSON calls to one Label Studio server, authenticated with a PAT or a legacy token (see above)."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 120):
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise UserInputError(f"give --token TOKEN or set ${TOKEN_ENV}: a Personal Access Token or a Legacy Token "
                                 "from Label Studio's Account & Settings page")
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self._access: tuple[str, float] | None = None  # (access token, when it was issued)

    def call(self, method: str, path: str, body=None, *, raw: bool = False):
        """The parsed JSON answer (or its bytes when `raw`); Label Studio's complaints become UserInputErrors."""
        for attempt in (1, 2):
            try:
                return self._send(method, path, body, self._authorization(renew=attempt == 2), raw)
            except urllib.error.HTTPError as error:
                if error.code == 401 and attempt == 1 and is_personal_access_token(self.token):
                    continue  # the access token expired early: one fresh one, then give up
                raise UserInputError(self._explain(error, method, path)) from error

    def _send(self, method: str, path: str, body, authorization: str | None, raw: bool):
        headers = {"Accept": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = response.read()
        except urllib.error.HTTPError:
            raise
        except OSError as error:  # refused, unknown host, timed out
            raise UserInputError(f"cannot reach Label Studio at {self.url} ({error}): is it running? "
                                 "(`label-studio start`, see the README of the exported project)") from error
        return answer if raw else (json.loads(answer) if answer else None)

    def _authorization(self, renew: bool = False) -> str:
        if not is_personal_access_token(self.token):
            return f"Token {self.token}"
        if renew or self._access is None or time.monotonic() - self._access[1] > ACCESS_TOKEN_LIFETIME_S:
            try:
                answer = self._send("POST", "/api/token/refresh/", {"refresh": self.token}, None, False)
            except urllib.error.HTTPError as error:
                raise UserInputError(f"{self._explain(error, 'POST', '/api/token/refresh/')}: Label Studio "
                                     "refused the Personal Access Token (revoked, or from another server?)") from error
            self._access = (answer["access"], time.monotonic())
        return f"Bearer {self._access[0]}"

    def _explain(self, error: urllib.error.HTTPError, method: str, path: str) -> str:
        body = error.read().decode(errors="replace")
        try:
            detail = json.loads(body)
            detail = detail.get("validation_errors") or detail.get("detail") or detail
        except json.JSONDecodeError:
            detail = body[:300]
        message = f"Label Studio at {self.url} answered {error.code} to {method} {path}: {detail}"
        if error.code in (401, 403) and not is_personal_access_token(self.token):
            message += ("; a legacy token only works where the organization allows legacy tokens "
                        "(Organization > Settings > Access Token Settings), or use a Personal Access Token")
        return message


@dataclass(frozen=True)
class PushedProject:
    url: str
    project_id: int
    tasks: int

    @property
    def page(self) -> str:
        return f"{self.url}/projects/{self.project_id}/data"


def read_project_dir(project_dir: Path) -> tuple[dict, str, list]:
    """project.json, label_config.xml and tasks.json of a `label-studio export` folder."""
    files = [project_dir / name for name in (PROJECT_FILE, LABEL_CONFIG_FILE, TASKS_FILE)]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise UserInputError(f"not a `detect-waste-cls label-studio export` folder: missing {', '.join(missing)}")
    return json.loads(files[0].read_text()), files[1].read_text(), json.loads(files[2].read_text())


def push_project(project_dir: str | Path, url: str, token: str | None = None) -> PushedProject:
    """Create the project, a local-files storage on the images (serving only, never synced), then the tasks."""
    project_dir = Path(project_dir)
    pushed = project_dir / PUSHED_FILE
    if pushed.exists():
        raise UserInputError(f"{project_dir} was pushed already ({pushed}: {pushed.read_text().strip()}); "
                             f"delete {pushed} to create another project from it")
    project, config, tasks = read_project_dir(project_dir)
    client = LabelStudioClient(url, token)
    created = client.call("POST", "/api/projects/", {"title": project["title"][:50], "label_config": config})
    try:
        client.call("POST", "/api/storages/localfiles/", {
            "project": created["id"], "path": project["storage_path"], "use_blob_urls": False,
            "title": "images (serves the tasks' files; do not sync)"})
        check_image_served(client, tasks[0], project["document_root"])
        answer = client.call("POST", f"/api/projects/{created['id']}/import", tasks)
    except UserInputError:
        client.call("DELETE", f"/api/projects/{created['id']}/")  # leave no half-made project behind
        raise
    if answer.get("task_count") != len(tasks):
        raise UserInputError(f"Label Studio imported {answer.get('task_count')} of the {len(tasks)} tasks: {answer}")
    result = PushedProject(client.url, created["id"], len(tasks))
    pushed.write_text(json.dumps({"url": result.url, "project_id": result.project_id,
                                  "pushed_at": f"{datetime.now():%Y-%m-%d %H:%M:%S}"}) + "\n")
    return result


def check_image_served(client: LabelStudioClient, task: dict, document_root: str) -> None:
    """Label Studio only answers for images below its document root: a 404 means it was started with another."""
    try:
        client.call("GET", task["data"]["image"], raw=True)
    except UserInputError as error:
        raise UserInputError(f"Label Studio does not serve {task['data']['path']}: start it with "
                             f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
                             f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={document_root} ({error})") from error


def pull_export(project_dir: str | Path, token: str | None = None, *, url: str | None = None,
                out: str | Path | None = None) -> Path:
    """Download the project's JSON export, every task (unannotated ones too, so the import can report them)."""
    project_dir = Path(project_dir)
    pushed = project_dir / PUSHED_FILE
    if not pushed.is_file():
        raise UserInputError(f"{pushed} not found: pull downloads a project made by `label-studio push`; for one "
                             "made by hand, use Export > JSON in Label Studio")
    where = json.loads(pushed.read_text())
    out = Path(out) if out else project_dir / f"export-{datetime.now():%Y%m%d-%H%M%S}.json"
    if out.exists():
        raise UserInputError(f"{out} already exists; choose another --out")
    client = LabelStudioClient(url or where["url"], token)
    export = client.call("GET", f"/api/projects/{where['project_id']}/export?exportType=JSON&download_all_tasks=true",
                         raw=True)
    with open(out, "xb") as file:
        file.write(export)
    return out
