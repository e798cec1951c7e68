"""Secondary captures: key slices with the results burned in, and a one-page summary card.

A set of single-frame RGB SC images (SOP class 1.2.840.10008.5.1.4.1.1.7), one series:

* instance 1: the summary card (model, version, measurements, detections, suggestion, findings,
  impression, "NOT FOR DIAGNOSTIC USE");
* instances 2..: key slices (see :func:`export.common.key_slices`), each source pixel drawn as a
  ``scale x scale`` block (nearest neighbour, see :func:`display_scale`) at the top left, masks
  blended in their segment colour (:data:`ALPHA`) with an opaque outline, detections circled
  and labelled, and a legend panel below the image.

No patient identifiers are burned in; BurnedInAnnotation is YES (the images carry text).
"""

from __future__ import annotations

import math
import textwrap

import highdicom as hd
import numpy as np
import numpy.typing as npt
import structlog
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from export.common import (
    NOT_FOR_DIAGNOSIS,
    display_rgb,
    display_window,
    finish,
    key_slices,
    patient_orientation,
)
from export.context import NOTHING_BUILT, Built, ExportContext
from export.derived import DerivedSeries
from export.limits import fit
from export.text import detection_label, detection_line, sentence_case

log = structlog.get_logger(__name__)

ALPHA = 0.45
"""Opacity of the mask fill over the grey image."""
MIN_DISPLAY_PX = 512
"""Key slice images are scaled up by an integer factor until the larger side reaches this."""
WARNING_RED = (230, 30, 30)
CARD_SIZE = (1000, 1300)
"""Summary card width, height in pixels."""

Font = ImageFont.FreeTypeFont


def _font(size: int) -> Font:
    """Pillow's built-in scalable font (no font files needed; Pillow >= 10.1 with FreeType)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; the SC exporter needs it")
    return font


def display_scale(rows: int, columns: int) -> int:
    """Integer up-scaling factor of a key slice image of ``rows x columns`` source pixels."""
    return max(1, math.ceil(MIN_DISPLAY_PX / max(rows, columns, 1)))


def render_key_slice(
    ctx: ExportContext, k: int, window: tuple[float, float] | None = None
) -> npt.NDArray[np.uint8]:
    """RGB image ``[rows, cols, 3]`` of slice ``k`` with masks, detections and a legend.

    Args:
        ctx: The export context.
        k: Slice index in the volume.
        window: ``(low, high)`` grey window in volume units; default
            :func:`export.common.display_window` of the volume.
    """
    vol = ctx.volume
    lo, hi = window or display_window(vol.array)
    grey = np.clip((vol.array[k] - lo) / (hi - lo) * 255.0, 0, 255)
    f = display_scale(*vol.shape[1:])
    rgb = np.repeat(np.repeat(grey, f, axis=0), f, axis=1)[..., None].repeat(3, axis=2)
    segs = sorted(
        ctx.results.segments, key=lambda s: (s.label.task == "pathological", s.label.number)
    )
    for s in segs:
        m = np.repeat(np.repeat(s.mask[k], f, axis=0), f, axis=1)
        if not m.any():
            continue
        colour = np.array(display_rgb(s.label), dtype=np.float64)
        rgb[m] = (1.0 - ALPHA) * rgb[m] + ALPHA * colour
        edge = m & ~ndimage.binary_erosion(m, iterations=max(1, f // 3))
        rgb[edge] = colour
    img = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    small = _font(min(22, max(12, 4 * f)))
    for n, det in enumerate(ctx.results.detections, start=1):
        k0, j0, i0, k1, j1, i1 = det.bbox_index
        if not k0 <= k < k1:
            continue
        pad = 2 * f
        box = (i0 * f - pad, j0 * f - pad, i1 * f + pad, j1 * f + pad)
        draw.ellipse(box, outline=WARNING_RED, width=max(2, f // 2))
        label = detection_label(det, n)
        draw.text(label_position(draw, label, small, box, img.size), label, fill=WARNING_RED,
                  font=small, stroke_width=2, stroke_fill=(0, 0, 0))
    return _with_legend(ctx, np.asarray(img), k)


def label_position(
    draw: ImageDraw.ImageDraw, text: str, font: Font, box: tuple[int, int, int, int],
    size: tuple[int, int],
) -> tuple[int, int]:
    """Top left corner (pixels) of ``text`` next to ``box``, inside the image.

    Above the box, else below it, shifted so that the whole text lies inside the ``(width,
    height)`` image.
    """
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=2)
    w, h = right - left, bottom - top
    width, height = size
    x = min(max(box[0], 0), max(width - w - 2, 0))
    y = box[1] - h - 6
    if y < 0:
        y = box[3] + 4
    y = min(max(y, 0), max(height - h - 2, 0))
    return int(x), int(y)


def _with_legend(ctx: ExportContext, image: npt.NDArray[np.uint8], k: int) -> npt.NDArray[np.uint8]:
    width = max(image.shape[1], 480)
    font = _font(16)
    bold = _font(18)
    line = 22
    entries = [s.label for s in sorted(ctx.results.segments, key=lambda s: s.label.number)]
    spacing = ctx.volume.spacing
    height = image.shape[0] + 12 + line * (3 + len(entries)) + 8
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(image, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.shape[0] + 6
    draw.text((6, y), f"AI RESULT - RESEARCH - {NOT_FOR_DIAGNOSIS}", fill=WARNING_RED, font=bold)
    y += line
    model = ctx.results.model
    draw.text(
        (6, y), f"{model.name} {model.version}  slice {k + 1}/{ctx.volume.shape[0]}",
        fill=(220, 220, 220), font=font,
    )
    y += line
    by_number = {s.label.number: s for s in ctx.results.segments}
    for lab in entries:
        draw.rectangle((6, y + 3, 22, y + 17), fill=display_rgb(lab))
        ml = by_number[lab.number].volume_ml(spacing)
        draw.text((30, y), f"{lab.label}: {ml:.1f} ml", fill=(230, 230, 230), font=font)
        y += line
    if ctx.results.detections:
        draw.ellipse((6, y + 3, 22, y + 17), outline=WARNING_RED, width=2)
        draw.text(
            (30, y), f"AI detection ({len(ctx.results.detections)} in total)",
            fill=(230, 230, 230), font=font,
        )
    return np.asarray(canvas, dtype=np.uint8)


def render_summary_card(ctx: ExportContext) -> npt.NDArray[np.uint8]:
    """The one-page summary card as RGB ``[height, width, 3]``."""
    res = ctx.results
    model = res.model
    w, h = CARD_SIZE
    img = Image.new("RGB", (w, h), (12, 12, 16))
    draw = ImageDraw.Draw(img)
    title, head, body = _font(34), _font(24), _font(20)
    draw.rectangle((0, 0, w, 70), fill=WARNING_RED)
    draw.text((20, 16), f"AI RESULT - RESEARCH - {NOT_FOR_DIAGNOSIS}", fill="white", font=title)
    y = 90
    src = ctx.sources[0]
    when = ctx.content_datetime.strftime("%Y-%m-%d %H:%M")
    node_version = ctx.node_version
    lines = [
        (head, f"{model.name} {model.version}", (255, 255, 255)),
        (body, f"by {model.manufacturer} on node {ctx.options.node_name} {node_version}".strip(),
         (200, 200, 200)),
        (body, f"Source series {getattr(src, 'SeriesNumber', '')}: "
               f"{getattr(src, 'SeriesDescription', '')}  -  computed {when}", (200, 200, 200)),
    ]
    for font, text, colour in lines:
        draw.text((20, y), text[:90], fill=colour, font=font)
        y += int(font.size) + 10
    y += 10

    def section(name: str) -> None:
        nonlocal y
        y += 8
        draw.text((20, y), name, fill=(255, 210, 80), font=head)
        y += 34

    def text_line(text: str, colour: tuple[int, int, int] = (235, 235, 235)) -> None:
        nonlocal y
        draw.text((36, y), text, fill=colour, font=body)
        y += 26

    spacing = ctx.volume.spacing
    if res.segments:
        section("Volumes")
        for s in sorted(res.segments, key=lambda m: m.label.number):
            draw.rectangle((36, y + 4, 54, y + 22), fill=display_rgb(s.label))
            draw.text(
                (64, y), f"{s.label.label}: {s.volume_ml(spacing):.1f} ml", fill=(235, 235, 235),
                font=body,
            )
            y += 26
    section("Detections")
    if not res.detections:
        text_line("None.")
    for n, det in enumerate(res.detections, start=1):
        text_line(detection_line(det, n))
    if res.diagnosis is not None:
        section("Suggestion")
        text_line(f"{res.diagnosis.code.meaning} (p = {res.diagnosis.probability:.2f})")
        others = ", ".join(f"{k} {v:.2f}" for k, v in res.diagnosis.probabilities.items())
        for part in textwrap.wrap(others, 80)[:3]:
            text_line(part, (180, 180, 180))
    if res.report is not None:
        report = res.report
        for heading, text in (("Findings", report.findings), ("Impression", report.impression)):
            section(heading)
            for part in textwrap.wrap(sentence_case(text), 80)[:8]:
                text_line(part)
    draw.rectangle((0, h - 60, w, h), fill=WARNING_RED)
    draw.text(
        (20, h - 46), "Automatic output. Verify on the source images. Not for diagnostic use.",
        fill="white", font=body,
    )
    return np.asarray(img, dtype=np.uint8)


def secondary_capture(
    ref: Dataset, pixels: npt.NDArray[np.uint8], series: DerivedSeries, index: int = 0, *,
    frame: int | None = None,
) -> Dataset:
    """One 8-bit Secondary Capture Image of ``pixels`` in ``ref``'s study, marked research.

    The one SC builder of the node (the exporters' key slices and summary card, the preview
    montage): highdicom ``SCImage.from_ref_dataset`` with the patient, study and Frame of
    Reference of the source image ``ref`` (frame ``frame`` of a multi-frame one), the derived
    series' attributes (:meth:`export.derived.DerivedSeries.attributes`), Explicit VR Little
    Endian, then :func:`export.common.finish`.

    Args:
        ref: Source image header the SC derives from.
        pixels: ``[rows, columns]`` (MONOCHROME2) or ``[rows, columns, 3]`` (RGB) 8-bit pixels.
        series: The derived series the image belongs to.
        index: Instance index in the series (0-based).
        frame: 1-based frame number of ``ref``, if it is multi-frame.
    """
    photometric = (hd.PhotometricInterpretationValues.RGB if pixels.ndim == 3
                   else hd.PhotometricInterpretationValues.MONOCHROME2)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=patient_orientation(ref, frame),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **series.attributes(index),
    )
    return finish(sc, ref)


def build_sc(ctx: ExportContext, built: Built = NOTHING_BUILT, /) -> list[Dataset]:
    """Summary card and key slice secondary captures (instance 1 is the card).

    An :class:`~export.context.Exporter`; ``built`` is not used.
    """
    model = ctx.results.model
    images: list[tuple[npt.NDArray[np.uint8], Dataset, int | None]] = []
    card_src, card_frame = ctx.source_of_slice(ctx.volume.shape[0] // 2)
    images.append((render_summary_card(ctx), card_src, card_frame))
    slices = key_slices(ctx)
    window = display_window(ctx.volume.array)
    for k in slices:
        src, frame = ctx.source_of_slice(k)
        images.append((render_key_slice(ctx, k, window), src, frame))
    series = ctx.derived("sc")
    out: list[Dataset] = []
    for n, (pixels, src, frame) in enumerate(images):
        sc = secondary_capture(src, pixels, series, n, frame=frame)
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = fit("ImageComments", (
            "AI summary card" if n == 0 else f"AI key slice {slices[n - 1] + 1}"
        ) + " - research, not for diagnostic use")
        sc.DerivationDescription = fit(
            "DerivationDescription", f"AI results of {model.name} {model.version} burned in"
        )
        sc.ConversionType = "WSD"
        if n > 0:
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            if frame is not None:
                ref.ReferencedFrameNumber = frame
            sc.SourceImageSequence = [ref]
        out.append(sc)
    log.info("sc built", job_id=ctx.job_id, images=len(out), key_slices=slices)
    return out
