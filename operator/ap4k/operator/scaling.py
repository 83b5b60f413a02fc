"""The carrier-scaling policy: `decide(policy, state, observation, now)`, a pure function.

A carrier's capacity is a rate, so demand is counted in carriers' worth of work, per queue the
carriers serve (they lease from every queue of the server, declared or not):

- **steady** = max(arrival rate ÷ per-carrier rate, messages in flight ÷ concurrency). By
  Little's law in-flight = arrival rate × delivery time, so the two agree when carriers keep
  up; the in-flight part holds the carriers busy with slow deliveries the rate would miss.
- **backlog** = what it takes to bring the oldest waiting message under the SLO
  (`targetDelaySeconds`, T): project the waiting messages to the moment a carrier asked for
  now would be ready (start-up time s, learned), counting the carriers already requested
  (ready or still starting) as draining; the messages younger than T may wait, the rest are
  drained over max(T, s) seconds.
- **caps** from the queue's own settings: a paused queue asks for nothing; a rate-limited one
  for at most `rateLimitPerSecond` ÷ per-carrier rate; a concurrency-limited one for at most
  `maxConcurrency` ÷ `concurrency`: carriers past these would only wait on the limit.

The carrier count is ceil(Σ min(steady + backlog, caps)), clamped to [minReplicas, maxReplicas]:

- **scale-up** is at once, to what the demand asks for (starting pods are already counted, so
  a burst does not pile pods on pods, and the backlog term asks for what drains it, not for
  maxReplicas);
- **scale-down** follows the highest *steady* demand of the last
  `scaleDownStabilizationSeconds` (a rate, smoothed over a poll, not a backlog count that
  swings with every delivery) plus the backlog still waiting: a noisy load keeps the capacity
  of its recent peaks, and a drained burst lets the carriers go once its rate is out of the
  window;
- **from zero**: any waiting message of a queue that is not paused asks for one carrier;
- **learning**: the per-carrier rate is concurrency ÷ the mean delivery time, measured by
  Little's law (in flight ÷ completion rate), and no more than carriers were seen to deliver
  while messages waited; the start-up time is what the carrier pods took to become ready.
  Both start from the spec's estimates and move by exponential smoothing;
- the window starts out holding the current count (as the HPA seeds it), so an operator
  restart never scales down at once; without an observation nothing changes.
"""

from __future__ import annotations

import dataclasses
import math

# How fast the learned rate and start-up follow new measurements (exponential smoothing).
LEARNING_RATE = 0.3
# Before any delivery was measured, a carrier is assumed to take this long per delivery:
# slow on purpose, as too many carriers for a while cost less than a missed SLO.
ASSUMED_DELIVERY_SECONDS = 1.0
# The window holds its peak for a load that varies, not for one that has stopped: at most this
# many times the current steady demand (and one warm carrier for a queue gone quiet).
HOLD_FACTOR = 3.0
# A scale-down leaves this much room over the held demand (the HPA's tolerance, one way only):
# a demand hovering at a carrier boundary does not flap across it.
SCALE_DOWN_TOLERANCE = 0.02
# Carriers asked for are waited for this many start-up times before a scale-down may drop them.
STARTING_FOR = 2.0
# The in-flight count must hold within this ratio across an interval for Little's law to apply.
STEADY_RATIO = 1.25
WARM_CARRIERS = 1.0


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    concurrency: int  # deliveries in flight per carrier
    target_delay_seconds: float  # the SLO: how long a message may wait for a carrier
    scale_down_stabilization_seconds: float
    initial_rate_per_carrier: float | None = None  # msg/s; None: concurrency ÷ 1 s
    initial_startup_seconds: float = 10.0

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    @property
    def assumed_rate_per_carrier(self) -> float:
        if self.initial_rate_per_carrier is not None:
            return self.initial_rate_per_carrier
        return self.concurrency / ASSUMED_DELIVERY_SECONDS


@dataclasses.dataclass(frozen=True)
class QueueLoad:
    """One queue the carriers serve, as observed at one instant."""

    name: str
    available: int  # waiting for a carrier
    running: int  # leased: in flight
    oldest_available_age: float = 0.0
    arrival_rate: float | None = None  # msg/s over the last interval; None: not measured yet
    completion_rate: float | None = None  # msg/s delivered (any outcome) over the same interval
    paused: bool = False
    rate_limit_per_second: float | None = None
    max_concurrency: int | None = None


@dataclasses.dataclass(frozen=True)
class Observation:
    queues: tuple[QueueLoad, ...]
    carriers_ready: int  # carrier pods ready (serving); the requested count is in the state
    carrier_startup_seconds: float | None = None  # measured from pod readiness, if any


@dataclasses.dataclass(frozen=True)
class WindowSample:
    at: float  # seconds, on the same clock as `now`
    steady: float  # the steady demand, in carriers


@dataclasses.dataclass(frozen=True)
class ScalerState:
    replicas: int  # the count currently set on the carrier Deployment
    window: tuple[WindowSample, ...] = ()  # steady demand inside the window, oldest first
    last_scale_time: float | None = None
    last_scale_up_time: float | None = None
    rate_per_carrier: float | None = None  # learned, msg/s
    startup_seconds: float | None = None  # learned
    last_ready: int | None = None  # carriers ready at the previous observation
    last_running: int | None = None  # messages in flight at the previous observation


@dataclasses.dataclass(frozen=True)
class Demand:
    """The carriers an observation asks for, and why (for events and status)."""

    carriers: float  # the sum over queues, capped, before rounding and clamping
    arrival_rate: float  # msg/s over the served queues
    rate_per_carrier: float
    startup_seconds: float
    steady: float  # carriers for the arrival rate / the in-flight work
    backlog: float  # carriers to bring the oldest waiting message under the SLO
    draining: float  # carriers to drain what waits now (without the coming capacity)
    waiting: int  # messages waiting over the served queues
    in_flight: int
    oldest_available_age: float
    capped: tuple[str, ...]  # queues whose demand their settings cut

    def describe(self, target_delay: float) -> str:
        capped = f"; capped by the settings of {', '.join(self.capped)}" if self.capped else ""
        return (
            f"demand {self.carriers:.2f} carrier(s) = {self.steady:.2f} for "
            f"{self.arrival_rate:.4g} msg/s ({self.in_flight} in flight) at "
            f"{self.rate_per_carrier:.4g} msg/s per carrier + {self.backlog:.2f} for "
            f"{self.waiting} waiting (oldest {self.oldest_available_age:.1f}s, SLO "
            f"{target_delay:g}s, start-up {self.startup_seconds:.0f}s){capped}"
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    state: ScalerState  # the state to keep for the next observation
    previous: int  # the count before this decision
    replicas: int  # the count to set on the carrier Deployment
    recommended: int | None  # what this observation alone asks for (None: no observation)
    # ScaledUp, ScaledDown, StabilizingScaleDown, Stable, Bounds or MetricsUnavailable.
    reason: str
    message: str
    demand: Demand | None = None

    @property
    def changed(self) -> bool:
        return self.replicas != self.previous


def _smooth(old: float | None, sample: float) -> float:
    return sample if old is None else old + LEARNING_RATE * (sample - old)


def _learn(policy: ScalingPolicy, state: ScalerState, obs: Observation) -> ScalerState:
    running = sum(q.running for q in obs.queues)
    completion = sum(q.completion_rate or 0.0 for q in obs.queues)
    rate, before = state.rate_per_carrier, state.last_running or 0
    steady = (
        obs.carriers_ready == state.last_ready and before > 0 and running > 0 and completion > 0
        and max(before, running) <= STEADY_RATIO * min(before, running)
    )
    if steady:
        # Little's law over an interval where the in-flight count held: mean delivery time =
        # in flight ÷ completion rate, and a carrier holds `concurrency` deliveries at once
        # (a carrier short of CPU shows as slower deliveries).
        rate = _smooth(rate, policy.concurrency * completion * 2 / (before + running))
    startup = state.startup_seconds
    if obs.carrier_startup_seconds is not None:
        startup = _smooth(startup, obs.carrier_startup_seconds)
    return dataclasses.replace(
        state, rate_per_carrier=rate, startup_seconds=startup, last_ready=obs.carriers_ready,
        last_running=running,
    )


def demand_of(policy: ScalingPolicy, state: ScalerState, obs: Observation) -> Demand:
    """What `obs` asks for, given the carriers `state` has requested."""
    mu = state.rate_per_carrier or policy.assumed_rate_per_carrier
    startup = state.startup_seconds or policy.initial_startup_seconds
    slo = policy.target_delay_seconds
    horizon = max(slo, startup)
    served = [q for q in obs.queues if not q.paused]
    total_arrival = sum(q.arrival_rate or 0.0 for q in served)
    coming = state.replicas * mu  # ready and starting carriers: capacity that is coming
    caps: dict[str, float] = {}
    steadies: dict[str, float] = {}
    capped: list[str] = []
    for queue in obs.queues:
        if queue.paused:
            if queue.available or queue.running:
                capped.append(queue.name)
            continue
        cap = math.inf
        if queue.rate_limit_per_second is not None:
            cap = queue.rate_limit_per_second / mu
        if queue.max_concurrency is not None:
            cap = min(cap, queue.max_concurrency / policy.concurrency)
        caps[queue.name] = cap
        steady = max((queue.arrival_rate or 0.0) / mu, queue.running / policy.concurrency)
        steadies[queue.name] = min(steady, cap)
    total_steady = sum(steadies.values())
    steady_sum = backlog_sum = drain_sum = carriers = 0.0
    for queue in served:
        arrival, steady, cap = queue.arrival_rate or 0.0, steadies[queue.name], caps[queue.name]
        # This queue's share of the coming capacity: what its steady demand takes of it.
        share = steady / total_steady if total_steady > 0 else 1.0 / len(served)
        projected = max(0.0, queue.available + (arrival - coming * share) * startup)
        # The messages younger than the SLO may wait; the rest drain over the horizon.
        excess = max(0.0, projected - arrival * slo)
        backlog = min(excess / (mu * horizon), max(0.0, cap - steady))
        drain = max(0.0, queue.available - arrival * slo) / (mu * horizon)
        if backlog < excess / (mu * horizon) or steady < max(
            arrival / mu, queue.running / policy.concurrency
        ):
            capped.append(queue.name)
        steady_sum += steady
        backlog_sum += backlog
        drain_sum += min(drain, max(0.0, cap - steady))
        carriers += steady + backlog
    waiting = sum(q.available for q in served)
    if waiting and carriers < 1:
        # Any waiting message asks for a carrier, however small its rate.
        backlog_sum += 1 - carriers
        carriers = 1.0
    return Demand(
        carriers=carriers, arrival_rate=total_arrival, rate_per_carrier=mu,
        startup_seconds=startup, steady=steady_sum, backlog=backlog_sum, draining=drain_sum,
        waiting=waiting, in_flight=sum(q.running for q in served),
        oldest_available_age=max((q.oldest_available_age for q in served if q.available),
                                 default=0.0),
        capped=tuple(q.name for q in obs.queues if q.name in capped),
    )


def _carriers(value: float) -> int:
    # A hair of floating-point noise must not cost a whole carrier.
    return math.ceil(value - 1e-9)


def _decision(
    state: ScalerState, previous: int, replicas: int, recommended: int | None, now: float,
    reason: str, message: str, demand: Demand | None = None,
) -> Decision:
    scaled = replicas != previous
    new_state = dataclasses.replace(
        state, replicas=replicas, last_scale_time=now if scaled else state.last_scale_time,
        last_scale_up_time=now if replicas > previous else state.last_scale_up_time,
    )
    return Decision(new_state, previous, replicas, recommended, reason, message, demand)


def decide(
    policy: ScalingPolicy, state: ScalerState, observation: Observation | None, now: float
) -> Decision:
    """The next carrier count, given what was observed at `now` (None if unavailable)."""
    previous = state.replicas
    bounds = f"[{policy.min_replicas}, {policy.max_replicas}]"
    if observation is None:
        # Keep the carriers where they are, unless the spec's bounds moved past them.
        replicas = policy.clamp(previous)
        if replicas != previous:
            return _decision(state, previous, replicas, None, now, "Bounds",
                             f"no observation; moved {previous} carrier(s) into {bounds}")
        return _decision(state, previous, replicas, None, now, "MetricsUnavailable",
                         f"no observation; keeping {replicas} carrier(s)")

    state = _learn(policy, state, observation)
    demand = demand_of(policy, state, observation)
    why = demand.describe(policy.target_delay_seconds)
    recommended = policy.clamp(_carriers(demand.carriers))

    horizon = now - policy.scale_down_stabilization_seconds
    # Seeded with the current count: no scale-down for a whole window after a restart.
    seed = (WindowSample(now, float(previous)),)
    window = (*(s for s in state.window or seed if s.at >= horizon),
              WindowSample(now, demand.steady))
    state = dataclasses.replace(state, window=window)

    if recommended > previous:
        return _decision(state, previous, recommended, recommended, now, "ScaledUp",
                         f"{why}; scaled up from {previous} to {recommended}", demand)
    if policy.clamp(previous) != previous:  # the spec's bounds moved past the current count
        replicas = policy.clamp(previous)
        return _decision(state, previous, replicas, recommended, now, "Bounds",
                         f"{why}; moved {previous} carrier(s) into {bounds}", demand)
    # Not while carriers are starting: they were asked for and are not measured yet (for at
    # most twice the start-up time: pods that cannot be scheduled must not pin the count).
    starting = (
        observation.carriers_ready < previous and state.last_scale_up_time is not None
        and now - state.last_scale_up_time < STARTING_FOR * demand.startup_seconds
    )
    # Down only to what the window's highest steady demand and the waiting backlog allow.
    held = min(max(s.steady for s in window),
               max(HOLD_FACTOR * demand.steady, WARM_CARRIERS))
    if held > WARM_CARRIERS:
        held *= 1 + SCALE_DOWN_TOLERANCE
    stabilized = policy.clamp(_carriers(held + demand.draining))
    stabilized = max(stabilized, recommended)
    if stabilized < previous and not starting:
        return _decision(
            state, previous, stabilized, recommended, now, "ScaledDown",
            f"{why}; the last {policy.scale_down_stabilization_seconds:g}s peaked at "
            f"{held:.2f}; scaled down from {previous} to {stabilized}", demand,
        )
    if recommended < previous and starting:
        return _decision(
            state, previous, previous, recommended, now, "StabilizingScaleDown",
            f"{why}; keeping {previous} carrier(s) until the starting ones are ready", demand,
        )
    if recommended < previous:
        return _decision(
            state, previous, previous, recommended, now, "StabilizingScaleDown",
            f"{why}; keeping {previous} carrier(s) while the last "
            f"{policy.scale_down_stabilization_seconds:g}s peaked at {held:.2f}", demand,
        )
    return _decision(state, previous, previous, recommended, now, "Stable",
                     f"{why}; keeping {previous} carrier(s)", demand)


def arrival_rate(
    completed: float, active_before: float, active_now: float, seconds: float
) -> float:
    """Messages per second that arrived over `seconds`, by conservation: what finished plus
    what the active states (available, running, scheduled, retryable) gained."""
    if seconds <= 0:
        return 0.0
    return max(0.0, (completed + active_now - active_before) / seconds)

