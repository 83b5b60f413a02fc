"""Idempotent apply: read, create if missing, patch only what differs, otherwise nothing.

"Differs" is judged on the fields the operator sets: the API server adds defaults (a
container's `terminationMessagePath`, a Service's `clusterIP`…) and other controllers add
annotations, and neither is drift. A child matches when everything the desired object says is
present in it with the same value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ap4k.operator.kube import KubeClient, KubeError, path_of

Outcome = Literal["created", "patched", "unchanged"]


def contains(actual: Any, desired: Any) -> bool:
    """Whether `actual` holds everything `desired` says (dicts: subset; lists: item by item)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and contains(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, Sequence) and not isinstance(desired, str):
        return (
            isinstance(actual, Sequence)
            and not isinstance(actual, str)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def drift_patch(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that brings a child back to `desired` (labels, owners, spec)."""
    meta = desired["metadata"]
    patch: dict[str, Any] = {"metadata": {"labels": meta.get("labels", {})}}
    if "ownerReferences" in meta:
        patch["metadata"]["ownerReferences"] = meta["ownerReferences"]
    if "spec" in desired:
        patch["spec"] = desired["spec"]
    return patch


async def apply(client: KubeClient, desired: dict[str, Any]) -> Outcome:
    path = path_of(desired)
    current = await client.get(path)
    if current is None:
        try:
            await client.create(desired)
            return "created"
        except KubeError as exc:
            if exc.status != 409:  # 409: created meanwhile (by a drift watcher); compare it
                raise
        current = await client.get(path)
    if current is not None and contains(current, desired):
        return "unchanged"
    await client.merge_patch(path, drift_patch(desired))
    return "patched"
