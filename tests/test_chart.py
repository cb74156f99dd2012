"""The Helm chart charts/skr, rendered by a real Helm engine (helm-python-sdk embeds Helm 4; no cluster).

Every rendered object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors), Helm lint runs on the chart, and values.schema.json must refuse bad values
with a message naming the offending key. The exec probes and the example app are run for real against a
loopback server, because kubelet cannot do that for us here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from aiohttp import web

from tests.e2e import serve_local

CHART = Path(__file__).resolve().parents[1] / "charts" / "skr"
KUBE_VERSION = "1.30.0"  # oldest Kubernetes minor AKS still supports for confidential pods; schemas bundled
CLIENT_ID = "0f3e1c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
EXAMPLE = {"example": {"enabled": True, "kid": "app-key"}}
# The default collateral source on AKS: the node-local THIM through IMDS, as Microsoft's Kata examples set it.
LOCAL_THIM = {
    "certcache": {"endpoint_type": "LocalTHIM", "endpoint": "169.254.169.254/metadata/THIM/amd/certification"}
}


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge value overrides (later layers win), like repeated `helm -f`."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Rendered templates → Kubernetes objects, parsed by Helm's own YAML reader (sigs.k8s.io/yaml)."""
    objects = []
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        for doc in re.split(r"^---\s*$", text, flags=re.MULTILINE):
            if doc.strip():
                objects.append(helm.values_from_yaml(doc))
    return objects


def render(chart: helm.Chart, *layers: dict[str, Any]) -> list[dict[str, Any]]:
    return parse_manifests(chart.render(merge(*layers), name="demo", namespace="apps"))


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[o['kind'] for o in objects]}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]], name: str = "skr") -> dict[str, Any]:
    (found,) = [c for c in pod_spec(objects)["containers"] if c["name"] == name]
    return dict(found)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def volume(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == name]
    return dict(found)


def assert_valid_kubernetes(objects: list[dict[str, Any]]) -> None:
    assert objects, "nothing rendered"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes: {path}: {exc.message}"
            )


# --- Defaults -------------------------------------------------------------------------------------------


def test_default_values_render_no_workload_so_the_chart_can_be_a_template_dependency(chart):
    rendered = chart.render(name="demo", namespace="apps")
    assert parse_manifests(rendered) == []
    notes = next(text for name, text in rendered.items() if name.endswith("NOTES.txt"))
    assert '"skr.sidecar"' in notes


def test_values_image_tag_follows_the_chart_app_version(chart):
    assert chart.values["image"]["tag"] == chart.metadata["appVersion"]


def test_example_renders_a_deployment_and_service_account_valid_for_kubernetes(chart):
    objects = render(chart, EXAMPLE)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "ServiceAccount"]
    assert_valid_kubernetes(objects)
    spec = pod_spec(objects)
    assert spec["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False
    assert [c["name"] for c in spec["containers"]] == ["app", "skr"]


# --- Secure by default ----------------------------------------------------------------------------------


def test_every_container_is_non_root_read_only_unprivileged_and_confined(chart):
    objects = render(chart, EXAMPLE)
    for c in pod_spec(objects)["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["privileged"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
    skr = container(objects)["securityContext"]
    assert skr["runAsUser"] == 65532 and skr["runAsGroup"] == 65532
    pod = pod_spec(objects)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}


def test_every_container_has_cpu_and_memory_requests_and_limits(chart):
    for c in pod_spec(render(chart, EXAMPLE))["containers"]:
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, (c["name"], kind)


def test_the_sidecar_exposes_no_port_and_the_chart_no_service(chart):
    objects = render(chart, EXAMPLE)
    assert "ports" not in container(objects)
    assert not [o for o in objects if o["kind"] in ("Service", "Ingress")]


def test_only_state_and_audit_are_writable_and_the_endorsement_is_read_only(chart):
    mounts = {m["mountPath"]: m for m in container(render(chart, EXAMPLE))["volumeMounts"]}
    writable = sorted(path for path, m in mounts.items() if not m.get("readOnly"))
    assert writable == ["/var/lib/skr", "/var/log/skr"]
    reference = "/opt/confidential-containers/share/kata-containers/reference-info-base64"
    assert mounts[reference]["readOnly"] is True


# --- Probes ---------------------------------------------------------------------------------------------


def test_probes_are_exec_probes_against_the_loopback_listener(chart):
    skr = container(render(chart, EXAMPLE, {"port": 9123}))
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        command = skr[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"], probe
        assert f"'http://127.0.0.1:9123{path}'" in command[2], probe
        assert "httpGet" not in skr[probe]
        assert skr[probe]["timeoutSeconds"] >= 2
    assert skr["startupProbe"]["failureThreshold"] * skr["startupProbe"]["periodSeconds"] >= 30


@pytest.fixture
async def fake_skr_health() -> Any:
    """A loopback server answering like skr's health endpoints: alive (/healthz 200) but not ready (503)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response(
            {"error": "evidence unavailable", "code": "evidence_unavailable"}, status=503
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    async with serve_local(app) as address:
        yield int(address.rsplit(":", 1)[1])


async def run_probe(command: list[str], *, proxy: str = "http://127.0.0.1:9/") -> int:
    """Run a rendered exec-probe command the way kubelet would, with this interpreter as python3. An
    HTTP proxy that does not exist is set, to prove the probe never goes through a proxy."""
    assert command[0] == "python3"
    env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), timeout=20)


async def test_rendered_probe_commands_pass_on_200_and_fail_on_503_or_no_listener(chart, fake_skr_health):
    skr = container(render(chart, EXAMPLE, {"port": fake_skr_health}))
    assert await run_probe(skr["livenessProbe"]["exec"]["command"]) == 0
    assert await run_probe(skr["startupProbe"]["exec"]["command"]) == 0
    assert await run_probe(skr["readinessProbe"]["exec"]["command"]) != 0  # 503: not ready

    # Nobody listening (port 1 on loopback refuses the connection).
    skr = container(render(chart, EXAMPLE, {"port": 1}))
    assert await run_probe(skr["livenessProbe"]["exec"]["command"]) != 0


# --- Placement, identity, policy --------------------------------------------------------------------------


def test_runtime_class_defaults_to_kata_confidential_and_can_be_changed_or_unset(chart):
    assert pod_spec(render(chart, EXAMPLE))["runtimeClassName"] == "kata-cc-isolation"
    assert pod_spec(render(chart, EXAMPLE, {"runtimeClassName": "kata-cc"}))["runtimeClassName"] == "kata-cc"
    assert "runtimeClassName" not in pod_spec(render(chart, EXAMPLE, {"runtimeClassName": ""}))


def test_workload_identity_labels_the_pod_and_annotates_the_service_account(chart):
    objects = render(chart, EXAMPLE, {"workloadIdentity": {"clientId": CLIENT_ID}})
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true"
    annotations = one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert annotations == {"azure.workload.identity/client-id": CLIENT_ID}
    assert_valid_kubernetes(objects)


def test_workload_identity_disabled_leaves_no_label_and_no_annotation(chart):
    objects = render(chart, EXAMPLE, {"workloadIdentity": {"enabled": False, "clientId": CLIENT_ID}})
    assert (
        "azure.workload.identity/use"
        not in one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    )
    assert "annotations" not in one(objects, "ServiceAccount")["metadata"]


def test_kata_agent_policy_becomes_the_pod_annotation_only_when_given(chart):
    policy = base64.b64encode(b"package agent_policy\n\ndefault CreateContainerRequest := false\n").decode()
    template = one(render(chart, EXAMPLE, {"kataPolicy": policy}), "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {"io.katacontainers.config.agent.policy": policy}
    template = one(render(chart, EXAMPLE), "Deployment")["spec"]["template"]
    assert "annotations" not in template["metadata"]


# --- Environment and flags --------------------------------------------------------------------------------


def test_defaults_wire_only_log_level_state_and_the_uvm_context(chart):
    skr = container(render(chart, EXAMPLE))
    env = env_of(skr)
    assert json.loads(base64.b64decode(env.pop("SkrSideCarArgs"), validate=True)) == LOCAL_THIM
    assert env == {
        "POD_NAME": "",  # from the downward API (metadata.name)
        "LogLevel": "info",
        "SKR_STATE_DIR": "/var/lib/skr",
        "UVM_SECURITY_CONTEXT_DIR": "/opt/confidential-containers/share/kata-containers",
    }
    assert skr["args"] == [
        "--port",
        "8080",
        "--evidence",
        "auto",
        "--audit-log",
        "/var/log/skr/audit-$(POD_NAME).jsonl",
        "--audit-stdout",
    ]
    assert "command" not in skr  # the image's ENTRYPOINT `skr serve` runs
    assert skr["image"] == "myregistry.azurecr.io/skr:0.1.0"


def test_custom_values_reach_the_sidecar_environment(chart):
    sidecar_args = {"identity": {"client_id": CLIENT_ID}, "maaconfig": {"user_agent": "contoso/1"}}
    values = {
        "logLevel": "debug",
        "maa": {"endpoint": "sharedeus.eus.attest.azure.net"},
        "keyVault": {"endpoint": "myhsm.managedhsm.azure.net"},
        "allowedEndpoints": ["sharedeus.eus.attest.azure.net", "myhsm.managedhsm.azure.net"],
        "tokenReuse": False,
        "sidecarArgs": sidecar_args,
        "caBundle": {"configMap": "corp-roots"},
        "clientToken": {"secretName": "skr-client"},
        "extraEnv": [{"name": "SKR_REQUEST_DEADLINE", "value": "20"}],
        "extraArgs": ["--deadline", "20"],
        "uvmReferenceInfo": {"enabled": False},
        "port": 9000,
    }
    objects = render(chart, EXAMPLE, values)
    assert_valid_kubernetes(objects)
    skr = container(objects)
    env = env_of(skr)
    assert env["LogLevel"] == "debug"
    assert env["SKR_MAA_ENDPOINT"] == "sharedeus.eus.attest.azure.net"
    assert env["SKR_AKV_ENDPOINT"] == "myhsm.managedhsm.azure.net"
    assert env["SKR_ALLOWED_ENDPOINTS"] == "sharedeus.eus.attest.azure.net,myhsm.managedhsm.azure.net"
    assert env["SKR_TOKEN_REUSE"] == "off"
    assert json.loads(base64.b64decode(env["SkrSideCarArgs"], validate=True)) == {
        **LOCAL_THIM,
        **sidecar_args,
    }
    assert env["SKR_CA_BUNDLE"] == "/etc/skr/ca/ca.crt"
    assert env["SKR_CLIENT_TOKEN_FILE"] == "/etc/skr/client-token/token"
    assert env["SKR_REQUEST_DEADLINE"] == "20"
    assert "UVM_SECURITY_CONTEXT_DIR" not in env
    assert skr["args"][:2] == ["--port", "9000"] and skr["args"][-2:] == ["--deadline", "20"]
    assert volume(objects, "skr-ca-bundle")["configMap"]["name"] == "corp-roots"
    assert volume(objects, "skr-client-token")["secret"]["secretName"] == "skr-client"
    assert not [v for v in pod_spec(objects)["volumes"] if v["name"] == "skr-uvm-reference-info"]
    app = container(objects, "app")
    assert env_of(app)["SKR_URL"] == "http://127.0.0.1:9000"
    assert env_of(app)["SKR_CLIENT_TOKEN_FILE"] == "/etc/skr/client-token/token"


def test_the_sidecars_args_and_env_mean_what_the_values_say_to_skr_serve(chart):
    """The contract between chart and daemon: the rendered flags parse with the real `skr serve` parser
    and, with the rendered environment, resolve to the settings the values asked for."""
    from skr.commands import serve
    from skr.config import load_settings

    values = {
        "logLevel": "warning",
        "maa": {"endpoint": "sharedeus.eus.attest.azure.net"},
        "keyVault": {"endpoint": "myvault.vault.azure.net"},
        "allowedEndpoints": ["sharedeus.eus.attest.azure.net", "myvault.vault.azure.net"],
        "tokenReuse": False,
        "sidecarArgs": {"identity": {"client_id": CLIENT_ID}},
        "caBundle": {"configMap": "corp-roots"},
        "port": 9000,
        "evidence": "tsm",
    }
    skr = container(render(chart, EXAMPLE, values))
    parser = argparse.ArgumentParser(prog="skr")
    serve.register(parser.add_subparsers())
    pod = "demo-skr-example-7d9f8-x2x4q"  # what Kubernetes does: $(POD_NAME) in args from the downward API
    args = parser.parse_args(["serve", *(a.replace("$(POD_NAME)", pod) for a in skr["args"])])
    settings = load_settings(args, env_of(skr))
    assert (settings.host, settings.port, settings.allow_remote) == ("127.0.0.1", 9000, False)
    assert settings.log_level == "warning"
    assert settings.evidence == "tsm"
    assert str(settings.maa_endpoint) == "sharedeus.eus.attest.azure.net"
    assert str(settings.akv_endpoint) == "myvault.vault.azure.net"
    assert settings.allowlist.patterns == ("sharedeus.eus.attest.azure.net", "myvault.vault.azure.net")
    assert settings.token_reuse is False
    assert settings.identity_client_id == CLIENT_ID
    assert settings.ca_bundle == Path("/etc/skr/ca/ca.crt")
    assert settings.state_dir == Path("/var/lib/skr")
    assert settings.audit_log == Path(f"/var/log/skr/audit-{pod}.jsonl") and settings.audit_stdout is True


def test_the_default_collateral_source_is_the_node_local_thim_and_skr_reads_it_so(chart):
    from skr.commands import serve
    from skr.config import load_settings
    from skr.snp.collateral import CollateralClient, CollateralSource
    from skr.snp.kds import THIM_URL

    skr = container(render(chart, EXAMPLE))
    parser = argparse.ArgumentParser(prog="skr")
    serve.register(parser.add_subparsers())
    settings = load_settings(parser.parse_args(["serve", *skr["args"]]), env_of(skr))
    assert settings.certcache.endpoint_type == "LocalTHIM"
    client = CollateralClient.from_certcache(None, settings.certcache)  # type: ignore[arg-type]
    assert client.source is CollateralSource.LOCAL_THIM
    assert client.thim_url == THIM_URL  # plain HTTP to IMDS, as the Go sidecar's Kata example
    # without certcache skr falls back to AMD KDS; the values and README say where chains come from
    no_certcache = {"sidecarArgs": {"certcache": None}}
    assert "SkrSideCarArgs" not in env_of(container(render(chart, EXAMPLE, no_certcache)))
    text = (CHART / "values.yaml").read_text() + (CHART / "README.md").read_text()
    for fact in ("LocalTHIM", "host-amd-cert-base64", "kdsintf.amd.com", "429", "IMDS"):
        assert fact in text, fact


@pytest.mark.parametrize(
    "given",
    [
        "sharedeus.eus.attest.azure.net,myvault.vault.azure.net",
        " sharedeus.eus.attest.azure.net , myvault.vault.azure.net ,",
        ["sharedeus.eus.attest.azure.net", "myvault.vault.azure.net"],
    ],
)
def test_allowed_endpoints_as_a_list_or_a_comma_separated_string(chart, given):
    env = env_of(container(render(chart, EXAMPLE, {"allowedEndpoints": given})))
    assert env["SKR_ALLOWED_ENDPOINTS"] == "sharedeus.eus.attest.azure.net,myvault.vault.azure.net"


def test_empty_allowed_endpoints_string_leaves_the_built_in_list(chart):
    assert "SKR_ALLOWED_ENDPOINTS" not in env_of(
        container(render(chart, EXAMPLE, {"allowedEndpoints": " , "}))
    )


@pytest.mark.parametrize(
    "where", [{"image": {"tag": "latest"}}, {"example": {"image": {"repository": "a/b", "tag": "latest"}}}]
)
def test_image_tag_latest_is_refused_with_a_sentence(chart, where):
    with pytest.raises(helm.HelmError) as info:
        chart.render(merge(EXAMPLE, where), name="demo", namespace="apps")
    message = str(info.value)
    assert 'image.tag "latest" is refused: a moving tag can change the code that handles your keys' in message
    assert "'not' failed" not in message


def test_image_digest_pins_the_image_by_digest(chart):
    digest = "sha256:" + "ab" * 32
    assert container(render(chart, EXAMPLE, {"image": {"digest": digest}}))["image"] == (
        f"myregistry.azurecr.io/skr@{digest}"
    )


# --- Audit volume -----------------------------------------------------------------------------------------


def test_audit_log_defaults_to_an_empty_dir_with_a_size_limit(chart):
    objects = render(chart, EXAMPLE)
    assert volume(objects, "skr-audit") == {"name": "skr-audit", "emptyDir": {"sizeLimit": "256Mi"}}


def test_audit_log_on_an_existing_claim(chart):
    objects = render(
        chart, EXAMPLE, {"audit": {"volume": {"type": "existingClaim", "claimName": "skr-audit"}}}
    )
    assert volume(objects, "skr-audit") == {
        "name": "skr-audit",
        "persistentVolumeClaim": {"claimName": "skr-audit"},
    }
    assert pod_spec(objects)["securityContext"]["fsGroup"] == 65532  # so uid 65532 can write to the claim
    assert_valid_kubernetes(objects)


def test_the_audit_file_is_named_per_pod_through_the_downward_api(chart):
    skr = container(render(chart, EXAMPLE))
    (pod_name,) = [e for e in skr["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "/var/log/skr/audit-$(POD_NAME).jsonl" in skr["args"]


SHARED_CLAIM = {"audit": {"volume": {"type": "existingClaim", "claimName": "skr-audit"}}}


def test_several_replicas_on_one_claim_are_fine_with_a_file_per_pod(chart):
    objects = render(chart, EXAMPLE, SHARED_CLAIM, {"example": {"replicas": 3}})
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    fixed = {"audit": {"file": "audit.jsonl"}}
    assert render(chart, EXAMPLE, SHARED_CLAIM, fixed)  # one replica may keep a fixed name
    assert render(chart, EXAMPLE, fixed, {"example": {"replicas": 3}})  # emptyDir is per pod anyway


def test_schema_refuses_a_fixed_audit_file_on_a_shared_claim_with_several_replicas(chart):
    values = merge(EXAMPLE, SHARED_CLAIM, {"audit": {"file": "audit.jsonl"}, "example": {"replicas": 2}})
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name="demo", namespace="apps")
    assert "/audit/file" in str(info.value), str(info.value)


def test_audit_disabled_drops_its_flags_volume_and_mount(chart):
    objects = render(chart, EXAMPLE, {"audit": {"enabled": False}})
    skr = container(objects)
    assert not [a for a in skr["args"] if a.startswith("--audit")]
    assert "/var/log/skr" not in [m["mountPath"] for m in skr["volumeMounts"]]
    assert not [v for v in pod_spec(objects)["volumes"] if v["name"] == "skr-audit"]


def test_audit_without_stdout_shipping_keeps_only_the_file(chart):
    skr = container(render(chart, EXAMPLE, {"audit": {"stdout": False}}))
    assert "--audit-log" in skr["args"] and "--audit-stdout" not in skr["args"]


# --- Helm lint and schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, EXAMPLE], ids=["defaults", "example"])
def test_helm_lint_strict_finds_nothing_but_the_missing_icon(values):
    report = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == []
    findings = [m for m in report["messages"] if m["error"] != "icon is recommended"]
    assert findings == []


BAD_VALUES = [
    ({"port": "abc"}, "/port", "got string, want integer"),
    ({"port": 70000}, "/port", "want 65,535"),
    ({"runtimeClassName": 5}, "/runtimeClassName", "got number, want string"),
    (
        {"audit": {"volume": {"type": "hostPath"}}},
        "/audit/volume/type",
        "must be one of 'emptyDir', 'existingClaim'",
    ),
    ({"audit": {"volume": {"type": "existingClaim"}}}, "/audit/volume/claimName", "minLength"),
    ({"evidence": "virtual"}, "/evidence", "must be one of 'auto', 'sevguest', 'sev', 'tsm'"),
    ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser", "minimum"),
    ({"runtimeClasName": "kata-cc"}, "'runtimeClasName' not allowed", "additional properties"),
    (
        {"resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": None}},
        "/resources",
        "missing property 'limits'",
    ),
    ({"example": {"enabled": True}}, "/example/kid", "minLength"),
    ({"maa": {"endpoint": "https://sharedeus.eus.attest.azure.net"}}, "/maa/endpoint", "pattern"),
    ({"workloadIdentity": {"clientId": "not-a-guid"}}, "/workloadIdentity/clientId", "pattern"),
    ({"kataPolicy": "not base64!"}, "/kataPolicy", "pattern"),
    ({"example": {"image": {"repository": "contoso.azurecr.io/app"}}}, "/example/image/tag", "minLength"),
    ({"grpc": {"port": 0}}, "/grpc/port", "minimum"),
    ({"grpc": {"enable": True}}, "'enable' not allowed", "additional properties"),
    ({"grpc": {"only": True}}, "/grpc/enabled", "value must be true"),
]


@pytest.mark.parametrize(("values", "where", "why"), BAD_VALUES, ids=[w for _, w, _ in BAD_VALUES])
def test_schema_refuses_bad_values_naming_the_key(chart, values, where, why):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name="demo", namespace="apps")
    message = str(info.value)
    assert where in message and why in message, message


def test_helm_lint_reports_schema_violations_as_errors():
    report = helm.lint(CHART, {"port": "abc", "runtimeClassName": 5})
    joined = "\n".join(report["errors"])
    assert "/port" in joined and "/runtimeClassName" in joined


# --- The named templates in someone else's chart -----------------------------------------------------------

PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels:
        app: shop
        {{- with include "skr.podLabels" (dict "values" .Values.skr) }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- with include "skr.podAnnotations" (dict "values" .Values.skr) }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      runtimeClassName: {{ .Values.skr.runtimeClassName }}
      containers:
        - name: shop
          image: contoso.azurecr.io/shop:1.4.2
          resources:
            requests: {cpu: 100m, memory: 128Mi}
            limits: {cpu: 500m, memory: 256Mi}
        {{- include "skr.sidecar" (dict "values" .Values.skr) | nindent 8 }}
      volumes:
        {{- include "skr.volumes" (dict "values" .Values.skr) | nindent 8 }}
"""


def test_named_templates_inject_the_sidecar_into_a_parent_charts_pod(tmp_path):
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\ndependencies:\n  - name: skr\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text("skr:\n  port: 9100\n  kataPolicy: cGFja2FnZQ==\n")
    (parent / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    shutil.copytree(CHART, parent / "charts" / "skr")

    with helm.Chart.load(parent) as shop:
        objects = parse_manifests(shop.render(name="shop", namespace="apps"))
        assert_valid_kubernetes(objects)
        deployment = one(objects, "Deployment")
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
        assert template["metadata"]["annotations"]["io.katacontainers.config.agent.policy"] == "cGFja2FnZQ=="
        assert template["spec"]["runtimeClassName"] == "kata-cc-isolation"
        assert container(objects)["args"][:2] == ["--port", "9100"]
        assert {v["name"] for v in template["spec"]["volumes"]} == {
            "skr-state",
            "skr-audit",
            "skr-uvm-reference-info",
        }

        # The subchart's schema guards the parent's skr values too.
        with pytest.raises(helm.HelmValuesError, match="/port"):
            shop.render({"skr": {"port": "abc"}}, name="shop", namespace="apps")


# --- The example app, run for real -------------------------------------------------------------------------


@pytest.fixture
async def fake_skr_release() -> Any:
    """A loopback server with skr's documented release API: /readyz turns ready after one 503, and
    /key/release answers {"key": "<JWK as a JSON string>"} for the kid it is asked for."""
    state: dict[str, Any] = {"readyz_calls": 0, "kids": []}
    jwk = {
        "k": "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcyEhISE",
        "key_ops": ["encrypt", "decrypt"],
        "kty": "oct",
    }

    async def readyz(_: web.Request) -> web.Response:
        state["readyz_calls"] += 1
        if state["readyz_calls"] == 1:
            return web.json_response({"error": "warming up", "code": "not_ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def release(request: web.Request) -> web.Response:
        state["kids"].append((await request.json())["kid"])
        return web.json_response({"key": json.dumps(jwk, sort_keys=True, separators=(",", ":"))})

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/key/release", release)
    async with serve_local(app) as address:
        yield int(address.rsplit(":", 1)[1]), state, jwk


async def test_example_app_waits_for_readiness_releases_its_key_and_never_prints_it(chart, fake_skr_release):
    port, state, jwk = fake_skr_release
    app = container(render(chart, EXAMPLE, {"port": port}), "app")
    assert app["command"][:2] == ["python3", "-c"]
    env = {**env_of(app), "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", app["command"][2], env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("released"):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert line, f"the example app exited early: {lines}"
            lines.append(line.decode().strip())
        assert state["kids"] == ["app-key"]
        assert state["readyz_calls"] == 2
        assert lines[-1] == "released a oct key, key_ops ['encrypt', 'decrypt']"
        assert jwk["k"] not in "\n".join(lines)
        assert proc.returncode is None  # it keeps running, holding the key, like a real app
    finally:
        proc.kill()
        await proc.wait()


# --- The gRPC key provider (grpc.enabled, grpc.only, grpc.port) -------------------------------------------


def serve_settings_of(skr: dict[str, Any]) -> Any:
    from skr.commands import serve
    from skr.config import load_settings

    parser = argparse.ArgumentParser(prog="skr")
    serve.register(parser.add_subparsers())
    return load_settings(parser.parse_args(["serve", *skr["args"]]), env_of(skr))


def test_grpc_disabled_by_default_serves_http_only(chart):
    settings = serve_settings_of(container(render(chart, EXAMPLE)))
    assert settings.server_type == "http"


def test_grpc_enabled_serves_both_and_keeps_the_http_probes(chart):
    objects = render(chart, EXAMPLE, {"port": 9000, "grpc": {"enabled": True, "port": 50123}})
    assert_valid_kubernetes(objects)
    skr = container(objects)
    settings = serve_settings_of(skr)
    assert (settings.server_type, settings.port, settings.grpc_port) == ("both", 9000, 50123)
    assert "'http://127.0.0.1:9000/readyz'" in skr["readinessProbe"]["exec"]["command"][2]
    assert "'http://127.0.0.1:9000/healthz'" in skr["livenessProbe"]["exec"]["command"][2]
    assert "ports" not in skr  # still loopback only: no containerPort, no Service


def test_grpc_only_serves_grpc_on_its_port_with_grpc_health_probes(chart):
    objects = render(chart, EXAMPLE, {"grpc": {"enabled": True, "only": True, "port": 50123}})
    assert_valid_kubernetes(objects)
    skr = container(objects)
    settings = serve_settings_of(skr)
    assert (settings.server_type, settings.port) == ("grpc", 50123)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = skr[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and "grpc_health" in command[2], probe
        assert "'127.0.0.1:50123'" in command[2] and "http://" not in command[2], probe
    assert "SERVING" in skr["readinessProbe"]["exec"]["command"][2]
    assert "SERVING" not in skr["livenessProbe"]["exec"]["command"][2]


@pytest.fixture
async def fake_grpc_health() -> Any:
    """A loopback gRPC server with only the standard health service (stands in for skr in grpc mode)."""
    from grpc import aio
    from grpc_health.v1 import health, health_pb2_grpc

    server = aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(0)


async def test_rendered_grpc_probes_pass_when_serving_and_readiness_fails_before(chart, fake_grpc_health):
    from grpc_health.v1 import health_pb2

    port, servicer = fake_grpc_health
    skr = container(render(chart, EXAMPLE, {"grpc": {"enabled": True, "only": True, "port": port}}))
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await run_probe(skr["startupProbe"]["exec"]["command"]) == 0  # alive, not ready yet
    assert await run_probe(skr["livenessProbe"]["exec"]["command"]) == 0
    assert await run_probe(skr["readinessProbe"]["exec"]["command"]) != 0
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert await run_probe(skr["readinessProbe"]["exec"]["command"]) == 0

    # Nobody listening (port 1 on loopback refuses the connection).
    skr = container(render(chart, EXAMPLE, {"grpc": {"enabled": True, "only": True, "port": 1}}))
    assert await run_probe(skr["livenessProbe"]["exec"]["command"]) != 0
