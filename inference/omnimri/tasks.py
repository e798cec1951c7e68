"""OmniMRI task post-processing: raw head outputs on the source grid -> :class:`Results`.

Instructions select what is produced:

* ``segment brain tissues`` - segments Brain (CSF + GM + WM), CSF, grey matter, white matter;
* ``detect abnormalities``  - segments WM hyperintensity / mass / oedema and one
  :class:`Detection` per lesion component (side from the LPS x coordinate relative to the
  midline of the segmented brain, lobe from a coarse MNI-box atlas after a bounding-box
  alignment of the segmented brain to the MNI152 brain);
* ``suggest a diagnosis``   - :class:`Diagnosis` (normal / small-vessel disease / mass) from the
  per-slice diagnosis head (mean of the top slices covering ``diagnosis_top_mm``) mixed with
  the lesion detections at ``diagnosis_detection_weight`` (calibrated per model);
* ``write the report``      - the grounded report decoder writes findings + impression from the
  structured findings above, so the text cannot contradict them;
* ``reconstruct``           - the reconstruction head's image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import results as R
from inference.omnimri.config import heads_for
from inference.postprocess import argmax_channels, bounding_box, connected_components

Array = npt.NDArray[np.float32]

MNI_BRAIN_BBOX_MM: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (-72.0, -106.0, -72.0), (72.0, 72.0, 82.0))
"""Bounding box (min, max) of the MNI152 2009 brain in MNI RAS millimetres (x, y, z)."""

DIAGNOSIS_CODES: dict[str, R.Code] = {
    "normal": R.Code("17621005", "SCT", "Normal"),
    "small_vessel": R.Code("55382008", "SCT", "Cerebral small vessel disease"),
    "mass": R.MASS,
}
"""Codes of the diagnosis classes."""

TISSUE_SEGMENTS = (
    ("Brain", R.ANATOMICAL_STRUCTURE, R.BRAIN, (230, 200, 170)),
    ("CSF", R.TISSUE, R.CSF, (60, 120, 230)),
    ("Grey matter", R.TISSUE, R.GREY_MATTER, (150, 150, 150)),
    ("White matter", R.TISSUE, R.WHITE_MATTER, (240, 240, 240)),
)
LESION_SEGMENTS = (
    ("WM hyperintensity", R.MORPHOLOGICALLY_ABNORMAL, R.WM_HYPERINTENSITY, (255, 200, 0)),
    ("Mass", R.MORPHOLOGICALLY_ABNORMAL, R.MASS, (255, 0, 0)),
    ("Oedema", R.MORPHOLOGICALLY_ABNORMAL, R.EDEMA, (0, 200, 120)),
)


@dataclass(frozen=True)
class TaskSettings:
    """Post-processing settings (``model.yaml`` ``extra.tasks``)."""

    min_lesion_mm3: float = 16.0
    """Lesion components smaller than this (mm³) are dropped."""
    lesion_threshold: float = 0.5
    """A voxel is lesion when P(WMH) + P(mass) >= this."""
    diagnosis_top_mm: float = 6.0
    """Slab thickness (mm) whose most abnormal slices decide the case-level diagnosis."""
    midline_tolerance_mm: float = 3.0
    """Lesions this close to the brain midline are called ``midline``."""
    diagnosis_detection_weight: float = 0.0
    """Weight of the detections in the case-level diagnosis (0 = slice head only, 1 =
    detections only): ``p = (1 - w) p_slices + w p_detections``, see
    :func:`diagnosis_from_detections`."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TaskSettings:
        """From a plain dict, ignoring unknown keys."""
        d = d or {}
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- anatomy


def lobe_of(mni_ras_mm: npt.ArrayLike) -> str:
    """Coarse lobe of an MNI point (see :func:`inference.omnimri.synthetic.lobe_of`)."""
    from inference.omnimri.synthetic import lobe_of as _lobe

    return _lobe(mni_ras_mm)


@dataclass(frozen=True)
class BrainFrame:
    """Maps patient LPS mm to approximate MNI mm by aligning brain bounding boxes."""

    lo_lps: npt.NDArray[np.float64]
    hi_lps: npt.NDArray[np.float64]

    @classmethod
    def from_mask(cls, brain: npt.NDArray[np.bool_], affine: npt.NDArray[np.float64]
                  ) -> BrainFrame | None:
        """From a brain mask on a grid with ``affine``; ``None`` if the mask is empty."""
        box = bounding_box(brain)
        if box is None:
            return None
        corners = np.array([[a, b, c] for a in (box[0].start, box[0].stop - 1)
                            for b in (box[1].start, box[1].stop - 1)
                            for c in (box[2].start, box[2].stop - 1)], np.float64)
        lps = corners @ affine[:3, :3].T + affine[:3, 3]
        return cls(lps.min(0), lps.max(0))

    @property
    def midline_x_lps(self) -> float:
        """LPS x of the brain's midline (centre of its left-right extent), mm."""
        return float((self.lo_lps[0] + self.hi_lps[0]) / 2)

    def to_mni(self, lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Approximate MNI RAS millimetres of an LPS point."""
        p = np.asarray(lps, np.float64)
        lo_m = np.array(MNI_BRAIN_BBOX_MM[0])
        hi_m = np.array(MNI_BRAIN_BBOX_MM[1])
        # LPS -> RAS flips x and y: the LPS minimum maps to the RAS maximum on those axes.
        frac = (p - self.lo_lps) / np.maximum(self.hi_lps - self.lo_lps, 1e-6)
        frac = np.where([True, True, False], 1 - frac, frac)
        return lo_m + frac * (hi_m - lo_m)


def side_of(x_lps_mm: float, midline_mm: float, tolerance_mm: float) -> str:
    """``left`` for +x (patient's left), ``right`` for -x, ``midline`` within tolerance."""
    if x_lps_mm > midline_mm + tolerance_mm:
        return "left"
    if x_lps_mm < midline_mm - tolerance_mm:
        return "right"
    return "midline"


# --------------------------------------------------------------------------- pieces


def unit_interval(p: npt.NDArray[np.floating]) -> Array:
    """``p`` as float32 in [0, 1]: ``p`` itself when it already is (no copy), else clipped.

    Softmax probabilities, and their linear interpolation onto the source grid, already are;
    checking costs two reads of the array instead of two full-size copies.
    """
    a = np.asarray(p)
    if a.dtype == np.float32 and a.size and float(a.min()) >= 0.0 and float(a.max()) <= 1.0:
        return a
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def brain_mask(tissue_probs: Array, argmax: npt.NDArray[np.uint8] | None = None
               ) -> npt.NDArray[np.bool_]:
    """The brain: the largest 6-connected component of the non-background argmax.

    Args:
        tissue_probs: ``[4, K, J, I]`` probabilities.
        argmax: Their :func:`~inference.postprocess.argmax_channels`, if already computed.
    """
    from scipy import ndimage

    fg = (argmax_channels(tissue_probs) if argmax is None else argmax) > 0
    box = bounding_box(fg)
    if box is None:
        return fg
    labels, n = ndimage.label(fg[box])  # only the foreground's bounding box
    if n <= 1:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros(fg.shape, dtype=np.bool_)
    np.equal(labels, int(np.argmax(sizes)), out=out[box])
    return out


def tissue_segments(tissue_probs: Array, first_number: int = 1,
                    brain: npt.NDArray[np.bool_] | None = None,
                    argmax: npt.NDArray[np.uint8] | None = None) -> list[R.SegmentMask]:
    """Brain, CSF, GM and WM masks from ``[4, K, J, I]`` probabilities (argmax in the brain).

    ``brain`` (:func:`brain_mask`) and ``argmax`` (of ``tissue_probs``) are computed when not
    given.
    """
    am = argmax_channels(tissue_probs) if argmax is None else argmax
    brain = brain_mask(tissue_probs, am) if brain is None else brain
    masks = [brain]
    for c in (1, 2, 3):
        m = np.equal(am, c)
        m &= brain
        masks.append(m)
    probs = [np.subtract(np.float32(1.0), tissue_probs[0], dtype=np.float32),
             tissue_probs[1], tissue_probs[2], tissue_probs[3]]
    out = []
    for n, ((name, cat, typ, rgb), m, p) in enumerate(
        zip(TISSUE_SEGMENTS, masks, probs, strict=True)
    ):
        lab = R.SegmentLabel(first_number + n, name, cat, typ, rgb, "anatomical")
        out.append(R.SegmentMask(lab, m, unit_interval(p)))
    return out


def lesion_masks(lesion_probs: Array, threshold: float,
                 brain: npt.NDArray[np.bool_] | None = None) -> tuple[npt.NDArray[np.bool_], ...]:
    """``(lesion, wmh, mass, oedema)`` masks from ``[4, K, J, I]`` probabilities.

    With ``brain`` given, everything outside the brain is dropped.
    """
    p_les = lesion_probs[1] + lesion_probs[2]
    lesion = p_les >= threshold
    del p_les
    if brain is not None:
        lesion &= brain
    wmh = np.greater_equal(lesion_probs[1], lesion_probs[2])
    wmh &= lesion
    mass = lesion & ~wmh
    oedema = argmax_channels(lesion_probs) == 3
    oedema &= ~lesion
    if brain is not None:
        oedema &= brain
    return lesion, wmh, mass, oedema


def detections_from_lesions(
    lesion_probs: Array, affine: npt.NDArray[np.float64], frame: BrainFrame | None,
    settings: TaskSettings, wmh_segment: int, mass_segment: int,
    brain: npt.NDArray[np.bool_] | None = None,
    lesion: npt.NDArray[np.bool_] | None = None,
) -> list[R.Detection]:
    """One detection per lesion component (WMH or mass by majority), largest first.

    ``lesion`` is :func:`lesion_masks`' first mask when the caller already has it.
    """
    if lesion is None:
        lesion = lesion_masks(lesion_probs, settings.lesion_threshold, brain)[0]
    box = bounding_box(lesion)
    if box is None:
        return []
    p_les = np.zeros(lesion.shape, dtype=np.float32)  # only needed inside the lesion's box
    np.add(lesion_probs[1][box], lesion_probs[2][box], out=p_les[box])
    np.clip(p_les[box], 0, 1, out=p_les[box])
    comps = connected_components(lesion, affine, probability=p_les,
                                 min_volume_mm3=settings.min_lesion_mm3)
    midline = frame.midline_x_lps if frame else 0.0
    out: list[R.Detection] = []
    for n, c in enumerate(comps, start=1):
        k0, j0, i0, k1, j1, i1 = c.bbox_index
        sub = lesion[k0:k1, j0:j1, i0:i1]
        is_mass = float(lesion_probs[2][k0:k1, j0:j1, i0:i1][sub].sum()) > float(
            lesion_probs[1][k0:k1, j0:j1, i0:i1][sub].sum())
        mni = frame.to_mni(c.centroid_lps_mm) if frame else np.array(c.centroid_lps_mm) * [-1,
                                                                                        -1, 1]
        lobe = lobe_of(mni)
        side = side_of(c.centroid_lps_mm[0], midline, settings.midline_tolerance_mm)
        out.append(R.Detection(
            finding=R.MASS if is_mass else R.WM_HYPERINTENSITY,
            segment_number=mass_segment if is_mass else wmh_segment,
            centroid_index=c.centroid_index, centroid_lps_mm=c.centroid_lps_mm,
            bbox_index=c.bbox_index, diameter_mm=round(c.diameter_mm, 1),
            volume_ml=round(c.volume_ml, 4), probability=round(c.probability, 4), side=side,
            location=f"{lobe} lobe" if lobe != "cerebellum" else "cerebellum",
            tracking_id=f"{'mass' if is_mass else 'lesion'}-{n}",
        ))
    return out


def diagnosis_from_slices(slice_probs: Array, slice_mm: float, settings: TaskSettings
                          ) -> R.Diagnosis:
    """Case-level diagnosis from per-slice probabilities ``[K, 3]`` (slices ``slice_mm`` apart).

    Each abnormal class scores the mean of its top ``ceil(diagnosis_top_mm / slice_mm)`` slice
    probabilities; mass outranks small-vessel disease.
    """
    from inference.omnimri.predict import volume_diagnosis

    k = max(1, math.ceil(settings.diagnosis_top_mm / max(slice_mm, 1e-3)))
    p = volume_diagnosis(slice_probs, top_k=k)
    names = list(DIAGNOSIS_CODES)
    best = int(np.argmax(p))
    return R.Diagnosis(code=DIAGNOSIS_CODES[names[best]], probability=round(float(p[best]), 4),
                       probabilities={n: round(float(v), 4) for n, v in zip(names, p,
                                                                            strict=True)})


def diagnosis_from_detections(detections: list[R.Detection]) -> npt.NDArray[np.float64]:
    """Case-level probabilities (normal, small vessel, mass) from the lesion detections.

    Each abnormal class scores the highest mean component probability among its detections
    (0 without one); mass outranks small-vessel disease, as in the slice aggregation.
    """
    s1 = max((d.probability for d in detections if d.finding != R.MASS), default=0.0)
    s2 = max((d.probability for d in detections if d.finding == R.MASS), default=0.0)
    return np.array([(1 - s1) * (1 - s2), s1 * (1 - s2), s2])


def blend_diagnosis(diagnosis: R.Diagnosis, detections: list[R.Detection], weight: float
                    ) -> R.Diagnosis:
    """``diagnosis`` mixed with :func:`diagnosis_from_detections` at ``weight`` (0-1)."""
    if weight <= 0:
        return diagnosis
    names = list(DIAGNOSIS_CODES)
    head = np.array([diagnosis.probabilities[n] for n in names], np.float64)
    p = (1 - weight) * head + weight * diagnosis_from_detections(detections)
    best = int(np.argmax(p))
    return R.Diagnosis(code=DIAGNOSIS_CODES[names[best]], probability=round(float(p[best]), 4),
                       probabilities={n: round(float(v), 4) for n, v in zip(names, p,
                                                                            strict=True)})


def report_facts(diagnosis: R.Diagnosis | None, detections: list[R.Detection]
                 ) -> dict[str, str]:
    """Report facts that agree with the structured outputs.

    The kind is the diagnosis when detections support it (a mass needs a mass detection,
    small-vessel disease a WMH detection); otherwise the kind the detections show, and
    ``normal`` exactly when there is no detection, so the findings never deny a detection.
    """
    from inference.omnimri.synthetic import count_bucket, size_bucket_mm

    masses = [d for d in detections if d.finding == R.MASS]
    wmh = [d for d in detections if d.finding != R.MASS]
    kind = "normal"
    if diagnosis is not None:
        kind = next((k for k, c in DIAGNOSIS_CODES.items() if c == diagnosis.code), "normal")
    if kind == "mass" and not masses:
        kind = "small_vessel" if wmh else "normal"
    if kind == "small_vessel" and not wmh:
        kind = "mass" if masses else "normal"
    if kind == "normal" and detections:  # the findings follow what was detected
        kind = "mass" if masses else "small_vessel"
    if kind == "normal":
        return {"kind": "normal", "count": "none", "side": "none", "lobe": "none", "size": "0"}
    group = masses if kind == "mass" else wmh
    big = max(group, key=lambda d: d.diameter_mm)
    lobe = big.location.removesuffix(" lobe")
    return {"kind": kind, "count": count_bucket(len(group)), "side": big.side or "midline",
            "lobe": lobe, "size": str(size_bucket_mm(big.diameter_mm))}


ReportWriter = Callable[[dict[str, str]], str]
"""Writes ``findings : ... impression : ...`` text from report facts."""

Narrator = Callable[[R.Results, list[R.Detection], npt.NDArray[np.float64]], R.Report]
"""Writes the report from the results, all lesion detections and the source affine (used
instead of a :data:`ReportWriter`: :func:`inference.omnimri.language.narrate.narrate_results`)."""


@functools.lru_cache(maxsize=4)
def onnx_report_writer(decoder_onnx: str, max_tokens: int = 48) -> ReportWriter:
    """A :data:`ReportWriter` running ``decoder.onnx`` greedily on ONNX Runtime (CPU)."""
    import onnxruntime as ort

    from inference.omnimri import report_text as rt

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(decoder_onnx, so, providers=["CPUExecutionProvider"])
    bos, eos = rt.WORD_ID[rt.BOS], rt.WORD_ID[rt.EOS]

    def write(facts: dict[str, str]) -> str:
        mem = rt.facts_memory(facts)[None]
        toks = [bos]
        for _ in range(max_tokens - 1):
            logits = sess.run(None, {"memory": mem, "tokens": np.array([toks], np.int64)})[0]
            nxt = int(np.argmax(logits[0, -1]))
            if nxt == eos:
                break
            toks.append(nxt)
        return rt.decode(toks)

    return write


# --------------------------------------------------------------------------- assembly


@dataclass
class HeadOutputs:
    """Raw head outputs on the source grid (what an engine run gives this module)."""

    affine: npt.NDArray[np.float64]
    """Source grid affine ``(k, j, i, 1)`` -> LPS mm."""
    tissue: Array | None = None
    """``[4, K, J, I]`` probabilities."""
    lesion: Array | None = None
    """``[4, K, J, I]`` probabilities."""
    slice_diagnosis: Array | None = None
    """``[K, 3]`` per-slice diagnosis probabilities."""
    diagnosis: Array | None = None
    """``[3]`` case-level probabilities (used if ``slice_diagnosis`` is ``None``)."""
    recon: Array | None = None
    """Reconstructed image, source intensity units."""
    timings_s: dict[str, float] = field(default_factory=dict)


def build_results(
    heads: HeadOutputs, instructions: list[str], model: R.ModelInfo,
    settings: TaskSettings | None = None, report_writer: ReportWriter | None = None,
    narrator: Narrator | None = None,
) -> R.Results:
    """Turn raw head outputs into :class:`Results` for ``instructions``.

    Raises:
        ValueError: An unknown instruction, or an output an instruction needs is missing.
    """
    settings = settings or TaskSettings()
    want = heads_for(instructions)
    res = R.Results(model=model, instructions=list(instructions),
                    timings_s=dict(heads.timings_s))
    spacing = np.linalg.norm(heads.affine[:3, :3], axis=0)
    number = 1
    frame = None
    brain = None
    tissue_am = None
    if heads.tissue is not None:
        tissue_am = argmax_channels(heads.tissue)  # once: brain and tissue segments share it
        brain = brain_mask(heads.tissue, tissue_am)
        frame = BrainFrame.from_mask(brain, heads.affine)
    if "tissue" in want:
        if heads.tissue is None:
            raise ValueError("'segment brain tissues' needs the tissue output")
        res.segments.extend(tissue_segments(heads.tissue, number, brain, tissue_am))
        number += len(TISSUE_SEGMENTS)
    if want & {"lesion", "diagnosis", "report"}:
        if heads.lesion is None:
            raise ValueError("lesion output missing")
        lesion, wmh, mass, oedema = lesion_masks(heads.lesion, settings.lesion_threshold, brain)
        wmh_no, mass_no = number, number + 1
        dets = detections_from_lesions(heads.lesion, heads.affine, frame, settings, wmh_no,
                                       mass_no, brain, lesion)
        if "lesion" in want:
            for n, ((name, cat, typ, rgb), m, p) in enumerate(zip(
                LESION_SEGMENTS, (wmh, mass, oedema),
                (heads.lesion[1], heads.lesion[2], heads.lesion[3]), strict=True,
            )):
                lab = R.SegmentLabel(number + n, name, cat, typ, rgb, "pathological")
                res.segments.append(R.SegmentMask(lab, m, unit_interval(p)))
            number += len(LESION_SEGMENTS)
            res.detections = dets
    if want & {"diagnosis", "report"}:
        if heads.slice_diagnosis is not None:
            res.diagnosis = diagnosis_from_slices(heads.slice_diagnosis, float(spacing[0]),
                                                  settings)
        elif heads.diagnosis is not None:
            p = np.asarray(heads.diagnosis, np.float64)
            names = list(DIAGNOSIS_CODES)
            b = int(np.argmax(p))
            res.diagnosis = R.Diagnosis(DIAGNOSIS_CODES[names[b]], float(p[b]),
                                        {n: float(v) for n, v in zip(names, p, strict=True)})
        else:
            raise ValueError("'suggest a diagnosis' needs the diagnosis output")
        res.diagnosis = blend_diagnosis(res.diagnosis, dets,
                                        settings.diagnosis_detection_weight)
    if "report" in want and narrator is not None:
        res.report = narrator(res, dets, heads.affine)
    elif "report" in want:
        if report_writer is None:
            raise ValueError("'write the report' needs the report decoder")
        from inference.omnimri.report_text import split_report

        facts = report_facts(res.diagnosis, dets)
        findings, impression = split_report(report_writer(facts))
        res.report = R.Report(findings=findings, impression=impression)
    if "recon" in want:
        if heads.recon is None:
            raise ValueError("'reconstruct' needs the reconstruction output")
        res.reconstruction = heads.recon.astype(np.float32)
    return res


def report_writer_for(version_folder: Path, extra: dict[str, Any]) -> ReportWriter:
    """The report writer a package declares in ``extra.report_decoder``."""
    spec = extra.get("report_decoder", {})
    return onnx_report_writer(str(version_folder / spec.get("file", "decoder.onnx")),
                              int(spec.get("max_tokens", 48)))


def results_from_raw(package: Any, raw: Any, volume: Any, instructions: list[str],
                     node_version: str = "", *, settings: TaskSettings | None = None,
                     writer: ReportWriter | None = None) -> R.Results:
    """Build :class:`Results` from a generic engine run (:func:`inference.runner.run_model`).

    Args:
        package: The :class:`inference.package.ModelPackage` (``extra`` holds the settings).
        raw: Its :class:`inference.runner.RawOutputs` for ``volume``.
        volume: The source :class:`inference.volume.Volume`.
        instructions: The pipeline's instructions.
        node_version: Recorded in :class:`ModelInfo`.
        settings: Post-processing settings instead of the package's ``extra.tasks``
            (calibration sweeps them over cached raw outputs).
        writer: Report writer instead of the package's decoder (a training checkpoint's).
    """
    extra = dict(package.spec.extra)
    seg = raw.segmentation
    heads = HeadOutputs(affine=np.asarray(volume.affine, np.float64),
                        timings_s=dict(raw.timings_s))
    if "tissue" in seg:
        heads.tissue = seg["tissue"].probabilities
    if "lesion" in seg:
        heads.lesion = seg["lesion"].probabilities
    if "diagnosis_map" in seg:
        heads.slice_diagnosis = np.ascontiguousarray(
            seg["diagnosis_map"].plane_means().T, dtype=np.float32)  # per-slice mean
    elif "diagnosis" in raw.classification:
        c = raw.classification["diagnosis"]
        heads.diagnosis = np.array([c.probabilities[k.name] for k in c.classes], np.float32)
    if "recon" in raw.image:
        heads.recon = raw.image["recon"]
    narrator: Narrator | None = None
    reports = (extra.get("language") or {}).get("reports")
    if writer is None and reports == "natural":
        from inference.omnimri.language.narrate import narrate_results as narrator
    elif writer is None and reports == "neural":  # grounded neural decoder, grammar fallback
        from inference.omnimri.language.reportgen import narrator_for

        narrator = narrator_for(package)
    if writer is None and narrator is None and "write the report" in [
            " ".join(i.lower().split()) for i in instructions]:
        writer = report_writer_for(package.version_folder(), extra)
    res = build_results(heads, instructions, package.model_info(node_version),
                        settings or TaskSettings.from_dict(extra.get("tasks")), writer,
                        narrator)
    embeddings = getattr(raw, "embedding", None) or {}
    if embeddings:  # the package's embedding output (retrieval), when the instructions ran it
        res.embedding = next(iter(embeddings.values()))
    return res


def run_omnimri(package: Any, volume: Any, instructions: list[str], engine: Any = None,
                node_version: str = "") -> R.Results:
    """Run an OmniMRI package on a volume end to end (engine run + task post-processing).

    Args:
        package: A loaded :class:`inference.package.ModelPackage`.
        volume: The source :class:`inference.volume.Volume`.
        instructions: Instructions from ``package.spec.tasks``.
        engine: An :class:`inference.engines.Engine`; ONNX Runtime (CPU) when ``None``.
        node_version: Recorded in :class:`ModelInfo`.
    """
    import time

    from inference.engines import create_engine
    from inference.runner import run_model

    own = engine is None
    eng = create_engine("onnxruntime", package) if engine is None else engine
    try:
        raw = run_model(package, volume, eng, instructions)
    finally:
        if own:
            eng.close()
    t0 = time.perf_counter()
    res = results_from_raw(package, raw, volume, instructions, node_version)
    res.timings_s["postprocess"] = round(res.timings_s.get("postprocess", 0.0)
                                         + time.perf_counter() - t0, 4)
    return res
