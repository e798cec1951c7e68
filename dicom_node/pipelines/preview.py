"""The ``preview`` pipeline: a secondary-capture montage of a series (no model).

It reads the series' headers, sorts the images along the slice normal, picks up to
:data:`MAX_TILES` evenly spaced slices and decodes only those (any transfer syntax pydicom can
decode, compressed ones through the pylibjpeg plugins), windows them together (1st–99th
percentile of the picked pixels) and tiles them into one 8-bit MONOCHROME2 Secondary Capture
Image in the same study, in a new series marked as AI-node output not for diagnosis. The
object is built by the exporters' one SC builder (:func:`export.sc.secondary_capture`: the
derived-series attributes of :mod:`export.derived`, the research marking of
:func:`export.common.finish`).

The Series and SOP Instance UIDs are derived from the job id (:mod:`export.uids`, kind
``preview``), so running the job again yields the same object and the PACS replaces it instead
of storing a duplicate.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from dicom_node import __version__, metrics
from dicom_node.config import NodeSettings, PipelineConfig
from dicom_node.logs import get_logger
from dicom_node.pipelines import PipelineError, UnsupportedSeries
from dicom_node.series import Series
from export import uids
from export.derived import DerivedSeries, Equipment
from export.limits import fit
from export.sc import secondary_capture

log = get_logger(__name__)

MAX_TILES = 16
"""Most slices shown in the montage. Default 16."""
TILE_PX = 256
"""Longest side of one tile, pixels. Default 256."""
SERIES_DESCRIPTION = "AI NODE PREVIEW - NOT FOR DIAGNOSTIC USE"
"""SeriesDescription of every preview (at most 64 characters)."""
SERIES_NUMBER_OFFSET = 9000
"""The preview's Series Number is the source's plus this. Default 9000."""


def preview_uids(job_id: str) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the preview made by ``job_id``.

    :func:`export.uids.series_uid` / :func:`export.uids.instance_uid` of kind ``preview``:
    stable across re-runs.
    """
    return uids.series_uid(job_id, "preview"), uids.instance_uid(job_id, "preview")


def _slice_position(ds: pydicom.Dataset) -> float | None:
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
        return None
    normal = np.cross([float(x) for x in iop[:3]], [float(x) for x in iop[3:]])
    return float(np.dot(normal, [float(x) for x in ipp]))


def _frames(ds: pydicom.Dataset) -> list[npt.NDArray[np.float32]]:
    """The grey-level frames of one instance (colour is averaged to grey), float32."""
    arr = np.asarray(ds.pixel_array, dtype=np.float32)
    spp = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if spp > 1:
        arr = arr.mean(axis=-1)
    if frames > 1:
        return [arr[i] for i in range(arr.shape[0])]
    return [arr]


def _resize(img: npt.NDArray[np.float32], longest: int) -> npt.NDArray[np.float32]:
    """Resize so the longest side is ``longest`` pixels (bilinear)."""
    from scipy.ndimage import zoom

    scale = longest / max(img.shape)
    if abs(scale - 1.0) < 1e-6:
        return img
    out: npt.NDArray[np.float32] = zoom(img, scale, order=1, prefilter=False)
    return out


def montage(slices: list[npt.NDArray[np.float32]], tile_px: int = TILE_PX) -> npt.NDArray[np.uint8]:
    """Tile grey images into one 8-bit image, windowed together (1st–99th percentile).

    Args:
        slices: 2-D images in display order.
        tile_px: Longest side of each tile, pixels.

    Returns:
        ``uint8`` array ``[rows, columns]``; a grid of ``ceil(sqrt(n))`` columns.
    """
    if not slices:
        raise ValueError("no slices to tile")
    tiles = [_resize(s, tile_px) for s in slices]
    stack = np.concatenate([t.ravel() for t in tiles])
    lo, hi = np.percentile(stack, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0
    ncols = math.ceil(math.sqrt(len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    canvas = np.zeros((nrows * th, ncols * tw), dtype=np.uint8)
    for n, t in enumerate(tiles):
        r, c = divmod(n, ncols)
        scaled = np.clip((t - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        y0 = r * th + (th - t.shape[0]) // 2
        x0 = c * tw + (tw - t.shape[1]) // 2
        canvas[y0 : y0 + t.shape[0], x0 : x0 + t.shape[1]] = scaled
    return canvas


class PreviewPipeline:
    """Secondary-capture montage of a series (see the module docstring).

    Args:
        name: The pipeline's name in the configuration.
        cfg: Its configuration (only ``kind`` matters here).
        settings: The node configuration (the AE title names the equipment).
    """

    def __init__(self, name: str, cfg: PipelineConfig, settings: NodeSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings

    def run(self, series: Series, job_id: str) -> list[pydicom.Dataset]:
        """Make the montage of ``series``; one SC instance with UIDs derived from ``job_id``.

        Raises:
            UnsupportedSeries: No instance of the series has decodable pixel data.
        """
        t0 = time.perf_counter()
        # Pass 1: headers only, to order every image (frame) along the slice normal.
        entries: list[tuple[tuple[float, float], Path, int]] = []
        problems: list[str] = []
        ref: pydicom.Dataset | None = None
        for inst in series.instances:
            try:
                hdr = pydicom.dcmread(inst.path, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                problems.append(f"{inst.sop_instance_uid}: unreadable ({exc.__class__.__name__})")
                continue
            if "Rows" not in hdr or "Columns" not in hdr:
                continue  # not an image (SR, presentation state, ...)
            pos = _slice_position(hdr)
            number = float(hdr.get("InstanceNumber", 0) or 0)
            for k in range(int(hdr.get("NumberOfFrames", 1) or 1)):
                entries.append(((pos if pos is not None else number, float(k)), inst.path, k))
            if ref is None:
                ref = hdr
        entries.sort(key=lambda t: t[0])
        n = len(entries)
        k = min(n, MAX_TILES)
        picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if n else []
        # Pass 2: decode only the instances that hold a picked image.
        decoded: dict[Path, list[npt.NDArray[np.float32]] | None] = {}
        tiles: list[npt.NDArray[np.float32]] = []
        for i in picks:
            _, path, frame = entries[i]
            if path not in decoded:
                try:
                    decoded[path] = _frames(pydicom.dcmread(path))
                except Exception as exc:  # noqa: BLE001 - any decoder failure is the same to us
                    problems.append(f"{path.name}: cannot decode ({exc})")
                    decoded[path] = None
            frames = decoded[path]
            if frames is not None and frame < len(frames):
                tiles.append(frames[frame])
        if ref is None or not tiles:
            detail = "; ".join(problems[:3]) or "no instance has pixel data"
            raise UnsupportedSeries(f"series {series.key}: nothing to preview ({detail})")
        if problems:
            log.warning("preview skipped instances", series_key=series.key,
                        skipped=len(problems), first=problems[0])
        pixels = montage(tiles)
        metrics.observe_stage("volume", time.perf_counter() - t0)  # reading + montage; no model
        t0 = time.perf_counter()

        number = int(ref.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
        series_out = DerivedSeries(
            job_id=job_id,
            kind="preview",
            number=min(number, 2**31 - 1),
            description=SERIES_DESCRIPTION,
            equipment=Equipment(
                manufacturer="OmniMRI Node",
                model_name=f"preview pipeline {self.name}",
                software_versions=(__version__,),
                node_name=self.settings.node.ae_title,
            ),
            created=datetime.now(),
        )
        try:
            sc = secondary_capture(ref, pixels, series_out)
        except (ValueError, TypeError, AttributeError) as exc:
            raise PipelineError(f"series {series.key}: cannot build the preview: {exc}") from exc
        sc.BurnedInAnnotation = "NO"
        if "Laterality" not in sc and "BodyPartExamined" not in sc:
            # Type 2C, needed while the body part is unknown (a montage has no side); with
            # Body Part Examined (copied from the source) it says whether Laterality applies
            sc.Laterality = ""
        sc.ImageComments = fit("ImageComments", (
            f"Montage of {len(tiles)} of {n} images of series {series.series_instance_uid}; "
            "made by an AI node, not for diagnostic use"
        ))
        metrics.observe_stage("export", time.perf_counter() - t0)
        log.info("preview made", job_id=job_id, series_key=series.key, tiles=len(tiles),
                 rows=int(pixels.shape[0]), columns=int(pixels.shape[1]))
        return [sc]
