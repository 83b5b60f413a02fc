"""Which targets a message may name: URL shape, queue allow-lists, and the SSRF guard.

In-cluster targets are private addresses by nature, so private ranges are allowed. What is
refused is link-local space, where cloud metadata services live (169.254.169.254, fe80::/10,
fd00:ec2::254), and the unspecified addresses 0.0.0.0 and :: (connecting to them reaches this
very host), unless a queue's allow-list names that host explicitly. The check runs at
enqueue time on the URL and again at delivery time on every address a name resolves to, so
a DNS name cannot smuggle a metadata address past it.

Hosts are compared in the form the socket layer uses, not as written: the resolver reads
`2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`, `169.254.43518` and `169.254.169.254.`
(inet_aton's spellings, and a trailing dot) all as 169.254.169.254, an IPv4 address inside
IPv6 (`::ffff:a9fe:a9fe`, NAT64's 64:ff9b::/96, 6to4) reaches that IPv4 address, and names are
IDNA-encoded by the HTTP client (`METADATA．google．internal` is metadata.google.internal).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

from yarl import URL

BLOCKED_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    # "This host": the kernel connects 0.0.0.0 and :: to the loopback interface.
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
)
BLOCKED_HOSTNAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog"})
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# What inet_aton may read as an IPv4 address: up to four parts, decimal, octal or hex.
INET_ATON_FORM = re.compile(r"(?:(?:0x[0-9a-f]*|[0-9]+)\.){0,3}(?:0x[0-9a-f]*|[0-9]+)")


class TargetError(ValueError):
    """A target that is malformed or not allowed; the message says which and why."""


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """`host` as the socket layer will read it: lower case, without a trailing dot or IPv6
    brackets and zone, an IPv4 address in dotted-quad form whichever inet_aton spelling it
    was given in, an IPv4 address carried in IPv6 (mapped, NAT64, 6to4) as that IPv4."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0].rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not INET_ATON_FORM.fullmatch(host):
            return host
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:  # e.g. a part out of range: no address, so a name to resolve
            return host
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return str(embedded)
    return str(ip)


def is_blocked_address(address: str) -> bool:
    """Whether a host (a literal address in any spelling) is link-local, metadata or
    unspecified; names are not resolved here (refuse_address checks what they resolve to)."""
    try:
        ip = ipaddress.ip_address(canonical_host(address))
    except ValueError:
        return False
    return any(ip in net for net in BLOCKED_NETWORKS)


def is_blocked_host(host: str) -> bool:
    """A blocked address or a cloud-metadata name, as written in a URL."""
    canonical = canonical_host(host)
    return canonical in BLOCKED_HOSTNAMES or is_blocked_address(canonical)


def _host(url: str) -> str:
    """The host the HTTP client will connect to (IDNA-encoded as it sends it), canonical."""
    try:
        host = URL(url).raw_host
    except ValueError:
        host = urlsplit(url).hostname
    return canonical_host(host or "")


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
    if not explicit and is_blocked_host(host):
        written = urlsplit(url).hostname or ""
        spelled = f"{written!r}" if written == host else f"{written!r} (that is {host})"
        raise TargetError(
            f"target host {spelled} is a link-local, cloud-metadata or unspecified address; "
            "allow it explicitly in the queue's allowed_targets to deliver there"
        )
    return explicit


def refuse_address(address: str) -> str | None:
    """The guard at connect time, on each address a target's name resolved to, right before
    a socket is opened to it: why it is refused (link-local, metadata or unspecified), or
    None. Checked there and not on the name, a name cannot resolve its way past it."""
    if is_blocked_address(address):
        return f"{address} is a link-local, metadata or unspecified address"
    return None
