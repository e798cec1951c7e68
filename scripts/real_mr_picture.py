"""Draw ``models/<package>/real_mr.png``: real MR through the served path, image beside segments.

One row per scan (the MNI152 template as 1 mm DICOM, Colin27 with skull, dipy's
``aniso_vox``, nibabel's ``anatomical.nii``; the acceptance list of
:mod:`inference.omnimri.real_mr`), the middle axial slice of each: left the image, right the
model's segments over it (CSF blue, grey matter grey, white matter white, lesions red). Each
panel is scaled to the same width with the scan's in-plane aspect (pixel spacing, mm) kept.

Usage: ``python3 scripts/real_mr_picture.py [--model models/omnimri-tiny] [--out PNG]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from inference.omnimri.real_mr import SOURCES
from inference.omnimri.tasks import run_omnimri
from inference.package import ModelPackage

PANEL_PX = 232
"""Width of one panel, pixels."""

COLOURS = {"CSF": (40, 90, 230), "Grey matter": (150, 150, 150), "White matter": (245, 245, 245),
           "WM hyperintensity": (230, 30, 30), "Mass": (230, 30, 30), "Oedema": (230, 120, 40)}
"""sRGB of each drawn segment (lesions last, over the tissues)."""

ROWS = ("MNI152", "Colin27 ch2.nii", "dipy", "nibabel")
"""Which sources are drawn, by the start of their names, top to bottom."""


def _grey(slice_: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    lo, hi = np.percentile(slice_, [1.0, 99.5])
    out: npt.NDArray[np.uint8] = (np.clip((slice_ - lo) / max(hi - lo, 1e-6), 0, 1)
                                  * 255).astype(np.uint8)
    return out


def row(package: ModelPackage, volume: object) -> Image.Image:
    """Image and overlay panels of the middle axial slice of ``volume``."""
    from inference.volume import Volume

    assert isinstance(volume, Volume)
    res = run_omnimri(package, volume, ["segment brain tissues", "detect abnormalities"])
    k = volume.array.shape[0] // 2
    grey = _grey(volume.array[k].astype(np.float32))
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    overlay = rgb.copy()
    for seg in sorted(res.segments, key=lambda s: s.label.label in ("WM hyperintensity", "Mass",
                                                                      "Oedema")):
        colour = COLOURS.get(seg.label.label)
        if colour is None:
            continue
        m = seg.mask[k].astype(bool)
        overlay[m] = 0.35 * overlay[m] + 0.65 * np.asarray(colour, np.float32)
    rows, cols = grey.shape
    dy, dx = float(volume.spacing[1]), float(volume.spacing[2])
    height = max(1, round(PANEL_PX * rows * dy / (cols * dx)))
    panels = [Image.fromarray(a.astype(np.uint8), "RGB").resize((PANEL_PX, height),
                                                                Image.Resampling.NEAREST)
              for a in (rgb, overlay)]
    out = Image.new("RGB", (2 * PANEL_PX, height))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (PANEL_PX, 0))
    return out


def main() -> None:
    """Draw the picture."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/omnimri-tiny"))
    ap.add_argument("--out", type=Path, default=None, help="default: <model>/real_mr.png")
    args = ap.parse_args()
    package = ModelPackage.load(args.model)
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for prefix in ROWS:
            [src] = [s for s in SOURCES if s.name.startswith(prefix)]
            folder = Path(tmp) / prefix
            folder.mkdir()
            images.append(row(package, src.make(folder)))
    sheet = Image.new("RGB", (2 * PANEL_PX, sum(i.height for i in images)))
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height
    out = args.out or args.model / "real_mr.png"
    sheet.save(out, optimize=True)
    print(f"written: {out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
