"""Which targets a message may name: URL shape, queue allow-lists, and the SSRF guard.

In-cluster targets are private addresses by nature, so private ranges are allowed. What is
refused is link-local space, where cloud metadata services live (169.254.169.254, fe80::/10,
fd00:ec2::254), unless a queue's allow-list names that host explicitly. The check runs at
enqueue time on the URL and again at delivery time on every address a name resolves to, so
a DNS name cannot smuggle a metadata address past it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

BLOCKED_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
BLOCKED_HOSTNAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog"})


class TargetError(ValueError):
    """A target that is malformed or not allowed; the message says which and why."""


def is_blocked_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in BLOCKED_NETWORKS)


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def resolve_target(target: str, base_url: str | None) -> str:
    """The absolute http(s) URL a message's `target` names (a path joins the base URL)."""
    if target.startswith(("http://", "https://")):
        url = target
    elif base_url:
        url = urljoin(base_url if base_url.endswith("/") else base_url + "/", target.lstrip("/"))
    else:
        raise TargetError(
            "target must be an absolute http(s) URL, or a path on a queue that has a base_url"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError("target must be an absolute http(s) URL with a host")
    if any(c in url for c in "\r\n\t "):
        raise TargetError("target must not contain whitespace or control characters")
    try:
        _ = parts.port
    except ValueError as exc:
        raise TargetError(f"target has an invalid port: {exc}") from None
    return url


def check_target(url: str, allowed_targets: Sequence[str]) -> bool:
    """Refuse `url` unless the queue allows it; return True when it is explicitly allowed.

    An empty allow-list allows every target but link-local and metadata hosts. A non-empty
    one allows only URLs starting with one of its prefixes. "Explicitly allowed" means an
    allow-list prefix names this very host: only then may a link-local target pass.
    """
    host = _host(url)
    explicit = False
    if allowed_targets:
        matches = [prefix for prefix in allowed_targets if url.startswith(prefix)]
        if not matches:
            raise TargetError(
                f"target {url!r} is not in the queue's allowed_targets {list(allowed_targets)!r}"
            )
        explicit = any(_host(prefix) == host for prefix in matches)
    if not explicit and (host in BLOCKED_HOSTNAMES or is_blocked_address(host.strip("[]"))):
        raise TargetError(
            f"target host {host!r} is a link-local or cloud-metadata address; "
            "allow it explicitly in the queue's allowed_targets to deliver there"
        )
    return explicit


class BlockedAddressError(OSError):
    """A name resolved only to link-local or metadata addresses."""


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, minus link-local and metadata addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower() in BLOCKED_HOSTNAMES:
            raise BlockedAddressError(f"{host} is a cloud-metadata name")
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_blocked_address(r["host"])]
        if not allowed:
            raise BlockedAddressError(
                f"{host} resolves only to link-local or metadata addresses: "
                f"{sorted({r['host'] for r in results})}"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()
