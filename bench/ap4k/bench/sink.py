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


def make_app() -> web.Application:
    counts = Counts()

    async def deliver(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        if counts.received == 0:
            counts.first_at = now
        counts.received += 1
        counts.last_at = now
        if body[:5] == b'{"t":':
            counts.latencies.append(now - orjson.loads(body)["t"])
        return web.Response(status=200)

    async def stats(request: web.Request) -> web.Response:
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

    async def reset(request: web.Request) -> web.Response:
        counts.__init__()  # type: ignore[misc]
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/deliver", deliver)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
