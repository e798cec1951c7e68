"""PNG previews of a stored series: the middle slice, windowed to its 1st-99th percentile."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicom_node.series import StoredInstance

MAX_SIZE_PX = 256
"""Longer side of a thumbnail, pixels. Default 256."""


class ThumbnailError(ValueError):
    """The series has no instance with displayable pixel data."""


def middle_instance(instances: Sequence[StoredInstance]) -> StoredInstance:
    """The instance in the middle of the series by Instance Number (arrival order if unset)."""
    if not instances:
        raise ThumbnailError("the series has no instances")
    ordered = sorted(
        enumerate(instances),
        key=lambda p: (p[1].instance_number is None, p[1].instance_number or 0, p[0]),
    )
    return ordered[len(ordered) // 2][1]


def render_png(path: Path, *, max_size: int = MAX_SIZE_PX) -> bytes:
    """A grey-scale PNG of one DICOM file (its middle frame when multi-frame).

    The image is scaled (down or up) so that its longer side is ``max_size`` pixels.

    Raises:
        ThumbnailError: No pixel data, or pixel data that cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise ThumbnailError(f"{path.name}: no pixel data")
        arr = np.asarray(ds.pixel_array, dtype=np.float32)
    except ThumbnailError:
        raise
    except Exception as err:  # pydicom raises many types for undecodable pixel data
        raise ThumbnailError(f"{path.name}: pixel data cannot be decoded ({type(err).__name__})"
                             ) from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1 and arr.ndim >= 3:
        arr = arr[frames // 2]
    if arr.ndim == 3:  # colour: convert to luminance
        arr = arr[..., :3].mean(axis=-1)
    lo, hi = np.percentile(arr, [1.0, 99.0]) if arr.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    img8 = (np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        img8 = 255 - img8
    img = Image.fromarray(img8, mode="L")
    scale = max_size / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """A small in-memory LRU of rendered thumbnails keyed by (series UID, revision, size)."""

    def __init__(self, capacity: int = 256) -> None:
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, instances: Sequence[StoredInstance], key: tuple[str, int, int]) -> bytes:
        """The PNG for ``key``, rendering the middle instance of ``instances`` once."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        png = render_png(middle_instance(instances).path, max_size=key[2])
        with self._lock:
            self._items[key] = png
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return png
