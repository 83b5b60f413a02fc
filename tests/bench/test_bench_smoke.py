"""`ap4k bench` runs end to end and reports every figure (speed itself is not tested here:
the machines are shared and noisy; the README records measured figures)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_bench_reports_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ap4k.cli", "bench", "--quick", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {f["name"]: f for f in json.loads(result.stdout)}
    expected = [
        "PostgreSQL: bare INSERT, 1 row/commit",
        "PostgreSQL: bare INSERT, 100 rows/commit",
        "PostgreSQL: bare lease + complete",
        "enqueue: single-message POSTs",
        "enqueue: batches of 100",
        "delivery: empty start",
        "latency p50",
        "latency p99",
        "delivery: with a",
    ]
    for prefix in expected:
        matches = [f for name, f in figures.items() if name.startswith(prefix)]
        assert matches, f"no figure {prefix!r} in {sorted(figures)}"
        assert matches[0]["value"] > 0
