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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdminServer, str]]:
    tmp = tmp_path_factory.mktemp("console")
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp, free_port())))
    settings = load_config(cfg)
    settings.storage.path.mkdir(parents=True)
    from omnimri_samples import brain_series

    uid, _ = _index_series(settings, datasets=brain_series(resolution_mm=2, slices=9))
    srv = AdminServer(settings, config_path=cfg, host="127.0.0.1", port=free_port())
    srv.start()
    yield srv, uid
    srv.stop()


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
