"""Key Object Selection: flags the key slices (and the AI objects) for the radiologist.

Document title For Research (113009, DCM) from CID 7010; the referenced objects are the key
source slices (see :func:`export.common.key_slices`) and, when written, the summary SC.
"""

from __future__ import annotations

import highdicom as hd
import structlog
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from export.common import finish, key_slices
from export.context import NOTHING_BUILT, Built, ExportContext

log = structlog.get_logger(__name__)


def build_ko(ctx: ExportContext, built: Built = NOTHING_BUILT, /) -> list[Dataset]:
    """One KOS pointing at the key slices (and the summary card, ``built["sc"][0]``, if built).

    An :class:`~export.context.Exporter`. Multi-frame sources are referenced as a whole
    instance (highdicom's KOS has no frame list).
    """
    model = ctx.results.model
    referenced: list[Dataset] = []
    seen: set[str] = set()
    for k in key_slices(ctx):
        src, _ = ctx.source_of_slice(k)
        if str(src.SOPInstanceUID) not in seen:
            seen.add(str(src.SOPInstanceUID))
            referenced.append(src)
    referenced.extend(list(built.get("sc", ()))[:1])
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.ForResearch,
        referenced_objects=referenced,
        description=f"AI key images ({model.name} {model.version}), research, not for diagnosis",
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        **ctx.derived("ko").attributes(),
    )
    finish(ko, ctx.sources[0], image=False)
    log.info("ko built", job_id=ctx.job_id, referenced=len(referenced))
    return [ko]
