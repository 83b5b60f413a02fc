"""The example AsyncQueue's post-install Job: its script, as the chart renders it, run
against kmock as the Kubernetes API. It must wait while the API does not serve the kind yet
(the CRD of the same release is still being established), create the AsyncQueue once it
does, leave an existing one alone, and fail on anything else."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import yaml

from tests.chart.conftest import NAMESPACE, Rendered, Renderer

DEV = {"postgresql": {"enabled": True}, "exampleQueue": {"enabled": True}}
COLLECTION = f"/apis/ap4k.dev/v1alpha1/namespaces/{NAMESPACE}/asyncqueues"

# A raw handler: only the reactions below answer, as an API server that serves (or not) the kind.
pytestmark = pytest.mark.kmock(cls=kmock_lib.RawHandler)


def _script_and_env(rendered: Rendered) -> tuple[str, dict[str, str]]:
    container = rendered.example_job()["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    return container["args"][0], env


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": server}}],
                "users": [{"name": "job", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "job"}}],
                "current-context": "kmock",
            }
        )
    )
    return path


async def _start(rendered: Rendered, kmock: Any, tmp_path: Path) -> asyncio.subprocess.Process:
    script, job_env = _script_and_env(rendered)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "AP4K_"))}
    env |= job_env
    env["KUBECONFIG"] = str(_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/")))
    env["AP4K_EXAMPLE_TIMEOUT_SECONDS"] = "60"
    # The interpreter the image runs it with: `python -c SCRIPT`.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


def _posts(kmock: Any) -> list[Any]:
    return list(kmock[f"post {COLLECTION}"])


async def test_waits_for_the_kind_then_creates_the_asyncqueue(
    render: Renderer, kmock: Any, tmp_path: Path
) -> None:
    rendered = render(DEV)
    # Not served yet: 404, as while the CRD is being established.
    kmock[f"post {COLLECTION}"].fallback << 404
    process = await _start(rendered, kmock, tmp_path)
    deadline = asyncio.get_running_loop().time() + 30
    while len(_posts(kmock)) < 2:
        assert process.returncode is None, await process.stdout.read()  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline, "the Job never retried"
        await asyncio.sleep(0.1)
    # Now the API server serves AsyncQueues.
    kmock[f"post {COLLECTION}"] << 201 << rendered.example_asyncqueue()
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, output.decode()
    posts = _posts(kmock)
    assert len(posts) >= 3
    assert posts[-1].data == rendered.example_asyncqueue()
    assert f"asyncqueue {NAMESPACE}/example created" in output.decode()


async def test_an_existing_asyncqueue_is_left_alone(
    render: Renderer, kmock: Any, tmp_path: Path
) -> None:
    kmock[f"post {COLLECTION}"] << 409 << {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
    process = await _start(render(DEV), kmock, tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, output.decode()
    assert "exists already" in output.decode()
    assert len(_posts(kmock)) == 1
    assert not list(kmock["put"]) and not list(kmock["patch"])


async def test_other_errors_fail_the_job(render: Renderer, kmock: Any, tmp_path: Path) -> None:
    kmock[f"post {COLLECTION}"] << 403 << {"kind": "Status", "code": 403, "reason": "Forbidden"}
    process = await _start(render(DEV), kmock, tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1, output.decode()
    assert "403" in output.decode()


def test_the_job_may_create_asyncqueues_and_nothing_else(render: Renderer) -> None:
    rendered = render(DEV)
    job = rendered.example_job()
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(b for b in rendered.find("RoleBinding") if b["subjects"][0]["name"] == account)
    role = rendered.one("Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": ["ap4k.dev"], "resources": ["asyncqueues"], "verbs": ["create"]}
    ]
    # All of it is a post-install hook, gone once the Job succeeded; the Job runs last.
    for obj in (job, role, binding, rendered.one("ServiceAccount", account)):
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-install"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > int(
        role["metadata"]["annotations"]["helm.sh/hook-weight"]
    )


def test_the_example_asyncqueue_is_not_labelled_as_part_of_the_release(render: Renderer) -> None:
    # The Job creates it and Helm never tracks it: claiming managed-by Helm would be false.
    labels = render(DEV).example_asyncqueue()["metadata"]["labels"]
    assert "app.kubernetes.io/managed-by" not in labels and "helm.sh/chart" not in labels
    assert labels["app.kubernetes.io/instance"] and labels["app.kubernetes.io/part-of"] == "ap4k"
