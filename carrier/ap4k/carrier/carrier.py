"""A carrier: a delivery worker that holds no database credentials.

    lease loop ──POST /v1/leases (long poll)──▶ server
        └──▶ ready buffer ──▶ N workers ──HTTP──▶ targets
                                  └──outcome──▶ acker ──POST /v1/acks (batched)──▶ server
                                                  └──or with the next POST /v1/leases
    heartbeat ──POST /v1/leases/extend──▶ server   (for deliveries that outlive half a lease)

Under a backlog the acker does not POST its acks alone: it has the lease loop lease what
there is room for and carry the acks in that request (one round trip where there were two;
only with a server that says it records them, `Leased.acks_on_lease`). While the lease
loop long-polls an idle server, acks go out on their own, as before.

The pool (ready buffer, workers, heartbeat, drain) is `ap4k.core.pool`, and delivery itself
`ap4k.core.delivery`: the very code the server's dispatchers run. The server is called
through the API client (`ap4k.client.async_client`), which fails over between the URLs the
carrier was given: any server replica takes any call. A carrier that dies loses nothing:
its leases expire and the server hands the messages out again. On SIGTERM it drains within
`shutdown_seconds`: stops leasing, gives back what it has not started, finishes what is in
flight (within the drain grace), acknowledges, and leaves the rest to expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from prometheus_client import Counter

from ap4k.carrier import metrics
from ap4k.client.async_client import AsyncClient
from ap4k.client.errors import Ap4kError
from ap4k.core import wire
from ap4k.core.delivery import Deliverer, Delivery, Outcome, Verdict, from_leased
from ap4k.core.pool import DeliveryPool
from ap4k.core.retry import RetryPolicy
from ap4k.core.signatures import secret_key

log = logging.getLogger("ap4k.carrier")

T = TypeVar("T")

ACK_COALESCE_SECONDS = 0.005
# At most this many times the concurrency leased ahead of the workers (ap4k.core.pool):
# the pool leases about a quarter of a second of deliveries ahead, and at a few thousand a
# second 8 × 32 lasted less than a lease round trip on a loaded machine (the workers waited).
LEASE_AHEAD_BATCHES = 32
# Of the shutdown budget: kept for the last acks (after the in-flight deliveries' grace), and
# of that, for closing the connections.
ACK_RESERVE_SECONDS = 4.0
CLOSE_RESERVE_SECONDS = 1.0


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
    # SIGTERM to exit, all of it: within Kubernetes' terminationGracePeriodSeconds (30 s by
    # default), with room to spare.
    shutdown_seconds: float = 20.0

    def __post_init__(self) -> None:
        if not self.carrier_id:
            self.carrier_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# Each server URL once per call: the carrier's loops do their own waiting (a lease loop that
# backs off, acks kept until they go through), and must not stall inside one call.
ONE_ROUND = RetryPolicy(attempts=1)


class ServerCalls:
    """The carrier protocol's calls, on the API client (failover across the server URLs)."""

    def __init__(self, settings: CarrierSettings) -> None:
        self.api = AsyncClient(
            settings.servers, token=settings.api_token, timeout=30.0, retry=ONE_ROUND,
            user_agent="ap4k-carrier",
        )

    @property
    def urls(self) -> list[str]:
        return self.api.urls

    async def close(self) -> None:
        await self.api.close()

    async def post(
        self,
        path: str,
        request: msgspec.Struct,
        answer: type[T],
        *,
        idempotent: bool,
        timeout: float = 30.0,
    ) -> T:
        metrics.SERVER_CALLS.labels(path).inc()
        try:
            return await self.api.post(
                path, request, answer, idempotent=idempotent, timeout=timeout
            )
        except Ap4kError:
            metrics.SERVER_ERRORS.inc()
            raise


class Carrier:
    """A `DeliveryPool` that leases over the carrier protocol and acknowledges in batches."""

    def __init__(self, settings: CarrierSettings) -> None:
        self.settings = settings
        self.client = ServerCalls(settings)
        self.pool = DeliveryPool(
            size=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            lease=self._lease,
            report=self._record,
            release=self._release,
            extend=self._extend,
            deliverer=Deliverer(max_connections=settings.concurrency * 2),
            cancel_lease_on_stop=True,  # a long poll: the server gives back what it held
            # Leasing is a round trip to the server: under a backlog, lease in large batches.
            max_ahead=LEASE_AHEAD_BATCHES * settings.concurrency,
            # Acks go out in batches, later: leases stay renewed until the server has them.
            hold_until_settled=True,
            name="carrier",
        )
        self._acks: list[wire.Ack] = []
        self._acks_pending = asyncio.Event()
        # Whether the server answering our last lease call records acks sent with one.
        self._acks_on_lease = False
        self._acks_asked = False  # the acker asked the lease loop to carry the acks
        # Set while no lease call carrying acks is in flight.
        self._no_acks_leasing = asyncio.Event()
        self._no_acks_leasing.set()
        self._stopping = asyncio.Event()
        self._lease_backoff = 0.1
        self.healthy = True
        self._deliveries: dict[Verdict, Counter] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        metrics.LEASES_IN_FLIGHT.set_function(lambda: self.pool.outstanding)
        loop = asyncio.get_running_loop()
        self.pool.start()
        acker = loop.create_task(self._ack_loop(), name="carrier-acker")
        log.info(
            "carrier %s delivering for %s with concurrency %d",
            self.settings.carrier_id,
            self.client.urls,
            self.settings.concurrency,
        )
        await self._stopping.wait()
        started = time.monotonic()
        budget = self.settings.shutdown_seconds
        log.info("draining (within %.0fs)", budget)
        # In-flight deliveries get the drain grace, within the budget less what the last
        # acks and the goodbyes need.
        await self.pool.stop(
            min(started + budget - ACK_RESERVE_SECONDS,
                started + self.settings.drain_grace_seconds)
        )
        # Stop the acker first (an ack in flight goes back in the list), then flush all.
        acker.cancel()
        await asyncio.gather(acker, return_exceptions=True)
        await self._flush_acks(deadline=started + budget - CLOSE_RESERVE_SECONDS)
        await self.client.close()
        log.info("stopped")

    def stop(self) -> None:
        self._stopping.set()

    # -- what the pool asks of us -----------------------------------------------------------

    async def _lease(self, room: int) -> list[Delivery]:
        """One lease call, a long poll: the server answers as soon as it has any message for
        us, so there is no polling loop, busy or idle."""
        # The acks ride along only when the acker asked for this call (under a backlog);
        # such a call does not wait for work: the acks' answer is awaited.
        acks: list[wire.Ack] = []
        if self._acks_asked:
            self._acks_asked = False
            acks, self._acks = self._acks[:wire.MAX_LEASE_IDS], self._acks[wire.MAX_LEASE_IDS:]
        request = wire.LeaseRequest(
            carrier=self.settings.carrier_id,
            max_messages=min(room, wire.MAX_BATCH),
            queues=self.settings.queues or None,
            wait_seconds=0.0 if acks else self.settings.poll_wait_seconds,
            lease_seconds=self.settings.lease_seconds,
            acks=acks or None,
        )
        if acks:
            self._no_acks_leasing.clear()
        try:
            # Not idempotent: a lease answered but lost would be leased twice.
            answer = await self.client.post(
                "/v1/leases",
                request,
                wire.Leased,
                idempotent=False,
                timeout=self.settings.poll_wait_seconds + 10,
            )
        except Ap4kError as exc:
            self._keep_acks(acks)
            self._acks_on_lease = False  # until a server says so again
            self.healthy = False
            log.warning("leasing failed (%s); retrying in %.1fs", exc, self._lease_backoff)
            await asyncio.sleep(self._lease_backoff)
            self._lease_backoff = min(self._lease_backoff * 2, 5.0)
            return []
        except asyncio.CancelledError:  # the drain: the final flush sends them
            self._keep_acks(acks)
            raise
        finally:
            self._no_acks_leasing.set()
        self.healthy = True
        self._lease_backoff = 0.1
        self._acks_on_lease = answer.acks_on_lease
        if acks:
            if answer.acks is None:  # not recorded (a server from before): send them again
                self._keep_acks(acks)
            else:
                self._acked(acks, answer.acks, "/v1/leases")
        metrics.LEASED.inc(len(answer.messages))
        legacy = answer.signing_secrets
        keys = {
            queue: tuple(secret_key(s) for s in given)
            for queue, given in answer.webhook_secrets.items()
        }
        return [
            from_leased(m, legacy.get(m.queue), keys.get(m.queue, ()))
            for m in answer.messages
        ]

    async def _release(self, deliveries: list[Delivery]) -> None:
        request = wire.ReleaseRequest(
            carrier=self.settings.carrier_id, leases=[_lease_ref(d) for d in deliveries]
        )
        await self.client.post("/v1/leases/release", request, wire.Released, idempotent=True)

    async def _extend(self, deliveries: list[Delivery], seconds: float) -> list[int]:
        request = wire.ExtendRequest(
            carrier=self.settings.carrier_id,
            leases=[_lease_ref(d) for d in deliveries],
            lease_seconds=seconds,
        )
        answer = await self.client.post(
            "/v1/leases/extend", request, wire.Extended, idempotent=True
        )
        metrics.LEASES_EXTENDED.inc(len(answer.extended))
        return [int(item.id) for item in answer.extended]

    def _record(self, delivery: Delivery, outcome: Outcome) -> None:
        if not outcome.cut_off:
            counted = self._deliveries.get(outcome.verdict)
            if counted is None:  # the metric child of a verdict, once
                counted = self._deliveries[outcome.verdict] = metrics.DELIVERIES.labels(
                    outcome.verdict.value
                )
            counted.inc()
            metrics.DELIVERY_DURATION.observe(outcome.duration)
        self._acks.append(
            wire.Ack(
                id=str(delivery.id),
                attempt=delivery.attempt,
                queue=delivery.queue,
                outcome=outcome.verdict.value,
                error=None if outcome.error is None else outcome.error.replace("\x00", "")[:2000],
                retry_after=outcome.retry_after,
                duration_seconds=None if outcome.cut_off else outcome.duration,
                # For the attempt history (the server keeps them only for failures).
                status=outcome.status,
                response_excerpt=outcome.response_excerpt,
            )
        )
        self._acks_pending.set()

    # -- acknowledging ----------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._acks_pending.wait()
            # Let the deliveries finishing now share the request: one POST of fifty acks
            # costs both sides little more than one of a single ack.
            await asyncio.sleep(ACK_COALESCE_SECONDS)
            # A lease call carrying acks answers within a round trip: the acks that came
            # meanwhile go with the next one.
            await self._no_acks_leasing.wait()
            self._acks_pending.clear()
            if not self._acks:
                continue
            if self._acks_on_lease and not self._acks_asked and self.pool.lease_now():
                # The lease loop takes them now (it is not in a long poll and has room).
                self._acks_asked = True
                continue
            if self._acks_asked:  # the lease loop has not started that call yet
                continue
            await self._flush_acks(once=True)

    def _keep_acks(self, acks: list[wire.Ack]) -> None:
        """Acks a call did not deliver: back in front, for the acker's next round."""
        if acks:
            self._acks = acks + self._acks
            self._acks_pending.set()

    def _acked(self, acks: list[wire.Ack], result: wire.AckResult, path: str) -> None:
        """The server has these acks: their leases need no more renewing."""
        metrics.ACKS.labels(path).inc(len(acks))
        self.pool.settled(int(a.id) for a in acks)
        refused = result.refused
        if refused:
            metrics.ACKS_REFUSED.inc(len(refused))
            log.info(
                "%d acks refused (their leases had expired, or the server had them already)",
                len(refused),
            )

    async def _flush_acks(self, deadline: float | None = None, *, once: bool = False) -> None:
        """Send what finished since the last call; on failure keep it and try again later
        (the pool's heartbeat renews these leases until the server has the acks). With a
        `deadline` (the drain's), give up then: the leases will expire and the messages
        come back. `once`: return after the first call that went through (the acker's
        round: what finished meanwhile may ride a lease call)."""
        attempts = 0
        while self._acks:
            batch, self._acks = self._acks[:1000], self._acks[1000:]
            try:
                answer = await self.client.post(
                    "/v1/acks",
                    wire.AckRequest(carrier=self.settings.carrier_id, acks=batch),
                    wire.AckResult,
                    idempotent=True,  # an ack sent twice is refused the second time
                    timeout=30.0 if deadline is None else max(deadline - time.monotonic(), 0.1),
                )
            except asyncio.CancelledError:
                self._acks = batch + self._acks  # the final flush sends them
                raise
            except Ap4kError as exc:
                self._acks = batch + self._acks
                attempts += 1
                pause = min(0.2 * 2**attempts, 5.0)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    log.warning("dropping %d acks: no server (%s)", len(self._acks), exc)
                    return
                await asyncio.sleep(pause)
                continue
            self._acked(batch, answer, "/v1/acks")
            if once:
                if self._acks:
                    self._acks_pending.set()
                return


def _lease_ref(delivery: Delivery) -> wire.LeaseRef:
    return wire.LeaseRef(id=str(delivery.id), attempt=delivery.attempt)
