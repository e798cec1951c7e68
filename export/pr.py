"""Grayscale Softcopy Presentation State: the detections drawn over the source images.

One GSPS instance applying to the whole source series (every slice is referenced, with a VOI
window from :func:`export.common.display_window`, as on the SC key slices). On every slice a
detection covers, an ELLIPSE (PIXEL units) circles its in-plane extent on that slice and a text
says what it is; the layer is ``AI_DETECTIONS`` (red). Without detections, the key slices get
a text "no detection".
PACS viewers that support GSPS show these as overlays over the original images.
"""

from __future__ import annotations

import highdicom as hd
import structlog
from pydicom.dataset import Dataset

from export import uids
from export.common import (
    NOT_FOR_DIAGNOSIS,
    detection_ellipse,
    display_window,
    finish,
    key_slices,
    lab_color,
)
from export.context import NOTHING_BUILT, Built, ExportContext
from export.limits import fit
from export.text import detection_label

log = structlog.get_logger(__name__)

LAYER = "AI_DETECTIONS"


def _annotations(ctx: ExportContext, layer: hd.pr.GraphicLayer) -> list[hd.pr.GraphicAnnotation]:
    by_number = {s.label.number: s for s in ctx.results.segments}
    per_slice: dict[int, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = {}
    _, rows, cols = ctx.volume.shape
    for n, det in enumerate(ctx.results.detections, start=1):
        k0, j0, i0, k1, j1, i1 = det.bbox_index
        name = det.tracking_id or f"lesion-{n}"
        seg = by_number.get(det.segment_number)
        for k in range(max(k0, 0), min(k1, ctx.volume.shape[0])):
            if seg is not None and not seg.mask[k, j0:j1, i0:i1].any():
                continue
            ellipse = detection_ellipse(det, k, seg.mask if seg is not None else None,
                                        (rows, cols))
            graphics, texts = per_slice.setdefault(k, ([], []))
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.ELLIPSE,
                    graphic_data=ellipse,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=fit("TrackingID", name),
                    tracking_uid=uids.derived_uid(ctx.job_id, "detection", n),
                )
            )
            right = float(ellipse[:, 0].max())
            top = float(ellipse[:, 1].min())
            texts.append(
                hd.pr.TextObject(
                    text_value=fit("UnformattedTextValue", f"AI {detection_label(det, n)}"),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    anchor_point=(min(right, float(cols)), min(max(top, 0.0), float(rows))),
                    anchor_point_visible=True,
                )
            )
    if not per_slice:
        for k in key_slices(ctx):
            per_slice[k] = (
                [],
                [
                    hd.pr.TextObject(
                        text_value=f"AI: no detection - research, {NOT_FOR_DIAGNOSIS.lower()}",
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        bounding_box=(1.0, 1.0, float(cols - 1), 12.0),
                    )
                ],
            )
    out = []
    for k in sorted(per_slice):
        src, frame = ctx.source_of_slice(k)
        graphics, texts = per_slice[k]
        out.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[src],
                graphic_layer=layer,
                referenced_frame_number=frame,
                graphic_objects=graphics or None,
                text_objects=texts or None,
            )
        )
    return out


def build_pr(ctx: ExportContext, built: Built = NOTHING_BUILT, /) -> list[Dataset]:
    """One GSPS over the source series with the detections as graphic annotations.

    An :class:`~export.context.Exporter`; ``built`` is not used.
    """
    model = ctx.results.model
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="AI detections (research)",
        display_color=lab_color((255, 0, 0)),
    )
    images = ctx.slice_sources()
    lo, hi = display_window(ctx.volume.array)
    voi = hd.pr.SoftcopyVOILUTTransformation(
        # Lists of one: highdicom splits a str explanation into one value per character.
        window_center=[float((lo + hi) / 2.0)],
        window_width=[float(max(hi - lo, 1.0))],
        window_explanation=["AI display window"],
    )
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        content_label="AI_DETECTIONS",
        content_description=fit("ContentDescription", f"AI detections by {model.name}, research"),
        graphic_annotations=_annotations(ctx, layer),
        graphic_layers=[layer],
        voi_lut_transformations=[voi],
        # GSPS has Presentation Creation Date/Time (highdicom: now), no Content Date/Time
        **ctx.derived("pr").attributes(content_datetime=False),
    )
    finish(pr, ctx.sources[0])  # Body Part Examined (General Series) tells Laterality is not needed
    log.info("pr built", job_id=ctx.job_id, annotations=len(pr.GraphicAnnotationSequence))
    return [pr]
