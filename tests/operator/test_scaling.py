"""The carrier-scaling decision over time series: bursts, ramps, noise, zero, failures."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable

import pytest

from ap4k.operator.scaling import ScalerState, ScalingPolicy, decide

POLICY = ScalingPolicy(
    min_replicas=0, max_replicas=10, target_backlog_per_replica=100,
    scale_down_stabilization_seconds=60,
)


def simulate(
    series: Iterable[tuple[float, float | None]], policy: ScalingPolicy = POLICY, start: int = 0
) -> list[tuple[float, int, str]]:
    """(time, replicas after the decision, reason) for each sample."""
    state = ScalerState(replicas=start)
    out = []
    for now, backlog in series:
        decision = decide(policy, state, backlog, now)
        state = decision.state
        assert decision.replicas == state.replicas
        out.append((now, decision.replicas, decision.reason))
    return out


def every(seconds: float, values: Iterable[float | None], t0: float = 1000.0):
    return [(t0 + i * seconds, value) for i, value in enumerate(values)]


def test_burst_scales_up_at_once_and_down_after_the_window() -> None:
    series = every(10, [0, 0, 750, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    replicas = [r for _, r, _ in simulate(series)]
    # Up to ceil(750/100) = 8 on the very sample that saw the burst.
    assert replicas[:3] == [0, 0, 8]
    # Held while the burst is inside the 60 s window (samples at +10 … +60 s after it) …
    assert replicas[3:9] == [8] * 6
    # … and dropped as soon as it leaves the window.
    assert replicas[9:] == [0, 0, 0]


def test_scale_up_is_clamped_to_max_replicas() -> None:
    result = simulate(every(10, [0, 5000, 100_000]))
    assert [r for _, r, _ in result] == [0, 10, 10]
    assert result[1][2] == "ScaledUp"


def test_ramp_up_follows_demand_immediately() -> None:
    backlog = [i * 50 for i in range(21)]  # 0 … 1000
    result = simulate(every(5, backlog))
    assert [r for _, r, _ in result] == [min(10, math.ceil(b / 100)) for b in backlog]


def test_ramp_down_follows_the_peak_of_the_window_with_a_margin() -> None:
    backlog = [1000 - i * 50 for i in range(21)]  # 1000 … 0, one sample every 10 s
    samples = every(10, backlog)
    result = simulate(samples, start=10)
    previous = 10
    for index, (now, replicas, _) in enumerate(result):
        peak = max(b for t, b in samples[: index + 1] if t >= now - 60)
        # Never below what the window's peak needs with 10 % to spare, never up on a decline.
        assert replicas == min(previous, math.ceil(peak / 90))
        previous = replicas
    # The last sample (0) still has 350 from 60 s before in its window: ceil(350 / 90) = 4.
    assert [r for _, r, _ in result][-4:] == [5, 5, 4, 4]


@pytest.mark.parametrize("seed", range(10))
def test_noise_around_a_level_does_not_flap(seed: int) -> None:
    rng = random.Random(seed)
    # 2.5 carriers' worth of backlog ± 0.6, sampled every 15 s for an hour, 5-minute window.
    policy = ScalingPolicy(0, 10, 100, 300)
    series = every(15, [250 + rng.uniform(-60, 60) for _ in range(240)])
    replicas = [r for _, r, _ in simulate(series, policy)]
    changes = [(a, b) for a, b in itertools.pairwise(replicas) if a != b]
    # It settles on the noise's peak and stays there: no step ever goes back down.
    assert changes in ([], [(3, 4)])
    assert replicas[-1] == 4


def test_noisy_decline_scales_down_stepwise_without_bouncing() -> None:
    rng = random.Random(11)
    policy = ScalingPolicy(1, 10, 100, 120)
    series = every(15, [max(0.0, 900 - 4 * i + rng.uniform(-80, 80)) for i in range(240)])
    replicas = [r for _, r, _ in simulate(series, policy, start=10)]
    # Down only: never an up after a down.
    assert all(b <= a for a, b in itertools.pairwise(replicas))
    assert replicas[-1] == 1


def test_scale_to_zero_when_idle_and_back_on_the_first_message() -> None:
    result = simulate(every(30, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]), start=3)
    replicas = [r for _, r, _ in result]
    # Seeded with the current 3: zero once the seed has left the 60 s window.
    assert replicas[:4] == [3, 3, 3, 0]
    assert replicas[4] == 1  # the first message brings one carrier back at once
    assert result[4][2] == "ScaledUp"
    assert replicas[-1] == 0


def test_min_replicas_is_a_floor_even_when_idle() -> None:
    policy = ScalingPolicy(2, 10, 100, 0)
    assert [r for _, r, _ in simulate(every(10, [0, 0, 0]), policy, start=2)] == [2, 2, 2]


def test_zero_window_scales_down_on_the_next_sample() -> None:
    policy = ScalingPolicy(0, 10, 100, 0)
    replicas = [r for _, r, _ in simulate(every(10, [500, 100, 0]), policy)]
    # 100 is one carrier's worth, but not with the 10 % margin: two until the backlog is gone.
    assert replicas == [5, 2, 0]


def test_restart_never_scales_down_at_once() -> None:
    # A fresh state (operator restart) adopts the Deployment's 6 and seeds the window with it.
    result = simulate(every(20, [0, 0, 0, 0, 0]), start=6)
    assert [r for _, r, _ in result] == [6, 6, 6, 6, 0]
    assert result[0][2] == "StabilizingScaleDown"


def test_failing_metric_leaves_replicas_alone() -> None:
    result = simulate(every(10, [400, None, None, 0, None, 0]))
    assert [r for _, r, _ in result] == [4, 4, 4, 4, 4, 4]
    assert result[1][2] == "MetricsUnavailable"
    # A failure does not count as low demand: after it, the window still holds the 400.
    long_outage = simulate(every(30, [400, *[None] * 10, 0]))
    assert long_outage[-2][1] == 4 and long_outage[-1][1] == 0


def test_changed_bounds_move_replicas_in() -> None:
    state = ScalerState(replicas=8)
    lowered = decide(ScalingPolicy(0, 5, 100, 60), state, 50, 0.0)
    assert (lowered.replicas, lowered.reason) == (5, "Bounds")
    raised = decide(ScalingPolicy(3, 10, 100, 60), ScalerState(replicas=1), None, 0.0)
    assert (raised.replicas, raised.reason) == (3, "Bounds")
    assert raised.changed and raised.state.last_scale_time == 0.0


def test_decision_reports_recommendation_and_last_scale_time() -> None:
    first = decide(POLICY, ScalerState(replicas=0), 250, 10.0)
    assert (first.replicas, first.recommended, first.changed) == (3, 3, True)
    assert first.state.last_scale_time == 10.0
    steady = decide(POLICY, first.state, 120, 20.0)
    assert (steady.replicas, steady.recommended, steady.changed) == (3, 2, False)
    assert steady.reason == "StabilizingScaleDown"
    assert steady.state.last_scale_time == 10.0
