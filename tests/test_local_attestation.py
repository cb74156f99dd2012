"""The local attestation service: MAA's wire format, real verification, and MAA's SEV-SNP claim set.

Evidence comes from the virtual TEE and from the genuine ACI request in the test vectors. Claims are
checked against report fields read here straight from the byte offsets of the ABI, and tokens are
verified through TokenVerifier against the service's own OpenID metadata over HTTPS on 127.0.0.1.
"""

import base64
import hashlib
import json
import re
import shutil
import ssl
import stat
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from skr.endpoints import parse_endpoint
from skr.errors import AttestationFailed, TokenError
from skr.evidence.base import Evidence, report_data_for
from skr.evidence.virtual import VirtualTee
from skr.local.attestation import DEFAULT_POLICY, LocalAttestationService
from skr.local.ca import LocalCA
from skr.local.claims import AttestationRefused, attested_claims, parse_attest_request
from skr.maa.client import MaaClient, encode_report
from skr.maa.runtime import WrappingKey
from skr.maa.token import TokenVerifier, unverified_header
from skr.upstream import RetryPolicy
from tests.e2e import serve_local as serve

POLICY = b'package policy\n\napi_version := "0.10.0"\nframework_version := "0.2.3"\n'
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
ACI_IAT = 1744085700  # iat of the genuine token MAA issued for the genuine ACI request


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def envelope(report: bytes, chain_pem: bytes) -> str:
    """The ``report`` string built here by hand (docs/wire-formats.md §1.3)."""
    return b64url(json.dumps({"SnpReport": b64url(report), "VcekCertChain": b64url(chain_pem)}).encode())


def request_body(evidence: Evidence, runtime: bytes | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"report": envelope(evidence.report, evidence.vcek_chain_pem), **extra}
    if runtime is not None:
        body["runtimeData"] = {"data": b64url(runtime), "dataType": "JSON"}
    return body


@dataclass
class Stack:
    host: str
    service: LocalAttestationService
    session: aiohttp.ClientSession
    client_ssl: ssl.SSLContext

    @property
    def issuer(self) -> str:
        return f"https://{self.host}"

    def maa(self, **kwargs: Any) -> MaaClient:
        return MaaClient(self.session, ssl_context=self.client_ssl, retry=FAST_RETRY, **kwargs)

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(self.session, ssl_context=self.client_ssl)

    async def post(
        self, body: Any, *, path: str = "/attest/SevSnpVm", api_version: str | None = "2022-08-01"
    ) -> tuple[int, Any, Any]:
        query = f"?api-version={api_version}" if api_version is not None else ""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(
            f"{self.issuer}{path}{query}",
            data=raw,
            headers={"Content-Type": "application/json"},
            ssl=self.client_ssl,
        ) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tee(tmp_path_factory) -> VirtualTee:
    return VirtualTee.load_or_create(tmp_path_factory.mktemp("tee"), security_policy=POLICY)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_ssl(ca: LocalCA) -> ssl.SSLContext:
    return ca.server_ssl_context(["127.0.0.1"])


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attestation")


@pytest.fixture(scope="module")
def wrapping_key() -> WrappingKey:
    return WrappingKey.generate()


@pytest.fixture
async def stack(tee, ca, server_ssl, state_dir) -> AsyncIterator[Stack]:
    service = await LocalAttestationService.create(state_dir, trusted_arks=[tee.ark_certificate])
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        yield Stack(host, service, session, ca.client_ssl_context())


@pytest.fixture(scope="module")
def endorsed_tee(tee, ca, tmp_path_factory) -> VirtualTee:
    """The module's virtual TEE (a copy of its state), carrying a UVM endorsement by the CA's UVM signer."""
    copy = tmp_path_factory.mktemp("endorsed") / "tee"
    shutil.copytree(tee.state_dir, copy)
    endorsed = VirtualTee.load_or_create(copy, security_policy=POLICY)
    signer = ca.uvm_signer()
    endorsed.endorse(signer.private_key, signer.chain)
    return endorsed


@pytest.fixture
async def endorsing_stack(tee, ca, server_ssl, state_dir) -> AsyncIterator[Stack]:
    """A service that trusts UVM endorsements chained to the local CA (as ``skr local``'s does)."""
    service = await LocalAttestationService.create(
        state_dir, trusted_arks=[tee.ark_certificate], uvm_signing_roots=[ca.ca_certificate]
    )
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        yield Stack(host, service, session, ca.client_ssl_context())


# --- the token ------------------------------------------------------------------------------------


def u32(report: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", report, offset)[0])


def u64(report: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", report, offset)[0])


async def test_token_carries_the_report_fields_and_verifies_through_openid_metadata(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    token = await stack.maa().attest(parse_endpoint(stack.host), evidence, runtime, nonce="n-123")
    claims = await stack.verifier().verify(token, issuer=stack.host)

    report = evidence.report
    tcb = u64(report, 0x180).to_bytes(8, "little")  # Milan: [bl, tee, 0, 0, 0, 0, snp, ucode]
    policy = u64(report, 0x08)
    expected_snp = {
        "x-ms-sevsnpvm-authorkeydigest": report[0x110:0x140].hex(),
        "x-ms-sevsnpvm-bootloader-svn": tcb[0],
        "x-ms-sevsnpvm-familyId": report[0x10:0x20].hex(),
        "x-ms-sevsnpvm-guestsvn": u32(report, 0x04),
        "x-ms-sevsnpvm-hostdata": report[0xC0:0xE0].hex(),
        "x-ms-sevsnpvm-idkeydigest": report[0xE0:0x110].hex(),
        "x-ms-sevsnpvm-imageId": report[0x20:0x30].hex(),
        "x-ms-sevsnpvm-is-debuggable": bool(policy >> 19 & 1),
        "x-ms-sevsnpvm-launchmeasurement": report[0x90:0xC0].hex(),
        "x-ms-sevsnpvm-microcode-svn": tcb[7],
        "x-ms-sevsnpvm-migration-allowed": bool(policy >> 18 & 1),
        "x-ms-sevsnpvm-reportdata": report[0x50:0x90].hex(),
        "x-ms-sevsnpvm-reportid": report[0x140:0x160].hex(),
        "x-ms-sevsnpvm-smt-allowed": bool(policy >> 16 & 1),
        "x-ms-sevsnpvm-snpfw-svn": tcb[6],
        "x-ms-sevsnpvm-tee-svn": tcb[1],
        "x-ms-sevsnpvm-vmpl": u32(report, 0x30),
    }
    assert {k: v for k, v in claims.items() if k.startswith("x-ms-sevsnpvm-")} == expected_snp
    assert claims["x-ms-sevsnpvm-hostdata"] == hashlib.sha256(POLICY).hexdigest()
    assert (claims["x-ms-sevsnpvm-bootloader-svn"], claims["x-ms-sevsnpvm-snpfw-svn"]) == (3, 8)
    assert claims["x-ms-sevsnpvm-microcode-svn"] == 115
    assert claims["x-ms-runtime"] == json.loads(runtime)
    assert claims["x-ms-runtime"]["keys"][0]["kid"] == wrapping_key.kid
    assert claims["nonce"] == "n-123"
    assert claims["x-ms-attestation-type"] == "sevsnpvm"
    assert claims["x-ms-ver"] == "1.0"
    assert claims["iss"] == stack.issuer
    assert re.fullmatch("[0-9a-f]{64}", claims["jti"])
    assert claims["nbf"] == claims["iat"]
    assert "x-ms-compliance-status" not in claims


async def test_claims_are_assembled_in_memory_without_a_server(tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    request = parse_attest_request(request_body(evidence, runtime, nonce=7))
    options: dict[str, Any] = {"issuer": "https://maa.test", "now": time.time(), "issued_at": 1000}
    options |= {"uvm_signing_roots": (), "policy_hash": "h"}
    claims = attested_claims(request, trusted_arks=[tee.ark_certificate], **options)
    assert (claims["iss"], claims["iat"], claims["exp"]) == ("https://maa.test", 1000, 1000 + 8 * 3600)
    assert claims["nonce"] == "7"  # a number from the Go sidecar, echoed as a string
    assert claims["x-ms-sevsnpvm-reportdata"] == evidence.report[0x50:0x90].hex()
    assert claims["x-ms-runtime"] == json.loads(runtime) and claims["x-ms-policy-hash"] == "h"
    assert list(claims) == sorted(claims) and "x-ms-compliance-status" not in claims
    with pytest.raises(AttestationRefused) as refused:  # the virtual TEE's ARK is not trusted
        attested_claims(request, trusted_arks=(), **options)
    assert refused.value.code == "EvidenceVerificationFailed"


async def test_claims_have_maas_json_types(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    token = await stack.maa().attest(
        parse_endpoint(stack.host), await tee.collect(report_data_for(runtime)), runtime
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    for name, value in claims.items():
        if name.endswith(("-svn", "guestsvn", "vmpl")) or name in ("iat", "nbf", "exp"):
            assert type(value) is int, name
        elif name.startswith("x-ms-sevsnpvm-is-") or name.endswith("-allowed"):
            assert type(value) is bool, name
        elif name.startswith("x-ms-sevsnpvm-"):
            assert re.fullmatch("[0-9a-f]+", value), name


async def test_token_lives_eight_hours_and_names_its_key(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    token = await stack.maa().attest(
        parse_endpoint(stack.host), await tee.collect(report_data_for(runtime)), runtime
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 28800
    assert unverified_header(token) == {
        "alg": "RS256",
        "jku": f"{stack.issuer}/certs",
        "kid": stack.service.kid,
        "typ": "JWT",
    }


async def test_policy_hash_follows_the_claim_sets_definition(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    token = await stack.maa().attest(
        parse_endpoint(stack.host), await tee.collect(report_data_for(runtime)), runtime
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    inner = b64url(DEFAULT_POLICY.encode("utf-8")).encode("utf-8")
    assert claims["x-ms-policy-hash"] == b64url(hashlib.sha256(inner).digest())


async def test_verified_uvm_endorsement_yields_compliance_and_the_endorsement_claims(
    endorsing_stack, endorsed_tee, wrapping_key
):
    runtime = wrapping_key.runtime_data()
    evidence = await endorsed_tee.collect(report_data_for(runtime))
    assert evidence.uvm_endorsements == endorsed_tee.uvm_endorsement
    token = await endorsing_stack.maa().attest(parse_endpoint(endorsing_stack.host), evidence, runtime)
    claims = await endorsing_stack.verifier().verify(token, issuer=endorsing_stack.host)
    assert claims["x-ms-compliance-status"] == "azure-compliant-uvm"
    # string values, as genuine ACI tokens carry them (docs/wire-formats.md §1.5), read from the report here
    assert claims["x-ms-sevsnpvm-uvm-endorsement"] == {
        "x-ms-sevsnpvm-guestsvn": str(u32(evidence.report, 0x04)),
        "x-ms-sevsnpvm-launchmeasurement": evidence.report[0x90:0xC0].hex(),
    }
    assert claims["x-ms-sevsnpvm-guestsvn"] == 0  # the report's own claim stays a number


async def test_request_without_endorsement_gets_neither_claim(endorsing_stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    assert evidence.uvm_endorsements is None
    token = await endorsing_stack.maa().attest(parse_endpoint(endorsing_stack.host), evidence, runtime)
    claims = await endorsing_stack.verifier().verify(token, issuer=endorsing_stack.host)
    assert "x-ms-compliance-status" not in claims and "x-ms-sevsnpvm-uvm-endorsement" not in claims


async def test_endorsement_from_an_untrusted_signer_gets_neither_claim(stack, endorsed_tee, wrapping_key):
    # ``stack`` trusts no UVM signing root: the same endorsement that verifies above is not enough
    runtime = wrapping_key.runtime_data()
    evidence = await endorsed_tee.collect(report_data_for(runtime))
    token = await stack.maa().attest(parse_endpoint(stack.host), evidence, runtime)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "x-ms-compliance-status" not in claims and "x-ms-sevsnpvm-uvm-endorsement" not in claims


def _signed_endorsement(key: rsa.RSAPrivateKey, chain: list[x509.Certificate], measurement: bytes) -> bytes:
    """A COSE_Sign1 UVM endorsement built here with cbor2 + cryptography (PS384, like the genuine one)."""
    root = chain[-1].public_bytes(serialization.Encoding.DER)
    did = "did:x509:0:sha256:" + b64url(hashlib.sha256(root).digest()) + "::eku:1.3.6.1.4.1.311.76.59.1.2"
    protected = cbor2.dumps(
        {
            1: -38,
            3: "application/json",
            33: [c.public_bytes(serialization.Encoding.DER) for c in chain],
            "iss": did,
            "feed": "ContainerPlat-AMD-UVM",
        }
    )
    body = json.dumps(
        {"x-ms-sevsnpvm-guestsvn": "3", "x-ms-sevsnpvm-launchmeasurement": measurement.hex()}
    ).encode()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", body]), pss, hashes.SHA384())
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, body, signature]))


async def test_endorsement_built_independently_is_accepted(endorsing_stack, ca, tee, wrapping_key):
    signer = ca.uvm_signer()
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    cose = _signed_endorsement(signer.private_key, signer.chain, evidence.report[0x90:0xC0])
    endorsed = Evidence(evidence.report, evidence.vcek_chain_pem, "test", uvm_endorsements=cose)
    token = await endorsing_stack.maa().attest(parse_endpoint(endorsing_stack.host), endorsed, runtime)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["x-ms-compliance-status"] == "azure-compliant-uvm"
    assert claims["x-ms-sevsnpvm-uvm-endorsement"]["x-ms-sevsnpvm-guestsvn"] == "3"


@pytest.mark.parametrize("defect", ["other measurement", "tls leaf", "flipped signature", "garbage"])
async def test_bad_endorsement_gets_neither_claim_but_a_token(endorsing_stack, ca, tee, wrapping_key, defect):
    signer = ca.uvm_signer()
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    measurement = evidence.report[0x90:0xC0]
    if defect == "other measurement":  # properly signed, for another UVM
        cose = _signed_endorsement(signer.private_key, signer.chain, bytes(48))
    elif defect == "tls leaf":  # the same CA, but a certificate without the UVM-signing EKU
        tls = ca.issue(["127.0.0.1"])
        cose = _signed_endorsement(tls.private_key, tls.chain, measurement)
    elif defect == "flipped signature":
        good = _signed_endorsement(signer.private_key, signer.chain, measurement)
        cose = good[:-1] + bytes([good[-1] ^ 1])
    else:
        cose = b"\xd2\x84not a cose sign1"
    endorsed = Evidence(evidence.report, evidence.vcek_chain_pem, "test", uvm_endorsements=cose)
    status, body, _ = await endorsing_stack.post(
        {"report": encode_report(endorsed), "runtimeData": {"data": b64url(runtime), "dataType": "JSON"}}
    )
    assert status == 200, body
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert "x-ms-compliance-status" not in claims and "x-ms-sevsnpvm-uvm-endorsement" not in claims
    assert claims["x-ms-sevsnpvm-launchmeasurement"] == measurement.hex()


async def test_genuine_aci_report_with_its_genuine_endorsement_is_compliant(
    vectors, ca, server_ssl, tmp_path
):
    # The genuine ACI report, its VCEK chain and its UVM endorsement; trusting Microsoft's supply-chain root
    # (taken from the endorsement itself) at the endorsement's signing time, the service emits what MAA does.
    aci = vectors / "snp/aci-confidential-sidecar"
    cose = (aci / "body.uvm_reference_info.bin").read_bytes()
    chain = [x509.load_der_x509_certificate(c) for c in cbor2.loads(cbor2.loads(cose).value[0])[33]]
    signed_at = datetime(2023, 2, 8, 5, 42, 23, tzinfo=UTC)
    service = await LocalAttestationService.create(
        tmp_path, uvm_signing_roots=[chain[-1]], clock=signed_at.timestamp
    )
    report = (aci / "snp_report.bin").read_bytes()
    evidence = Evidence(
        report, (aci / "uvm_host_amd_certificate.pem").read_bytes(), "test", uvm_endorsements=cose
    )
    runtime = b'{\n   "akey" : "avalue"\n}\n'  # the runtime data behind this report's REPORT_DATA
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        stack = Stack(host, service, session, ca.client_ssl_context())
        status, body, _ = await stack.post(
            {
                "report": encode_report(evidence),
                "runtimeData": {"data": b64url(runtime), "dataType": "Binary"},
            }
        )
    assert status == 200, body
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["x-ms-compliance-status"] == "azure-compliant-uvm"
    assert claims["x-ms-sevsnpvm-uvm-endorsement"] == {
        "x-ms-sevsnpvm-guestsvn": "22",
        "x-ms-sevsnpvm-launchmeasurement": report[0x90:0xC0].hex(),
    }
    assert claims["x-ms-sevsnpvm-guestsvn"] == 2  # the report's guest SVN, not the UVM's


async def test_go_sidecar_path_and_api_versions_are_accepted(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    for version in ("2020-10-01", "2022-08-01", "2025-06-01"):
        client = stack.maa(tee_path="SevSnpVM", api_version=version)
        token = await client.attest(parse_endpoint(stack.host), evidence, runtime)
        assert (await stack.verifier().verify(token, issuer=stack.issuer))["iss"] == stack.issuer


async def test_the_clients_random_nonce_is_echoed_as_the_nonce_claim(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    seen: list[str] = []
    for _ in range(2):
        token = await stack.maa().attest(parse_endpoint(stack.host), evidence, runtime)
        seen.append((await stack.verifier().verify(token, issuer=stack.host))["nonce"])
    assert all(n.isdigit() for n in seen) and seen[0] != seen[1]
    status, body, _ = await stack.post(request_body(evidence, runtime, nonce="chosen-nonce"))
    assert status == 200
    assert jwt.decode(body["token"], options={"verify_signature": False})["nonce"] == "chosen-nonce"


async def test_numeric_nonce_from_the_go_sidecar_is_echoed_as_a_string(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    status, body, _ = await stack.post(request_body(evidence, runtime, nonce=3413764049005270139))
    assert status == 200
    assert jwt.decode(body["token"], options={"verify_signature": False})["nonce"] == "3413764049005270139"


async def test_genuine_aci_request_yields_the_claims_maa_issued_for_it(vectors, ca, server_ssl, tmp_path):
    # The genuine request/response pair: MAA's token for this exact report is in the vectors.
    maa = vectors / "maa"
    service = await LocalAttestationService.create(tmp_path, clock=lambda: float(ACI_IAT))
    genuine = jwt.decode(
        (maa / "sevsnpvm-aci-sharedweu-test-2025-04.jwt").read_text().strip(),
        options={"verify_signature": False},
    )
    body = {"report": (maa / "sevsnpvm-aci-request.report.EXTRACTED.b64url").read_text().strip()}
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        stack = Stack(host, service, session, ca.client_ssl_context())
        status, answer, _ = await stack.post(body)
        assert status == 200, answer
        claims = await stack.verifier().verify(
            answer["token"], issuer=host, at=datetime.fromtimestamp(ACI_IAT, tz=UTC) + timedelta(minutes=5)
        )
    ours = {k: v for k, v in claims.items() if k.startswith("x-ms-sevsnpvm-")}
    theirs = {k: v for k, v in genuine.items() if k.startswith("x-ms-sevsnpvm-")}
    assert ours == theirs
    assert len(ours) == 17
    for name in ("x-ms-attestation-type", "x-ms-ver", "iat", "nbf", "exp"):
        assert claims[name] == genuine[name], name
    assert "x-ms-runtime" not in claims and "x-ms-compliance-status" not in claims


# --- refusals -------------------------------------------------------------------------------------


async def test_tampered_report_is_refused_with_400(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    tampered = bytearray(evidence.report)
    tampered[0x90] ^= 0x01  # one bit of MEASUREMENT
    forged = Evidence(bytes(tampered), evidence.vcek_chain_pem, "test")
    status, body, headers = await stack.post(request_body(forged, runtime))
    assert status == 400
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == "EvidenceVerificationFailed"
    assert "signature" in body["error"]["message"]
    assert headers["x-ms-error-code"] == "EvidenceVerificationFailed"
    with pytest.raises(AttestationFailed) as info:
        await stack.maa().attest(parse_endpoint(stack.host), forged, runtime)
    assert info.value.hint is not None and "refused the evidence" in info.value.hint


async def test_chain_to_an_untrusted_root_is_refused(tee, ca, server_ssl, tmp_path, wrapping_key):
    service = await LocalAttestationService.create(tmp_path)  # the virtual TEE's ARK is not trusted
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        status, body, _ = await Stack(host, service, session, ca.client_ssl_context()).post(
            request_body(evidence, runtime)
        )
    assert status == 400
    assert "not a pinned AMD ARK" in body["error"]["message"]


async def test_runtime_data_mismatch_is_refused_with_400(stack, tee, wrapping_key):
    evidence = await tee.collect(report_data_for(wrapping_key.runtime_data()))
    other = WrappingKey.generate().runtime_data()
    status, body, _ = await stack.post(request_body(evidence, other))
    assert status == 400
    assert body["error"]["code"] == "RuntimeDataMismatch"
    assert hashlib.sha256(other).hexdigest() in body["error"]["message"]


async def test_nonzero_report_data_tail_is_refused_with_400(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    report = tee.sign_report(hashlib.sha256(runtime).digest() + b"\x01" * 32)
    status, body, _ = await stack.post(request_body(Evidence(report, tee.vcek_chain_pem, "test"), runtime))
    assert status == 400
    assert "REPORT_DATA[32:64] must be zero" in body["error"]["message"]


async def test_runtime_data_of_type_json_must_be_json(stack, tee):
    runtime = b"not json"
    evidence = await tee.collect(report_data_for(runtime))
    status, body, _ = await stack.post(request_body(evidence, runtime))
    assert status == 400
    assert "not valid JSON" in body["error"]["message"]


@pytest.mark.parametrize("api_version", ["2019-01-01", "2022-08-01-preview", "", None])
async def test_unsupported_api_version_is_refused_with_400(stack, tee, wrapping_key, api_version):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    status, body, _ = await stack.post(request_body(evidence, runtime), api_version=api_version)
    assert status == 400
    assert body["error"]["code"] == "InvalidApiVersion"
    assert "2022-08-01" in body["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", {}, {"report": 7}, {"report": "!!!"}, {"report": b64url(b'{"SnpReport":"AA"}')}],
)
async def test_malformed_requests_are_refused_with_400(stack, body):
    status, answer, _ = await stack.post(body)
    assert status == 400
    assert answer["error"]["message"]


async def test_init_time_data_must_hash_to_host_data(stack, tee, wrapping_key):
    runtime = wrapping_key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime))
    good = request_body(evidence, runtime, initTimeData={"data": b64url(POLICY), "dataType": "Binary"})
    status, _, _ = await stack.post(good)
    assert status == 200
    bad = request_body(
        evidence, runtime, initTimeData={"data": b64url(b"other policy"), "dataType": "Binary"}
    )
    status, body, _ = await stack.post(bad)
    assert status == 400
    assert body["error"]["code"] == "InitTimeDataMismatch"


# --- OpenID metadata and keys ---------------------------------------------------------------------


async def test_openid_metadata_and_jwks_have_maas_shape(stack):
    async with stack.session.get(
        f"{stack.issuer}/.well-known/openid-configuration", ssl=stack.client_ssl
    ) as resp:
        metadata = await resp.json()
    assert metadata["issuer"] == stack.issuer
    assert metadata["jwks_uri"] == f"{stack.issuer}/certs"
    assert metadata["response_types_supported"] == ["token", "none"]
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    assert metadata["revocation_endpoint"] == f"{stack.issuer}/revoke"
    assert "x-ms-sevsnpvm-hostdata" in metadata["claims_supported"]
    async with stack.session.get(metadata["jwks_uri"], ssl=stack.client_ssl) as resp:
        jwks = await resp.json()
    (key,) = jwks["keys"]
    assert set(key) == {"alg", "kid", "kty", "use", "x5c", "n", "e"}
    assert (key["alg"], key["kty"], key["use"], key["kid"]) == ("RS256", "RSA", "sig", stack.service.kid)
    cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0], validate=True))
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == stack.issuer
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    assert int.from_bytes(unb64url(key["n"]), "big") == numbers.n
    assert int.from_bytes(unb64url(key["e"]), "big") == numbers.e


async def test_every_response_reports_server_timing(stack):
    for method, path in [("GET", "/certs"), ("POST", "/attest/SevSnpVm"), ("GET", "/nowhere")]:
        async with stack.session.request(method, f"{stack.issuer}{path}", ssl=stack.client_ssl) as resp:
            assert re.fullmatch(r"app;dur=\d+(\.\d+)?", resp.headers["Server-Timing"]), (method, path)


async def test_issuer_defaults_to_the_request_host(tee, ca, server_ssl, tmp_path, wrapping_key):
    service = await LocalAttestationService.create(tmp_path, trusted_arks=[tee.ark_certificate])
    runtime = wrapping_key.runtime_data()
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        stack = Stack(host, service, session, ca.client_ssl_context())
        token = await stack.maa().attest(
            parse_endpoint(host), await tee.collect(report_data_for(runtime)), runtime
        )
        claims = await stack.verifier().verify(token, issuer=host)
    assert service.issuer is None
    assert claims["iss"] == f"https://{host}"


# --- signing material and faults ------------------------------------------------------------------


async def test_signing_key_is_persisted_privately_and_reloaded(tmp_path):
    first = await LocalAttestationService.create(tmp_path, issuer="https://127.0.0.1:9443")
    second = await LocalAttestationService.create(tmp_path, issuer="https://127.0.0.1:9443")
    assert first.kid == second.kid
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key = serialization.load_pem_private_key((tmp_path / "attestation-signing-key.pem").read_bytes(), None)
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert "PRIVATE" not in repr(first)


class ScriptedFaults:
    """A fault hook: answers the first ``attest`` with 503, and can ask for token mutations."""

    def __init__(self, mutations: frozenset[str] = frozenset()) -> None:
        self.routes: list[str] = []
        self.mutations = mutations

    async def before(self, route: str, request: web.Request) -> web.StreamResponse | None:
        self.routes.append(route)
        if route == "attest" and self.routes.count("attest") == 1:
            return web.json_response({"error": {"code": "Busy", "message": "try again"}}, status=503)
        return None

    def mutations_for(self, request: web.Request) -> frozenset[str]:
        return self.mutations


@pytest.mark.parametrize(
    ("mutation", "refusal"),
    [(None, None), ("wrong_issuer", "issued by"), ("resign_jws", "signature"), ("expired_cert", "expired")],
)
async def test_fault_hook_is_consulted_per_route(
    tee, ca, server_ssl, tmp_path, wrapping_key, mutation, refusal
):
    faults = ScriptedFaults(frozenset({mutation}) if mutation else frozenset())
    service = await LocalAttestationService.create(
        tmp_path, trusted_arks=[tee.ark_certificate], faults=faults
    )
    runtime = wrapping_key.runtime_data()
    async with serve(service.app, server_ssl) as host, aiohttp.ClientSession() as session:
        service.issuer = f"https://{host}"
        stack = Stack(host, service, session, ca.client_ssl_context())
        token = await stack.maa().attest(
            parse_endpoint(host), await tee.collect(report_data_for(runtime)), runtime
        )
        if refusal is None:
            await stack.verifier().verify(token, issuer=host)
        else:
            with pytest.raises(TokenError, match=refusal):
                await stack.verifier().verify(token, issuer=host)
    assert faults.routes[:2] == ["attest", "attest"]  # the 503 was retried by the client
