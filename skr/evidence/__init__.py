"""Evidence providers and the one place that picks among them.

Owns :func:`create_provider`: an explicit kind (``sevguest``, ``sev``, ``tsm``, ``virtual``) or device
auto-detection. Auto-detection probes, in this order:

1. ``/dev/sev-guest`` — the upstream guest driver (Linux ≥ 5.19); its extended report also carries the
   host's certificate table.
2. ``/sys/kernel/config/tsm/report`` — configfs-tsm (Linux ≥ 6.7), for containers that get configfs but
   not the character device.
3. ``/dev/sev`` — the 5.x Microsoft/AMD guest kernels (what ACI ran first).

The Go sidecar probes ``/dev/sev`` first. We probe it last on purpose: on a *host* with the AMD ``ccp``
driver ``/dev/sev`` is the platform firmware device, not a guest interface, so it is the least specific
signal; every current kernel exposes ``/dev/sev-guest`` in SNP guests.

Must never choose ``virtual`` on its own: a software TEE signs with a key anyone can have, so it is only
used when asked for by name, and then with a warning in the log. When nothing is found the error lists the
probed paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

from skr.config import EVIDENCE_KINDS, EvidenceKind
from skr.errors import Code, ConfigError, EvidenceUnavailable
from skr.evidence.base import EvidenceProvider
from skr.evidence.context import SecurityContext
from skr.evidence.sevguest import LEGACY_SEV_DEVICE, SEV_GUEST_DEVICE, LegacySevProvider, SevGuestProvider
from skr.evidence.tsm import TSM_REPORT_ROOT, TsmProvider
from skr.snp.collateral import CollateralClient

log = logging.getLogger(__name__)


def create_provider(
    kind: str = EvidenceKind.AUTO,
    *,
    context: SecurityContext | None = None,
    state_dir: Path | None = None,
    collateral: CollateralClient | None = None,
    security_policy: bytes | None = None,
    root: Path = Path("/"),
) -> EvidenceProvider:
    """The evidence provider for ``kind`` (``auto`` | ``sevguest`` | ``sev`` | ``tsm`` | ``virtual``).

    ``context`` and ``collateral`` feed the hardware providers' certificate chains. ``virtual`` needs
    ``state_dir`` and a security policy (``security_policy``, else the context's). ``root`` prefixes the
    probed device paths (tests). Raises :class:`ConfigError` for an unknown kind or missing virtual
    settings and :class:`EvidenceUnavailable` when auto-detection finds no device.
    """
    choice = kind.strip().lower()
    if choice == EvidenceKind.VIRTUAL:
        if security_policy is None and context is not None:
            security_policy = context.security_policy
        return _virtual(state_dir, security_policy)
    sev_guest = _under(root, SEV_GUEST_DEVICE)
    tsm_root = _under(root, TSM_REPORT_ROOT)
    legacy = _under(root, LEGACY_SEV_DEVICE)
    if choice == EvidenceKind.SEVGUEST:
        return SevGuestProvider(device=sev_guest, context=context, collateral=collateral)
    if choice == EvidenceKind.SEV:
        return LegacySevProvider(device=legacy, context=context, collateral=collateral)
    if choice == EvidenceKind.TSM:
        return TsmProvider(root=tsm_root, context=context, collateral=collateral)
    if choice != EvidenceKind.AUTO:
        raise ConfigError(f"unknown evidence source {kind!r}", hint="use one of " + ", ".join(EVIDENCE_KINDS))
    if sev_guest.exists():
        log.info("evidence: using %s", sev_guest)
        return SevGuestProvider(device=sev_guest, context=context, collateral=collateral)
    if tsm_root.is_dir():
        log.info("evidence: using configfs-tsm at %s", tsm_root)
        return TsmProvider(root=tsm_root, context=context, collateral=collateral)
    if legacy.exists():
        log.info("evidence: using legacy %s", legacy)
        return LegacySevProvider(device=legacy, context=context, collateral=collateral)
    raise EvidenceUnavailable(
        f"no SEV-SNP guest interface found: probed {sev_guest}, {tsm_root} and {legacy}",
        hint="run inside an SEV-SNP confidential container with the device passed in; for local use "
        "choose the software TEE explicitly with --evidence virtual",
        code=Code.NO_TEE,
    )


def _virtual(state_dir: Path | None, security_policy: bytes | None) -> EvidenceProvider:
    if state_dir is None:
        raise ConfigError("the virtual TEE needs a state directory for its keys", hint="pass --state-dir")
    if security_policy is None:
        raise ConfigError(
            "the virtual TEE needs a security policy (its SHA-256 becomes HOST_DATA)",
            hint="pass a CCE policy file or a security context with security-policy-base64",
        )
    from skr.evidence.virtual import VirtualTee  # lazy: only local mode needs key generation

    log.warning(
        "evidence: using the VIRTUAL TEE - reports are signed by a software key in %s, not by AMD hardware; "
        "never use this outside local testing",
        state_dir,
    )
    return VirtualTee.load_or_create(state_dir, security_policy=security_policy)


def _under(root: Path, absolute: Path) -> Path:
    return root / absolute.relative_to("/")
