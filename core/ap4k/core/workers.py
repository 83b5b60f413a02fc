"""`--workers N`: N processes of one command under a supervisor, sharing its ports.

As with gunicorn's and uvicorn's workers, every worker listens on the same port with
SO_REUSEPORT and the kernel spreads new connections over them: one Python process uses one
core, a pod with more cores wants more processes. The supervisor forwards SIGTERM and SIGINT
to the workers and waits for them to drain. When a worker dies unasked, the supervisor stops the
others and exits non-zero: Kubernetes restarts the whole pod, as it would a single process (no
per-worker restarts that could hide a crash loop).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

log = logging.getLogger("ap4k.workers")


def freeze_start_up_objects() -> None:
    """Put what a process's start-up built (modules, routes, pools, caches: some 54,000
    objects in the server) out of the cyclic garbage collector's reach: every full collection
    otherwise walks all of them, 34-42 ms of the event loop on a busy 2-core machine, against
    under 2 ms for what is left (docs/performance.md, "Latency tail"). They live as long as
    the process anyway. Collected first, so that no start-up garbage is kept. The server, each
    carrier and the benchmark's load generator call it once they are up."""
    gc.collect()
    gc.freeze()


def _worker(target: Callable[..., None], args: tuple[Any, ...], index: int) -> None:
    # A forked worker inherits the supervisor's handlers; it installs its own when it runs.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        target(*args, index)
    except KeyboardInterrupt:
        pass


def supervise(
    count: int,
    target: Callable[..., None],
    *args: Any,
    name: str,
    grace_seconds: float,
) -> int:
    """Run `target(*args, index)` in `count` worker processes until they end; the exit code.

    `grace_seconds` is how long the workers may take to stop once told to (their drain); past
    it and a few seconds more, they are killed.
    """
    # fork: the workers start at once, and the supervisor holds no threads or event loop.
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker, args=(target, args, i), name=f"{name}-{i}", daemon=False)
        for i in range(count)
    ]
    stop_at: float | None = None
    code = 0

    def tell(signum: int) -> None:
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_at
        if stop_at is None:
            stop_at = time.monotonic() + grace_seconds + 5.0
        tell(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        log.info("%s: %d workers (pids %s)", name, count, ", ".join(str(w.pid) for w in workers))
        running = list(workers)
        while running:
            ended = wait([w.sentinel for w in running], timeout=0.5)
            for worker in [w for w in running if w.sentinel in ended]:
                worker.join()
                running.remove(worker)
                if stop_at is None:
                    log.error(
                        "%s exited with %s unasked; stopping the other workers",
                        worker.name,
                        worker.exitcode,
                    )
                    code = 1
                    stop_at = time.monotonic() + grace_seconds + 5.0
                    tell(signal.SIGTERM)
            if stop_at is not None and time.monotonic() > stop_at:
                for worker in running:
                    log.error("%s did not stop in time; killing it", worker.name)
                    worker.kill()
                stop_at = float("inf")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
