"""The carrier-scaling decision: a pure function of (policy, state, sample, now).

It follows the Kubernetes HPA's algorithm for a single metric:

- the raw recommendation is `ceil(backlog / targetBacklogPerReplica)`, clamped to
  `[minReplicas, maxReplicas]`; an empty backlog recommends 0, so with `minReplicas: 0` the
  carriers scale to zero when idle, and the first message recommends 1 again;
- scale-up is immediate: a recommendation above the current count is applied at once;
- scale-down is stabilized: the count only drops to what the highest backlog seen during the
  last `scaleDownStabilizationSeconds` asks for (HPA's `stabilizationWindowSeconds`), and with a
  10 % margin (HPA's tolerance): a count of N is kept while any sample in the window exceeded
  90 % of what N-1 carriers absorb. Scale-up and scale-down thresholds thus differ, and a noisy
  signal settles on its recent peak instead of flapping between two counts;
- the window starts out holding the current count's full capacity (as the HPA seeds it with the
  current count), so an operator restart never causes a sudden scale-down;
- without a sample (the metric source failed) nothing changes.
"""

from __future__ import annotations

import dataclasses
import math

# Scale down only when the window's peak fits the smaller count with this much room to spare.
SCALE_DOWN_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    target_backlog_per_replica: int
    scale_down_stabilization_seconds: float

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    def recommend(self, backlog: float) -> int:
        """The replicas a backlog asks for, before stabilization."""
        wanted = math.ceil(max(backlog, 0.0) / self.target_backlog_per_replica)
        return self.clamp(wanted)

    def floor_for(self, peak_backlog: float) -> int:
        """The fewest replicas a window whose peak is `peak_backlog` allows scaling down to."""
        room = self.target_backlog_per_replica * (1 - SCALE_DOWN_TOLERANCE)
        return self.clamp(math.ceil(max(peak_backlog, 0.0) / room))


@dataclasses.dataclass(frozen=True)
class Sample:
    at: float  # seconds, on the same clock as `now`
    backlog: float


@dataclasses.dataclass(frozen=True)
class ScalerState:
    replicas: int  # the count currently set on the carrier Deployment
    # Backlog samples inside the stabilization window, oldest first.
    window: tuple[Sample, ...] = ()
    last_scale_time: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    state: ScalerState  # the state to keep for the next sample
    previous: int  # the count before this decision
    replicas: int  # the count to set on the carrier Deployment
    recommended: int | None  # the raw recommendation of this sample (None: no sample)
    # ScaledUp, ScaledDown, StabilizingScaleDown, Stable, Bounds or MetricsUnavailable.
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return self.replicas != self.previous


def _decision(
    state: ScalerState, previous: int, replicas: int, recommended: int | None, now: float,
    reason: str, message: str,
) -> Decision:
    scaled = replicas != previous
    new_state = dataclasses.replace(
        state, replicas=replicas, last_scale_time=now if scaled else state.last_scale_time
    )
    return Decision(new_state, previous, replicas, recommended, reason, message)


def decide(
    policy: ScalingPolicy, state: ScalerState, backlog: float | None, now: float
) -> Decision:
    """The next carrier count, given the backlog sampled at `now` (None if unavailable)."""
    previous = state.replicas
    bounds = f"[{policy.min_replicas}, {policy.max_replicas}]"
    if backlog is None:
        # Keep the carriers where they are, unless the spec's bounds moved past them.
        replicas = policy.clamp(previous)
        if replicas != previous:
            return _decision(
                state, previous, replicas, None, now, "Bounds",
                f"no backlog sample; moved {previous} carrier(s) into {bounds}",
            )
        return _decision(
            state, previous, replicas, None, now, "MetricsUnavailable",
            f"no backlog sample; keeping {replicas} carrier(s)",
        )

    recommended = policy.recommend(backlog)
    horizon = now - policy.scale_down_stabilization_seconds
    # Seeded with the current count at full capacity: no scale-down for a whole window.
    seed = (Sample(now, float(previous * policy.target_backlog_per_replica)),)
    window = (*(s for s in state.window or seed if s.at >= horizon), Sample(now, backlog))
    state = dataclasses.replace(state, window=window)

    if recommended > previous:
        return _decision(
            state, previous, recommended, recommended, now, "ScaledUp",
            f"backlog {backlog:g} asks for {recommended} carrier(s); scaled up from {previous}",
        )
    if policy.clamp(previous) != previous:  # the spec's bounds moved past the current count
        replicas = policy.clamp(previous)
        return _decision(
            state, previous, replicas, recommended, now, "Bounds",
            f"moved {previous} carrier(s) into {bounds}",
        )
    # Down only to what the highest backlog of the window allows.
    stabilized = policy.floor_for(max(s.backlog for s in window))
    if stabilized < previous:
        return _decision(
            state, previous, stabilized, recommended, now, "ScaledDown",
            f"backlog {backlog:g}: at most {stabilized} carrier(s) asked for during the last "
            f"{policy.scale_down_stabilization_seconds:g}s; scaled down from {previous}",
        )
    if recommended < previous:
        return _decision(
            state, previous, previous, recommended, now, "StabilizingScaleDown",
            f"backlog {backlog:g} asks for {recommended} carrier(s); keeping {previous} until "
            f"the demand stays lower for {policy.scale_down_stabilization_seconds:g}s",
        )
    return _decision(
        state, previous, previous, recommended, now, "Stable",
        f"backlog {backlog:g} asks for {recommended} carrier(s)",
    )
