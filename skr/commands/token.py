"""``skr token verify``: check a recorded MAA attestation token offline, for auditors.

The signature, issuer and lifetime checks are :class:`skr.maa.token.TokenVerifier`'s (the ones the
sidecar uses); this module only chooses the keys — a JWKS file pinned for the issuer (no network at all),
or the issuer's published keys when ``--issuer`` is given — and the time to check at (``--at``, default
now). Exit 0 valid, 1 the token does not verify (signature, issuer, expired, …), 2 unusable input.

The token itself is never printed; its claims are (they are not secret).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skr.errors import BadRequest, TokenError

_EXIT_VALID = 0
_EXIT_INVALID = 1
JWT_RE = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]*=*")
_COMMENT_RE = re.compile(r"^\s*//.*$", re.MULTILINE)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "token",
        help="verify a recorded MAA attestation token offline",
        description="Work with MAA attestation tokens (JWTs) recorded earlier.",
    )
    actions = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="check signature, issuer and lifetime of a token (exit 0 valid, 1 invalid, 2 unusable input)",
    )
    verify.add_argument("token_file", type=Path, metavar="TOKEN_FILE", help="the JWT, or JSON {'token': JWT}")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument(
        "--jwks",
        type=Path,
        metavar="FILE",
        help="the issuer's key set (JSON; // comment lines allowed): verify without any network access",
    )
    keys.add_argument(
        "--issuer",
        metavar="URL",
        help="fetch the keys this attestation instance publishes (network); the token must name it as iss",
    )
    verify.add_argument(
        "--at", metavar="TIME", help="check the lifetime at this ISO 8601 time or epoch seconds (default now)"
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    verify.set_defaults(func=_verify)


# --- inputs (shared with ``skr policy check``) --------------------------------------------------------


def read_token(path: Path) -> str:
    """The JWT in ``path``: the compact token itself, or a JSON object with a ``token`` member."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadRequest(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"{path} is not text holding a JWT") from None
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict) and isinstance(document.get("token"), str):
            text = document["token"].strip()
    if not JWT_RE.fullmatch(text):
        raise BadRequest(f"{path} does not hold a JWT (header.payload.signature)")
    return text


def read_jwks(path: Path) -> dict[str, Any]:
    """A JWKS file; whole-line ``//`` comments (as in MAA key snapshots) are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadRequest(f"cannot read the JWKS file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"{path} is not a JSON key set") from None
    try:
        document = json.loads(_COMMENT_RE.sub("", text))
    except ValueError as exc:
        raise BadRequest(f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise BadRequest(f"{path} is not a JWKS (a JSON object with a 'keys' list)")
    return document


def parse_time(text: str | None) -> datetime | None:
    """``--at``: ISO 8601 (``Z`` or an offset; naive means UTC) or seconds since the epoch."""
    if text is None:
        return None
    value = text.strip()
    try:
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
            return datetime.fromtimestamp(float(value), tz=UTC)
        moment = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(
            f"--at is not an ISO 8601 time nor epoch seconds: {text!r}", hint="e.g. 2022-12-20T12:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class VerifiedToken:
    """A token that verified: its claims and how it was checked."""

    claims: dict[str, Any]
    issuer: str
    kid: str
    alg: str
    checked_at: datetime
    keys_from: str


async def verify_token(
    token: str, *, jwks: Mapping[str, Any] | None, issuer: str | None, at: datetime | None
) -> VerifiedToken:
    """Verify ``token`` with the pinned ``jwks`` (for ``issuer``, else the token's own ``iss``), or with
    the keys ``issuer`` publishes. Raises :class:`TokenError` when it does not verify."""
    import aiohttp

    from skr.maa.token import TokenVerifier, normalize_issuer, unverified_claims, unverified_header

    header = unverified_header(token)
    claimed = unverified_claims(token).get("iss")
    expected = issuer if issuer is not None else claimed
    if not isinstance(expected, str) or not expected:
        raise TokenError("the token has no 'iss' claim; give --issuer URL to say whose token it must be")
    expected = normalize_issuer(expected)
    when = at if at is not None else datetime.now(tz=UTC)
    async with aiohttp.ClientSession() as session:
        verifier = TokenVerifier(session)
        if jwks is not None:
            verifier.add_jwks(expected, jwks)
        claims = await verifier.verify(token, issuer=expected, at=when)
    return VerifiedToken(
        claims=claims,
        issuer=expected,
        kid=str(header.get("kid")),
        alg=str(header.get("alg")),
        checked_at=when,
        keys_from="the JWKS file" if jwks is not None else f"{expected} (published keys)",
    )


# --- verify -------------------------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return None


def _verify(args: argparse.Namespace) -> int:
    token = read_token(args.token_file)
    jwks = read_jwks(args.jwks) if args.jwks is not None else None
    at = parse_time(args.at)
    try:
        result = asyncio.run(verify_token(token, jwks=jwks, issuer=args.issuer, at=at))
    except TokenError as exc:
        if args.json:
            print(json.dumps({"valid": False, "code": exc.code, "reason": exc.message}, indent=2))
        print(f"skr: token invalid: {exc.diagnostics()}", file=sys.stderr)
        return _EXIT_INVALID
    claims = result.claims
    checked = result.checked_at.isoformat().replace("+00:00", "Z")
    if args.json:
        verdict = {
            "valid": True,
            "issuer": result.issuer,
            "kid": result.kid,
            "alg": result.alg,
            "keys_from": result.keys_from,
            "checked_at": checked,
            **{name: _iso(claims.get(name)) for name in ("iat", "nbf", "exp")},
            "claims": claims,
        }
        print(json.dumps(verdict, indent=2, ensure_ascii=False))
    else:
        print(
            f"valid: {result.alg} signature by key {result.kid} of {result.issuer} ({result.keys_from}), "
            f"issued {_iso(claims.get('iat'))}, expires {_iso(claims.get('exp'))}, checked at {checked}"
        )
        for name in ("x-ms-attestation-type", "x-ms-compliance-status", "x-ms-sevsnpvm-hostdata"):
            if name in claims:
                print(f"{name}: {claims[name]}")
    sys.stdout.flush()
    return _EXIT_VALID
