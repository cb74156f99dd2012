"""``skr policy release`` with several host data values, and ``skr policy hash`` on outraw files."""

from __future__ import annotations

import base64
import hashlib
import json

from skr.akv.policy import evaluate, parse_policy
from skr.cli import main

OLD = "cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c"
NEW = "73973b78d70cc68353426de188db5dfc57e5b766e399935fb73a61127ea26d20"
MAA = "https://sharedeus.eus.attest.azure.net"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def claims(host_data: str) -> dict[str, object]:
    return {
        "iss": MAA,
        "x-ms-compliance-status": "azure-compliant-uvm",
        "x-ms-sevsnpvm-hostdata": host_data,
        "x-ms-sevsnpvm-is-debuggable": False,
        "x-ms-sevsnpvm-vmpl": 0,
    }


def test_each_host_data_gets_its_own_entry_with_the_same_other_claims(capsys):
    code, out, err = run(
        capsys, "release", "--authority", MAA, "--host-data", OLD, "--host-data", NEW.upper(), "--vmpl", "1"
    )
    assert (code, err) == (0, "")
    policy = json.loads(out)
    others = [
        {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"},
        {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": "false"},
        {"claim": "x-ms-sevsnpvm-vmpl", "equals": "1"},
    ]
    assert policy == {
        "version": "1.0.0",
        "anyOf": [
            {"authority": MAA, "allOf": [{"claim": "x-ms-sevsnpvm-hostdata", "equals": OLD}, *others]},
            {"authority": MAA, "allOf": [{"claim": "x-ms-sevsnpvm-hostdata", "equals": NEW}, *others]},
        ],
    }


def test_the_rollout_policy_allows_old_and_new_and_nothing_else(capsys):
    code, out, _ = run(capsys, "release", "--authority", MAA, "--host-data", OLD, "--host-data", NEW)
    assert code == 0
    policy = parse_policy(out)
    assert evaluate(policy, claims(OLD)).allowed
    assert evaluate(policy, claims(NEW)).allowed
    assert not evaluate(policy, claims("00" * 32)).allowed
    debuggable = dict(claims(NEW), **{"x-ms-sevsnpvm-is-debuggable": True})
    assert not evaluate(policy, debuggable).allowed


def test_a_repeated_value_is_listed_once_and_a_bad_one_refused(capsys):
    code, out, _ = run(capsys, "release", "--authority", MAA, "--host-data", OLD, "--host-data", OLD)
    assert code == 0 and len(json.loads(out)["anyOf"]) == 1
    code, out, err = run(capsys, "release", "--authority", MAA, "--host-data", OLD, "--host-data", "beef")
    assert code == 2 and out == "" and "64 hex digits" in err


def test_hash_warns_about_a_trailing_newline_and_strip_hashes_without_it(tmp_path, capsys):
    rego = b'package policy\n\napi_version := "0.10.0"\nframework_version := "0.2.3"\n'
    deployed = rego.rstrip()
    outraw = tmp_path / "policy.rego"
    outraw.write_bytes(rego)
    code, out, err = run(capsys, "hash", "--cce-policy", str(outraw))
    assert code == 0
    assert out.strip() == hashlib.sha256(rego).hexdigest()
    assert "ends in whitespace" in err and "--strip" in err and "'\\n'" in err
    code, out, err = run(capsys, "hash", "--cce-policy", str(outraw), "--strip")
    assert (code, err) == (0, "")
    assert out.strip() == hashlib.sha256(deployed).hexdigest()
    # the base64 form is what was deployed: hashed as it decodes, no warning; --strip still strips
    b64 = tmp_path / "policy.b64"
    b64.write_bytes(base64.b64encode(rego) + b"\n")
    code, out, err = run(capsys, "hash", "--cce-policy", str(b64))
    assert (code, err) == (0, "")
    assert out.strip() == hashlib.sha256(rego).hexdigest()
    code, out, err = run(capsys, "hash", "--cce-policy", str(b64), "--strip")
    assert out.strip() == hashlib.sha256(deployed).hexdigest()


def test_the_genuine_base64_policy_hashes_silently(vectors, capsys):
    policy = vectors / "snp/aci-confidential-sidecar/uvm_security_policy.base64"
    code, out, err = run(capsys, "hash", "--cce-policy", str(policy))
    assert (code, err) == (0, "")
    assert out.strip() == OLD  # its decoded text does end in a newline, and that newline was deployed
