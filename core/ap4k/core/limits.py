"""Size limits that more than one part must agree on, each set once."""

from __future__ import annotations

# The longest header field (name and value together) in bytes: aiohttp's parser refuses
# longer ones, so the server's API refuses them in requests, and a message may not carry a
# header its delivery would be refused for (an aiohttp target, or a carrier's proxy, has
# the same default).
MAX_HEADER_FIELD_BYTES = 8190
