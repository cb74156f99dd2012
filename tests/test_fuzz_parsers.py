"""Hypothesis fuzzing of every parser that reads untrusted bytes: only the module's own errors escape.

Each parser gets arbitrary input *and* structure-aware near-valid input (real certificates, real
signatures, documents of the right shape with hostile leaves), because purely random bytes rarely get
past the first check. The property is always the same: the parser returns a value or raises the
:mod:`skr.errors` class it documents — never ``ValueError``, ``KeyError``, ``RecursionError``,
``OverflowError``, ``UnicodeError`` or anything else that would turn into a 500 or a crashed daemon.

Covered: THIM JSON, security-context files and variables, the CCE policy decoder, the GHCB certificate
table, certificate bundles, MAA tokens (unverified views and :class:`TokenVerifier` with a pinned key
set), release JWS (arbitrary, structured, and genuinely signed with arbitrary payloads → ``open_release``),
``key_hsm`` and the RSA-AES unwrap, release policies (grammar-shaped documents; arbitrary JSON is in
tests/test_policy.py), audit-log lines (``verify_chain``, ``read_records``, recovery on start), endpoints,
``SkrSideCarArgs`` and the HTTP ``runtime_data`` decoder. The SNP report parser is fuzzed in
tests/test_snp_report.py.

Runs are derandomized (fixed examples in CI) and bounded by ``max_examples``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from skr.akv.jws import TrustStore, open_release, sign_release_jws, verify_release_jws
from skr.akv.keywrap import Enc, KeyHsm, encode_key_hsm, parse_key_hsm, unwrap, wrap
from skr.akv.policy import ReleasePolicy, evaluate, parse_policy
from skr.audit import AuditLog, read_records, verify_chain
from skr.config import decode_sidecar_args
from skr.endpoints import Endpoint, parse_endpoint
from skr.errors import (
    AuditError,
    BadRequest,
    CertificateError,
    CollateralError,
    ConfigError,
    EvidenceUnavailable,
    JwsError,
    KeyWrapError,
    PolicyError,
    TokenError,
)
from skr.evidence.certtable import parse_cert_table
from skr.evidence.context import (
    HOST_AMD_CERT_ENV,
    HOST_AMD_CERT_FILE,
    POLICY_ENV,
    POLICY_FILE,
    REFERENCE_INFO_ENV,
    REFERENCE_INFO_FILE,
    SecurityContext,
    load_security_context,
)
from skr.local.ca import LocalCA
from skr.maa.token import TokenVerifier, token_expiry, unverified_claims, unverified_header
from skr.server import decode_runtime_data
from skr.snp.certs import load_certificates
from skr.snp.hostdata import decode_cce_policy
from skr.snp.kds import ThimCertificates, parse_thim_json

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=60)

DEEP = b"[" * 100_000 + b"]" * 100_000  # deeper than any JSON decoder's recursion limit
ISSUER = "https://fuzz.attest.azure.net"


# --- strategies and helpers --------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
# Text that is hostile to JSON and base64 decoders: lone surrogates, NULs, non-ASCII, padding.
hostile_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()) | st.sampled_from("=+/-_.\r\n\0\ud800\udfff"),
    max_size=80,
)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jdump(value: Any) -> bytes:
    """JSON the way a hostile peer may write it: NaN/Infinity allowed, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def pem() -> bytes:
    """One genuine PEM certificate (a P-384 key, like a VCEK), built here with cryptography."""
    cert = _self_signed(ec.generate_private_key(ec.SECP384R1()), "fuzz VCEK")
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_variants(pem: bytes) -> st.SearchStrategy[Any]:
    text = pem.decode()
    return (
        st.sampled_from(
            [
                text,
                text + text,
                text[:-40],
                text.replace("MII", "MIJ", 1),
                text.replace("CERTIFICATE", "CERTIFICATES"),
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "-----BEGIN CERTIFICATE-----\n"
                + base64.b64encode(b"\x30\x82\xff\xff").decode()
                + "\n-----END CERTIFICATE-----",
                " ",
            ]
        )
        | json_values
    )


# --- THIM JSON (host VCEK chain from the security context or a THIM endpoint) -----------------------


@FUZZ
@given(st.binary(max_size=600) | st.text(max_size=200).map(str.encode))
@example(DEEP)
@example(b'{"vcekCert": "\\ud800", "certificateChain": "x", "tcbm": "1"}')
def test_thim_json_arbitrary_bytes(data):
    with contextlib.suppress(CollateralError):
        assert isinstance(parse_thim_json(data), ThimCertificates)


@FUZZ
@given(data=st.data())
def test_thim_json_shaped_documents(pem, data):
    fields = st.fixed_dictionaries(
        {},
        optional={
            "vcekCert": _pem_variants(pem),
            "certificateChain": _pem_variants(pem),
            "tcbm": st.sampled_from(["7308000000000003", "0", "x" * 17, "db18000000000004 ", ""])
            | json_values,
            "cacheControl": st.sampled_from(["86400", "max-age=10", "-1", "1e9"]) | json_values,
        },
    )
    doc = data.draw(fields)
    try:
        thim = parse_thim_json(jdump(doc))
    except CollateralError:
        return
    assert thim.tcb_raw >= 0 and thim.chain_pem().startswith(thim.vcek_pem)


# --- security context (files the platform mounts, or legacy variables) -----------------------------


_context_value = (
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
    | json_objects.map(lambda d: base64.b64encode(jdump(d)).decode())
    | st.sampled_from([base64.b64encode(b"\xd2\x84rest").decode(), "", "   ", "=", "QQ", "QQ=="])
    | hostile_text
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            POLICY_ENV: _context_value,
            HOST_AMD_CERT_ENV: _context_value,
            REFERENCE_INFO_ENV: _context_value,
        },
    )
)
def test_security_context_variables(env):
    with tempfile.TemporaryDirectory() as root:
        try:
            context = load_security_context(env, Path(root))
        except EvidenceUnavailable:
            return
    assert isinstance(context, SecurityContext)
    assert context.security_policy is None or context.host_data is not None


@FEW
@given(
    st.fixed_dictionaries(
        {},
        optional={
            POLICY_FILE: st.binary(max_size=200)
            | _context_value.map(lambda s: s.encode("utf-8", "surrogatepass")),
            HOST_AMD_CERT_FILE: st.binary(max_size=200)
            | _context_value.map(lambda s: s.encode("utf-8", "surrogatepass")),
            REFERENCE_INFO_FILE: st.binary(max_size=200)
            | _context_value.map(lambda s: s.encode("utf-8", "surrogatepass")),
        },
    )
)
def test_security_context_files(files):
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / "security-context-fuzz"
        directory.mkdir()
        for name, content in files.items():
            (directory / name).write_bytes(content)
        try:
            context = load_security_context({}, Path(root))
        except EvidenceUnavailable:
            return
        assert context.directory == directory


@FUZZ
@given(st.binary(max_size=300) | hostile_text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_cce_policy_decoder(data):
    with contextlib.suppress(BadRequest):
        assert isinstance(decode_cce_policy(data), bytes)


# --- certificates from the host (GHCB table) and from KDS / THIM ------------------------------------


@FUZZ
@given(st.binary(max_size=400))
@example(b"\x01" * 24 + bytes(24))
@example(b"\x01" * 16 + (2**32 - 1).to_bytes(4, "little") + (2**32 - 1).to_bytes(4, "little") + bytes(24))
def test_cert_table(blob):
    try:
        table = parse_cert_table(blob)
    except EvidenceUnavailable:
        return
    with contextlib.suppress(EvidenceUnavailable):
        table.chain_pem()


@FUZZ
@given(
    st.binary(max_size=400)
    | st.text(max_size=300).map(lambda t: b"-----BEGIN CERTIFICATE-----\n" + t.encode())
)
def test_certificate_bundles(data):
    with contextlib.suppress(CertificateError):
        assert load_certificates(data)


# --- MAA tokens -------------------------------------------------------------------------------------


def _token_from(header: Any, claims: Any, signature: bytes = b"sig") -> str:
    return ".".join([b64u(jdump(header)), b64u(jdump(claims)), b64u(signature)])


@FUZZ
@given(
    hostile_text
    | st.builds(_token_from, json_values, json_values)
    | st.lists(st.text(alphabet="AZaz09-_=.", max_size=30), max_size=5).map(".".join)
)
@example("." + b64u(DEEP) + ".x")
@example(b64u(DEEP) + ".e30.x")
@example(_token_from({"alg": "RS256"}, {"exp": float("inf")}))
@example(_token_from({"alg": "RS256"}, {"exp": 2**70}))
def test_unverified_token_views(token):
    for view in (unverified_header, unverified_claims):
        with contextlib.suppress(TokenError):
            assert isinstance(view(token), dict)
    with contextlib.suppress(TokenError):
        token_expiry(unverified_claims(token))


@pytest.fixture(scope="module")
def maa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


_NO_NETWORK_TLS = ssl.create_default_context()
_claim_values = json_values | st.sampled_from([1e309, -1e309, 2**64, -(2**63), 1.5e12, "1700000000", True])


@FUZZ
@given(
    header_extra=json_objects,
    alg=st.sampled_from(["RS256", "PS384", "none", "HS256", "ES256"]) | json_values,
    kid=st.sampled_from(["fuzz-key", "other"]) | json_values,
    claims=st.fixed_dictionaries(
        {},
        optional={
            "iss": st.sampled_from(
                [ISSUER, ISSUER + "/", "https://evil.example", "http://fuzz.attest.azure.net"]
            )
            | json_values,
            "exp": _claim_values,
            "nbf": _claim_values,
            "iat": _claim_values,
        },
    ).flatmap(lambda fixed: json_objects.map(lambda extra: {**extra, **fixed})),
)
def test_token_verifier_with_pinned_keys(maa_key, header_extra, alg, kid, claims):
    """Tokens signed with the pinned key (so they pass the signature) carrying hostile headers and claims."""
    header = {**header_extra, "alg": alg, "kid": kid, "typ": "JWT"}
    result = _verify_pinned(maa_key, header, claims)
    if result is not None:
        assert result["iss"] in (ISSUER, ISSUER + "/") and alg == "RS256" and kid == "fuzz-key"


def test_harness_a_well_formed_token_verifies(maa_key):
    """The fuzz above reaches the signature and lifetime checks: a well-formed token passes them."""
    claims = {"iss": ISSUER, "exp": 1_900_000_000, "nbf": 1_800_000_000, "x-ms-ver": "1.0"}
    assert _verify_pinned(maa_key, {"alg": "RS256", "kid": "fuzz-key", "typ": "JWT"}, claims) == claims


def _verify_pinned(maa_key: rsa.RSAPrivateKey, header: Any, claims: Any) -> dict[str, Any] | None:
    """Sign with the pinned key, verify at 2030-01-01 without any network; None when refused."""
    signing_input = f"{b64u(jdump(header))}.{b64u(jdump(claims))}".encode()
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(signing_input, maa_key)
    token = f"{signing_input.decode()}.{b64u(signature)}"
    public = jwt.algorithms.RSAAlgorithm.to_jwk(maa_key.public_key(), as_dict=True)

    async def run() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as session:
            verifier = TokenVerifier(session, ssl_context=_NO_NETWORK_TLS)  # keys are pinned: no fetch
            verifier.add_jwks(ISSUER, {"keys": [{**public, "kid": "fuzz-key", "use": "sig"}]})
            try:
                return await verifier.verify(token, issuer=ISSUER, at=datetime(2030, 1, 1, tzinfo=UTC))
            except TokenError:
                return None

    return asyncio.run(run())


# --- release JWS, key_hsm, unwrap ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_pki(tmp_path_factory) -> tuple[Any, TrustStore]:
    ca = LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))
    issued = ca.issue(["fuzz.vault.azure.net"])
    return issued, TrustStore(include_system=False, extra_certificates=[ca.ca_certificate])


@FUZZ
@given(
    hostile_text
    | st.lists(st.text(alphabet="AZaz09-_", max_size=40), min_size=3, max_size=3).map(".".join)
    | st.builds(
        lambda h, p, s: f"{b64u(jdump(h))}.{b64u(p)}.{b64u(s)}",
        json_values,
        st.binary(max_size=64),
        st.binary(max_size=64),
    )
)
@example(b64u(DEEP) + ".e30.c2ln")
@example("e30." + b64u(DEEP) + ".c2ln")
def test_release_jws_arbitrary(release_pki, compact):
    _, trust = release_pki
    with contextlib.suppress(JwsError):
        verify_release_jws(compact, host=parse_endpoint("fuzz.vault.azure.net"), trust=trust)
        pytest.fail("an unsigned or garbage JWS verified")


@FUZZ
@given(
    header_extra=json_objects,
    alg=st.sampled_from(["RS256", "PS256", "none", "HS256"]) | json_values,
    x5c=st.sampled_from(["chain", "leaf-only", "garbage", "urlsafe"]) | json_values,
    payload=st.binary(max_size=100),
)
def test_release_jws_shaped_headers(release_pki, header_extra, alg, x5c, payload):
    issued, trust = release_pki
    ders = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in issued.chain]
    x5c_value = (
        {
            "chain": ders,
            "leaf-only": ders[:1],
            "garbage": ["MII" + "A" * 20, 7],
            "urlsafe": [d.replace("+", "-").replace("/", "_") for d in ders],
        }.get(x5c, x5c)
        if isinstance(x5c, str)
        else x5c
    )
    header = {**header_extra, "alg": alg, "x5c": x5c_value}
    signing_input = f"{b64u(jdump(header))}.{b64u(payload)}".encode()
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(
        signing_input, issued.private_key
    )
    compact = f"{signing_input.decode()}.{b64u(signature)}"
    try:
        verified = verify_release_jws(compact, host=parse_endpoint("fuzz.vault.azure.net"), trust=trust)
    except JwsError:
        return
    assert alg == "RS256" and json.loads(payload) == verified


_enc = st.sampled_from([e.value for e in Enc]) | json_values


@st.composite
def release_payloads(draw: st.DrawFn, wrapping: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Release payloads of the right shape whose leaves are hostile (and sometimes genuinely wrapped)."""
    ciphertext = draw(
        st.sampled_from(["wrapped", "random", "short"]).map(
            lambda kind: {
                "wrapped": wrap(b"k" * 32, wrapping.public_key(), Enc.CKM_RSA_AES_KEY_WRAP),
                "short": b"\x00" * 10,
            }.get(kind, bytes(256) + b"\x01" * 24)
        )
    )
    key_hsm = draw(
        st.builds(
            lambda kid, enc, schema, alg: b64u(
                jdump(
                    {
                        "schema_version": schema,
                        "header": {"kid": kid, "alg": alg, "enc": enc},
                        "ciphertext": b64u(ciphertext),
                    }
                )
            ),
            st.sampled_from(["wk"]) | json_values,
            _enc,
            st.sampled_from(["1.0", "2.0", "1"]) | json_values,
            st.sampled_from(["dir"]) | json_values,
        )
        | hostile_text
    )
    key = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "kid": st.sampled_from(["https://fuzz.vault.azure.net/keys/k/0123456789abcdef"])
                | json_values,
                "kty": st.sampled_from(["oct-HSM", "oct", "RSA-HSM", "EC-HSM", "OKP"]) | json_values,
                "key_hsm": st.just(key_hsm) | json_values,
                "key_ops": st.lists(st.text(max_size=8), max_size=3) | json_values,
                "n": json_values,
                "crv": json_values,
            },
        )
    )
    request = draw(st.fixed_dictionaries({}, optional={"enc": _enc}) | json_values)
    shape = draw(st.sampled_from(["full", "no-response", "flat"]))
    if shape == "no-response":
        return {"request": request}
    if shape == "flat":
        return {"response": key}
    return {"request": request, "response": {"key": {"key": key}}}


@pytest.fixture(scope="module")
def wrapping_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_harness_a_well_formed_release_opens(release_pki, wrapping_key):
    """The fuzz below reaches unwrap and JWK building: a well-formed signed release opens."""
    issued, trust = release_pki
    enc = Enc.CKM_RSA_AES_KEY_WRAP
    key_hsm = encode_key_hsm("wk", enc, wrap(b"k" * 32, wrapping_key.public_key(), enc))
    payload = {
        "request": {"enc": enc.value},
        "response": {
            "key": {
                "key": {"kid": "https://fuzz.vault.azure.net/keys/k/0a", "kty": "oct-HSM", "key_hsm": key_hsm}
            }
        },
    }
    compact = sign_release_jws(payload, issued.private_key, issued.chain)
    released = open_release(
        compact, host=parse_endpoint("fuzz.vault.azure.net"), trust=trust, wrapping_key=wrapping_key
    )
    assert released.jwk["kty"] == "oct" and base64.urlsafe_b64decode(released.jwk["k"] + "=") == b"k" * 32


@FUZZ
@given(data=st.data())
def test_open_release_of_signed_hostile_payloads(release_pki, wrapping_key, data):
    """A genuinely signed release whose payload is hostile: only JwsError / KeyWrapError escape."""
    issued, trust = release_pki
    payload = data.draw(release_payloads(wrapping_key) | json_objects)
    compact = sign_release_jws(payload, issued.private_key, issued.chain)
    assert verify_release_jws(
        compact, host=parse_endpoint("fuzz.vault.azure.net"), trust=trust
    ) == json.loads(jdump(payload))
    with contextlib.suppress(JwsError, KeyWrapError):
        released = open_release(
            compact, host=parse_endpoint("fuzz.vault.azure.net"), trust=trust, wrapping_key=wrapping_key
        )
        assert released.jwk["kty"] in ("oct", "RSA", "EC")


@FUZZ
@given(
    hostile_text
    | json_values.map(lambda v: b64u(jdump(v)))
    | st.builds(
        lambda schema, header, ct: b64u(
            jdump({"schema_version": schema, "header": header, "ciphertext": ct})
        ),
        st.sampled_from(["1.0", "1.x", "0.9", ""]) | json_values,
        st.fixed_dictionaries(
            {}, optional={"kid": json_values, "alg": st.just("dir") | json_values, "enc": _enc}
        ),
        st.binary(max_size=40).map(b64u) | hostile_text | json_values,
    )
)
@example(b64u(DEEP))
def test_key_hsm(value):
    try:
        parsed = parse_key_hsm(value)
    except KeyWrapError:
        return
    assert isinstance(parsed, KeyHsm) and parsed.ciphertext
    assert parse_key_hsm(
        encode_key_hsm(parsed.kid, parsed.enc or Enc.CKM_RSA_AES_KEY_WRAP, parsed.ciphertext)
    ) == KeyHsm(parsed.kid, parsed.enc or Enc.CKM_RSA_AES_KEY_WRAP, parsed.ciphertext)


@FEW
@given(st.binary(min_size=0, max_size=320), st.sampled_from(list(Enc)))
def test_unwrap_of_arbitrary_ciphertext(wrapping_key, ciphertext, enc):
    with contextlib.suppress(KeyWrapError):
        unwrap(ciphertext, wrapping_key, enc)
        pytest.fail("arbitrary bytes unwrapped")  # OAEP + RFC 5649 integrity make this impossible


# --- release policies (grammar-shaped; arbitrary JSON is in tests/test_policy.py) --------------------

_operators = ["equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals", "exists"]


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> Any:
    if depth < 3 and draw(st.booleans()):
        group = draw(st.sampled_from(["anyOf", "allOf"]))
        return {group: draw(st.lists(conditions(depth + 1), max_size=3))}
    claim = draw(
        st.sampled_from(["x-ms-sevsnpvm-hostdata", "a.b", "a..b", "", "x-ms-attestation-type"]) | json_values
    )
    if draw(st.booleans()):
        return {"claim": claim, draw(st.sampled_from(_operators)): draw(scalars | json_values)}
    return {
        "claim": claim,
        "condition": draw(st.sampled_from(_operators) | json_values),
        "value": draw(json_values),
    }


@FUZZ
@given(
    version=st.sampled_from(["1.0.0", "0.2", "2"]) | json_values,
    authority=st.sampled_from([ISSUER, "fuzz.attest.azure.net", "http://x", ""]) | json_values,
    body=conditions(),
    claims=json_objects,
)
def test_policy_shaped_documents(version, authority, body, claims):
    doc = {
        "version": version,
        "anyOf": [{"authority": authority, **(body if "claim" not in body else {"allOf": [body]})}],
    }
    for data in (doc, jdump(doc)):
        try:
            policy = parse_policy(data)
        except PolicyError:
            continue
        assert isinstance(policy, ReleasePolicy)
        decision = evaluate(policy, {"iss": ISSUER, **claims})
        assert decision.allowed or decision.reason


# --- audit log lines ---------------------------------------------------------------------------------

_line = (
    st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
    | json_objects.map(jdump)
    | st.sampled_from(
        [
            b'{"seq": 1, "hash": "\\ud800"}',
            b'{"seq": 1e999, "hash": "' + b"0" * 64 + b'"}',
            b'{"seq": 1, "hash": "' + b"0" * 64 + b'", "x": "\\udfff"}',
            b"[" * 50_000,
            DEEP,
        ]
    )
)


@FUZZ
@given(st.lists(_line, max_size=5), st.booleans())
def test_audit_verify_and_read_arbitrary_lines(lines, final_newline):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline and lines else b""))
        result = verify_chain([path])
        assert result.intact or result.finding is not None
        list(read_records([path]))
        try:
            log = AuditLog(path)  # recovery on start: open, or refuse with AuditError, never crash
        except AuditError:
            return
        log.append({"event": "fuzz", "outcome": "granted"})
        log.close()


_record_fields = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["key.release", "attest.raw"]),
        "outcome": st.sampled_from(["granted", "denied", "error"]),
    },
    optional={"kid": st.text(max_size=12), "duration_ms": st.floats(0, 1e6), "client": st.text(max_size=8)},
)


@FUZZ
@given(st.lists(_record_fields, min_size=1, max_size=5), st.data())
def test_audit_any_single_byte_edit_is_detected(records, data):
    """Flip one byte of a genuine chain: unless the line still means the same JSON, verify finds it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        log = AuditLog(path)
        for fields in records:
            log.append(fields)
        log.close()
        raw = bytearray(path.read_bytes())
        assert verify_chain([path]).intact
        index = data.draw(st.integers(0, len(raw) - 1))
        assume(raw[index] != 0x0A)
        original_line = bytes(raw).split(b"\n")[bytes(raw)[:index].count(b"\n")]
        raw[index] = data.draw(st.integers(0, 255).filter(lambda b: b not in (raw[index], 0x0A)))
        edited_line = bytes(raw).split(b"\n")[bytes(raw)[:index].count(b"\n")]
        with contextlib.suppress(ValueError):
            assume(json.loads(edited_line) != json.loads(original_line))
        path.write_bytes(bytes(raw))
        result = verify_chain([path])
        assert not result.intact
        assert result.finding is not None and result.finding.kind == "tampered"


# --- request fields and configuration ----------------------------------------------------------------


@FUZZ
@given(
    hostile_text
    | st.builds(
        lambda scheme, userinfo, host, port, rest: f"{scheme}{userinfo}{host}{port}{rest}",
        st.sampled_from(["", "https://", "http://", "HTTPS://", "ftp://", "file://", "javascript:"]),
        st.sampled_from(["", "user@", "u:p@", "@"]),
        st.sampled_from(
            ["a.vault.azure.net", "[::1]", "127.0.0.1", "xn--e1a.example", "-bad-.x", "a..b", ""]
        ),
        st.sampled_from(["", ":443", ":0", ":65536", ":-1", ":x", ":"]),
        st.sampled_from(["", "/", "/path", "?q", "#f", "/../", "%2F"]),
    )
)
def test_endpoints(value):
    try:
        ep = parse_endpoint(value, what="akv_endpoint")
    except BadRequest:
        return
    assert isinstance(ep, Endpoint) and 0 < ep.port < 65536
    assert parse_endpoint(ep.url) == ep and "@" not in ep.authority and "/" not in ep.authority


@FUZZ
@given(
    hostile_text
    | json_values.map(lambda v: base64.b64encode(jdump(v)).decode())
    | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
)
def test_sidecar_args(value):
    with contextlib.suppress(ConfigError):
        assert isinstance(decode_sidecar_args(value), dict)


@FUZZ
@given(hostile_text | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()))
def test_runtime_data_is_strict_standard_base64(value):
    try:
        decoded = decode_runtime_data(value)
    except BadRequest as exc:
        assert exc.code == "invalid_base64"
        return
    assert "-" not in value and "_" not in value
    assert decoded == base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)


def test_runtime_data_refuses_url_safe_alphabet():
    raw = bytes(range(256))
    with pytest.raises(BadRequest):
        decode_runtime_data(base64.urlsafe_b64encode(raw).decode())
    assert decode_runtime_data(base64.b64encode(raw).decode()) == raw
    with pytest.raises(binascii.Error):  # the independent decoder agrees it is not standard base64
        base64.b64decode(base64.urlsafe_b64encode(raw), validate=True)
