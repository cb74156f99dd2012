import base64
import hashlib

import pytest

from skr.errors import BadRequest
from skr.snp.hostdata import decode_cce_policy, host_data_of_policy

REGO = b'package policy\n\napi_svn := "0.10.0"\n'


def test_raw_rego_is_hashed_as_is():
    assert host_data_of_policy(REGO) == hashlib.sha256(REGO).digest()


def test_base64_form_is_decoded_first():
    b64 = base64.b64encode(REGO)
    assert decode_cce_policy(b64 + b"\n") == REGO
    assert host_data_of_policy(b64) == hashlib.sha256(REGO).digest()


def test_empty_policy_is_refused():
    with pytest.raises(BadRequest):
        host_data_of_policy(b" \n")


def test_aci_security_policy_matches_genuine_report_host_data(vectors):
    policy = (vectors / "snp/aci-confidential-sidecar/uvm_security_policy.base64").read_bytes()
    report = (vectors / "snp/aci-confidential-sidecar/snp_report.bin").read_bytes()
    assert host_data_of_policy(policy) == report[0xC0:0xE0]
