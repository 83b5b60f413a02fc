"""The Python client of ap4k: `Client` (sync) and `AsyncClient` (asyncio).

    from ap4k.client import AsyncClient
    async with AsyncClient(["http://ap4k-a:7438", "http://ap4k-b:7438"], token=...) as ap4k:
        await ap4k.send("mail", "http://mailer/send", {"to": "a@example.com"}, dedup_key="m-1")

Names are imported lazily so that `ap4k --help` (which imports `ap4k.client.cli`) does not
pay for aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ap4k.client.async_client import AsyncClient
    from ap4k.client.errors import (
        Ap4kError,
        ApiError,
        BadRequest,
        Conflict,
        Forbidden,
        NotFound,
        OutcomeUnknown,
        PayloadTooLarge,
        ServerUnavailable,
        Unauthorized,
    )
    from ap4k.client.models import (
        Cancelled,
        DeadLetters,
        Enqueued,
        Message,
        MessageOptions,
        NewMessage,
        Queue,
        QueueDepth,
        QueueSettings,
        QueueSettingsView,
    )
    from ap4k.client.sync_client import Client
    from ap4k.core.retry import RetryPolicy

_EXPORTS = {
    "AsyncClient": "ap4k.client.async_client",
    "Client": "ap4k.client.sync_client",
    "RetryPolicy": "ap4k.core.retry",
    **dict.fromkeys(
        [
            "Ap4kError",
            "ApiError",
            "BadRequest",
            "Conflict",
            "Forbidden",
            "NotFound",
            "OutcomeUnknown",
            "PayloadTooLarge",
            "ServerUnavailable",
            "Unauthorized",
        ],
        "ap4k.client.errors",
    ),
    **dict.fromkeys(
        [
            "Cancelled",
            "DeadLetters",
            "Enqueued",
            "Message",
            "MessageOptions",
            "NewMessage",
            "Queue",
            "QueueDepth",
            "QueueSettings",
            "QueueSettingsView",
        ],
        "ap4k.client.models",
    ),
}

__all__ = [
    "Ap4kError",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Cancelled",
    "Client",
    "Conflict",
    "DeadLetters",
    "Enqueued",
    "Forbidden",
    "Message",
    "MessageOptions",
    "NewMessage",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "Queue",
    "QueueDepth",
    "QueueSettings",
    "QueueSettingsView",
    "RetryPolicy",
    "ServerUnavailable",
    "Unauthorized",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ap4k.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
