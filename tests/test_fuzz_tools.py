"""Hostile input to the new offline parsers: the HCL report and the CCE policy decoder answer with their
own clear errors (exit 2 material), never another exception."""

from __future__ import annotations

import contextlib
import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr.errors import BadRequest, ReportError
from skr.snp.ccepolicy import decode_policy
from skr.snp.hcl import RUNTIME_DATA_OFFSET, parse_hcl_report

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_rego_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=3000))
def test_hcl_parser_on_arbitrary_bytes(data):
    try:
        report = parse_hcl_report(b"HCLA" + data)
    except ReportError:
        return
    assert len(report.snp_report) == 1184
    report.to_json_dict()  # and describing it never fails either


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 5), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_hcl_parser_with_hostile_request_header(report_type, hash_type, variable_size, tail):
    header = b"HCLA" + bytes(28) + bytes(1184)
    request = struct.pack("<5I", (20 + variable_size) % 2**32, 1, report_type, hash_type, variable_size)
    data = header + request + tail
    assert len(header + request) == RUNTIME_DATA_OFFSET
    try:
        report = parse_hcl_report(data)
    except ReportError:
        return
    assert report.report_type == 2 and report.runtime_data == tail[:variable_size]
    report.to_json_dict()


@FUZZ
@given(st.text(max_size=400))
def test_cce_decoder_on_arbitrary_text(text):
    with contextlib.suppress(BadRequest):
        decode_policy(("package policy\n" + text).encode())


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "containers",
                "fragments",
                "external_processes",
                "allow_dump_stacks",
                "api_version",
                "exec_in_container",
            ]
        ),
        _rego_values,
        max_size=6,
    )
)
def test_cce_decoder_on_hostile_assignments(assignments):
    rego = "package policy\n" + "".join(
        f"{name} := {json.dumps(value)}\n" for name, value in assignments.items()
    )
    try:
        policy = decode_policy(rego.encode())
    except BadRequest:
        return
    json.dumps(policy.to_dict())
