"""The console's "Ask about this series" box through the app's test client (no browser).

The browser test (tests/test_console_browser.py) asks real questions in Chromium; this one
holds what the page serves and who may call the API behind it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from dicom_node.admin import create_app
from dicom_node.admin.auth import COOKIE_NAME
from dicom_node.config import load_config
from tests.fixtures.net import free_port
from tests.test_admin_api import ADMIN, VIEWER, _config, _index_series

REPO = Path(__file__).resolve().parents[1]


def _client(tmp_path: Path, *, model: bool) -> Iterator[tuple[TestClient, str]]:
    doc: dict[str, Any] = _config(tmp_path, free_port())
    if model:
        doc["models"] = {"path": str(REPO / "models")}
        doc["pipelines"]["brain"] = {"model": "omnimri-tiny",
                                     "instructions": ["detect abnormalities"]}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    settings = load_config(cfg)
    settings.storage.path.mkdir(parents=True)
    uid, _ = _index_series(settings)
    app = create_app(settings, config_path=cfg)
    with TestClient(app) as client:
        yield client, uid
    app.state.backend.close()


@pytest.fixture
def with_model(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    yield from _client(tmp_path, model=True)


@pytest.fixture
def without_model(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    yield from _client(tmp_path, model=False)


def _page(client: TestClient, uid: str, token: str | None) -> Any:
    client.cookies.clear()
    if token:
        client.cookies.set(COOKIE_NAME, token)
    return client.get(f"/console/series/{uid}", follow_redirects=False)


@pytest.mark.parametrize("token", [VIEWER, ADMIN])
def test_series_page_has_the_ask_box(with_model: tuple[TestClient, str], token: str) -> None:
    client, uid = with_model
    r = _page(client, uid, token)
    assert r.status_code == 200, r.text
    page = r.text
    assert "<h2>Ask about this series</h2>" in page and "id='q'" in page
    assert "maxlength='500'" in page and "id='answer'" in page
    # The script posts to the ask API with the series UID and writes the answer as text.
    assert f"const SERIES_UID={json.dumps(uid)};" in page
    assert "'/api/v1/series/'+encodeURIComponent(SERIES_UID)+'/ask'" in page
    assert "a.textContent=res.data.answer" in page and "innerHTML" not in page
    assert "askpipe" not in page.split("<script>")[0]  # one model pipeline: no selector


def test_ask_needs_a_token_and_a_bearer_header(with_model: tuple[TestClient, str]) -> None:
    client, uid = with_model
    r = _page(client, uid, None)
    assert (r.status_code, r.headers["location"]) == (303, "/console/login")
    path = f"/api/v1/series/{uid}/ask"
    client.cookies.clear()
    assert client.post(path, json={"question": "is there a mass?"}).status_code == 401
    # The console's cookie is honoured for reading only: a forged cross-site post fails.
    client.cookies.set(COOKIE_NAME, VIEWER)
    r = client.post(path, json={"question": "is there a mass?"})
    assert r.status_code == 401 and r.json()["detail"] == "missing bearer token"
    r = client.post(path, json={"question": ""}, headers={"Authorization": f"Bearer {VIEWER}"})
    assert r.status_code == 422  # refused before any model runs


def test_without_a_model_pipeline_the_page_says_so(
        without_model: tuple[TestClient, str]) -> None:
    client, uid = without_model
    page = _page(client, uid, VIEWER).text
    assert "No pipeline with a model is configured" in page and "id='q'" not in page
    r = client.post(f"/api/v1/series/{uid}/ask", json={"question": "is there a mass?"},
                    headers={"Authorization": f"Bearer {VIEWER}"})
    assert r.status_code == 409 and "no pipeline with a model" in r.json()["detail"]
