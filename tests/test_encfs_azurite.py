"""End to end: skr encfs create → upload to Azurite (HTTPS, --oauth basic) → ``skr encfs`` with keys
released from the local stack → the userspace backend mounts → files read back → teardown leaves nothing.

Everything runs as real processes (``skr local --no-sidecar``, ``skr encfs``), configured as a container
would be. Needs root, /dev/fuse, loop devices, fuse3, cryptsetup and Azurite; skips saying which is missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.akv.policy import build_confidential_containers_policy, encode_policy_for_wire
from skr.encfs.mount import loops_backed_by, mounted_paths
from tests.encfstools import Azurite, azurite, force_cleanup, require_mounts
from tests.procs import SKR, Proc, Processes, http_status, sidecar_env, start_local, wait_until

pytestmark = pytest.mark.timeout(300)


class Env:
    def __init__(self, root: Path, procs: Processes, info: dict[str, Any], az: Azurite, bundle: Path) -> None:
        self.root, self.procs, self.info, self.az, self.bundle = root, procs, info, az, bundle
        self.state = root / "state"

    def env(self, **extra: str) -> dict[str, str]:
        return sidecar_env(
            self.info,
            {
                "SKR_CA_BUNDLE": str(self.bundle),
                "SKR_ALLOWED_BLOB_ENDPOINTS": f"127.0.0.1:{self.az.port}",
                **extra,
            },
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*SKR, *args], env=self.env(), capture_output=True, text=True, timeout=120, check=False
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def create_in_vault(self, content: Path, image: Path, kid: str, tmp: Path) -> None:
        vault = self.info["akv_endpoint"]
        policy = str(self.policy(tmp))
        self.cli("encfs", "create", "--from", str(content), "--out", str(image), "--vault", vault,
                 "--kid", kid, "--policy", policy, "--allow-insecure-challenge")  # fmt: skip

    def policy(self, tmp: Path) -> Path:
        path = tmp / "policy.json"
        path.write_bytes(
            encode_policy_for_wire(
                build_confidential_containers_policy(
                    authority=self.info["attestation_url"], host_data=self.info["host_data"]
                )
            )
        )
        return path

    def config(self, tmp: Path, name: str, filesystems: list[dict[str, Any]]) -> Path:
        path = tmp / f"{name}.json"
        path.write_text(json.dumps({"azure_filesystems": filesystems}))
        return path

    def filesystem(
        self, mount_point: Path, blob: str, kid: str, *, read_write: bool = False, **extra: Any
    ) -> dict[str, Any]:
        return {
            "mount_point": str(mount_point),
            "azure_url": self.az.blob_url("images", blob),
            "azure_url_private": True,
            "read_write": read_write,
            "key": {
                "kid": kid,
                "kty": "oct-HSM",
                "authority": {"endpoint": self.info["maa_endpoint"]},
                "akv": {"endpoint": self.info["akv_endpoint"]},
            },
            **extra,
        }

    def start_encfs(self, config: Path, name: str, *extra: str, go_env: bool = False) -> Proc:
        """``skr encfs --config FILE``, or (``go_env``) the Go sidecar's way: base64 in EncfsSideCarArgs."""
        work = self.root / f"work-{name}"
        source = [] if go_env else ["--config", str(config)]
        audit = self.root / f"audit-{name}.log"  # one writer per audit file: each instance has its own
        argv = ["encfs", *source, "--evidence", "virtual", "--state-dir", str(self.state),
                "--work-dir", str(work), "--audit-log", str(audit), *extra]  # fmt: skip
        env = self.env()
        if go_env:
            env["EncfsSideCarArgs"] = base64.b64encode(config.read_bytes()).decode()
        return self.procs.spawn(f"encfs-{name}", argv, env)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[Env]:
    require_mounts()
    root = tmp_path_factory.mktemp("encfs-e2e")
    procs = Processes(root / "procs")
    try:
        _, info = start_local(procs, root / "state")
        with azurite(root / "azurite", ca) as az:
            bundle = root / "bundle.pem"
            bundle.write_bytes(Path(info["ca_bundle"]).read_bytes() + ca.ca_pem_path.read_bytes())
            from azure.storage.blob import BlobServiceClient

            service = BlobServiceClient.from_connection_string(
                az.connection_string(), connection_verify=str(bundle)
            )
            service.create_container("images")
            yield Env(root, procs, info, az, bundle)
    finally:
        procs.close()
        force_cleanup(root)
        force_cleanup(root.parent)  # the tests' own tmp_path folders sit beside root


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("content")
    (root / "docs" / "nested").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from an encrypted blob\n")
    (root / "docs" / "nested" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (root / "docs" / "empty").write_bytes(b"")
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_ready(proc: Proc, ready: Path) -> None:
    wait_until(lambda: ready.exists() and ready.read_text() == "1\n", proc, "skr encfs publishes", timeout=90)


def health_port(proc: Proc) -> int:
    def find() -> int | None:
        for record in proc.log_records():
            if record.get("msg") == "encfs health endpoints listening":
                return int(record["address"].rsplit(":", 1)[1])
        return None

    port: int = wait_until(find, proc, "skr encfs logs its health address")
    return port


def stop(proc: Proc, sig: signal.Signals = signal.SIGTERM) -> int:
    proc.send(sig)
    return proc.wait(60)


def assert_nothing_left(env: Env, mount_point: Path, name: str) -> None:
    work = env.root / f"work-{name}"
    assert not mount_point.is_symlink() and not mount_point.exists()
    mounts = mounted_paths()
    assert str(mount_point.parent / ".filesystem-0") not in mounts
    assert not [m for m in mounts if m.startswith(str(work))]
    assert loops_backed_by(work) == []


def lease_state(env: Env, blob: str) -> str:
    from azure.storage.blob import BlobClient

    client = BlobClient.from_connection_string(
        env.az.connection_string(), "images", blob, connection_verify=str(env.bundle)
    )
    return str(client.get_blob_properties().lease.state)


def audit_events(env: Env) -> list[dict[str, Any]]:
    """The records of every encfs instance (each has its own audit log: one chain, one writer)."""
    return [
        json.loads(line)
        for path in sorted(env.root.glob("audit-*.log"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def test_oct_key_read_only_mount_reads_every_file_back(e2e: Env, content: Path, tmp_path: Path) -> None:
    image = tmp_path / "oct.img"
    e2e.create_in_vault(content, image, "fs-oct", tmp_path)
    e2e.cli("encfs", "upload", str(image), "--url", e2e.az.blob_url("images", "oct.img"), "--page")
    mount_point = tmp_path / "mnt" / "share"
    mount_point.parent.mkdir()
    config = e2e.config(tmp_path, "oct", [e2e.filesystem(mount_point, "oct.img", "fs-oct")])
    ready = tmp_path / "ready"
    proc = e2e.start_encfs(config, "oct", "--ready-file", str(ready), "--port", "0")
    port = health_port(proc)
    wait_ready(proc, ready)
    assert http_status(f"http://127.0.0.1:{port}/readyz") == 200
    assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
    assert os.readlink(mount_point) == ".filesystem-0"
    assert files_of(mount_point) == files_of(content)
    with pytest.raises(OSError):
        (mount_point / "new.txt").write_text("read-only")
    assert stop(proc) == 0
    assert_nothing_left(e2e, mount_point, "oct")
    assert not ready.exists()
    mounts = [r for r in audit_events(e2e) if r.get("event") == "encfs.mount"]
    assert mounts and mounts[-1]["outcome"] == "granted"
    assert mounts[-1]["note"] == f"filesystem 0 at {mount_point}"


def rfc5869(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_rsa_key_with_hkdf_read_write_then_remount(e2e: Env, content: Path, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip
    e2e.cli("keys", "import", "--vault", e2e.info["akv_endpoint"], "--name", "fs-rsa", "--policy",
            str(e2e.policy(tmp_path)), "--key", str(pem), "--allow-insecure-challenge")  # fmt: skip
    d = key.private_numbers().d
    salt, label = "a1b2c3d4" * 8, "encfs test label"
    passphrase = tmp_path / "passphrase.bin"
    passphrase.write_bytes(
        rfc5869(d.to_bytes((d.bit_length() + 7) // 8, "big"), bytes.fromhex(salt), label.encode())
    )
    image = tmp_path / "rsa.img"
    e2e.cli("encfs", "create", "--from", str(content), "--out", str(image), "--key-file", str(passphrase))
    e2e.cli("encfs", "upload", str(image), "--url", e2e.az.blob_url("images", "rsa.img"), "--page")

    mount_point = tmp_path / "mnt" / "data"
    mount_point.parent.mkdir()
    spec = e2e.filesystem(
        mount_point, "rsa.img", "fs-rsa", read_write=True, key_derivation={"salt": salt, "label": label}
    )
    spec["key"]["kty"] = "RSA-HSM"
    ready = tmp_path / "ready"
    proc = e2e.start_encfs(e2e.config(tmp_path, "rw", [spec]), "rw", "--ready-file", str(ready))
    wait_ready(proc, ready)
    assert lease_state(e2e, "rsa.img") == "leased"

    # a second writer on the same blob is refused, with one clear message, and mounts nothing
    other = tmp_path / "mnt2" / "other"
    other.parent.mkdir()
    second = e2e.start_encfs(e2e.config(tmp_path, "second", [{**spec, "mount_point": str(other)}]), "second")
    assert second.wait(60) != 0
    assert "leased by another writer" in second.stderr()
    assert not other.exists()

    written = os.urandom(700_000)
    with open(mount_point / "written.bin", "wb") as f:
        f.write(written)
        f.flush()
        os.fsync(f.fileno())
    (mount_point / "hello.txt").write_text("changed\n")
    assert stop(proc) == 0
    assert_nothing_left(e2e, mount_point, "rw")
    assert lease_state(e2e, "rsa.img") == "available"

    # remount read-only: the writes are in the blob
    ro = {**spec, "read_write": False}
    ready.unlink(missing_ok=True)
    again = e2e.start_encfs(e2e.config(tmp_path, "ro", [ro]), "ro", "--ready-file", str(ready))
    wait_ready(again, ready)
    assert (mount_point / "written.bin").read_bytes() == written
    assert (mount_point / "hello.txt").read_text() == "changed\n"
    assert (mount_point / "docs" / "nested" / "data.bin").read_bytes() == (
        content / "docs" / "nested" / "data.bin"
    ).read_bytes()
    assert stop(again) == 0
    assert_nothing_left(e2e, mount_point, "ro")


def upload_bytes(e2e: Env, name: str, data: bytes) -> None:
    from azure.storage.blob import BlobClient

    client = BlobClient.from_connection_string(
        e2e.az.connection_string(), "images", name, connection_verify=str(e2e.bundle)
    )
    client.create_page_blob(len(data))
    client.upload_page(data, offset=0, length=len(data))


@pytest.fixture(scope="module")
def oct_image(e2e: Env, content: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("octimg")
    image = tmp / "fail.img"
    e2e.create_in_vault(content, image, "fs-fail", tmp)
    e2e.cli("encfs", "upload", str(image), "--url", e2e.az.blob_url("images", "fail.img"), "--page")
    return image


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong key", "LUKS2 unlock: the key does not open any keyslot"),
        ("denied release", "key release:"),
        ("truncated image", "LUKS2 header: the LUKS2 header is truncated"),
        ("missing blob", "blob: the blob"),
        ("block blob read-write", "read-write mounts need a page blob"),
    ],
)
def test_failures_end_with_one_clear_message_and_nothing_mounted(
    e2e: Env, oct_image: Path, tmp_path: Path, case: str, expected: str
) -> None:
    blob, kid = "fail.img", "fs-fail"
    if case == "wrong key":
        kid = "demo-oct"  # a real, releasable key — but not this image's
    elif case == "denied release":
        kid = "demo-denied"  # bound to another HOST_DATA
    elif case == "truncated image":
        blob = "truncated.img"
        upload_bytes(e2e, blob, oct_image.read_bytes()[:8192])
    elif case == "block blob read-write":
        blob = "block.img"  # uploaded as a block blob: fine to read, refused for writing
        e2e.cli("encfs", "upload", str(oct_image), "--url", e2e.az.blob_url("images", blob))
    else:
        blob = "no-such.img"
    mount_point = tmp_path / "mnt" / "x"
    mount_point.parent.mkdir()
    name = case.replace(" ", "-")
    spec = e2e.filesystem(mount_point, blob, kid, read_write=case == "block blob read-write")
    proc = e2e.start_encfs(e2e.config(tmp_path, name, [spec]), name)
    assert proc.wait(90) == 2
    last = proc.stderr().strip().splitlines()[-1]
    assert last.startswith(f"skr: filesystem 0 ({mount_point}): ") and expected in last, proc.stderr()
    assert "Traceback" not in proc.stderr()
    if case == "missing blob":
        assert "does not exist" in last
    if case == "denied release":
        records = [r for r in audit_events(e2e) if r.get("note") == f"filesystem 0 at {mount_point}"]
        assert [(r["event"], r["outcome"], r["kid"]) for r in records] == [
            ("encfs.mount", "denied", "demo-denied")
        ]
    assert_nothing_left(e2e, mount_point, name)
    time.sleep(0)


def test_a_crash_leaves_nothing_that_blocks_the_next_start(e2e: Env, oct_image: Path, tmp_path: Path) -> None:
    mount_point = tmp_path / "mnt" / "crash"
    mount_point.parent.mkdir()
    config = e2e.config(tmp_path, "crash", [e2e.filesystem(mount_point, "fail.img", "fs-fail")])
    ready = tmp_path / "ready"
    first = e2e.start_encfs(config, "crash", "--ready-file", str(ready), go_env=True)
    wait_ready(first, ready)
    first.send(signal.SIGKILL)
    first.wait(10)
    assert str(mount_point.parent / ".filesystem-0") in mounted_paths()  # what a crash leaves
    ready.unlink()
    second = e2e.start_encfs(config, "crash", "--ready-file", str(ready))
    wait_ready(second, ready)
    assert files_of(mount_point)["hello.txt"] == b"hello from an encrypted blob\n"
    assert stop(second, signal.SIGINT) == 0
    assert_nothing_left(e2e, mount_point, "crash")


class DmRecorder:
    """A runner for the dm-crypt backend on a kernel without device-mapper: cryptsetup, mount and umount
    are recorded (and succeed); FUSE unmounting runs for real, as the raw-image FUSE process is real."""

    def __init__(self) -> None:
        from skr.encfs.system import HostRunner

        self.real = HostRunner()
        self.calls: list[tuple[list[str], bytes | None]] = []

    def run(self, argv: Any, *, stdin: bytes | None = None, timeout: float = 120.0) -> Any:
        from skr.encfs.system import Completed

        if argv[0].startswith("fusermount"):
            return self.real.run(argv, stdin=stdin, timeout=timeout)
        self.calls.append((list(argv), stdin))
        if argv[:2] == ["cryptsetup", "open"]:
            # the raw image is served: its first bytes are the LUKS2 magic cryptsetup would read
            source = Path(argv[4])
            assert source.read_bytes()[:6] == b"LUKS\xba\xbe"
        return Completed(0)


async def test_dm_crypt_backend_command_lines_with_a_recording_fake(
    e2e: Env, content: Path, tmp_path: Path
) -> None:
    from skr.encfs.args import parse_encfs_json
    from skr.encfs.blob import blob_allowlist
    from skr.encfs.mount import EncfsMounter, Options
    from skr.encfs.system import System

    key = os.urandom(32)
    key_file = tmp_path / "key.bin"
    key_file.write_bytes(key)
    image = tmp_path / "dm.img"
    e2e.cli("encfs", "create", "--from", str(content), "--out", str(image), "--key-file", str(key_file))
    upload_bytes(e2e, "dm.img", image.read_bytes())
    mount_point = tmp_path / "mnt" / "dm"
    mount_point.parent.mkdir()
    spec = {**e2e.filesystem(mount_point, "dm.img", "dm-key"), "azure_url_private": False}
    jwk = json.dumps({"kty": "oct", "k": base64.urlsafe_b64encode(key).rstrip(b"=").decode()})

    async def key_source(_: Any) -> str:
        return jwk

    from azure.storage.blob import ContainerClient

    ContainerClient.from_connection_string(
        e2e.az.connection_string(), "images", connection_verify=str(e2e.bundle)
    ).set_container_access_policy(signed_identifiers={}, public_access="blob")
    fake = DmRecorder()
    mounter = EncfsMounter(
        parse_encfs_json(json.dumps({"azure_filesystems": [spec]})),
        Options(
            backend="dm-crypt",
            work_dir=tmp_path / "work",
            blob_allowlist=blob_allowlist({"SKR_ALLOWED_BLOB_ENDPOINTS": f"127.0.0.1:{e2e.az.port}"}),
            ca_bundle=e2e.bundle,
        ),
        key_source=key_source,
        system=System(fake),
    )
    await mounter.mount_all()
    try:
        assert os.readlink(mount_point) == ".filesystem-0"
    finally:
        await mounter.teardown()
    argvs = [argv for argv, _ in fake.calls]
    data = str(tmp_path / "work" / "0" / "data")
    target = str(mount_point.parent / ".filesystem-0")
    opened = ["cryptsetup", "open", "--type", "luks2", data, "remote-crypt-0", "--key-file", "-",
              "--integrity-no-journal", "--persistent"]  # fmt: skip
    assert opened in argvs
    (stdin,) = [s for argv, s in fake.calls if argv == opened]
    assert stdin == key  # on stdin, never a key file
    assert not [a for a in argvs if any(key.hex() in x for x in a)]
    assert ["mount", "-t", "ext4", "-o", "ro,noload", "/dev/mapper/remote-crypt-0", target] in argvs
    # teardown order: ext4 first, then the mapping (FUSE last, for real)
    assert argvs.index(["umount", target]) < argvs.index(["cryptsetup", "close", "remote-crypt-0"])
    assert not mount_point.is_symlink()
    assert not [m for m in mounted_paths() if m.startswith(str(tmp_path))]


def test_teardown_is_bounded_while_the_app_still_holds_a_file(
    e2e: Env, oct_image: Path, tmp_path: Path
) -> None:
    mount_point = tmp_path / "mnt" / "busy"
    mount_point.parent.mkdir()
    config = e2e.config(tmp_path, "busy", [e2e.filesystem(mount_point, "fail.img", "fs-fail")])
    ready = tmp_path / "ready"
    proc = e2e.start_encfs(config, "busy", "--ready-file", str(ready))
    wait_ready(proc, ready)
    held = open(mount_point / "hello.txt", "rb")  # noqa: SIM115 - the app keeps it open through the SIGTERM
    try:
        started = time.monotonic()
        assert stop(proc) == 0
        assert time.monotonic() - started < 50
        assert not mount_point.is_symlink()
        assert "busy" in proc.stderr() or "detaching lazily" in proc.stderr()
    finally:
        held.close()
    for _ in range(100):  # the lazy detach completes once the last file is closed
        if not [m for m in mounted_paths() if m.startswith(str(tmp_path))] and not loops_backed_by(
            e2e.root / "work-busy"
        ):
            break
        time.sleep(0.1)
    assert_nothing_left(e2e, mount_point, "busy")
