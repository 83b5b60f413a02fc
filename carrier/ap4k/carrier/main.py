"""Running a carrier process: the carrier, its /metrics, /healthz and /readyz, and signals."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from ap4k.carrier.carrier import Carrier, CarrierSettings
from ap4k.core import observability
from ap4k.core.workers import freeze_start_up_objects


async def run(settings: CarrierSettings, metrics_port: int, reuse_port: bool = False) -> None:
    carrier = Carrier(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, carrier.stop)
    runner: web.AppRunner | None = None
    if metrics_port:
        # Alive while the process runs (a server outage is no reason to restart it);
        # ready while a server answers its calls.
        app = observability.make_app(
            ready=lambda: None if carrier.healthy else "no server reachable"
        )
        # With `--workers N` every worker serves /metrics on the port: a scrape reads one.
        runner = await observability.serve(app, "0.0.0.0", metrics_port, reuse_port=reuse_port)
    freeze_start_up_objects()
    try:
        await carrier.run()
    finally:
        if runner is not None:
            await runner.cleanup()
