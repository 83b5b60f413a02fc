"""The web console in a real browser (Debian's chromium, driven by Playwright) against a real
server delivering real messages to a real target (the browser and screenshots: conftest.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from playwright.async_api import Page, expect

from ap4k_testkit import Api, Received, StartServer, sink

Shot = Callable[[str], Awaitable[None]]  # conftest.py's screenshot fixture


async def test_dead_letter_shows_the_failure_and_redrive_from_the_page_delivers_it(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=4)
    await api.settings("payments", max_attempts=2, min_backoff_seconds=0.05)
    healthy = False

    def target(received: Received, nth: int) -> web.StreamResponse:
        if healthy:
            return web.Response(text="charged")
        return web.Response(status=503, text="payment provider is down for maintenance")

    async with sink(target) as shop:
        sent = await api.send(
            "payments", {"target": shop.url + "/charge", "body": {"order": 42, "cents": 1999}}
        )
        await api.wait_state(sent["id"], "discarded")
        for i in range(3):  # some company for it: delivered ones
            healthy = True
            done = await api.send("payments", {"target": shop.url + "/charge", "body": {"n": i}})
            await api.wait_state(done["id"], "completed")
        healthy = False

        p = page
        await p.goto(api.base_url + "/")
        await expect(p.locator("table")).to_contain_text("payments")
        await shot("1-queues")

        await p.goto(f"{api.base_url}/ui/#/queues/payments/dead")
        row = p.locator(f'tr[data-id="{sent["id"]}"]')
        await expect(row).to_contain_text("HTTP 503")
        await expect(row).to_contain_text("payment provider is down for maintenance")
        await expect(row).to_contain_text("2 / 2")
        await shot("2-dead-letters")

        await row.locator("a").first.click()
        await expect(p.locator("h1")).to_contain_text(f"Message {sent['id']}")
        attempts = p.locator("table tbody tr")
        await expect(attempts).to_have_count(2)
        for i in range(2):
            await expect(attempts.nth(i)).to_contain_text("503")
            await expect(attempts.nth(i)).to_contain_text("payment provider is down")
        await expect(attempts.nth(0)).to_contain_text("retried")
        await expect(attempts.nth(1)).to_contain_text("dead")
        await expect(p.locator("#message-body")).to_contain_text('"cents": 1999')
        await shot("3-message-dead")

        healthy = True
        await p.locator("#redrive-message").click()
        delivered = await api.wait_state(sent["id"], "completed")
        assert delivered["attempts"][-1]["outcome"] == "delivered"
        assert [r.attempt for r in shop.received if r.message_id == sent["id"]] == [1, 2, 1]
        await expect(p.locator("h1")).to_contain_text("completed")
        await expect(attempts).to_have_count(3)
        await expect(attempts.nth(2)).to_contain_text("delivered")
        await shot("4-message-redriven")


async def test_dead_letters_select_redrive_and_purge(
    start_server: StartServer, page: Page, shot: Shot, database_url: str
) -> None:
    _, api = await start_server(dispatchers=4)
    healthy = False
    async with sink(lambda r, n: 200 if healthy else 410) as target:
        ids = [
            (await api.send("bulk", {"target": target.url, "body": {"n": i}}))["id"]
            for i in range(4)
        ]
        for msg_id in ids:
            await api.wait_state(msg_id, "discarded")
        p = page
        p.on("dialog", lambda dialog: dialog.accept())
        await p.goto(f"{api.base_url}/ui/#/queues/bulk/dead")
        rows = p.locator("table tbody tr")
        await expect(rows).to_have_count(4)
        await p.locator(f'input[data-id="{ids[0]}"]').check()
        await p.locator(f'input[data-id="{ids[1]}"]').check()
        await shot("5-dead-selected")

        healthy = True
        await p.locator("#redrive-selected").click()
        for msg_id in ids[:2]:
            await api.wait_state(msg_id, "completed")
        await expect(rows).to_have_count(2)

        await p.locator(f'input[data-id="{ids[2]}"]').check()
        await p.locator("#purge-selected").click()
        await expect(rows).to_have_count(1)
        status, _ = await api.call("GET", f"/v1/messages/{ids[2]}")
        assert status == 404
        assert (await api.message(ids[3]))["state"] == "discarded"

        await p.locator("#purge-all").click()
        await expect(p.locator("table")).to_contain_text("No dead letters.")
        status, _ = await api.call("GET", f"/v1/messages/{ids[3]}")
        assert status == 404


async def test_pause_from_the_page_stops_delivery(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=4)
    async with sink() as target:
        first = await api.send("mail", {"target": target.url, "body": {"to": "a@example.com"}})
        await api.wait_state(first["id"], "completed")

        p = page
        await p.goto(f"{api.base_url}/ui/#/queues/mail")
        pause = p.locator("#pause-button")
        await expect(pause).to_have_text("Pause")
        await pause.click()
        await expect(pause).to_have_text("Resume")
        await expect(p.locator("h1")).to_contain_text("paused")
        assert (await api.ok("GET", "/v1/queues/mail"))["settings"]["paused"] is True

        held = [
            (await api.send("mail", {"target": target.url, "body": {"n": i}}))["id"]
            for i in range(3)
        ]
        available = p.locator('.stat[data-state="available"] .value')
        await expect(available).to_have_text("3")
        await p.locator('.tabs a:has-text("available")').click()
        await expect(p.locator("table tbody tr")).to_have_count(3)
        await shot("6-queue-paused")
        for msg_id in held:
            assert (await api.message(msg_id))["state"] == "available"
        assert {r.message_id for r in target.received} == {first["id"]}

        await pause.click()
        await expect(pause).to_have_text("Pause")
        for msg_id in held:
            await api.wait_state(msg_id, "completed")
        await expect(available).to_have_text("0")
        await shot("7-queue-resumed")


async def test_settings_search_and_paging_from_the_page(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=0)  # nothing is delivered: the messages stay
    await api.send_batch(
        "catalog",
        [{"target": "http://127.0.0.1:9/", "dedup_key": f"sku-{i}"} for i in range(60)],
    )
    p = page
    await p.goto(f"{api.base_url}/ui/#/queues/catalog")
    rows = p.locator("table tbody tr")
    await expect(rows).to_have_count(50)
    await p.locator("#next-page").click()
    await expect(rows).to_have_count(10)

    await p.fill('input[name="q"]', "sku-7")
    await p.locator('button:has-text("Find")').click()
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("sku-7")

    await p.fill('input[name="max_attempts"]', "7")
    await p.fill('input[name="rate_limit_per_second"]', "12.5")
    await p.locator('button:has-text("Save settings")').click()
    await expect(p.locator("#flash")).to_contain_text("Settings saved.")
    settings = (await api.ok("GET", "/v1/queues/catalog"))["settings"]
    assert (settings["max_attempts"], settings["rate_limit_per_second"]) == (7, 12.5)

    await p.fill('input[name="max_attempts"]', "0")
    await p.locator('button:has-text("Save settings")').click()
    await expect(p.locator("#flash")).to_contain_text("max_attempts")
    await shot("8-queue-settings-refused")
    assert (await api.ok("GET", "/v1/queues/catalog"))["settings"]["max_attempts"] == 7


async def test_token_prompt_when_the_api_wants_one(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=0, api_token="console-t0ken")
    await api.settings("private")
    p = page
    await p.goto(api.base_url + "/ui/")
    dialog = p.locator("#token-dialog")
    await expect(dialog).to_be_visible()
    await p.fill("#token-input", "wrong")
    await p.locator('#token-form button[type="submit"]').click()
    await expect(p.locator("#token-error")).to_contain_text("refused")
    await shot("9-token-prompt")
    await p.fill("#token-input", "console-t0ken")
    await p.locator('#token-form button[type="submit"]').click()
    await expect(dialog).to_be_hidden()
    await expect(p.locator("table")).to_contain_text("private")


async def test_docs_render_the_openapi_document(api: Api, page: Page, shot: Shot) -> None:
    p = page
    await p.goto(api.base_url + "/docs")
    await expect(p.locator(".opblock").first).to_be_visible(timeout=20_000)
    await expect(p.locator("#swagger-ui")).to_contain_text("/v1/queues/{queue}/messages")
    await shot("10-docs")
