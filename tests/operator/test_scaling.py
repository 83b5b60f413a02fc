"""The carrier-scaling policy: open-loop decisions on chosen observations, and the closed loop
(the simulator of `ap4k bench autoscale` driving `decide` over simulated hours).

The closed-loop figures are deterministic (simulated time, a fixed seed): they are properties
of the policy, not timings of this machine, so the issue's bounds are asserted on them.
"""

from __future__ import annotations

import dataclasses

import pytest

from ap4k.bench import autoscale as bench
from ap4k.operator.autoscale import loads_from_server
from ap4k.operator.scaling import (
    Observation,
    QueueLoad,
    ScalerState,
    ScalingPolicy,
    arrival_rate,
    decide,
)

POLICY = ScalingPolicy(
    min_replicas=0, max_replicas=100, concurrency=10, target_delay_seconds=2,
    scale_down_stabilization_seconds=300, initial_rate_per_carrier=200,
    initial_startup_seconds=10,
)


def load(**fields: object) -> QueueLoad:
    values: dict[str, object] = {"name": "jobs", "available": 0, "running": 0, **fields}
    return QueueLoad(**values)  # type: ignore[arg-type]


def observe(*queues: QueueLoad, ready: int = 0) -> Observation:
    return Observation(queues=queues, carriers_ready=ready)


# --- open loop --------------------------------------------------------------------------------


def test_the_first_waiting_message_asks_for_one_carrier() -> None:
    decision = decide(POLICY, ScalerState(0), observe(load(available=1)), now=0)
    assert (decision.replicas, decision.reason) == (1, "ScaledUp")
    assert decide(POLICY, ScalerState(0), observe(load()), now=0).replicas == 0


def test_demand_is_the_arrival_rate_over_the_per_carrier_rate() -> None:
    steady = load(available=0, running=95, arrival_rate=1900.0, completion_rate=1900.0)
    decision = decide(POLICY, ScalerState(8), observe(steady, ready=8), now=0)
    assert decision.replicas == 10  # ceil(1900 / 200)
    assert decision.demand is not None
    assert decision.demand.steady == pytest.approx(9.5)
    # The message names the parts and the SLO.
    for part in ("1900 msg/s", "200 msg/s per carrier", "SLO 2s", "scaled up from 8 to 10"):
        assert part in decision.message


def test_a_backlog_asks_for_what_drains_it_under_the_slo_not_for_max_replicas() -> None:
    # 40,000 waiting, 1,000 msg/s arriving, nothing running yet: within one start-up (10 s)
    # 50,000 will wait; 2,000 of them (2 s of arrivals) may; the rest drain over 10 s.
    burst = load(available=40_000, arrival_rate=1000.0)
    decision = decide(POLICY, ScalerState(0), observe(burst), now=0)
    assert decision.demand is not None
    assert decision.demand.backlog == pytest.approx((50_000 - 2_000) / (200 * 10))
    assert decision.replicas == 5 + 24  # steady 5 + backlog 24, far below maxReplicas 100


def test_starting_carriers_count_as_coming_capacity() -> None:
    burst = observe(load(available=40_000, arrival_rate=1000.0))
    first = decide(POLICY, ScalerState(0), burst, now=0)
    # The next look finds the same backlog, the carriers still starting: no more asked for.
    again = decide(POLICY, first.state, burst, now=1)
    assert again.replicas == first.replicas
    assert again.reason in ("Stable", "StabilizingScaleDown")


def test_a_paused_queue_asks_for_min_replicas() -> None:
    paused = load(available=100_000, arrival_rate=500.0, paused=True)
    for minimum in (0, 2):
        policy = dataclasses.replace(POLICY, min_replicas=minimum)
        decision = decide(policy, ScalerState(minimum), observe(paused), now=0)
        assert decision.replicas == minimum
        assert decision.demand is not None and decision.demand.capped == ("jobs",)


def test_a_rate_limited_queue_gets_no_more_carriers_than_its_limit_can_use() -> None:
    limited = load(available=500_000, arrival_rate=5000.0, rate_limit_per_second=1000.0)
    decision = decide(POLICY, ScalerState(0), observe(limited), now=0)
    assert decision.replicas == 5  # 1,000 msg/s ÷ 200 msg/s per carrier
    assert decision.demand is not None and "capped by the settings of jobs" in decision.message


def test_max_concurrency_caps_the_carriers_a_queue_asks_for() -> None:
    limited = load(available=500_000, arrival_rate=5000.0, max_concurrency=30)
    decision = decide(POLICY, ScalerState(0), observe(limited), now=0)
    assert decision.replicas == 3  # 30 in flight ÷ concurrency 10


def test_every_queue_counts_and_the_caps_are_per_queue() -> None:
    queues = (
        load(name="a", available=0, arrival_rate=1000.0),
        load(name="b", available=0, arrival_rate=5000.0, rate_limit_per_second=400.0),
        load(name="c", available=50_000, paused=True),
    )
    # With 7 carriers serving, nothing waits: the demand is the rates' alone.
    decision = decide(POLICY, ScalerState(7), observe(*queues, ready=7), now=0)
    assert decision.demand is not None
    assert decision.demand.carriers == pytest.approx(5 + 2)  # a: 1,000 ÷ 200; b: 400 ÷ 200
    assert decision.demand.capped == ("b", "c")  # c: paused
    # From zero, a's first 10 s of arrivals wait for the start-up: drained under the SLO.
    decision = decide(POLICY, ScalerState(0), observe(*queues), now=0)
    assert decision.replicas == 5 + 2 + 4


def test_scale_down_waits_for_the_window_and_follows_the_held_rate() -> None:
    busy = observe(load(running=100, arrival_rate=2000.0, completion_rate=2000.0), ready=10)
    state = decide(POLICY, ScalerState(10), busy, now=0).state
    lower = observe(load(running=50, arrival_rate=1000.0, completion_rate=1000.0), ready=10)
    held = decide(POLICY, state, lower, now=100)
    assert (held.replicas, held.reason) == (10, "StabilizingScaleDown")
    assert held.recommended == 5
    later = decide(POLICY, held.state, lower, now=301)
    assert (later.replicas, later.reason) == (6, "ScaledDown")  # 5 + the 2 % room, rounded up


def test_a_load_that_stops_lets_its_carriers_go_keeping_one_warm() -> None:
    busy = observe(load(running=100, arrival_rate=2000.0, completion_rate=2000.0), ready=10)
    state = decide(POLICY, ScalerState(10), busy, now=0).state
    quiet = observe(load(), ready=10)
    decision = decide(POLICY, state, quiet, now=15)
    assert (decision.replicas, decision.reason) == (1, "ScaledDown")
    assert decide(POLICY, decision.state, observe(load(), ready=1), now=316).replicas == 0


def test_a_restart_keeps_the_carriers_a_varying_load_may_need() -> None:
    # The window is seeded with the current 7: a load of 2.5 carriers' worth may peak at 7.
    slow = observe(load(running=25, arrival_rate=500.0, completion_rate=500.0), ready=7)
    decision = decide(POLICY, ScalerState(7), slow, now=0)
    assert (decision.replicas, decision.reason) == (7, "StabilizingScaleDown")
    # A load that is not there at all keeps one warm carrier.
    assert decide(POLICY, ScalerState(7), observe(load(), ready=7), now=0).replicas == 1


def test_no_observation_leaves_the_carriers_alone_unless_the_bounds_moved() -> None:
    decision = decide(POLICY, ScalerState(4), None, now=0)
    assert (decision.replicas, decision.reason) == (4, "MetricsUnavailable")
    narrow = dataclasses.replace(POLICY, max_replicas=2)
    assert decide(narrow, ScalerState(4), None, now=0).replicas == 2


def test_the_per_carrier_rate_is_learned_by_littles_law() -> None:
    policy = dataclasses.replace(POLICY, initial_rate_per_carrier=None)
    # Deliveries take 0.25 s: 40 in flight at 160 msg/s; a carrier holds 10, so 40 msg/s each.
    steady = observe(load(running=40, arrival_rate=160.0, completion_rate=160.0), ready=4)
    state = ScalerState(4)
    for now in range(0, 150, 15):
        state = decide(policy, state, steady, now=now).state
    assert state.rate_per_carrier == pytest.approx(40.0)


def test_arrivals_follow_by_conservation() -> None:
    assert arrival_rate(completed=300, active_before=1000, active_now=1600, seconds=15) == 60
    assert arrival_rate(completed=0, active_before=500, active_now=100, seconds=10) == 0


def test_every_queue_the_server_lists_is_observed_with_its_settings() -> None:
    queues = [
        {"name": "declared", "depth": {"available": 5, "running": 2},
         "oldest_available_age_seconds": 1.5, "settings": {"rate_limit_per_second": 50}},
        {"name": "undeclared", "depth": {"available": 3, "scheduled": 4},
         "oldest_available_age_seconds": 0.5, "settings": {"paused": True}},
    ]
    first, counts = loads_from_server(queues, {"declared": 30}, 15.0, None, now=100.0)
    assert [q.name for q in first] == ["declared", "undeclared"]
    assert first[0].rate_limit_per_second == 50 and first[1].paused
    assert first[0].completion_rate == 2.0 and first[0].arrival_rate == 2.0
    assert counts.active == {"declared": 7, "undeclared": 7}
    queues[0]["depth"] = {"available": 20, "running": 2}
    second, _ = loads_from_server(queues, {"declared": 30}, 15.0, counts, now=115.0)
    assert second[0].arrival_rate == pytest.approx((30 + 15) / 15)


# --- closed loop --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=bench.SCENARIOS, ids=["200-10s", "50-30s"])
def closed_loop(request: pytest.FixtureRequest) -> tuple[bench.Scenario, dict[str, tuple[
        bench.Result, bench.Result]]]:
    scenario: bench.Scenario = request.param
    return scenario, {ours.trace.split()[0]: (ours, keda)
                      for ours, keda in bench.compare(scenario, seed=1)}


def test_closed_loop_ramp_and_diurnal(closed_loop: tuple[bench.Scenario, dict[str, tuple[
        bench.Result, bench.Result]]]) -> None:
    _, results = closed_loop
    for trace in ("ramp", "diurnal"):
        ours, _ = results[trace]
        assert ours.age_p99 <= 2.0, ours
        assert ours.cost_vs_perfect <= 1.3, ours
        assert ours.direction_changes_per_hour <= 2, ours


def test_closed_loop_noisy(closed_loop: tuple[bench.Scenario, dict[str, tuple[
        bench.Result, bench.Result]]]) -> None:
    ours, _ = closed_loop[1]["noisy"]
    assert ours.age_p99 <= 2.0, ours
    assert ours.cost_vs_perfect <= 1.6, ours
    assert ours.direction_changes_per_hour <= 4, ours


def test_closed_loop_bursts_against_keda(closed_loop: tuple[bench.Scenario, dict[str, tuple[
        bench.Result, bench.Result]]]) -> None:
    scenario, results = closed_loop
    ours, keda = results["bursts"]
    assert ours.age_p99 <= (15.0 if scenario.startup_seconds <= 10 else 45.0), ours
    assert ours.replica_seconds <= 0.3 * keda.replica_seconds, (ours, keda)
    assert ours.age_p99 < keda.age_p99


def test_closed_loop_from_idle_the_first_carrier_is_asked_for_at_once(
    closed_loop: tuple[bench.Scenario, dict[str, tuple[bench.Result, bench.Result]]],
) -> None:
    scenario, results = closed_loop
    for ours, keda in results.values():
        assert ours.idle_to_serving_max is not None
        # The zero check plus the pods' start-up (and the step of the simulation).
        assert ours.idle_to_serving_max <= scenario.startup_seconds + 1.0, ours
        assert keda.idle_to_serving_max is not None
        assert ours.idle_to_serving_max < keda.idle_to_serving_max
