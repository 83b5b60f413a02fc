"""The ap4k operator: a kopf operator for the `AsyncQueue` custom resource.

Modules, one concern each:

- `spec`: the typed spec parsed from an AsyncQueue body (with the CRD's defaults);
- `builders`: pure functions rendering the desired Deployments, Service and queue settings;
- `scaling`: the pure carrier-scaling decision (HPA-style stabilization window);
- `conditions`: status conditions and the `Ready` summary;
- `kube`: a small asyncio Kubernetes API client reusing kopf's login credentials;
- `apply`: idempotent create-or-patch of child objects;
- `queue_server`, `backlog`: the ap4k server's HTTP API and the backlog metric sources;
- `state`: what the operator remembers per AsyncQueue, and the status it writes;
- `reconcile`: apply the children and correct their drift; `autoscale`: the polling daemon;
- `handlers`: the kopf decorators (thin);
- `metrics`: the operator's own Prometheus metrics and health endpoint;
- `config`: operator settings from `AP4K_*` environment variables; `cli`: `ap4k operator`.
"""
