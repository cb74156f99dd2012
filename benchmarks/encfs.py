"""``make bench``, encfs figures: time to ready and sequential read MiB/s for a 64 MiB image served by
Azurite, through the userspace backend (FUSE block cache → loop → ext4), cold and warm.

Needs what the encfs tests need (root, /dev/fuse, fuse3, cryptsetup, Azurite from tests/azurite); without
them the figures are reported as missing with the reason in the notes. The key is a fixed 32-byte key
handed to the mounter directly: the release path has its own figures above, this measures the filesystem.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
FILE_SIZE = 24 * MiB  # fits the 32 MiB ext4 of a 64 MiB image


def _why_not() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "not root"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    missing = [
        t for t in ("cryptsetup", "mkfs.ext4", "losetup", "fusermount3", "node") if not shutil.which(t)
    ]
    return f"missing {', '.join(missing)}" if missing else None


async def measure_encfs(report: Any) -> None:
    """Adds ``encfs_ready_s``, ``encfs_read_cold_mib_s`` and ``encfs_read_warm_mib_s`` to ``report``."""
    report.section("encfs (64 MiB image from Azurite)")
    reason = _why_not()
    ready: float | None = None
    cold: float | None = None
    warm: float | None = None
    if reason is None:
        try:
            ready, cold, warm = await _run()
        except Exception as exc:  # the bench reports, it does not stop
            reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if reason is not None:
        ready = cold = warm = None
        report.notes["encfs"] = f"not measured: {reason}"
    else:
        report.notes["encfs"] = (
            "skr encfs create (64 MiB image, one 24 MiB file) → page blob in Azurite over HTTPS (anonymous "
            "read) → EncfsMounter userspace backend with the default cache (512 KiB x 32). Ready: mount_all "
            "(blob properties, LUKS2 header, unlock, FUSE process, loop, mount, publish) without the key "
            "release. Cold: the first sequential read of the file; warm: the second (kernel page cache)."
        )
    report.add("encfs_ready_s", "encfs: time to ready (no release)", ready, "s")
    report.add("encfs_read_cold_mib_s", "encfs: sequential read, cold", cold, "MiB/s")
    report.add("encfs_read_warm_mib_s", "encfs: sequential read, warm", warm, "MiB/s")


async def _run() -> tuple[float, float, float]:
    from azure.storage.blob import BlobServiceClient, PublicAccess

    from skr.encfs.args import parse_encfs_json
    from skr.encfs.blob import blob_allowlist
    from skr.encfs.image import create_image
    from skr.encfs.mount import EncfsMounter, Options
    from skr.encfs.system import System
    from skr.local.ca import LocalCA
    from tests.encfstools import azurite

    key = bytes(range(32))
    jwk = json.dumps({"kty": "oct", "k": base64.urlsafe_b64encode(key).rstrip(b"=").decode()})
    with tempfile.TemporaryDirectory(prefix="skr-bench-encfs-") as tmp:
        root = Path(tmp)
        content = root / "content"
        content.mkdir()
        payload = os.urandom(FILE_SIZE)
        (content / "big.bin").write_bytes(payload)
        image = root / "image.img"
        await asyncio.to_thread(create_image, content, image, key, size=64 * MiB, system=System())
        ca = LocalCA.load_or_create(root / "ca")
        with azurite(root / "azurite", ca) as az:
            service = BlobServiceClient.from_connection_string(
                az.connection_string(), connection_verify=str(ca.ca_pem_path)
            )
            container = service.create_container("bench", public_access=PublicAccess.BLOB)
            with image.open("rb") as f:
                container.upload_blob("image.img", f, blob_type="PageBlob")
            mount_point = root / "mnt" / "data"
            mount_point.parent.mkdir()
            args = parse_encfs_json(
                json.dumps(
                    {
                        "azure_filesystems": [
                            {
                                "mount_point": str(mount_point),
                                "azure_url": az.blob_url("bench", "image.img"),
                                "key": {"kid": "bench"},
                            }
                        ]
                    }
                )
            )
            options = Options(
                work_dir=root / "work",
                blob_allowlist=blob_allowlist({"SKR_ALLOWED_BLOB_ENDPOINTS": f"127.0.0.1:{az.port}"}),
                ca_bundle=ca.ca_pem_path,
            )

            async def key_source(spec: Any) -> str:
                return jwk

            mounter = EncfsMounter(args, options, key_source=key_source, system=System())
            started = time.perf_counter()
            await mounter.mount_all()
            try:
                ready = time.perf_counter() - started
                timings = []
                for _ in range(2):
                    started = time.perf_counter()
                    data = await asyncio.to_thread((mount_point / "big.bin").read_bytes)
                    timings.append(time.perf_counter() - started)
                    if data != payload:
                        raise AssertionError("the file did not read back byte-identical")
            finally:
                with contextlib.suppress(Exception):
                    await mounter.teardown()
    return ready, FILE_SIZE / MiB / timings[0], FILE_SIZE / MiB / timings[1]
