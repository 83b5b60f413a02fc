"""What the server serves besides the API: the console's files, the docs, the root redirect.
(The console itself is driven in a real browser in tests/console/.)"""

from __future__ import annotations

import json

import aiohttp

from ap4k.core.version import version
from ap4k_testkit import StartServer


async def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_root_sends_browsers_to_the_console_and_programs_a_map(
    start_server: StartServer,
) -> None:
    _, api = await start_server(dispatchers=0)
    status, headers, _ = await fetch(api.base_url + "/", Accept="text/html,*/*;q=0.8")
    assert (status, headers["Location"]) == (302, "ui/")
    status, headers, _ = await fetch(api.base_url + "/ui")
    assert (status, headers["Location"]) == (302, "ui/")

    status, headers, body = await fetch(api.base_url + "/", Accept="application/json")
    assert status == 200
    assert json.loads(body) == {
        "name": "ap4k",
        "version": version(),
        "console": "/ui/",
        "docs": "/docs",
        "openapi": "/openapi.json",
    }


async def test_console_and_docs_are_served_from_the_package_without_a_token(
    start_server: StartServer,
) -> None:
    """The files are public (they hold no data); the API they call still wants the token."""
    _, api = await start_server(dispatchers=0, api_token="s3cret")
    status, headers, page = await fetch(api.base_url + "/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="assets/console.js"' in page
    for asset, kind in [("console.js", "javascript"), ("console.css", "css")]:
        status, headers, body = await fetch(f"{api.base_url}/ui/assets/{asset}")
        assert status == 200 and kind in headers["Content-Type"], asset
        assert b"http://" not in body and b"https://" not in body  # nothing from outside

    status, headers, docs = await fetch(api.base_url + "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"docs/assets/swagger-ui-bundle.js" in docs
    status, headers, bundle = await fetch(api.base_url + "/docs/assets/swagger-ui-bundle.js")
    assert status == 200 and len(bundle) > 100_000  # Swagger UI itself, from its wheel
    status, _, _ = await fetch(api.base_url + "/docs/assets/swagger-ui.css")
    assert status == 200

    status, _, _ = await fetch(api.base_url + "/v1/queues")
    assert status == 401
    status, _, _ = await fetch(api.base_url + "/ui/assets/no-such-file.js")
    assert status == 404
