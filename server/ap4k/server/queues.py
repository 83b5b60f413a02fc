"""Queue settings as the request path needs them: cached, created on first use.

Settings change rarely and are read on every enqueue and lease, so each process keeps them in
memory for a few seconds; a change made through any replica is announced with NOTIFY and
drops the cached copy everywhere at once. A read that was under way when a change dropped the
cache is used once but not kept: its answer may predate the change, and kept it would hide
the change for CACHE_SECONDS (a rotated signing secret, a pause, a new allow-list).
"""

from __future__ import annotations

import time

from ap4k.core.targets import check_target, resolve_target
from ap4k.server.store import QueueSettings, Store

CACHE_SECONDS = 5.0
UNPAUSED_CACHE_SECONDS = 0.5


class QueueDirectory:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: dict[str, tuple[float, QueueSettings]] = {}
        # (queue, target) -> (absolute URL, explicitly allowed); valid while settings are.
        self._targets: dict[tuple[str, str], tuple[str, bool]] = {}
        self._unpaused: tuple[float, list[str]] | None = None
        # Counts invalidations: a read that saw it move is not cached.
        self._generation = 0

    async def get(self, name: str, *, create: bool = True) -> QueueSettings | None:
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        generation = self._generation
        settings = await self._store.get_queue(name)
        if settings is None:
            if not create:
                return None
            await self._store.ensure_queues([name])
            settings = await self._store.get_queue(name)
            assert settings is not None
        if generation == self._generation:
            self.put(settings)
        return settings

    def cached(self, name: str) -> QueueSettings | None:
        """The settings in hand, if fresh (no database round trip)."""
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return None

    async def unpaused_names(self) -> list[str]:
        """Names of the queues not paused, at most a fraction of a second old: every
        carrier's lease call looks at them, and they change only with settings."""
        if self._unpaused is None or self._unpaused[0] <= time.monotonic():
            generation = self._generation
            names = await self._store.unpaused_queue_names()
            if generation != self._generation:
                return names
            self._unpaused = (time.monotonic() + UNPAUSED_CACHE_SECONDS, names)
        return self._unpaused[1]

    def put(self, settings: QueueSettings) -> None:
        previous = self._cache.get(settings.name)
        if previous is not None and previous[1] != settings:
            self._targets.clear()
        self._cache[settings.name] = (time.monotonic() + CACHE_SECONDS, settings)

    def invalidate(self, name: str | None = None) -> None:
        self._generation += 1
        self._unpaused = None
        if name is None:
            self._cache.clear()
        else:
            self._cache.pop(name, None)
        self._targets.clear()

    def target(self, settings: QueueSettings, target: str) -> tuple[str, bool]:
        """(absolute URL, explicitly allowed) for a target; raises TargetError if refused."""
        key = (settings.name, target)
        hit = self._targets.get(key)
        if hit is None:
            url = resolve_target(target, settings.base_url)
            hit = (url, check_target(url, settings.allowed_targets))
            if len(self._targets) > 50_000:
                self._targets.clear()
            self._targets[key] = hit
        return hit

    def callback(self, settings: QueueSettings, target: str | None) -> str | None:
        """The absolute URL of a message's callback, checked like a target (TargetError)."""
        return None if target is None else self.target(settings, target)[0]
