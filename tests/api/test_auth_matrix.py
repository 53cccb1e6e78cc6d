"""Who may reach what (issue 14): UI mounted or not x ``--auth``/``--api-auth`` x routes, the
Gradio UI's file, queue and upload routes included.

The app is built in this process exactly as ``launch.py --api``/``--nowebui`` builds it
(``app.server.build_served_app`` with ``studio_credentials``), and driven with a test client: no
model is loaded and no job runs. README's "Security" section states the same table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.conftest import record_finished_output

UI_PAIR = ("painter", "ui-secret")
API_PAIR = ("alice", "api-secret")


@dataclass(frozen=True)
class Setup:
    ui: bool
    auth: bool  # --auth painter:ui-secret
    api_auth: bool  # --api-auth alice:api-secret

    @property
    def ui_login(self) -> tuple[str, str] | None:
        """The credentials the UI takes: its own, else the API's."""
        return UI_PAIR if self.auth else (API_PAIR if self.api_auth else None)

    @property
    def api_login(self) -> tuple[str, str] | None:
        return API_PAIR if self.api_auth else (UI_PAIR if self.auth else None)

    def __str__(self) -> str:
        flags = ["--api" if self.ui else "--nowebui"]
        flags += ["--auth"] if self.auth else []
        flags += ["--api-auth"] if self.api_auth else []
        return " ".join(flags)


SETUPS = [
    Setup(ui, auth, api_auth) for ui in (True, False) for auth in (False, True) for api_auth in (False, True)
]


def ui_routes(outputs: Path) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("GET", "/config", {}),
        ("GET", "/gradio_api/info", {}),
        ("GET", f"/gradio_api/file={outputs / 'mine.png'}", {}),
        ("POST", "/gradio_api/queue/join", {"json": {"data": [], "session_hash": "matrix"}}),
        ("POST", "/gradio_api/upload", {"files": {"files": ("a.png", b"not really a png")}}),
    ]


API_ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/sdapi/v1/samplers", {}),
    ("GET", "/studio/v1/health", {}),
    ("GET", "/openapi.json", {}),
]


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Setup, tuple[TestClient, Path]]]:
    from app.server import build_served_app, studio_credentials
    from app.services import StudioServices
    from app.settings import StudioSettings

    built: dict[Setup, tuple[TestClient, Path]] = {}
    for setup in SETUPS:
        work = tmp_path_factory.mktemp("matrix")
        outputs = work / "outputs"
        outputs.mkdir()
        for name in ("mine.png", "theirs.png", "nobodys.png"):
            Image.new("RGB", (4, 4)).save(outputs / name)
        settings = StudioSettings(
            data_dir=work / "data",
            outputs_dir=outputs,
            models_dir=work / "models",
            api=setup.ui,
            nowebui=not setup.ui,
            in_process_workers=True,
            auth=":".join(UI_PAIR) if setup.auth else None,
            api_auth=":".join(API_PAIR) if setup.api_auth else None,
        )
        ui_credentials, api_credentials = studio_credentials(settings)
        services = StudioServices.create(settings)
        assert services.queue.store is not None  # creates the job store (its tables)
        record_finished_output(settings.data_dir, (setup.ui_login or ("local", ""))[0], outputs / "mine.png")
        record_finished_output(settings.data_dir, "someone-else", outputs / "theirs.png")
        app = build_served_app(services, ui_credentials, api_credentials)
        built[setup] = (TestClient(app, raise_server_exceptions=False), outputs)
    yield built


def answers(client: TestClient, routes: list[tuple[str, str, dict[str, Any]]], **extra: Any) -> list[int]:
    return [client.request(method, path, **kwargs, **extra).status_code for method, path, kwargs in routes]


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_auth_matrix(apps: dict[Setup, tuple[TestClient, Path]], setup: Setup) -> None:
    client, outputs = apps[setup]
    client.cookies.clear()
    locked = setup.auth or setup.api_auth
    # The REST API: open without credentials; else 401 without them, 200 with the API's own.
    anonymous = answers(client, API_ROUTES)
    assert anonymous == ([401] * len(API_ROUTES) if locked else [200] * len(API_ROUTES)), anonymous
    if locked:
        assert setup.api_login is not None
        assert answers(client, API_ROUTES, auth=setup.api_login) == [200] * len(API_ROUTES)
        if setup.auth and setup.api_auth:  # separate lists: the UI's password does not open the API
            assert answers(client, API_ROUTES, auth=UI_PAIR) == [401] * len(API_ROUTES)
    routes = ui_routes(outputs)
    if not setup.ui:
        assert answers(client, routes) == [404] * len(routes)
        return
    # The mounted UI: locked whenever either flag is given, opened by the UI's login.
    before = answers(client, routes)
    if locked:
        assert before == [401] * len(routes), before
        assert setup.ui_login is not None
        if setup.auth and setup.api_auth:  # the API's password is not a UI login
            client.post("/login", data={"username": API_PAIR[0], "password": API_PAIR[1]})
            assert answers(client, routes) == [401] * len(routes)
        login = client.post("/login", data={"username": setup.ui_login[0], "password": setup.ui_login[1]})
        assert login.status_code == 200, login.text
    after = answers(client, routes)
    assert after[:3] == [200, 200, 200], after  # config, info, and an output file
    assert after[3] == 400, after  # the queue took the request (and refused its missing fn_index)
    assert after[4] == 200, after  # the upload was stored
    # Gradio's file route serves an output only to the user whose job wrote it (with any login).
    others = [
        client.get(f"/gradio_api/file={outputs / name}").status_code for name in ("theirs.png", "nobodys.png")
    ]
    assert others == ([404, 404] if locked else [200, 200]), others
