"""The userspace backend's FUSE process: one file ``data``, the decrypted data segment of a blob image.

Run as ``python -m skr.encfs.fuseserver`` by :mod:`skr.encfs.mount` (a FUSE server blocks in its request
loop, so it is a process of its own). Its configuration, including the volume key, arrives as one JSON
line on **stdin** — never in a file, an argument or the environment. It prints ``ready`` once the kernel
has mounted it (or ``error <reason>``; its log goes to the parent's stderr), serves until
``fusermount3 -u``, then flushes dirty blocks and exits (1 if the flush failed). It dies with its parent
(``PR_SET_PDEATHSIG``), so a crashed ``skr encfs`` leaves a dead mount the next start cleans up.
Blob I/O runs on an asyncio loop in a helper thread (``azure-storage-blob`` aio).

Never logs the key or file data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import stat
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from skr.encfs.blob import Blob, BlobUrl, blob_transport_kwargs
from skr.encfs.blockfile import BlockFile, Plain, SectorCipher
from skr.encfs.luks2 import DataCipher, Segment, VolumeKey
from skr.endpoints import parse_endpoint

log = logging.getLogger("skr.encfs.fuse")

T = TypeVar("T")
IO_TIMEOUT = 120.0
FILE_NAME = "data"


@dataclass(frozen=True)
class FuseConfig:
    """What the parent sends on stdin."""

    mountpoint: str
    url: str  # https://host[:port]/path
    sas: str = field(default="", repr=False)
    private: bool = False
    client_id: str | None = None
    ca_bundle: str | None = None
    read_write: bool = False
    lease_id: str | None = field(default=None, repr=False)
    data_offset: int = 0
    size: int = 0
    sector_size: int = 4096
    iv_tweak: int = 0
    encryption: str = "aes-xts-plain64"
    block_size: int = 512 * 1024
    cache_blocks: int = 32
    volume_key: str = field(default="", repr=False)  # hex

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, line: str) -> FuseConfig:
        return cls(**json.loads(line))


class _Loop:
    """An asyncio loop in a daemon thread; FUSE threads wait on coroutines run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="encfs-blob-io", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(IO_TIMEOUT)


def build(config: FuseConfig, io: _Loop) -> tuple[BlockFile, Blob, Any]:
    from skr.identity import CredentialFactory

    parts = config.url.split("/", 3)
    url = BlobUrl(parse_endpoint(f"https://{parts[2]}"), "/" + parts[3], config.sas)

    async def open_blob() -> tuple[Blob, CredentialFactory]:
        factory = CredentialFactory(
            client_id=config.client_id, ca_bundle=Path(config.ca_bundle) if config.ca_bundle else None
        )
        credential = factory.for_request(None) if config.private and not url.sas else None
        blob = Blob(
            url,
            credential=credential,
            transport_kwargs=blob_transport_kwargs(factory),
            lease_id=config.lease_id,
        )
        return blob, factory

    blob, factory = io.run(open_blob())
    segment = Segment(
        id="0",
        offset=config.data_offset,
        size=config.size,
        iv_tweak=config.iv_tweak,
        encryption=config.encryption,
        sector_size=config.sector_size,
    )
    cipher: SectorCipher = (
        Plain()
        if config.encryption == "none"
        else DataCipher(VolumeKey(bytes.fromhex(config.volume_key), "0"), segment)
    )

    def fetch(offset: int, length: int) -> bytes:
        return io.run(blob.read(offset, length))

    def store(offset: int, data: bytes) -> None:
        io.run(blob.write_pages(offset, data))

    def prefetch(offset: int, length: int) -> concurrent.futures.Future[bytes]:
        return asyncio.run_coroutine_threadsafe(blob.read(offset, length), io.loop)

    blockfile = BlockFile(
        cipher,
        data_offset=config.data_offset,
        size=config.size,
        fetch=fetch,
        store=store if config.read_write else None,
        block_size=config.block_size,
        cache_blocks=config.cache_blocks,
        prefetch=prefetch,
    )
    return blockfile, blob, factory


def operations(blockfile: BlockFile, *, on_init: Any) -> Any:
    import mfusepy  # type: ignore[import-untyped]

    times = dict.fromkeys(("st_mtime", "st_ctime"), time.time_ns())  # use_ns: nanoseconds
    mode = 0o600 if blockfile.writable else 0o400

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        flush_failed = False
        use_ns = True  # times in nanoseconds (mfusepy's float seconds are deprecated)

        def init(self, path: str) -> None:
            on_init()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o500, "st_nlink": 2, **times}
            if path == f"/{FILE_NAME}":
                return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": blockfile.size, **times}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", FILE_NAME]

        def open(self, path: str, flags: int) -> int:
            if path != f"/{FILE_NAME}":
                raise mfusepy.FuseOSError(errno.ENOENT)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                return blockfile.read(offset, size)
            except Exception:
                log.exception("read of %d bytes at %d failed", size, offset)
                raise mfusepy.FuseOSError(errno.EIO) from None

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            if not blockfile.writable:
                raise mfusepy.FuseOSError(errno.EROFS)
            try:
                return blockfile.write(offset, data)
            except Exception:
                log.exception("write of %d bytes at %d failed", len(data), offset)
                raise mfusepy.FuseOSError(errno.EIO) from None

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            if length != blockfile.size:
                raise mfusepy.FuseOSError(errno.EPERM)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            self._flush()

        def _flush(self) -> None:
            try:
                blockfile.flush()
            except Exception:
                Ops.flush_failed = True
                log.exception("uploading dirty blocks failed")
                raise mfusepy.FuseOSError(errno.EIO) from None

        def destroy(self, path: str) -> None:
            if blockfile.writable:
                with contextlib.suppress(mfusepy.FuseOSError):
                    self._flush()

    return Ops()


def _die_with_parent() -> None:
    import ctypes
    import os
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent is already gone
        sys.exit(1)


def main() -> int:
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO, format="skr-encfs-fuse: %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    config = FuseConfig.from_json(sys.stdin.readline())
    import mfusepy

    io = _Loop()
    try:
        blockfile, blob, factory = build(config, io)
    except Exception as exc:
        sys.stdout.write(f"error {getattr(exc, 'message', None) or exc}\n")
        return 1

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    ops = operations(blockfile, on_init=ready)
    try:
        mfusepy.FUSE(
            ops,
            config.mountpoint,
            foreground=True,
            nothreads=True,
            ro=not config.read_write,
            fsname="skr-encfs",
            subtype="skr-encfs",
        )
    except RuntimeError as exc:  # libfuse could not mount
        sys.stdout.write(f"error mounting FUSE at {config.mountpoint} failed ({exc})\n")
        return 1
    finally:
        io.run(blob.aclose())
        io.run(factory.aclose())
    return 1 if type(ops).flush_failed else 0


if __name__ == "__main__":
    sys.exit(main())
