"""Operator settings: one typed object, read from `AP4K_*` environment variables.

`ap4k operator` fills it from its flags (whose defaults come from the same variables) and
hands it over with `configure()`; the operator's start-up reads it once, through `current()`,
into the runtime in kopf's memo. Under `kopf run` (as in the tests) it comes from the
environment alone.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata

from ap4k.core.config import env

SERVER_PORT = 7438
CARRIER_METRICS_PORT = 7439
DEFAULT_METRICS_PORT = 8080
DEFAULT_SERVER_URL_TEMPLATE = "http://{name}.{namespace}.svc:7438"
IMAGE_REPOSITORY = "ghcr.io/ap4k/ap4k"


def _default_image() -> str:
    try:
        version = metadata.version("ap4k")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "latest"
    return f"{IMAGE_REPOSITORY}:{version}"


def _split(raw: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (raw or "").split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    # The image of the server and carriers when an AsyncQueue does not set `spec.image`: the
    # operator's own, so that one chart version runs one ap4k version everywhere.
    image: str = dataclasses.field(default_factory=_default_image)
    # Secrets for pulling that image, added to every server and carrier pod.
    image_pull_secrets: tuple[str, ...] = ()
    # AP4K_LOG_FORMAT of the server and carrier containers (text or json).
    pod_log_format: str = "json"
    # Add prometheus.io/{scrape,port,path} annotations to the server and carrier pods.
    scrape_annotations: bool = True
    # How the operator reaches an AsyncQueue's server ({name}, {namespace} are filled in). The
    # default is the Service's cluster DNS name; tests and out-of-cluster runs override it.
    server_url_template: str = DEFAULT_SERVER_URL_TEMPLATE
    # Connect to this Kubernetes API URL without credentials instead of the usual login
    # (in-cluster service account, kubeconfig): for `kubectl proxy` and the test-suite.
    kubernetes_url: str | None = None
    # Let kopf watch CRDs and namespaces, to notice a CRD installed or upgraded and namespaces
    # created after the operator started (needs list/watch on both). Off: discovery once at
    # start, the watched namespaces taken as given (kopf's "restricted mode").
    scanning: bool = True
    # Bearer token for the ap4k servers' /v1 API, when they run with AP4K_API_TOKEN.
    api_token: str | None = None
    # Port of the operator's own /metrics and /healthz (0: do not serve them).
    metrics_port: int = DEFAULT_METRICS_PORT
    # Timeout of every HTTP call to an ap4k server or to Prometheus.
    http_timeout_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            image=env("OPERATOR_IMAGE", None) or _default_image(),
            image_pull_secrets=_split(env("OPERATOR_IMAGE_PULL_SECRETS", "")),
            scrape_annotations=env("OPERATOR_SCRAPE_ANNOTATIONS", True, bool),
            pod_log_format=env("OPERATOR_POD_LOG_FORMAT", "json"),
            server_url_template=env("OPERATOR_SERVER_URL_TEMPLATE", DEFAULT_SERVER_URL_TEMPLATE),
            kubernetes_url=env("OPERATOR_KUBERNETES_URL", None),
            scanning=env("OPERATOR_SCANNING", True, bool),
            api_token=env("API_TOKEN", None),
            metrics_port=env("METRICS_PORT", DEFAULT_METRICS_PORT, int),
            http_timeout_seconds=env("OPERATOR_HTTP_TIMEOUT_SECONDS", 5.0, float),
        )

    def server_url(self, name: str, namespace: str) -> str:
        return self.server_url_template.format(name=name, namespace=namespace).rstrip("/")


_current: OperatorConfig | None = None


def configure(config: OperatorConfig | None) -> None:
    """Install the settings the handlers use (None: read the environment again on next use)."""
    global _current
    _current = config


def current() -> OperatorConfig:
    global _current
    if _current is None:
        _current = OperatorConfig.from_env()
    return _current


def endpoint(name: str, namespace: str) -> str:
    """The in-cluster URL applications post to: the Service's DNS name."""
    return f"http://{name}.{namespace}.svc:{SERVER_PORT}"


__all__ = ["OperatorConfig", "configure", "current", "endpoint"]
