"""Key Object Selection: flags the key slices (and the AI objects) for the radiologist.

Document title For Research (113009, DCM) from CID 7010; the referenced objects are the key
source slices (see :func:`export.common.key_slices`) and, when written, the summary SC.
"""

from __future__ import annotations

import highdicom as hd
import structlog
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from export import uids
from export.common import contributing_equipment, finish, key_slices, series_description
from export.context import ExportContext

log = structlog.get_logger(__name__)


def build_ko(ctx: ExportContext, extra: list[Dataset] | None = None) -> list[Dataset]:
    """One KOS pointing at the key slices (plus ``extra`` objects, e.g. the SC images).

    Multi-frame sources are referenced as a whole instance (highdicom's KOS has no frame list).
    """
    model = ctx.results.model
    when = ctx.content_datetime
    referenced: list[Dataset] = []
    seen: set[str] = set()
    for k in key_slices(ctx):
        src, _ = ctx.source_of_slice(k)
        if str(src.SOPInstanceUID) not in seen:
            seen.add(str(src.SOPInstanceUID))
            referenced.append(src)
    referenced.extend(extra or [])
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.ForResearch,
        referenced_objects=referenced,
        description=f"AI key images ({model.name} {model.version}), research, not for diagnosis"[
            :1024
        ],
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=uids.series_uid(ctx.job_id, "ko"),
        series_number=ctx.options.series_numbers.get("ko", 9005),
        sop_instance_uid=uids.instance_uid(ctx.job_id, "ko"),
        instance_number=1,
        manufacturer=model.manufacturer[:64],
        institution_name=ctx.options.institution_name,
        contributing_equipment=contributing_equipment(ctx),
        series_description=series_description("ko", model),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    finish(ko, ctx, image=False)
    log.info("ko built", job_id=ctx.job_id, referenced=len(referenced))
    return [ko]
