"""Logging set-up shared by every component: plain text for people, JSON for containers.

Structured fields go in `extra={...}`: the JSON format writes each as a key of its own, the
text format appends them as `key=value` after the message.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")

# What every LogRecord has: anything else on a record came in through `extra`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class LogSettingsError(ValueError):
    """A log level or format nobody knows: one line for the user, no traceback."""


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if fields and record.name != "aiohttp.access":  # its line already says it all
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return orjson.dumps(text).decode() if (" " in text or not text or '"' in text) else text


def check(level: str, fmt: str) -> None:
    """Refuse an unknown level or format before anything starts."""
    if str(level).lower() not in LEVELS:
        raise LogSettingsError(f"--log-level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise LogSettingsError(f"--log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")


class OneLineWarnings(logging.Filter):
    """Put a library's expected-failure warning on one line: asyncpg's pool logs a whole
    traceback each time it cannot reconnect while PostgreSQL restarts, which is an outage
    to report, not a bug to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno < logging.ERROR:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class Throttled:
    """A warning that may recur many times a second (a refusal per request during an
    outage): logged at most once per `seconds`, with how often it happened meanwhile."""

    def __init__(self, logger: logging.Logger, seconds: float = 5.0) -> None:
        self._logger = logger
        self._seconds = seconds
        self._count = 0
        self._logged_at = -seconds

    def warning(self, message: str, *args: object) -> None:
        """Log `message % args` followed by " (N times in the last S s)"."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= self._seconds:
            self._logger.warning(
                message + " (%d times since the last report)", *args, self._count
            )
            self._count = 0
            self._logged_at = now


def configure(level: str = "info", fmt: str = "text", access_log: bool = False) -> None:
    check(level, fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("asyncpg.pool").addFilter(OneLineWarnings())


def run_async(main: object) -> None:
    """Run a coroutine on uvloop where available (it doubles aiohttp's throughput)."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux platforms
        asyncio.run(main)  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)  # type: ignore[arg-type]
