"""Key release policies: grammar, Key Vault-style evaluation with a trace, and the ACI builder."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skr.akv.policy import (
    ABSENT,
    AllOf,
    AnyOf,
    ClaimCondition,
    Operator,
    build_confidential_containers_policy,
    encode_policy_for_wire,
    evaluate,
    normalize_authority,
    parse_policy,
)
from skr.errors import PolicyError
from skr.server import http_status

MAA = "https://sharedeus.eus.attest.azure.net"


def policy_of(*conditions, authority=MAA, group="allOf", version="1.0.0"):
    document = {"anyOf": [{"authority": authority, group: list(conditions)}]}
    if version is not None:
        document["version"] = version
    return parse_policy(document)


def claims_of(**claims):
    return {"iss": MAA, **{k.replace("_", "-"): v for k, v in claims.items()}}


def decode_jwt_claims(token: str) -> dict[str, Any]:
    payload = token.strip().split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


# --- comparison the way Key Vault does it --------------------------------------------------------------

OPERATOR_TABLE = [
    # operator, policy value, claim value, met
    ("equals", "false", False, True),
    ("equals", "true", False, False),
    ("equals", False, "false", True),
    ("equals", "0", 0, True),
    ("equals", 0, "0", True),
    ("equals", "1", 1.0, True),
    ("equals", 115, 115, True),
    ("equals", "abc", "abc", True),
    ("equals", "abc", "ABC", False),
    ("equals", "1", True, False),
    ("notEquals", "a", "b", True),
    ("notEquals", "false", False, False),
    ("notEquals", "0", 1, True),
    ("less", 5, 3, True),
    ("less", "5", "3", True),
    ("less", 5, 5, False),
    ("lessOrEquals", 5, 5, True),
    ("lessOrEquals", "5", 6, False),
    ("greater", 1, 2, True),
    ("greater", 2, 2, False),
    ("greater", 100, "101", True),
    ("greater", "9", 10, True),
    ("greaterOrEquals", 2.5, 2.5, True),
    ("greaterOrEquals", "115", 114, False),
    ("greater", 1, "abc", False),
    ("greater", 0, True, False),
    ("exists", True, "anything", True),
    ("exists", False, "anything", False),
    ("exists", "true", 0, True),
]


@pytest.mark.parametrize(("operator", "expected", "actual", "met"), OPERATOR_TABLE)
def test_operator_table(operator, expected, actual, met):
    decision = evaluate(policy_of({"claim": "c", operator: expected}), claims_of(c=actual))
    assert decision.allowed is met
    entry = decision.trace[-1]
    assert (entry.claim, entry.operator, entry.met) == ("c", operator, met)
    normalized = expected in (True, "true") if operator == "exists" else expected
    assert entry.expected == json.dumps(normalized)
    assert entry.actual == json.dumps(actual)


@pytest.mark.parametrize("operator", [o.value for o in Operator if o is not Operator.EXISTS])
def test_missing_claim_is_not_met_for_every_operator(operator):
    decision = evaluate(policy_of({"claim": "c", operator: "1"}), claims_of())
    assert not decision.allowed
    assert decision.trace[-1].actual == ABSENT
    assert "c: expected" in decision.reason and f"found {ABSENT}" in decision.reason


def test_exists_false_is_met_by_an_absent_claim():
    decision = evaluate(policy_of({"claim": "debug", "exists": False}), claims_of())
    assert decision.allowed
    assert decision.trace[-1].actual == ABSENT


def test_ordering_against_a_non_numeric_claim_says_so():
    decision = evaluate(policy_of({"claim": "svn", "greater": 1}), claims_of(svn="high"))
    assert not decision.allowed
    assert decision.trace[-1].note == "the claim is not a number"
    assert 'svn: expected greater than 1, found "high" (the claim is not a number)' in decision.reason


def test_legacy_condition_value_form():
    policy = parse_policy(
        {
            "anyOf": [
                {
                    "allOf": [
                        {"claim": "x-ms-sgx-mrsigner", "condition": "equals", "value": "86788f"},
                        {"claim": "x-ms-sgx-is-debuggable", "condition": "equals", "value": "false"},
                    ],
                    "authority": "http://localhost:8023/",
                }
            ]
        }
    )
    assert policy.version is None
    claims = {"iss": "http://localhost:8023", "x-ms-sgx-mrsigner": "86788f", "x-ms-sgx-is-debuggable": False}
    assert evaluate(policy, claims).allowed
    claims["x-ms-sgx-is-debuggable"] = True
    assert "x-ms-sgx-is-debuggable" in evaluate(policy, claims).reason


@pytest.mark.parametrize("version", ["1.0.0", "0.2", None])
def test_accepted_versions(version):
    assert policy_of({"claim": "c", "equals": "x"}, version=version).version == version


# --- structure -----------------------------------------------------------------------------------------


def test_nested_any_of_inside_all_of():
    policy = policy_of(
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
        {
            "anyOf": [
                {"claim": "x-ms-sevsnpvm-vmpl", "equals": "0"},
                {"claim": "x-ms-sevsnpvm-vmpl", "equals": "1"},
            ]
        },
    )
    assert isinstance(policy.rules[0].condition, AllOf)
    assert isinstance(policy.rules[0].condition.conditions[1], AnyOf)
    assert evaluate(policy, claims_of(x_ms_attestation_type="sevsnpvm", x_ms_sevsnpvm_vmpl=1)).allowed
    denied = evaluate(policy, claims_of(x_ms_attestation_type="sevsnpvm", x_ms_sevsnpvm_vmpl=2))
    assert not denied.allowed
    assert denied.reason == (
        'release policy not satisfied: none of: (x-ms-sevsnpvm-vmpl: expected "0", found 2) | '
        '(x-ms-sevsnpvm-vmpl: expected "1", found 2)'
    )
    assert [e.path for e in denied.trace] == [
        "anyOf[0].authority",
        "anyOf[0].allOf[0]",
        "anyOf[0].allOf[1].anyOf[0]",
        "anyOf[0].allOf[1].anyOf[1]",
    ]


def test_nested_all_of_inside_any_of():
    policy = policy_of(
        {"allOf": [{"claim": "a", "equals": "1"}, {"claim": "b", "equals": "2"}]},
        {"claim": "c", "exists": True},
        group="anyOf",
    )
    assert evaluate(policy, claims_of(a=1, b=2)).allowed
    assert evaluate(policy, claims_of(c=None)).allowed
    assert not evaluate(policy, claims_of(a=1, b=3)).allowed


def test_every_condition_appears_in_the_trace_even_after_a_failure():
    policy = policy_of(
        {"claim": "a", "equals": "1"}, {"claim": "b", "equals": "2"}, {"claim": "c", "equals": "3"}
    )
    decision = evaluate(policy, claims_of(a=9, b=2, c=9))
    assert [(e.claim, e.met) for e in decision.trace[1:]] == [("a", False), ("b", True), ("c", False)]
    assert (
        decision.reason == 'release policy not satisfied: a: expected "1", found 9; c: expected "3", found 9'
    )


def test_second_authority_can_allow_when_the_first_denies():
    policy = parse_policy(
        {
            "version": "1.0.0",
            "anyOf": [
                {"authority": MAA, "allOf": [{"claim": "a", "equals": "no"}]},
                {"authority": MAA + "/", "allOf": [{"claim": "a", "equals": "yes"}]},
            ],
        }
    )
    decision = evaluate(policy, claims_of(a="yes"))
    assert decision.allowed
    assert decision.reason == f"the token meets anyOf[1] (authority {MAA}/)"


# --- dot paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "met", "note"),
    [
        ({"tee": {"x-ms-attestation-type": "sevsnpvm"}}, True, ""),
        ({"tee": {"other": "sevsnpvm"}}, False, ""),
        ({"tee": "sevsnpvm"}, False, ""),
        ({"tee": [{"x-ms-attestation-type": "sevsnpvm"}]}, False, "arrays are not supported"),
        ({"tee": {"x-ms-attestation-type": {"nested": 1}}}, False, "only strings, numbers and booleans"),
        ({"tee": {"x-ms-attestation-type": ["sevsnpvm"]}}, False, "only strings, numbers and booleans"),
    ],
    ids=["nested", "missing-leaf", "not-an-object", "array-in-path", "object-leaf", "array-leaf"],
)
def test_dot_paths_into_nested_claims(claims, met, note):
    decision = evaluate(
        policy_of({"claim": "tee.x-ms-attestation-type", "equals": "sevsnpvm"}), {"iss": MAA, **claims}
    )
    assert decision.allowed is met
    assert note in decision.trace[-1].note


def test_exists_on_a_nested_object_claim():
    policy = policy_of({"claim": "x-ms-runtime.keys", "exists": True})
    assert evaluate(policy, claims_of(x_ms_runtime={"keys": [{"kid": "k"}]})).allowed


# --- authority -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "iss", "match"),
    [
        (MAA, MAA, True),
        (MAA + "/", MAA, True),
        (MAA, MAA + "/", True),
        ("HTTPS://SharedEUS.eus.attest.azure.net", MAA, True),
        (MAA + ":443", MAA, True),
        ("sharedeus.eus.attest.azure.net", MAA, True),
        (MAA, "https://sharedeus.eus.attest.azure.net:8443", False),
        (MAA, "http://sharedeus.eus.attest.azure.net", False),
        (MAA, "https://shared.eus.attest.azure.net", False),
        (MAA + "/tenant", MAA, False),
        ("https://x.azurewebsites.net", "https://x.azurewebsites.net/", True),
    ],
)
def test_authority_matches_the_issuer(authority, iss, match):
    decision = evaluate(policy_of({"claim": "c", "exists": False}, authority=authority), {"iss": iss})
    assert decision.allowed is match
    assert decision.trace[0].claim == "iss"
    assert decision.trace[0].met is match


def test_no_matching_authority_says_which_issuer_was_seen():
    decision = evaluate(policy_of({"claim": "c", "exists": False}), {"iss": "https://other.attest.azure.net"})
    assert not decision.allowed
    assert decision.reason == (
        "the token issuer 'https://other.attest.azure.net' matches no authority of the release policy "
        f"(expected '{MAA}')"
    )


def test_missing_issuer_is_denied():
    decision = evaluate(policy_of({"claim": "c", "exists": False}), {})
    assert not decision.allowed
    assert "no iss claim" in decision.reason


def test_normalize_authority():
    assert normalize_authority("HTTPS://Host.Example:443/Path/") == "https://host.example/Path"


# --- malformed policies name their path ----------------------------------------------------------------

MALFORMED = [
    ([], "release policy: is an array; expected a JSON object"),
    ({"version": "1.0.0"}, "has no top-level 'anyOf'"),
    ({"version": "1.0.2", "anyOf": []}, 'release policy version: is "1.0.2"'),
    ({"anyOf": []}, "release policy anyOf: is an empty list"),
    ({"anyOf": {}}, "release policy anyOf: is an object; expected a list"),
    ({"anyOf": [{"authority": MAA}]}, "release policy anyOf[0]: needs exactly one of 'anyOf' or 'allOf'"),
    (
        {
            "anyOf": [
                {
                    "authority": MAA,
                    "allOf": [{"claim": "a", "equals": "1"}],
                    "anyOf": [{"claim": "a", "equals": "1"}],
                }
            ]
        },
        "anyOf[0]: needs exactly one of 'anyOf' or 'allOf', not both",
    ),
    ({"anyOf": [{"allOf": [{"claim": "a", "equals": "1"}]}]}, "anyOf[0].authority: is null"),
    ({"anyOf": [{"authority": "", "allOf": [{"claim": "a", "equals": "1"}]}]}, "anyOf[0].authority"),
    ({"anyOf": [{"authority": MAA, "allOf": []}]}, "anyOf[0].allOf: is an empty list"),
    (
        {
            "anyOf": [
                {
                    "authority": MAA,
                    "allOf": [{"claim": "a", "equals": "1"}, {"claim": "b", "less": 1, "greater": 0}],
                }
            ]
        },
        "anyOf[0].allOf[1]: needs exactly one operator",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "equals": "1"}, {"claim": "b"}]}]},
        "anyOf[0].allOf[1]: needs exactly one operator",
    ),
    (
        {
            "anyOf": [
                {
                    "authority": MAA,
                    "allOf": [{"claim": "a", "equals": "1"}, {"claim": "b", "equals": {"x": 1}}],
                }
            ]
        },
        "anyOf[0].allOf[1].equals: is an object",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "equals": [1]}]}]},
        "anyOf[0].allOf[0].equals: is an array",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "equals": None}]}]},
        "anyOf[0].allOf[0].equals: is null",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "less": "ten"}]}]},
        "anyOf[0].allOf[0].less: less needs a number",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "exists": "maybe"}]}]},
        "anyOf[0].allOf[0].exists: exists takes true or false",
    ),
    ({"anyOf": [{"authority": MAA, "allOf": [{"claim": "", "equals": "1"}]}]}, "anyOf[0].allOf[0].claim"),
    ({"anyOf": [{"authority": MAA, "allOf": [{"claim": "a..b", "equals": "1"}]}]}, "empty segment"),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "Equals": "1"}]}]},
        "anyOf[0].allOf[0]: has unknown member(s) 'Equals'",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "condition": "like", "value": "1"}]}]},
        'anyOf[0].allOf[0].condition: is "like"',
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "condition": "equals"}]}]},
        "anyOf[0].allOf[0]: has 'condition' but no 'value'",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"anyOf": [{"claim": "a", "equals": "1"}, "x"]}]}]},
        "anyOf[0].allOf[0].anyOf[1]: is a string",
    ),
    (
        {"anyOf": [{"authority": MAA, "allOf": [{"something": 1}]}]},
        "anyOf[0].allOf[0]: is neither a claim condition",
    ),
    (
        {"anyOf": [{"authority": MAA, "allof": [{"claim": "a", "equals": "1"}]}]},
        "anyOf[0]: has unknown member(s) 'allof'",
    ),
    ({"allOf": [], "anyOf": []}, "release policy: has unknown member(s) 'allOf'"),
]


@pytest.mark.parametrize(("document", "complaint"), MALFORMED)
def test_malformed_policy_names_the_bad_part(document, complaint):
    with pytest.raises(PolicyError) as info:
        parse_policy(document)
    assert complaint in info.value.message
    assert http_status(info.value) == 400


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"{not json", "is not valid JSON"),
        (b'{"anyOf": NaN}', "NaN"),
        (b'{"version": "1.0.0", "version": "0.2", "anyOf": []}', "'version' twice"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[" * 50000, "nests deeper"),
    ],
)
def test_unparsable_policy_bytes(data, complaint):
    with pytest.raises(PolicyError, match=complaint):
        parse_policy(data)


def test_deeply_nested_conditions_are_refused():
    condition: dict[str, Any] = {"claim": "a", "equals": "1"}
    for _ in range(40):
        condition = {"allOf": [condition]}
    with pytest.raises(PolicyError, match="nests deeper"):
        policy_of(condition)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "version",
                    "anyOf",
                    "allOf",
                    "authority",
                    "claim",
                    "equals",
                    "less",
                    "exists",
                    "condition",
                    "value",
                    "x",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_only_ever_raises_policy_error(document):
    try:
        policy = parse_policy(document)
    except PolicyError:
        return
    evaluate(policy, {"iss": MAA, "claim": document})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_bytes_only_ever_raise_policy_error(data):
    with contextlib.suppress(PolicyError):
        parse_policy(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
def test_evaluation_never_raises_on_arbitrary_claims(claims):
    policy = policy_of(
        {"claim": "a.b", "equals": "1"},
        {"claim": "a", "greater": 0},
        {"claim": "c", "exists": False},
        group="anyOf",
    )
    decision = evaluate(policy, {"iss": MAA, **claims})
    assert decision.allowed or decision.reason


# --- genuine vectors -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cvm_policy(vectors):
    return parse_policy((vectors / "akv/cvm-release-policy.json").read_bytes())


@pytest.fixture
def cvm_claims(vectors):
    return decode_jwt_claims((vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text())


def test_genuine_cvm_policy_allows_the_genuine_token(cvm_policy, cvm_claims):
    decision = evaluate(cvm_policy, cvm_claims)
    assert decision.allowed, decision.reason
    assert [(e.claim, e.actual, e.met) for e in decision.trace] == [
        ("iss", '"https://sharedweu.weu.attest.azure.net"', True),
        ("x-ms-isolation-tee.x-ms-attestation-type", '"sevsnpvm"', True),
        ("x-ms-isolation-tee.x-ms-compliance-status", '"azure-compliant-cvm"', True),
    ]


def test_genuine_cvm_policy_denies_a_modified_claim_naming_it(cvm_policy, cvm_claims):
    cvm_claims["x-ms-isolation-tee"]["x-ms-compliance-status"] = "azure-compliant-uvm"
    decision = evaluate(cvm_policy, cvm_claims)
    assert not decision.allowed
    assert decision.reason == (
        "release policy not satisfied: x-ms-isolation-tee.x-ms-compliance-status: "
        'expected "azure-compliant-cvm", found "azure-compliant-uvm"'
    )


def test_policy_inside_the_genuine_release_allows_the_token_it_was_released_to(vectors):
    """Key Vault released the key for target-maa-token.jwt under the policy it echoes in the payload."""
    body = json.loads((vectors / "akv/release-response.decoded-body.json").read_text())
    data = body["response"]["key"]["release_policy"]["data"]
    policy = parse_policy(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    claims = decode_jwt_claims((vectors / "akv/target-maa-token.jwt").read_text())
    assert evaluate(policy, claims).allowed


def test_genuine_aci_token_claims_meet_a_policy_built_for_its_host_data(vectors):
    claims = decode_jwt_claims((vectors / "maa/sevsnpvm-aci-sharedweu-test-2025-04.jwt").read_text())
    policy = build_confidential_containers_policy(
        authority="sharedweu.weu.test.attest.azure.net",
        host_data=claims["x-ms-sevsnpvm-hostdata"],
        compliance=None,
        attestation_type="sevsnpvm",
    )
    decision = evaluate(parse_policy(policy), claims)
    assert decision.allowed, decision.reason
    by_claim = {e.claim: (e.expected, e.actual) for e in decision.trace}
    assert by_claim["x-ms-sevsnpvm-is-debuggable"] == ('"false"', "false")
    assert by_claim["x-ms-sevsnpvm-vmpl"] == ('"0"', "0")


# --- builder -------------------------------------------------------------------------------------------

HOST_DATA = "cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c"


def test_builder_produces_the_canonical_aci_policy():
    assert build_confidential_containers_policy(authority=MAA, host_data=HOST_DATA) == {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": MAA,
                "allOf": [
                    {"claim": "x-ms-sevsnpvm-hostdata", "equals": HOST_DATA},
                    {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"},
                    {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": "false"},
                    {"claim": "x-ms-sevsnpvm-vmpl", "equals": "0"},
                ],
            }
        ],
    }


def test_builder_options():
    policy = build_confidential_containers_policy(
        authority="sharedeus.eus.attest.azure.net/",
        host_data=HOST_DATA.upper(),
        compliance="azure-signed-katacc-uvm",
        allow_debug=True,
        vmpl=None,
        attestation_type="sevsnpvm",
    )
    rule = policy["anyOf"][0]
    assert rule["authority"] == MAA
    assert rule["allOf"] == [
        {"claim": "x-ms-sevsnpvm-hostdata", "equals": HOST_DATA},
        {"claim": "x-ms-compliance-status", "equals": "azure-signed-katacc-uvm"},
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
    ]


def test_built_policy_denies_a_debuggable_guest_naming_the_claim():
    policy = parse_policy(build_confidential_containers_policy(authority=MAA, host_data=HOST_DATA))
    claims = claims_of(
        x_ms_sevsnpvm_hostdata=HOST_DATA,
        x_ms_compliance_status="azure-compliant-uvm",
        x_ms_sevsnpvm_is_debuggable=True,
        x_ms_sevsnpvm_vmpl=0,
    )
    decision = evaluate(policy, claims)
    assert not decision.allowed
    assert (
        decision.reason
        == 'release policy not satisfied: x-ms-sevsnpvm-is-debuggable: expected "false", found true'
    )
    claims["x-ms-sevsnpvm-is-debuggable"] = False
    assert evaluate(policy, claims).allowed


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"host_data": "abc"}, "64 hex digits"),
        ({"host_data": "z" * 64}, "64 hex digits"),
        ({"vmpl": 4}, "vmpl"),
        ({"authority": " "}, "authority"),
    ],
)
def test_builder_refuses_bad_input(kwargs, complaint):
    arguments = {"authority": MAA, "host_data": HOST_DATA, **kwargs}
    with pytest.raises(PolicyError, match=complaint):
        build_confidential_containers_policy(**arguments)


def test_wire_encoding_is_compact_json_of_a_valid_policy():
    policy = build_confidential_containers_policy(authority=MAA, host_data=HOST_DATA)
    wire = encode_policy_for_wire(policy)
    assert b" " not in wire
    assert json.loads(wire) == policy
    with pytest.raises(PolicyError):
        encode_policy_for_wire({"anyOf": []})


def test_parsed_model_keeps_operator_and_value():
    policy = policy_of({"claim": "x-ms-sevsnpvm-vmpl", "lessOrEquals": 1})
    condition = policy.rules[0].condition.conditions[0]
    assert condition == ClaimCondition("anyOf[0].allOf[0]", "x-ms-sevsnpvm-vmpl", Operator.LESS_OR_EQUALS, 1)
    assert policy.authorities == (MAA,)
