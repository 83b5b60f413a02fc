"""The typed spec of an AsyncQueue, parsed and checked from the raw body.

The CRD's schema (charts/ap4k/files/crds/asyncqueues.ap4k.dev.yaml) rejects most bad input at
admission and fills in the defaults; this parser applies the same defaults and bounds again,
because the operator must not trust that: objects written before a CRD upgrade, API servers
that skip CEL rules, and the test-suite's Kubernetes mock all hand it unchecked specs. On top
of the schema it checks what the schema does not (see `SpecError`). The defaults here and in
the CRD are compared by tests/operator/test_crd.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ap4k.core import names, wire

MetricType = Literal["Server", "Prometheus"]
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# The Service is named after the resource: a DNS-1035 label.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HTTP_URL = re.compile(r"^https?://\S+$")

# Queue settings an AsyncQueue does not carry: signing secrets do not belong in a resource
# that everyone who may read AsyncQueues can read.
NOT_IN_RESOURCE = frozenset({"signing_secret", "signing_secrets"})
# spec.queues[] fields (camelCase, as in the CRD) → the server's PUT /v1/queues/{name} fields:
# the server's own settings (`wire.QueueSettingsUpdate`), checked with the same declaration.
QUEUE_SETTINGS: dict[str, str] = {
    wire.snake_to_camel(name): name
    for name in wire.QueueSettingsUpdate.__struct_fields__
    if name not in NOT_IN_RESOURCE
}
_CAMEL = {snake: camel for camel, snake in QUEUE_SETTINGS.items()}


class SpecError(ValueError):
    """A spec the operator cannot act on; reported as `Ready=False, reason=InvalidSpec`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class DatabaseSpec:
    secret_name: str
    key: str = "url"


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    replicas: int = 2
    dispatchers: int = 10
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PrometheusMetric:
    server_address: str
    query: str  # the backlog
    arrival_rate_query: str | None = None  # msg/s enqueued; None: from the server's counts
    completion_rate_query: str | None = None  # msg/s delivered; None: from the server's counts


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    type: MetricType = "Server"
    prometheus: PrometheusMetric | None = None


@dataclasses.dataclass(frozen=True)
class CarrierSpec:
    min_replicas: int = 0
    max_replicas: int = 10
    concurrency: int = 10
    target_delay_seconds: float = 2.0
    initial_rate_per_carrier: float | None = None
    initial_startup_seconds: float = 10.0
    scale_down_stabilization_seconds: int = 300
    poll_interval_seconds: int = 15
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metric: MetricSpec = dataclasses.field(default_factory=MetricSpec)


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    name: str
    # Only the settings the resource sets, already in the server's snake_case.
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AsyncQueueSpec:
    name: str
    namespace: str
    database: DatabaseSpec
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    server: ServerSpec = dataclasses.field(default_factory=ServerSpec)
    carriers: CarrierSpec = dataclasses.field(default_factory=CarrierSpec)
    queues: tuple[QueueSpec, ...] = ()

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(queue.name for queue in self.queues)


# --- field readers -------------------------------------------------------------------------


def _section(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}", "must be an object")
    return value


def _int(raw: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if value is None:
        value = default
    # bool is an int in Python; a YAML `true` is not a replica count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}", f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{path}.{key}", f"must be between {lo} and {hi}, got {value}")
    return value


def _number(raw: Mapping[str, Any], key: str, path: str, lo: float, hi: float) -> float | int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{path}.{key}", f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{path}.{key}", f"must be between {lo:g} and {hi:g}, got {value}")
    return value


def _optional_number(
    raw: Mapping[str, Any], key: str, path: str, lo: float, hi: float
) -> float | None:
    if raw.get(key) is None:
        return None
    return float(_number(raw, key, path, lo, hi))


def _number_or(
    raw: Mapping[str, Any], key: str, path: str, default: float, lo: float, hi: float
) -> float:
    value = _optional_number(raw, key, path, lo, hi)
    return default if value is None else value


def _str(raw: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise SpecError(f"{path}.{key}", "is required")
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}.{key}", f"must be a non-empty string, got {value!r}")
    return value


def _optional_str(raw: Mapping[str, Any], key: str, path: str) -> str | None:
    return None if raw.get(key) is None else _str(raw, key, path)


def _url(raw: Mapping[str, Any], key: str, path: str) -> str:
    value = _str(raw, key, path)
    if not _HTTP_URL.match(value):
        raise SpecError(f"{path}.{key}", f"must be an http(s) URL, got {value!r}")
    return value


def _resources(raw: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    resources = _section(raw, "resources", path)
    for part, quantities in resources.items():
        if part not in ("requests", "limits") or not isinstance(quantities, Mapping):
            raise SpecError(f"{path}.resources.{part}", "must be requests or limits (objects)")
    return dict(resources)


# --- sections ------------------------------------------------------------------------------


def _parse_database(spec: Mapping[str, Any]) -> DatabaseSpec:
    if spec.get("database") is None:
        raise SpecError("spec.database", "is required (the Secret with the PostgreSQL URL)")
    raw = _section(spec, "database", "spec")
    return DatabaseSpec(
        secret_name=_str(raw, "secretName", "spec.database"),
        key=_str(raw, "key", "spec.database", "url"),
    )


def _parse_server(spec: Mapping[str, Any]) -> ServerSpec:
    raw = _section(spec, "server", "spec")
    path = "spec.server"
    return ServerSpec(
        replicas=_int(raw, "replicas", path, 2, 1, 100),
        dispatchers=_int(raw, "dispatchers", path, 10, 0, 1000),
        resources=_resources(raw, path),
    )


def _parse_metric(carriers: Mapping[str, Any]) -> MetricSpec:
    raw = _section(carriers, "metric", "spec.carriers")
    path = "spec.carriers.metric"
    kind = raw.get("type", "Server")
    if kind == "Server":
        if raw.get("prometheus") is not None:
            raise SpecError(f"{path}.prometheus", "is only allowed with type Prometheus")
        return MetricSpec()
    if kind == "Prometheus":
        if raw.get("prometheus") is None:
            raise SpecError(f"{path}.prometheus", "is required with type Prometheus")
        prom = _section(raw, "prometheus", path)
        return MetricSpec(
            type="Prometheus",
            prometheus=PrometheusMetric(
                server_address=_url(prom, "serverAddress", f"{path}.prometheus").rstrip("/"),
                query=_str(prom, "query", f"{path}.prometheus"),
                arrival_rate_query=_optional_str(prom, "arrivalRateQuery", f"{path}.prometheus"),
                completion_rate_query=_optional_str(
                    prom, "completionRateQuery", f"{path}.prometheus"
                ),
            ),
        )
    raise SpecError(f"{path}.type", f"must be Server or Prometheus, got {kind!r}")


def _parse_carriers(spec: Mapping[str, Any]) -> CarrierSpec:
    raw = _section(spec, "carriers", "spec")
    path = "spec.carriers"
    carriers = CarrierSpec(
        min_replicas=_int(raw, "minReplicas", path, 0, 0, 1000),
        max_replicas=_int(raw, "maxReplicas", path, 10, 1, 1000),
        concurrency=_int(raw, "concurrency", path, 10, 1, 10000),
        target_delay_seconds=_number_or(raw, "targetDelaySeconds", path, 2.0, 0.1, 86_400),
        initial_rate_per_carrier=_optional_number(
            raw, "initialRatePerCarrier", path, 0.001, 1_000_000
        ),
        initial_startup_seconds=_number_or(raw, "initialStartupSeconds", path, 10.0, 0, 3600),
        scale_down_stabilization_seconds=_int(
            raw, "scaleDownStabilizationSeconds", path, 300, 0, 86400
        ),
        poll_interval_seconds=_int(raw, "pollIntervalSeconds", path, 15, 1, 3600),
        resources=_resources(raw, path),
        metric=_parse_metric(raw),
    )
    if carriers.max_replicas < carriers.min_replicas:
        raise SpecError(
            f"{path}.maxReplicas",
            f"must be >= minReplicas ({carriers.max_replicas} < {carriers.min_replicas})",
        )
    return carriers


def _parse_queue(raw: Any, index: int) -> QueueSpec:
    path = f"spec.queues[{index}]"
    if not isinstance(raw, Mapping):
        raise SpecError(path, "must be an object")
    name = _str(raw, "name", path)
    if not names.QUEUE_NAME.fullmatch(name):  # not match(): "$" matches before a final "\n"
        raise SpecError(f"{path}.name", f"is not a valid queue name: {name!r}")
    given: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name" or value is None:
            continue
        if key not in QUEUE_SETTINGS:
            raise SpecError(f"{path}.{key}", "is not a queue setting")
        if isinstance(value, Mapping):  # an object setting: its fields are camelCase too
            value = {wire.camel_to_snake(k): v for k, v in value.items()}
        given[QUEUE_SETTINGS[key]] = value
    try:
        settings = msgspec.convert(given, wire.QueueSettingsUpdate).changes()
    except msgspec.ValidationError as exc:
        field, problem = wire.describe(exc, indexed=False)
        raise SpecError(f"{path}.{_CAMEL.get(field, field)}", problem) from None
    low, high = settings.get("min_backoff_seconds"), settings.get("max_backoff_seconds")
    if wire.backoff_problem(low, high) is not None:
        raise SpecError(f"{path}.minBackoffSeconds", f"must be <= maxBackoffSeconds ({high})")
    return QueueSpec(name=name, settings=settings)


def _parse_queues(spec: Mapping[str, Any]) -> tuple[QueueSpec, ...]:
    raw = spec.get("queues") or []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise SpecError("spec.queues", "must be a list")
    queues = tuple(_parse_queue(item, index) for index, item in enumerate(raw))
    seen: set[str] = set()
    for index, queue in enumerate(queues):
        if queue.name in seen:
            raise SpecError(f"spec.queues[{index}].name", f"duplicate queue {queue.name!r}")
        seen.add(queue.name)
    return queues


def parse_spec(name: str, namespace: str, spec: Mapping[str, Any]) -> AsyncQueueSpec:
    """The typed spec of AsyncQueue `namespace/name`, or `SpecError` naming the bad field."""
    if len(name) > 63 or not _DNS_1035.match(name):
        raise SpecError(
            "metadata.name",
            f"{name!r} must be a DNS-1035 label of at most 63 characters (it names the Service)",
        )
    image = spec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SpecError("spec.image", f"must be a non-empty string, got {image!r}")
    pull_policy = spec.get("imagePullPolicy") or "IfNotPresent"
    if pull_policy not in PULL_POLICIES:
        raise SpecError("spec.imagePullPolicy", f"must be one of {', '.join(PULL_POLICIES)}")
    return AsyncQueueSpec(
        name=name,
        namespace=namespace,
        image=image,
        image_pull_policy=pull_policy,
        database=_parse_database(spec),
        server=_parse_server(spec),
        carriers=_parse_carriers(spec),
        queues=_parse_queues(spec),
    )
