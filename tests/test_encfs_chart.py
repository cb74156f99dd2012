"""The chart's encfs sidecar template ("skr.encfs"), rendered by the real Helm engine and checked against
the Kubernetes schemas: privileged only where FUSE and mount need it, the mount directory shared with
mount propagation, EncfsSideCarArgs from a Secret, probes on /readyz and /healthz."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_chart import assert_valid_kubernetes, chart, container, pod_spec, render

ENCFS = {"encfs": {"example": {"enabled": True}, "argsSecret": {"name": "encfs-args"}}}

__all__ = ["chart"]


def test_encfs_example_renders_valid_kubernetes(chart: Any) -> None:
    objects = render(chart, ENCFS)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "ServiceAccount"]
    assert_valid_kubernetes(objects)
    assert [c["name"] for c in pod_spec(objects)["containers"]] == ["app", "skr-encfs"]


def test_the_encfs_sidecar_alone_is_privileged_and_shares_its_mounts(chart: Any) -> None:
    objects = render(chart, ENCFS)
    encfs = container(objects, "skr-encfs")
    app = container(objects, "app")
    assert encfs["securityContext"]["privileged"] is True
    assert app["securityContext"]["allowPrivilegeEscalation"] is False
    assert encfs["volumeMounts"] == [
        {"name": "skr-encfs-mounts", "mountPath": "/mnt/remote", "mountPropagation": "Bidirectional"}
    ]
    assert app["volumeMounts"][0]["mountPropagation"] == "HostToContainer"
    assert {"name": "skr-encfs-mounts", "emptyDir": {}} in pod_spec(objects)["volumes"]


def test_the_encfs_sidecar_reads_the_go_variable_from_a_secret_and_probes_readyz(chart: Any) -> None:
    encfs = container(render(chart, ENCFS), "skr-encfs")
    (args_env,) = [e for e in encfs["env"] if e["name"] == "EncfsSideCarArgs"]
    assert args_env["valueFrom"]["secretKeyRef"] == {"name": "encfs-args", "key": "EncfsSideCarArgs"}
    assert encfs["args"][:2] == ["encfs", "--backend"]
    assert encfs["args"][encfs["args"].index("--port") + 1] == "8081"
    assert "/readyz" in encfs["readinessProbe"]["exec"]["command"][-1]
    assert "/healthz" in encfs["livenessProbe"]["exec"]["command"][-1]
    assert encfs["image"] == "myregistry.azurecr.io/skr:0.1.0-encfs"


def test_encfs_needs_its_secret(chart: Any) -> None:
    with pytest.raises(Exception, match=r"encfs\.argsSecret\.name is required"):
        render(chart, {"encfs": {"example": {"enabled": True}}})
