"""`ap4k bench autoscale`: carrier scaling replayed on load traces, in simulated time.

A closed loop: a simulated queue (arrivals, a FIFO backlog, carrier pods that take a start-up
time to become ready and then deliver a fixed rate each) driven by a controller that looks at
it on its own schedule and sets the carrier count. Two controllers:

- `Ap4kController` runs the operator's real policy (`ap4k.operator.scaling.decide`) on the
  spec's defaults, observing exactly what `autoscale.observe` builds from the server's answers
  (depths, the oldest waiting message, completions over the interval, carriers ready, start-up
  measured from pod readiness), every `pollIntervalSeconds`, and every
  `autoscale.ZERO_CHECK_SECONDS` while no carrier is requested;
- `KedaHpaController`: a model of KEDA's PostgreSQL/Prometheus scaler on a backlog query,
  feeding a Kubernetes HorizontalPodAutoscaler, both with their documented defaults (each line
  cites the behaviour it stands for).

Everything is deterministic for a seed; no wall-clock time is involved, so the closed-loop
tests may assert on its figures.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from ap4k.operator import scaling
from ap4k.operator.autoscale import (
    MAX_WINDOW_SECONDS,
    MIN_WINDOW_SECONDS,
    ZERO_CHECK_SECONDS,
    loads_from_server,
)
from ap4k.operator.spec import parse_spec
from ap4k.operator.state import CarrierPods, Counts, policy_of

STEP_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    rate_per_carrier: float  # msg/s one ready carrier delivers
    startup_seconds: float  # from a pod's creation to its readiness
    concurrency: int = 10  # the spec's default: in flight per carrier
    max_replicas: int = 100

    @property
    def delivery_seconds(self) -> float:
        return self.concurrency / self.rate_per_carrier


SCENARIOS = (
    Scenario("200 msg/s per carrier, 10 s start-up", 200.0, 10.0),
    Scenario("50 msg/s per carrier, 30 s start-up", 50.0, 30.0),
)


@dataclasses.dataclass(frozen=True)
class Trace:
    name: str
    means: tuple[float, ...]  # expected arrivals per step
    counts: tuple[float, ...]  # the arrivals replayed (Poisson noise on the means)

    @property
    def duration(self) -> float:
        return len(self.counts) * STEP_SECONDS


def _trace(name: str, hours: float, rate: Callable[[float], float], rng: random.Random) -> Trace:
    steps = int(hours * 3600 / STEP_SECONDS)
    means = tuple(rate(i * STEP_SECONDS) * STEP_SECONDS for i in range(steps))
    return Trace(name, means, tuple(_poisson(rng, m) for m in means))


def _poisson(rng: random.Random, mean: float) -> float:
    if mean <= 0:
        return 0.0
    if mean > 30:  # the normal approximation, plenty for per-step counts this large
        return float(max(0, round(rng.gauss(mean, math.sqrt(mean)))))
    # Knuth's method for small means.
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return float(k)
        k += 1


def traces(seed: int = 1, hours: float = 2.0) -> list[Trace]:
    """The replayed loads (diurnal runs a whole simulated day whatever `hours` says)."""
    rng = random.Random(seed)
    period = 600.0

    def bursts(t: float) -> float:  # 5,000 msg/s for 60 s every 10 min
        return 5000.0 if (t % period) >= period - 60 else 0.0

    half = hours * 1800

    def ramp(t: float) -> float:  # 0 → 2,000 → 0 msg/s
        return 2000.0 * (t / half if t < half else max(0.0, 2 - t / half))

    def diurnal(t: float) -> float:  # 100–1,500 msg/s over a day
        return 800.0 - 700.0 * math.cos(2 * math.pi * t / 86400)

    levels = [rng.uniform(400, 1200) for _ in range(int(hours * 360) + 1)]

    def noisy(t: float) -> float:  # 800 msg/s ± 50 %, a new level every 10 s
        return levels[int(t // 10)]

    out = [
        _trace("bursts 5,000 msg/s for 60 s every 10 min", hours, bursts, rng),
        _trace("ramp 0 → 2,000 → 0 msg/s", hours, ramp, rng),
        _trace("diurnal 100–1,500 msg/s", 24.0, diurnal, rng),
        _trace("noisy 800 msg/s ± 50 %, every 10 s", hours, noisy, rng),
    ]
    # Sparse: one message every 2–5 minutes.
    steps = int(hours * 3600 / STEP_SECONDS)
    sparse = [0.0] * steps
    t = rng.uniform(120, 300)
    while t < hours * 3600:
        sparse[int(t / STEP_SECONDS)] += 1
        t += rng.uniform(120, 300)
    out.append(Trace("sparse: one message every 2–5 min", tuple(sparse), tuple(sparse)))
    return out


# --- the simulated queue and carriers ---------------------------------------------------------


class World:
    """One queue served by carrier pods; fluid within a step, FIFO across steps."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.now = 0.0
        self.pods: list[float] = []  # ready_at of every requested pod, sorted
        self.waiting: collections.deque[list[float]] = collections.deque()  # [arrived, count]
        self.available = 0.0
        self.running = 0.0
        self.completed = 0.0
        # Figures.
        self.waits: dict[int, float] = collections.defaultdict(float)  # 0.1 s bins → messages
        self.max_backlog = 0.0
        self.replica_seconds = 0.0
        self.changes: list[int] = []  # +1 / -1 per scale event
        self.idle_since: float | None = None
        self.idle_to_serving: list[float] = []

    @property
    def requested(self) -> int:
        return len(self.pods)

    def ready(self) -> int:
        return bisect.bisect_right(self.pods, self.now)

    def oldest_available_age(self) -> float:
        return self.now - self.waiting[0][0] if self.waiting else 0.0

    def scale(self, replicas: int) -> None:
        if replicas == self.requested:
            return
        self.changes.append(1 if replicas > self.requested else -1)
        if replicas > self.requested:
            ready_at = self.now + self.scenario.startup_seconds
            self.pods.extend([ready_at] * (replicas - self.requested))
        else:
            del self.pods[replicas:]  # sorted by ready_at: the starting pods go first
        self.pods.sort()

    def step(self, arrivals: float) -> None:
        dt = STEP_SECONDS
        before = self.ready()
        if arrivals:
            if self.idle_since is None and before == 0:
                self.idle_since = self.now
            self.waiting.append([self.now + dt / 2, arrivals])
            self.available += arrivals
        self.now += dt
        ready = self.ready()
        if ready and self.idle_since is not None:
            self.idle_to_serving.append(self.now - self.idle_since)
            self.idle_since = None
        rate = ready * self.scenario.rate_per_carrier
        capacity = rate * dt
        served = 0.0
        start = self.now - dt
        while capacity > 1e-9 and self.waiting:
            chunk = self.waiting[0]
            take = min(chunk[1], capacity)
            done_at = start + (served + take / 2) / rate
            self.waits[int(max(0.0, done_at - chunk[0]) * 10)] += take
            served += take
            capacity -= take
            chunk[1] -= take
            if chunk[1] <= 1e-9:
                self.waiting.popleft()
        self.available = max(0.0, self.available - served)
        self.completed += served
        # Little's law: in flight = delivery rate × delivery time.
        self.running = served / dt * self.scenario.delivery_seconds
        self.max_backlog = max(self.max_backlog, self.available)
        self.replica_seconds += self.requested * dt


class Controller(Protocol):
    def due(self, now: float) -> bool: ...

    def act(self, world: World) -> int: ...


# --- ap4k -------------------------------------------------------------------------------------


def default_policy(scenario: Scenario) -> tuple[scaling.ScalingPolicy, float]:
    """The policy and poll interval an AsyncQueue with the CRD's defaults gets (max 100)."""
    spec = parse_spec("bench", "bench", {
        "database": {"secretName": "db"},
        "carriers": {"maxReplicas": scenario.max_replicas, "concurrency": scenario.concurrency},
    })
    return policy_of(spec), float(spec.carriers.poll_interval_seconds)


class Ap4kController:
    """The operator's loop on the simulated queue: what `autoscale.autoscale` does, with the
    server's answers (`GET /v1/queues`, `GET /v1/throughput`) and the carrier Deployment's
    ready count built from the simulation."""

    def __init__(self, scenario: Scenario) -> None:
        self.policy, self.poll = default_policy(scenario)
        self.state = scaling.ScalerState(replicas=0)
        self.carriers = CarrierPods()
        self.counts: Counts | None = None
        self.next_at = 0.0
        self.completed_at: list[tuple[float, float]] = [(0.0, 0.0)]  # (time, completed)

    def due(self, now: float) -> bool:
        return now >= self.next_at - 1e-9

    def act(self, world: World) -> int:
        now = world.now
        self.carriers.observed(world.ready(), now)
        window = now - self.counts.at if self.counts is not None else self.poll
        window = min(MAX_WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, window))
        queue = {
            "name": "bench",
            "depth": {"available": round(world.available), "running": round(world.running)},
            "oldest_available_age_seconds": world.oldest_available_age(),
            "settings": {"paused": False},
        }
        completed = {"bench": round(world.completed - self._completed_by(now - window))}
        self.completed_at.append((now, world.completed))
        loads, self.counts = loads_from_server([queue], completed, window, self.counts, now)
        observation = scaling.Observation(
            queues=loads, carriers_ready=self.carriers.ready,
            carrier_startup_seconds=self.carriers.take_startup_sample(),
        )
        decision = scaling.decide(self.policy, self.state, observation, now)
        self.state = decision.state
        if decision.changed:
            self.carriers.requested(decision.replicas, now)
        self.next_at = now + (ZERO_CHECK_SECONDS if decision.replicas == 0 else self.poll)
        return decision.replicas

    def _completed_by(self, at: float) -> float:
        """The completed count at time `at` (the server counts over a window)."""
        times = [t for t, _ in self.completed_at]
        index = bisect.bisect_right(times, at + 1e-9) - 1
        return self.completed_at[max(0, index)][1]


# --- KEDA + HPA -------------------------------------------------------------------------------


class KedaHpaController:
    """KEDA (ScaledObject on a PostgreSQL or Prometheus backlog query) and the HPA it creates."""

    # ScaledObject `pollingInterval` default 30 s: how often KEDA checks activation (0 ↔ 1).
    POLLING_INTERVAL = 30.0
    # ScaledObject `cooldownPeriod` default 300 s: inactive this long after the last active
    # check before KEDA scales 1 → 0.
    COOLDOWN_PERIOD = 300.0
    # kube-controller-manager `--horizontal-pod-autoscaler-sync-period` default 15 s.
    HPA_SYNC = 15.0
    # `--horizontal-pod-autoscaler-tolerance` default 0.1: no change within ±10 % of target.
    TOLERANCE = 0.1
    # HPA `behavior.scaleDown.stabilizationWindowSeconds` default 300: the highest
    # recommendation of the last 5 minutes.
    DOWN_WINDOW = 300.0

    def __init__(self, scenario: Scenario, target: float = 100.0) -> None:
        # `targetQueryValue` (metricType AverageValue): backlog per replica, as ap4k's old
        # `targetBacklogPerReplica` default.
        self.target = target
        self.max_replicas = scenario.max_replicas  # maxReplicaCount
        self.replicas = 0
        self.next_poll = 0.0
        self.next_sync = 0.0
        self.last_active: float | None = None
        self.recommendations: list[tuple[float, int]] = []

    def due(self, now: float) -> bool:
        return now >= min(self.next_poll, self.next_sync) - 1e-9

    def act(self, world: World) -> int:
        now = world.now
        # The scaler's query: waiting + in flight, as the README's backlog query.
        metric = world.available + world.running
        if now >= self.next_poll - 1e-9:
            self.next_poll = now + self.POLLING_INTERVAL
            # `activationThreshold` default 0: active when the metric is above it.
            if metric > 0:
                self.last_active = now
                if self.replicas == 0:
                    # KEDA itself scales 0 → 1 (the HPA cannot scale from zero) ...
                    self.replicas = 1
                    self.recommendations.clear()
            elif self.replicas > 0 and (
                self.last_active is None or now - self.last_active >= self.COOLDOWN_PERIOD
            ):
                # ... and 1 → 0 after cooldownPeriod without activity.
                self.replicas = 0
        if now >= self.next_sync - 1e-9:
            self.next_sync = now + self.HPA_SYNC
            if self.replicas > 0:  # at 0 the HPA reports ScalingActive=False and does nothing
                self.replicas = self._hpa(now, metric)
        return self.replicas

    def _hpa(self, now: float, metric: float) -> int:
        current = self.replicas
        # AverageValue: usage ratio = metric ÷ (target × current replicas).
        ratio = metric / (self.target * current)
        desired = current if abs(ratio - 1) <= self.TOLERANCE else math.ceil(metric / self.target)
        # minReplicas of the HPA is max(minReplicaCount, 1); maxReplicas = maxReplicaCount.
        desired = max(1, min(self.max_replicas, desired))
        self.recommendations = [
            (at, r) for at, r in self.recommendations if at > now - self.DOWN_WINDOW
        ]
        self.recommendations.append((now, desired))
        if desired < current:
            # Scale-down stabilization: the highest recommendation in the window; then the
            # default scaleDown policy (100 % per 15 s) lets it drop that far at once.
            desired = min(current, max(r for _, r in self.recommendations))
        elif desired > current:
            # The default scaleUp policies: 100 % or 4 pods per 15 s, whichever is more
            # (selectPolicy Max), no stabilization window.
            desired = min(desired, max(2 * current, current + 4), self.max_replicas)
        return desired


# --- running and reporting --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    trace: str
    controller: str
    age_p50: float
    age_p99: float
    max_backlog: float
    replica_seconds: float
    perfect_replica_seconds: float
    scale_events: int
    direction_changes_per_hour: float
    idle_to_serving_max: float | None
    hours: float

    @property
    def cost_vs_perfect(self) -> float:
        return self.replica_seconds / self.perfect_replica_seconds


def _percentile(bins: dict[int, float], fraction: float) -> float:
    total = sum(bins.values())
    if total <= 0:
        return 0.0
    seen = 0.0
    for key in sorted(bins):
        seen += bins[key]
        if seen >= fraction * total:
            return (key + 1) / 10
    return (max(bins) + 1) / 10


def perfect_foresight(trace: Trace, scenario: Scenario) -> float:
    """Replica-seconds of carriers that are ready exactly when the arrivals need them."""
    per_step = scenario.rate_per_carrier * STEP_SECONDS
    return sum(math.ceil(m / per_step - 1e-9) for m in trace.means) * STEP_SECONDS


def run(trace: Trace, scenario: Scenario, controller: Controller, name: str) -> Result:
    world = World(scenario)
    for arrivals in trace.counts:
        if controller.due(world.now):
            world.scale(controller.act(world))
        world.step(arrivals)
    flips = sum(1 for a, b in zip(world.changes, world.changes[1:], strict=False) if a != b)
    hours = trace.duration / 3600
    return Result(
        trace=trace.name, controller=name,
        age_p50=_percentile(world.waits, 0.5), age_p99=_percentile(world.waits, 0.99),
        max_backlog=world.max_backlog, replica_seconds=world.replica_seconds,
        perfect_replica_seconds=perfect_foresight(trace, scenario),
        scale_events=len(world.changes), direction_changes_per_hour=flips / hours,
        idle_to_serving_max=max(world.idle_to_serving) if world.idle_to_serving else None,
        hours=hours,
    )


def compare(scenario: Scenario, seed: int = 1, hours: float = 2.0) -> list[tuple[Result, Result]]:
    """(ap4k, KEDA + HPA) per trace."""
    return [
        (run(trace, scenario, Ap4kController(scenario), "ap4k"),
         run(trace, scenario, KedaHpaController(scenario), "KEDA+HPA"))
        for trace in traces(seed, hours)
    ]


def render(scenario: Scenario, pairs: Sequence[tuple[Result, Result]]) -> str:
    head = (
        "| trace | scaler | age p50 s | age p99 s | max backlog | replica-s | × perfect | "
        "× KEDA | scale events | direction changes/h | idle → serving s |"
    )
    lines = [f"{scenario.name}:", "", head, "|" + "---|" * 11]
    for ours, keda in pairs:
        for result in (ours, keda):
            idle = result.idle_to_serving_max
            lines.append(
                f"| {result.trace} | {result.controller} | {result.age_p50:.1f} | "
                f"{result.age_p99:.1f} | {result.max_backlog:,.0f} | "
                f"{result.replica_seconds:,.0f} | {result.cost_vs_perfect:.2f} | "
                f"{result.replica_seconds / keda.replica_seconds:.0%} | {result.scale_events} | "
                f"{result.direction_changes_per_hour:.1f} | "
                f"{'-' if idle is None else f'{idle:.1f}'} |"
            )
    return "\n".join(lines)


def main(seed: int = 1, hours: float = 2.0) -> str:
    return "\n\n".join(render(s, compare(s, seed, hours)) for s in SCENARIOS)
