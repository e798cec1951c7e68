"""The ``Volume``: a series as one 3-D array with its patient geometry.

Conventions (used by engines and exporters alike):

* ``array`` is indexed ``[slice, row, column]`` (``k, j, i``), float32, rescale applied.
* ``affine`` is 4x4 and maps homogeneous *array indices* ``(k, j, i, 1)`` to patient
  coordinates in millimetres, DICOM LPS. The position of voxel ``[k, j, i]`` is
  ``affine @ [k, j, i, 1]``.
* ``spacing`` is ``(slice, row, column)`` spacing in millimetres, i.e. the norms of the first
  three affine columns. Slice spacing is measured from positions, not SliceThickness.
* ``slices[k]`` names the source image of slice ``k`` (SOP Instance UID, and the 1-based frame
  number for multi-frame instances), so exporters can reference the exact source frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class VolumeError(ValueError):
    """The series cannot be turned into one consistent volume; the message says why."""


@dataclass(frozen=True, slots=True)
class SliceRef:
    """The source of one slice of a volume."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None
    """1-based frame number in a multi-frame instance; ``None`` for single-frame."""


@dataclass(slots=True)
class Volume:
    """A 3-D image on the source grid; see the module docstring for conventions."""

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    slices: list[SliceRef]
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = "MR"
    metadata: dict[str, str] = field(default_factory=dict)
    """A few header values engines may use (e.g. ``MRAcquisitionType``, contrast hints)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(slice, row, column)`` spacing in millimetres."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    def index_to_lps(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map array indices ``(..., 3)`` in ``(k, j, i)`` order to LPS millimetres."""
        pts = np.asarray(kji, dtype=np.float64)
        return pts @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS millimetres ``(..., 3)`` to fractional array indices ``(k, j, i)``."""
        pts = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]
