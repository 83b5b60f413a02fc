"""`ap4k serve` failing to start says why in one line (exit 1, no traceback); its logs:
text or JSON, one line per failed delivery at info and per success at debug, access log."""

from __future__ import annotations

import json
import socket
from typing import Any

from ap4k.core.embedded_pg import free_port
from ap4k.core.version import version
from ap4k_testkit import Api, ServerProcess, ap4k, sink


def assert_one_clear_line(run: Any, *fragments: str) -> None:
    assert run.code == 1, run
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ap4k serve: "), run.stderr
    for fragment in fragments:
        assert fragment in last, (fragment, run.stderr)


async def test_version() -> None:
    run = await ap4k("--version")
    assert (run.code, run.stdout.strip()) == (0, f"ap4k {version()}")


async def test_startup_failures_are_one_line_and_exit_1(database_url: str) -> None:
    serve = ["serve", "--host", "127.0.0.1", "--dispatchers", "0"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = await ap4k(*serve, "--port", str(port), "--database-url", database_url)
    assert_one_clear_line(in_use, f"cannot listen on 127.0.0.1:{port}", "address already in use")

    nobody = free_port()
    unreachable = await ap4k(
        *serve, "--database-url", f"postgresql://postgres:hunter2@127.0.0.1:{nobody}/queue"
    )
    assert_one_clear_line(
        unreachable, f"cannot connect to the database at 127.0.0.1:{nobody}/queue"
    )
    assert "hunter2" not in unreachable.stderr  # never the password

    bad_url = await ap4k(*serve, "--database-url", "mysql://db/queue")
    assert_one_clear_line(bad_url, "bad database URL")

    loud = await ap4k(*serve, "--log-level", "loud", "--database-url", database_url)
    assert_one_clear_line(loud, "--log-level must be one of debug, info, warning", "'loud'")
    from_env = await ap4k(*serve, env={"AP4K_LOG_LEVEL": "chatty"})
    assert_one_clear_line(from_env, "'chatty'")
    xml = await ap4k(*serve, "--log-format", "xml", "--database-url", database_url)
    assert_one_clear_line(xml, "--log-format must be one of text, json, not 'xml'")


async def test_json_logs_delivery_lines_and_access_log(database_url: str) -> None:
    server = await ServerProcess(
        database_url, "--log-format", "json", "--log-level", "debug", "--access-log"
    ).start()
    api = Api(server.url)
    try:
        await api.settings("logged", max_attempts=1)
        async with sink(lambda r, n: 200 if r.body == b"1" else 502) as target:
            good = await api.send("logged", {"target": target.url + "/ok", "body": 1})
            bad = await api.send("logged", {"target": target.url + "/bad", "body": 2})
            await api.wait_state(good["id"], "completed")
            await api.wait_state(bad["id"], "discarded")
    finally:
        await api.close()
        server.terminate()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert len(lines) == len(server.log().strip().splitlines())  # every line is JSON
    deliveries = {line["message_id"]: line for line in lines if line["logger"] == "ap4k.delivery"}
    failed, delivered = deliveries[bad["id"]], deliveries[good["id"]]
    assert failed | {"ts": None, "duration_ms": None} == {
        "ts": None,
        "level": "info",
        "logger": "ap4k.delivery",
        "message": "delivery failed",
        "message_id": bad["id"],
        "queue": "logged",
        "attempt": 1,
        "outcome": "retry",
        "status": 502,
        "error": "HTTP 502 Bad Gateway",
        "duration_ms": None,
        "target_host": "127.0.0.1",
    }
    assert failed["duration_ms"] >= 0
    assert (delivered["level"], delivered["message"], delivered["status"]) == (
        "debug",
        "delivered",
        200,
    )
    access = [line for line in lines if line["logger"] == "aiohttp.access"]
    assert any("POST /v1/queues/logged/messages" in line["message"] for line in access), access


async def test_text_logs_show_failures_at_info_and_no_access_log_by_default(
    database_url: str,
) -> None:
    server = await ServerProcess(database_url).start()
    api = Api(server.url)
    try:
        await api.settings("plain", max_attempts=1)
        async with sink(lambda r, n: 200 if r.body == b"1" else 404) as target:
            good = await api.send("plain", {"target": target.url, "body": 1})
            bad = await api.send("plain", {"target": target.url, "body": 2})
            await api.wait_state(good["id"], "completed")
            await api.wait_state(bad["id"], "discarded")
    finally:
        await api.close()
        server.terminate()
    log = server.log()
    (failed,) = [line for line in log.splitlines() if "ap4k.delivery" in line]
    assert " INFO ap4k.delivery: delivery failed " in failed
    for field in [f"message_id={bad['id']}", "queue=plain", "attempt=1", "status=404"]:
        assert field in failed, (field, failed)
    assert 'error="HTTP 404 Not Found"' in failed
    assert "aiohttp.access" not in log and "/v1/queues" not in log
