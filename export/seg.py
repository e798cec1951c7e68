"""DICOM Segmentation (SEG) from the results' segment masks, with highdicom.

* One instance, new series, same study and Frame of Reference as the source; frames aligned to
  the source frames (one SEG frame per source frame, ReferencedSeriesSequence and per-frame
  Derivation Image references filled by highdicom).
* Segment numbers are 1..N in the order of the results' segment numbers (see
  :func:`segment_numbering`); SR references use the same mapping.
* ``auto`` type: BINARY (1.2.840.10008.5.1.4.1.1.66.4), the SEG every PACS and viewer takes
  (Debian's Orthanc refuses Label Map Segmentation Storage by C-STORE, DCMTK 3.6.7 does not
  know it), when a frame is a whole number of bytes (Rows x Columns a multiple of 8). When it
  is not (e.g. 91 x 109 at 2 mm), the 1-bit frames are packed without byte alignment, which
  the standard allows but OHIF 3.13 (dcmjs' ``AsyncDicomReader.readUncompressedBitFrame``
  splits such frames with the wrong bit order) draws as a sawtooth along every edge; ``auto``
  then writes the same masks as a pseudo-binary FRACTIONAL SEG (same SOP class, 8 bits, values
  0 and 255 only), which every reader of Segmentation Storage decodes (logged). ``binary``
  forces BINARY; ``labelmap`` writes LABELMAP (1.2.840.10008.5.1.4.1.1.66.7) for sites whose
  PACS and viewers accept it; ``fractional`` writes the probabilities (8-bit, 255 = 1.0; OHIF
  opens only pseudo-binary FRACTIONAL SEGs).
* What is drawn: every segment except a *union* segment, one equal to the union of two or more
  other anatomical segments (the model's Brain = CSF + grey + white matter): drawn over them it
  would hide them and the image (viewers show every segment of a SEG on opening). Its volume is
  still reported (SR, summary card). See :func:`seg_segments`.
* Colours (Recommended Display CIELab): :func:`export.common.display_rgb`; grey/white model
  colours become chromatic ones so overlays do not read as image intensity.
"""

from __future__ import annotations

import time

import highdicom as hd
import numpy as np
import numpy.typing as npt
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from export import uids
from export.common import algorithm_identification, display_rgb, finish, lab_color, to_coded
from export.context import NOTHING_BUILT, Built, ExportContext, ExportError
from export.limits import fit
from inference.results import SegmentMask

log = structlog.get_logger(__name__)

_TRANSFER_SYNTAX: dict[str, UID] = {
    "none": ExplicitVRLittleEndian,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}


def _words(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """A mask's bytes as 64-bit words (8 voxels a word; a view when it can be), for set algebra.

    Each byte is 0 or 1, so ``&``, ``|`` and ``& ~`` on the words are the voxel-wise set
    operations, 8 voxels an instruction.
    """
    flat = np.ascontiguousarray(mask, dtype=np.bool_).reshape(-1).view(np.uint8)
    if flat.size % 8:
        flat = np.concatenate([flat, np.zeros(8 - flat.size % 8, dtype=np.uint8)])
    return flat.view(np.uint64)


def union_segments(segments: list[SegmentMask]) -> set[int]:
    """Numbers of the anatomical segments that are unions of others.

    A union equals the union of two or more other anatomical segments (e.g. Brain = CSF + grey
    matter + white matter).
    """
    anatomical = [s for s in segments if s.label.task != "pathological"]
    words = [_words(s.mask) for s in anatomical]
    counts = [int(np.count_nonzero(s.mask)) for s in anatomical]
    out: set[int] = set()
    for n, s in enumerate(anatomical):
        if counts[n] == 0:
            continue
        parts = [words[m] for m, o in enumerate(anatomical)
                 if m != n and o.label.number not in out and 0 < counts[m] < counts[n]
                 and not np.any(words[m] & ~words[n])]
        if len(parts) < 2:
            continue
        union = np.zeros_like(words[n])
        for w in parts:
            union |= w
        if np.array_equal(union, words[n]):
            out.add(s.label.number)
    return out


def seg_segments(segments: list[SegmentMask], *, keep_empty: bool = False) -> list[SegmentMask]:
    """The segments the SEG holds.

    All but the union segments (:func:`union_segments`) and, unless ``keep_empty`` (the
    ``fractional`` type, whose probabilities may show where the mask is empty), the segments
    without a voxel: 189 all-zero frames each that no viewer draws. Their volumes (0 ml) are
    still in the SR.
    """
    unions = union_segments(segments)
    return [s for s in segments if s.label.number not in unions
            and (keep_empty or bool(s.mask.any()))]


def segment_numbering(segments: list[SegmentMask]) -> dict[int, int]:
    """Map each result segment number to its SEG segment number (1..N, sorted by number).

    Pass the segments the SEG holds (:func:`seg_segments`).
    """
    return {s.label.number: i + 1 for i, s in enumerate(sorted(segments, key=_number))}


def numbering_in(seg: Dataset, ctx: ExportContext) -> dict[int, int]:
    """Result segment number -> SEG segment number, read from a SEG built for ``ctx``.

    The SEG's segments carry the Tracking UID :func:`export.uids.derived_uid` gives each result
    segment, so this is the numbering :func:`build_seg` used, whatever segments it left out.
    """
    by_uid = {str(item.get("TrackingUID", "")): int(item.SegmentNumber)
              for item in seg.SegmentSequence}
    out: dict[int, int] = {}
    for s in ctx.results.segments:
        number = by_uid.get(uids.derived_uid(ctx.job_id, "segment", s.label.number))
        if number is not None:
            out[s.label.number] = number
    return out


def _number(s: SegmentMask) -> int:
    return s.label.number


def segments_overlap(segments: list[SegmentMask]) -> bool:
    """Whether any voxel belongs to more than one segment."""
    seen: npt.NDArray[np.uint64] | None = None
    for s in segments:
        w = _words(s.mask)
        if seen is None:
            seen = w.copy()
        elif np.any(seen & w):
            return True
        else:
            seen |= w
    return False


def frames_byte_aligned(rows: int, columns: int) -> bool:
    """Whether a 1-bit frame of ``rows`` x ``columns`` pixels is a whole number of bytes.

    DICOM packs 1-bit frames back to back (PS3.5 8.1.1); with ``rows * columns % 8 != 0`` frame 2
    onwards starts inside a byte, which some viewers (OHIF 3.13) mis-decode.
    """
    return (rows * columns) % 8 == 0


def resolve_type(
    ctx: ExportContext, segs: list[SegmentMask] | None = None
) -> hd.seg.SegmentationTypeValues:
    """The segmentation type to write, resolving ``auto``.

    ``auto`` is BINARY (accepted everywhere) when the frames are byte aligned
    (:func:`frames_byte_aligned`), else FRACTIONAL holding the masks (pseudo-binary, 0/255).
    ``segs``: the segments the SEG holds (default :func:`seg_segments` of the results).
    """
    wanted = ctx.options.seg.segmentation_type
    if segs is None:
        segs = seg_segments(ctx.results.segments, keep_empty=wanted == "fractional")
    if wanted == "auto":
        rows, columns = (int(n) for n in ctx.volume.shape[1:3])
        if frames_byte_aligned(rows, columns):
            return hd.seg.SegmentationTypeValues.BINARY
        log.info("seg auto writes pseudo-binary FRACTIONAL: 1-bit frames not byte aligned",
                 job_id=ctx.job_id, rows=rows, columns=columns)
        return hd.seg.SegmentationTypeValues.FRACTIONAL
    if wanted == "labelmap" and segments_overlap(segs):
        raise ExportError("segments overlap: LABELMAP cannot encode them (use auto or binary)")
    return hd.seg.SegmentationTypeValues(wanted.upper())


def _descriptions(
    ctx: ExportContext, segs: list[SegmentMask], numbering: dict[int, int]
) -> list[hd.seg.SegmentDescription]:
    algo = algorithm_identification(ctx.results.model)
    out = []
    for seg in sorted(segs, key=_number):
        lab = seg.label
        out.append(
            hd.seg.SegmentDescription(
                segment_number=numbering[lab.number],
                segment_label=fit("SegmentLabel", lab.label),
                segmented_property_category=to_coded(lab.category),
                segmented_property_type=to_coded(lab.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_uid=uids.derived_uid(ctx.job_id, "segment", lab.number),
                tracking_id=fit("TrackingID", f"{lab.label} ({lab.task})"),
                display_color=lab_color(display_rgb(lab)),
            )
        )
    return out


def _frames_array(
    ctx: ExportContext, segs: list[SegmentMask], seg_type: hd.seg.SegmentationTypeValues,
    numbering: dict[int, int],
) -> npt.NDArray[np.generic]:
    """Pixel array in source frame order: label map ``[f, r, c]`` or stacked ``[f, r, c, s]``.

    FRACTIONAL holds the probabilities only where ``fractional`` was asked for; the FRACTIONAL
    that ``auto`` chooses (:func:`resolve_type`) holds the masks (0.0 / 1.0).
    """
    segs = sorted(segs, key=_number)
    shape = ctx.volume.shape
    if seg_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        probabilities = ctx.options.seg.segmentation_type == "fractional"
        stacked_f = np.zeros((*shape, len(segs)), dtype=np.float32)
        for n, s in enumerate(segs):
            prob = (s.probability if probabilities and s.probability is not None
                    else s.mask.astype(np.float32))
            stacked_f[..., n] = np.clip(prob, 0.0, 1.0)
        arr: npt.NDArray[np.generic] = stacked_f
    elif segments_overlap(segs):
        stacked = np.zeros((*shape, len(segs)), dtype=np.uint8)
        for n, s in enumerate(segs):
            stacked[..., n] = s.mask
        arr = stacked
    else:
        dtype = np.uint8 if len(segs) < 256 else np.uint16
        labels = np.zeros(shape, dtype=dtype)
        for s in segs:
            labels[s.mask] = numbering[s.label.number]
        arr = labels
    mf = ctx.multiframe_source
    if mf is None:
        return arr
    # One multi-frame source: SEG frame f must match source frame f (1-based).
    nframes = int(mf.NumberOfFrames)
    frames = np.zeros((nframes, *arr.shape[1:]), dtype=arr.dtype)
    for k, ref in enumerate(ctx.volume.slices):
        assert ref.frame_number is not None
        frames[ref.frame_number - 1] = arr[k]
    return frames


def build_seg(ctx: ExportContext, built: Built = NOTHING_BUILT, /) -> list[Dataset]:
    """The DICOM SEG of ``ctx.results.segments`` (empty list when there are none).

    An :class:`~export.context.Exporter`; ``built`` is not used.

    Raises:
        ExportError: Segments overlap but LABELMAP was forced, or sources do not fit.
    """
    t0 = time.perf_counter()
    opts = ctx.options.seg
    segs = seg_segments(ctx.results.segments, keep_empty=opts.segmentation_type == "fractional")
    if not segs:
        if ctx.results.segments:
            log.info("seg skipped: no segment has a voxel", job_id=ctx.job_id)
        return []
    numbering = segment_numbering(segs)
    seg_type = resolve_type(ctx, segs)
    pixels = _frames_array(ctx, segs, seg_type, numbering)
    mf = ctx.multiframe_source
    source_images = [mf] if mf is not None else ctx.slice_sources()
    omit = opts.omit_empty_frames and bool(np.any(pixels))
    model = ctx.results.model
    syntax = _TRANSFER_SYNTAX[opts.compression]
    if seg_type == hd.seg.SegmentationTypeValues.BINARY and syntax == JPEGLSLossless:
        # 1-bit BINARY frames cannot be JPEG-LS coded; JPEG 2000 lossless is the lossless option.
        log.info("seg jpegls not possible for BINARY, using jpeg2000 lossless", job_id=ctx.job_id)
        syntax = JPEG2000Lossless
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=_descriptions(ctx, segs, numbering),
        content_description=fit(
            "ContentDescription", f"AI segmentation by {model.name}, research use only"
        ),
        content_label="AI_SEGMENTATION",
        content_creator_name=None,
        transfer_syntax_uid=syntax,
        omit_empty_frames=omit,
        **ctx.derived("seg").attributes(),
    )
    finish(seg, ctx.sources[0])
    log.info(
        "seg built",
        job_id=ctx.job_id,
        type=seg_type.value,
        segments=len(numbering),
        frames=int(seg.NumberOfFrames),
        compression=opts.compression,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return [seg]
