"""`ap4k bench` as a command: its report's shape, its refusals and its clean-up on Ctrl-C
(speed itself is not tested here: the machines are shared and noisy; the README records
measured figures)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BENCH = [sys.executable, "-m", "ap4k.cli", "bench"]


def test_quick_bench_reports_every_figure_beside_its_bound() -> None:
    result = subprocess.run(
        [*BENCH, "--quick", "--json"], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    assert report["interrupted"] is False
    figures = {f["name"]: f for f in report["figures"]}
    # (figure name prefix, the bound it is read against, whether it carries a target)
    expected = [
        ("bound: bare INSERT, 1 row/commit", "", False),
        ("bound: bare INSERT, 100 rows/commit", "", False),
        ("reference: ap4k's INSERT, 100 rows/commit", "bare 100-row INSERTs", False),
        ("bound: bare lease + complete", "", False),
        ("bound: bare aiohttp POSTs", "", False),
        ("bound: bare libcurl POSTs", "", False),
        ("enqueue: single-message POSTs", "bare 1-row INSERTs", True),
        ("enqueue: batches of 100", "bare 100-row INSERTs", True),
        # Read against the faster of the two bare clients, which its note names.
        ("delivery: empty start", ("bare aiohttp POSTs", "bare libcurl POSTs"), True),
        ("CPU per 1,000 delivered: server dispatchers", "", False),
        ("latency p50", "", False),
        ("latency p99", "", True),
        ("delivery: with a", "server-only, empty start", True),
        ("server peak RSS through the backlog", "", True),
        ("delivery: 0 dispatchers, 1 carrier(s)", "server-only, empty start", True),
        ("CPU per 1,000 delivered: 1 carrier(s)", "dispatcher path", True),
        ("carrier peak RSS", "", True),
    ]
    for prefix, bound, has_target in expected:
        matches = [f for name, f in figures.items() if name.startswith(prefix)]
        assert matches, f"no figure {prefix!r} in {sorted(figures)}"
        figure = matches[0]
        assert figure["value"] > 0, figure
        if isinstance(bound, tuple):
            assert figure["bound"] in bound, figure
            client = figure["bound"].removeprefix("bare ").removesuffix(" POSTs")
            assert f"faster bare client ({client} POSTs)" in figure["note"], figure
            clients = [f["value"] for n, f in figures.items() if n.startswith("bound: bare")
                       and n.endswith("POSTs to the sink, 1 process")]
            assert len(clients) == 2 and figure["bound_value"] == max(clients)
        else:
            assert figure["bound"] == bound, figure
        if bound:
            assert figure["bound_value"] > 0
            assert abs(figure["ratio"] - figure["value"] / figure["bound_value"]) < 1e-9
        assert (figure["met"] is not None) == has_target, figure
        assert bool(figure["target"]) == has_target, figure
    # Every rate carries the cores it kept busy, and one read against a bound its ceiling:
    # the ratio at that cost per item with every core busy.
    cores = psutil.cpu_count()
    for figure in figures.values():
        if figure["unit"] not in ("msg/s", "rows/s", "req/s"):
            assert figure["cores_busy"] is None and figure["ceiling"] is None, figure
            continue
        assert 0 < figure["cores_busy"] <= cores + 0.05, figure
        if figure["ratio"] is None:
            assert figure["ceiling"] is None, figure
        else:
            ceiling = figure["ratio"] * cores / figure["cores_busy"]
            assert abs(figure["ceiling"] - ceiling) < 1e-9, figure
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["raw", "enqueue", "delivery", "latency", "backlog", "carriers"]
    for stage in stages.values():
        assert stage["seconds"] > 0
        assert stage["peak_rss_mb"]["server"] > 0
    assert stages["carriers"]["peak_rss_mb"]["carrier-0"] > 0


def test_quick_flow_stage_reports_leases_and_delivery_with_and_without_flow_limits() -> None:
    result = subprocess.run(
        [*BENCH, "--quick", "--json", "--only", "flow"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    figures = {f["name"]: f for f in report["figures"]}
    for prefix in (
        "lease of 100, flow_limits: first",
        "lease of 100, flow_limits: median of next",
        "lease of 100, no flow limits: first",
        "lease of 100, no flow limits: median of next",
        "delivery, flow_limits: 4,500 messages of 1,500 waiting keys",
        "delivery, no flow limits: the same 6,500 messages",
    ):
        matches = [f for name, f in figures.items() if name.startswith(prefix)]
        assert matches and matches[0]["value"] > 0, (prefix, sorted(figures))
    assert [s["name"] for s in report["stages"]] == ["flow"]


def test_quick_soak_stage_delivers_every_message_and_reports_rss_over_time() -> None:
    result = subprocess.run(
        [*BENCH, "--quick", "--json", "--only", "soak", "--soak-seconds", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    figures = {f["name"]: f for f in report["figures"]}
    warm, end = figures["soak: server RSS once warm"], figures["soak: server RSS after 3 s"]
    assert warm["value"] > 0 and end["value"] > 0
    assert end["bound"] == "soak: server RSS once warm" and end["target"] == "≤ 1.1 × bound"
    assert end["ratio"] == pytest.approx(end["value"] / warm["value"])
    # Every message sent was delivered (the stage waits for the sink to count them all).
    delivered, sent = re.match(r"([\d,]+) of ([\d,]+) delivered", warm["note"]).groups()
    assert delivered == sent and int(sent.replace(",", "")) > 0
    assert [s["name"] for s in report["stages"]] == ["soak"]


def test_only_refuses_an_unknown_stage_before_starting_anything() -> None:
    result = subprocess.run(
        [*BENCH, "--only", "raw,deliveries"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown stage(s) 'deliveries'" in result.stderr
    assert "raw, enqueue, delivery, latency, backlog, carriers, outbox" in result.stderr
    assert "Traceback" not in result.stderr
    assert "PostgreSQL in" not in result.stderr  # nothing was started


def test_ctrl_c_stops_quietly_and_leaves_no_process_behind() -> None:
    bench = subprocess.Popen(
        [*BENCH, "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A Ctrl-C reaches the foreground process; the bench's children run in their own
        # sessions, so only the bench gets it, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert bench.stderr is not None
    first = bench.stderr.readline()
    match = re.search(r"PostgreSQL in (\S+);", first)
    assert match, first
    workdir = match.group(1)
    for line in bench.stderr:
        if "stage enqueue" in line:
            break
    time.sleep(0.5)
    children = psutil.Process(bench.pid).children(recursive=True)
    assert any("serve" in c.cmdline() for c in children)
    bench.send_signal(signal.SIGINT)
    _, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    left = [
        p.info
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(workdir in arg for arg in p.info["cmdline"] or [])
    ]
    assert left == []  # no PostgreSQL of that run is running
    assert [c.pid for c in children if c.is_running() and c.status() != "zombie"] == []
    assert not Path(workdir).exists()


def test_the_table_shows_the_cores_a_rate_kept_busy_and_its_ceiling() -> None:
    from ap4k.bench.run import CORES, Figure, Rate, Report, render, versus

    bound = Figure("bound: bare things", 1000.0, "msg/s", "raw", short="bare things")
    bound.cores_busy = 2.0
    figure = Figure("things", 300.0, "msg/s", "stage", note="its own note")
    figure.cores_busy = Rate(300.0, 0.5 * CORES).cores_busy
    versus(figure, bound, 0.6)
    assert figure.ceiling is not None and abs(figure.ceiling - 0.6) < 1e-9
    report = Report("a machine", {"workers": 1, "dispatchers": 32}, (0.0, 0.0, 0.0))
    report.figures += [bound, figure]
    table = render(report)
    row = next(line for line in table.splitlines() if line.startswith("things"))
    assert row.endswith(
        f"{0.5 * CORES:.1f} of {CORES} cores busy, ceiling 0.60 × bound; its own note"
    ), row
    assert " MISSED " in row  # 0.3 of its bound against 0.6; at half the cores, 0.6 at most
