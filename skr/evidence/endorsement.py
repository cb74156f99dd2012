"""The UVM endorsement of confidential containers: ACI's ``reference-info-base64`` (a COSE_Sign1).

Owns the format MAA reads from ``Endorsements.Uvm`` (docs/wire-formats.md §1.3, §7; RFC 9052 COSE_Sign1,
RFC 9360 ``x5chain``), as the genuine ACI endorsement in the test vectors has it:

* CBOR tag 18 around ``[protected: bstr, unprotected: map, payload: bstr, signature: bstr]``;
* protected header: ``1`` (alg, PS384 = -38 in the genuine one), ``3`` (content type
  ``application/json``), ``33`` (``x5chain``: leaf first, DER), ``34`` (``x5t``: [-16, SHA-256 of the leaf],
  optional), ``"iss"`` (a ``did:x509:0:sha256:<CA fingerprint>::eku:<OID>``), ``"feed"``
  (``ContainerPlat-AMD-UVM``) and ``"signingtime"`` (CBOR tag 1, optional);
* payload: JSON ``{"x-ms-sevsnpvm-guestsvn": "<decimal string>",
  "x-ms-sevsnpvm-launchmeasurement": "<96 hex digits>"}`` — what MAA copies into the token's
  ``x-ms-sevsnpvm-uvm-endorsement`` object.

Parsing (:func:`parse_uvm_endorsement`), verification (:func:`verify_uvm_endorsement`: signature by the
``x5chain`` leaf over the RFC 9052 ``Sig_structure``, the chain up to a trusted root, the leaf's UVM-signing
EKU, ``iss`` naming that root and EKU, the expected ``feed``) and signing (:func:`sign_uvm_endorsement`,
for local mode's virtual TEE). CBOR comes from ``cbor2``; every signature check and every signature from
``cryptography``.

Pure: no I/O, no asyncio. Never accepts a payload whose measurement is not 48 bytes of hex, and never
reports an endorsement as verified when any step failed. Errors are :class:`skr.errors.VerificationError`
with code ``uvm_endorsement_invalid``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID

from skr.b64 import b64url_encode
from skr.errors import Code, VerificationError
from skr.snp.certs import read_certificates

ERROR_CODE: Final = Code.UVM_ENDORSEMENT_INVALID

COSE_SIGN1_TAG: Final = 18
HEADER_ALG: Final = 1
HEADER_CONTENT_TYPE: Final = 3
HEADER_X5CHAIN: Final = 33
HEADER_X5T: Final = 34
HEADER_ISS: Final = "iss"
HEADER_FEED: Final = "feed"
HEADER_SIGNING_TIME: Final = "signingtime"

CONTENT_TYPE_JSON: Final = "application/json"
UVM_FEED: Final = "ContainerPlat-AMD-UVM"
UVM_SIGNING_EKU: Final = x509.ObjectIdentifier("1.3.6.1.4.1.311.76.59.1.2")
"""The EKU the genuine ACI UVM signing certificate carries (and its ``iss`` names)."""

CLAIM_GUEST_SVN: Final = "x-ms-sevsnpvm-guestsvn"
CLAIM_LAUNCH_MEASUREMENT: Final = "x-ms-sevsnpvm-launchmeasurement"
CLAIM_UVM_ENDORSEMENT: Final = "x-ms-sevsnpvm-uvm-endorsement"
MEASUREMENT_SIZE: Final = 48

_COSE_SHA256: Final = -16
_ALGORITHMS: Final[dict[int, tuple[str, hashes.HashAlgorithm]]] = {  # RSASSA-PSS (PS*) and ECDSA (ES*)
    -37: ("PS256", hashes.SHA256()),
    -38: ("PS384", hashes.SHA384()),
    -39: ("PS512", hashes.SHA512()),
    -7: ("ES256", hashes.SHA256()),
    -35: ("ES384", hashes.SHA384()),
    -36: ("ES512", hashes.SHA512()),
}
_DID_PREFIX: Final = "did:x509:0:sha256:"
_MAX_DEPTH: Final = 8  # COSE_Sign1 nests three deep; anything deeper is hostile


def _fail(message: str, hint: str | None = None) -> VerificationError:
    return VerificationError(f"UVM endorsement: {message}", hint=hint, code=ERROR_CODE)


@dataclass(frozen=True)
class UvmEndorsement:
    """A decoded (not yet verified) UVM endorsement.

    ``algorithm``: the COSE algorithm number (-38 = PS384). ``x5chain``: leaf first. ``issuer`` and
    ``feed``: the ``iss`` / ``feed`` protected headers. ``launch_measurement``: 48 bytes.
    ``guest_svn``: the decimal string of the payload (MAA emits it as a string).
    """

    algorithm: int
    content_type: str | None
    x5chain: tuple[x509.Certificate, ...]
    issuer: str
    feed: str
    signing_time: datetime | None
    launch_measurement: bytes
    guest_svn: str
    protected: bytes = field(repr=False)
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def algorithm_name(self) -> str:
        """``PS384`` and so on."""
        return _ALGORITHMS[self.algorithm][0] if self.algorithm in _ALGORITHMS else str(self.algorithm)

    def to_be_signed(self) -> bytes:
        """The RFC 9052 §4.4 ``Sig_structure``: ``["Signature1", protected, external_aad = h'', payload]``."""
        return _sig_structure(self.protected, self.payload)

    def claims(self) -> dict[str, str]:
        """The ``x-ms-sevsnpvm-uvm-endorsement`` object MAA emits: both values are strings."""
        return {CLAIM_GUEST_SVN: self.guest_svn, CLAIM_LAUNCH_MEASUREMENT: self.launch_measurement.hex()}


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


# --- parsing -------------------------------------------------------------------------------------------


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data, max_depth=_MAX_DEPTH, allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types for hostile input; all mean "not CBOR"
        raise _fail(f"{what} is not well-formed CBOR ({type(exc).__name__})") from None


def parse_uvm_endorsement(data: bytes) -> UvmEndorsement:
    """Decode the COSE_Sign1 bytes (tagged or untagged) and its headers and payload; no signature check."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise _fail("empty", hint="reference-info-base64 holds the base64 of a COSE_Sign1")
    top = _loads(bytes(data), "the endorsement")
    if isinstance(top, cbor2.CBORTag):
        if top.tag != COSE_SIGN1_TAG:
            raise _fail(f"CBOR tag {top.tag}, expected {COSE_SIGN1_TAG} (COSE_Sign1)")
        top = top.value
    if not isinstance(top, list | tuple) or len(top) != 4:
        raise _fail("not a COSE_Sign1 array of four elements")
    protected, unprotected, payload, signature = top
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise _fail("the protected header, payload and signature must be byte strings")
    if not isinstance(unprotected, Mapping):
        raise _fail("the unprotected header must be a map")
    headers = _loads(protected, "the protected header")
    if not isinstance(headers, Mapping):
        raise _fail("the protected header must be a map")
    algorithm = headers.get(HEADER_ALG)
    if type(algorithm) is not int or algorithm not in _ALGORITHMS:
        raise _fail(
            f"algorithm {algorithm!r} is not supported", hint="expected PS256/384/512 or ES256/384/512"
        )
    content_type = headers.get(HEADER_CONTENT_TYPE)
    if content_type is not None and content_type != CONTENT_TYPE_JSON:
        raise _fail(f"content type {content_type!r}, expected {CONTENT_TYPE_JSON!r}")
    chain = _x5chain(headers.get(HEADER_X5CHAIN))
    _check_x5t(headers.get(HEADER_X5T), chain[0])
    issuer, feed = headers.get(HEADER_ISS), headers.get(HEADER_FEED)
    if not isinstance(issuer, str) or not issuer or not isinstance(feed, str) or not feed:
        raise _fail("the protected header has no 'iss' and 'feed' strings")
    measurement, svn = _payload(payload)
    return UvmEndorsement(
        algorithm=int(algorithm),
        content_type=content_type,
        x5chain=chain,
        issuer=issuer,
        feed=feed,
        signing_time=_signing_time(headers.get(HEADER_SIGNING_TIME)),
        launch_measurement=measurement,
        guest_svn=svn,
        protected=protected,
        payload=payload,
        signature=signature,
    )


def _x5chain(value: Any) -> tuple[x509.Certificate, ...]:
    items = [value] if isinstance(value, bytes) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(i, bytes) for i in items):
        raise _fail("the protected header has no x5chain (label 33) of DER certificates")
    try:
        return tuple(read_certificates(item, encoding=serialization.Encoding.DER)[0] for item in items)
    except ValueError:
        raise _fail("a certificate in x5chain is not DER") from None


def _check_x5t(value: Any, leaf: x509.Certificate) -> None:
    if value is None:
        return
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and value[0] == _COSE_SHA256
        and isinstance(value[1], bytes)
    ):
        raise _fail("x5t (label 34) must be [-16, SHA-256 of the leaf]")
    if value[1] != hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest():
        raise _fail("x5t does not match the x5chain leaf")


def _signing_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    raise _fail("signingtime must be a CBOR date")


def _payload(payload: bytes) -> tuple[bytes, str]:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise _fail("the payload is not JSON") from None
    if not isinstance(doc, dict):
        raise _fail("the payload must be a JSON object")
    measurement, svn = doc.get(CLAIM_LAUNCH_MEASUREMENT), doc.get(CLAIM_GUEST_SVN)
    if not isinstance(measurement, str) or len(measurement) != 2 * MEASUREMENT_SIZE:
        raise _fail(f"the payload has no {CLAIM_LAUNCH_MEASUREMENT} of {2 * MEASUREMENT_SIZE} hex digits")
    try:
        value = bytes.fromhex(measurement)
    except ValueError:
        raise _fail(f"{CLAIM_LAUNCH_MEASUREMENT} is not hex") from None
    if isinstance(svn, int) and not isinstance(svn, bool):
        svn = str(svn)
    if not isinstance(svn, str) or not svn.isdigit():
        raise _fail(f"the payload has no decimal {CLAIM_GUEST_SVN}")
    return value, svn


# --- verification ------------------------------------------------------------------------------------


def verify_uvm_endorsement_signature(endorsement: UvmEndorsement) -> None:
    """Check the COSE signature with the public key of the ``x5chain`` leaf (no trust decision)."""
    key = endorsement.x5chain[0].public_key()
    message = endorsement.to_be_signed()
    name, digest = _ALGORITHMS[endorsement.algorithm]
    try:
        if name.startswith("PS"):
            if not isinstance(key, rsa.RSAPublicKey):
                raise _fail(f"{name} needs an RSA leaf certificate")
            key.verify(
                endorsement.signature,
                message,
                padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size),
                digest,
            )
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise _fail(f"{name} needs an EC leaf certificate")
            size = (key.curve.key_size + 7) // 8
            if len(endorsement.signature) != 2 * size:
                raise _fail(f"an {name} signature is {2 * size} bytes")
            r = int.from_bytes(endorsement.signature[:size], "big")
            s = int.from_bytes(endorsement.signature[size:], "big")
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(digest))
    except InvalidSignature:
        raise _fail("the COSE signature does not verify with the x5chain leaf") from None


def did_x509(ca: x509.Certificate, eku: x509.ObjectIdentifier = UVM_SIGNING_EKU) -> str:
    """``did:x509:0:sha256:<base64url SHA-256 of the CA's DER>::eku:<OID>`` (the genuine ``iss`` form)."""
    fingerprint = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).digest()
    return f"{_DID_PREFIX}{b64url_encode(fingerprint)}::eku:{eku.dotted_string}"


def _check_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], at: datetime
) -> x509.Certificate:
    """Each certificate signed by the next, the last a trusted root or signed by one; returns that root."""
    for cert in chain:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise _fail(f"certificate {cert.subject.rfc4514_string()!r} is not valid at {at.isoformat()}")
    for child, parent in itertools.pairwise(chain):
        _signed(child, parent)
    last = chain[-1]
    if last in roots:
        return last
    for root in roots:
        if last.issuer == root.subject:
            _signed(last, root)
            return root
    raise _fail(
        f"x5chain ends at {last.subject.rfc4514_string()!r}, which is not a trusted UVM signing root",
        hint="the attestation service trusts only its configured UVM signers",
    )


def _signed(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        child_name, parent_name = child.subject.rfc4514_string(), parent.subject.rfc4514_string()
        raise _fail(f"certificate {child_name!r} is not signed by {parent_name!r}") from None


def _leaf_ekus(leaf: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # a malformed or duplicated extension
        raise _fail("the signing certificate's extensions do not parse") from None


def verify_uvm_endorsement(
    endorsement: UvmEndorsement,
    *,
    trusted_roots: Sequence[x509.Certificate],
    at: datetime,
    feed: str = UVM_FEED,
) -> None:
    """Verify ``endorsement`` the way MAA trusts a UVM endorsement, at time ``at``.

    1. the COSE signature verifies with the ``x5chain`` leaf;
    2. the chain is valid at ``at`` and ends at (or is issued by) one of ``trusted_roots``;
    3. ``iss`` is the did:x509 of that root with an EKU the leaf carries (the UVM-signing one);
    4. ``feed`` is the expected feed.

    Raises :class:`VerificationError` (code ``uvm_endorsement_invalid``) naming the failed step.
    """
    if not trusted_roots:
        raise _fail("no trusted UVM signing root is configured")
    verify_uvm_endorsement_signature(endorsement)
    root = _check_chain(endorsement.x5chain, trusted_roots, at)
    ekus = _leaf_ekus(endorsement.x5chain[0])
    if UVM_SIGNING_EKU not in ekus or ExtendedKeyUsageOID.SERVER_AUTH in ekus:
        raise _fail(
            f"the signing certificate lacks the UVM-signing EKU {UVM_SIGNING_EKU.dotted_string}",
            hint="a TLS certificate from the same CA cannot sign UVM endorsements",
        )
    expected = did_x509(root, UVM_SIGNING_EKU)
    if endorsement.issuer != expected:
        raise _fail(f"iss is {endorsement.issuer!r}, expected {expected!r}")
    if endorsement.feed != feed:
        raise _fail(f"feed is {endorsement.feed!r}, expected {feed!r}")


# --- signing (local mode) ----------------------------------------------------------------------------


def sign_uvm_endorsement(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate],
    *,
    launch_measurement: bytes,
    guest_svn: int,
    signing_time: datetime,
    feed: str = UVM_FEED,
) -> bytes:
    """A COSE_Sign1 UVM endorsement shaped like the genuine one, signed by ``private_key``.

    ``chain``: the signing certificate first, then its issuers up to the root (which ``iss`` names).
    RSA keys sign PS384 (as the genuine endorsement), P-384 keys ES384.
    """
    if len(launch_measurement) != MEASUREMENT_SIZE:
        raise ValueError(f"a launch measurement is {MEASUREMENT_SIZE} bytes, found {len(launch_measurement)}")
    if not chain:
        raise ValueError("the signing certificate chain is empty")
    algorithm = -38 if isinstance(private_key, rsa.RSAPrivateKey) else -35
    leaf_der = chain[0].public_bytes(serialization.Encoding.DER)
    protected = cbor2.dumps(
        {
            HEADER_ALG: algorithm,
            HEADER_CONTENT_TYPE: CONTENT_TYPE_JSON,
            HEADER_X5CHAIN: [c.public_bytes(serialization.Encoding.DER) for c in chain],
            HEADER_X5T: [_COSE_SHA256, hashlib.sha256(leaf_der).digest()],
            HEADER_ISS: did_x509(chain[-1], UVM_SIGNING_EKU),
            HEADER_FEED: feed,
            HEADER_SIGNING_TIME: cbor2.CBORTag(1, int(signing_time.timestamp())),
        }
    )
    payload = json.dumps(
        {CLAIM_GUEST_SVN: str(guest_svn), CLAIM_LAUNCH_MEASUREMENT: launch_measurement.hex()}, indent=2
    ).encode()
    message = _sig_structure(protected, payload)
    if isinstance(private_key, rsa.RSAPrivateKey):
        digest = hashes.SHA384()
        signature = private_key.sign(
            message, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest
        )
    else:
        size = (private_key.curve.key_size + 7) // 8
        r, s = decode_dss_signature(private_key.sign(message, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))
