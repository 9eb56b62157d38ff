"""The node's one validated configuration, loaded once from TOML and passed down explicitly."""

from __future__ import annotations

import re
import tomllib
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
    max_associations: Annotated[int, Field(ge=1, le=256)] = 16
    min_free_disk_bytes: Annotated[int, Field(ge=0)] = 500_000_000
    fsync: bool = True
    retention_days: Annotated[float, Field(ge=0)] = 7.0


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

    @model_validator(mode="after")
    def _one_token_source(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self

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
    analyses: dict[str, AnalysisSettings] = Field(default_factory=_default_analyses)
    tasks: dict[str, AnalysisSettings] = Field(default_factory=_default_tasks)
    api: ApiSettings = ApiSettings()
    watch: WatchSettings = WatchSettings()
    priors: PriorSettings = PriorSettings()

    @model_validator(mode="after")
    def _destinations_exist(self) -> NodeConfig:
        sections = [("analyses", self.analyses), ("tasks", self.tasks)]
        for section, name, analysis in [(s, n, a) for s, m in sections for n, a in m.items()]:
            for dest in analysis.destinations or ():
                if dest not in self.destinations:
                    raise ValueError(
                        f"{section}.{name}.destinations names {dest!r}, which is not in "
                        f"[destinations] ({', '.join(sorted(self.destinations)) or 'none defined'})"
                    )
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
    """Parse ``AET@HOST:PORT`` into a destination name and table.

    Raises
    ------
    ConfigError
        If ``text`` is not of that form.
    """
    match = re.fullmatch(r"([^@]+)@(.+):(\d+)", text)
    if match is None:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs:4242")
    ae_title, host, port = match.groups()
    return ae_title.lower(), {"ae_title": ae_title, "host": host, "port": int(port)}


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
