"""The server keeps the promises of its own /openapi.json, as schemathesis checks them.

schemathesis (its `run` command, in a child process) reads the document from the running
in-process server and sends it generated requests, valid and invalid: boundary values of
every field (its coverage phase), random ones (fuzzing) and chains of calls that follow the
document's links (stateful). Every answer must be no 5xx, carry a documented status code
and content type, and match the documented response schema.

The seed is fixed so that a run is reproducible; a failure prints the request to replay.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from ap4k_testkit import Api, StartServer

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)
SEED = "20261129"
# Enough generated requests per operation to reach every field's boundaries while the
# whole module stays well under a minute on two cores.
MAX_EXAMPLES = "25"


async def schemathesis(location: str, *args: str, cwd: Path) -> tuple[int, str]:
    """`schemathesis run LOCATION --checks … ARGS`: (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        location,
        "--checks",
        CHECKS,
        "--seed",
        SEED,
        "--max-examples",
        MAX_EXAMPLES,
        "--generation-database",
        "none",
        "--no-color",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,  # keeps any file it writes out of the repository
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def seeded_server(start_server: StartServer) -> Api:
    """A server without dispatchers (nothing is delivered to generated targets), holding a
    queue with settings, available messages of every shape, and a dead letter, so reads and
    leases answer with real data too."""
    _, api = await start_server(dispatchers=0)
    await api.settings(
        "orders", max_attempts=3, allowed_targets=["https://example.com/"], signing_secret="s"
    )
    await api.send_batch(
        "orders",
        [
            {"target": "https://example.com/hook", "body": {"order": 1}},
            {"target": "https://example.com/hook", "method": "PUT", "body": "text"},
            {"target": "https://example.com/hook", "headers": {"X-A": "b"}, "ordering_key": "k"},
            {"target": "https://example.com/hook", "body": None, "dedup_key": "d", "priority": 9},
            {"target": "https://example.com/hook", "max_attempts": 1, "timeout_seconds": 0.5},
        ],
    )
    await api.send("dead-end", {"target": "https://example.com/gone", "max_attempts": 1})
    leased = await api.ok(
        "POST", "/v1/leases", {"carrier": "t", "queues": ["dead-end"], "wait_seconds": 0}
    )
    fails = [
        {"id": m["id"], "attempt": m["attempt"], "outcome": "fail", "error": "410 Gone"}
        for m in leased["messages"]
    ]
    await api.ok("POST", "/v1/acks", {"carrier": "t", "acks": fails})
    dead = await api.ok("GET", "/v1/queues/dead-end/dead")
    assert len(dead["messages"]) == 1
    return api


async def test_every_operation_keeps_to_the_document(
    start_server: StartServer, tmp_path: Path
) -> None:
    api = await seeded_server(start_server)
    code, output = await schemathesis(
        api.base_url + "/openapi.json",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--workers",
        "2",
        # POST /v1/leases long-polls for up to wait_seconds (60 at most, 20 when not given)
        # by design: generated requests would mostly sit there. It has its own run below,
        # with wait_seconds pinned near 0.
        "--exclude-operation-id",
        "lease",
        cwd=tmp_path,
    )
    assert code == 0, output
    document = await api.ok("GET", "/openapi.json")
    operations = sum(len(methods) for methods in document["paths"].values())
    # every other operation was in the run
    assert f"{operations - 1} selected" in output, output


async def test_lease_keeps_to_the_document_without_waiting(
    start_server: StartServer, tmp_path: Path
) -> None:
    """POST /v1/leases against the server's own document with one change: wait_seconds is
    required and at most 0.1 s, so that no generated request long-polls. Only valid
    requests are generated (an invalid one could leave wait_seconds out and wait 20 s);
    test_bad_input.py covers its invalid bodies."""
    api = await seeded_server(start_server)
    document = await api.ok("GET", "/openapi.json")
    lease_request = document["components"]["schemas"]["LeaseRequest"]
    lease_request["properties"]["wait_seconds"] = {"type": "number", "minimum": 0, "maximum": 0.1}
    lease_request["required"] = [*lease_request["required"], "wait_seconds"]
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(document))
    code, output = await schemathesis(
        str(path),
        "--url",
        api.base_url,
        "--include-operation-id",
        "lease",
        "--mode",
        "positive",
        "--phases",
        "examples,coverage,fuzzing",
        cwd=tmp_path,
    )
    assert code == 0, output
    assert "1 selected" in output, output
    # Generated requests did lease the seeded messages: real answers met the schema.
    orders = await api.ok("GET", "/v1/queues/orders")
    assert orders["depth"]["running"] > 0, orders


async def test_acks_keep_to_the_document(start_server: StartServer, tmp_path: Path) -> None:
    api = await seeded_server(start_server)
    code, output = await schemathesis(
        api.base_url + "/openapi.json",
        "--include-operation-id",
        "ack",
        "--phases",
        "examples,coverage,fuzzing",
        cwd=tmp_path,
    )
    assert code == 0, output
