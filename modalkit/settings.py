"""The settings schema: every section and field of ``modalkit.yaml``, with its type, bounds and description.

Declarations only. How settings are found and layered is :mod:`modalkit.settings_sources`; how a bad key is
explained is :mod:`modalkit.settings_errors`. Nothing is read at import: settings are loaded by an explicit call,
:meth:`Settings.load` (or ``Settings()``), and passed down. Sources, highest precedence first: keyword arguments,
``MODALKIT_`` environment variables (``__`` between nested keys), a ``.env`` file (the same variables, written
down), the YAML layers (``MODALKIT_CONFIG=a.yaml,b.yaml`` or ``./modalkit.yaml``). Unknown keys are errors naming
the full key path and the file.

Example:
    >>> from modalkit.settings import Settings
    >>> s = Settings.load(data={"app_settings": {"app_prefix": "demo"}})
    >>> s.app_settings.batch_config.max_batch_size
    256
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from modalkit.exceptions import ConfigError
from modalkit.settings_errors import describe_allowed, explain
from modalkit.settings_sources import (
    ENV_PREFIX,
    SourceChain,
    config_files_from_env,
    no_model_hint,
    rename_legacy_keys,
)

__all__ = [
    "AppSettings",
    "AuthConfig",
    "BatchConfig",
    "BuildConfig",
    "CloudBucketMount",
    "DeploymentConfig",
    "JobConfig",
    "JobParameter",
    "ModelEntry",
    "ModelSettings",
    "Mount",
    "MountType",
    "PricingConfig",
    "QueueConfig",
    "RetryConfig",
    "Settings",
    "Volume",
    "config_files_from_env",
    "job_parameter",
    "parameter_help",
    "run_parameters",
]

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class _Strict(BaseModel):
    """Base of every settings section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class MountType(StrEnum):
    """Whether a local mount is a single file or a whole directory."""

    FILE = "file"
    DIR = "dir"


class Mount(_Strict):
    """A local file or directory copied into the container image."""

    local_path: str = Field(min_length=1, description="Path on the machine that deploys the app.")
    remote_path: str = Field(min_length=1, description="Absolute path inside the container.")
    type: MountType = Field(MountType.FILE, description="`file` or `dir`.")


class Volume(_Strict):
    """A Modal Volume mounted at a path (the original modalkit's model; ``volumes`` also takes a mapping)."""

    mount_point: str = Field(min_length=1, description="Absolute path inside the container.")
    volume_name: str = Field(min_length=1, description="Name of the Modal Volume.")


class CloudBucketMount(_Strict):
    """An S3/R2/GCS bucket mounted into the container as a directory (modal.CloudBucketMount)."""

    mount_point: str = Field(min_length=1, description="Absolute path inside the container.")
    bucket_name: str = Field(min_length=3, max_length=255, description="Name of the bucket.")
    bucket_endpoint_url: str | None = Field(None, description="Endpoint for R2/GCS or another S3-compatible store.")
    key_prefix: str | None = Field(None, description="Mount only keys under this prefix (ends with '/').")
    secret: str | None = Field(None, description="Name of the Modal secret holding the bucket's credentials.")
    oidc_auth_role_arn: str | None = Field(None, description="AWS role to assume through OIDC instead of a secret.")
    read_only: bool = Field(False, description="Mount read-only.")
    requester_pays: bool = Field(False, description="The bucket is requester-pays.")


class RetryConfig(_Strict):
    """Retries of a failed Modal input (modal.Retries)."""

    max_retries: int = Field(0, ge=0, le=10, description="Attempts after the first one.")
    backoff_coefficient: float = Field(2.0, ge=1.0, le=10.0, description="Delay multiplier between attempts.")
    initial_delay: float = Field(1.0, ge=0.0, le=60.0, description="Seconds before the first retry.")
    max_delay: float = Field(60.0, ge=1.0, le=60.0, description="Upper bound of the delay, in seconds.")


class BuildConfig(_Strict):
    """How the container image is built."""

    image: str | None = Field(
        None,
        description="Registry image to start from (e.g. `python:3.11-slim`); empty means Modal's debian_slim.",
    )
    tag: str = Field("latest", min_length=1, description="Tag of `image`.")
    python_version: str | None = Field(
        None, pattern=r"^3\.\d{1,2}$", description="Python for debian_slim (or added to a registry image)."
    )
    apt_packages: list[str] = Field(default_factory=list, description="Debian packages to install.")
    pip_packages: list[str] = Field(default_factory=list, description="Extra pip requirements for the pipeline.")
    extra_run_commands: list[str] = Field(default_factory=list, description="Shell commands run at build time.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set in the image.")
    workdir: str = Field("/root", min_length=1, description="Working directory inside the container.")
    local_python_sources: list[str] = Field(
        default_factory=lambda: ["modalkit"],
        description="Local Python packages added to the image (modalkit itself; each model entry's local pipeline "
        "module is added without being listed).",
    )
    install_modalkit_requirements: bool = Field(
        True, description="pip-install the libraries modalkit needs inside the container."
    )

    @field_validator("extra_run_commands", "pip_packages", "apt_packages", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # the original modalkit accepted a single string here
        return [value] if isinstance(value, str) else value


class DeploymentConfig(_Strict):
    """Where and how the Modal containers run."""

    region: str | list[str] | None = Field(None, description="Modal region(s) to run in; empty means any.")
    gpu: str | list[str] | None = Field(None, description="GPU type, e.g. `T4`, `A10G`, `H100`, `L4:2`; empty = CPU.")
    cpu: float | None = Field(None, gt=0, le=64, description="CPU cores reserved per container.")
    memory: int | None = Field(None, ge=128, le=1_048_576, description="Memory reserved per container, MiB.")
    volumes: dict[str, str] = Field(
        default_factory=dict,
        description="Mount point -> name of a Modal Volume (a list of {mount_point, volume_name} works too).",
    )
    volume_reload_interval_seconds: int | None = Field(
        None,
        ge=1,
        le=86_400,
        description="Reload the volumes and run the pipeline's on_volume_reload at most this often (seconds), "
        "checked before a batch (the hook runs even with no volumes); empty = never.",
    )
    cloud_bucket_mounts: list[CloudBucketMount] = Field(default_factory=list, description="Buckets to mount.")
    mounts: list[Mount] = Field(default_factory=list, description="Local files/directories copied into the image.")
    secrets: list[str] = Field(default_factory=list, description="Names of Modal secrets exposed as env vars.")
    min_containers: int | None = Field(None, ge=0, le=1000, description="Containers kept warm.")
    max_containers: int | None = Field(
        None, ge=1, le=10_000, description="Upper bound on containers (the original `concurrency_limit`)."
    )
    scaledown_window: int = Field(
        180, ge=2, le=3600, description="Seconds an idle container stays up (the original `container_idle_timeout`)."
    )
    timeout: int = Field(1800, ge=1, le=86_400, description="Seconds one input (an online batch, a chunk) may run.")
    retries: RetryConfig = Field(default_factory=RetryConfig, description="Retries of a failed input.")
    max_concurrent_inputs: int = Field(
        1, ge=1, le=1000, description="Inputs one model container serves at once (@modal.concurrent)."
    )
    handler_max_concurrent_inputs: int = Field(
        100, ge=1, le=1000, description="Requests one web-handler container serves at once."
    )
    secure: bool = Field(False, description="Require Modal proxy auth (Modal-Key/Modal-Secret headers) on the web app.")
    usd_per_hour: float | None = Field(
        None,
        ge=0,
        le=10_000,
        description="This deployment's price of one container per hour, all its resources together (a negotiated "
        "rate); empty = app_settings.pricing's rates for its gpu, cpu and memory.",
    )

    #: The original modalkit's key names, accepted in every source and readable as properties.
    legacy_names: ClassVar[dict[str, str]] = {
        "concurrency_limit": "max_containers",
        "container_idle_timeout": "scaledown_window",
        "allow_concurrent_inputs": "max_concurrent_inputs",
        "allow_concurrent_inputs_handler": "handler_max_concurrent_inputs",
    }

    @model_validator(mode="before")
    @classmethod
    def _original_names(cls, data: Any) -> Any:
        # DeploymentConfig(concurrency_limit=...) built directly; the settings sources rename before merging
        return rename_legacy_keys(cls, data)

    @property
    def concurrency_limit(self) -> int | None:
        """The original name of ``max_containers``."""
        return self.max_containers

    @property
    def container_idle_timeout(self) -> int:
        """The original name of ``scaledown_window``."""
        return self.scaledown_window

    @property
    def allow_concurrent_inputs(self) -> int:
        """The original name of ``max_concurrent_inputs``."""
        return self.max_concurrent_inputs

    @property
    def allow_concurrent_inputs_handler(self) -> int:
        """The original name of ``handler_max_concurrent_inputs``."""
        return self.handler_max_concurrent_inputs

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes_as_mapping(cls, value: Any) -> Any:
        # the original allowed `volumes: null`, and its Volume model lists {mount_point, volume_name}
        if value is None:
            return {}
        if isinstance(value, list | tuple):
            items = [Volume.model_validate(v) if not isinstance(v, Volume) else v for v in value]
            return {v.mount_point: v.volume_name for v in items}
        return value

    @field_validator("retries", mode="before")
    @classmethod
    def _retries_from_int(cls, value: Any) -> Any:
        return {"max_retries": value} if isinstance(value, int) else value

    @model_validator(mode="after")
    def _containers_in_order(self) -> Self:
        lo, hi = self.min_containers, self.max_containers
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f"min_containers ({self.min_containers}) is greater than max_containers ({self.max_containers})"
            )
        return self


class BatchConfig(_Strict):
    """Batching: Modal's dynamic batching online, and the sub-batch size inside a batch job."""

    max_batch_size: int = Field(256, ge=1, le=1000, description="Most inputs passed to the pipeline at once.")
    wait_ms: int = Field(10, ge=0, le=600_000, description="Online: ms to wait for more inputs after the first.")
    max_body_bytes: ByteSize = Field(
        ByteSize(16 * 1024 * 1024), ge=1024, le=1024**3, description="Online: larger request bodies get 413."
    )
    max_pending: int = Field(
        1024, ge=1, le=1_000_000, description="Online: requests waiting for the pipeline before new ones get 503."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Online: a request still waiting after this long gets 504 and is not run."
    )


class QueueConfig(_Strict):
    """Where success and failure records are sent."""

    backend: str = Field(
        "local",
        min_length=1,
        description="`local` (durable files, the embedded default), `sqs`, `memory`, `none`, "
        "or a name given to modalkit.task_queue.register_backend.",
    )
    local_path: Path = Field(Path(".modalkit/queues"), description="Directory of the `local` backend's queue files.")
    large_message_threshold: ByteSize = Field(
        ByteSize(256 * 1024),
        ge=1024,
        le=1024 * 1024,
        description="SQS bodies larger than this go to S3 and the message carries a pointer.",
    )
    large_message_uri: str | None = Field(
        None,
        pattern=r"^s3://[^/]+(/.*)?$",
        description="s3://bucket/prefix where large bodies are stored (required to send them over SQS).",
    )
    max_send_attempts: int = Field(
        8, ge=1, le=20, description="SQS: attempts of a send (failed entries, transient errors), about 16 s in all."
    )
    message_group_id: str = Field(
        "modalkit",
        min_length=1,
        max_length=128,
        description="MessageGroupId for FIFO queues (online async results); a batch job's records use one group "
        "per chunk, '<job_id>-<chunk>'.",
    )
    broker_url: str | None = Field(None, description="Broker URL for an injected backend (e.g. TaskIQ); unused here.")
    allowed_queues: list[str] = Field(
        default_factory=list, description="Queues an online async request may name (others get 403); empty = none."
    )


class AuthConfig(_Strict):
    """API-key auth of the HTTP endpoints."""

    api_key: SecretStr | None = Field(None, description="Static API key (prefer `ssm_key` in production).")
    ssm_key: str | None = Field(None, min_length=1, description="Name of the AWS SSM parameter holding the key.")
    auth_header: str = Field("x-api-key", pattern=r"^[A-Za-z0-9-]+$", description="Header that carries the key.")
    ssm_refresh_seconds: float = Field(
        300.0, ge=1, le=86_400, description="How often the SSM key is read again; the previous key stays valid as long."
    )
    open_routes: list[Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9_./{}-]*$")]] = Field(
        default_factory=lambda: ["/health"],
        max_length=32,
        description="Paths answered without the key when a key is set (e.g. `/metrics` for a Prometheus scraper; "
        "`/docs` with `/openapi.json` to browse the API); every other route needs it.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.api_key is not None and self.ssm_key is not None:
            raise ValueError("set either api_key or ssm_key, not both")
        return self


#: Modal's published rates (modal.com/pricing, per second there, times 3600 here), as listed in May 2026.
MODAL_GPU_USD_PER_HOUR: dict[str, float] = {
    "B200": 6.2496,
    "H200": 4.5396,
    "H100": 3.9492,
    "A100-80GB": 2.4984,
    "A100-40GB": 2.0988,
    "L40S": 1.9512,
    "A10G": 1.1016,
    "L4": 0.7992,
    "T4": 0.5904,
}
MODAL_RATES_SOURCE = "Modal's published rates (modal.com/pricing), as listed in May 2026"


class PricingConfig(_Strict):
    """What a second of each resource costs: the price table of a job's cost (``modalkit.batch.cost``).

    The defaults are Modal's published rates; a deployment with other prices (a discount, another provider) sets
    its own here, in the layer that describes it. Local runs cost ``local_usd_per_hour`` (0: nothing invents a cost).
    """

    gpu_usd_per_hour: dict[str, Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=lambda: dict(MODAL_GPU_USD_PER_HOUR),
        description="Dollars per hour of one GPU, by Modal GPU type (`L4:2` costs twice `L4`); entries given here "
        "are added to Modal's published rates or replace them.",
    )
    cpu_core_usd_per_hour: float = Field(
        0.04716, ge=0, le=100, description="Dollars per hour of one CPU core reserved by a container."
    )
    memory_gib_usd_per_hour: float = Field(
        0.007992, ge=0, le=100, description="Dollars per hour of one GiB of memory reserved by a container."
    )
    local_usd_per_hour: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Dollars per hour of the machine that runs local jobs, all of it (each local worker costs its "
        "share); 0 = local runs cost nothing.",
    )
    source: str = Field(
        MODAL_RATES_SOURCE, min_length=1, description="Where these figures came from, shown beside every cost."
    )

    @field_validator("gpu_usd_per_hour", mode="before")
    @classmethod
    def _over_modal_rates(cls, value: Any) -> Any:
        # a layer that prices one GPU type keeps the others' published rates
        if isinstance(value, Mapping):
            return {**MODAL_GPU_USD_PER_HOUR, **{str(k).upper(): v for k, v in value.items()}}
        return value


@dataclass(frozen=True)
class JobParameter:
    """How a ``job_config`` field takes part in a batch job (metadata on the field, beside its type and bounds).

    Attributes:
        per_run: Each run may override it: flow ``batch-inference`` takes it as a parameter and ``modalkit batch``
            as the option ``--<name>`` (both: empty = the ``job_config`` value).
        identity: It is part of the job id: the same input under another value is another job, in another output.
        metavar: How ``modalkit batch --help`` shows the option's value.
        example: A value shown in the option's help.
    """

    per_run: bool = False
    identity: bool = False
    metavar: str = "VALUE"
    example: str | None = None


class JobConfig(_Strict):
    """Defaults of batch jobs, and the one declaration of each job parameter.

    A field marked :class:`JobParameter` ``per_run`` is a parameter of flow ``batch-inference`` and an option of
    ``modalkit batch`` (:func:`run_parameters`); one marked ``identity`` is part of the job id (:meth:`identity`).
    ``JobSpec`` carries these fields as declared here.
    """

    backend: Annotated[Literal["local", "modal"], JobParameter(per_run=True, metavar="local|modal")] = Field(
        "local", description="Where chunks run: the local worker pool or Modal."
    )
    chunk_size: Annotated[ByteSize, JobParameter(per_run=True, identity=True, metavar="SIZE", example="64MiB")] = Field(
        ByteSize(32 * 1024 * 1024),
        ge=64 * 1024,
        le=8 * 1024**3,
        description="Input bytes per chunk; a Parquet row group is never split.",
    )
    concurrency: Annotated[int | None, JobParameter(per_run=True, metavar="N")] = Field(
        None, ge=1, le=10_000, description="Chunks in flight at once; empty = the number of local workers."
    )
    split_csv: Annotated[bool, JobParameter(identity=True)] = Field(
        False,
        description="Cut CSV files at line ends like JSONL; only for CSV whose quoted fields hold no line breaks "
        "(a record found running across a cut fails the job). False: each CSV file is one chunk.",
    )
    local_workers: int | None = Field(None, ge=1, le=512, description="Local worker processes; empty = CPU count.")
    host_workers: int | None = Field(
        None,
        ge=1,
        le=512,
        description="CPUs that feed one worker's device: above 1, that many host processes per worker validate and "
        "preprocess its sub-batches (for a pipeline that gives its host_stages()) while predict runs in the worker; "
        "1: they run in the worker's own process. Empty = fill the machine, one CPU kept for the worker's own "
        "process: locally the CPU count over local_workers, less one (1 with the default local_workers); on Modal "
        "the container's deployment_config.cpu, less one.",
    )
    id_field: Annotated[str | None, JobParameter(per_run=True, identity=True, metavar="FIELD")] = Field(
        None, min_length=1, description="Record field holding the record id; empty = <file key>:<position>."
    )
    output_format: Annotated[
        Literal["jsonl", "parquet"], JobParameter(per_run=True, identity=True, metavar="jsonl|parquet")
    ] = Field("jsonl", description="Format of the part files.")
    success_queue: Annotated[str | None, JobParameter(per_run=True, identity=True, metavar="QUEUE")] = Field(
        None, min_length=1, description="Queue for success records; empty = none."
    )
    failure_queue: Annotated[str | None, JobParameter(per_run=True, identity=True, metavar="QUEUE")] = Field(
        None, min_length=1, description="Queue for failure records; empty = none."
    )
    max_failure_rate: Annotated[float, JobParameter(per_run=True, metavar="RATE")] = Field(
        0.1, ge=0.0, le=1.0, description="The job fails when more than this fraction of its records fail."
    )
    prefetch_batches: int = Field(
        2,
        ge=0,
        le=64,
        description="Sub-batches a worker reads, validates and preprocesses ahead of the one its device runs, on "
        "helper threads, while another one is postprocessed and written; at most this many plus 2 are in memory at "
        "once; a worker overlaps only when it measured that it pays, or always with host processes (host_workers). 0: "
        "each sub-batch goes through every step before "
        "the next is read, on one thread.",
    )
    chunk_retries: int = Field(3, ge=0, le=20, description="Retries of a chunk after a transient error.")
    retry_delay_seconds: float = Field(2.0, ge=0.0, le=600.0, description="First retry delay; doubles each time.")
    chunk_timeout_s: float | None = Field(
        None,
        gt=0.0,
        le=7 * 24 * 3600.0,
        description="Seconds a chunk attempt may run before it is stopped (its local worker killed, its Modal call "
        "cancelled) and retried as a transient error, with chunk_retries; empty = adaptive: no limit until 5 "
        "chunks have finished, then 10 times their median wall time, at least 600 seconds.",
    )
    lease_seconds: float = Field(
        60.0,
        ge=1.0,
        le=3600.0,
        description="One run of a job at a time: the lease a run holds on its output is renewed every third of this; "
        "a run that died (SIGKILL, a lost machine) is taken over this long after its last renewal.",
    )

    def identity(self) -> dict[str, Any]:
        """The values of the parameters that are part of the job id (``JobParameter.identity``)."""
        return {
            name: getattr(self, name)
            for name, field in type(self).model_fields.items()
            if job_parameter(field).identity
        }


def job_parameter(field: FieldInfo) -> JobParameter:
    """How the ``job_config`` field ``field`` takes part in a job (unmarked: settings only)."""
    return next((m for m in field.metadata if isinstance(m, JobParameter)), _SETTINGS_ONLY)


_SETTINGS_ONLY = JobParameter()


def parameter_help(field: FieldInfo) -> str:
    """A job parameter in one line, for ``modalkit batch --help`` and the flows' parameter descriptions: the declared
    description, what is allowed, an example, and the default (``job_config``'s).

    Example:
        >>> parameter_help(JobConfig.model_fields["output_format"])
        'Format of the part files. Allowed: one of jsonl, parquet. Default: job_config (jsonl).'
    """
    summary, _, when_empty = (field.description or "").rstrip(".").partition("; empty = ")
    text = summary + "."
    allowed = describe_allowed(field)
    if allowed != "a text":  # a plain text (a field or queue name) has nothing more to say
        text += f" Allowed: {allowed}"
        example = job_parameter(field).example
        text += f", e.g. {example}." if example else "."
    default = field.default
    if isinstance(default, ByteSize):
        default = default.human_readable(decimal=False).replace(".0", "")
    return f"{text} Default: job_config ({when_empty if default is None else default})."


def run_parameters() -> dict[str, FieldInfo]:
    """The job parameters each run may override, in declaration order: flow ``batch-inference``'s parameters (less
    the URIs, the model, ``config`` and ``date``) and ``modalkit batch``'s options."""
    return {name: field for name, field in JobConfig.model_fields.items() if job_parameter(field).per_run}


class AppSettings(_Strict):
    """Application-level settings."""

    app_prefix: str = Field(
        "modalkit",
        min_length=1,
        max_length=48,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Prefix of the Modal app name (the postfix comes from MODALKIT_APP_POSTFIX, default `-dev`).",
    )
    build_config: BuildConfig = Field(default_factory=BuildConfig, description="Container image.")
    deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig, description="Modal resources.")
    batch_config: BatchConfig = Field(default_factory=BatchConfig, description="Batching.")
    queue_config: QueueConfig = Field(default_factory=QueueConfig, description="Success/failure records.")
    auth_config: AuthConfig = Field(default_factory=AuthConfig, description="HTTP auth.")
    job_config: JobConfig = Field(default_factory=JobConfig, description="Batch job defaults.")
    pricing: PricingConfig = Field(default_factory=PricingConfig, description="The price of each resource.")


class ModelEntry(BaseModel):
    """One model: the pipeline class to load and the keyword arguments for its constructor.

    Every key except ``pipeline`` and ``version`` is passed to the pipeline's ``__init__``.
    """

    model_config = ConfigDict(extra="allow")

    pipeline: str | None = Field(
        None,
        description="Import path of the InferencePipeline subclass, `package.module:Class`; "
        "may be empty where the Modal app names the class itself.",
    )

    @field_validator("pipeline")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not _IMPORT_PATH.match(value):
            raise ValueError(f"{value!r} is not an import path of the form 'package.module:Class'")
        return value

    version: str | None = Field(
        None,
        description="The pipeline's version, overriding its class attribute `version`; part of a batch job's "
        "identity (a new version never reuses another version's chunks).",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor keyword arguments: every key but ``pipeline`` and ``version``."""
        return dict(self.model_extra or {})


class ModelSettings(_Strict):
    """Model-level settings."""

    local_model_repository_folder: Path = Field(
        Path("./models"), description="Folder holding every model's files (a Modal Volume mount in the cloud)."
    )
    common: dict[str, Any] = Field(default_factory=dict, description="Settings shared by every model.")
    model_entries: dict[str, ModelEntry] = Field(default_factory=dict, description="Models by name.")
    default_model: str | None = Field(None, description="Model used when none is named; empty = the only entry.")
    #: the settings files these settings were read from (set by Settings), for the error when no model is configured
    _config_files: tuple[Path, ...] = PrivateAttr(default=())

    @field_validator("model_entries", mode="before")
    @classmethod
    def _entries_may_be_empty(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("default_model")
    @classmethod
    def _default_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        # on the field (not the section), so that the error names the file that set default_model
        entries = info.data.get("model_entries")
        if value is not None and entries is not None and value not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise ValueError(f"{value!r} is not one of model_entries ({known})")
        return value

    def entry(self, name: str | None = None) -> tuple[str, ModelEntry]:
        """The model called ``name`` (or the default one), with a clear error when there is none.

        Raises:
            ConfigError: the name is unknown, or no name was given and the default is ambiguous.
        """
        if not self.model_entries:
            raise ConfigError(f"no model is configured: {no_model_hint(self._config_files)}")
        if name is None:
            name = self.default_model
        if name is None:
            if len(self.model_entries) == 1:
                name = next(iter(self.model_entries))
            else:
                known = ", ".join(sorted(self.model_entries)) or "none"
                raise ConfigError(f"no model named and no model_settings.default_model set; model_entries has: {known}")
        if name not in self.model_entries:
            known = ", ".join(sorted(self.model_entries)) or "none"
            raise ConfigError(f"unknown model {name!r}: model_settings.model_entries has {known}")
        return name, self.model_entries[name]


# --- Settings ------------------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """All of modalkit's configuration: ``app_settings`` and ``model_settings``.

    Build it with :meth:`load` (or ``Settings()``, which reads the same sources). Invalid configuration raises
    :class:`~modalkit.exceptions.ConfigError` naming each bad key's full path and the file or variable it came from.

    Example:
        >>> Settings.load(data={"model_settings": {"model_entries": {"m": {"pipeline": "pkg.mod:Cls", "k": 1}}}}
        ...               ).model_settings.entry("m")[1].kwargs
        {'k': 1}
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        dotenv_filtering="match_prefix",
    )

    app_settings: AppSettings = Field(default_factory=AppSettings, description="Application settings.")
    model_settings: ModelSettings = Field(default_factory=ModelSettings, description="Model settings.")

    _config_files: tuple[Path, ...] = PrivateAttr(default=())

    def __init__(self, _sources: SourceChain | None = None, **values: Any) -> None:
        """Read every source (``_sources``: the chain :meth:`load` made; default: ``MODALKIT_CONFIG``'s files)."""
        chain = SourceChain(config_files_from_env()) if _sources is None else _sources
        values = rename_legacy_keys(Settings, values, renamed=chain.renamed)
        try:
            super().__init__(**chain.values(Settings, values))
        except ValidationError as exc:
            raise ConfigError(explain(exc, Settings, chain.origins, values, chain.renamed)) from None
        self._config_files = chain.files
        self.model_settings._config_files = chain.files

    @property
    def config_files(self) -> tuple[Path, ...]:
        """The YAML files these settings were read from, in layer order (shipped into Modal images)."""
        return self._config_files

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the values come merged from every source (SourceChain.values, in __init__): read nothing more
        return (init_settings,)

    @classmethod
    def load(
        cls,
        config: str | Path | Sequence[str | Path] | None = None,
        *,
        data: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Load settings.

        Args:
            config: YAML file(s) to read instead of ``MODALKIT_CONFIG`` / ``./modalkit.yaml``; a string may list
                several, comma-separated. Later files win.
            data: Values that take precedence over every source (the same shape as the YAML).

        Raises:
            ConfigError: a file is missing or invalid, a key is unknown, or a value is out of bounds.
        """
        if config is None:
            files = config_files_from_env()
        else:
            items = config.split(",") if isinstance(config, str) else ([config] if isinstance(config, Path) else config)
            files = tuple(Path(str(p).strip()) for p in items if str(p).strip())
        return cls(SourceChain(files), **dict(data or {}))
