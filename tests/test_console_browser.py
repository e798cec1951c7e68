"""The web console in a real browser: Debian's headless Chromium driven by Selenium.

Selenium talks to Debian's ``chromedriver`` (no driver or browser download). The test signs
in, reads the overview, series thumbnails, tests a rule draft against a stored series, runs a
pipeline again, cancels the job and tests a destination; screenshots land in
``benchmarks/out/console-*.png`` for a person to look at.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.admin import AdminServer
from dicom_node.config import load_config
from tests.fixtures.net import free_port
from tests.test_admin_api import ADMIN, VIEWER, _config, _index_series

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[1] / "benchmarks" / "out"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian chromium/chromium-driver not installed (make install-test installs them)",
)


def _serve(tmp: Path, doc: dict[str, Any], slices: int
           ) -> Iterator[tuple[AdminServer, str]]:
    """An admin server on config ``doc`` over a stored 2 mm brain of ``slices`` slices."""
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    settings = load_config(cfg)
    settings.storage.path.mkdir(parents=True)
    from omnimri_samples import brain_series

    uid, _ = _index_series(settings, datasets=brain_series(resolution_mm=2, slices=slices))
    srv = AdminServer(settings, config_path=cfg, host="127.0.0.1", port=free_port())
    srv.start()
    yield srv, uid
    srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdminServer, str]]:
    tmp = tmp_path_factory.mktemp("console")
    yield from _serve(tmp, _config(tmp, free_port()), slices=9)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="omnimri-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,860"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: Any, cond: Any, timeout: float = 10.0) -> Any:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # Pages reload after actions: elements found before may go stale while polling.
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(cond)


def _sign_in(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{base}/console/login")
    driver.execute_script("localStorage.clear()")
    driver.find_element(By.ID, "tok").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button").click()
    _wait(driver, lambda d: d.current_url.rstrip("/").endswith("/console"))


def _shot(driver: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"console-{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5000  # a rendered page, not a blank image
    return path


def test_console_as_admin(server: tuple[AdminServer, str], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    srv, uid = server
    base = srv.url
    browser.get(f"{base}/console")
    assert browser.current_url.endswith("/console/login")  # not signed in yet
    _sign_in(browser, base, ADMIN)
    assert "ops (admin)" in browser.find_element(By.CLASS_NAME, "who").text
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert any("queue depth" in c.text for c in cards)

    # Series: a tile with a decoded thumbnail.
    browser.get(f"{base}/console/series")
    img = browser.find_element(By.CSS_SELECTOR, f'[data-series="{uid}"] img')
    _wait(browser, lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", img) > 0)
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                  img)
    assert max(size) == 192
    _shot(browser, "series")

    # Rule editor: live test of the shown rules against the stored series.
    browser.get(f"{base}/console/rules")
    assert "mr-preview" in browser.find_element(By.ID, "draft").get_attribute("value")
    browser.find_element(By.ID, "test").click()
    out = browser.find_element(By.ID, "out")
    _wait(browser, lambda d: "result:" in out.text)
    assert "result: fired: mr-preview" in out.text and "FIRED" in out.text
    _shot(browser, "rules")
    # An invalid draft is refused with the key path.
    browser.execute_script("document.getElementById('draft').value = arguments[0]",
                           "- name: broken\n  when: 'Modality =='\n  pipelines: [preview]\n")
    browser.find_element(By.ID, "validate").click()
    _wait(browser, lambda d: out.get_attribute("data-status") == "422")
    assert "rules.0.when" in out.text

    # Series page: run the pipeline again; the job appears queued on the overview.
    browser.get(f"{base}/console/series/{uid}")
    browser.find_element(By.ID, "rerun").click()
    rerun_out = browser.find_element(By.ID, "out")
    _wait(browser, lambda d: rerun_out.get_attribute("data-status") is not None)
    assert rerun_out.get_attribute("data-status") == "200", rerun_out.text
    assert '"state": "queued"' in rerun_out.text
    browser.get(f"{base}/console")
    row = browser.find_element(By.CSS_SELECTOR, "#jobs tr[data-job]")
    assert "queued" in row.text
    _shot(browser, "overview")
    row.find_element(By.CSS_SELECTOR, "button.bad").click()  # Cancel
    _wait(browser, lambda d: d.find_element(By.ID, "out").get_attribute("data-status") == "200")
    browser.get(f"{base}/console")
    assert "cancelled" in browser.find_element(By.CSS_SELECTOR, "#jobs tr[data-job]").text

    # Destinations: the folder destination tests OK, the dead DICOM peer does not.
    browser.get(f"{base}/console/destinations")
    browser.find_element(By.CSS_SELECTOR, "#dests tr:nth-child(2) button").click()  # archive
    _wait(browser, lambda d: d.find_element(By.ID, "d-archive").text != "testing..."
          and d.find_element(By.ID, "d-archive").text != "")
    assert browser.find_element(By.ID, "d-archive").text.startswith("OK: ")
    _shot(browser, "destinations")


def test_console_as_viewer_has_no_buttons_that_change_things(
    server: tuple[AdminServer, str], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    srv, uid = server
    _sign_in(browser, srv.url, VIEWER)
    browser.get(f"{srv.url}/console/rules")
    assert browser.find_elements(By.ID, "apply") == []
    browser.find_element(By.ID, "test").click()
    out = browser.find_element(By.ID, "out")
    _wait(browser, lambda d: "result:" in out.text)  # viewers may test drafts
    browser.get(f"{srv.url}/console/destinations")
    assert browser.find_elements(By.CSS_SELECTOR, "#dests button") == []
    browser.get(f"{srv.url}/console/series/{uid}")
    assert browser.find_elements(By.ID, "rerun") == []
    assert "OMNIMRI^PHANTOM" not in browser.page_source


def test_wrong_token_stays_on_login(server: tuple[AdminServer, str], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    srv, _ = server
    browser.delete_all_cookies()
    browser.get(f"{srv.url}/console/login")
    browser.find_element(By.ID, "tok").send_keys("not-a-valid-token-at-all")
    browser.find_element(By.CSS_SELECTOR, "form button").click()
    out = browser.find_element(By.ID, "out")
    _wait(browser, lambda d: out.text != "")
    assert out.text == "unknown token"
    assert browser.current_url.endswith("/console/login")


REPO = Path(__file__).resolve().parents[1]
XSS = '<img src=x onerror="window.__xss=1">'
"""A lobe name planted in the findings file: the answer shows it as text, never as markup."""


@pytest.fixture(scope="module")
def ask_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdminServer, str]]:
    """A console over a stored brain (2 mm, 24 slices) and the shipped omnimri-tiny package."""
    from inference.package import ModelPackage

    if "language" not in ModelPackage.load(REPO / "models" / "omnimri-tiny").spec.extra:
        pytest.skip("models/omnimri-tiny has no extra.language: run 'omnimri-node train "
                    "language'")
    tmp = tmp_path_factory.mktemp("console-ask")
    doc = _config(tmp, free_port())
    doc["models"] = {"path": str(REPO / "models")}
    doc["pipelines"]["brain"] = {"model": "omnimri-tiny",
                                 "instructions": ["detect abnormalities", "write the report"]}
    yield from _serve(tmp, doc, slices=24)


def _ask(driver: Any, question: str) -> Any:
    """Type ``question`` into the series page's ask box; the answer element once answered."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('answer').removeAttribute('data-status')")
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    # The first question runs the model on the series (seconds; minutes on a loaded machine).
    _wait(driver, lambda d: d.find_element(By.ID, "answer").get_attribute("data-status")
          is not None, timeout=300.0)
    return driver.find_element(By.ID, "answer")


def test_console_ask_box_for_a_viewer(ask_server: tuple[AdminServer, str], browser: Any) -> None:
    import json

    from selenium.webdriver.common.by import By

    from dicom_node.audit import read_audit

    srv, uid = ask_server
    settings = srv.backend.settings
    assert settings.audit.path is not None

    def asks() -> list[dict[str, Any]]:
        assert settings.audit.path is not None
        return [r for r in read_audit(settings.audit.path, event="admin_action")
                if r.get("action") == "ask"]

    _sign_in(browser, srv.url, VIEWER)
    browser.get(f"{srv.url}/console/series/{uid}")
    assert "Ask about this series" in browser.page_source
    assert browser.find_elements(By.ID, "rerun") == []  # a viewer, who may still ask

    answer = _ask(browser, "How many lesions are there?")
    assert answer.get_attribute("data-status") == "200", answer.text
    assert answer.get_attribute("data-refused") == "false", answer.text
    assert "lesion" in answer.text.lower() and answer.text.endswith("."), answer.text
    assert "omnimri-tiny" in browser.find_element(By.ID, "askmodel").text
    browser.execute_script("arguments[0].scrollIntoView()", answer)
    _shot(browser, "ask")
    [first] = asks()
    assert (first["token_id"], first["target"], first["question_type"], first["refused"]) == (
        "ward-viewer", uid, "count", False)

    answer = _ask(browser, "what is the patient's name?")
    assert answer.get_attribute("data-status") == "200"
    assert answer.get_attribute("data-refused") == "true", answer.text
    assert answer.text.startswith("I cannot answer that"), answer.text
    assert "Not answered" in browser.find_element(By.ID, "askmodel").text
    assert [r["refused"] for r in asks()] == [False, True]

    # Findings whose words carry markup (a tampered cache, a future generative model): the
    # answer shows them as text; no element is created and no script runs.
    [cache] = (settings.storage.path.parent / "language").glob(f"{uid}.r*.json")
    facts = json.loads(cache.read_text())
    facts["lesions"] = [{"kind": "wmh", "side": "left", "lobe": XSS, "diameter_mm": 9.0,
                         "volume_ml": 0.3}]
    facts["lesions_measured"] = True
    cache.write_text(json.dumps(facts))
    answer = _ask(browser, "which side is the largest lesion on?")
    assert answer.get_attribute("data-status") == "200", answer.text
    assert XSS in answer.text, answer.text
    assert answer.find_elements(By.TAG_NAME, "img") == []
    assert "&lt;img" in answer.get_attribute("innerHTML")
    assert browser.execute_script("return window.__xss === undefined")
    assert len(asks()) == 3

    text = Path(str(settings.audit.path)).read_text()
    assert "patient's name" not in text and "How many" not in text  # no question text
    assert "OMNIMRI^PHANTOM" not in text and "OMNIMRI^PHANTOM" not in browser.page_source
