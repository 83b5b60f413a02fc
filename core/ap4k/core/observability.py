"""The one metrics-and-health HTTP app of the processes beside the server: carrier, outbox
forwarder and operator (the server serves the same routes from its own API app).

    GET /metrics   Prometheus text, by prometheus-client's own aiohttp handler
    GET /healthz   200 {"status": "ok"}    · 503 {"status": "<why not>"}   liveness
    GET /readyz    200 {"status": "ready"} · 503 {"status": "<why not>"}   readiness

One body shape for both probes, the server's: `{"status": ...}`. A probe is a function
returning None when all is well, or the reason it is not. Liveness stays up through outages
of what the process depends on (a server or database down is no reason to restart it);
readiness says whether it can do its work now.

prometheus-client is imported when the app is built, not when this module is: the light
client install (no extras) can import this module; the extras that run these processes
(`carrier`, `forwarder`, `operator`) install prometheus-client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# None: fine; a string: why not.
Probe = Callable[[], str | None]


def _always_fine() -> str | None:
    return None


def make_app(
    *,
    ready: Probe = _always_fine,
    alive: Probe = _always_fine,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    from prometheus_client import REGISTRY
    from prometheus_client.aiohttp import make_aiohttp_handler

    def probe(check: Probe, fine: str) -> Callable[[web.Request], Any]:
        async def handler(_request: web.Request) -> web.Response:
            problem = check()
            if problem is None:
                return web.json_response({"status": fine})
            return web.json_response({"status": problem}, status=503)

        return handler

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry or REGISTRY))
    app.router.add_get("/healthz", probe(alive, "ok"))
    app.router.add_get("/readyz", probe(ready, "ready"))
    return app


async def serve(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> web.AppRunner:
    """Start serving `app`; stop it with `await runner.cleanup()`. `reuse_port`: several
    worker processes share the port (SO_REUSEPORT)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    return runner
