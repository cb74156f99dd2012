"""examples/aci/encfs: the encfs variant of the ACI example keeps the Go example's shape (privileged
sidecar, shared emptyDir at /mnt/remote, EncfsSideCarArgs) with skr encfs and its probes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "aci" / "encfs" / "skr-encfs-aci.json"


def containers() -> dict[str, dict[str, Any]]:
    doc = json.loads(TEMPLATE.read_text())
    (group,) = doc["resources"]
    assert group["properties"]["sku"] == "Confidential"
    return {c["name"]: c["properties"] for c in group["properties"]["containers"]}


def test_the_encfs_sidecar_runs_skr_encfs_privileged_with_the_go_variable() -> None:
    encfs = containers()["skr-encfs"]
    assert encfs["command"][:2] == ["skr", "encfs"]
    assert encfs["securityContext"] == {"privileged": True}
    env = {e["name"]: e for e in encfs["environmentVariables"]}
    assert env["EncfsSideCarArgs"] == {
        "name": "EncfsSideCarArgs",
        "secureValue": "[parameters('encfsSideCarArgs')]",
    }
    assert "/readyz" in encfs["readinessProbe"]["exec"]["command"][-1]


def test_app_and_sidecar_share_the_mount_directory_and_only_the_sidecar_is_privileged() -> None:
    found = containers()
    for name in ("app", "skr-encfs"):
        assert found[name]["volumeMounts"] == [{"name": "remotemounts", "mountPath": "/mnt/remote"}]
    assert "securityContext" not in found["app"]


def test_every_parameter_is_used_and_every_reference_is_declared() -> None:
    text = TEMPLATE.read_text()
    declared = set(json.loads(text)["parameters"])
    used = {p.split("'")[1] for p in text.split("parameters(")[1:]}
    assert declared == used
