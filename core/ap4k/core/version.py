"""The installed distribution's version, for `ap4k --version`, the console and User-Agents."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    try:
        return metadata.version("ap4k")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
