"""A small asyncio client for the few Kubernetes API calls the operator makes itself.

kopf talks to the API for watching and for its own patches; the operator needs a handful more
(read, create and patch children, patch the status from the autoscaler). Rather than a second
credential path, this client reuses the `kopf.ConnectionInfo` that the operator's login handler
returns to kopf, and speaks plain JSON: objects stay dicts, as the builders produce them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from ap4k.operator.constants import API_VERSION, KIND, PLURAL, USER_AGENT

Body = dict[str, Any]

# (apiVersion, kind) → the resource's plural, for the kinds the operator touches.
PLURALS: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    (API_VERSION, KIND): PLURAL,
}

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}")
        self.status = status


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


def path_of(body: Body) -> str:
    meta = body["metadata"]
    return object_path(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])


class KubeClient:
    """JSON over the Kubernetes API with the credentials kopf logged in with."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_credentials(self, info: kopf.ConnectionInfo) -> None:
        """Called by the login handler, also on re-authentication (e.g. a rotated token)."""
        self._info = info
        self._session = None  # the next call opens a session with the new credentials

    async def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is loop and not self._session.closed:
            return self._session
        if self._info is None:
            raise KubeError(401, "not logged in yet (no credentials from the login handler)")
        info = self._info
        self._loop = loop
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
            headers={**info.as_http_headers(), "User-Agent": USER_AGENT},
            proxy=info.proxy_url,
            trust_env=info.trust_env,
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Body | None:
        """The decoded answer; None for 404. Other errors raise `KubeError`."""
        session = await self._open()
        assert self._info is not None
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        url = self._info.server.rstrip("/") + path
        try:
            async with session.request(method, url, data=data, headers=headers) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, f"{method} {path}: {exc or type(exc).__name__}") from exc
        if status == 404:
            return None
        if status >= 400:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(status, str(message)[:500])
        decoded: Body = json.loads(text) if text else {}
        return decoded

    async def get(self, path: str) -> Body | None:
        return await self.request("GET", path)

    async def create(self, body: Body) -> Body:
        meta = body["metadata"]
        path = collection_path(body["apiVersion"], body["kind"], meta["namespace"])
        created = await self.request("POST", path, body)
        if created is None:
            raise KubeError(404, f"cannot create in {path}: no such namespace or resource")
        return created

    async def merge_patch(self, path: str, patch: Body) -> Body | None:
        return await self.request("PATCH", path, patch, MERGE_PATCH)

    async def delete(self, path: str) -> Body | None:
        return await self.request("DELETE", path)

