"""The node's one validated configuration, loaded once from TOML and passed down explicitly."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ConfigError

_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def validate_ae_title(value: str) -> str:
    """Return ``value`` if it is a usable AE title, else raise ``ValueError`` with the reason.

    An AE title is 1 to 16 characters of the default character repertoire, without
    backslash or control characters, and not only spaces (PS3.5 Table 6.2-1, AE).
    """
    if not isinstance(value, str):
        raise TypeError("an AE title must be a string")
    if not value.strip():
        raise ValueError("AE title must not be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if _AE_FORBIDDEN.search(value):
        raise ValueError(f"AE title {value!r} contains a backslash or a control character")
    if not value.isascii():
        raise ValueError(f"AE title {value!r} contains non-ASCII characters")
    return value.strip()


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(_Frozen):
    """DICOM TLS (PS3.15 B.1, TLS 1.2 or later): PEM files of our certificate, its key, and the
    certificate authorities we trust for peers."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @field_validator("certificate", "private_key", "ca_certificates")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to check them against")
        return self


class NodeSettings(_Frozen):
    """The Storage SCP: who we are and whom we accept."""

    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("/var/lib/dicom-node")
    require_called_ae_title: bool = True
    allowed_calling_ae_titles: tuple[AETitle, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    max_pdu_bytes: Annotated[int, Field(ge=4096, le=2**24)] = 131072
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    association_request_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    max_associations: Annotated[int, Field(ge=1, le=256)] = 32
    association_wait_s: Annotated[float, Field(ge=0, le=60)] = 5.0
    max_pending_connections: Annotated[int, Field(ge=1, le=1024)] = 64
    max_connections_per_address: Annotated[int, Field(ge=1, le=1024)] = 48
    min_free_disk_bytes: Annotated[int, Field(ge=0)] = 500_000_000
    fsync: bool = True
    retention_days: Annotated[float, Field(ge=0)] = 7.0
    tls: TlsSettings | None = None

    @model_validator(mode="after")
    def _tls_serves_with_a_certificate(self) -> NodeSettings:
        if self.tls is not None and self.tls.certificate is None:
            raise ValueError("tls: the Storage SCP and the HTTP API need a certificate and private_key")
        return self
    log_file: Path | None = None
    log_max_bytes: Annotated[int, Field(ge=4096)] = 10_000_000
    log_backup_count: Annotated[int, Field(ge=0, le=100)] = 5


class GroupingSettings(_Frozen):
    """When a study counts as complete."""

    quiet_period_s: Annotated[float, Field(ge=0)] = 10.0
    max_wait_s: Annotated[float, Field(gt=0)] = 600.0

    @model_validator(mode="after")
    def _max_wait_covers_quiet_period(self) -> GroupingSettings:
        if self.max_wait_s < self.quiet_period_s:
            raise ValueError("max_wait_s must be at least quiet_period_s")
        return self


class SelectionSettings(_Frozen):
    """Defaults for series selection rules that do not set their own."""

    default_min_slices: Annotated[int, Field(ge=1)] = 20


class WorkerSettings(_Frozen):
    """Inference worker processes."""

    device: str = "auto"
    cpu_workers: Annotated[int, Field(ge=1, le=64)] = 1
    job_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    torch_threads: Annotated[int, Field(ge=0)] = 0

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
        return value


class DeliverySettings(_Frozen):
    """Retries of result delivery: exponential backoff, then a dead-letter state."""

    retry_initial_s: Annotated[float, Field(gt=0)] = 60.0
    retry_max_s: Annotated[float, Field(gt=0)] = 3600.0
    max_attempts: Annotated[int, Field(ge=1)] = 10
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class Destination(_Frozen):
    """A DICOM peer that receives results by C-STORE."""

    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    #: DICOM TLS to this peer; certificate, private_key and ca_certificates default to node.tls's.
    tls: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    #: Names the peer's certificate may carry (default: the host name we connect to).
    allowed_peer_names: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _tls_keys_go_together(self) -> Destination:
        for key in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: file {str(path)!r} does not exist")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self

    def with_tls_defaults(self, tls: TlsSettings | None) -> Destination:
        """Return this destination with node.tls's files where it sets none of its own."""
        if not self.tls or tls is None:
            return self
        update: dict[str, Any] = {}
        if self.certificate is None and tls.certificate is not None:
            update.update(certificate=tls.certificate, private_key=tls.private_key)
        if self.ca_certificates is None:
            update["ca_certificates"] = tls.ca_certificates
        return self.model_copy(update=update)


class SourceSettings(_Frozen):
    """An Orthanc that sends studies to the node (``push``) or that the node follows (``pull``).

    ``ae_title`` is the calling AE title Orthanc uses when it C-STOREs to the node; studies
    received from it are complete as soon as the series an analysis needs have every instance
    Orthanc holds (asked through its REST API at ``url``). ``username`` with ``password_file``
    (one line) or ``password_env`` (the name of an environment variable) authenticate.

    In ``pull`` mode the node follows Orthanc's change log every ``poll_interval_s``; the first
    time, from ``pull_from``: ``"now"`` (studies stored from then on) or ``"beginning"``
    (everything Orthanc's change log holds). Afterwards it resumes where it stopped.
    """

    ae_title: AETitle
    url: str
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    mode: Literal["push", "pull"] = "push"
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    poll_interval_s: Annotated[float, Field(gt=0)] = 0.5
    pull_from: Literal["now", "beginning"] = "now"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"url {value!r} is not an http:// or https:// address, e.g. http://pacs:8042")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_password_source(self) -> SourceSettings:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        if self.username is None and (self.password_file is not None or self.password_env is not None):
            raise ValueError("a password needs a username")
        if self.username is not None and self.password_file is None and self.password_env is None:
            raise ValueError("username needs password_file or password_env")
        return self

    def password(self, name: str) -> str | None:
        """Return the password (read from ``password_file`` or the environment now), or ``None``.

        Parameters
        ----------
        name
            The source's name under ``[sources]``, used in error messages.

        Raises
        ------
        ConfigError
            If the file cannot be read or is empty, or the environment variable is unset.
        """
        if self.password_file is not None:
            key = f"sources.{name}.password_file"
            try:
                secret = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read {self.password_file}: {exc.strerror}") from None
            if not secret:
                raise ConfigError(f"{key}: {self.password_file} is empty")
            return secret
        if self.password_env is not None:
            secret = os.environ.get(self.password_env, "")
            if not secret:
                raise ConfigError(f"sources.{name}.password_env: the environment variable"
                                  f" {self.password_env} is not set")
            return secret
        return None


class SeriesNumbers(_Frozen):
    """Series numbers of the objects an analysis files (configured, never random)."""

    seg: Annotated[int, Field(ge=0, le=2**31 - 1)] = 9901
    sc: Annotated[int, Field(ge=0, le=2**31 - 1)] = 9902
    sr: Annotated[int, Field(ge=0, le=2**31 - 1)] = 9903
    derived: Annotated[int, Field(ge=0, le=2**31 - 1)] = 9904


class AnalysisSettings(_Frozen):
    """One configured analysis: which plugin, where its results go, its own options."""

    plugin: str
    enabled: bool = True
    destinations: tuple[str, ...] | None = None
    series_numbers: SeriesNumbers = SeriesNumbers()
    options: dict[str, Any] = Field(default_factory=dict)
    #: Device classes whose workers may run it (scaled-out mode: one queue per class).
    devices: tuple[Literal["cuda", "cpu"], ...] = ("cuda", "cpu")

    @field_validator("devices")
    @classmethod
    def _some_device(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one device class: 'cuda', 'cpu' or both")
        return tuple(dict.fromkeys(value))


def _default_analyses() -> dict[str, AnalysisSettings]:
    return {"hippocampus": AnalysisSettings(plugin="hippocampus")}


def _default_tasks() -> dict[str, AnalysisSettings]:
    # module:Class rather than the entry point name, so it works before a re-install
    return {"gaussian-blur": AnalysisSettings(plugin="inference.blur.task:GaussianBlurTask")}


class ApiSettings(_Frozen):
    """The HTTP API and status page served by the node.

    ``token`` or ``token_file`` (one line) sets a bearer token that every call that changes
    anything must carry; without either, anyone who reaches the port may submit jobs.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr | None = None
    token_file: Path | None = None
    jobs_root: Path | None = None
    job_names: dict[str, str] = Field(default_factory=lambda: {"3dblur": "gaussian-blur"})

    @model_validator(mode="after")
    def _one_token_source(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self

    @field_validator("jobs_root")
    @classmethod
    def _absolute_jobs_root(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"jobs_root {str(value)!r} must be an absolute path")
        return value

    @field_validator("job_names")
    @classmethod
    def _job_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, task in value.items():
            if not name.strip() or not task.strip():
                raise ValueError(f"job name {name!r} -> {task!r}: neither may be empty")
        return value

    def jobs_folder(self, data_dir: Path) -> Path:
        """Return the folder a job's relative ``in_dir`` resolves against (``<data_dir>/jobs`` by default)."""
        return self.jobs_root if self.jobs_root is not None else data_dir / "jobs"

    def bearer_token(self) -> str | None:
        """Return the configured token (read from ``token_file`` now), or ``None``.

        Raises
        ------
        ConfigError
            If ``token_file`` cannot be read or is empty.
        """
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"api.token_file: cannot read {self.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"api.token_file: {self.token_file} is empty")
        return token


#: The environment variable that carries the PostgreSQL password when no file does.
PASSWORD_ENV = "DICOM_NODE_DB_PASSWORD"


class StateSettings(_Frozen):
    """Where the ledger lives: SQLite in ``node.data_dir`` (one box) or a PostgreSQL database.

    With ``backend = "postgresql"``, ``dsn`` names the server and database
    (``postgresql://USER@HOST:PORT/DB``); the password comes from ``password_file`` (one
    line) or the environment variable ``DICOM_NODE_DB_PASSWORD``, never from this file.
    """

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str | None = None
    password_file: Path | None = None
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("dsn")
    @classmethod
    def _dsn_without_password(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.fullmatch(r"postgres(?:ql)?://([^@/]*@)?[^/]*/[^/?#]+(\?.*)?", value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a PostgreSQL URL such as postgresql://USER@HOST:5432/DB"
            )
        user = match.group(1) or ""
        if ":" in user or re.search(r"(^|[?&])password=", match.group(2) or ""):
            raise ValueError(
                "the dsn must not hold a password: use state.password_file or the "
                f"environment variable {PASSWORD_ENV}"
            )
        return value

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> StateSettings:
        if self.backend == "postgresql" and self.dsn is None:
            raise ValueError("backend 'postgresql' needs dsn = \"postgresql://USER@HOST:PORT/DB\"")
        if self.backend == "sqlite" and (self.dsn is not None or self.password_file is not None):
            raise ValueError("dsn and password_file apply only to backend = \"postgresql\"")
        return self

    def password(self, environ: Mapping[str, str]) -> str | None:
        """Return the database password from ``password_file`` or ``environ``, or ``None``.

        Raises
        ------
        ConfigError
            If ``password_file`` cannot be read or is empty.
        """
        if self.password_file is not None:
            try:
                password = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"state.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
            if not password:
                raise ConfigError(f"state.password_file: {self.password_file} is empty")
            return password
        return environ.get(PASSWORD_ENV) or None


def _receiver_address(value: str) -> str:
    if not re.fullmatch(r"https?://[^/\s]+/?", value):
        raise ValueError(f"{value!r} is not an http:// or https:// address such as http://node:8080")
    return value.rstrip("/")


class QueueSettings(_Frozen):
    """The job queue of the scaled-out mode (``state.backend = "postgresql"``).

    Workers send a heartbeat every ``heartbeat_s``; the receiving node looks every
    ``recover_interval_s`` for jobs whose worker sent none for ``stalled_after_s`` (killed,
    host gone) and queues them again. On SIGTERM a worker lets its current job finish for up
    to ``stop_grace_s``. ``serve_runs_analyses`` makes ``serve`` start a worker on its own
    host (device ``workers.device``). Workers silent for ``forget_workers_after_s`` (hosts
    gone long ago) are removed from the fleet.
    """

    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    stalled_after_s: Annotated[float, Field(gt=0)] = 30.0
    recover_interval_s: Annotated[float, Field(gt=0)] = 10.0
    forget_workers_after_s: Annotated[float, Field(gt=0)] = 86400.0
    stop_grace_s: Annotated[float, Field(ge=0)] = 600.0
    serve_runs_analyses: bool = False
    #: How workers get a job's instances: "http" from the receiving nodes' APIs (``receiver_urls``,
    #: or the one ``receiver_url``; the bearer token of ``[api]``), or "shared" from the spool
    #: paths (a shared mount). Results go back to the first receiving node that answers.
    instances: Literal["shared", "http"] = "shared"
    receiver_url: str | None = None
    receiver_urls: tuple[str, ...] = ()
    transfer_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("receiver_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _receiver_address(value)

    @field_validator("receiver_urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        urls = tuple(_receiver_address(url) for url in value)
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice")
        return urls

    @model_validator(mode="after")
    def _receiver_for_http(self) -> QueueSettings:
        if self.receiver_url is not None and self.receiver_urls:
            raise ValueError("give receiver_url (one receiving node) or receiver_urls, not both")
        if self.instances == "http" and not self.receivers():
            raise ValueError('instances = "http" needs receiver_urls (or receiver_url), the receiving'
                             " nodes' API addresses")
        return self

    def receivers(self) -> tuple[str, ...]:
        """Return the receiving nodes' API addresses, ``receiver_url`` as a list of one."""
        return self.receiver_urls or (() if self.receiver_url is None else (self.receiver_url,))

    @model_validator(mode="after")
    def _stalled_after_heartbeats(self) -> QueueSettings:
        if self.stalled_after_s < 2 * self.heartbeat_s:
            raise ValueError("stalled_after_s must be at least twice heartbeat_s, or live workers"
                             " would look stalled")
        if self.forget_workers_after_s < self.stalled_after_s:
            raise ValueError("forget_workers_after_s must be at least stalled_after_s: a worker is"
                             " forgotten only after its jobs were queued again")
        return self


class WatchSettings(_Frozen):
    """A folder whose files are ingested like C-STORE instances (off while ``dir`` is unset).

    Ingested files are moved to ``processed_dir``, or deleted when it is unset; unreadable
    files go to ``rejected_dir`` (default ``<data_dir>/watch-rejected``) with a
    ``<name>.reason.txt``. A file is taken once its size and mtime were stable for ``settle_s``
    and it parses completely; one that still does not parse after ``give_up_s`` unchanged is
    rejected.
    """

    dir: Path | None = None
    processed_dir: Path | None = None
    rejected_dir: Path | None = None
    settle_s: Annotated[float, Field(ge=0)] = 2.0
    scan_interval_s: Annotated[float, Field(gt=0)] = 1.0
    give_up_s: Annotated[float, Field(gt=0)] = 60.0


class PriorSettings(_Frozen):
    """Where the node looks for a patient's prior results, for analyses that compare with them.

    The node's own ledger is always searched (``enabled``); with ``pacs_url`` (Orthanc's REST
    root, e.g. ``http://pacs.example.org:8042``) the SRs this node filed in the PACS are searched
    too, so priors are found after the data folder was wiped or on a new node.
    """

    enabled: bool = True
    pacs_url: str | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("pacs_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


class NodeConfig(_Frozen):
    """The whole configuration of a node."""

    node: NodeSettings = NodeSettings()
    grouping: GroupingSettings = GroupingSettings()
    selection: SelectionSettings = SelectionSettings()
    workers: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    analyses: dict[str, AnalysisSettings] = Field(default_factory=_default_analyses)
    tasks: dict[str, AnalysisSettings] = Field(default_factory=_default_tasks)
    api: ApiSettings = ApiSettings()
    watch: WatchSettings = WatchSettings()
    state: StateSettings = StateSettings()
    queue: QueueSettings = QueueSettings()
    priors: PriorSettings = PriorSettings()

    @model_validator(mode="after")
    def _sources_distinct(self) -> NodeConfig:
        seen: dict[str, str] = {}
        for name, source in self.sources.items():
            if source.ae_title in seen:
                raise ValueError(f"sources.{name}.ae_title {source.ae_title!r} is also the AE title"
                                 f" of sources.{seen[source.ae_title]}: each source needs its own")
            seen[source.ae_title] = name
        return self

    def source_for_caller(self, calling_ae_title: str) -> str | None:
        """Return the name of the source whose AE title is ``calling_ae_title``, or ``None``."""
        for name, source in self.sources.items():
            if source.ae_title == calling_ae_title.strip():
                return name
        return None

    @model_validator(mode="after")
    def _destinations_exist(self) -> NodeConfig:
        sections = [("analyses", self.analyses), ("tasks", self.tasks)]
        for section, name, analysis in [(s, n, a) for s, m in sections for n, a in m.items()]:
            for dest in analysis.destinations or ():
                if dest.startswith("source:"):
                    if dest.removeprefix("source:") not in self.sources:
                        raise ValueError(
                            f"{section}.{name}.destinations names {dest!r}, but [sources] has no"
                            f" {dest.removeprefix('source:')!r} ({', '.join(sorted(self.sources)) or 'none defined'})"
                        )
                    continue
                if dest not in self.destinations:
                    raise ValueError(
                        f"{section}.{name}.destinations names {dest!r}, which is not in "
                        f"[destinations] ({', '.join(sorted(self.destinations)) or 'none defined'})"
                    )
        return self

    @model_validator(mode="after")
    def _tls_destinations_complete(self) -> NodeConfig:
        resolved = {name: dest.with_tls_defaults(self.node.tls) for name, dest in self.destinations.items()}
        for name, dest in resolved.items():
            if dest.tls and dest.ca_certificates is None:
                raise ValueError(f"destinations.{name}.ca_certificates (or node.tls.ca_certificates) is "
                                 "needed with tls = true, to check the peer's certificate")
        if resolved != self.destinations:
            object.__setattr__(self, "destinations", resolved)  # still validated, set once here
        return self

    def destinations_for(self, analysis: str) -> tuple[str, ...]:
        """Return the names of the destinations that receive ``analysis`` results."""
        chosen = self.runnable()[analysis].destinations
        return tuple(self.destinations) if chosen is None else chosen

    def runnable(self) -> dict[str, AnalysisSettings]:
        """Return every enabled analysis and task: what workers load and jobs may name.

        ``[analyses]`` run on every complete study whose series match their rule;
        ``[tasks]`` run only when a job asks for them (``POST /jobs``); a name in both
        sections is an analysis.
        """
        both = {**self.tasks, **self.analyses}
        return {name: settings for name, settings in both.items() if settings.enabled}


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], *, source: str = "configuration") -> NodeConfig:
    """Validate a configuration mapping.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key, e.g.
        ``node.toml: destinations.pacs.port: Input should be less than or equal to 65535``.
    """
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Load and validate a TOML configuration file, with optional overrides merged on top.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not TOML, or does not validate.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None
    return build_config(merge(data, overrides or {}), source=path.name)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in, recursively for tables."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_destination(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``AET@HOST:PORT`` (``+tls``: over DICOM TLS) into a destination name and table.

    Raises
    ------
    ConfigError
        If ``text`` is not of that form.
    """
    match = re.fullmatch(r"([^@]+)@(.+):(\d+)(\+tls)?", text)
    if match is None:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT or AET@HOST:PORT+tls, "
                          "e.g. ORTHANC@pacs:4242")
    ae_title, host, port, tls = match.groups()
    table: dict[str, Any] = {"ae_title": ae_title, "host": host, "port": int(port)}
    if tls:
        table["tls"] = True
    return ae_title.lower(), table


ResultKind = Literal["seg", "sc", "sr"]


def dump_toml(data: dict[str, Any]) -> str:
    """Return ``data`` (a configuration mapping of tables, scalars and lists) as TOML text."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{_key(k)} = {value(v)}" for k, v in item.items()) + " }"
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, mapping: dict[str, Any]) -> None:
        scalars = {k: v for k, v in mapping.items() if not isinstance(v, dict) or not v}
        tables = {k: v for k, v in mapping.items() if isinstance(v, dict) and v}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for key, item in scalars.items():
            if item is not None:
                lines.append(f"{_key(key)} = {value(item)}")
        for key, item in tables.items():
            table(f"{prefix}.{_key(key)}" if prefix else _key(key), item)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else '"' + key.replace('"', '\\"') + '"'
