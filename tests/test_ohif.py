"""What a radiologist sees: the e2e study (PACS → node → PACS) opened in OHIF 3.13.

The study is produced as in ``tests/test_e2e.py`` (Debian's Orthanc as the PACS sends the
brain slab to ``omnimri-node serve`` running the shipped ``brain`` pipeline; the node stores
SEG, SR, SC, GSPS and KOS back). OHIF's prebuilt viewer (npm ``@ohif/app``, unpacked by ``make
install-test`` into ``.ohif/``) is served offline beside Orthanc's DICOMweb
(``tests/fixtures/ohif.py``) and driven in headless Chromium with software WebGL. Asserted:

* the MR displays (the viewport shows the source series' image, not a black canvas);
* the SEG opens ("Yes" to OHIF's prompt) with every segment of the SEG listed in the
  Segmentation panel and drawn in colour over the image;
* the SR opens without a console error and every detection of the SR is loaded by OHIF's SR
  viewport on the source image its SCOORD names; after OHIF's tracking prompt ("Yes") every
  detection is listed in the Measurements panel and drawn at its place (annotation colour
  along the rectangle's projection onto the canvas, on the detection's slice);
* the summary-card SC displays (its red banner is on the canvas);
* no SEVERE browser console message during the whole session;
* and the SR passes pixelmed's DicomSRValidator (TID 1500) with no error.

Screenshots (``ohif-mr.png``, ``ohif-seg.png``, ``ohif-sr.png``, ``ohif-sr-panel.png``,
``ohif-sc.png``) are written under the test's tmp folder, or ``$OMNIMRI_OHIF_SHOTS``.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from omnimri_samples import make_mr_series
from tests.fixtures import ohif, pixelmed
from tests.fixtures.orthanc import ORTHANC_BIN, OrthancServer
from tests.test_e2e import (
    MODALITY_OF_KIND,
    PIPELINE,
    fetch,
    labelmap_capable,
    models_folder,
    shipped_sections,
    study_instances,
    wait_for_job,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(ohif.skip_reason() is not None, reason=str(ohif.skip_reason())),
    pytest.mark.skipif(not ORTHANC_BIN.exists(), reason=f"Orthanc not installed ({ORTHANC_BIN})"),
]

GREEN_MIN = 120
"""OHIF draws SR display annotations green and tracked measurements yellow (G high, B low)."""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = labelmap_capable(OrthancServer(tmp_path_factory.mktemp("ohif-pacs")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


ABNORMAL_CASE_SEED = 900_000
"""Synthetic case (generator seed, outside the held-out and validation sets) shown in OHIF."""


def abnormal_source_series() -> list[Dataset]:
    """A FLAIR-like synthetic head with a 27 mm mass, as a 2 mm MR series (the shipped model
    calls a normal brain normal, so a viewer test needs an abnormal study to draw a detection).

    The expected-count tags let the node complete it at its last instance.
    """
    from inference.omnimri import synthetic as syn
    from inference.omnimri.evaluate import case_volume

    case = syn.make_case(ABNORMAL_CASE_SEED, diagnosis=2, contrast="FLAIR")
    vol = case_volume(case)
    datasets = make_mr_series(vol.array, vol.affine, description="FLAIR BRAIN E2E (synthetic mass)")
    for ds in datasets:
        ds.NumberOfTemporalPositions = 1
        ds.NumberOfSlices = len(datasets)
    return datasets


def _produce_study(pacs: OrthancServer, node_factory: Any, tmp_path: Path,
                   request: pytest.FixtureRequest
                   ) -> tuple[str, str, dict[str, list[Dataset]]]:
    """Run the e2e round trip; returns the study and source series UIDs and the stored
    objects by modality."""
    sections = shipped_sections()
    pipeline = sections["pipelines"][PIPELINE]
    models, _which = models_folder(pipeline["model"], tmp_path, request)
    sections["models"]["path"] = str(models)
    node = node_factory(
        completion={"quiet_seconds": 2.0, "poll_interval_s": 0.5},
        jobs={"workers": 2, "poll_interval_s": 0.5, "max_attempts": 1},
        destinations={"pacs": {"kind": "dimse", "ae_title": pacs.ae_title,
                               "host": "127.0.0.1", "port": pacs.dicom_port,
                               "timeout_s": 30}},
        **sections,
    )
    source = abnormal_source_series()
    for ds in source:
        pacs.upload(ds)
    study_uid = str(source[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    pacs.set_node(node.ae_title, node.port)
    pacs.send_study(study_uid)
    wait_for_job(node, 90.0)
    deadline = time.monotonic() + 60
    while True:
        found = study_instances(pacs, study_uid)
        outputs = [i for i in found if i["MainDicomTags"]["SOPInstanceUID"] not in source_uids]
        kinds = {i["SeriesTags"]["Modality"] for i in outputs}
        if kinds >= set(MODALITY_OF_KIND.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    objects: dict[str, list[Dataset]] = {}
    for inst in outputs:
        objects.setdefault(inst["SeriesTags"]["Modality"], []).append(fetch(pacs, inst["ID"]))
    assert set(objects) == set(MODALITY_OF_KIND.values()), sorted(objects)
    return study_uid, str(source[0].SeriesInstanceUID), objects


def _wait(what: str, cond: Callable[[], Any], timeout_s: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as exc:  # the page is still building; retry
            last = exc
        else:
            if isinstance(last, np.ndarray) or last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _viewport_png(driver: Any) -> np.ndarray:
    """RGB pixels of the (single) viewport element."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, '[data-cy="viewport-pane"]')
    return np.asarray(Image.open(io.BytesIO(el.screenshot_as_png)).convert("RGB")).astype(int)


def _double_click_series(driver: Any, modality: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]'):
        if el.text.strip() == modality:
            ActionChains(driver).double_click(el).perform()
            return
    raise AssertionError(f"no {modality} series in OHIF's study browser")


def _click_button(driver: Any, text: str) -> bool:
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.XPATH, f"//button[normalize-space(.)='{text}']"):
        if b.is_displayed():
            b.click()
            return True
    return False


def _annotation_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels in OHIF's annotation colours (green SR display, yellow tracked measurement),
    which the grey MR never has: green high, blue well below it."""
    return (rgb[..., 1] > GREEN_MIN) & (rgb[..., 2] < rgb[..., 1] - 60)


def _canvas_box(driver: Any, image_id: str, graphic: list[float]) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` in viewport-element screenshot pixels of an SCOORD's
    image points (cornerstone's image -> world -> canvas), 3 pixels wider."""
    pts = np.asarray(graphic, dtype=float).reshape(-1, 2).tolist()
    out = driver.execute_script(
        "const e = cornerstone.getEnabledElements()[0]; const v = e.viewport;"
        "const r = v.canvas.getBoundingClientRect();"
        "const el = document.querySelector('[data-cy=\"viewport-pane\"]')"
        ".getBoundingClientRect();"
        "return {off: [r.left - el.left, r.top - el.top], w: el.width, pts: arguments[1].map("
        "p => v.worldToCanvas(cornerstone.utilities.imageToWorldCoords(arguments[0], p)))}",
        image_id, pts)
    xy = np.asarray(out["pts"], dtype=float) + np.asarray(out["off"], dtype=float)
    xy *= _viewport_png(driver).shape[1] / float(out["w"])
    x0, y0 = np.floor(xy.min(axis=0)).astype(int) - 3
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int) + 3
    return int(x0), int(y0), int(x1), int(y1)


def _sr_detections(sr: Dataset) -> list[tuple[str, str, list[float]]]:
    """``(tracking id, referenced SOP Instance UID, SCOORD graphic data)`` per detection group
    in the SR's Imaging Measurements (what OHIF walks)."""
    out = []
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in item.ContentSequence:
            kids = group.ContentSequence
            tid = next(k.TextValue for k in kids
                       if k.ConceptNameCodeSequence[0].CodeValue == "112039")
            scoord = next(k for k in kids if k.ValueType == "SCOORD")
            uid = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            out.append((str(tid), str(uid), [float(v) for v in scoord.GraphicData]))
    return out


def test_ohif_shows_mr_seg_sr_and_sc(
    pacs: OrthancServer, node_factory: Any, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    from selenium.webdriver.common.by import By

    t0 = time.monotonic()
    study_uid, mr_uid, objects = _produce_study(pacs, node_factory, tmp_path, request)
    t_study = time.monotonic() - t0
    shots = Path(os.environ.get("OMNIMRI_OHIF_SHOTS") or tmp_path / "ohif")
    shots.mkdir(parents=True, exist_ok=True)
    [seg] = objects["SEG"]
    seg_labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    [sr] = objects["SR"]
    detections = _sr_detections(sr)
    assert detections, "the SR has no detection to show (model found none)"
    if pixelmed.available() is None:  # the SR the node wrote, against its templates
        assert pixelmed.validate_sr({"e2e-sr": sr}, tmp_path / "pixelmed") == {"e2e-sr": []}

    server = ohif.OhifServer(pacs.dicomweb_url)
    server.start()
    errors: list[str] = []
    try:
        with ohif.chromium() as d, ohif.screenshot_on_failure(d, shots / "ohif-failed.png"):
            def js(code: str) -> Any:
                return d.execute_script(code)

            d.get(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
            # -- the MR displays
            _wait("the MR in the viewport", lambda: mr_uid in (js(
                "const e = cornerstone.getEnabledElements()[0];"
                "return e && e.viewport.getCurrentImageId && e.viewport.getCurrentImageId()")
                or ""))
            for b in d.find_elements(By.XPATH, "//*[normalize-space(text())='Skip all']"):
                b.click()  # OHIF's first-visit tour
            _wait("the MR rendered", lambda: (_viewport_png(d).max(axis=-1) > 60).mean() > 0.1)
            d.save_screenshot(str(shots / "ohif-mr.png"))
            errors += ohif.console_errors(d)

            # -- the SR opens: every detection loaded by the SR viewport on its source image
            _double_click_series(d, "SR")
            loaded = _wait("the SR's measurements loaded", lambda: js(
                "const ds = services.displaySetService.getActiveDisplaySets()"
                ".find(d => d.Modality === 'SR');"
                "if (!ds || !ds.isLoaded || !ds.measurements) return null;"
                "const m = ds.measurements; return m.every(x => x.loaded) ? m.map(x => ("
                "{id: x.TrackingIdentifier, sop: x.ReferencedSOPInstanceUID,"
                " imageId: x.imageId})) : null"))
            assert sorted(m["id"] for m in loaded) == sorted(t for t, _, _ in detections)
            by_id = {m["id"]: m for m in loaded}
            for tid, sop, _ in detections:
                assert by_id[tid]["sop"] == sop and sop in by_id[tid]["imageId"], tid
            d.save_screenshot(str(shots / "ohif-sr.png"))
            errors += ohif.console_errors(d)

            # -- listed in the Measurements panel (OHIF's tracking prompt: Yes) ...
            _wait("OHIF's tracking prompt", lambda: _click_button(d, "Yes"))
            tracked = _wait("the measurements in OHIF's measurement service", lambda: js(
                "const m = services.measurementService.getMeasurements();"
                "return m.length ? m.map(x => x.referencedImageId) : null"))
            assert len(tracked) == len(detections)
            d.find_element(By.CSS_SELECTOR, '[data-cy="trackedMeasurements-btn"]').click()
            _wait("the Measurements panel", lambda: f"Measurements ({len(detections)})"
                  in d.find_element(By.TAG_NAME, "body").text)
            # ... and drawn at their place: annotation colour along each rectangle's outline
            for tid, sop, graphic in detections:
                image_id = next(i for i in tracked if sop in i)
                js("const v = cornerstone.getEnabledElements()[0].viewport;"
                   f"v.setImageIdIndex(v.getImageIds().indexOf('{image_id}'));")
                def on_slice(image_id: str = image_id) -> bool:
                    return bool(js("return cornerstone.getEnabledElements()[0].viewport"
                                   ".getCurrentImageId()") == image_id)

                _wait("the detection's slice", on_slice)
                time.sleep(0.5)
                x0, y0, x1, y1 = _canvas_box(d, image_id, graphic)
                box = _viewport_png(d)[max(y0, 0):y1, max(x0, 0):x1]
                drawn = _annotation_pixels(box)
                assert drawn.sum() > 2 * max(x1 - x0, y1 - y0), (tid, x0, y0, x1, y1)
            d.save_screenshot(str(shots / "ohif-sr-panel.png"))
            errors += ohif.console_errors(d)

            # -- the SEG opens, its segments listed and drawn in colour
            _double_click_series(d, "SEG")
            _wait("OHIF's SEG prompt", lambda: _click_button(d, "Yes"))
            listed = _wait("the SEG's segments in OHIF", lambda: js(
                "const s = services.segmentationService.getSegmentations();"
                "return s.length ? Object.values(s[0].segments).filter(x => x)"
                ".map(x => x.label) : null"))
            assert sorted(listed) == sorted(seg_labels)
            d.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
            panel = _wait("the Segmentation panel", lambda: all(
                label in d.page_source for label in seg_labels))
            assert panel
            # the middle slice (through the brain, not the neck or the vertex)
            js("const v = cornerstone.getEnabledElements()[0].viewport;"
               "v.setImageIdIndex(Math.floor(v.getImageIds().length / 2));")
            time.sleep(1.0)
            px = _wait("the SEG overlay", lambda: (
                p if (np.ptp(p := _viewport_png(d), axis=-1) > 60).mean() > 0.02 else None))
            assert (np.ptp(px, axis=-1) > 60).mean() > 0.02  # coloured overlay on the MR
            d.save_screenshot(str(shots / "ohif-seg.png"))
            errors += ohif.console_errors(d)

            # -- the SC (summary card first) displays
            for el in d.find_elements(By.CSS_SELECTOR, '[data-cy="study-browser-thumbnail"]'):
                if "OT" in el.text:
                    from selenium.webdriver.common.action_chains import ActionChains

                    ActionChains(d).double_click(el).perform()
                    break
            else:
                raise AssertionError("no SC thumbnail in OHIF's study browser")
            sc_series = str(objects["OT"][0].SeriesInstanceUID)
            _wait("the SC in the viewport", lambda: sc_series in (js(
                "return cornerstone.getEnabledElements()[0].viewport.getCurrentImageId()")
                or ""))
            px = _wait("the SC rendered", lambda: (
                p if ((p := _viewport_png(d))[..., 0] > 180).mean() > 0.01 else None))
            red = (px[..., 0] > 180) & (px[..., 1] < 90) & (px[..., 2] < 90)
            assert red.mean() > 0.01  # the red "research" banner / footer of the SC
            d.save_screenshot(str(shots / "ohif-sc.png"))
            errors += ohif.console_errors(d)
    finally:
        server.stop()
    assert errors == [], errors
    failed = [p for p in server.proxied if p[1] >= 400]
    assert failed == [], failed
    print(f"ohif: study in {t_study:.1f} s, viewer checks {time.monotonic() - t0 - t_study:.1f} s;"
          f" {len(detections)} detections; screenshots in {shots}")
