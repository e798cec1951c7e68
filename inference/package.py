"""Model packages: a folder with ``model.yaml`` and versioned engine files.

A package is shaped like a Triton model-repository entry, so the same folder can be served by
Triton when one machine is not enough::

    models/<name>/
      model.yaml            # this module's ModelSpec
      1/model.onnx          # portable engine (ONNX Runtime, TensorRT build input, Triton)
      1/model.int8.onnx     # optional variants (``variants:``; ``variant:`` says which runs)
      1/model.pt            # optional TorchScript (torch engine, speed baseline)
      1/model.<key>.plan    # optional TensorRT plan, keyed by GPU compute capability + TRT version
      1/decoder.onnx        # optional text decoder (``kind: text`` outputs)

``model.yaml`` is validated by pydantic; :class:`PackageError` lists every offending key path
(``outputs.0.labels.2.color``) with the reason. Pre- and post-processing are driven by this
spec, never by code per model: see :mod:`inference.preprocess`, :mod:`inference.postprocess` and
:mod:`inference.runner`.

Example (abridged)::

    name: omnimri-tiny
    version: "0.1.0"
    tasks: ["segment brain tissues"]
    input:
      name: image
      layout: NCDHW
      spacing_mm: [1.0, 1.0, 1.0]
      orientation: LPS-axial
      patch_size: [32, 32, 32]
      overlap: 0.25
      batch_size: 2
      normalisation: {kind: zscore, mask: nonzero}
    outputs:
      - name: tissues
        kind: segmentation
        activation: softmax
        labels:
          - value: 1
            label: Grey matter
            category: {value: "85756007", scheme: SCT, meaning: Tissue}
            type: {value: "389080004", scheme: SCT, meaning: Gray matter}
            color: [128, 128, 128]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.results import Code, ModelInfo, SegmentLabel

SPEC_FILE = "model.yaml"
"""Name of the spec file inside a package folder."""

ONNX_FILE = "model.onnx"
"""Name of the ONNX graph inside a version folder."""

TORCHSCRIPT_FILE = "model.pt"
"""Name of the optional TorchScript module inside a version folder."""

FP32_VARIANT = "fp32"
"""Name of the implicit variant that is ``model.onnx`` itself."""


class PackageError(ValueError):
    """A model package is missing or invalid; the message names the file and each key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept (SNOMED CT ``SCT``, DICOM ``DCM``, ...)."""

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)

    @field_validator("value", mode="before")
    @classmethod
    def _code_as_text(cls, v: Any) -> Any:
        # YAML turns unquoted SNOMED codes into ints; codes are strings.
        return str(v) if isinstance(v, int) else v

    def to_code(self) -> Code:
        """As an :class:`inference.results.Code`."""
        return Code(self.value, self.scheme, self.meaning)


class NormalisationSpec(_Strict):
    """Intensity normalisation applied to the (resampled) image before the model."""

    kind: Literal["zscore", "percentile", "minmax", "none"] = "zscore"
    """``zscore``: (x - mean) / std; ``percentile``: map the ``low``/``high`` percentiles to 0/1
    (clipped); ``minmax``: map min/max to 0/1; ``none``: unchanged. Default ``zscore``."""
    low: float = Field(default=0.5, ge=0.0, le=100.0)
    """Low percentile (``percentile`` kind), in percent. Default 0.5."""
    high: float = Field(default=99.5, ge=0.0, le=100.0)
    """High percentile (``percentile`` kind), in percent. Default 99.5."""
    mask: Literal["nonzero", "none"] = "nonzero"
    """Voxels the statistics use: ``nonzero`` (foreground) or all. Default ``nonzero``."""

    @model_validator(mode="after")
    def _order(self) -> NormalisationSpec:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class InputSpec(_Strict):
    """What the network eats: tensor name, layout, grid, patching and normalisation."""

    name: str = Field(min_length=1)
    """ONNX input name."""
    layout: Literal["NCDHW", "NCHW"] = "NCDHW"
    """``NCDHW``: 3-D patches ``[N, 1, D, H, W]``; ``NCHW``: 2.5-D slices, the slice and its
    ``context_slices`` neighbours on each side as channels ``[N, 2c+1, H, W]``."""
    context_slices: int = Field(default=0, ge=0, le=16)
    """Neighbouring slices on each side used as channels (``NCHW`` only). Default 0."""
    spacing_mm: tuple[float, float, float] | None = None
    """Target ``(slice, row, column)`` spacing in mm after reorientation; ``null`` = native."""
    orientation: Literal["LPS-axial", "native"] = "LPS-axial"
    """``LPS-axial``: permute/flip the array to axial LPS index order (slices to superior, rows to
    posterior, columns to left) before the model, and back after; ``native``: as acquired."""
    patch_size: tuple[int, ...]
    """Patch ``(D, H, W)`` for ``NCDHW`` or ``(H, W)`` for ``NCHW``, in voxels."""
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    """Sliding-window overlap as a fraction of the patch size. Default 0.25."""
    batch_size: int = Field(default=1, ge=1, le=1024)
    """Patches per engine call. Default 1."""
    normalisation: NormalisationSpec = Field(default_factory=NormalisationSpec)
    dtype: Literal["float32", "float16"] = "float32"
    """Input tensor element type. Default ``float32``."""

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float] | None) -> Any:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every spacing must be > 0 mm")
        return v

    @model_validator(mode="after")
    def _patch_matches_layout(self) -> InputSpec:
        want = 3 if self.layout == "NCDHW" else 2
        if len(self.patch_size) != want:
            raise ValueError(
                f"patch_size has {len(self.patch_size)} values; layout {self.layout} needs {want}"
            )
        if any(p < 1 for p in self.patch_size):
            raise ValueError("patch_size values must be >= 1")
        if self.layout == "NCDHW" and self.context_slices:
            raise ValueError("context_slices applies to layout NCHW only")
        return self

    @property
    def channels(self) -> int:
        """Input channels: 1 for ``NCDHW``, ``2 * context_slices + 1`` for ``NCHW``."""
        return 1 if self.layout == "NCDHW" else 2 * self.context_slices + 1


class LabelSpec(_Strict):
    """One segment class of a segmentation output."""

    value: int = Field(ge=0)
    """Channel index in the logits; with ``softmax`` also the value in the label map."""
    label: str = Field(min_length=1)
    """Short human name, e.g. ``White matter``."""
    category: CodeSpec
    """Segmented property category (e.g. SCT 85756007 Tissue)."""
    type: CodeSpec
    """Segmented property type (e.g. SCT 389079006 White matter)."""
    color: tuple[int, int, int] = (255, 0, 0)
    """Recommended display colour, sRGB 0-255."""
    task: Literal["anatomical", "pathological"] = "anatomical"

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError("colour components must be 0-255")
        return v

    def to_segment_label(self, number: int) -> SegmentLabel:
        """As an :class:`inference.results.SegmentLabel` with segment ``number``."""
        return SegmentLabel(
            number=number,
            label=self.label,
            category=self.category.to_code(),
            type=self.type.to_code(),
            color_rgb=self.color,
            task=self.task,
        )


class DetectionSpec(_Strict):
    """Turn a segmentation's foreground into detections (connected components)."""

    min_diameter_mm: float = Field(default=0.0, ge=0.0)
    """Components with a smaller largest extent (mm) are dropped. Default 0."""
    min_volume_mm3: float = Field(default=0.0, ge=0.0)
    """Components with a smaller volume (mm³) are dropped. Default 0."""
    connectivity: Literal[6, 18, 26] = 26
    """Voxel neighbourhood for components. Default 26."""


class SegmentationOutput(_Strict):
    """Dense per-voxel logits ``[N, C, ...]``, mapped back onto the source grid."""

    kind: Literal["segmentation"]
    name: str = Field(min_length=1)
    """ONNX output name."""
    activation: Literal["softmax", "sigmoid"] = "softmax"
    labels: list[LabelSpec] = Field(min_length=1)
    """Foreground classes; with ``softmax``, channel 0 is background unless listed."""
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Probability threshold for ``sigmoid`` channels. Default 0.5."""
    detection: DetectionSpec | None = None
    """If set, connected components of each label are reported as detections."""

    @model_validator(mode="after")
    def _unique_values(self) -> SegmentationOutput:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be unique, got {values}")
        return self

    @property
    def channels(self) -> int:
        """The minimum channel count the logits must have."""
        return max(lab.value for lab in self.labels) + 1


class ClassSpec(_Strict):
    """One class of a classification output (index = position in the list)."""

    name: str = Field(min_length=1)
    code: CodeSpec | None = None


class ClassificationOutput(_Strict):
    """Global logits ``[N, K]``; logits of all windows are averaged, then activated."""

    kind: Literal["classification"]
    name: str = Field(min_length=1)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    classes: list[ClassSpec] = Field(min_length=1)


class ImageOutput(_Strict):
    """An image on the model grid (e.g. a reconstruction), mapped back onto the source grid."""

    kind: Literal["image"]
    name: str = Field(min_length=1)
    denormalise: bool = True
    """Undo the input normalisation so the image is in source intensity units. Default true."""


class TextOutput(_Strict):
    """Generated text from a separate decoder, greedy decoding.

    The decoder ONNX (``decoder`` in the version folder) takes ``memory`` (the encoder output
    named by ``memory_output``, window-averaged) and ``tokens`` (int64 ``[N, T]``) and returns
    ``logits`` ``[N, T, V]``.
    """

    kind: Literal["text"]
    name: str = Field(min_length=1)
    """Key of the text in the run's outputs (not an ONNX name)."""
    decoder: str = Field(default="decoder.onnx", min_length=1)
    """Decoder file name in the version folder."""
    memory_output: str = Field(min_length=1)
    """Encoder output that conditions the decoder."""
    vocabulary: list[str] | str
    """Token strings (index = id), or a file name in the version folder (one token a line)."""
    bos_id: int = Field(default=1, ge=0)
    eos_id: int = Field(default=2, ge=0)
    pad_id: int = Field(default=0, ge=0)
    max_tokens: int = Field(default=256, ge=1, le=4096)
    join: str = " "
    """Separator placed between tokens when detokenising. Default one space."""


class EmbeddingOutput(_Strict):
    """A global feature vector ``[N, D]`` per window, pooled into one vector per series.

    Used for retrieval (e.g. report<->image, :mod:`inference.omnimri.retrieval`). The runner
    averages the window vectors with a weight per window (``pool``), then scales the mean to
    unit length when ``normalise`` is set.
    """

    kind: Literal["embedding"]
    name: str = Field(min_length=1)
    """ONNX output name."""
    pool: Literal["mean", "foreground", "segmentation"] = "mean"
    """Window weights: ``mean`` (equal), ``foreground`` (fraction of the centre slice's voxels
    whose normalised intensity exceeds ``foreground_above``) or ``segmentation`` (mean
    foreground probability of the softmax segmentation output ``weight_output`` in the window:
    one minus its channel 0). Default ``mean``."""
    foreground_above: float = Field(default=0.05, ge=0.0)
    """Normalised intensity above which a voxel is foreground (``pool: foreground``).
    Default 0.05."""
    weight_output: str = ""
    """The segmentation output whose foreground weighs the windows (``pool: segmentation``)."""
    normalise: bool = True
    """Scale the pooled vector to unit L2 norm. Default true."""

    @model_validator(mode="after")
    def _weights_named(self) -> EmbeddingOutput:
        if self.pool == "segmentation" and not self.weight_output:
            raise ValueError("pool 'segmentation' needs weight_output (a segmentation output)")
        return self


OutputSpec = Annotated[
    SegmentationOutput | ClassificationOutput | ImageOutput | TextOutput | EmbeddingOutput,
    Field(discriminator="kind"),
]
"""One declared output, by ``kind``."""


class Provenance(BaseModel):
    """Where the weights came from (free-form additions allowed)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    training_data: list[str] = Field(default_factory=list)
    seed: int | None = None
    stages: list[Any] = Field(default_factory=list)
    code_version: str = ""
    created: str = ""

    @field_validator("training_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


Precision = Literal["fp32", "bf16", "fp16", "int8", "fp8"]
"""Arithmetic precision of a graph variant."""


class VariantSpec(_Strict):
    """A second graph of the same model in the version folder (e.g. INT8 QDQ).

    The float32 ``model.onnx`` is always the variant ``fp32`` and is not listed.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Variant name, e.g. ``int8``; ``fp32`` is reserved for ``model.onnx``."""
    file: str = Field(min_length=1)
    """File name in the version folder, e.g. ``model.int8.onnx``."""
    precision: Precision
    quantisation: dict[str, Any] = Field(default_factory=dict)
    """How it was made (format QDQ, calibration set and size, op types): free form."""
    accuracy_check: dict[str, Any] | None = None
    """The accuracy check's numbers against ``fp32`` on held-out cases; ``passed`` (bool)
    decides whether the variant may run. ``None``: not checked."""

    @property
    def passed(self) -> bool:
        """Whether the recorded accuracy check passed."""
        return bool(self.accuracy_check and self.accuracy_check.get("passed") is True)


class ModelSpec(_Strict):
    """The content of ``model.yaml``."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    """Instructions the package supports, e.g. ``segment brain tissues``."""
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    task_outputs: dict[str, list[str]] = Field(default_factory=dict)
    """Instruction → output names it needs; instructions not listed use every output."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Named decision thresholds (model-specific meaning)."""
    provenance: Provenance = Field(default_factory=Provenance)
    metrics: dict[str, float] = Field(default_factory=dict)
    """Metric name → value measured on held-out data."""
    license: str = ""
    intended_use: str = ""
    manufacturer: str = "OmniMRI Node"
    extra: dict[str, Any] = Field(default_factory=dict)
    """Model-specific settings (free form), e.g. an atlas for lobe names."""
    variants: list[VariantSpec] = Field(default_factory=list)
    """Further graphs of the model (INT8, ...); ``model.onnx`` is the implicit ``fp32``."""
    variant: str = "fp32"
    """The variant engines run by default; any but ``fp32`` must have passed its accuracy
    check. Default ``fp32``."""

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) else v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        names = [o.name for o in self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"output names must be unique: {dupes}")
        for instr, outs in self.task_outputs.items():
            if instr not in self.tasks:
                raise ValueError(f"task_outputs names {instr!r}, which is not in tasks")
            unknown = [o for o in outs if o not in names]
            if unknown:
                raise ValueError(f"task_outputs[{instr!r}] names unknown outputs {unknown}")
        for o in self.outputs:
            if isinstance(o, TextOutput) and o.memory_output not in names:
                raise ValueError(
                    f"text output {o.name!r}: memory_output {o.memory_output!r} is not an output"
                )
            if isinstance(o, EmbeddingOutput) and o.pool == "segmentation":
                w = next((x for x in self.outputs if x.name == o.weight_output), None)
                if not isinstance(w, SegmentationOutput) or w.activation != "softmax":
                    raise ValueError(f"embedding output {o.name!r}: weight_output "
                                     f"{o.weight_output!r} is not a softmax segmentation output")
        vnames = [v.name for v in self.variants]
        if FP32_VARIANT in vnames or len(set(vnames)) != len(vnames):
            raise ValueError(f"variant names must be unique and not {FP32_VARIANT!r}: {vnames}")
        if self.variant != FP32_VARIANT:
            chosen = next((v for v in self.variants if v.name == self.variant), None)
            if chosen is None:
                raise ValueError(f"variant {self.variant!r} is not declared in variants "
                                 f"({[FP32_VARIANT, *vnames]})")
            if not chosen.passed:
                raise ValueError(f"variant {self.variant!r} has not passed its accuracy check "
                                 "(accuracy_check.passed is not true); it cannot run")
        return self

    def variant_spec(self, name: str | None = None) -> VariantSpec | None:
        """The declared variant ``name`` (default: the one that runs); ``None`` for ``fp32``.

        Raises:
            PackageError: ``name`` is not ``fp32`` nor declared.
        """
        name = name or self.variant
        if name == FP32_VARIANT:
            return None
        for v in self.variants:
            if v.name == name:
                return v
        raise PackageError(f"model {self.name!r} has no variant {name!r}; it has "
                           f"{[FP32_VARIANT, *[v.name for v in self.variants]]}")

    def output(self, name: str) -> OutputSpec:
        """The output named ``name``; ``KeyError`` if absent."""
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def outputs_for(self, instructions: list[str] | None) -> list[str]:
        """Names of the outputs needed by ``instructions`` (all outputs when empty/``None``).

        Raises:
            PackageError: An instruction is not one of :attr:`tasks`.
        """
        if not instructions:
            return [o.name for o in self.outputs]
        unknown = [i for i in instructions if i not in self.tasks]
        if unknown:
            raise PackageError(
                f"model {self.name!r} does not support {unknown}; its tasks are {self.tasks}"
            )
        wanted: set[str] = set()
        for instr in instructions:
            wanted.update(self.task_outputs.get(instr, [o.name for o in self.outputs]))
        # a text output needs its conditioning output too, an embedding its weights
        for o in self.outputs:
            if isinstance(o, TextOutput) and o.name in wanted:
                wanted.add(o.memory_output)
            if isinstance(o, EmbeddingOutput) and o.name in wanted and o.weight_output:
                wanted.add(o.weight_output)
        return [o.name for o in self.outputs if o.name in wanted]

    def engine_outputs(self) -> list[str]:
        """Names the encoder graph itself returns (every output except ``text`` ones)."""
        return [o.name for o in self.outputs if not isinstance(o, TextOutput)]


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid model package spec ({err.error_count()} error(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc or '<root>'}: {e['msg']}")
    return "\n".join(lines)


_KEY_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ModelPackage:
    """A loaded, validated package: the folder and its :class:`ModelSpec`."""

    folder: Path
    spec: ModelSpec

    @classmethod
    def load(cls, folder: Path | str) -> ModelPackage:
        """Read and validate ``folder/model.yaml``.

        Raises:
            PackageError: The folder or file is missing, not YAML, fails validation (each key
                path and reason listed), or has no version folder with ``model.onnx`` or
                ``model.pt``.
        """
        folder = Path(folder).resolve()
        path = folder / SPEC_FILE
        if not path.is_file():
            raise PackageError(f"{path}: no {SPEC_FILE} (not a model package)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise PackageError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise PackageError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        try:
            spec = ModelSpec.model_validate(raw)
        except ValidationError as err:
            raise PackageError(_format_errors(str(path), err)) from None
        pkg = cls(folder=folder, spec=spec)
        if not pkg.versions():
            raise PackageError(
                f"{folder}: no version folder (e.g. 1/) holding {ONNX_FILE} or {TORCHSCRIPT_FILE}"
            )
        chosen = pkg.model_path()
        if spec.variant != FP32_VARIANT and not chosen.is_file():
            raise PackageError(f"{path}: variant {spec.variant!r} runs but {chosen} is missing")
        return pkg

    @property
    def name(self) -> str:
        """The package name from ``model.yaml``."""
        return self.spec.name

    def versions(self) -> list[int]:
        """Numeric version folders that hold ``model.onnx`` or ``model.pt``, ascending."""
        out = []
        for p in self.folder.iterdir():
            has_graph = (p / ONNX_FILE).is_file() or (p / TORCHSCRIPT_FILE).is_file()
            if p.is_dir() and p.name.isdigit() and has_graph:
                out.append(int(p.name))
        return sorted(out)

    def version_folder(self, version: int | None = None) -> Path:
        """``folder/<version>``; the highest version when ``None``."""
        if version is None:
            vs = self.versions()
            if not vs:
                raise PackageError(f"{self.folder}: no version folder")
            version = vs[-1]
        return self.folder / str(version)

    def file(self, name: str, version: int | None = None) -> Path:
        """A file in the version folder (it may not exist)."""
        return self.version_folder(version) / name

    def onnx_path(self, version: int | None = None) -> Path:
        """``<version>/model.onnx`` (may not exist if the package is TorchScript only)."""
        return self.file(ONNX_FILE, version)

    def model_path(self, version: int | None = None, variant: str | None = None) -> Path:
        """The ONNX graph of ``variant`` (default: the spec's ``variant``, i.e. what runs).

        Raises:
            PackageError: An undeclared variant.
        """
        v = self.spec.variant_spec(variant)
        return self.onnx_path(version) if v is None else self.file(v.file, version)

    def variant_names(self) -> list[str]:
        """``fp32`` and every declared variant, in declaration order."""
        return [FP32_VARIANT, *[v.name for v in self.spec.variants]]

    def torchscript_path(self, version: int | None = None) -> Path:
        """``<version>/model.pt`` (optional)."""
        return self.file(TORCHSCRIPT_FILE, version)

    def plan_path(
        self, compute_capability: str, trt_version: str, version: int | None = None,
        precision: str = "fp32",
    ) -> Path:
        """The TensorRT plan for one GPU kind and TensorRT version.

        Args:
            compute_capability: e.g. ``"8.6"`` (``torch.cuda.get_device_capability``).
            trt_version: ``tensorrt.__version__``, e.g. ``"10.3.0"``.
            version: Package version folder; highest when ``None``.
            precision: ``fp32`` or ``fp16`` (the graph the plan was built from).

        Returns:
            ``<version>/model.sm86.trt10.3.0.fp32.plan``: a plan built elsewhere never loads.
        """
        cc = _KEY_SAFE.sub("", compute_capability.replace(".", ""))
        trt = _KEY_SAFE.sub("", trt_version)
        return self.file(f"model.sm{cc}.trt{trt}.{precision}.plan", version)

    def engine_cache_dir(self, version: int | None = None) -> Path:
        """Folder for ORT TensorRT engine and timing caches: ``<version>/trt_cache``."""
        return self.version_folder(version) / "trt_cache"

    def ort_cache_dir(self, version: int | None = None) -> Path:
        """Folder for ONNX Runtime's optimised graphs (CPU): ``<version>/ort_cache``."""
        return self.version_folder(version) / "ort_cache"

    def decoder_path(self, output: TextOutput, version: int | None = None) -> Path:
        """The decoder ONNX file of a ``text`` output."""
        return self.file(output.decoder, version)

    def vocabulary(self, output: TextOutput, version: int | None = None) -> list[str]:
        """Token strings of a ``text`` output (inline list, or one token a line from a file)."""
        if isinstance(output.vocabulary, list):
            return list(output.vocabulary)
        path = self.file(output.vocabulary, version)
        if not path.is_file():
            raise PackageError(f"{path}: vocabulary file of output {output.name!r} is missing")
        return path.read_text(encoding="utf-8").splitlines()

    def model_info(self, node_version: str = "") -> ModelInfo:
        """The :class:`inference.results.ModelInfo` for results of this package."""
        return ModelInfo(
            name=self.spec.name, version=self.spec.version, manufacturer=self.spec.manufacturer,
            node_version=node_version,
        )


def find_packages(root: Path | str) -> tuple[list[ModelPackage], dict[Path, str]]:
    """Load every package directly under ``root``.

    Returns:
        ``(packages, problems)``: valid packages sorted by name, and for each folder with a
        ``model.yaml`` that failed to load, the reason.
    """
    root = Path(root)
    found: list[ModelPackage] = []
    problems: dict[Path, str] = {}
    if not root.is_dir():
        return found, problems
    for sub in sorted(root.iterdir()):
        if (sub / SPEC_FILE).is_file():
            try:
                found.append(ModelPackage.load(sub))
            except PackageError as err:
                problems[sub] = str(err)
    return sorted(found, key=lambda p: p.name), problems
