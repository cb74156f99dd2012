"""``skr doctor``: check everything a release needs, and say how to fix what is wrong.

Checks, in order: the allowlist patterns, security context, collateral settings, evidence source, a fresh
report and its AMD chain, the policy-hash self-check, the identity configuration, the attestation and key
vault endpoints (allowlist; then DNS, TLS) and the identity token. A failing check
never stops the others: endpoints, allowlist, identity configuration and collateral settings are all
checked without a TEE. Each problem is printed once; ``--json`` prints one JSON object. Exit 0 when all
pass, 1 otherwise.

``--skip-network`` makes no network call at all: every HTTP request of the run is refused before it
connects, and the DNS/TLS and identity-token checks are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

from skr.config import (
    DOCTOR_FLAGS,
    EvidenceKind,
    Settings,
    add_arguments,
    allowlist_pattern_problem,
    allowlist_problems,
    allowlist_value_problems,
    default_endpoint_problems,
    load_settings,
)
from skr.endpoints import DEFAULT_ALLOWED, Endpoint
from skr.errors import ConfigError, SkrError
from skr.upstream import client_ssl_context


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # passed, but something will bite later (printed [warn] with its fix)

    def line(self) -> str:
        mark = "FAIL" if not self.ok else "warn" if self.warn else "ok  "
        text = f"[{mark}] {self.name}: {self.detail}"
        return text if (self.ok and not self.warn) or not self.fix else f"{text}\n       fix: {self.fix}"


def _uvm_endorsement_check(
    policy: bytes | None, endorsement: bytes | None, measurement: bytes | None
) -> Check | None:
    """Warn when a security policy comes without a UVM endorsement (MAA then emits no compliance status);
    when one is present and CBOR support is installed, say whose it is and whether it endorses this
    report's launch measurement. None when there is neither a policy nor an endorsement."""
    from skr.evidence.context import missing_uvm_endorsement_warning

    name = "UVM endorsement"
    warning = missing_uvm_endorsement_warning(policy, endorsement)
    if warning is not None:
        return Check(
            name,
            True,
            warning,
            "on ACI, deploy a confidential container group (the platform mounts reference-info-base64); "
            "in local mode drop --no-uvm-endorsement",
            warn=True,
        )
    if endorsement is None:
        return None
    if importlib.util.find_spec("cbor2") is None:
        return Check(name, True, f"present ({len(endorsement)} bytes; install skr[local] to decode it)")
    from skr.evidence.endorsement import parse_uvm_endorsement

    try:
        parsed = parse_uvm_endorsement(endorsement)
    except SkrError as exc:
        return Check(name, False, exc.message, "reference-info-base64 must be the platform's UVM endorsement")
    signer = parsed.x5chain[0].subject.rfc4514_string()
    detail = f"{parsed.algorithm_name} by {signer!r}, feed {parsed.feed}, UVM SVN {parsed.guest_svn}"
    if measurement is not None and parsed.launch_measurement != measurement:
        return Check(
            name,
            False,
            f"{detail}; it endorses launch measurement {parsed.launch_measurement.hex()}, "
            f"the report has {measurement.hex()}",
            "the endorsement belongs to another UVM; MAA will not emit x-ms-compliance-status",
        )
    return Check(name, True, detail + (", matches the report's launch measurement" if measurement else ""))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("doctor", help="check evidence, policy hash, collateral, endpoints and identity")
    add_arguments(parser, only=DOCTOR_FLAGS)
    parser.add_argument(
        "--skip-network",
        action="store_true",
        help="make no network call (no MAA, Key Vault, identity, THIM or KDS); check only local settings",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    parser.set_defaults(func=_doctor)


class NetworkDisabled(aiohttp.ClientConnectionError):
    """Raised for every HTTP request of a ``--skip-network`` run, before it connects."""


async def _refuse_request(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
) -> None:
    raise NetworkDisabled(f"--skip-network: no request to {params.url.host} was made")


def _session(*, skip_network: bool) -> aiohttp.ClientSession:
    if not skip_network:
        return aiohttp.ClientSession()
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_refuse_request)
    return aiohttp.ClientSession(trace_configs=[trace])


def _allowlist_checks(settings: Settings) -> list[Check]:
    problems = allowlist_problems(settings)
    if not problems:
        return [Check("endpoint allowlist", True, ", ".join(settings.allowlist.patterns) or "(empty)")]
    return [
        Check("endpoint allowlist", False, problem, "write host, *.domain or host:port, comma-separated")
        for problem in problems
    ]


def _allowlist_refusal(name: str, settings: Settings) -> Check | None:
    for setting, endpoint, _line in default_endpoint_problems(settings):
        if setting == _SETTING_OF[name]:
            return Check(
                name,
                False,
                f"{endpoint} is not in the endpoint allowlist, so {setting} cannot be used "
                f"(SKR_ALLOWED_ENDPOINTS: {', '.join(settings.allowlist.patterns)})",
                "add it to SKR_ALLOWED_ENDPOINTS",
            )
    return None


_SETTING_OF = {"attestation endpoint": "SKR_MAA_ENDPOINT", "key vault endpoint": "SKR_AKV_ENDPOINT"}


def _collateral_check(settings: Settings, context_has_certs: bool) -> Check:
    from skr.snp.collateral import CollateralSource
    from skr.snp.kds import KDS_BASE, THIM_URL

    certcache = settings.certcache
    try:
        source = CollateralSource.parse(certcache.endpoint_type or "AMD")
    except ConfigError as exc:
        return Check("collateral settings", False, exc.message, exc.hint or "fix SkrSideCarArgs.certcache")
    where = {
        CollateralSource.LOCAL_THIM: f"node-local THIM via IMDS at {certcache.endpoint or THIM_URL}",
        CollateralSource.AZCACHE: f"the Azure certificate cache {certcache.endpoint or '(default)'}",
        CollateralSource.AMD: f"AMD KDS {certcache.endpoint or KDS_BASE} (rate-limited: fine for tests, "
        "not for fleets)",
    }[source]
    first = "the security context's host-amd-cert-base64, then " if context_has_certs else ""
    return Check("collateral settings", True, f"VCEK chains from {first}{where}")


def _identity_configuration_check(env: dict[str, str] | os._Environ[str]) -> Check:
    from skr.identity import WORKLOAD_IDENTITY_ENV

    present = [name for name in WORKLOAD_IDENTITY_ENV if env.get(name, "").strip()]
    if present and len(present) < len(WORKLOAD_IDENTITY_ENV):
        missing = [name for name in WORKLOAD_IDENTITY_ENV if name not in present]
        return Check(
            "identity configuration",
            False,
            f"workload identity is half configured: {', '.join(present)} set, {', '.join(missing)} not "
            "(managed identity would be used instead)",
            "label the pod azure.workload.identity/use=true with a federated service account, or unset them",
        )
    if len(present) == len(WORKLOAD_IDENTITY_ENV):
        token_file = Path(env["AZURE_FEDERATED_TOKEN_FILE"].strip())
        try:
            readable = bool(token_file.read_text().strip())
        except OSError:
            readable = False
        if not readable:
            return Check(
                "identity configuration",
                False,
                f"workload identity: AZURE_FEDERATED_TOKEN_FILE {token_file} is missing, unreadable or empty",
                "check the projected service-account token volume",
            )
        return Check(
            "identity configuration", True, f"workload identity, client {env['AZURE_CLIENT_ID'].strip()}"
        )
    endpoint = env.get("IDENTITY_ENDPOINT", "").strip() or "IMDS (169.254.169.254)"
    return Check("identity configuration", True, f"managed identity through {endpoint}")


async def _endpoint_check(name: str, ep: Endpoint, settings: Settings, path: str) -> Check:
    try:
        await asyncio.get_running_loop().getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check(
            name, False, f"cannot resolve {ep.host}: {exc.strerror}", "check the name and the pod's DNS"
        )
    ctx: ssl.SSLContext = client_ssl_context(settings.ca_bundle)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(ep.url + path, ssl=ctx, timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            status = resp.status
    except aiohttp.ClientConnectorCertificateError as exc:
        return Check(
            name,
            False,
            f"TLS certificate not trusted: {exc.certificate_error}",
            "set SKR_CA_BUNDLE for private CAs",
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check(
            name, False, f"{ep} unreachable ({type(exc).__name__})", "check egress rules and the endpoint"
        )
    return Check(name, True, f"{ep} reachable over TLS (HTTP {status})")


async def _run(settings: Settings, *, skip_network: bool) -> list[Check]:
    checks = _allowlist_checks(settings)
    checks += await _tee_checks(settings, skip_network=skip_network)
    checks.append(_identity_configuration_check(os.environ))
    for name, ep, path in (
        ("attestation endpoint", settings.maa_endpoint, "/.well-known/openid-configuration"),
        ("key vault endpoint", settings.akv_endpoint, "/"),
    ):
        if ep is None:
            fix = "set SKR_MAA_ENDPOINT / SKR_AKV_ENDPOINT, or pass them in each request"
            checks.append(Check(name, False, "no default configured", fix))
        elif (refused := _allowlist_refusal(name, settings)) is not None:
            checks.append(refused)
        elif skip_network:
            checks.append(Check(name, True, f"{ep} is in the allowlist (not contacted: --skip-network)"))
        else:
            checks.append(await _endpoint_check(name, ep, settings, path))
    if not skip_network:
        checks.append(await _identity_check(settings))
    return checks


async def _tee_checks(settings: Settings, *, skip_network: bool) -> list[Check]:
    """Security context, evidence, report, AMD chain, policy hash and collateral settings."""
    from skr.daemon import create_evidence_provider
    from skr.evidence.context import load_security_context
    from skr.local.demo import DEMO_SECURITY_POLICY
    from skr.snp.hostdata import host_data_of_policy
    from skr.snp.verify import verify_evidence_chain

    checks: list[Check] = []
    context = None
    try:
        context = await asyncio.to_thread(load_security_context, os.environ)
        if context.is_empty:
            checks.append(
                Check(
                    "security context",
                    settings.evidence == EvidenceKind.VIRTUAL,
                    "none found",
                    "set UVM_SECURITY_CONTEXT_DIR (ACI mounts /security-context-*)",
                )
            )
        else:
            parts = [
                n
                for n, v in (
                    ("policy", context.security_policy),
                    ("THIM certs", context.thim),
                    ("UVM endorsement", context.uvm_reference_info),
                )
                if v is not None
            ]
            checks.append(
                Check("security context", True, f"{context.directory}: {', '.join(parts) or 'empty'}")
            )
    except SkrError as exc:
        checks.append(
            Check("security context", False, exc.message, exc.hint or "check the security-context files")
        )

    checks.append(_collateral_check(settings, context is not None and context.thim is not None))
    # the UVM endorsement is judged against the fresh report, or without one from the context's files
    uvm_inputs: tuple[bytes | None, bytes | None, bytes | None] | None = None
    if context is not None:
        uvm_inputs = (context.security_policy, context.uvm_reference_info, None)
    async with _session(skip_network=skip_network) as session:
        try:
            provider, arks, policy = await create_evidence_provider(
                settings, session, os.environ, virtual_policy=DEMO_SECURITY_POLICY
            )
        except SkrError as exc:
            checks.append(
                Check(
                    "evidence source",
                    False,
                    exc.message,
                    exc.hint or "run in a confidential container group, or use --evidence virtual locally",
                )
            )
        else:
            checks.append(Check("evidence source", True, provider.name))
            try:
                evidence = await provider.collect(os.urandom(64))
                verified = await asyncio.to_thread(
                    verify_evidence_chain, evidence.report, evidence.vcek_chain_pem, trusted_arks=arks
                )
                checks.append(
                    Check(
                        "report and AMD chain",
                        True,
                        f"{verified.product} report v{verified.report.version}, VCEK chain valid",
                    )
                )
                host_data = verified.report.host_data
                if policy is None:
                    checks.append(
                        Check("policy hash", True, f"HOST_DATA {host_data.hex()} (no policy to compare)")
                    )
                else:
                    expected = host_data_of_policy(policy)
                    checks.append(
                        Check(
                            "policy hash",
                            expected == host_data,
                            f"HOST_DATA {host_data.hex()}"
                            + ("" if expected == host_data else f", policy hashes to {expected.hex()}"),
                            "the security policy is not this group's; fix the mount or redeploy",
                        )
                    )
                uvm_inputs = (policy, evidence.uvm_endorsements, verified.report.measurement)
            except SkrError as exc:
                checks.append(
                    Check("report and AMD chain", False, exc.message, exc.hint or "see the sidecar log")
                )
            finally:
                await provider.aclose()
    if uvm_inputs is not None and (uvm := _uvm_endorsement_check(*uvm_inputs)) is not None:
        checks.append(uvm)
    return checks  # the checks that need no TEE follow in _run


async def _identity_check(settings: Settings) -> Check:
    from skr.identity import CredentialFactory

    factory = CredentialFactory(
        os.environ, client_id=settings.identity_client_id, ca_bundle=settings.ca_bundle
    )
    vault = settings.akv_endpoint.authority if settings.akv_endpoint else "vault.azure.net"
    scope = factory.scope_for(vault)
    try:
        credential = factory.for_request(None)
        token = await asyncio.wait_for(credential.get_token(scope), timeout=15)
        del token
        return Check("identity token", True, f"{factory.kind} issued a token for {scope}")
    except (SkrError, TimeoutError) as exc:
        why = exc.message if isinstance(exc, SkrError) else "no answer within 15 s"
        return Check(
            "identity token",
            False,
            f"{factory.kind} could not get a token for {scope}: {why}",
            "check the managed identity assignment / workload identity federation and the client id",
        )
    finally:
        await factory.aclose()


def _unique(checks: list[Check]) -> list[Check]:
    """Each problem once: a check repeating an earlier check's name and detail is dropped."""
    first: dict[tuple[str, bool, str], Check] = {}
    for check in checks:
        first.setdefault((check.name, check.ok, check.detail), check)
    return list(first.values())


def _report(checks: list[Check], *, as_json: bool) -> int:
    failed = [c for c in checks if not c.ok]
    if as_json:
        document: dict[str, Any] = {
            "ok": not failed,
            "passed": len(checks) - len(failed),
            "total": len(checks),
            "checks": [asdict(c) for c in checks],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        for check in checks:
            print(check.line())
        print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


def _usable_allowlist(args: argparse.Namespace) -> list[Check]:
    """Checks for allowlist patterns that do not parse; ``args`` then keeps only the good ones, so that
    every other check still runs."""
    raw = args.allowed_endpoints
    if raw is None:
        raw = os.environ.get("SKR_ALLOWED_ENDPOINTS")
    if raw is None or not (problems := allowlist_value_problems(raw)):
        return []
    good = [p.strip() for p in raw.split(",") if p.strip() and allowlist_pattern_problem(p) is None]
    args.allowed_endpoints = ",".join(good) if good else ",".join(DEFAULT_ALLOWED)
    fix = "write host, *.domain or host:port, comma-separated (the other checks use the valid patterns)"
    return [Check("endpoint allowlist", False, problem, fix) for problem in problems]


def _doctor(args: argparse.Namespace) -> int:
    pattern_checks = _usable_allowlist(args)
    try:
        settings = load_settings(args)
    except ConfigError as exc:  # nothing else can be checked with settings that do not load
        checks = [*pattern_checks, Check("settings", False, exc.message, exc.hint or "fix the named setting")]
        return _report(checks, as_json=args.json)
    checks = asyncio.run(_run(settings, skip_network=args.skip_network))
    if pattern_checks:  # the patterns reported above, instead of "allowlist ok" for the valid rest
        checks = pattern_checks + [c for c in checks if c.name != "endpoint allowlist"]
    return _report(_unique(checks), as_json=args.json)
