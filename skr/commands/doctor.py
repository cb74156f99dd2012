"""``skr doctor``: check everything a release needs, and say how to fix what is wrong.

Checks, in order: settings, evidence source, security context, a fresh report and its AMD chain, the
policy-hash self-check, the attestation and key vault endpoints (allowlist, DNS, TLS), and the identity
token. Prints one line per check; exit 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import ssl
from dataclasses import dataclass

import aiohttp

from skr.config import Settings, add_arguments, load_settings
from skr.endpoints import Endpoint
from skr.errors import SkrError
from skr.http import client_ssl_context


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
    add_arguments(parser)
    parser.add_argument(
        "--skip-network", action="store_true", help="do not contact MAA, Key Vault or identity"
    )
    parser.set_defaults(func=_doctor)


async def _endpoint_check(name: str, ep: Endpoint, settings: Settings, path: str) -> Check:
    if not settings.allowlist.allows(ep):
        return Check(name, False, f"{ep} is not in the endpoint allowlist", "add it to SKR_ALLOWED_ENDPOINTS")
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
                    settings.evidence == "virtual",
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

    async with aiohttp.ClientSession() as session:
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
            if context is not None:
                uvm = _uvm_endorsement_check(context.security_policy, context.uvm_reference_info, None)
                if uvm is not None:
                    checks.append(uvm)
            return checks
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
            uvm = _uvm_endorsement_check(policy, evidence.uvm_endorsements, verified.report.measurement)
            if uvm is not None:
                checks.append(uvm)
        except SkrError as exc:
            checks.append(
                Check("report and AMD chain", False, exc.message, exc.hint or "see the sidecar log")
            )
            if context is not None:
                uvm = _uvm_endorsement_check(context.security_policy, context.uvm_reference_info, None)
                if uvm is not None:
                    checks.append(uvm)
        finally:
            await provider.aclose()

    if skip_network:
        return checks
    for name, ep, path in (
        ("attestation endpoint", settings.maa_endpoint, "/.well-known/openid-configuration"),
        ("key vault endpoint", settings.akv_endpoint, "/"),
    ):
        if ep is None:
            checks.append(
                Check(
                    name,
                    False,
                    "no default configured",
                    "set SKR_MAA_ENDPOINT / SKR_AKV_ENDPOINT, or pass them in each request",
                )
            )
        else:
            checks.append(await _endpoint_check(name, ep, settings, path))
    checks.append(await _identity_check(settings))
    return checks


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
    except Exception as exc:  # the identity SDK raises many types; all mean "no token"
        return Check(
            "identity token",
            False,
            f"{factory.kind} could not get a token for {scope} ({type(exc).__name__})",
            "check the managed identity assignment / workload identity federation and the client id",
        )
    finally:
        await factory.aclose()


def _doctor(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    checks = asyncio.run(_run(settings, skip_network=args.skip_network))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0
