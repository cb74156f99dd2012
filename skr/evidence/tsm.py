"""SEV-SNP reports through configfs-tsm (Linux ≥ 6.7): ``/sys/kernel/config/tsm/report``.

Owns the report-instance protocol (kernel Documentation/ABI/testing/configfs-tsm-report): ``mkdir`` a
uniquely named entry, check ``provider`` is ``sev_guest``, write ``privlevel`` when configured, write the
64 bytes of REPORT_DATA to ``inblob``, read ``generation``, read ``outblob`` (the raw ATTESTATION_REPORT)
and ``auxblob`` (the GHCB certificate table, possibly empty), read ``generation`` again — if it moved,
another writer raced us and the report is discarded and requested again — and always ``rmdir`` the entry.

Never reuses an entry across requests, never leaves one behind, never blocks the event loop (the file
I/O runs in :func:`asyncio.to_thread`). The filesystem operations are one small injectable object so the
protocol can be tested against a simulated kernel in a temporary directory.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Final, Protocol

from skr.errors import Code, ConfigError, EvidenceUnavailable
from skr.evidence.certtable import HardwareProvider
from skr.evidence.context import SecurityContext
from skr.snp.collateral import CollateralClient

log = logging.getLogger(__name__)

TSM_REPORT_ROOT: Final = Path("/sys/kernel/config/tsm/report")
SEV_GUEST_PROVIDER: Final = "sev_guest"


class ConfigfsOps(Protocol):
    """The four filesystem operations the protocol needs (real configfs, or a simulated kernel)."""

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path) -> bytes: ...

    def write(self, path: Path, data: bytes) -> None: ...


class LinuxConfigfs:
    """:class:`ConfigfsOps` on the real filesystem. Writes are one ``write(2)`` each, as configfs wants."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as handle:
            return handle.read()

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as handle:
            written = handle.write(data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")


class TsmProvider(HardwareProvider):
    """Evidence from configfs-tsm. ``privlevel`` (0..3, the VMPL) is written only when given."""

    name = "tsm"

    def __init__(
        self,
        *,
        root: Path = TSM_REPORT_ROOT,
        privlevel: int | None = None,
        context: SecurityContext | None = None,
        collateral: CollateralClient | None = None,
        fs: ConfigfsOps | None = None,
        attempts: int = 3,
    ) -> None:
        if privlevel is not None and not 0 <= privlevel <= 3:
            raise ConfigError(f"privlevel must be 0..3, found {privlevel}")
        if attempts < 1:
            raise ConfigError(f"attempts must be at least 1, found {attempts}")
        self.root = root
        self.privlevel = privlevel
        self.context = context
        self.collateral = collateral
        self._fs: ConfigfsOps = fs if fs is not None else LinuxConfigfs()
        self._attempts = attempts

    def _fetch(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        for attempt in range(1, self._attempts + 1):
            entry = self.root / f"skr-{os.getpid()}-{secrets.token_hex(8)}"
            self._mkdir(entry)
            try:
                result = self._one_report(entry, report_data)
            finally:
                self._rmdir(entry)
            if result is not None:
                return result
            log.warning(
                "configfs-tsm generation changed while reading %s (attempt %d); retrying", entry, attempt
            )
        raise EvidenceUnavailable(
            f"configfs-tsm report generation kept changing during {self._attempts} attempts under "
            f"{self.root}",
            hint="another process writes to our report entries; make sure nothing else touches skr-* entries",
            code=Code.TSM_CONFLICT,
        )

    def _one_report(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes | None] | None:
        provider = self._read(entry / "provider").decode("ascii", "replace").strip()
        if provider != SEV_GUEST_PROVIDER:
            raise EvidenceUnavailable(
                f"configfs-tsm provider is {provider!r}, expected {SEV_GUEST_PROVIDER!r}",
                hint="this TEE is not AMD SEV-SNP; skr only handles SEV-SNP reports",
                code=Code.TSM_WRONG_PROVIDER,
            )
        if self.privlevel is not None:
            self._write(
                entry / "privlevel", str(self.privlevel).encode(), floor_hint=entry / "privlevel_floor"
            )
        self._write(entry / "inblob", report_data)
        generation = self._generation(entry)
        outblob = self._read(entry / "outblob")
        auxblob = self._read_optional(entry / "auxblob")
        if self._generation(entry) != generation:
            return None
        return outblob, auxblob or None

    # --- file operations with clear errors -----------------------------------------------------------

    def _mkdir(self, entry: Path) -> None:
        try:
            self._fs.mkdir(entry)
        except FileNotFoundError:
            raise EvidenceUnavailable(
                f"{self.root} does not exist",
                hint="configfs-tsm needs Linux 6.7+ with configfs mounted at /sys/kernel/config",
                code=Code.DEVICE_MISSING,
            ) from None
        except PermissionError:
            raise EvidenceUnavailable(
                f"no permission to create a report entry under {self.root}",
                hint="the container needs write access to /sys/kernel/config/tsm/report",
                code=Code.DEVICE_FORBIDDEN,
            ) from None
        except OSError as exc:
            raise EvidenceUnavailable(
                f"cannot create {entry}: {exc.strerror or exc}", code=Code.DEVICE_ERROR
            ) from None

    def _rmdir(self, entry: Path) -> None:
        try:
            self._fs.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not remove configfs-tsm entry %s: %s", entry, exc.strerror or exc)

    def _read(self, path: Path) -> bytes:
        try:
            return self._fs.read(path)
        except OSError as exc:
            raise EvidenceUnavailable(
                f"reading {path} failed: {exc.strerror or exc}",
                hint="the sev-guest driver could not produce a report; see the kernel log (dmesg)",
                code=Code.DEVICE_ERROR,
            ) from None

    def _read_optional(self, path: Path) -> bytes | None:
        try:
            return self._fs.read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EvidenceUnavailable(
                f"reading {path} failed: {exc.strerror or exc}", code=Code.DEVICE_ERROR
            ) from None

    def _write(self, path: Path, data: bytes, *, floor_hint: Path | None = None) -> None:
        try:
            self._fs.write(path, data)
        except OSError as exc:
            hint = "see the kernel log (dmesg)"
            if floor_hint is not None:
                floor = self._read_optional(floor_hint)
                if floor is not None:
                    value = floor.decode(errors="replace").strip()
                    hint = f"privlevel must be at least privlevel_floor = {value}"
            raise EvidenceUnavailable(
                f"writing {path.name} under {path.parent} failed: {exc.strerror or exc}",
                hint=hint,
                code=Code.DEVICE_ERROR,
            ) from None

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").decode("ascii", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise EvidenceUnavailable(
                f"configfs-tsm generation is {text[:20]!r}, expected a number", code=Code.DEVICE_ERROR
            ) from None
