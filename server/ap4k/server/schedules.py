"""Recurring schedules: what a cron and a time zone mean, and the service that fires them.

croniter reads the 5-field cron and walks its times in the schedule's IANA time zone
(zoneinfo), DST included as croniter defines it: a time that a spring-forward skips fires
at the first minute after the gap (02:30 on the night clocks go 02:00 → 03:00 fires at
03:00), and a time that a fall-back repeats fires twice (02:30 CEST, then 02:30 CET).

Every replica runs the scheduler. A firing locks the schedule's row (FOR UPDATE SKIP
LOCKED) and enqueues its message with a dedup key naming the schedule and the fire time, so
two replicas that race fire it once, and a replica that fires again after a crash finds the
message it made before. A schedule that was due several times while no server ran fires
once, for the latest of those times, then carries on from now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import CroniterBadDateError, CroniterError, croniter

from ap4k.core import wire
from ap4k.core.targets import TargetError
from ap4k.server.errors import invalid
from ap4k.server.queues import QueueDirectory
from ap4k.server.rows import DueScheduleRow
from ap4k.server.store import EnqueueRow, ScheduleFiring, Store
from ap4k.server.validation import encode_body

log = logging.getLogger("ap4k.schedules")

CRON_FIELDS = 5
# A schedule that cannot be read (its time zone gone from the OS) is tried again this late.
RETRY_BROKEN = timedelta(minutes=5)


def time_zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError when there is none of that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}: expected an IANA name") from None


def next_fire(cron: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first time `cron` names after `after`, in UTC."""
    when: datetime = croniter(cron, after.astimezone(zone)).get_next(datetime)
    return when.astimezone(UTC)


def latest_fire(cron: str, zone: ZoneInfo, due: datetime, now: datetime) -> datetime:
    """The latest time `cron` names from `due` (itself one, and not after `now`) to `now`:
    the one time a schedule fires for however many it missed."""
    # Times are whole minutes: from the second after now's, the previous time is the
    # latest one at or before now (croniter's get_prev from a time itself excludes it).
    start = now.replace(microsecond=0) + timedelta(seconds=1)
    when: datetime = croniter(cron, start.astimezone(zone)).get_prev(datetime)
    return max(when.astimezone(UTC), due)


def check(schedule: wire.ScheduleIn, now: datetime) -> datetime | None:
    """Check the cron and time zone (400s naming the field); the next fire time, or None
    while the schedule is paused."""
    fields = schedule.cron.split()
    if len(fields) != CRON_FIELDS:
        raise invalid(
            "cron",
            f"cron must have 5 fields (minute hour day-of-month month day-of-week), "
            f"not {len(fields)}",
        )
    if not croniter.is_valid(schedule.cron):
        raise invalid("cron", f"{schedule.cron!r} is not a valid cron expression")
    try:
        zone = time_zone(schedule.timezone)
    except ValueError as exc:
        raise invalid("timezone", str(exc)) from None
    try:
        upcoming = next_fire(schedule.cron, zone, now)
    except (CroniterBadDateError, ValueError, OverflowError):
        raise invalid("cron", f"{schedule.cron!r} names no time that will come") from None
    return None if schedule.paused else upcoming


def dedup_key(name: str, fire_at: datetime) -> str:
    """The dedup key of a firing: the schedule and the fire time (UTC, to the minute)."""
    return f"schedule:{name}:{fire_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%MZ')}"


def message_of(template: wire.ScheduledMessage, key: str) -> wire.MessageIn:
    """The message one firing enqueues: the template, with the firing's dedup key."""
    return wire.MessageIn(**msgspec.structs.asdict(template), dedup_key=key)


@dataclass
class Scheduler:
    """Fires due schedules; `run_once` is called every `interval` seconds by Maintenance
    (and by tests, with the time they want it to be)."""

    store: Store
    directory: QueueDirectory
    on_committed: Callable[[Sequence[EnqueueRow], list[tuple[int, str, bool]]], None]
    interval: float = 1.0

    async def run_once(self, now: datetime | None = None) -> list[ScheduleFiring]:
        """Fire every schedule due at `now` (default: the clock's time) once; return the
        firings, each with the message it enqueued (or the error why none)."""
        now = now or datetime.now(UTC)
        firings = await self.store.fire_schedules(now, self._plan)
        if firings:
            rows = [f.row for f in firings if f.row is not None]
            results = [f.result for f in firings if f.result is not None]
            self.on_committed(rows, results)
        return firings

    async def _plan(self, due: list[DueScheduleRow], now: datetime) -> list[ScheduleFiring]:
        out = []
        for schedule in due:
            name, cron = schedule.name, schedule.cron
            try:
                zone = time_zone(schedule.timezone)
                fire_at = latest_fire(cron, zone, schedule.next_fire_at, now)
                firing = ScheduleFiring(name, fire_at, next_fire(cron, zone, now))
            except (ValueError, CroniterError) as exc:
                # Checked when saved; a time zone can still vanish from the OS's database.
                firing = ScheduleFiring(name, now, now + RETRY_BROKEN, error=str(exc))
            else:
                try:
                    firing.row = await self._row(schedule, dedup_key(name, fire_at))
                except TargetError as exc:
                    # The queue's allow-list changed since the schedule was saved.
                    firing.error = f"refused: {exc}"
            if firing.error is not None:
                log.warning("schedule %s did not fire: %s", name, firing.error)
            out.append(firing)
        return out

    async def _row(self, schedule: DueScheduleRow, key: str) -> EnqueueRow:
        settings = await self.directory.get(schedule.queue)
        assert settings is not None
        message = message_of(schedule.template(), key)
        url, _ = self.directory.target(settings, message.url)
        return EnqueueRow(
            queue=settings.name,
            message=message,
            target=url,
            body=encode_body(message),
            callback=self.directory.callback(settings, message.callback),
            failure_callback=self.directory.callback(settings, message.failure_callback),
        )
