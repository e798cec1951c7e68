"""Run a model package on a volume with any engine: everything generic between the two.

:func:`run_model` prepares the volume as the package's ``input`` spec says, runs the engine over
sliding windows in batches, aggregates window outputs (Gaussian-weighted for dense outputs,
averaged for global ones, pooled by :class:`EmbeddingPool` for ``embedding`` ones), applies
activations, maps dense outputs back onto the source grid (segmentation probabilities lazily,
on first use: then label maps and connected components, made from the source-grid
probabilities) and runs greedy text decoding, and returns
:class:`RawOutputs`.
Model-specific interpretation (lobe names, report sections, ...) builds
:class:`inference.results.Results` from it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from inference.engines import Engine
from inference.package import (
    ClassificationOutput,
    ClassSpec,
    DetectionSpec,
    EmbeddingOutput,
    ImageOutput,
    LabelSpec,
    ModelPackage,
    SegmentationOutput,
    TextOutput,
)
from inference.postprocess import (
    Component,
    SourceGridStream,
    activate,
    connected_components,
    label_map,
    source_plane_means,
    to_source_grid,
)
from inference.preprocess import (
    GridTransform,
    Window,
    batches,
    extract_batch,
    gaussian_importance,
    windowed,
)
from inference.volume import Volume

_log = structlog.get_logger(__name__)

Array = npt.NDArray[np.float32]


@dataclass(slots=True)
class SegmentationResult:
    """One ``segmentation`` output, on the source grid.

    The activated probabilities are kept on the model grid (``model_probabilities``) and
    mapped onto the source grid on first use (:attr:`probabilities`); label maps and
    components are also made on first use, from the source-grid probabilities (so labels
    follow the source voxels). A caller that needs only per-slice means
    (:meth:`plane_means`) never builds the full source-grid array.
    """

    labels: list[LabelSpec]
    activation: str
    threshold: float
    model_probabilities: Array | None = None
    """``[C, D, H, W]`` on the model grid after the activation (C = logit channels)."""
    transform: GridTransform | None = None
    """How the model grid maps back onto the source grid."""
    detection: DetectionSpec | None = None
    """The output's ``detection`` settings (``None``: no components)."""
    affine: npt.NDArray[np.float64] | None = None
    """The source grid's 4x4 LPS affine (mm), for the components."""
    _probabilities: Array | None = None
    _label_map: npt.NDArray[np.uint16] | None = None
    _plane_means: Array | None = None
    _components: dict[int, list[Component]] | None = None
    on_full_read: Callable[[], None] | None = None
    """Called when :attr:`probabilities` is first read (the runner learns which outputs its
    callers read in full, to map those while the engine runs next time)."""

    @property
    def probabilities(self) -> Array:
        """``[C, K, J, I]`` float32 on the source grid.

        Linear interpolation of the model grid's probabilities
        (:func:`postprocess.to_source_grid`), computed on first use unless the runner already
        mapped it while the engine ran (:func:`run_model`'s ``stream``; same values).
        """
        if self.on_full_read is not None:
            self.on_full_read()
            self.on_full_read = None
        if self._probabilities is None:
            if self.model_probabilities is None or self.transform is None:
                raise ValueError("segmentation result holds no probabilities")
            self._probabilities = to_source_grid(self.model_probabilities, self.transform,
                                                 order=1)
        return self._probabilities

    @probabilities.setter
    def probabilities(self, value: Array) -> None:
        self._probabilities = value
        self._label_map = self._plane_means = self._components = None

    @property
    def label_map(self) -> npt.NDArray[np.uint16]:
        """``[K, J, I]``: label value per voxel (0 = none); see :func:`postprocess.label_map`."""
        if self._label_map is None:
            self._label_map = label_map(self.probabilities, self.activation,
                                        [lab.value for lab in self.labels], self.threshold)
        return self._label_map

    def plane_means(self) -> Array:
        """``[C, K]``: each channel's mean over every source slice (in-plane), float32."""
        if self._plane_means is None:
            if self._probabilities is not None:
                self._plane_means = np.asarray(self._probabilities.mean(axis=(2, 3)),
                                               dtype=np.float32)
            elif self.model_probabilities is not None and self.transform is not None:
                self._plane_means = source_plane_means(self.model_probabilities,
                                                       self.transform)
            else:
                raise ValueError("segmentation result holds no probabilities")
        return self._plane_means

    def release(self) -> None:
        """Drop the large arrays once :meth:`plane_means` is all that is needed (caches)."""
        self.plane_means()
        self.model_probabilities = None
        self._probabilities = self._label_map = None

    @property
    def components(self) -> dict[int, list[Component]]:
        """Label value → connected components (only when the output declares ``detection``).

        Computed on first use (labelling a 1 mm volume costs ~0.1 s per label; callers with
        their own detection logic, e.g. the OmniMRI tasks, never pay it).
        """
        if self._components is None:
            self._components = {}
            if self.detection is not None and self.affine is not None:
                for lab in self.labels:
                    self._components[lab.value] = connected_components(
                        self.mask(lab.value), self.affine, label_value=lab.value,
                        probability=self.probabilities[lab.value],
                        connectivity=self.detection.connectivity,
                        min_volume_mm3=self.detection.min_volume_mm3,
                        min_diameter_mm=self.detection.min_diameter_mm,
                    )
        return self._components

    def mask(self, value: int) -> npt.NDArray[np.bool_]:
        """Boolean ``[K, J, I]`` mask of one label (``sigmoid`` labels may overlap)."""
        if self.activation == "sigmoid":
            return np.asarray(self.probabilities[value] >= self.threshold)
        return np.asarray(self.label_map == value)


@dataclass(slots=True)
class ClassificationResult:
    """One ``classification`` output: window-averaged logits, then activated."""

    classes: list[ClassSpec]
    probabilities: dict[str, float]
    """Class name → probability."""

    @property
    def best(self) -> ClassSpec:
        """The most probable class."""
        return max(self.classes, key=lambda c: self.probabilities[c.name])


@dataclass(slots=True)
class RawOutputs:
    """Everything generic a run produced; all arrays lie on the source grid ``[K, J, I]``."""

    segmentation: dict[str, SegmentationResult] = field(default_factory=dict)
    classification: dict[str, ClassificationResult] = field(default_factory=dict)
    image: dict[str, Array] = field(default_factory=dict)
    """Image outputs, ``[K, J, I]`` (or ``[C, K, J, I]``), denormalised if the spec says so."""
    text: dict[str, str] = field(default_factory=dict)
    features: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    """Window-averaged non-dense engine outputs (e.g. a text decoder's memory)."""
    embedding: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    """``embedding`` outputs, one ``[D]`` vector per series (:class:`EmbeddingPool`)."""
    transform: GridTransform | None = None
    engine: str = ""
    provider: str = ""
    windows: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    """``preprocess``, ``inference``, ``postprocess``, ``decode`` in seconds."""
    instructions: list[str] = field(default_factory=list)


DecoderFactory = Callable[[Path], Engine]
"""Makes the engine that runs a text decoder graph (default: ONNX Runtime)."""


def _default_decoder(path: Path) -> Engine:
    from inference.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path)


def warm_up(package: ModelPackage, engine: Engine) -> float:
    """Run one zero batch through ``engine`` (allocations, kernel selection); returns seconds."""
    spec = package.spec.input
    shape = (spec.batch_size, spec.channels, *spec.patch_size)
    t0 = time.perf_counter()
    engine.run({spec.name: np.zeros(shape, dtype=np.dtype(spec.dtype))})
    return time.perf_counter() - t0


def run_model(
    package: ModelPackage,
    volume: Volume,
    engine: Engine,
    instructions: list[str] | None = None,
    *,
    decoder_factory: DecoderFactory = _default_decoder,
    stream: Collection[str] | None = None,
) -> RawOutputs:
    """Run ``package`` on ``volume`` with ``engine`` for the given instructions.

    Args:
        package: The model package (its spec drives everything).
        volume: Source volume.
        engine: Any :class:`~inference.engines.Engine` loaded with the package's graph.
        instructions: Instructions from ``package.spec.tasks``; ``None``/empty = all outputs.
        decoder_factory: Builds the engine for ``text`` decoders.
        stream: Segmentation outputs to map onto the source grid while the engine runs, slab
            by slab as their model slices become final (:class:`postprocess.SourceGridStream`,
            on one background thread: the engine's threads leave a core partly idle between
            and inside kernels). ``None``: the outputs whose source-grid probabilities the
            callers of earlier runs of this package read (:data:`_READ_IN_FULL`). Only for
            ``NCHW`` packages whose slice axis is the source's; others map on first use. The
            values are the same either way. ``None`` streams nothing unless the environment
            sets :data:`STREAM_ENV` to ``1`` (opt-in until measured on a quiet machine: on the
            loaded 2-core VM the extra thread competing with ORT's made jobs slower).

    Raises:
        PackageError: An instruction the package does not support.
        ValueError: The engine's outputs do not match the package spec (names or shapes).
    """
    spec = package.spec
    wanted = spec.outputs_for(instructions)
    outs = [spec.output(n) for n in wanted]
    engine_needed = [o.name for o in outs if not isinstance(o, TextOutput)]
    missing = [n for n in engine_needed if n not in engine.output_names]
    if missing:
        raise ValueError(
            f"engine {engine.name} graph lacks outputs {missing} declared in {package.name}'s "
            f"model.yaml (graph outputs: {engine.output_names})"
        )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    win = windowed(volume.array, volume.affine, spec.input)
    prepared, padded, windows = win.prepared, win.padded, win.windows
    t = prepared.transform
    timings["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense_names = {
        o.name for o in outs if isinstance(o, SegmentationOutput | ImageOutput)
    }
    key = _package_key(package)
    if stream is None and not _stream_by_default():
        stream = ()
    elif stream is None:
        with _READ_LOCK:
            stream = set(_READ_IN_FULL.get(key, ()))
    streamed = [o for o in outs if isinstance(o, SegmentationOutput) and o.name in stream]
    if spec.input.layout != "NCHW" or not SourceGridStream.supported(t):
        streamed = []
    streams: dict[str, SourceGridStream] = {}
    agg = _Aggregator(padded.shape, spec.input.layout, dense_names)
    pools = {o.name: EmbeddingPool(o, spec.input.context_slices) for o in outs
             if isinstance(o, EmbeddingOutput)}
    done = 0  # model slices [0, done) are final (NCHW windows go slice by slice)
    ms = t.model_shape
    try:
        pos = 0
        for group in batches(windows, spec.input.batch_size):
            batch = extract_batch(padded, group, spec.input)
            result = engine.run({spec.input.name: batch}, outputs=engine_needed or None)
            agg.add_weights(group)
            for name in engine_needed:
                if name in pools:
                    pools[name].add(np.asarray(result[name]), batch, result)
                else:
                    agg.add(name, np.asarray(result[name]), group)
            pos += len(group)
            if not streamed:
                continue
            upto = min(windows[pos].starts[0] if pos < len(windows) else ms[0], ms[0])
            if upto > done:
                for so in streamed:
                    logits = agg.slab(so.name, done, upto, ms)
                    if so.name not in streams:
                        if logits.shape[0] < so.channels:
                            raise ValueError(f"output {so.name!r} has {logits.shape[0]} "
                                             f"channels; labels need {so.channels}")
                        streams[so.name] = SourceGridStream(t, logits.shape[0])
                    streams[so.name].add(activate(logits, so.activation, axis=0), done)
                done = upto
    except BaseException:
        for st in streams.values():
            st.close()
        raise
    timings["inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw = RawOutputs(
        transform=t, engine=engine.name, provider=engine.provider, windows=len(windows),
        instructions=list(instructions or []),
    )
    affine = np.asarray(volume.affine, dtype=np.float64)
    for o in outs:
        if isinstance(o, SegmentationOutput) and o.name in streams:
            agg.drop(o.name)
            st = streams[o.name]
            seg = SegmentationResult(
                labels=list(o.labels), activation=o.activation, threshold=o.threshold,
                model_probabilities=st.model_probabilities, transform=t,
                detection=o.detection, affine=affine, _probabilities=st.result(),
            )
            seg.on_full_read = _recorder(key, o.name)
            raw.segmentation[o.name] = seg
        elif isinstance(o, SegmentationOutput):
            logits = agg.dense(o.name)[:, : ms[0], : ms[1], : ms[2]]
            if logits.shape[0] < o.channels:
                raise ValueError(
                    f"output {o.name!r} has {logits.shape[0]} channels; labels need {o.channels}"
                )
            seg = SegmentationResult(
                labels=list(o.labels), activation=o.activation, threshold=o.threshold,
                model_probabilities=activate(logits, o.activation, axis=0), transform=t,
                detection=o.detection, affine=affine,
            )
            seg.on_full_read = _recorder(key, o.name)
            raw.segmentation[o.name] = seg
        elif isinstance(o, ImageOutput):
            img = agg.dense(o.name)[:, : ms[0], : ms[1], : ms[2]]
            if o.denormalise:
                img = prepared.normalisation.invert(img)
            src = to_source_grid(img, t, order=1)
            raw.image[o.name] = src[0] if src.shape[0] == 1 else src
        elif isinstance(o, ClassificationOutput):
            logits = agg.mean(o.name).reshape(-1)
            if logits.shape[0] != len(o.classes):
                raise ValueError(
                    f"output {o.name!r} has {logits.shape[0]} logits; {len(o.classes)} classes"
                )
            p = activate(logits, o.activation, axis=0)
            raw.classification[o.name] = ClassificationResult(
                classes=list(o.classes),
                probabilities={c.name: float(p[i]) for i, c in enumerate(o.classes)},
            )
    for name in engine_needed:
        if name in pools:
            raw.embedding[name] = pools[name].result()
        elif name not in dense_names:
            raw.features[name] = agg.mean(name)
    timings["postprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for o in outs:
        if isinstance(o, TextOutput):
            raw.text[o.name] = _greedy_decode(package, o, raw.features[o.memory_output],
                                              decoder_factory)
    if any(isinstance(o, TextOutput) for o in outs):
        timings["decode"] = time.perf_counter() - t0
    raw.timings_s = {k: round(v, 4) for k, v in timings.items()}
    _log.info(
        "model run", model=package.name, engine=engine.name, provider=engine.provider,
        windows=len(windows), outputs=wanted, timings_s=raw.timings_s,
        mapped_during_inference=sorted(streams),
    )
    return raw


_READ_IN_FULL: dict[tuple[str, str], set[str]] = {}
"""(package folder, version) → segmentation outputs whose full source-grid probabilities a
caller read after an earlier :func:`run_model`; ``stream=None`` maps those while the engine
runs. A node's first job of a package therefore maps on first use; later ones overlap."""
_READ_LOCK = threading.Lock()

STREAM_ENV = "OMNIMRI_MAP_DURING_INFERENCE"
"""``1``: :func:`run_model` with ``stream=None`` maps the learnt outputs while the engine runs."""


def _stream_by_default() -> bool:
    return os.environ.get(STREAM_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _package_key(package: ModelPackage) -> tuple[str, str]:
    return (str(package.folder), str(package.spec.version))


def _recorder(key: tuple[str, str], name: str) -> Callable[[], None]:
    def record() -> None:
        with _READ_LOCK:
            _READ_IN_FULL.setdefault(key, set()).add(name)
    return record


class EmbeddingPool:
    """Pools an ``embedding`` output's window vectors into one vector per series.

    Each window's vector gets a weight (the spec's ``pool``): 1 (``mean``); the fraction of
    foreground voxels, normalised intensity above ``foreground_above``, in its centre slice
    (``NCHW``) or whole patch (``NCDHW``) (``foreground``); or the window's mean foreground
    probability of the softmax segmentation ``weight_output``, one minus channel 0
    (``segmentation``: e.g. brain, so windows of neck and air count nothing). The weighted mean
    is scaled to unit L2 norm when the spec says ``normalise``. A series whose every window
    weighs 0 falls back to the plain mean.
    """

    def __init__(self, spec: EmbeddingOutput, context_slices: int = 0) -> None:
        self.spec = spec
        self._centre = context_slices
        self._sum: npt.NDArray[np.float64] | None = None
        self._plain: npt.NDArray[np.float64] | None = None
        self._weight = 0.0
        self._count = 0

    def weights(self, batch: npt.NDArray[np.generic],
                result: dict[str, npt.NDArray[np.generic]] | None = None
                ) -> npt.NDArray[np.float64]:
        """Per-window weights ``[N]`` of an input ``batch`` and its engine ``result``.

        ``batch`` is ``[N, C, ...]``; the weights are those the class describes.

        Raises:
            ValueError: ``pool: segmentation`` and the result lacks ``weight_output``.
        """
        x = np.asarray(batch)
        n = x.shape[0]
        if self.spec.pool == "mean":
            return np.ones(n)
        if self.spec.pool == "segmentation":
            name = self.spec.weight_output
            if result is None or name not in result:
                raise ValueError(f"embedding output {self.spec.name!r} is weighted by "
                                 f"{name!r}, which the engine did not return")
            logits = np.asarray(result[name], np.float64).reshape(n, -1, *np.shape(
                result[name])[2:])
            bg = activate(logits.astype(np.float32), "softmax", axis=1)[:, 0]
            return np.asarray(1.0 - bg.reshape(n, -1).mean(axis=1), np.float64)
        c = min(self._centre, x.shape[1] - 1) if x.ndim == 4 else 0
        centre = x[:, c].reshape(n, -1)
        return np.asarray((centre > self.spec.foreground_above).mean(axis=1), np.float64)

    def add(self, out: npt.NDArray[np.generic], batch: npt.NDArray[np.generic],
            result: dict[str, npt.NDArray[np.generic]] | None = None) -> None:
        """Add one engine call: ``out`` ``[N, D]``, its input ``batch``, all its outputs."""
        v = np.asarray(out, np.float64).reshape(np.asarray(out).shape[0], -1)
        if v.shape[0] != np.asarray(batch).shape[0]:
            raise ValueError(f"embedding output {self.spec.name!r} has batch {v.shape[0]}, "
                             f"sent {np.asarray(batch).shape[0]}")
        w = self.weights(batch, result)
        s, p = (w[:, None] * v).sum(0), v.sum(0)
        self._sum = s if self._sum is None else self._sum + s
        self._plain = p if self._plain is None else self._plain + p
        self._weight += float(w.sum())
        self._count += v.shape[0]

    def result(self) -> npt.NDArray[np.float32]:
        """The pooled ``[D]`` vector (float32)."""
        if self._sum is None or self._plain is None:
            raise ValueError(f"embedding output {self.spec.name!r}: no window was run")
        v = self._sum / self._weight if self._weight > 1e-9 else self._plain / self._count
        if self.spec.normalise:
            norm = float(np.linalg.norm(v))
            v = v / norm if norm > 0 else v
        return np.asarray(v, np.float32)


class _Aggregator:
    """Accumulates window outputs: weighted sums for dense outputs, plain sums for the rest."""

    def __init__(
        self, padded_shape: tuple[int, ...], layout: str, dense: set[str]
    ) -> None:
        self._shape = (int(padded_shape[0]), int(padded_shape[1]), int(padded_shape[2]))
        self._layout = layout
        self._dense_names = dense
        self._sums: dict[str, Array] = {}
        self._weights: Array | None = None
        self._gauss: Array | None = None
        self._count: dict[str, int] = {}

    def _weights_for(self, size: tuple[int, int, int]) -> Array:
        if self._gauss is None or self._gauss.shape != size:
            self._gauss = gaussian_importance(size)
        return self._gauss

    def add(self, name: str, out: npt.NDArray[np.generic], group: list[Window]) -> None:
        out = np.asarray(out, dtype=np.float32)
        if out.shape[0] != len(group):
            raise ValueError(f"output {name!r} has batch {out.shape[0]}, sent {len(group)}")
        if name not in self._dense_names:
            s = out.sum(axis=0)
            self._sums[name] = s if name not in self._sums else self._sums[name] + s
            self._count[name] = self._count.get(name, 0) + len(group)
            return
        size = group[0].size
        want = size if self._layout == "NCDHW" else size[1:]
        if out.ndim != 2 + len(want) or tuple(out.shape[2:]) != tuple(want):
            raise ValueError(
                f"dense output {name!r} has shape {list(out.shape)}; expected "
                f"[N, C, {', '.join(map(str, want))}] for layout {self._layout}"
            )
        if name not in self._sums:
            self._sums[name] = np.zeros((out.shape[1], *self._shape), dtype=np.float32)
        w = self._weights_for(size)
        acc = self._sums[name]
        for n, win in enumerate(group):
            piece = out[n] if self._layout == "NCDHW" else out[n][:, None]
            acc[(slice(None), *win.slices)] += piece * w

    def add_weights(self, group: list[Window]) -> None:
        """Count each window's weights once (shared by every dense output)."""
        if not self._dense_names:
            return
        if self._weights is None:
            self._weights = np.zeros(self._shape, dtype=np.float32)
        for win in group:
            self._weights[win.slices] += self._weights_for(win.size)

    def dense(self, name: str) -> Array:
        """Weighted average over windows, ``[C, *padded_shape]`` (once per output).

        Divides the accumulated sums in place (no second full-size array) and hands them over.
        """
        assert self._weights is not None
        w = np.maximum(self._weights, np.float32(1e-8))
        acc = self._sums.pop(name)
        np.divide(acc, w, out=acc)
        return acc

    def slab(self, name: str, start: int, stop: int, model_shape: tuple[int, int, int]
             ) -> Array:
        """Weighted average of model slices ``[start, stop)``, cropped to ``model_shape``.

        The same values as those slices of :meth:`dense` (elementwise division by the same
        weights); for slices no later window adds to.
        """
        assert self._weights is not None
        sl = (slice(start, stop), slice(0, model_shape[1]), slice(0, model_shape[2]))
        w = np.maximum(self._weights[sl], np.float32(1e-8))
        out: Array = np.divide(self._sums[name][(slice(None), *sl)], w)
        return out

    def drop(self, name: str) -> None:
        """Forget an output's sums (it was averaged slab by slab)."""
        self._sums.pop(name, None)

    def mean(self, name: str) -> npt.NDArray[np.float32]:
        """Mean over all windows of a non-dense output (batch axis kept as 1)."""
        return (self._sums[name] / max(self._count.get(name, 1), 1))[None].astype(np.float32)


def _greedy_decode(
    package: ModelPackage, out: TextOutput, memory: npt.NDArray[np.float32],
    factory: DecoderFactory,
) -> str:
    """Greedy decoding: feed ``memory`` and the tokens so far, append the argmax until EOS."""
    path = package.decoder_path(out)
    if not path.is_file():
        raise ValueError(f"text output {out.name!r}: decoder {path.name} is missing")
    vocab = package.vocabulary(out)
    dec = factory(path)
    try:
        if set(dec.input_names) != {"memory", "tokens"} or "logits" not in dec.output_names:
            raise ValueError(
                f"decoder {path.name} must take (memory, tokens) and return logits; it takes "
                f"{dec.input_names} and returns {dec.output_names}"
            )
        tokens = [out.bos_id]
        for _ in range(out.max_tokens):
            logits = dec.run({"memory": memory, "tokens": np.asarray([tokens], dtype=np.int64)})
            nxt = int(np.argmax(np.asarray(logits["logits"])[0, -1]))
            if nxt == out.eos_id:
                break
            tokens.append(nxt)
    finally:
        dec.close()
    words = [vocab[i] for i in tokens[1:] if i != out.pad_id and 0 <= i < len(vocab)]
    return out.join.join(words)
