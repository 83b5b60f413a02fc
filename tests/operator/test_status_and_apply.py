"""Pure helpers: conditions and the Ready summary, drift detection, backlog arithmetic."""

from __future__ import annotations

from ap4k.operator.apply import contains, drift_patch
from ap4k.operator.conditions import (
    Condition,
    parse_conditions,
    render_conditions,
    set_condition,
    summarize,
)
from ap4k.operator.queue_server import settings_match


def test_transition_time_moves_only_with_the_status() -> None:
    first = set_condition({}, Condition("ServerReachable", "False", "Unreachable", "down"), "t1")
    same = set_condition(first, Condition("ServerReachable", "False", "Unreachable", "still"), "t2")
    assert same["ServerReachable"].last_transition_time == "t1"
    assert same["ServerReachable"].message == "still"
    flipped = set_condition(same, Condition("ServerReachable", "True", "Answering", "up"), "t3")
    assert flipped["ServerReachable"].last_transition_time == "t3"


def test_ready_summarizes_with_the_first_failing_reason() -> None:
    conditions = {
        "Reconciled": Condition("Reconciled", "True", "Applied", ""),
        "ServerReachable": Condition("ServerReachable", "True", "Answering", ""),
        "QueuesConfigured": Condition("QueuesConfigured", "False", "Rejected", "queue 'a': no"),
        "MetricsAvailable": Condition("MetricsAvailable", "False", "MetricsUnavailable", ""),
    }
    ready = summarize(conditions, generation=4, now="t")["Ready"]
    assert (ready.status, ready.reason, ready.message) == ("False", "Rejected", "queue 'a': no")
    assert ready.observed_generation == 4
    conditions["QueuesConfigured"] = Condition("QueuesConfigured", "True", "Applied", "")
    # A failing metric does not make the queue unready.
    assert summarize(conditions, 4, "t")["Ready"].status == "True"
    unknown = summarize({}, None, "t")["Ready"]
    assert (unknown.status, unknown.reason) == ("False", "Reconciling")


def test_conditions_round_trip_in_a_stable_order() -> None:
    conditions = summarize(
        {"Reconciled": Condition("Reconciled", "True", "Applied", "ok", "t0", 2)}, 2, "t1"
    )
    rendered = render_conditions(conditions)
    assert [c["type"] for c in rendered] == ["Ready", "Reconciled"]
    assert rendered[1] == {"type": "Reconciled", "status": "True", "reason": "Applied",
                           "message": "ok", "lastTransitionTime": "t0", "observedGeneration": 2}
    assert parse_conditions(rendered) == conditions


def test_contains_ignores_what_the_api_server_adds() -> None:
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [
        {"name": "c", "args": ["a"], "ports": [{"containerPort": 1}]}]}}}}
    actual = {"metadata": {"uid": "x"}, "spec": {"replicas": 2, "strategy": {}, "template": {
        "spec": {"dnsPolicy": "ClusterFirst", "containers": [
            {"name": "c", "args": ["a"], "terminationMessagePath": "/dev/termination-log",
             "ports": [{"containerPort": 1, "protocol": "TCP"}]}]}}}}
    assert contains(actual, desired)
    actual["spec"]["template"]["spec"]["containers"][0]["args"] = ["a", "b"]  # edited
    assert not contains(actual, desired)
    assert not contains({"spec": {"replicas": 3}}, {"spec": {"replicas": 2}})
    assert not contains({"spec": {}}, {"spec": {"replicas": 2}})


def test_drift_patch_restores_labels_owners_and_spec() -> None:
    desired = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "s", "namespace": "n", "labels": {"a": "b"},
                            "ownerReferences": [{"uid": "u"}]},
               "spec": {"ports": []}}
    assert drift_patch(desired) == {
        "metadata": {"labels": {"a": "b"}, "ownerReferences": [{"uid": "u"}]},
        "spec": {"ports": []},
    }


def test_settings_match_compares_only_the_declared_values() -> None:
    have = {"max_attempts": 5, "rate_limit_per_second": 2.5000000001, "paused": False,
            "allowed_targets": ["http://a/"], "signing_secret_set": True}
    assert settings_match(have, {"max_attempts": 5, "rate_limit_per_second": 2.5})
    assert not settings_match(have, {"paused": True})
    assert not settings_match(have, {"allowed_targets": ["http://b/"]})
    assert not settings_match(have, {"base_url": "http://x/"})
