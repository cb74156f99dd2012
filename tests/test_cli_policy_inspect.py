"""``skr policy inspect``: decode CCE policies (the genuine ACI one and policies written here) and warn
about every setting that weakens confidentiality."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from skr.cli import main
from skr.errors import BadRequest
from skr.snp.ccepolicy import decode_policy

GENUINE = "snp/aci-confidential-sidecar/uvm_security_policy.base64"
GENUINE_HOST_DATA = "cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c"

POINTS = [
    "mount_device",
    "unmount_device",
    "mount_overlay",
    "unmount_overlay",
    "create_container",
    "exec_in_container",
    "exec_external",
    "shutdown_container",
    "signal_container_process",
    "plan9_mount",
    "plan9_unmount",
    "get_properties",
    "dump_stacks",
    "runtime_logging",
    "load_fragment",
    "scratch_mount",
    "scratch_unmount",
]


def app_container(**overrides) -> dict[str, object]:
    container: dict[str, object] = {
        "allow_elevated": False,
        "allow_stdio_access": False,
        "capabilities": {
            "ambient": [],
            "bounding": ["CAP_CHOWN"],
            "effective": [],
            "inheritable": [],
            "permitted": [],
        },
        "command": ["python3", "main.py"],
        "env_rules": [
            {"pattern": "PATH=/usr/local/bin:/usr/bin", "required": False, "strategy": "string"},
            {"pattern": "IDENTITY_HEADER=.+", "required": False, "strategy": "re2"},
        ],
        "exec_processes": [],
        "id": "myregistry.azurecr.io/app@sha256:" + "ab" * 32,
        "layers": ["11" * 32, "22" * 32, "33" * 32],
        "mounts": [
            {
                "destination": "/etc/resolv.conf",
                "options": ["rbind", "rshared", "rw"],
                "source": "sandbox:///tmp/atlas/resolvconf/.+",
                "type": "bind",
            }
        ],
        "name": "app",
        "no_new_privileges": True,
        "seccomp_profile_sha256": "",
        "signals": [],
        "user": {"group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
        "working_dir": "/app",
    }
    container.update(overrides)
    return container


def acipolicygen_rego(containers: list[dict[str, object]], *, debug: bool = False) -> str:
    """A policy laid out as ``az confcom acipolicygen`` writes it (compact JSON containers, settings,
    then the enforcement points delegated to the framework)."""
    flag = "true" if debug else "false"
    fragments = [
        {
            "feed": "mcr.microsoft.com/aci/aci-cc-infra-fragment",
            "includes": ["containers", "fragments"],
            "issuer": "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s"
            "::eku:1.3.6.1.4.1.311.76.59.1.3",
            "minimum_svn": "1",
        }
    ]
    lines = [
        "package policy",
        "",
        "import future.keywords.every",
        "import future.keywords.in",
        "",
        'api_version := "0.10.0"',
        'framework_version := "0.2.3"',
        "",
        "fragments := " + json.dumps(fragments, indent=2),
        "",
        "containers := " + json.dumps(containers, separators=(",", ":")),
        "",
        "allow_properties_access := true",
        f"allow_dump_stacks := {flag}",
        f"allow_runtime_logging := {flag}",
        "allow_environment_variable_dropping := true",
        "allow_unencrypted_scratch := false",
        "allow_capability_dropping := true",
        "",
        *(f"{p} := data.framework.{p}" for p in POINTS),
        "",
        'reason := {"errors": data.framework.errors}',
        "",
    ]
    return "\n".join(lines)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_genuine_aci_policy_is_allow_all_and_says_so(vectors, capsys):
    code, out, err = run(capsys, "inspect", "--cce-policy", str(vectors / GENUINE), "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["host_data"] == GENUINE_HOST_DATA
    raw = base64.b64decode((vectors / GENUINE).read_bytes())
    assert doc["host_data"] == hashlib.sha256(raw).hexdigest()
    assert doc["api_version"] == "0.10.0" and doc["framework_version"] is None
    assert doc["allow_all"] is True and doc["containers"] == []
    assert doc["rules"] == dict.fromkeys(POINTS, "allow-all")
    assert doc["warnings"][0].startswith("allow-all policy")
    for point in ("exec_in_container", "exec_external", "dump_stacks", "runtime_logging", "create_container"):
        assert any(w.startswith(f"{point} is allowed outright") for w in doc["warnings"])
    assert any(n.startswith("shutdown_container is allowed outright") for n in doc["notes"])
    code, text, _ = run(capsys, "inspect", "--cce-policy", str(vectors / GENUINE))
    assert code == 0
    assert f"HOST_DATA          {GENUINE_HOST_DATA}" in text
    assert "WARNING: exec_in_container is allowed outright" in text


def test_a_production_policy_lists_its_containers_and_warns_about_nothing(tmp_path, capsys):
    pause = app_container(
        name="pause-container",
        id="mcr.microsoft.com/oss/kubernetes/pause:3.6",
        command=["/pause"],
        layers=["16" * 32],
        mounts=[],
        env_rules=[],
    )
    rego = acipolicygen_rego([app_container(), pause])
    path = tmp_path / "policy.b64"
    path.write_bytes(base64.b64encode(rego.encode()))
    code, out, _ = run(capsys, "inspect", "--cce-policy", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["host_data"] == hashlib.sha256(rego.encode()).hexdigest()
    assert (doc["api_version"], doc["framework_version"]) == ("0.10.0", "0.2.3")
    assert doc["allow_all"] is False and doc["rules"] == dict.fromkeys(POINTS, "framework")
    assert doc["settings"] == {
        "allow_properties_access": True,
        "allow_dump_stacks": False,
        "allow_runtime_logging": False,
        "allow_environment_variable_dropping": True,
        "allow_unencrypted_scratch": False,
        "allow_capability_dropping": True,
    }
    app = doc["containers"][0]
    assert app["image"].startswith("myregistry.azurecr.io/app@sha256:") and app["layers"] == 3
    assert app["command"] == ["python3", "main.py"] and app["exec_processes"] == []
    assert app["env_rules"][1] == {"pattern": "IDENTITY_HEADER=.+", "strategy": "re2", "required": False}
    assert app["mounts"][0]["destination"] == "/etc/resolv.conf"
    assert doc["containers"][1]["name"] == "pause-container"
    assert doc["fragments"][0]["feed"] == "mcr.microsoft.com/aci/aci-cc-infra-fragment"
    assert doc["warnings"] == []
    assert any("allow_properties_access is true" in n for n in doc["notes"])


def test_a_debug_policy_warns_about_each_weakening_setting(tmp_path, capsys):
    debug = app_container(
        exec_processes=[{"command": ["/bin/sh"], "signals": []}],
        allow_stdio_access=True,
        allow_elevated=True,
        env_rules=[{"pattern": ".+=.+", "required": False, "strategy": "re2"}],
    )
    rego = acipolicygen_rego([debug], debug=True)
    rego = rego.replace("allow_unencrypted_scratch := false", "allow_unencrypted_scratch := true")
    rego = rego.replace("exec_external := data.framework.exec_external", 'exec_external := {"allowed": true}')
    rego += 'external_processes := [{"command": ["bash"], "env_rules": [], "working_dir": "/"}]\n'
    path = tmp_path / "debug.rego"
    path.write_text(rego)
    code, out, _ = run(capsys, "inspect", "--cce-policy", str(path))
    assert code == 0
    warnings = [line[len("WARNING: ") :] for line in out.splitlines() if line.startswith("WARNING: ")]
    assert warnings == [
        "exec_external is allowed outright: the host can run any process in the UVM",
        "allow_dump_stacks is true: the host can dump the stacks of guest processes, which may hold secrets",
        "allow_runtime_logging is true: the guest runtime's logs go to the host",
        "allow_unencrypted_scratch is true: container scratch storage may be unencrypted, "
        "readable by the host",
        "container 'app': the host can exec /bin/sh in it",
        "container 'app' runs privileged (allow_elevated): it can reach the UVM and other containers",
        "container 'app': env rule '.+=.+' lets the host set variables of any name",
        "the host can run bash in the UVM (external_processes)",
    ]
    assert '    exec         ["/bin/sh"]' in out
    assert "note: container 'app': its stdout/stderr go to the host" in out


def test_the_older_svn_layout_with_raw_strings_and_trailing_commas(capsys, tmp_path):
    rego = """package policy

api_svn := "0.10.0"
framework_svn := "0.1.0"

containers := [
    {
        "command": ["/pause"],
        "env_rules": [{"pattern": `PATH=/usr/local/sbin:/usr/bin`, "strategy": "string", "required": true}],
        "layers": ["16b514057a06ad665f92c02863aca074fd5976c755d26bff16365299169e8415"],
        "mounts": [],
        "exec_processes": [],
        "signals": [],
        "allow_elevated": false,
        "working_dir": "/",
        "allow_stdio_access": false,
    },
]
allow_properties_access := true
allow_dump_stacks := true  # debugging only
allow_runtime_logging := false

mount_device := data.framework.mount_device
default allow := false
"""
    policy = decode_policy(rego.encode())
    assert (policy.api_version, policy.framework_version) == ("0.10.0", "0.1.0")
    assert policy.containers[0].command == ["/pause"] and policy.containers[0].layers == 1
    assert policy.containers[0].env_rules[0]["pattern"] == "PATH=/usr/local/sbin:/usr/bin"
    assert policy.rules == {"mount_device": "framework"}
    assert policy.settings["allow_dump_stacks"] is True
    assert any(w.startswith("allow_dump_stacks is true") for w in policy.warnings)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (b"\x00\xff\xfe binary", "neither base64 nor UTF-8"),
        (b"just some text\n", "no 'package' line"),
        (b'package policy\ncontainers := [{"command": [}]\n', "'containers :=' value does not parse"),
        (b'package policy\ncontainers := {"a": 1}\n', "containers is not a list of objects"),
    ],
)
def test_unusable_policies_are_one_line_errors(tmp_path, capsys, text, complaint):
    with pytest.raises(BadRequest, match=complaint):
        decode_policy(text)
    path = tmp_path / "p"
    path.write_bytes(text)
    code, out, err = run(capsys, "inspect", "--cce-policy", str(path))
    assert code == 2 and out == "" and complaint in err and len(err.strip().splitlines()) == 1
