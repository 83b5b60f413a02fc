"""The console's page of recurring schedules and fan-out topics, in a real browser against a
real server: what it lists comes from the API, what it does is seen in the API's answers.

The servers' own scheduler loops are slowed to once an hour: the one firing is driven.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web
from playwright.async_api import Dialog, Page, expect

from ap4k_testkit import Api, Received, StartServer, sink

Shot = Callable[[str], Awaitable[None]]  # conftest.py's screenshot fixture


class FailingProxy:
    """In front of the server (a real HTTP target that forwards what it receives): while
    `broken`, it answers one path itself with a 502 page, as a proxy whose upstream is down."""

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream, self.path, self.broken = upstream, path, False

    async def __call__(self, received: Received, nth: int) -> web.StreamResponse:
        path, method = received.headers[":path"], received.headers[":method"]
        if self.broken and path == self.path:
            return web.Response(status=502, text="upstream is down\n<html>…</html>")
        headers = {
            k: v for k, v in received.headers.items() if not k.startswith(":") and k != "Host"
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.upstream + path, headers=headers, data=received.body
            ) as answer,
        ):
            kept = ("Content-Type", "Location", "Cache-Control")
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                headers={k: answer.headers[k] for k in kept if k in answer.headers},
            )


async def schedules_by_name(api: Api) -> dict[str, dict[str, Any]]:
    listed = await api.ok("GET", "/v1/schedules")
    return {s["name"]: s for s in listed["schedules"]}


async def test_lists_schedules_and_topics_pauses_and_deletes(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    server, api = await start_server(dispatchers=4, schedule_interval_seconds=3600)
    async with sink() as target:
        # Half a day from now: the driven tick below (the next minute) must not reach it.
        hour = (datetime.now(ZoneInfo("Europe/Berlin")).hour + 12) % 24
        nightly_cron = f"30 {hour} * * *"
        report = {
            "queue": "reports",
            "cron": nightly_cron,
            "timezone": "Europe/Berlin",
            "message": {"target": target.url + "/report", "body": {"kind": "nightly"}},
        }
        await api.ok("PUT", "/v1/schedules/nightly-report", report)
        beat = await api.ok(
            "PUT",
            "/v1/schedules/heartbeat",
            {"queue": "ticks", "cron": "* * * * *", "message": {"target": target.url + "/tick"}},
        )
        fired = await server.scheduler.run_once(datetime.fromisoformat(beat["next_fire_at"]))
        assert len(fired) == 1
        beat = (await schedules_by_name(api))["heartbeat"]
        await api.wait_state(beat["last_message_id"], "completed")
        await api.ok(
            "PUT",
            "/v1/topics/orders",
            {
                "subscriptions": [
                    {"name": "billing", "target": target.url + "/billing"},
                    {
                        "name": "shipping",
                        "target": target.url + "/ship",
                        "queue": "shipping",
                        "headers": {"X-Team": "logistics"},
                    },
                ]
            },
        )

        p = page
        await p.goto(api.base_url + "/ui/")
        await p.locator('nav a:has-text("Schedules")').click()
        nightly = p.locator('#schedules tr[data-id="nightly-report"]')
        heartbeat = p.locator('#schedules tr[data-id="heartbeat"]')
        for text in ["reports", nightly_cron, "Europe/Berlin", f"POST {target.url}/report"]:
            await expect(nightly).to_contain_text(text)
        for text in ["ticks", "* * * * *", "UTC", beat["last_message_id"]]:
            await expect(heartbeat).to_contain_text(text)
        shown = (await schedules_by_name(api))["nightly-report"]
        # The next fire time is the server's, to the second (shown in the browser's zone).
        await expect(nightly.locator("time").first).to_have_attribute(
            "datetime", shown["next_fire_at"]
        )
        orders = p.locator('section[data-topic="orders"]')
        await expect(orders).to_contain_text("2 subscriptions")
        rows = orders.locator("tbody tr")
        await expect(rows).to_have_count(2)
        for text in ["billing", f"{target.url}/billing", "orders (the topic's name)"]:
            await expect(rows.nth(0)).to_contain_text(text)
        for text in ["shipping", f"{target.url}/ship", "X-Team"]:
            await expect(rows.nth(1)).to_contain_text(text)
        await shot("11-schedules-and-topics")

        # The last message id leads to the message that firing enqueued.
        await heartbeat.locator("a.last-message").click()
        # The Schedules page has two headings (Schedules, Topics): a locator that matches both
        # fails at once (strict mode) instead of waiting, so wait for the message's heading.
        heading = p.locator("h1", has_text=f"Message {beat['last_message_id']}")
        await expect(heading).to_be_visible()
        await expect(heading).to_contain_text("completed")
        await p.go_back()

        await nightly.locator('button[data-action="pause"]').click()
        await expect(p.locator("#flash")).to_contain_text("Schedule nightly-report paused.")
        await expect(nightly.locator(".badge.paused")).to_be_visible()
        paused = (await schedules_by_name(api))["nightly-report"]
        assert paused["paused"] is True and paused["next_fire_at"] is None
        # Nothing but `paused` changed.
        for key in ("queue", "cron", "timezone", "message"):
            assert paused[key] == shown[key], key
        await shot("12-schedule-paused")

        await nightly.locator('button[data-action="resume"]').click()
        await expect(nightly.locator('button[data-action="pause"]')).to_be_visible()
        resumed = (await schedules_by_name(api))["nightly-report"]
        assert resumed["paused"] is False and resumed["next_fire_at"] == shown["next_fire_at"]

        # Delete asks first: dismissed, nothing is deleted.
        answers = iter([False, True])

        async def answer(dialog: Dialog) -> None:
            assert "Delete schedule heartbeat?" in dialog.message
            await (dialog.accept() if next(answers) else dialog.dismiss())

        p.on("dialog", answer)
        await heartbeat.locator('button[data-action="delete"]').click()
        await asyncio.sleep(0.3)
        assert "heartbeat" in await schedules_by_name(api)
        await heartbeat.locator('button[data-action="delete"]').click()
        await expect(heartbeat).to_have_count(0)
        await expect(p.locator("#flash")).to_contain_text("Schedule heartbeat deleted.")
        assert list(await schedules_by_name(api)) == ["nightly-report"]
        # The message it enqueued stays.
        assert (await api.message(beat["last_message_id"]))["state"] == "completed"


async def test_a_refused_action_shows_the_servers_error(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=0, schedule_interval_seconds=3600)
    for name in ("weekly", "gone-a", "gone-b"):
        await api.ok(
            "PUT",
            f"/v1/schedules/{name}",
            {"queue": "digest", "cron": "0 8 * * 1", "message": {"target": "https://x.example/"}},
        )
    p = page
    p.on("dialog", lambda dialog: dialog.accept())
    await p.goto(api.base_url + "/ui/#/schedules")
    row = {
        name: p.locator(f'#schedules tr[data-id="{name}"]')
        for name in ("weekly", "gone-a", "gone-b")
    }
    await expect(row["gone-b"]).to_contain_text("0 8 * * 1")
    await p.locator("#auto-refresh").uncheck()  # the page goes stale, as pages do
    flash = p.locator("#flash.bad")

    # Since the page loaded, the queue's allow-list stopped allowing the target: saving
    # the schedule (which pausing does) is refused, with the field, and changes nothing.
    await api.settings("digest", allowed_targets=["https://only.example/"])
    await row["weekly"].locator('button[data-action="pause"]').click()
    await expect(flash).to_contain_text("field message.target, HTTP 400")
    await shot("13-schedule-pause-refused")
    assert (await schedules_by_name(api))["weekly"]["paused"] is False
    await expect(row["weekly"].locator('button[data-action="pause"]')).to_be_visible()

    # Deleted by someone else meanwhile: the action's 404 is said on the page, and the
    # refresh after it shows what is.
    for name, action in (("gone-a", "delete"), ("gone-b", "pause")):
        await p.locator("#flash").evaluate("box => { box.textContent = ''; }")
        status, _ = await api.call("DELETE", f"/v1/schedules/{name}")
        assert status == 200
        await row[name].locator(f'button[data-action="{action}"]').click()
        await expect(flash).to_have_text("schedule not found (HTTP 404)")
        await expect(row[name]).to_have_count(0)
    assert list(await schedules_by_name(api)) == ["weekly"]


async def test_the_page_asks_for_the_token_and_says_when_it_cannot_load(
    start_server: StartServer, page: Page, shot: Shot
) -> None:
    _, api = await start_server(dispatchers=0, api_token="sched-t0ken")
    await api.ok(
        "PUT",
        "/v1/schedules/private",
        {"queue": "q", "cron": "*/5 * * * *", "message": {"target": "https://x.example/"}},
    )
    p = page

    async def sign_in() -> None:
        await expect(p.locator("#token-dialog")).to_be_visible()
        await p.fill("#token-input", "sched-t0ken")
        await p.locator('#token-form button[type="submit"]').click()

    await p.goto(api.base_url + "/ui/#/schedules")
    await sign_in()
    await expect(p.locator('#schedules tr[data-id="private"]')).to_contain_text("*/5 * * * *")
    await expect(p.locator("#topics")).to_contain_text("No topics")

    # An answer that is not the API's (a proxy's error page) is said on the page too, and
    # stays there until a load succeeds.
    proxy = FailingProxy(api.base_url, "/v1/topics")
    async with sink(proxy) as front:
        await p.goto(front.url + "/ui/#/schedules")
        await sign_in()  # another origin: its own token store
        await expect(p.locator('#schedules tr[data-id="private"]')).to_be_visible()
        proxy.broken = True
        await expect(p.locator("#load-error")).to_contain_text(
            "Could not load this page: HTTP 502: upstream is down"
        )
        await shot("14-schedules-load-error")
        proxy.broken = False
        await expect(p.locator("#load-error")).to_be_hidden()
