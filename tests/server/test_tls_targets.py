"""HTTPS targets through libcurl, for real: a TLS target on 127.0.0.1 with a certificate
from a test CA (trustme). Deliveries verify the target's certificate and name, against the
system's bundle or the one SSL_CERT_FILE names; a target they cannot verify gets no body."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from ap4k.core.delivery import Deliverer, Delivery, Verdict
from ap4k_testkit import Api, ServerProcess, serving


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def target(received: list[bytes]) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    return app


def delivery(url: str) -> Delivery:
    return Delivery(
        id=1, queue="q", attempt=1, max_attempts=3, target=url, method="POST", headers=None,
        body=b'{"tls":true}', timeout_seconds=10, created_at=0,
    )


async def test_a_certificate_from_an_unknown_ca_is_refused(ca: trustme.CA) -> None:
    """Verification is on: the test CA is in no bundle this process trusts."""
    received: list[bytes] = []
    async with serving(target(received), tls=tls_context(ca, "127.0.0.1")) as base:
        deliverer = Deliverer()
        try:
            outcome = await deliverer.deliver(delivery(base + "/hook"))
        finally:
            await deliverer.close()
    assert outcome.verdict is Verdict.RETRY
    assert outcome.status is None
    assert outcome.error is not None and "certificate" in outcome.error.lower()
    assert received == []


async def test_a_trusted_ca_delivers_and_a_wrong_name_is_refused(
    ca: trustme.CA, ca_file: Path, database_url: str
) -> None:
    """`ap4k serve` told to trust the test CA (SSL_CERT_FILE, as an operator would for a
    private CA) delivers over TLS; a certificate for another name is still refused."""
    received: list[bytes] = []
    server = await ServerProcess(database_url, env={"SSL_CERT_FILE": str(ca_file)}).start()
    api = Api(server.url)
    try:
        async with (
            serving(target(received), tls=tls_context(ca, "127.0.0.1")) as good,
            serving(target(received), tls=tls_context(ca, "elsewhere.test")) as wrong_name,
        ):
            await api.settings("tls", max_attempts=1)
            sent = await api.send("tls", {"target": good + "/hook", "body": {"tls": True}})
            done = await api.wait_state(sent["id"], "completed", "discarded")
            assert done["state"] == "completed"
            assert received == [b'{"tls":true}']

            refused = await api.send("tls", {"target": wrong_name + "/hook", "body": {}})
            failed = await api.wait_state(refused["id"], "completed", "discarded")
            assert failed["state"] == "discarded"
            assert received == [b'{"tls":true}']
    finally:
        await api.close()
        server.stop()
