"""``skr policy``: HOST_DATA of a CCE policy, the confidential-containers release policy, policy checks.

``hash`` prints the HOST_DATA a CCE policy binds to; ``inspect`` decodes a CCE policy and warns about
every setting that weakens confidentiality; ``release`` prints the release policy for it;
``check`` evaluates a release policy against token claims and prints the trace (exit 0 allowed, 1 denied,
2 unusable input; a token that fails ``--verify`` is a denial). Tokens are only decoded unless
``--verify`` is given; a token is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skr.akv.policy import (
    Decision,
    ReleasePolicy,
    build_confidential_containers_policy,
    evaluate,
    parse_policy,
)
from skr.b64 import b64url_decode
from skr.errors import BadRequest, PolicyError, TokenError
from skr.snp.hostdata import host_data_of_policy, strip_policy, trailing_whitespace

_EXIT_ALLOWED = 0
_EXIT_DENIED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "policy",
        help="CCE policy hash, release policy builder and checker",
        description="Work with CCE policies (HOST_DATA) and Key Vault key release policies.",
    )
    actions = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    hash_parser = actions.add_parser("hash", help="print the HOST_DATA (hex) a CCE policy binds to")
    hash_parser.add_argument(
        "--cce-policy", required=True, type=Path, metavar="FILE", help="base64 or raw Rego"
    )
    hash_parser.add_argument(
        "--strip",
        action="store_true",
        help="hash the policy without trailing whitespace (saved acipolicygen --outraw output ends in a "
        "newline the deployed base64 policy does not have)",
    )
    hash_parser.set_defaults(func=_hash)

    inspect = actions.add_parser(
        "inspect", help="decode a CCE policy: containers, settings, warnings and its HOST_DATA"
    )
    inspect.add_argument("--cce-policy", required=True, type=Path, metavar="FILE", help="base64 or raw Rego")
    inspect.add_argument("--json", action="store_true", help="print the decoded policy as one JSON object")
    inspect.set_defaults(func=_inspect)

    release = actions.add_parser("release", help="print the release policy for a confidential container")
    release.add_argument("--authority", required=True, metavar="URL", help="the MAA endpoint (URL or host)")
    release.add_argument(
        "--host-data",
        required=True,
        action="append",
        metavar="HEX",
        help="64 hex digits (`skr policy hash`); repeat it to allow several policies during a rollout",
    )
    release.add_argument(
        "--compliance", default="azure-compliant-uvm", metavar="S", help="x-ms-compliance-status"
    )
    release.add_argument("--allow-debug", action="store_true", help="omit the is-debuggable=false condition")
    release.add_argument("--vmpl", type=int, default=0, metavar="N", help="required VMPL (default 0)")
    release.add_argument(
        "--attestation-type", metavar="T", help="also require x-ms-attestation-type, e.g. sevsnpvm"
    )
    release.set_defaults(func=_release)

    check = actions.add_parser("check", help="evaluate a release policy against token claims")
    check.add_argument("--policy", required=True, type=Path, metavar="FILE", help="release policy JSON")
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--claims", type=Path, metavar="FILE", help="decoded token claims (JSON object)")
    source.add_argument("--token", metavar="JWT_OR_FILE", help="an attestation token, or a file holding one")
    check.add_argument("--verify", action="store_true", help="verify the token signature with its issuer")
    check.add_argument(
        "--jwks",
        type=Path,
        metavar="FILE",
        help="verify the token offline with this key set of its issuer (implies --verify)",
    )
    check.add_argument(
        "--at", metavar="TIME", help="check the token's lifetime at this ISO 8601 time (default now)"
    )
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=_check)


# --- hash / release ---------------------------------------------------------------------------------------


def _hash(args: argparse.Namespace) -> int:
    data = args.cce_policy.read_bytes()
    trailing = trailing_whitespace(data)
    if args.strip:
        data = strip_policy(data)
    elif trailing:
        print(
            f"skr: warning: {args.cce_policy} ends in whitespace ({trailing!r}), which is part of the hash;"
            " saved acipolicygen --outraw output has a final newline the deployed (base64) policy lacks;"
            " --strip hashes it without",
            file=sys.stderr,
        )
    print(host_data_of_policy(data).hex())
    return 0


def _release(args: argparse.Namespace) -> int:
    policy = build_confidential_containers_policy(
        authority=args.authority,
        host_data=args.host_data,
        compliance=args.compliance or None,
        allow_debug=args.allow_debug,
        vmpl=args.vmpl,
        attestation_type=args.attestation_type,
    )
    print(json.dumps(policy, indent=2))
    return 0


# --- inspect ----------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from skr.snp.ccepolicy import decode_policy

    policy = decode_policy(args.cce_policy.read_bytes())
    if args.json:
        print(json.dumps(policy.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"HOST_DATA          {policy.host_data}")
    print(f"api_version        {policy.api_version or '(not set)'}")
    print(f"framework_version  {policy.framework_version or '(not set)'}")
    if policy.allow_all:
        print("enforcement        allow-all (every enforcement point is allowed outright)")
    else:
        for name, kind in policy.rules.items():
            print(f"  {name:24} {kind}")
    for name, value in policy.settings.items():
        print(f"{name:38} {json.dumps(value)}")
    for fragment in policy.fragments:
        print(
            f"fragment           {fragment['feed']} (issuer {fragment['issuer']}, minimum svn "
            f"{fragment['minimum_svn']}, includes {', '.join(fragment['includes'])})"
        )
    print(f"containers         {len(policy.containers)}")
    for container in policy.containers:
        print(f"- {container.name}: {container.image or '(no image)'} ({container.layers} layers)")
        print(f"    command      {json.dumps(container.command)}")
        print(f"    working_dir  {container.working_dir}")
        for rule in container.env_rules:
            required = ", required" if rule["required"] else ""
            print(f"    env          {rule['pattern']} ({rule['strategy']}{required})")
        for mount in container.mounts:
            print(
                f"    mount        {mount['destination']} <- {mount['source']} "
                f"({mount['type']}, {','.join(mount['options'])})"
            )
        for process in container.exec_processes:
            print(f"    exec         {json.dumps(process)}")
        print(
            f"    flags        allow_elevated={json.dumps(container.allow_elevated)} "
            f"allow_stdio_access={json.dumps(container.allow_stdio_access)} "
            f"no_new_privileges={json.dumps(container.no_new_privileges)}"
        )
    for process in policy.external_processes:
        print(f"external process   {json.dumps(process)}")
    for warning in policy.warnings:
        print(f"WARNING: {warning}")
    for note in policy.notes:
        print(f"note: {note}")
    return 0


# --- check ------------------------------------------------------------------------------------------------


def _read_policy(path: Path) -> ReleasePolicy:
    """A policy file: the policy JSON, or Key Vault's wire form ``{"data": base64url(policy), ...}``."""
    data = path.read_bytes()
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return parse_policy(data)  # raises PolicyError naming the JSON problem
    if isinstance(document, dict) and "data" in document and "anyOf" not in document:
        try:
            return parse_policy(b64url_decode(str(document["data"]).rstrip("=")))
        except ValueError:
            raise PolicyError(f"{path}: 'data' is not base64url of a release policy") from None
    return parse_policy(data)


def _token_text(value: str) -> str:
    """The JWT itself from ``--token``: the token, or a file holding it (``skr token``'s reader)."""
    from skr.commands.token import JWT_RE, read_token

    candidate = value.strip()
    if JWT_RE.fullmatch(candidate):
        return candidate
    if not Path(value).is_file():
        raise BadRequest("--token is not a JWT (header.payload.signature) nor a file holding one")
    return read_token(Path(value))


def _claims_object(read: Callable[[], bytes], what: str, encoding: str) -> dict[str, Any]:
    """The JSON object ``read()`` returns (a claims file, or a token's payload), else BadRequest."""
    try:
        claims = json.loads(read())
    except ValueError:  # also UnicodeDecodeError, and bad base64url
        raise BadRequest(f"{what} is not {encoding}") from None
    if not isinstance(claims, dict):
        raise BadRequest(f"{what} is not a JSON object of claims")
    return claims


def _claims(args: argparse.Namespace) -> dict[str, Any]:
    if args.claims is not None:
        given = [f for f, v in (("--verify", args.verify), ("--jwks", args.jwks), ("--at", args.at)) if v]
        if given:
            raise BadRequest(f"{given[0]} needs --token (a claims file has no signature)")
        return _claims_object(args.claims.read_bytes, str(args.claims), "JSON")
    token = _token_text(args.token)
    payload = token.split(".")[1].rstrip("=")
    claims = _claims_object(lambda: b64url_decode(payload), "the token payload", "base64url JSON")
    if args.jwks is None and args.at is None:
        if not args.verify:
            return claims
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise BadRequest("the token has no iss claim, so its issuer's keys cannot be found")
    # `skr token verify`'s verification: the issuer's published keys unless --jwks pins them
    from skr.commands.token import parse_time, read_jwks, verify_token

    jwks = read_jwks(args.jwks) if args.jwks is not None else None
    return asyncio.run(verify_token(token, jwks=jwks, issuer=None, at=parse_time(args.at))).claims


def _check(args: argparse.Namespace) -> int:
    policy = _read_policy(args.policy)
    try:
        claims = _claims(args)
    except TokenError as exc:  # the token was read but does not verify: Key Vault would refuse it too
        decision = Decision(False, (), f"the attestation token does not verify: {exc.diagnostics()}")
    else:
        decision = evaluate(policy, claims)
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2, ensure_ascii=False))
    else:
        for entry in decision.trace:
            print(entry.describe())
        print(("allowed: " if decision.allowed else "denied: ") + decision.reason)
    sys.stdout.flush()
    return _EXIT_ALLOWED if decision.allowed else _EXIT_DENIED
