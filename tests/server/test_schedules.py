"""Recurring schedules: one message per fire time across replicas, missed times fired once,
DST as croniter defines it, and 400s that store nothing.

The clock is driven: `Scheduler.run_once(now)` fires what is due at `now`, so three minutes
of ticks take a second. The servers' own scheduler loops are slowed to once an hour so that
only the driven calls fire.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ap4k.server import schedules
from ap4k_testkit import Api, StartServer, sink

BERLIN = ZoneInfo("Europe/Berlin")


def test_berlin_schedule_across_both_dst_changes() -> None:
    """The README's table: a time the spring-forward skips fires at 03:00; one the
    fall-back repeats fires twice; an hourly schedule keeps to the wall clock."""

    def times(cron: str, start: datetime, n: int) -> list[str]:
        out, when = [], start
        for _ in range(n):
            when = schedules.next_fire(cron, BERLIN, when)
            out.append(when.astimezone(BERLIN).isoformat())
        return out

    spring = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN)
    autumn = datetime(2026, 10, 24, 12, 0, tzinfo=BERLIN)
    assert times("30 2 * * *", spring, 2) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    assert times("30 2 * * *", autumn, 3) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-26T02:30:00+01:00",
    ]
    assert times("0 9 * * *", spring, 2) == [
        "2026-03-29T09:00:00+02:00",  # 07:00 UTC, the day after 08:00 UTC
        "2026-03-30T09:00:00+02:00",
    ]
    assert times("0 * * * *", datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN), 3) == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


def test_latest_fire_is_the_one_time_fired_for_many_missed() -> None:
    utc = ZoneInfo("UTC")
    due = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert schedules.latest_fire("* * * * *", utc, due, due) == due
    later = datetime(2026, 1, 1, 12, 59, 59, 900_000, tzinfo=UTC)
    assert schedules.latest_fire("* * * * *", utc, due, later) == datetime(
        2026, 1, 1, 12, 59, tzinfo=UTC
    )
    assert schedules.latest_fire("0 * * * *", utc, due, later) == due


async def test_every_minute_fires_once_per_tick_across_two_replicas(
    start_server: StartServer,
) -> None:
    first, api = await start_server(schedule_interval_seconds=3600)
    second, _ = await start_server(schedule_interval_seconds=3600)
    async with sink() as target:
        saved = await api.ok(
            "PUT",
            "/v1/schedules/heartbeat",
            {
                "queue": "ticks",
                "cron": "* * * * *",
                "message": {"target": target.url + "/tick", "body": {"ping": True}},
            },
        )
        tick = datetime.fromisoformat(saved["next_fire_at"])
        assert tick.second == 0 and tick > datetime.now(UTC)
        assert saved["last_message_id"] is None
        for n in range(3):
            now = tick + timedelta(minutes=n)
            # Both replicas, at the same moment and again later in the same minute.
            for at in (now, now, now + timedelta(seconds=30)):
                await asyncio.gather(first.scheduler.run_once(at), second.scheduler.run_once(at))
        await target.wait_for(lambda: len(target.received) >= 3, timeout=20)
        await asyncio.sleep(0.5)  # a fourth delivery would have come by now
        assert len(target.received) == 3
        assert len(target.delivered_ids()) == 3
        assert all(json.loads(r.body) == {"ping": True} for r in target.received)
        shown = await api.ok("GET", "/v1/schedules/heartbeat")
        assert datetime.fromisoformat(shown["next_fire_at"]) == tick + timedelta(minutes=3)
        assert datetime.fromisoformat(shown["last_fired_at"]) == tick + timedelta(minutes=2)
        last = await api.message(shown["last_message_id"])
        assert last["queue"] == "ticks"
        assert last["dedup_key"] == schedules.dedup_key("heartbeat", tick + timedelta(minutes=2))
        assert {r.message_id for r in target.received} >= {shown["last_message_id"]}

        # Down for ten minutes: the missed times fire once, for the latest of them.
        back = tick + timedelta(minutes=13, seconds=20)
        firings = await first.scheduler.run_once(back)
        assert [f.fire_at for f in firings] == [tick + timedelta(minutes=13)]
        assert await second.scheduler.run_once(back) == []
        await target.wait_for(lambda: len(target.received) == 4, timeout=20)
        shown = await api.ok("GET", "/v1/schedules/heartbeat")
        assert datetime.fromisoformat(shown["next_fire_at"]) == tick + timedelta(minutes=14)


async def test_berlin_schedule_fires_at_the_documented_times(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0, schedule_interval_seconds=3600)
    await api.ok(
        "PUT",
        "/v1/schedules/nightly",
        {
            "queue": "nightly",
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "message": {"target": "https://example.com/nightly"},
        },
    )
    # Driven to the eve of the spring-forward of 2027 (28 March).
    firings = await server.scheduler.run_once(datetime(2027, 3, 27, 12, 0, tzinfo=UTC))
    assert len(firings) == 1
    expected = ["2027-03-28T03:00:00+02:00", "2027-03-29T02:30:00+02:00"]
    for want in expected:
        shown = await api.ok("GET", "/v1/schedules/nightly")
        next_at = datetime.fromisoformat(shown["next_fire_at"])
        assert next_at.astimezone(BERLIN).isoformat() == want
        await server.scheduler.run_once(next_at)


async def test_paused_schedule_fires_nothing_and_shows_no_next_time(
    start_server: StartServer,
) -> None:
    server, api = await start_server(dispatchers=0, schedule_interval_seconds=3600)
    body = {"queue": "q", "cron": "* * * * *", "message": {"target": "https://example.com/"}}
    await api.ok("PUT", "/v1/schedules/s", body | {"paused": True})
    shown = await api.ok("GET", "/v1/schedules/s")
    assert shown["paused"] is True and shown["next_fire_at"] is None
    assert await server.scheduler.run_once(datetime.now(UTC) + timedelta(hours=1)) == []
    await api.ok("PUT", "/v1/schedules/s", body)
    listed = await api.ok("GET", "/v1/schedules")
    assert [s["name"] for s in listed["schedules"]] == ["s"]
    assert listed["schedules"][0]["next_fire_at"] is not None
    assert await api.ok("DELETE", "/v1/schedules/s") == {"deleted": "s"}
    status, error = await api.call("GET", "/v1/schedules/s")
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_refused_target_at_fire_time_is_shown_and_fires_nothing(
    start_server: StartServer,
) -> None:
    server, api = await start_server(dispatchers=0, schedule_interval_seconds=3600)
    await api.ok(
        "PUT",
        "/v1/schedules/s",
        {"queue": "fenced", "cron": "* * * * *", "message": {"target": "https://a.example/"}},
    )
    await api.settings("fenced", allowed_targets=["https://b.example/"])
    firings = await server.scheduler.run_once(datetime.now(UTC) + timedelta(minutes=2))
    assert len(firings) == 1 and firings[0].row is None
    shown = await api.ok("GET", "/v1/schedules/s")
    assert "allowed_targets" in shown["last_error"]
    assert shown["last_message_id"] is None


GOOD = {"queue": "q", "cron": "*/5 * * * *", "message": {"target": "https://example.com/"}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "* * * * * *"}, "cron"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "0 0 31 2 *"}, "cron"),
        ({"cron": ""}, "cron"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"queue": "no spaces"}, "queue"),
        ({"message": {}}, "message.target"),
        ({"message": {"target": "https://example.com/", "dedup_key": "k"}}, "message.dedup_key"),
        (
            {"message": {"target": "https://example.com/", "delay_seconds": 5}},
            "message.delay_seconds",
        ),
        ({"message": {"target": "http://169.254.169.254/"}}, "message.target"),
        (
            {"message": {"target": "https://example.com/", "callback": "http://169.254.169.254/"}},
            "message.callback",
        ),
        (
            {"message": {"target": "https://example.com/", "headers": {"Ap4k-X": "1"}}},
            "message.headers",
        ),
        ({"paused": "yes"}, "paused"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_bad_schedule_is_refused_with_its_field_and_nothing_stored(
    api: Api, change: dict[str, object], field: str
) -> None:
    status, error = await api.call("PUT", "/v1/schedules/bad", GOOD | change)
    assert status == 400, error
    assert error["error"]["field"] == field, error
    status, _ = await api.call("GET", "/v1/schedules/bad")
    assert status == 404


async def test_bad_schedule_name_is_refused(api: Api) -> None:
    status, error = await api.call("PUT", "/v1/schedules/-x", GOOD)
    assert status == 400 and error["error"]["field"] == "name"
    assert (await api.ok("GET", "/v1/schedules")) == {"schedules": []}

