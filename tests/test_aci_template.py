"""The ACI example examples/aci/skr-aci.json: a confidential container group with the skr sidecar.

Structure only — nothing here deploys or pretends to. The template must parse, be a Confidential group
whose ccePolicy comes from its parameter, use a user-assigned identity, wire the sidecar's environment
(the Go sidecar's names and skr's own), use every parameter it declares and declare every one it uses,
and keep every value that reaches a container in the form `az confcom acipolicygen` can pin into the
policy: a literal or one whole `[parameters('name')]`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

ACI = Path(__file__).resolve().parents[1] / "examples" / "aci"
PARAM_REF = re.compile(r"parameters\(\s*'([^']+)'\s*\)")
WHOLE_PARAM = re.compile(r"^\[parameters\('([^'.\/]+)'\)\]$")  # the only expression confcom resolves


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ACI / "skr-aci.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def group(template: dict[str, Any]) -> dict[str, Any]:
    (resource,) = template["resources"]
    assert resource["type"] == "Microsoft.ContainerInstance/containerGroups"
    return dict(resource)


def containers(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c["properties"] for c in group["properties"]["containers"]}


def env_of(properties: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in properties.get("environmentVariables", [])}


def strings_in(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*strings_in(key), *strings_in(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    return []


def test_the_group_is_confidential_and_its_policy_is_the_parameter(template, group):
    assert template["$schema"].endswith("/deploymentTemplate.json#")
    assert group["properties"]["sku"] == "Confidential"
    assert group["properties"]["osType"] == "Linux"
    assert group["properties"]["confidentialComputeProperties"] == {"ccePolicy": "[parameters('ccePolicy')]"}
    cce = template["parameters"]["ccePolicy"]
    assert cce["type"].lower() == "string"
    assert "defaultValue" not in cce, "an empty policy must never be the default"


def test_every_declared_parameter_is_used_and_every_used_one_declared(template):
    declared = set(template["parameters"])
    body = {key: value for key, value in template.items() if key != "parameters"}
    used = {name for text in strings_in(body) for name in PARAM_REF.findall(text)}
    # A parameter's default may refer to others (e.g. location → resourceGroup()), so count those too.
    used |= {
        name
        for spec in template["parameters"].values()
        for text in strings_in(spec.get("defaultValue", ""))
        for name in PARAM_REF.findall(text)
    }
    assert declared - used == set(), f"declared but unused: {sorted(declared - used)}"
    assert used - declared == set(), f"used but not declared: {sorted(used - declared)}"


def test_the_identity_is_user_assigned_and_comes_from_its_parameter(group):
    identity = group["identity"]
    assert identity["type"] == "UserAssigned"
    assert list(identity["userAssignedIdentities"]) == ["[parameters('identityResourceId')]"]


def test_the_sidecar_gets_the_go_contract_and_skrs_own_environment(group):
    skr = containers(group)["skr"]
    assert skr["image"] == "[parameters('skrImage')]"
    assert skr["command"][:2] == ["skr", "serve"]
    env = env_of(skr)
    assert env["Port"] == "8080"
    assert env["LogLevel"] == "[parameters('logLevel')]"
    assert env["SkrSideCarArgs"] == "[parameters('skrSideCarArgs')]"
    assert env["SKR_MAA_ENDPOINT"] == "[parameters('maaEndpoint')]"
    assert env["SKR_AKV_ENDPOINT"] == "[parameters('akvEndpoint')]"
    assert env["SKR_ALLOWED_ENDPOINTS"] == "[parameters('allowedEndpoints')]"


def test_the_sidecar_command_is_one_skr_serve_accepts():
    import argparse

    from skr.commands import serve

    skr_command = containers(json.loads((ACI / "skr-aci.json").read_text())["resources"][0])["skr"]["command"]
    parser = argparse.ArgumentParser(prog="skr")
    serve.register(parser.add_subparsers())
    args = parser.parse_args(skr_command[1:])
    assert args.audit_log == Path("/var/log/skr/audit.jsonl") and args.audit_stdout is True


def test_the_app_reaches_the_sidecar_on_loopback_and_nothing_is_exposed(group):
    listed = containers(group)
    assert set(listed) == {"app", "skr"}
    port = env_of(listed["skr"])["Port"]
    assert env_of(listed["app"])["SKR_URL"] == f"http://127.0.0.1:{port}"
    assert env_of(listed["app"])["SKR_KID"] == "[parameters('keyName')]"
    assert "ipAddress" not in group["properties"], "the group needs no public address"
    assert "ports" not in listed["skr"]


def test_probes_are_exec_probes_on_the_sidecars_loopback_port(group):
    skr = containers(group)["skr"]
    port = env_of(skr)["Port"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        command = skr[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        assert f"'http://127.0.0.1:{port}{path}'" in command[2]
        assert "ProxyHandler({})" in command[2]


def test_every_container_value_is_a_literal_or_a_whole_parameter_reference(group):
    """acipolicygen pins `[parameters('x')]` (from the parameters file) and literals into the policy; any
    other ARM expression would reach the policy as its literal text and the group would be refused."""
    for name, properties in containers(group).items():
        for text in strings_in({k: v for k, v in properties.items() if k != "resources"}):
            if text.startswith("["):
                assert WHOLE_PARAM.match(text), f"{name}: {text} is not resolvable by acipolicygen"


def test_every_container_requests_cpu_and_memory(group):
    for name, properties in containers(group).items():
        requests = properties["resources"]["requests"]
        assert requests["cpu"] > 0 and requests["memoryInGB"] > 0, name


def test_the_parameters_file_names_only_declared_parameters_and_all_required_but_the_policy(template):
    params = json.loads((ACI / "skr-aci.parameters.json").read_text())
    assert params["$schema"].endswith("/deploymentParameters.json#")
    given = set(params["parameters"])
    declared = set(template["parameters"])
    assert given <= declared
    required = {name for name, spec in template["parameters"].items() if "defaultValue" not in spec}
    assert required - given == {"ccePolicy"}  # produced by acipolicygen, passed at deploy time


def test_the_example_sidecar_args_are_what_skr_decodes_as_the_identity(template):
    from skr.config import decode_sidecar_args

    value = json.loads((ACI / "skr-aci.parameters.json").read_text())["parameters"]["skrSideCarArgs"]["value"]
    base64.b64decode(value, validate=True)  # standard base64, as the Go sidecar requires
    assert decode_sidecar_args(value) == {"identity": {"client_id": "00000000-0000-0000-0000-000000000000"}}


def test_the_readme_walks_the_real_sequence_in_order():
    readme = (ACI / "README.md").read_text()
    steps = [
        "az confcom acipolicygen",
        "skr policy hash --cce-policy",
        "skr policy release --authority",
        "skr keys create",
        "az deployment group create",
        "localhost:8080/key/release",
    ]
    positions = [readme.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions)
