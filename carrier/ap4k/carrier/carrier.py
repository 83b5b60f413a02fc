"""A carrier: a delivery worker that holds no database credentials.

    lease loop ──POST /v1/leases (long poll)──▶ server
        └──▶ ready buffer ──▶ N workers ──HTTP──▶ targets
                                  └──outcome──▶ acker ──POST /v1/acks (batched)──▶ server
    heartbeat ──POST /v1/leases/extend──▶ server   (for deliveries that outlive half a lease)

Delivery itself is `ap4k.core.delivery`, the very code the server's dispatchers run. Any
server replica can take any call, so the carrier fails over between the URLs it was given.
A carrier that dies loses nothing: its leases expire and the server hands the messages out
again. On SIGTERM it drains: stops leasing, gives back what it has not started, finishes
what is in flight (within a grace period), acknowledges, and gives back the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ap4k.carrier import metrics
from ap4k.core.delivery import Deliverer, Delivery, Outcome
from ap4k.core.signatures import secret_key

log = logging.getLogger("ap4k.carrier")

ACK_COALESCE_SECONDS = 0.005


@dataclass
class CarrierSettings:
    servers: list[str]
    concurrency: int = 32
    lease_seconds: float = 60.0
    queues: list[str] = field(default_factory=list)
    api_token: str | None = None
    carrier_id: str = ""
    poll_wait_seconds: float = 20.0
    drain_grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.carrier_id:
            self.carrier_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ServerUnavailable(Exception):
    pass


class ServerClient:
    """The carrier protocol over HTTP, with failover across the server URLs."""

    def __init__(self, settings: CarrierSettings) -> None:
        self.settings = settings
        self.urls = [u.rstrip("/") for u in settings.servers]
        self.current = 0
        headers = {"Content-Type": "application/json"}
        if settings.api_token:
            headers["Authorization"] = f"Bearer {settings.api_token}"
        self.session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=16)
        )

    async def close(self) -> None:
        await self.session.close()

    async def call(self, path: str, payload: dict[str, Any], timeout: float = 30.0) -> Any:
        """POST to the current server; on failure try each other one once, then give up."""
        last_error: Exception | None = None
        for _ in range(len(self.urls)):
            url = self.urls[self.current]
            try:
                async with self.session.post(
                    url + path,
                    data=orjson.dumps(payload),
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as response:
                    body = await response.read()
                    if response.status >= 500:
                        raise ServerUnavailable(f"{url}: HTTP {response.status}")
                    if response.status >= 400:
                        # Our own mistake (or a wrong token): retrying elsewhere won't help.
                        raise RuntimeError(f"{url}{path}: HTTP {response.status} {body[:300]!r}")
                    return orjson.loads(body)
            except (aiohttp.ClientError, OSError, TimeoutError, ServerUnavailable) as exc:
                last_error = exc
                metrics.SERVER_ERRORS.inc()
                self.current = (self.current + 1) % len(self.urls)
        raise ServerUnavailable(str(last_error))


class Carrier:
    def __init__(self, settings: CarrierSettings) -> None:
        self.settings = settings
        self.client = ServerClient(settings)
        self.deliverer = Deliverer(max_connections=settings.concurrency * 2)
        self._ready: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._outstanding = 0
        self._capacity = asyncio.Event()
        self._in_flight: dict[int, Delivery] = {}
        # Every lease held and not yet acknowledged: id -> (delivery, lease renewed at).
        self._held: dict[int, tuple[Delivery, float]] = {}
        self._acks: list[dict[str, Any]] = []
        self._acks_pending = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.healthy = True

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        lease_task = loop.create_task(self._lease_loop(), name="carrier-lease")
        workers = [
            loop.create_task(self._worker(), name=f"carrier-worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        acker = loop.create_task(self._ack_loop(), name="carrier-acker")
        heartbeat = loop.create_task(self._heartbeat_loop(), name="carrier-heartbeat")
        log.info(
            "carrier %s delivering for %s with concurrency %d",
            self.settings.carrier_id,
            self.client.urls,
            self.settings.concurrency,
        )
        await self._stopping.wait()
        log.info("draining")
        lease_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease_task
        unstarted = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                unstarted.append(item)
        await self._release(unstarted)
        for _ in workers:
            self._ready.put_nowait(None)
        _, late = await asyncio.wait(workers, timeout=self.settings.drain_grace_seconds)
        abandoned = list(self._in_flight.values())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        # A delivery cut off mid-request may have reached its target: ack it as a retry
        # (the attempt counts), never give it back as if it had not been tried.
        for delivery in abandoned:
            self._acks.append(
                {
                    "id": str(delivery.id),
                    "attempt": delivery.attempt,
                    "queue": delivery.queue,
                    "outcome": "retry",
                    "error": "abandoned at shutdown",
                    "retry_after": 0,
                }
            )
        # Stop the acker first (an ack in flight goes back in the list), then flush all.
        heartbeat.cancel()
        acker.cancel()
        await asyncio.gather(acker, heartbeat, return_exceptions=True)
        await self._flush_acks(final=True)
        await self.deliverer.close()
        await self.client.close()
        log.info("stopped")

    def stop(self) -> None:
        self._stopping.set()

    # -- leasing ----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        backoff = 0.1
        size = self.settings.concurrency
        while True:
            if self._outstanding > size:  # two batches' worth in hand
                self._capacity.clear()
                await self._capacity.wait()
                continue
            request: dict[str, Any] = {
                "carrier": self.settings.carrier_id,
                "max_messages": min(2 * size - self._outstanding, 1000),
                "lease_seconds": self.settings.lease_seconds,
                # With work in hand, don't park on the server: come back for more at once.
                "wait_seconds": self.settings.poll_wait_seconds if self._outstanding == 0 else 0,
            }
            if self.settings.queues:
                request["queues"] = self.settings.queues
            try:
                answer = await self.client.call(
                    "/v1/leases", request, timeout=self.settings.poll_wait_seconds + 10
                )
            except (ServerUnavailable, RuntimeError) as exc:
                self.healthy = False
                log.warning("leasing failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.healthy = True
            backoff = 0.1
            secrets: dict[str, str] = answer.get("signing_secrets", {})
            keys = {
                queue: tuple(secret_key(s) for s in given)
                for queue, given in answer.get("webhook_secrets", {}).items()
            }
            messages = answer["messages"]
            metrics.LEASED.inc(len(messages))
            for m in messages:
                body = m["body_json"]
                self._outstanding += 1
                self._hold(
                    Delivery(
                        id=int(m["id"]),
                        queue=m["queue"],
                        attempt=m["attempt"],
                        max_attempts=m["max_attempts"],
                        target=m["target"],
                        method=m["method"],
                        headers=m["headers"] or None,
                        body=None if body is None else body.encode(),
                        timeout_seconds=m["timeout_seconds"],
                        created_at=m["created_at"],
                        ordering_key=m["ordering_key"],
                        signing_secret=secrets.get(m["queue"]),
                        webhook_keys=keys.get(m["queue"], ()),
                        explicitly_allowed=m["explicitly_allowed"],
                    )
                )
            metrics.LEASES_IN_FLIGHT.set(self._outstanding)
            if not messages and self._outstanding:
                await asyncio.sleep(0.02)  # nothing new while busy: don't spin

    def _hold(self, delivery: Delivery) -> None:
        self._held[delivery.id] = (delivery, time.monotonic())
        self._ready.put_nowait(delivery)

    async def _release(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        payload = {
            "carrier": self.settings.carrier_id,
            "leases": [{"id": str(d.id), "attempt": d.attempt} for d in deliveries],
        }
        try:
            await self.client.call("/v1/leases/release", payload)
        except (ServerUnavailable, RuntimeError) as exc:
            log.warning(
                "could not give back %d leases (they will expire): %s", len(deliveries), exc
            )

    # -- delivering -------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            delivery = await self._ready.get()
            if delivery is None:
                return
            self._in_flight[delivery.id] = delivery
            try:
                outcome = await self.deliverer.deliver(delivery)
            finally:
                self._in_flight.pop(delivery.id, None)
            self._outstanding -= 1
            metrics.LEASES_IN_FLIGHT.set(self._outstanding)
            if self._outstanding <= self.settings.concurrency:
                self._capacity.set()
            self._record(delivery, outcome)

    def _record(self, delivery: Delivery, outcome: Outcome) -> None:
        self._held.pop(delivery.id, None)
        metrics.DELIVERIES.labels(outcome.verdict.value).inc()
        metrics.DELIVERY_DURATION.observe(outcome.duration)
        self._acks.append(
            {
                "id": str(delivery.id),
                "attempt": delivery.attempt,
                "queue": delivery.queue,
                "outcome": outcome.verdict.value,
                "error": None
                if outcome.error is None
                else outcome.error.replace("\x00", "")[:2000],
                "retry_after": outcome.retry_after,
                "duration_seconds": outcome.duration,
            }
        )
        self._acks_pending.set()

    # -- acknowledging ----------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._acks_pending.wait()
            # Let the deliveries finishing now share the request: one POST of fifty acks
            # costs both sides little more than one of a single ack.
            await asyncio.sleep(ACK_COALESCE_SECONDS)
            self._acks_pending.clear()
            await self._flush_acks()

    async def _flush_acks(self, final: bool = False) -> None:
        """Send what finished since the last call; on failure keep it and try again later
        (until its leases expire, after which the server would refuse it anyway)."""
        attempts = 0
        while self._acks:
            batch, self._acks = self._acks[:1000], self._acks[1000:]
            try:
                answer = await self.client.call(
                    "/v1/acks", {"carrier": self.settings.carrier_id, "acks": batch}
                )
            except asyncio.CancelledError:
                self._acks = batch + self._acks  # the final flush sends them
                raise
            except (ServerUnavailable, RuntimeError) as exc:
                self._acks = batch + self._acks
                attempts += 1
                if final and attempts >= 3:
                    log.warning("dropping %d acks: no server (%s)", len(self._acks), exc)
                    return
                await asyncio.sleep(min(0.2 * 2**attempts, 5.0))
                continue
            refused = answer["refused"]
            if refused:
                metrics.ACKS_REFUSED.inc(len(refused))
                log.info("%d acks refused (their leases had expired)", len(refused))

    async def _heartbeat_loop(self) -> None:
        """Renew leases held for half their duration: slow deliveries, and messages still
        waiting for a worker, keep theirs; a carrier that dies stops renewing."""
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(max(lease / 4, 0.25))
            now = time.monotonic()
            due = [d for d, renewed in self._held.values() if now - renewed > lease / 2]
            if not due:
                continue
            payload = {
                "carrier": self.settings.carrier_id,
                "lease_seconds": lease,
                "leases": [{"id": str(d.id), "attempt": d.attempt} for d in due],
            }
            try:
                answer = await self.client.call("/v1/leases/extend", payload)
            except (ServerUnavailable, RuntimeError) as exc:
                log.warning("could not renew %d leases: %s", len(due), exc)
                continue
            metrics.LEASES_EXTENDED.inc(len(answer["extended"]))
            for item in answer["extended"]:
                held = self._held.get(int(item["id"]))
                if held is not None:
                    self._held[held[0].id] = (held[0], now)
