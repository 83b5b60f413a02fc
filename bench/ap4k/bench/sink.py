"""The benchmark's target: answers 200 at once, counts, and measures end-to-end latency.

Run as its own process (`python -m ap4k.bench.sink --port P`) so that its work is not
charged to the server or to the load generator. A message whose JSON body carries "t"
(the sender's time.time() at enqueue) adds a latency sample.
"""

from __future__ import annotations

import argparse
import time

import orjson
from aiohttp import web


class Counts:
    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[float] = []
        self.first_at = 0.0
        self.last_at = 0.0


def make_handler() -> web.Server:
    """aiohttp's low-level server: no router or middleware between the socket and us."""
    counts = Counts()
    ok = b""

    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path == "/deliver":
            body = await request.read()
            now = time.time()
            if counts.received == 0:
                counts.first_at = now
            counts.received += 1
            counts.last_at = now
            if body[:5] == b'{"t":':
                counts.latencies.append(now - orjson.loads(body)["t"])
            return web.Response(body=ok)
        if path == "/stats":
            return web.Response(
                body=orjson.dumps(
                    {
                        "received": counts.received,
                        "first_at": counts.first_at,
                        "last_at": counts.last_at,
                        "latencies": counts.latencies if "latencies" in request.query else [],
                    }
                ),
                content_type="application/json",
            )
        if path == "/reset":
            counts.__init__()  # type: ignore[misc]
            return web.Response(status=204)
        return web.Response(status=404)

    return web.Server(handle)


async def serve(port: int) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    server = await loop.create_server(make_handler(), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from ap4k.core.logs import run_async

    run_async(serve(args.port))


if __name__ == "__main__":
    main()
