"""Standard Webhooks signatures with rotation, verified by the `standardwebhooks` package from
PyPI (a receiver nobody here wrote), at real targets, from dispatchers and from a carrier."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from ap4k_testkit import Api, CarrierProcess, Received, StartServer, sink


def verifies(secret: str, received: Received) -> bool:
    try:
        Webhook(secret).verify(received.body, received.headers)
    except WebhookVerificationError:
        return False
    return True


async def new_secret(api: Api, queue: str) -> str:
    status, body = await api.call("POST", f"/v1/queues/{queue}/signing-secrets")
    assert status == 201, body
    secret: str = body["signing_secret"]
    assert secret.startswith("whsec_")
    return secret


@pytest.mark.parametrize("by", ["dispatchers", "carrier"])
async def test_rotation_both_receivers_verify_every_delivery(
    start_server: StartServer, by: str
) -> None:
    server, api = await start_server(dispatchers=16 if by == "dispatchers" else 0)
    carrier = None
    if by == "carrier":
        carrier = await CarrierProcess(f"http://127.0.0.1:{server.settings.port}").start()

    # Every message fails once: the retry must carry the same webhook-id.
    def flaky(_: Received, nth: int) -> int:
        return 503 if nth == 1 else 200

    try:
        async with sink(flaky) as target:
            await api.settings("rotating", min_backoff_seconds=0.05, max_backoff_seconds=0.1)
            old = await new_secret(api, "rotating")
            before = await api.send_batch(
                "rotating", [{"target": target.url, "body": {"i": i}} for i in range(10)]
            )
            await target.wait_for(lambda: len(target.received) == 20)
            assert all(verifies(old, r) for r in target.received)

            new = await new_secret(api, "rotating")  # rotation: both are in force
            queue = await api.ok("GET", "/v1/queues/rotating")
            assert queue["settings"]["signing_secrets_set"] == 2
            assert old not in json.dumps(queue) and new not in json.dumps(queue)
            # A third is refused until the oldest is dropped.
            status, body = await api.call("POST", "/v1/queues/rotating/signing-secrets")
            assert status == 409 and body["error"]["code"] == "too_many_signing_secrets"

            during = await api.send_batch(
                "rotating", [{"target": target.url, "body": {"i": i}} for i in range(10)]
            )
            await target.wait_for(lambda: len(target.received) == 40)
            rotating = target.received[20:]
            assert all(verifies(old, r) for r in rotating)  # a receiver not yet moved
            assert all(verifies(new, r) for r in rotating)  # a receiver already moved
            for r in rotating:
                assert len(r.headers["webhook-signature"].split(" ")) == 2
            # webhook-id is the message id, the same on the failed attempt and its retry.
            ids = [r.headers["webhook-id"] for r in rotating]
            assert sorted(ids) == sorted(2 * [m["id"] for m in during])
            assert all(r.headers["webhook-id"] == r.message_id for r in target.received)
            assert {m["id"] for m in before}.isdisjoint(ids)

            dropped = await api.ok("DELETE", "/v1/queues/rotating/signing-secrets/oldest")
            assert dropped == {"signing_secrets_set": 1}
            await api.send("rotating", {"target": target.url, "body": {"after": True}})
            await target.wait_for(lambda: len(target.received) == 42)
            after = target.received[40:]
            assert all(verifies(new, r) for r in after)
            assert not any(verifies(old, r) for r in after)
    finally:
        if carrier is not None:
            carrier.kill()


async def test_library_refuses_a_stale_timestamp_and_a_tampered_body(api: Api) -> None:
    async with sink() as target:
        secret = await new_secret(api, "guarded")
        await api.send("guarded", {"target": target.url, "body": {"amount": 10}})
        await target.wait_for(lambda: len(target.received) == 1)
        got = target.received[0]
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
        assert Webhook(secret).verify(got.body, got.headers) == {"amount": 10}

        tampered = got.body.replace(b"10", b"99")
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(secret).verify(tampered, got.headers)
        # The same delivery replayed ten minutes late.
        stale = got.headers | {"webhook-timestamp": str(int(time.time()) - 600)}
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(secret).verify(got.body, stale)


async def test_secrets_are_checked_and_never_shown(api: Api) -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    queue = await api.settings("kept", signing_secrets=[secret])
    assert queue["settings"]["signing_secrets_set"] == 1
    assert secret not in json.dumps(queue)
    for bad in (
        ["not-a-secret"],
        ["whsec_" + "A" * 31 + "!"],  # not base64
        ["whsec_" + "QUJD" * 4],  # 12 bytes: too short a key
        [secret, secret, secret],  # at most two
    ):
        status, body = await api.call("PUT", "/v1/queues/kept", {"signing_secrets": bad})
        assert status == 400, bad
        assert body["error"]["field"] == "signing_secrets"
    assert (await api.ok("GET", "/v1/queues/kept"))["settings"]["signing_secrets_set"] == 1
    status, body = await api.call(
        "POST",
        "/v1/queues/kept/messages",
        {"target": "http://127.0.0.1:9/x", "headers": {"Webhook-Signature": "v1,forged"}},
    )
    assert status == 400 and body["error"]["field"] == "headers"
    cleared = await api.settings("kept", signing_secrets=None)
    assert cleared["settings"]["signing_secrets_set"] == 0
