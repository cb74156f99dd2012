"""Mount, publish and tear down the filesystems of an ``EncfsSideCarArgs``, one after the other.

For each filesystem: the blob (allowlist, size, page blob and lease for read-write) → the LUKS2 header
→ the key, released through skr's own release path → unlock → the backend:

- ``userspace``: a FUSE process serving the *decrypted* image as one file (block cache, dirty pages),
  a loop device over it (read-only unless read-write), ``mount`` ext4;
- ``dm-crypt``: a FUSE process serving the raw image, ``cryptsetup open`` with the key on stdin (and the
  Go sidecar's detached-header fallback), ``mount`` the mapping;

then ``mount_point → .filesystem-<i>``, a relative symlink swapped in atomically, so the app only ever
sees a complete mount. A failure names the filesystem and the step and tears down everything mounted.
Teardown runs in reverse: symlink, ext4, loop device / dm-crypt, FUSE, lease. Stale mounts, loop devices
and symlinks a crash left behind are removed at start.

Keys stay in memory: the passphrase and volume key reach cryptsetup or the FUSE process on stdin only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from skr.encfs.args import EncfsArgs, FilesystemSpec
from skr.encfs.blob import Blob, BlobUrl, blob_transport_kwargs, parse_blob_url, proposed_lease_id
from skr.encfs.errors import BlobError, EncfsConfigError, LuksError, MountError
from skr.encfs.fuseserver import FILE_NAME, FuseConfig
from skr.encfs.keys import filesystem_key
from skr.encfs.luks2 import Header, VolumeKey, read_header, unlock
from skr.encfs.system import System
from skr.endpoints import Allowlist
from skr.errors import Code, SkrError

log = logging.getLogger("skr.encfs")

T = TypeVar("T")
KeySource = Callable[[FilesystemSpec], Awaitable[str]]  # the released JWK (a JSON string)
LEASE_RENEW_SECONDS = 15.0
IO_TIMEOUT = 120.0


@dataclass(frozen=True)
class Options:
    backend: str = "userspace"  # "userspace" | "dm-crypt" (auto is resolved by the caller)
    block_size: int = 512 * 1024
    cache_blocks: int = 32
    work_dir: Path = Path("/run/skr-encfs")
    blob_allowlist: Allowlist = field(default_factory=lambda: Allowlist(()))
    ca_bundle: Path | None = None
    client_id: str | None = None
    fuse_timeout: float = 60.0
    teardown_timeout: float = 20.0


@dataclass
class Mounted:
    """One filesystem's resources, in the order they were taken (for teardown)."""

    spec: FilesystemSpec
    blob: Blob | None = None
    factory: Any | None = None  # the CredentialFactory behind the blob client
    renew: asyncio.Task[None] | None = None
    fuse_dir: Path | None = None
    fuse: asyncio.subprocess.Process | None = None
    loop_device: str | None = None
    dm_name: str | None = None
    target: Path | None = None
    mounted: bool = False
    link: Path | None = None


def target_of(spec: FilesystemSpec) -> tuple[Path, Path]:
    """(``mount_point``, its sibling ``.filesystem-<i>``), both absolute."""
    link = Path(os.path.abspath(spec.mount_point))
    return link, link.parent / f".filesystem-{spec.index}"


def mounted_paths() -> set[str]:
    """Mount points of this mount namespace (``/proc/self/mountinfo``, octal escapes undone)."""
    out = set()
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                out.add(fields[4].encode().decode("unicode_escape"))
    return out


def fuse_alive(path: Path) -> bool:
    """Whether the FUSE mount at ``path`` still has its server (a dead one answers ENOTCONN)."""
    try:
        os.stat(path / FILE_NAME)
    except OSError:
        return False
    return True


def loops_backed_by(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(directory) + "/"):
                found.append(f"/dev/{backing.parent.parent.name}")
    return found


class EncfsMounter:
    """Mounts ``args`` with ``options``; ``key_source`` releases keys; ``system`` runs privileged steps."""

    def __init__(self, args: EncfsArgs, options: Options, *, key_source: KeySource, system: System) -> None:
        self.args = args
        self.options = options
        self.key_source = key_source
        self.system = system
        self.mounted: list[Mounted] = []
        self.ready = False
        self.state: dict[str, str] = {fs.mount_point: "pending" for fs in args.filesystems}

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(call, *args, **kwargs)

    def _sync_reader(self, blob: Blob, loop: asyncio.AbstractEventLoop) -> Callable[[int, int], bytes]:
        def read_at(offset: int, size: int) -> bytes:
            if offset >= blob.size or size <= 0:
                return b""
            size = min(size, blob.size - offset)
            return asyncio.run_coroutine_threadsafe(blob.read(offset, size), loop).result(IO_TIMEOUT)

        return read_at

    # --- start -----------------------------------------------------------------------------------------

    async def clean_stale(self) -> None:
        """Remove what a crashed run left: symlinks, ext4 mounts, loop devices, FUSE mounts, dm mappings."""
        mounts = mounted_paths()
        work = self.options.work_dir
        ours = [path for path in sorted(mounts) if path.startswith(f"{work}/")]
        for path in ours:
            if fuse_alive(Path(path)):
                raise MountError(
                    f"{path} is served by another running skr encfs",
                    hint="give each skr encfs its own --work-dir",
                    code=Code.ENCFS_IN_USE,
                )
        for spec in self.args.filesystems:
            link, target = target_of(spec)
            if link.is_symlink():
                log.info("removing a stale symlink %s", link)
                link.unlink()
            elif link.exists():
                raise EncfsConfigError(
                    f"filesystem {spec.index}: mount_point {link} exists and is not a symlink encfs made",
                    hint="the mount point must not exist: encfs creates it as a symlink",
                )
            siblings = list(link.parent.iterdir()) if link.parent.is_dir() else []
            users = [p for p in siblings if p.is_symlink() and os.readlink(p) == target.name]
            if str(target) in mounts and users:
                raise MountError(
                    f"filesystem {spec.index}: {target} is mounted and published at {users[0]} "
                    "by another skr encfs",
                    hint="mount points of different skr encfs instances need different directories",
                    code=Code.ENCFS_IN_USE,
                )
            if str(target) in mounts:
                log.info("unmounting a stale mount at %s", target)
                await self._run(self.system.umount, target, lazy=True)
            dm_name = f"remote-crypt-{spec.index}"
            if await asyncio.to_thread(Path("/dev/mapper", dm_name).exists):
                await self._run(self.system.cryptsetup_close, dm_name)
        for device in loops_backed_by(work):
            log.info("detaching a stale loop device %s", device)
            await self._run(self.system.losetup_detach, device)
        for path in ours:
            log.info("unmounting a stale FUSE mount at %s", path)
            await self._run(self.system.fuse_unmount, Path(path), lazy=True)

    async def mount_all(self) -> None:
        """Mount every filesystem in order; on the first failure tear everything down and raise it."""
        await self.clean_stale()
        self.options.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for spec in self.args.filesystems:
                await self._mount_one(spec)
        except BaseException:
            await self.teardown()
            raise
        self.ready = True

    async def _step(self, spec: FilesystemSpec, step: str, work: Awaitable[T]) -> T:
        self.state[spec.mount_point] = step
        try:
            return await work
        except (SkrError, OSError, ValueError, TimeoutError) as exc:
            self.state[spec.mount_point] = f"failed at {step}"
            where = f"filesystem {spec.index} ({spec.mount_point}): {step}"
            if isinstance(exc, SkrError):
                raise type(exc)(f"{where}: {exc.message}", hint=exc.hint, code=exc.code) from None
            raise MountError(f"{where}: {exc}") from None

    async def _mount_one(self, spec: FilesystemSpec) -> None:
        m = Mounted(spec)
        self.mounted.append(m)
        url = await self._step(spec, "blob", self._parse_url(spec))
        if spec.key is None:
            raise EncfsConfigError(
                f"filesystem {spec.index} ({spec.mount_point}) has no key.kid"
                + (" (raw_key is a Go test-build feature and is ignored)" if spec.has_raw_key else "")
            )
        blob, m.factory = await self._step(spec, "blob", self._open_blob(spec, url))
        m.blob = blob
        loop = asyncio.get_running_loop()
        reader = self._sync_reader(blob, loop)
        header = await self._step(spec, "LUKS2 header", self._run(read_header, reader))
        data_size = self._data_size(header, blob)
        jwk = await self._step(spec, "key release", self.key_source(spec))
        passphrase = filesystem_key(jwk, spec.key_derivation, where=f"filesystem {spec.index}")
        volume_key = await self._step(spec, "LUKS2 unlock", self._run(unlock, header, passphrase, reader))
        link, target = target_of(spec)
        m.fuse_dir = self.options.work_dir / str(spec.index)
        if self.options.backend == "dm-crypt":
            await self._step(spec, "FUSE", self._start_fuse(m, url, header, data_size, None))
            device = await self._step(spec, "cryptsetup open", self._dm_open(m, passphrase, header))
        else:
            await self._step(spec, "FUSE", self._start_fuse(m, url, header, data_size, volume_key))
            device = await self._step(
                spec,
                "loop device",
                self._run(self.system.losetup_attach, m.fuse_dir / FILE_NAME, read_only=not spec.read_write),
            )
            m.loop_device = device
        target.mkdir(parents=True, exist_ok=True)
        m.target = target
        await self._step(
            spec, "mount", self._run(self.system.mount_ext4, device, target, read_only=not spec.read_write)
        )
        m.mounted = True
        await self._step(spec, "publish", self._run(publish, link, target.name))
        m.link = link
        self.state[spec.mount_point] = "published"
        mode = "read-write" if spec.read_write else "read-only"
        log.info("filesystem %d published at %s (%s)", spec.index, link, mode)

    async def _parse_url(self, spec: FilesystemSpec) -> BlobUrl:
        return parse_blob_url(spec.azure_url, allowlist=self.options.blob_allowlist)

    async def _open_blob(self, spec: FilesystemSpec, url: BlobUrl) -> tuple[Blob, Any]:
        from skr.identity import CredentialFactory

        factory = CredentialFactory(
            client_id=self.args.client_id or self.options.client_id, ca_bundle=self.options.ca_bundle
        )
        credential = factory.for_request(None) if spec.azure_url_private and not url.sas else None
        blob = Blob(url, credential=credential, transport_kwargs=blob_transport_kwargs(factory))
        try:
            await blob.properties()
            if spec.read_write:
                if blob.blob_type != "PageBlob":
                    raise BlobError(
                        f"the blob {url} is a {blob.blob_type or 'block blob'}; "
                        "read-write mounts need a page blob",
                        hint="upload it with `skr encfs upload --page`",
                        code=Code.BLOB_NOT_PAGE_BLOB,
                    )
                await blob.acquire_lease(proposed_lease_id(url, spec.mount_point))
        except BaseException:
            await blob.aclose()
            await factory.aclose()
            raise
        return blob, factory

    def _data_size(self, header: Header, blob: Blob) -> int:
        seg = header.data_segment
        size = seg.size if seg.size is not None else blob.size - seg.offset
        if size < seg.sector_size or seg.offset + size > blob.size:
            raise LuksError(
                f"the blob holds {blob.size} bytes but the LUKS2 data segment needs "
                f"{seg.offset + max(size, seg.sector_size)}: the image is truncated",
                code=Code.LUKS_IMAGE_TRUNCATED,
            )
        return size - size % seg.sector_size

    async def _start_fuse(
        self, m: Mounted, url: BlobUrl, header: Header, data_size: int, volume_key: VolumeKey | None
    ) -> None:
        assert m.fuse_dir is not None and m.blob is not None
        m.fuse_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        seg = header.data_segment
        config = FuseConfig(
            mountpoint=str(m.fuse_dir),
            url=url.url,
            sas=url.sas,
            private=m.spec.azure_url_private,
            client_id=self.args.client_id or self.options.client_id,
            ca_bundle=str(self.options.ca_bundle) if self.options.ca_bundle else None,
            read_write=m.spec.read_write,
            lease_id=m.blob.lease_id,
            data_offset=seg.offset if volume_key is not None else 0,
            size=data_size if volume_key is not None else m.blob.size,
            sector_size=seg.sector_size if volume_key is not None else 512,
            iv_tweak=seg.iv_tweak,
            encryption=seg.encryption if volume_key is not None else "none",
            block_size=self.options.block_size,
            cache_blocks=self.options.cache_blocks,
            volume_key=volume_key.key.hex() if volume_key is not None else "",
        )
        m.fuse = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "skr.encfs.fuseserver",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert m.fuse.stdin is not None and m.fuse.stdout is not None
        m.fuse.stdin.write(config.to_json().encode() + b"\n")
        await m.fuse.stdin.drain()
        m.fuse.stdin.close()
        try:
            async with asyncio.timeout(self.options.fuse_timeout):
                line = await m.fuse.stdout.readline()
        except TimeoutError:
            raise MountError(
                f"the FUSE process did not mount within {self.options.fuse_timeout:g} s"
            ) from None
        if line.strip() != b"ready":
            await m.fuse.wait()
            m.fuse = None
            reason = line.decode(errors="replace").strip().removeprefix("error ")
            raise MountError(f"the FUSE process failed: {reason or 'it exited without a word'}")
        if m.spec.read_write:
            m.renew = asyncio.create_task(self._renew(m.blob))

    async def _renew(self, blob: Blob) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            try:
                await blob.renew_lease()
            except Exception as exc:
                log.error("renewing the lease on %s failed: %s", blob.url, type(exc).__name__)

    async def _dm_open(self, m: Mounted, passphrase: bytes, header: Header) -> str:
        assert m.fuse_dir is not None and m.blob is not None
        name = f"remote-crypt-{m.spec.index}"
        source = m.fuse_dir / FILE_NAME
        await self._run(
            dm_open,
            self.system,
            source,
            name,
            passphrase,
            header_size=header.data_segment.offset,
            work_dir=self.options.work_dir,
        )
        m.dm_name = name
        return f"/dev/mapper/{name}"

    # --- teardown --------------------------------------------------------------------------------------

    async def teardown(self) -> None:
        """Undo everything, newest filesystem first, each step bounded; never raises."""
        self.ready = False
        while self.mounted:
            m = self.mounted.pop()
            try:
                async with asyncio.timeout(self.options.teardown_timeout * 2):
                    await self._teardown_one(m)
            except Exception as exc:
                log.error("tearing down filesystem %d left something behind: %s", m.spec.index, exc)

    async def _teardown_one(self, m: Mounted) -> None:
        if m.link is not None:
            _, target = target_of(m.spec)
            with contextlib.suppress(OSError):
                if os.readlink(m.link) == target.name:
                    m.link.unlink()
        if m.target is not None and m.mounted:
            done = await self._run(self.system.umount, m.target)
            if done.returncode != 0:
                log.warning("umount %s: %s; detaching lazily", m.target, done.first_error_line())
                await self._run(self.system.umount, m.target, lazy=True)
        if m.loop_device is not None:
            await self._run(self.system.losetup_detach, m.loop_device)
        if m.dm_name is not None:
            await self._run(self.system.cryptsetup_close, m.dm_name)
        if m.fuse is not None and m.fuse_dir is not None:
            done = await self._run(self.system.fuse_unmount, m.fuse_dir)
            if done.returncode != 0:  # still in use (a lazily unmounted ext4 over it): detach lazily
                log.warning(
                    "unmounting FUSE at %s: %s; detaching lazily", m.fuse_dir, done.first_error_line()
                )
                await self._run(self.system.fuse_unmount, m.fuse_dir, lazy=True)
            try:
                async with asyncio.timeout(self.options.teardown_timeout):
                    code = await m.fuse.wait()
                if code != 0:
                    log.error("the FUSE process for filesystem %d exited with %d", m.spec.index, code)
            except TimeoutError:
                m.fuse.kill()
                await m.fuse.wait()
        if m.renew is not None:
            m.renew.cancel()
        if m.blob is not None:
            with contextlib.suppress(Exception):
                await m.blob.release_lease()
            await m.blob.aclose()
        if m.factory is not None:
            await m.factory.aclose()
        for path in (m.target, m.fuse_dir):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.rmdir()


def publish(link: Path, target_name: str) -> None:
    """``link → target_name`` (relative), swapped in with one rename so readers never see it half made."""
    tmp = link.with_name(f".{link.name}.encfs-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def dm_open(system: System, source: Path, name: str, key: bytes, *, header_size: int, work_dir: Path) -> None:
    """``cryptsetup open`` with the key on stdin; on failure, the Go sidecar's fallback: the first
    ``header_size`` bytes as a detached header file (no key in it), then open again with ``--header``."""
    first = system.cryptsetup_open(source, name, key)
    if first.returncode == 0:
        return
    log.warning("cryptsetup open failed (%s); retrying with a detached header", first.first_error_line())
    header = work_dir / f"luksheader-{name}.img"
    try:
        with source.open("rb") as src, header.open("wb") as dst:
            dst.write(src.read(header_size))
        second = system.cryptsetup_open(source, name, key, header=header)
    finally:
        header.unlink(missing_ok=True)
    if second.returncode != 0:
        raise MountError(f"cryptsetup open failed: {second.first_error_line()}")
