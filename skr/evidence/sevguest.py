"""SEV-SNP reports from the guest driver's character devices: ``/dev/sev-guest`` and legacy ``/dev/sev``.

Owns: the Linux uapi structures byte for byte — ``struct snp_guest_request_ioctl`` (32 bytes,
``<B7xQQQ``, msg_version 1), ``struct snp_report_req`` (96 bytes: user_data[64], u32 vmpl, 28 zero bytes),
``struct snp_ext_report_req`` (+ u64 certs_address, u32 certs_len; 112 bytes with tail padding),
the 4000-byte response (MSG_REPORT_RSP: u32 status @0, u32 report_size @4, report @0x20), and the
40-byte ``struct sev_snp_guest_request`` of the 5.x Microsoft/AMD kernels' ``/dev/sev``; the ioctls
SNP_GET_REPORT (0xC0205300), SNP_GET_EXT_REPORT (0xC0205302) and SEV_SNP_GUEST_MSG_REPORT (0xC0285301);
and the firmware/VMM error codes they report in ``exitinfo2``.

Never leaves a device open: every call opens it, issues one ioctl and closes it. Never blocks the event
loop: the ioctl runs in :func:`asyncio.to_thread`. Never invents a report: any failure is an
:class:`EvidenceUnavailable` that says what the kernel or firmware answered.

The ioctl function is a constructor parameter (default :func:`fcntl.ioctl`) so the whole provider can be
exercised against a simulated kernel that reads the request structures and writes a response.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, TypedDict, Unpack

from skr.errors import Code, ConfigError, EvidenceUnavailable
from skr.evidence.certtable import HardwareProvider
from skr.evidence.context import SecurityContext
from skr.snp.collateral import CollateralClient
from skr.snp.report import REPORT_SIZE

log = logging.getLogger(__name__)

SEV_GUEST_DEVICE: Final = Path("/dev/sev-guest")
LEGACY_SEV_DEVICE: Final = Path("/dev/sev")

SNP_GET_REPORT: Final = 0xC0205300
SNP_GET_EXT_REPORT: Final = 0xC0205302
SEV_SNP_GUEST_MSG_REPORT: Final = 0xC0285301

MSG_VERSION: Final = 1
MSG_REPORT_REQ: Final = 5
MSG_REPORT_RSP: Final = 6

GUEST_REQUEST: Final = struct.Struct("<B7xQQQ")  # struct snp_guest_request_ioctl
REPORT_REQ: Final = struct.Struct("<64sI28x")  # struct snp_report_req
EXT_REPORT_REQ: Final = struct.Struct("<64sI28xQI4x")  # struct snp_ext_report_req (tail-padded to 8)
LEGACY_REQUEST: Final = struct.Struct("<BBBxH2xQH6xQI4x")  # struct sev_snp_guest_request (5.x)
REPORT_RESP_SIZE: Final = 4000  # struct snp_report_resp
LEGACY_RESP_SIZE: Final = 1280
REPORT_OFFSET: Final = 0x20
_RESP_HEADER: Final = struct.Struct("<II")

PAGE_SIZE: Final = 4096
DEFAULT_CERTS_LEN: Final = 4 * PAGE_SIZE
MAX_CERTS_LEN: Final = 64 * PAGE_SIZE

VMM_ERR_INVALID_LEN: Final = 1
VMM_ERR_BUSY: Final = 2

# SEV firmware status codes (AMD SEV-SNP firmware ABI, "Status Codes").
FIRMWARE_STATUS: Final[dict[int, str]] = {
    0x01: "INVALID_PLATFORM_STATE",
    0x02: "INVALID_GUEST_STATE",
    0x03: "INVALID_CONFIG",
    0x04: "INVALID_LENGTH",
    0x07: "POLICY_FAILURE",
    0x08: "INACTIVE",
    0x09: "INVALID_ADDRESS",
    0x0A: "BAD_SIGNATURE",
    0x0B: "BAD_MEASUREMENT",
    0x10: "INVALID_GUEST",
    0x11: "INVALID_COMMAND",
    0x13: "HWERROR_PLATFORM",
    0x14: "HWERROR_UNSAFE",
    0x15: "UNSUPPORTED",
    0x16: "INVALID_PARAM",
    0x17: "RESOURCE_LIMIT",
    0x18: "SECURE_DATA_INVALID",
}
_VMM_ERRORS: Final = {VMM_ERR_INVALID_LEN: "INVALID_LEN", VMM_ERR_BUSY: "BUSY"}

IoctlFunction = Callable[[int, int, Any], Any]
"""``fcntl.ioctl``'s shape: (fd, request, mutable buffer) -> int; raises OSError on failure."""


# --- wire structures ---------------------------------------------------------------------------------


def pack_guest_request(req_address: int, resp_address: int, exitinfo2: int = 0) -> bytes:
    """``struct snp_guest_request_ioctl``: msg_version 1, request and response addresses, exitinfo2."""
    return GUEST_REQUEST.pack(MSG_VERSION, req_address, resp_address, exitinfo2)


def pack_report_request(report_data: bytes, vmpl: int) -> bytes:
    """``struct snp_report_req``: 64 bytes of user data, the VMPL, 28 zero bytes."""
    return REPORT_REQ.pack(report_data, vmpl)


def pack_ext_report_request(report_data: bytes, vmpl: int, certs_address: int, certs_len: int) -> bytes:
    """``struct snp_ext_report_req``: the report request, then where and how long the cert buffer is."""
    return EXT_REPORT_REQ.pack(report_data, vmpl, certs_address, certs_len)


def pack_legacy_request(req_address: int, resp_address: int) -> bytes:
    """The 5.x ``struct sev_snp_guest_request`` for MSG_REPORT_REQ → MSG_REPORT_RSP."""
    return LEGACY_REQUEST.pack(
        MSG_REPORT_REQ,
        MSG_REPORT_RSP,
        MSG_VERSION,
        REPORT_REQ.size,
        req_address,
        LEGACY_RESP_SIZE,
        resp_address,
        0,
    )


@dataclass(frozen=True)
class GuestRequestError:
    """``exitinfo2`` split into the firmware error (low 32 bits) and the VMM error (high 32 bits)."""

    fw_error: int
    vmm_error: int

    @classmethod
    def from_exitinfo2(cls, exitinfo2: int) -> GuestRequestError:
        return cls(fw_error=exitinfo2 & 0xFFFF_FFFF, vmm_error=exitinfo2 >> 32 & 0xFFFF_FFFF)

    def describe(self) -> str:
        """E.g. ``firmware error 0x16 (INVALID_PARAM), VMM error 0``."""
        fw = f"firmware error {self.fw_error:#x}"
        if self.fw_error in FIRMWARE_STATUS:
            fw += f" ({FIRMWARE_STATUS[self.fw_error]})"
        vmm = f"VMM error {self.vmm_error}"
        if self.vmm_error in _VMM_ERRORS:
            vmm += f" ({_VMM_ERRORS[self.vmm_error]})"
        return f"{fw}, {vmm}"


def parse_report_response(response: bytes, *, device: str) -> bytes:
    """The report from a MSG_REPORT_RSP buffer: status must be 0 and report_size 1184."""
    if len(response) < REPORT_OFFSET + REPORT_SIZE:
        raise EvidenceUnavailable(f"the {device} response buffer is only {len(response)} bytes")
    status, size = _RESP_HEADER.unpack_from(response, 0)
    if status != 0:
        name = FIRMWARE_STATUS.get(status, "unknown")
        hint = (
            "the firmware rejected the request parameters (is the VMPL at least the guest's own?)"
            if status == 0x16
            else "see the AMD SEV-SNP firmware ABI status codes"
        )
        raise EvidenceUnavailable(
            f"the SEV-SNP firmware answered MSG_REPORT_RSP status {status:#x} ({name}) via {device}",
            hint=hint,
            code=Code.FIRMWARE_ERROR,
        )
    if size != REPORT_SIZE:
        raise EvidenceUnavailable(
            f"the SEV-SNP firmware returned a {size}-byte report via {device}, expected {REPORT_SIZE}",
            hint="this firmware's report format is not supported",
            code=Code.FIRMWARE_ERROR,
        )
    return bytes(response[REPORT_OFFSET : REPORT_OFFSET + REPORT_SIZE])


# --- providers ---------------------------------------------------------------------------------------


class DeviceOptions(TypedDict, total=False):
    """What both device providers take; ``device`` defaults to the provider's own device file."""

    device: Path
    vmpl: int
    context: SecurityContext | None
    collateral: CollateralClient | None
    ioctl: IoctlFunction


class _DeviceProvider(HardwareProvider):
    """What both device providers share: open-per-call ioctls on their device."""

    default_device: ClassVar[Path]

    def __init__(
        self,
        *,
        device: Path | None = None,
        vmpl: int = 0,
        context: SecurityContext | None = None,
        collateral: CollateralClient | None = None,
        ioctl: IoctlFunction = fcntl.ioctl,
    ) -> None:
        if not 0 <= vmpl <= 3:
            raise ConfigError(f"VMPL must be 0..3, found {vmpl}")
        self.device = device if device is not None else self.default_device
        self.vmpl = vmpl
        self.context = context
        self.collateral = collateral
        self._ioctl = ioctl

    def _call(self, request: int, argument: ctypes.Array[ctypes.c_char], what: str) -> OSError | None:
        """Open the device, issue one ioctl, close it. Returns the ioctl's OSError (open errors raise)."""
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EvidenceUnavailable(
                f"{self.device} does not exist",
                hint="this is not an SEV-SNP guest, or the device is not passed into the container",
                code=Code.DEVICE_MISSING,
            ) from None
        except PermissionError:
            raise EvidenceUnavailable(
                f"no permission to open {self.device}",
                hint="run with access to the device (device cgroup / file mode)",
                code=Code.DEVICE_FORBIDDEN,
            ) from None
        except OSError as exc:
            raise EvidenceUnavailable(f"cannot open {self.device}: {exc.strerror or exc}") from None
        try:
            self._ioctl(fd, request, argument)
        except OSError as exc:
            log.debug("%s on %s failed: %s", what, self.device, exc)
            return exc
        finally:
            os.close(fd)
        return None

    def _ioctl_failure(self, what: str, exc: OSError, detail: str) -> EvidenceUnavailable:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        hint = {
            errno.ENOTTY: "the driver does not know this ioctl (kernel too old or too new for it)",
            errno.EINVAL: "the driver rejected the request (check the VMPL)",
            errno.EIO: "the firmware or hypervisor rejected the request; see the error codes",
            errno.EBUSY: "the device is busy; retry",
        }.get(exc.errno or 0, "see the kernel log (dmesg)")
        return EvidenceUnavailable(
            f"{what} on {self.device} failed with {name} ({exc.strerror or exc}); {detail}",
            hint=hint,
            code=Code.DEVICE_ERROR,
        )


class SevGuestProvider(_DeviceProvider):
    """``/dev/sev-guest`` (Linux ≥ 5.19): SNP_GET_EXT_REPORT with the host's certificate table.

    Kernels or hosts without extended reports (ENOTTY/EINVAL/EOPNOTSUPP, or an unsupported VMM answer)
    get a plain SNP_GET_REPORT instead; the chain then comes from the security context or the
    collateral client. VMM ``INVALID_LEN`` is answered by retrying with the certificate buffer size the
    kernel asks for; VMM ``BUSY`` by retrying after a short pause.
    """

    name = "sevguest"
    default_device = SEV_GUEST_DEVICE

    def __init__(
        self, *, busy_retries: int = 5, certs_len: int = DEFAULT_CERTS_LEN, **options: Unpack[DeviceOptions]
    ) -> None:
        super().__init__(**options)
        self._busy_retries = busy_retries
        self._certs_len = _page_align(certs_len)

    def _fetch(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        return self._extended(report_data) or (self._plain(report_data), None)

    def _extended(self, report_data: bytes) -> tuple[bytes, bytes] | None:
        certs_len = self._certs_len
        for attempt in range(self._busy_retries + 2):
            certs = ctypes.create_string_buffer(certs_len)
            response = ctypes.create_string_buffer(REPORT_RESP_SIZE)
            request = ctypes.create_string_buffer(
                pack_ext_report_request(report_data, self.vmpl, ctypes.addressof(certs), certs_len),
                EXT_REPORT_REQ.size,
            )
            guest = ctypes.create_string_buffer(
                pack_guest_request(ctypes.addressof(request), ctypes.addressof(response)), GUEST_REQUEST.size
            )
            failure = self._call(SNP_GET_EXT_REPORT, guest, "SNP_GET_EXT_REPORT")
            if failure is None:
                return parse_report_response(response.raw, device=str(self.device)), certs.raw
            error = GuestRequestError.from_exitinfo2(GUEST_REQUEST.unpack(guest.raw)[3])
            if error.vmm_error == VMM_ERR_INVALID_LEN:
                wanted = EXT_REPORT_REQ.unpack(request.raw)[3]
                if wanted <= certs_len or wanted > MAX_CERTS_LEN:
                    raise self._ioctl_failure(
                        "SNP_GET_EXT_REPORT",
                        failure,
                        f"{error.describe()}; the host asked for a {wanted}-byte certificate buffer "
                        f"(had {certs_len}, limit {MAX_CERTS_LEN})",
                    )
                log.debug("host certificate table needs %d bytes; retrying", wanted)
                certs_len = _page_align(wanted)
                continue
            if error.vmm_error == VMM_ERR_BUSY and attempt < self._busy_retries:
                time.sleep(0.05 * 2**attempt)
                continue
            if failure.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) and error.fw_error == 0:
                log.info(
                    "SNP_GET_EXT_REPORT is not available on %s (%s); using SNP_GET_REPORT without the host "
                    "certificate table",
                    self.device,
                    errno.errorcode.get(failure.errno or 0, failure.errno),
                )
                return None
            raise self._ioctl_failure("SNP_GET_EXT_REPORT", failure, error.describe())
        raise EvidenceUnavailable(
            f"SNP_GET_EXT_REPORT on {self.device} stayed busy after {self._busy_retries} retries",
            hint="the hypervisor is throttling guest requests; retry later",
            code=Code.DEVICE_BUSY,
        )

    def _plain(self, report_data: bytes) -> bytes:
        for attempt in range(self._busy_retries + 1):
            request = ctypes.create_string_buffer(
                pack_report_request(report_data, self.vmpl), REPORT_REQ.size
            )
            response = ctypes.create_string_buffer(REPORT_RESP_SIZE)
            guest = ctypes.create_string_buffer(
                pack_guest_request(ctypes.addressof(request), ctypes.addressof(response)), GUEST_REQUEST.size
            )
            failure = self._call(SNP_GET_REPORT, guest, "SNP_GET_REPORT")
            if failure is None:
                return parse_report_response(response.raw, device=str(self.device))
            error = GuestRequestError.from_exitinfo2(GUEST_REQUEST.unpack(guest.raw)[3])
            if error.vmm_error == VMM_ERR_BUSY and attempt < self._busy_retries:
                time.sleep(0.05 * 2**attempt)
                continue
            raise self._ioctl_failure("SNP_GET_REPORT", failure, error.describe())
        raise AssertionError("unreachable")  # pragma: no cover


class LegacySevProvider(_DeviceProvider):
    """``/dev/sev`` on the 5.x Microsoft/AMD guest kernels (ioctl 0xC0285301, 40-byte request)."""

    name = "sev"
    default_device = LEGACY_SEV_DEVICE

    def _fetch(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        request = ctypes.create_string_buffer(pack_report_request(report_data, self.vmpl), REPORT_REQ.size)
        response = ctypes.create_string_buffer(LEGACY_RESP_SIZE)
        guest = ctypes.create_string_buffer(
            pack_legacy_request(ctypes.addressof(request), ctypes.addressof(response)), LEGACY_REQUEST.size
        )
        failure = self._call(SEV_SNP_GUEST_MSG_REPORT, guest, "SEV_SNP_GUEST_MSG_REPORT")
        fw_error = LEGACY_REQUEST.unpack(guest.raw)[7]
        detail = GuestRequestError(fw_error=fw_error, vmm_error=0).describe()
        if failure is not None:
            raise self._ioctl_failure("SEV_SNP_GUEST_MSG_REPORT", failure, detail)
        if fw_error:
            raise EvidenceUnavailable(
                f"SEV_SNP_GUEST_MSG_REPORT on {self.device} reported {detail}",
                hint="see the AMD SEV-SNP firmware ABI status codes",
                code=Code.FIRMWARE_ERROR,
            )
        return parse_report_response(response.raw, device=str(self.device)), None


def _page_align(size: int) -> int:
    return max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
