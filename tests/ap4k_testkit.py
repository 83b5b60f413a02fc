"""Real parts for tests: PostgreSQL databases, HTTP targets, servers in and out of process."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import itertools
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from ap4k.core.embedded_pg import free_port

_database_numbers = itertools.count(1)

# The root conftest's `start_server` fixture: start(**ServerSettings overrides) -> (server, api)
StartServer = Callable[..., Awaitable[tuple[Any, "Api"]]]


async def create_database(admin_url: str, prefix: str = "t") -> str:
    """A fresh, empty database on the test cluster; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{next(_database_numbers)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def start_app(
    app: web.Application, port: int = 0, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1, on `port` or a free one (over TLS with `tls`): (its runner,
    to clean up; the port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner, port


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, port: int = 0, tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """`app` served on 127.0.0.1 while in the block (over TLS with `tls`); yields its base
    URL."""
    runner, port = await start_app(app, port, tls)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Received:
    message_id: str
    attempt: int
    queue: str
    body: bytes
    headers: dict[str, str]
    at: float


Behaviour = Callable[
    [Received, int], Awaitable[web.StreamResponse | int] | web.StreamResponse | int
]


@dataclass
class Sink:
    """A real HTTP target on 127.0.0.1 that records what it receives and answers as told.

    `behaviour(received, nth_attempt_seen_for_this_id)` returns a status or a response;
    by default every request gets 200.
    """

    behaviour: Behaviour | None = None
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await start_app(app, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        item = Received(
            message_id=request.headers.get("Ap4k-Message-Id", ""),
            attempt=int(request.headers.get("Ap4k-Attempt", "0")),
            queue=request.headers.get("Ap4k-Queue", ""),
            body=await request.read(),
            headers=dict(request.headers) | {":path": request.path_qs, ":method": request.method},
            at=time.monotonic(),
        )
        seen = sum(1 for r in self.received if r.message_id == item.message_id)
        self.received.append(item)
        self._changed.set()
        result: Any = 200
        if self.behaviour is not None:
            result = self.behaviour(item, seen + 1)
            if asyncio.iscoroutine(result):
                result = await result
        if isinstance(result, int):
            return web.Response(status=result)
        assert isinstance(result, web.StreamResponse)
        return result

    def delivered_ids(self, status_ok: Callable[[Received], bool] | None = None) -> Counter[str]:
        return Counter(r.message_id for r in self.received if status_ok is None or status_ok(r))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))


@contextlib.asynccontextmanager
async def sink(behaviour: Behaviour | None = None) -> AsyncIterator[Sink]:
    target = await Sink(behaviour).start()
    try:
        yield target
    finally:
        await target.stop()


class Api:
    """A thin JSON client for tests (the product's own client is tested on its own)."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        await self.session.close()

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.base_url + path,
            json=json,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response:
            text = await response.text()
            try:
                import json as jsonlib

                return response.status, jsonlib.loads(text) if text else None
            except ValueError:
                return response.status, text

    async def ok(self, method: str, path: str, json: Any = None) -> Any:
        status, body = await self.call(method, path, json)
        assert status < 300, (status, body)
        return body

    async def send(self, queue: str, message: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok("POST", f"/v1/queues/{queue}/messages", message)
        return body

    async def send_batch(self, queue: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = await self.ok("POST", f"/v1/queues/{queue}/messages", {"messages": messages})
        result: list[dict[str, Any]] = body["messages"]
        return result

    async def settings(self, queue: str, **settings: Any) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok("PUT", f"/v1/queues/{queue}", settings)
        return body

    async def message(self, msg_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok("GET", f"/v1/messages/{msg_id}")
        return body

    async def wait_state(self, msg_id: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = await self.message(msg_id)
            if message["state"] in states:
                return message
            if time.monotonic() > deadline:
                raise TimeoutError(f"message {msg_id} is {message['state']}, not {states}")
            await asyncio.sleep(0.05)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def ap4k(*args: str, env: dict[str, str] | None = None) -> Run:
    """`ap4k ARGS` in a child process (the event loop keeps serving in-process servers)."""
    # Only the variables a test names: an AP4K_* variable of the caller must not leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ap4k.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


@contextlib.asynccontextmanager
async def undelivering_server(database_url: str) -> AsyncIterator[Api]:
    """An in-process server without dispatchers (nothing it takes is meant to be delivered),
    for a module of tests that share one; yields its API client and stops it after."""
    from ap4k.server.app import Server, ServerSettings

    port = free_port()
    server = Server(
        ServerSettings(
            host="127.0.0.1",
            port=port,
            database_url=database_url,
            dispatchers=0,
            drain_grace_seconds=1.0,
            pool_size=4,
        )
    )
    await server.start()
    api = Api(f"http://127.0.0.1:{port}")
    try:
        yield api
    finally:
        await api.close()
        await server.stop()


# Every child process's log lives here: one directory per test run, so that runs side by side
# never append to each other's logs.
LOG_DIR = Path(tempfile.mkdtemp(prefix="ap4k-test-logs-"))
# Every child process started, so that none outlives the run (a test that fails before its
# cleanup would leave an `ap4k serve` running, and loading the machine, to the end).
_children: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_children() -> None:
    for child in _children:
        if child.poll() is None:
            child.kill()


def spawn(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """`ap4k ARGS…` as a child process, its output appended to `log`. It inherits the
    environment without any AP4K_* variable (tests stay hermetic), plus `env`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    with log.open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "ap4k.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**inherited, **(env or {})},
            preexec_fn=preexec_fn,
        )
    _children.append(child)
    return child


def tail(log: Path | None) -> str:
    """The end of a child's log, for an assertion's message."""
    return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""


class ChildProcess:
    """An `ap4k` command run as a real child process, for tests that kill it."""

    process: subprocess.Popen[bytes] | None = None
    log_path: Path

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; safe to repeat."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ServerProcess(ChildProcess):
    """`ap4k serve` as a real child process, for tests that kill and restart it (on the
    same port: `start()` again after `kill()` or `stop()`)."""

    def __init__(
        self,
        database_url: str,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        log: Path | None = None,
    ) -> None:
        self.database_url = database_url
        self.nofile = nofile  # RLIMIT_NOFILE of the child, when a test needs it lowered
        self.args = args
        self.port = port or free_port()
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log or LOG_DIR / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> ServerProcess:
        self.process = spawn(
            [
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database-url",
                self.database_url,
                *self.args,
            ],
            self.log_path,
            self.env,
            preexec_fn=None if self.nofile is None else self._lower_nofile,
        )
        await wait_ready(self.url + "/readyz", timeout, self.process, self.log_path)
        return self

    def _lower_nofile(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))


async def wait_ready(
    url: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Until `url` answers 200 (or `process` exits: the error carries its `log`'s end)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {process.returncode}\n{tail(log)}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {timeout}s\n{tail(log)}")
            await asyncio.sleep(0.1)


async def wait_completed(database_url: str, count: int, timeout: float = 60.0) -> None:
    """Until `count` messages are recorded as completed (outcomes and carriers' acks reach
    the database in batches, after the deliveries); then assert that many are."""
    completed = "SELECT count(*) FROM ap4k_messages WHERE state = 'completed'"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await count_rows(database_url, completed) == count:
            return
        await asyncio.sleep(0.1)
    assert await count_rows(database_url, completed) == count


async def count_rows(database_url: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        value: int = await conn.fetchval(sql, *args)
        return value
    finally:
        await conn.close()


class CarrierProcess(ChildProcess):
    """`ap4k carrier` as a real child process."""

    def __init__(
        self, servers: str, *args: str, concurrency: int = 16, lease_seconds: float = 5.0
    ) -> None:
        self.metrics_port = free_port()
        self.args = [
            "--server",
            servers,
            "--concurrency",
            str(concurrency),
            "--lease-seconds",
            str(lease_seconds),
            "--metrics-port",
            str(self.metrics_port),
            *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = LOG_DIR / f"carrier-{self.metrics_port}.log"

    async def start(self, timeout: float = 30.0) -> CarrierProcess:
        self.process = spawn(["carrier", *self.args], self.log_path)
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        await wait_ready(url, timeout, self.process, self.log_path)
        return self

    async def metric(self, name: str) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
        ):
            text = await response.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def build_wheel(source: Path, wheels: Path) -> Path:
    """`pip wheel --no-deps source` into `wheels`, as the image's build stage does; the wheel.

    With the build backend installed here, offline; otherwise pip fetches it into an
    isolated build environment from the package index, as the image does.
    """
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet",
         "--wheel-dir", str(wheels), str(source)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("ap4k-*.whl")
    return wheel
