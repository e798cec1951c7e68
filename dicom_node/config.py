"""Node configuration: one ``config.yaml``, validated by pydantic, overridable from the environment.

Every command takes ``--config PATH`` (default ``./config.yaml``). The file has top-level
sections (``node``, ``storage``, ``completion``, ``jobs``, ``destinations``, ``pipelines``,
``rules``, ``models``, ``admin``, ``audit``, ``logging``). Any setting can be overridden by an
environment variable ``OMNIMRI__<SECTION>__<KEY>`` (for example ``OMNIMRI__NODE__PORT=11113`` or
``OMNIMRI__DESTINATIONS__PACS__PORT=4243``); the environment wins over the file.

Relative paths in the file are resolved against the folder that holds the file.

An invalid file is refused with :class:`ConfigError`, whose message lists each offending key
path (``node.port``) and the reason; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dicom_node.db import check_postgres_url, is_postgres
from export.options import ALL_OUTPUTS, OutputKind, SegOptions

ENV_PREFIX = "OMNIMRI__"
"""Prefix of environment overrides; sections and keys are joined with ``__``."""

DEFAULT_CONFIG_PATH = Path("config.yaml")
"""Where commands look for the configuration when ``--config`` is not given."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(Exception):
    """The configuration could not be loaded; ``str(err)`` names each key path and reason."""

    def __init__(self, path: Path | None, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        where = f"{path}: " if path else ""
        lines = [f"{where}invalid configuration"] + [f"  {k}: {why}" for k, why in problems]
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value) or value == "":
        raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
    return value


class AllowedCaller(_Section):
    """One entry of the association allow-list."""

    ae_title: str | None = None
    """Calling AE title that may associate; ``None`` means any AE title from ``host``."""
    host: str | None = None
    """Host address or CIDR (``10.0.0.0/8``, ``127.0.0.1``); ``None`` means any host."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        ipaddress.ip_network(v, strict=False)  # raises ValueError with a clear message
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> AllowedCaller:
        if self.ae_title is None and self.host is None:
            raise ValueError("an allowed caller needs an ae_title, a host, or both")
        return self


class TLSConfig(_Section):
    """DICOM TLS for the listener (server side)."""

    enabled: bool = False
    """Serve DICOM TLS. Default: off."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Separate TLS port; ``None`` means the listener's port itself speaks TLS."""
    certificate: Path | None = None
    """PEM server certificate."""
    private_key: Path | None = None
    """PEM private key of the server certificate."""
    ca_certificates: Path | None = None
    """PEM bundle of CAs whose client certificates are trusted."""
    verify_client: bool = False
    """Require and verify a client certificate. Default: off."""
    required: bool = False
    """Reject plain (non-TLS) associations. Default: off."""


class NodeConfig(_Section):
    """The DICOM listener."""

    ae_title: str = "OMNIMRI"
    """The node's own AE title. Default ``OMNIMRI``."""
    aliases: list[str] = Field(default_factory=list)
    """Further AE titles the node answers to (virtual AEs for called-AE routing)."""
    host: str = "0.0.0.0"
    """Bind address. Default all interfaces."""
    port: int = Field(default=11112, ge=1, le=65535)
    """DICOM port. Default 11112."""
    check_called_ae: bool = True
    """Reject associations whose called AE is neither ``ae_title`` nor an alias. Default on."""
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    """Association allow-list; an empty list accepts every caller (a warning is logged)."""
    max_associations: int = Field(default=16, ge=1)
    """Concurrent associations; more are rejected (transient, local limit). Default 16."""
    max_pdu_bytes: int = Field(default=262_144, ge=0)
    """Maximum PDU size offered, bytes (0 = unlimited). Default 256 KiB."""
    acse_timeout_s: float = Field(default=30.0, gt=0)
    """Association negotiation timeout, seconds. Default 30."""
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout waiting for a DIMSE message, seconds. Default 60."""
    network_timeout_s: float = Field(default=60.0, gt=0)
    """Idle timeout of an association, seconds. Default 60."""
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest instance accepted, bytes; larger ones are refused (0xA700). Default 2 GiB."""
    receiver: str | None = None
    """Deprecated, ignored: the node has one receive path (its own DICOM Upper Layer,
    docs/listener.md). Only ``fast`` (the former name of that path) is accepted."""
    tls: TLSConfig = Field(default_factory=TLSConfig)
    """DICOM TLS settings."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        return [_check_ae_title(a) for a in v]

    @field_validator("receiver")
    @classmethod
    def _receiver(cls, v: str | None) -> str | None:
        if v not in (None, "fast"):
            raise ValueError(f"node.receiver {v!r} was removed: the node has one receive path "
                             "(its own Upper Layer, TLS included); delete the setting")
        return v


class StorageConfig(_Section):
    """The durable spool and its index (SQLite file, or a shared PostgreSQL database)."""

    path: Path = Path("var/spool")
    """Spool folder for received instances (relative to the config file). Default ``var/spool``."""
    database: Path | str | None = None
    """SQLite file (default ``<path>/../node.db``), or a ``postgresql://user:pw@host/db`` URL:
    several nodes with the same URL and the same shared ``path`` form one node
    (``docs/database.md``; needs the ``postgres`` extra)."""
    min_free_bytes: int = Field(default=1024**3, ge=0)
    """Disk watermark: below this many free bytes C-STORE answers 0xA700. Default 1 GiB."""
    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    """Disk watermark: below this percentage free C-STORE answers 0xA700. Default 5 %."""
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    """Different bytes under a SOP Instance UID already stored: keep the first or replace it."""
    fsync: bool = True
    """fsync each instance (and the folder) before acknowledging. Turn off only for tests."""
    group_commit_ms: float = Field(default=2.0, ge=0)
    """Window in which concurrent instances share one fsync/commit, milliseconds. Default 2."""
    retention_days: float | None = None
    """Delete spooled series this many days after all their jobs are done; ``None`` keeps all."""

    @field_validator("database", mode="before")
    @classmethod
    def _database(cls, v: object) -> object:
        if isinstance(v, str) and is_postgres(v):
            return check_postgres_url(v)
        if isinstance(v, str) and "://" in v:
            raise ValueError(f"unsupported URL scheme {v.split('://')[0]!r}"
                             " (a SQLite file path, or postgresql://...)")
        return Path(v) if isinstance(v, str) else v

    @property
    def database_path(self) -> Path | str:
        """The SQLite file, resolved, or the PostgreSQL URL (``dicom_node.db.DatabaseTarget``)."""
        return self.database if self.database is not None else self.path.parent / "node.db"


class CompletionConfig(_Section):
    """When a series counts as complete."""

    quiet_seconds: float = Field(default=10.0, gt=0)
    """Complete after this long without a new instance, seconds. Default 10."""
    use_expected_count: bool = True
    """Complete at once when the expected instance count is known and reached. Default on."""
    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often the tracker looks for quiet series, seconds. Default 0.5."""


class JobsConfig(_Section):
    """The durable job queue and its worker pool."""

    workers: int = Field(default=2, ge=1)
    """Concurrent jobs. Default 2."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts before a job is marked failed (dead letter). Default 5."""
    backoff_initial_s: float = Field(default=5.0, gt=0)
    """First retry delay, seconds; doubles per attempt. Default 5."""
    backoff_max_s: float = Field(default=900.0, gt=0)
    """Longest retry delay, seconds. Default 900."""
    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often idle workers look for due jobs, seconds. Default 0.5."""
    dispatch_retry_for_s: float = Field(default=14400.0, ge=0)
    """How long a job whose outputs cannot be delivered keeps retrying, seconds, counted from
    its first failed delivery (a PACS maintenance window); only then is it failed (dead
    letter). Delivery retries do not count against ``max_attempts``. Default 14400 (4 h)."""
    probe_interval_s: float = Field(default=15.0, gt=0)
    """While jobs wait for a destination that failed, it is probed (C-ECHO, HTTP check) this
    often, seconds; when it answers, they are retried at once instead of after their
    back-off. Default 15."""


class DimseDestination(_Section):
    """C-STORE to a DICOM peer."""

    kind: Literal["dimse"] = "dimse"
    ae_title: str
    """The peer's AE title."""
    host: str
    """The peer's host name or address."""
    port: int = Field(ge=1, le=65535)
    """The peer's DICOM port."""
    calling_ae_title: str | None = None
    """AE title the node calls with; default the node's own."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Network, ACSE and DIMSE timeout, seconds. Default 30."""
    tls: bool = False
    """Use DICOM TLS."""
    tls_ca_certificates: Path | None = None
    """PEM CA bundle to verify the peer; ``None`` uses the system store."""
    tls_certificate: Path | None = None
    """PEM client certificate presented to the peer."""
    tls_private_key: Path | None = None
    """PEM private key of the client certificate."""

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)


class DicomwebDestination(_Section):
    """STOW-RS to a DICOMweb server."""

    kind: Literal["dicomweb"] = "dicomweb"
    url: str
    """Base URL of the DICOMweb service (the part before ``/studies``)."""
    username: str | None = None
    """HTTP basic user."""
    password: str | None = None
    """HTTP basic password."""
    bearer_token: str | None = None
    """Bearer token, instead of basic auth."""
    timeout_s: float = Field(default=30.0, gt=0)
    """HTTP timeout, seconds. Default 30."""


class OrthancDestination(_Section):
    """Upload through Orthanc's REST API."""

    kind: Literal["orthanc"] = "orthanc"
    url: str
    """Orthanc's HTTP base URL, e.g. ``http://127.0.0.1:8042``."""
    username: str | None = None
    """HTTP basic user."""
    password: str | None = None
    """HTTP basic password."""
    timeout_s: float = Field(default=30.0, gt=0)
    """HTTP timeout, seconds. Default 30."""


class FolderDestination(_Section):
    """Write results as files into a folder."""

    kind: Literal["folder"] = "folder"
    path: Path
    """Target folder; files are named ``<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``."""


Destination = Annotated[
    DimseDestination | DicomwebDestination | OrthancDestination | FolderDestination,
    Field(discriminator="kind"),
]

EngineName = Literal["tensorrt", "onnxruntime", "torch", "triton"]


class PipelineConfig(_Section):
    """A processing pipeline that rules refer to by name."""

    kind: Literal["omnimri", "preview"] = "omnimri"
    """``omnimri``: run a model package; ``preview``: a secondary-capture montage, no model."""
    model: str | None = "omnimri-tiny"
    """Model package name (a folder under ``models.path``) or a path to one."""
    instructions: list[str] = Field(default_factory=lambda: ["segment brain tissues"])
    """Task instructions the model runs, e.g. ``segment brain tissues``, ``detect abnormalities``,
    ``suggest a diagnosis``, ``write the report``."""
    engine: Literal["auto", "onnxruntime", "tensorrt", "torch", "triton"] = "auto"
    """Engine; ``auto`` picks the fastest available for the package."""
    outputs: list[OutputKind] = Field(default_factory=lambda: list(ALL_OUTPUTS))
    """Which DICOM objects the pipeline writes (:data:`export.options.OutputKind`)."""
    seg: SegOptions = Field(default_factory=SegOptions)
    """Options of the Segmentation exporter (:class:`export.options.SegOptions`)."""
    timeout_s: float = Field(default=600.0, gt=0)
    """Longest a run may take before it counts as a failed attempt, seconds. Default 600."""


class RuleConfig(_Section):
    """One routing rule. Rules are evaluated in file order."""

    name: str
    """Unique rule name (used in logs, the audit trail and ``rules explain``)."""
    when: str = "true"
    """Condition in the rule language over DICOM keywords, e.g. ``Modality == "MR"``."""
    action: Literal["route", "discard"] = "route"
    """``route`` enqueues jobs; ``discard`` stops evaluation for the series."""
    trigger: Literal["series", "study"] = "series"
    """``series``: fire per complete series; ``study``: when the required series are there."""
    required_series: list[str] = Field(default_factory=list)
    """With ``trigger: study``: conditions each naming one series the study must contain."""
    study_timeout_s: float = Field(default=600.0, gt=0)
    """With ``trigger: study``: give up waiting for required series after this, seconds."""
    pipelines: list[str] = Field(default_factory=list)
    """Pipelines (names in ``pipelines``) to run."""
    destinations: list[str] = Field(default_factory=list)
    """Where results go: names in ``destinations``, or ``sender`` (back to the caller)."""
    priority: Literal["urgent", "normal", "low"] = "normal"
    """Queue priority. Default ``normal``."""
    enabled: bool = True
    """A disabled rule is kept but never fires."""
    fallback: bool = False
    """Fires only when no other rule matched."""
    stop: bool = False
    """Stop evaluating later rules when this one fires."""

    @field_validator("when", mode="before")
    @classmethod
    def _when_parses(cls, v: Any) -> Any:
        from dicom_node.rules.parser import check_condition  # lazy: rules imports config

        if isinstance(v, bool):  # YAML `when: true` (unquoted) is a boolean
            v = "true" if v else "false"
        return check_condition(v) if isinstance(v, str) else v

    @field_validator("required_series")
    @classmethod
    def _required_parse(cls, v: list[str]) -> list[str]:
        from dicom_node.rules.parser import ConditionSyntaxError, check_condition

        for i, text in enumerate(v):
            try:
                check_condition(text)
            except ConditionSyntaxError as err:
                raise ValueError(f"entry {i}: {err}") from None
        return v


class ModelsConfig(_Section):
    """Where model packages live and how engines are chosen."""

    path: Path = Path("models")
    """Folder of model packages. Default ``models``."""
    engine_order: list[EngineName] = Field(
        default_factory=lambda: list[EngineName](["tensorrt", "onnxruntime"])
    )
    """Engines tried in order when a pipeline says ``auto``."""
    triton_url: str | None = None
    """Triton server (``host:port``) for ``engine: triton``."""
    intra_op_threads: int = Field(default=0, ge=0)
    """CPU threads per inference (0 = the physical cores this process may use; the job workers
    share one session's pool, so several workers need no split; several node processes on one
    machine: cores / processes each)."""


class AdminToken(_Section):
    """A bearer token of the admin API."""

    id: str
    """Name recorded in the audit log."""
    token: str = Field(min_length=16)
    """The secret (at least 16 characters)."""
    role: Literal["viewer", "admin"] = "viewer"
    """``viewer`` reads; ``admin`` also changes things."""


class AdminConfig(_Section):
    """The admin HTTP API, console and Prometheus metrics."""

    enabled: bool = False
    """Serve the admin API. Default off."""
    host: str = "127.0.0.1"
    """Bind address. Default loopback."""
    port: int = Field(default=8080, ge=1, le=65535)
    """HTTP port. Default 8080."""
    tokens: list[AdminToken] = Field(default_factory=list)
    """Bearer tokens; without any the API refuses every call but health."""
    max_body_bytes: int = Field(default=8 * 1024**2, ge=0)
    """Largest request body the API reads, bytes; a larger one is answered 413 before it is
    read (a declared Content-Length) or as soon as it passes the limit (a streamed body).
    Default 8 MiB (a rules test with an uploaded instance, base64, fits)."""


class AuditConfig(_Section):
    """Append-only audit trail."""

    path: Path | None = Path("var/audit.jsonl")
    """JSON-lines audit file; ``None`` disables. Default ``var/audit.jsonl``."""


class LoggingConfig(_Section):
    """Logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level. Default ``info``."""
    format: Literal["json", "console"] = "json"
    """``json`` for machines, ``console`` for people. Default ``json``."""


class NodeSettings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first (it wins), then the YAML content passed as init kwargs."""
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _references(self) -> NodeSettings:
        names = set()
        for i, rule in enumerate(self.rules):
            if rule.name in names:
                raise ValueError(f"rules.{i}.name: duplicate rule name {rule.name!r}")
            names.add(rule.name)
            for p in rule.pipelines:
                if p not in self.pipelines:
                    raise ValueError(f"rules.{i}.pipelines: unknown pipeline {p!r}")
            for d in rule.destinations:
                if d != "sender" and d not in self.destinations:
                    raise ValueError(f"rules.{i}.destinations: unknown destination {d!r}")
            if rule.action == "route" and not rule.pipelines and rule.enabled:
                raise ValueError(f"rules.{i}.pipelines: a route rule needs at least one pipeline")
        return self

    def resolve_paths(self, base: Path) -> NodeSettings:
        """Return a copy whose relative paths are made absolute against ``base``."""

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            return p if p.is_absolute() else (base / p).resolve()

        s = self.model_copy(deep=True)
        s.storage.path = fix(s.storage.path)  # type: ignore[assignment]
        if not isinstance(s.storage.database, str):  # a PostgreSQL URL stays as it is
            s.storage.database = fix(s.storage.database)
        s.models.path = fix(s.models.path)  # type: ignore[assignment]
        s.audit.path = fix(s.audit.path)
        for key in ("certificate", "private_key", "ca_certificates"):
            setattr(s.node.tls, key, fix(getattr(s.node.tls, key)))
        for dest in s.destinations.values():
            if isinstance(dest, FolderDestination):
                dest.path = fix(dest.path)  # type: ignore[assignment]
            if isinstance(dest, DimseDestination):
                for key in ("tls_ca_certificates", "tls_certificate", "tls_private_key"):
                    setattr(dest, key, fix(getattr(dest, key)))
        return s


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        msg = str(e["msg"])
        # Cross-reference errors carry their own key path inside the message.
        m = re.match(r"^(?:Value error, )?([\w.]+): (.*)$", msg)
        if m and not loc:
            loc, msg = m.group(1), m.group(2)
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # Drop pydantic's discriminator-tag suffix from key paths: destinations.pacs.dimse.port
        loc = re.sub(r"\.(dimse|dicomweb|orthanc|folder)(?=\.|$)", "", loc)
        out.append((loc or "<root>", msg))
    return out


def parse_config(data: dict[str, Any], base: Path, path: Path | None = None) -> NodeSettings:
    """Validate a configuration mapping (YAML content) merged with the environment.

    Args:
        data: The parsed YAML mapping.
        base: Folder against which relative paths are resolved.
        path: Where the data came from, for error messages.

    Raises:
        ConfigError: With one ``(key path, reason)`` per problem.
    """
    try:
        settings = NodeSettings(**data)
    except ValidationError as err:
        raise ConfigError(path, _problems(err)) from None
    settings = settings.resolve_paths(base)
    problems = route_free_text_instructions(settings)
    if problems:
        raise ConfigError(path, problems)
    return settings


def route_free_text_instructions(settings: NodeSettings) -> list[tuple[str, str]]:
    """Replace free-text pipeline instructions by the canonical ones they ask for.

    The pipeline's model package's language model reads them
    (:func:`inference.omnimri.language.runtime.route_instructions`).

    Canonical instructions pass without loading anything. Returns one ``(key path, reason)``
    per instruction the model refuses (it is never guessed) or cannot read (no package, no
    language model); such a pipeline is left unchanged.
    """
    from inference.omnimri.config import INSTRUCTIONS

    todo = [(n, p) for n, p in settings.pipelines.items() if p.kind == "omnimri" and any(
        " ".join(i.lower().split()) not in INSTRUCTIONS for i in p.instructions)]
    if not todo:
        return []
    from dicom_node.pipelines import PipelineError
    from dicom_node.pipelines.models import model_folder
    from inference.omnimri.language.runtime import InstructionRefused, route_instructions
    from inference.package import ModelPackage, PackageError

    problems: list[tuple[str, str]] = []
    for name, cfg in todo:
        key = f"pipelines.{name}.instructions"
        try:
            package = ModelPackage.load(model_folder(cfg, settings))
        except (PipelineError, PackageError) as err:
            problems.append((key, f"free-text instructions need the model package: {err}"))
            continue
        bad = []
        for n, ins in enumerate(cfg.instructions):
            try:
                route_instructions([ins], package)
            except InstructionRefused as err:
                bad.append((f"{key}.{n}", str(err)))
        if bad:
            problems += bad
            continue
        cfg.instructions = route_instructions(cfg.instructions, package)
    return problems


def load_config(path: Path | str | None = None) -> NodeSettings:
    """Load, validate and resolve the configuration file (plus ``OMNIMRI__…`` overrides).

    Args:
        path: The YAML file; default ``./config.yaml``. A missing default file means all
            defaults; a missing explicit file is an error.

    Raises:
        ConfigError: When the file cannot be read, is not YAML, or fails validation.
    """
    explicit = path is not None
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not p.exists():
        if explicit:
            raise ConfigError(p, [("<file>", "no such file")])
        return parse_config({}, Path.cwd(), None)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(p, [("<file>", f"cannot read: {err}")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(p, [("<file>", f"not valid YAML: {where}{err}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(p, [("<root>", "the file must be a mapping of sections")])
    return parse_config(raw, p.resolve().parent, p)


def env_overrides() -> dict[str, str]:
    """The ``OMNIMRI__…`` variables currently set (for ``check-config`` output)."""
    return {k: v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
