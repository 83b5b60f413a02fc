"""Running a carrier process: the carrier, its /metrics and /healthz, and signal handling."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from ap4k.carrier.carrier import Carrier, CarrierSettings


async def run(settings: CarrierSettings, metrics_port: int, reuse_port: bool = False) -> None:
    carrier = Carrier(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, carrier.stop)
    runner: web.AppRunner | None = None
    if metrics_port:

        async def healthz(request: web.Request) -> web.Response:
            # Alive while the process runs: a server outage is no reason to restart us.
            return web.json_response({"status": "ok"})

        async def readyz(request: web.Request) -> web.Response:
            if carrier.healthy:
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "no server reachable"}, status=503)

        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler())
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        # With `--workers N` every worker serves /metrics on the port: a scrape reads one.
        site = web.TCPSite(runner, "0.0.0.0", metrics_port, reuse_port=reuse_port or None)
        await site.start()
    try:
        await carrier.run()
    finally:
        if runner is not None:
            await runner.cleanup()
